"""The IFRT proxy protocol (what JAX's "proxy" backend speaks): generated protobuf and gRPC modules
of the .proto files here, served by runtime/proxy/."""

from proto.ifrt import (grpc_ifrt_service_pb2, grpc_ifrt_service_pb2_grpc, ifrt_arrays_pb2,
                        ifrt_programs_pb2, ifrt_service_pb2, proxy_types_pb2, status_pb2,
                        types_pb2, xla_pb2)

__all__ = ["grpc_ifrt_service_pb2", "grpc_ifrt_service_pb2_grpc", "ifrt_arrays_pb2",
           "ifrt_programs_pb2", "ifrt_service_pb2", "proxy_types_pb2", "status_pb2", "types_pb2",
           "xla_pb2"]
