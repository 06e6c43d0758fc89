"""Wire protocol of the runtime: generated protobuf and gRPC modules for proto/pathways.proto."""

from proto import pathways_pb2, pathways_pb2_grpc

__all__ = ["pathways_pb2", "pathways_pb2_grpc"]
