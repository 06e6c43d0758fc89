"""The committed generated modules match proto/pathways.proto, and the .proto is documented."""

import pathlib
import re
import subprocess
import sys

from google.protobuf import descriptor_pb2

from proto import pathways_pb2, pathways_pb2_grpc

PROTO = pathlib.Path(__file__).resolve().parent.parent / "proto" / "pathways.proto"


def test_generated_code_is_not_stale(tmp_path):
    """Fails when pathways.proto changed without `python -m proto.regenerate`."""
    out = tmp_path / "descriptor.pb"
    root = PROTO.parent.parent
    subprocess.run([sys.executable, "-m", "grpc_tools.protoc", f"-I{root}",
                    f"--descriptor_set_out={out}", str(PROTO)], check=True)
    fresh = descriptor_pb2.FileDescriptorSet.FromString(out.read_bytes()).file[0]
    _strip_json_names(fresh.message_type)  # protoc fills them in; generated modules leave them out
    committed = descriptor_pb2.FileDescriptorProto.FromString(
        pathways_pb2.DESCRIPTOR.serialized_pb)
    assert fresh == committed, "proto/pathways_pb2.py is stale: run python -m proto.regenerate"
    for service in fresh.service:
        stub = getattr(pathways_pb2_grpc, f"{service.name}Stub")
        servicer = getattr(pathways_pb2_grpc, f"{service.name}Servicer")
        for method in service.method:
            assert hasattr(servicer, method.name), f"{service.name}.{method.name} not generated"
        assert stub


def _strip_json_names(messages) -> None:
    for message in messages:
        for field in message.field:
            field.ClearField("json_name")
        _strip_json_names(message.nested_type)


def test_generated_files_say_do_not_edit():
    for name in ("pathways_pb2.py", "pathways_pb2_grpc.py"):
        assert "do not edit" in (PROTO.parent / name).read_text().splitlines()[0]


def test_every_message_field_and_rpc_has_a_comment():
    lines = PROTO.read_text().splitlines()
    declaration = re.compile(r"^\s*(message|service|rpc|oneof|(repeated\s+)?[\w.]+\s+\w+\s*=\s*\d+)")
    for i, line in enumerate(lines):
        if declaration.match(line):
            above = lines[i - 1].strip()
            assert above.startswith("//"), f"line {i + 1} has no comment: {line.strip()}"


def test_each_rpc_has_its_own_request_and_reply():
    file = descriptor_pb2.FileDescriptorProto.FromString(pathways_pb2.DESCRIPTOR.serialized_pb)
    for service in file.service:
        for method in service.method:
            if method.client_streaming or method.server_streaming:
                continue  # array streams share the ArrayChunk message by design
            assert method.input_type.endswith(f"{method.name}Request"), method.name
            assert method.output_type.endswith(f"{method.name}Reply"), method.name
