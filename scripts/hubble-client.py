#!/usr/bin/env python3
"""A Hubble API client as Hubble's own tooling would build one: Python stubs generated with
grpcio-tools from the project's protocol definitions (agent/hubble/proto), called with grpcio.

  hubble-client.py ADDR status                      ServerStatus as JSON
  hubble-client.py ADDR nodes                       GetNodes as JSON
  hubble-client.py ADDR flows REQUEST_JSON          GetFlows: one response per line (JSON)
  hubble-client.py ADDR follow REQUEST_JSON N SECS  GetFlows with follow: the first N flows, or
                                                    fail after SECS seconds
  hubble-client.py ADDR services                    the services gRPC reflection lists

ADDR is host:port or unix:PATH. REQUEST_JSON is a GetFlowsRequest in protobuf's JSON mapping.
"""
import importlib
import json
import os
import sys
import tempfile

import grpc
from google.protobuf import json_format
from grpc_tools import protoc


def stubs():
    here = os.path.dirname(os.path.abspath(__file__))
    protos = os.path.join(here, "..", "agent", "hubble", "proto")
    out = tempfile.mkdtemp(prefix="porin-hubble-stubs-")
    well_known = os.path.join(os.path.dirname(protoc.__file__), "_proto")
    for f in ["flow/flow.proto", "relay/relay.proto", "observer/observer.proto"]:
        rc = protoc.main(["protoc", f"-I{protos}", f"-I{well_known}", f"--python_out={out}", f"--grpc_python_out={out}", f])
        if rc != 0:
            sys.exit(f"protoc failed on {f}")
    sys.path.insert(0, out)
    return importlib.import_module("observer.observer_pb2"), importlib.import_module("observer.observer_pb2_grpc"), out


def as_json(msg):
    return json.dumps(json_format.MessageToDict(msg, preserving_proto_field_name=True), sort_keys=True)


def main():
    addr, cmd = sys.argv[1], sys.argv[2]
    # Over a Unix socket grpc-core sends the socket path as the :authority, which is not a valid
    # authority (HTTP/2 servers such as hyper refuse the stream); Go's gRPC sends "localhost".
    options = [("grpc.default_authority", "localhost")] if addr.startswith("unix:") else []
    channel = grpc.insecure_channel(addr, options=options)
    if cmd == "services":
        from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

        stub = reflection_pb2_grpc.ServerReflectionStub(channel)
        req = reflection_pb2.ServerReflectionRequest(list_services="")
        for r in stub.ServerReflectionInfo(iter([req]), timeout=10):
            for s in r.list_services_response.service:
                print(s.name)
        return
    pb, rpc, out = stubs()
    try:
        stub = rpc.ObserverStub(channel)
        if cmd == "status":
            print(as_json(stub.ServerStatus(pb.ServerStatusRequest(), timeout=10)))
        elif cmd == "nodes":
            print(as_json(stub.GetNodes(pb.GetNodesRequest(), timeout=10)))
        elif cmd == "flows":
            req = json_format.Parse(sys.argv[3], pb.GetFlowsRequest())
            for r in stub.GetFlows(req, timeout=30):
                print(as_json(r), flush=True)
        elif cmd == "follow":
            req = json_format.Parse(sys.argv[3], pb.GetFlowsRequest())
            want, secs = int(sys.argv[4]), float(sys.argv[5])
            print("following", flush=True)
            got = 0
            stream = stub.GetFlows(req, timeout=secs)
            for r in stream:
                print(as_json(r), flush=True)
                if r.HasField("flow"):
                    got += 1
                    if got >= want:
                        stream.cancel()
                        break
            if got < want:
                sys.exit(f"followed {got} flows, wanted {want}")
        else:
            sys.exit(f"unknown command {cmd}")
    finally:
        import shutil

        shutil.rmtree(out, ignore_errors=True)


if __name__ == "__main__":
    main()
