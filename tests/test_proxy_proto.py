"""The committed modules of proto/ifrt/*.proto (the IFRT proxy protocol) match their sources, and
the sources are documented."""

import pathlib
import re
import subprocess
import sys

import pytest
from google.protobuf import descriptor_pb2

from proto import ifrt
from proto.ifrt import grpc_ifrt_service_pb2_grpc

ROOT = pathlib.Path(__file__).resolve().parent.parent
SOURCES = sorted((ROOT / "proto" / "ifrt").glob("*.proto"))


def _strip_json_names(messages) -> None:
    for message in messages:
        for field in message.field:
            field.ClearField("json_name")
        _strip_json_names(message.nested_type)


@pytest.mark.parametrize("source", SOURCES, ids=lambda p: p.name)
def test_generated_code_is_not_stale(source, tmp_path):
    """Fails when a proto/ifrt source changed without `python -m proto.regenerate`."""
    out = tmp_path / "descriptor.pb"
    subprocess.run([sys.executable, "-m", "grpc_tools.protoc", f"-I{ROOT}",
                    f"--descriptor_set_out={out}", str(source)], check=True)
    fresh = descriptor_pb2.FileDescriptorSet.FromString(out.read_bytes()).file[0]
    _strip_json_names(fresh.message_type)
    module = getattr(ifrt, f"{source.stem}_pb2")
    committed = descriptor_pb2.FileDescriptorProto.FromString(module.DESCRIPTOR.serialized_pb)
    assert fresh == committed, f"{source.name} is stale: run python -m proto.regenerate"
    assert "do not edit" in (source.parent / f"{source.stem}_pb2.py").read_text().splitlines()[0]


def test_the_service_is_generated():
    file = descriptor_pb2.FileDescriptorProto.FromString(
        ifrt.grpc_ifrt_service_pb2.DESCRIPTOR.serialized_pb)
    (service,) = file.service
    for method in service.method:
        assert hasattr(grpc_ifrt_service_pb2_grpc.GrpcIfrtServiceServicer, method.name)


@pytest.mark.parametrize("source", SOURCES, ids=lambda p: p.name)
def test_every_message_field_and_rpc_has_a_comment(source):
    lines = source.read_text().splitlines()
    declaration = re.compile(r"^\s*(message|service|rpc|oneof|(repeated\s+|optional\s+)?"
                             r"[\w.]+\s+\w+\s*=\s*\d+)")
    for i, line in enumerate(lines):
        if declaration.match(line) and not line.strip().startswith(("KIND_", "reserved")):
            assert lines[i - 1].strip().startswith("//"), \
                f"{source.name}:{i + 1} has no comment: {line.strip()}"
