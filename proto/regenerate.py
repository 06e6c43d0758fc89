"""Regenerates proto/pathways_pb2.py and proto/pathways_pb2_grpc.py from proto/pathways.proto.

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


def main() -> int:
    from grpc_tools import protoc

    args = ["protoc", f"-I{ROOT}", f"--python_out={ROOT}", f"--grpc_python_out={ROOT}",
            str(ROOT / "proto" / "pathways.proto")]
    if protoc.main(args) != 0:
        print("protoc failed", file=sys.stderr)
        return 1
    for name in OUTPUTS:
        path = ROOT / name
        text = path.read_text()
        if not text.startswith(HEADER):
            path.write_text(HEADER + text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
