"""The floor every process of the runtime shares: the wire protocol (generated protobuf and gRPC
modules for proto/pathways.proto), and the modules beside it (errors, wire encoding, access,
auth, RPC plumbing, limits, instruction kinds, settings). Imports nothing of runtime/ or
scheduler/ (tests/test_layout.py)."""

from proto import pathways_pb2, pathways_pb2_grpc

__all__ = ["pathways_pb2", "pathways_pb2_grpc"]
