"""A real gRPC server (grpcio) for the sidecar-less tests: Cloud City's door manager, raw-bytes
messages (no protobuf code generation). Usage: grpc_door.py PORT"""
import sys
from concurrent import futures

import grpc

METHODS = ["GetName", "GetLocation", "GetStatus", "RequestMaintenance", "SetAccessCode"]


def handler(name):
    def call(request, context):
        peer = context.peer()
        return f"{name}: {request.decode()} from {peer}".encode()

    return grpc.unary_unary_rpc_method_handler(call)


server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
server.add_generic_rpc_handlers(
    (grpc.method_handlers_generic_handler("cloudcity.DoorManager", {m: handler(m) for m in METHODS}),)
)
server.add_insecure_port(f"[::]:{int(sys.argv[1])}")
server.start()
server.wait_for_termination()
