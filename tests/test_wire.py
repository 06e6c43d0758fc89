"""Shard geometry and chunked array streams."""


import ml_dtypes
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from proto import pathways_pb2 as pb
from runtime import InvalidArgumentError
from proto import wire as _wire

MESH = _wire.MeshShape((2, 2), ("x", "y"))


def groups(shape, spec):
    return _wire.shard_groups(shape, MESH, _wire.spec_to_proto(1, spec))


def test_shard_groups_cover_the_array_once_per_distinct_shard():
    assert groups((4, 6), P()) == [(((0, 4), (0, 6)), [0, 1, 2, 3])]
    assert groups((4, 6), P("x")) == [(((0, 2), (0, 6)), [0, 1]), (((2, 4), (0, 6)), [2, 3])]
    assert [g[1] for g in groups((4, 6), P("x", "y"))] == [[0], [1], [2], [3]]
    # A tuple entry splits one dimension over several axes, major to minor.
    assert [g[0][0] for g in groups((8,), P(("y", "x")))] == [(0, 2), (4, 6), (2, 4), (6, 8)]


def test_spec_round_trips_through_proto():
    for spec in (P(), P("x"), P(None, "y"), P(("x", "y"), None)):
        back = _wire.spec_from_proto(_wire.spec_to_proto(3, spec))
        assert tuple(back) == tuple(spec)


@pytest.mark.parametrize("shape,spec,match", [
    ((5,), P("x"), "does not split"),
    ((4,), P("z"), "axis 'z'"),
    ((4,), P("x", "y"), "rank 1"),
    ((4, 4), P("x", "x"), "twice"),
    ((-1,), P(), "invalid shape"),
])
def test_bad_shardings_are_rejected(shape, spec, match):
    with pytest.raises(InvalidArgumentError, match=match):
        groups(shape, spec)


@pytest.mark.parametrize("dtype", [np.float32, ml_dtypes.bfloat16, np.int32, np.bool_])
def test_chunks_round_trip(monkeypatch, dtype):
    monkeypatch.setattr(_wire, "CHUNK_BYTES", 100)  # force many chunks per shard
    x = (np.arange(24 * 10) % 7).astype(dtype).reshape(24, 10)
    spec = pb.ArraySpec(array_id=5, dtype=np.dtype(dtype).name, shape=x.shape)
    shards = [(i, ps, x[_wire.as_slices(i)]) for i, ps in groups(x.shape, P("x"))]
    got_spec, got = _wire.assemble_chunks(list(_wire.iter_chunks(spec, shards)))
    assert got_spec.array_id == 5
    assert [s.index for s in got] == [s[0] for s in shards]
    for (_, ps, data), shard in zip(shards, got):
        assert shard.positions == list(ps)
        np.testing.assert_array_equal(shard.data, data)


def test_truncated_and_oversized_streams_are_rejected():
    x = np.arange(16, dtype=np.float32)
    spec = pb.ArraySpec(array_id=1, dtype="float32", shape=[16])
    chunks = list(_wire.iter_chunks(spec, [(((0, 16),), [0], x)]))
    short = pb.ArrayChunk()
    short.CopyFrom(chunks[0])
    short.data = short.data[:-4]
    with pytest.raises(InvalidArgumentError, match="truncated"):
        _wire.assemble_chunks([short])
    extra = pb.ArrayChunk(data=b"1234")
    with pytest.raises(InvalidArgumentError, match="more bytes"):
        _wire.assemble_chunks(chunks + [extra])
    with pytest.raises(InvalidArgumentError, match="before any shard"):
        _wire.assemble_chunks([pb.ArrayChunk(spec=spec, data=b"1234")])
    with pytest.raises(InvalidArgumentError, match="unsupported dtype"):
        _wire.assemble_chunks([pb.ArrayChunk(spec=pb.ArraySpec(dtype="object"))])


def test_shard_files_are_refused_whatever_they_name(tmp_path):
    """Named files of /dev/shm are not a transfer path (segments are, proto.shm): a header naming
    one is refused before anything is opened."""
    spec = pb.ArraySpec(array_id=1, dtype="float32", shape=[16])
    secret = tmp_path / "secret"
    secret.write_bytes(b"\0" * 64)
    for name in ("../../etc/passwd", "/etc/passwd", "pathways-" + "0" * 32, str(secret)):
        header = pb.ShardHeader(index=_wire.index_to_proto(((0, 16),)), nbytes=64,
                                mesh_positions=[0], shared_file=name)
        with pytest.raises(InvalidArgumentError, match="shard files"):
            _wire.assemble_chunks([pb.ArrayChunk(spec=spec, shard=header)])
