"""A real gRPC client (grpcio) for the proxy tests: calls one unary method with raw bytes and
prints what it got as JSON: {"code", "details", "response", "headers", "trailers"}."""
import json
import sys

import grpc

target, method, payload = sys.argv[1], sys.argv[2], sys.argv[3].encode()
with grpc.insecure_channel(target) as channel:
    call = channel.unary_unary(method)
    try:
        response, info = call.with_call(payload, timeout=10, metadata=[("x-client", "grpcio")])
        out = {
            "code": "OK",
            "details": "",
            "response": response.decode(),
            "headers": dict(info.initial_metadata()),
            "trailers": dict(info.trailing_metadata()),
        }
    except grpc.RpcError as e:
        out = {
            "code": e.code().name,
            "details": e.details(),
            "response": None,
            "headers": dict(e.initial_metadata() or ()),
            "trailers": dict(e.trailing_metadata() or ()),
        }
print(json.dumps(out))
