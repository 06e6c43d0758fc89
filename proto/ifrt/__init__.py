"""The IFRT proxy protocol (what JAX's "proxy" backend speaks): generated protobuf and gRPC modules
of the .proto files here, served by runtime/proxy/."""

from proto.ifrt import ifrt_service_pb2, ifrt_service_pb2_grpc, proxy_types_pb2, status_pb2
from proto.ifrt import types_pb2, xla_pb2

__all__ = ["ifrt_service_pb2", "ifrt_service_pb2_grpc", "proxy_types_pb2", "status_pb2",
           "types_pb2", "xla_pb2"]
