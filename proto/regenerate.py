"""Regenerates the protobuf and gRPC modules of proto/pathways.proto and proto/ifrt/*.proto.

Run from the repository root: `python -m proto.regenerate` (needs grpcio-tools, in the `dev` and
`test` extras). tests/test_proto.py fails when the committed modules no longer match the .proto.
"""

from __future__ import annotations

import pathlib
import sys

HEADER = (
    "# Generated from proto/pathways.proto by `python -m proto.regenerate`: do not edit.\n"
)
ROOT = pathlib.Path(__file__).resolve().parent.parent
OUTPUTS = ("proto/pathways_pb2.py", "proto/pathways_pb2_grpc.py")
#: Sources that define a service (the others get no *_pb2_grpc.py).
SERVICES = ("proto/pathways.proto", "proto/ifrt/grpc_ifrt_service.proto")
#: The IFRT proxy protocol (runtime/proxy/): its .proto files, generated next to them.
IFRT_PROTOS = tuple(sorted(str(p.relative_to(ROOT))
                           for p in (ROOT / "proto" / "ifrt").glob("*.proto")))


def header(source: str) -> str:
    return f"# Generated from {source} by `python -m proto.regenerate`: do not edit.\n"


def main() -> int:
    from grpc_tools import protoc

    sources = ["proto/pathways.proto", *IFRT_PROTOS]
    args = ["protoc", f"-I{ROOT}", f"--python_out={ROOT}", f"--grpc_python_out={ROOT}",
            *(str(ROOT / s) for s in sources)]
    if protoc.main(args) != 0:
        print("protoc failed", file=sys.stderr)
        return 1
    for source in sources:
        stem = source[:-len(".proto")]
        for name in (f"{stem}_pb2.py", f"{stem}_pb2_grpc.py"):
            path = ROOT / name
            text = path.read_text()
            if name.endswith("_grpc.py") and source not in SERVICES:
                path.unlink()  # protoc writes an empty module for a file without services
                continue
            if not text.startswith(header(source)):
                path.write_text(header(source) + text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
