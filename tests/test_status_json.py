"""`pathways status --json`: every field present (zero values too), numbers as numbers."""

import json
import os
import subprocess
import sys

import numpy as np
from google.protobuf.descriptor import FieldDescriptor

import runtime
from proto import pathways_pb2 as pb
from runtime.cli.status_json import message_to_json


def _check_complete(obj, descriptor, where="status"):
    """Every field of `descriptor` is a key of `obj`, with a JSON value of the field's kind."""
    assert set(obj) == {f.name for f in descriptor.fields}, where
    for field in descriptor.fields:
        value = obj[field.name]
        values = value if field.is_repeated else [value]
        if field.is_repeated:
            assert isinstance(value, list), f"{where}.{field.name}"
        for v in values:
            if field.type == FieldDescriptor.TYPE_MESSAGE:
                _check_complete(v, field.message_type, f"{where}.{field.name}")
            elif field.type in (FieldDescriptor.TYPE_INT32, FieldDescriptor.TYPE_INT64,
                                FieldDescriptor.TYPE_UINT32, FieldDescriptor.TYPE_UINT64):
                assert type(v) is int, f"{where}.{field.name} = {v!r}"
            elif field.type == FieldDescriptor.TYPE_DOUBLE:
                assert type(v) in (int, float), f"{where}.{field.name} = {v!r}"
            elif field.type == FieldDescriptor.TYPE_STRING:
                assert type(v) is str, f"{where}.{field.name} = {v!r}"


def test_status_json_is_complete_with_numbers_as_numbers():
    with runtime.LocalCluster(islands=2, devices_per_island=2) as cluster:
        client = cluster.client()
        s = client.slice({"d": 2}, island=0)
        x = client.put(np.arange(4.0, dtype=np.float32), s)
        client.jit(lambda v: v * 2, s)(x).fetch()

        # The host token: the cluster's own view, which includes other clients' slices.
        env = dict(os.environ, PATHWAYS_TOKEN=cluster.credentials.token,
                   PATHWAYS_HOST_TOKEN=cluster._cluster_credentials.host_token)
        result = subprocess.run([sys.executable, "-m", "runtime.cli", "status", cluster.address,
                                 "--json"], capture_output=True, text=True, timeout=120, env=env)
        assert result.returncode == 0, result.stderr
        status = json.loads(result.stdout)
        _check_complete(status, pb.GetStatusReply.DESCRIPTOR)

        island0 = next(i for i in status["islands"] if i["island"] == 0)
        assert island0["policy"] == "fifo" and island0["failure"] == ""
        assert island0["sequence"] >= 3 and type(island0["sequence"]) is int
        host0 = next(h for h in status["hosts"] if (h["island"], h["host"]) == (0, 0))
        assert host0["queue_depth"] == 0 and host0["state"] == "alive"
        assert host0["device_memory_bytes"] > 2**20
        (sl,) = status["slices"]
        assert sl["island"] == 0 and sl["mesh_shape"] == [2] and sl["axis_names"] == ["d"]
        assert sl["devices"] == [{"host": 0, "device": 0}, {"host": 0, "device": 1}]
        assert status["sessions"] == 1 and status["arrays"] == 2  # x, 2x; status opened none


def test_non_finite_floats_and_enums_are_valid_json():
    tenant = pb.TenantStatus(device_seconds=float("inf"))
    assert message_to_json(tenant)["device_seconds"] is None
    assert json.loads(json.dumps(message_to_json(tenant)))["session_id"] == 0
