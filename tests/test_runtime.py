"""End to end on an in-process 2-island cluster: results equal in-process JAX exactly.

The checks size their slices from the island they run on, so tests/test_ray.py runs the same ones
on Ray-placed islands of 2 devices (these islands have 4)."""

import dataclasses
import time

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

import runtime


def reference(f, args, vslice, in_specs, out_specs):
    """`f` run by in-process JAX on a local mesh shaped like `vslice`, with the same shardings."""
    devices = np.array(jax.devices()[:vslice.size]).reshape(vslice.mesh_shape.shape)
    mesh = jax.sharding.Mesh(devices, vslice.mesh_shape.axis_names)

    def named(specs):
        return jax.tree.map(lambda s: jax.sharding.NamedSharding(mesh, s), specs,
                            is_leaf=lambda s: isinstance(s, P))

    out = jax.jit(f, in_shardings=named(in_specs), out_shardings=named(out_specs))(*args)
    return jax.tree.map(np.asarray, out)


def whole_island(client, island, axes=("d",)):
    """A slice of every device of `island`: one axis, or two with the second of size 2."""
    n = sum(h.num_devices for h in client.status().hosts if h.island == island)
    return client.slice((n // 2, 2) if len(axes) == 2 else (n,), axes, island=island)


def test_sharded_matmul_plus_reduction_matches_jax(client):
    s = whole_island(client, 0, ("x", "y"))
    rng = np.random.default_rng(0)
    a = rng.standard_normal((64, 32), dtype=np.float32)
    b = rng.standard_normal((32, 16), dtype=np.float32)

    def f(a, b):
        return (a @ b).sum(axis=0)

    ra, rb = client.put((a, b), s, (P("x", "y"), P("y", None)))
    out = client.jit(f, s, out_specs=P())(ra, rb)
    assert out.shape == (16,) and out.dtype == np.float32
    want = reference(f, (a, b), s, (P("x", "y"), P("y", None)), P())
    np.testing.assert_array_equal(out.fetch(), want)


def test_shard_map_psum(client):
    s = whole_island(client, 1)
    x = np.arange(16, dtype=np.float32)

    def step(v):
        return jax.shard_map(lambda b: b + jax.lax.psum(b.sum(), "d"), mesh=s.mesh,
                             in_specs=P("d"), out_specs=P("d"))(v)

    f = client.jit(step, s, in_specs=P("d"), out_specs=P("d"))
    y = f(client.put(x, s, P("d")))
    np.testing.assert_array_equal(y.fetch(), x + x.sum())


def test_pytree_in_and_out(client):
    s = whole_island(client, 0)
    tree = {"w": np.ones((8, 4), np.float32), "b": (np.arange(4, dtype=np.int32), np.float32(2.0))}

    def f(t):
        return {"sum": t["w"].sum() * t["b"][1], "parts": [t["w"] * 2, t["b"][0] + 1]}

    remote = client.put(tree, s, {"w": P("d"), "b": None})
    out = client.jit(f, s, out_specs={"sum": P(), "parts": [P("d"), P()]})(remote)
    got = client.fetch(out)
    want = reference(f, (tree,), s, ({"w": P("d"), "b": (P(), P())},),
                     {"sum": P(), "parts": [P("d"), P()]})
    assert set(got) == {"sum", "parts"} and isinstance(got["parts"], list)
    jax.tree.map(np.testing.assert_array_equal, got, want)
    assert out["parts"][0].spec == P("d")


@pytest.mark.parametrize("dtype", [np.float32, ml_dtypes.bfloat16, np.int32, np.bool_])
def test_dtypes_round_trip_and_compute(client, dtype):
    s = whole_island(client, 0, ("x", "y"))
    x = (np.arange(32).reshape(8, 4) % 3).astype(dtype)
    r = client.put(x, s, P("x", "y"))
    assert r.dtype == np.dtype(dtype)
    np.testing.assert_array_equal(r.fetch(), x)

    def f(v):
        return jnp.logical_not(v) if v.dtype == jnp.bool_ else v * v + v

    y = client.jit(f, s, out_specs=P("x"))(r)
    want = reference(f, (x,), s, (P("x", "y"),), P("x"))
    got = y.fetch()
    assert got.dtype == want.dtype
    np.testing.assert_array_equal(got, want)


def test_scalar(client):
    s = whole_island(client, 1)
    r = client.put(np.float32(3.5), s)
    assert r.shape == ()
    out = client.jit(lambda v: v * 2 + 1, s)(r)
    assert out.shape == () and out.fetch() == np.float32(8.0)
    assert float(np.asarray(out)) == 8.0


def test_chained_calls_and_reuse_of_compiled_function(client):
    s = whole_island(client, 0)
    f = client.jit(lambda v: v + 1, s, in_specs=P("d"), out_specs=P("d"))
    v = client.put(np.zeros(8, np.float32), s, P("d"))
    for _ in range(50):
        v = f(v)
    np.testing.assert_array_equal(v.fetch(), np.full(8, 50, np.float32))
    assert len(f._cache) == 1


def test_300mb_array_round_trip(client):
    s = whole_island(client, 1, ("x", "y"))
    x = np.random.default_rng(1).standard_normal((75 * 1024, 1024), dtype=np.float32)
    assert x.nbytes >= 300 * 2**20
    r = client.put(x, s, P("x", "y"))
    np.testing.assert_array_equal(r.fetch(), x)
    r.delete()


def test_replicated_and_partially_sharded_arrays(client):
    s = whole_island(client, 0, ("x", "y"))
    x = np.arange(48, dtype=np.int32).reshape(4, 12)
    for spec in (P(), P("x"), P(None, "y"), P(("x", "y")), P(None, ("y", "x"))):
        np.testing.assert_array_equal(client.put(x, s, spec).fetch(), x)


def test_outputs_exist_before_the_computation_runs(client):
    s = whole_island(client, 0)
    slow = client.jit(lambda v: jax.lax.fori_loop(0, 200, lambda i, a: jnp.tanh(a @ a), v), s)
    x = client.put(np.eye(256, dtype=np.float32) * 0.5, s)
    out = slow(x)
    assert isinstance(out, runtime.RemoteArray)
    assert out.shape == (256, 256) and out.dtype == np.float32
    assert out.fetch().shape == (256, 256)


def test_status_lists_islands_hosts_and_devices(cluster, client):
    status = client.status()
    assert {(h.island, h.host) for h in status.hosts} == {(0, 0), (1, 0)}
    assert all(h.num_devices == 4 and h.platform == "cpu" and h.state == "alive"
               for h in status.hosts)


def test_an_explicit_delete_is_sent_at_once_not_at_the_next_poll(cluster):
    """RemoteArray.delete wakes the command stream's sender: the array (and the host memory it
    holds, which the next put would take warm) is freed without waiting for the sender's poll for
    arrays dropped by garbage collection (ClientConfig.stream_poll_s, 0.5 s by default)."""
    client = runtime.Client(cluster.address, credentials=cluster.credentials,
                            config=dataclasses.replace(cluster.config.client, stream_poll_s=600))
    try:
        s = client.slice({"x": 2}, island=0)
        remote = client.put(np.arange(1024, dtype=np.float32), s, P())
        store = cluster.workers[0].store
        assert store.contains(remote.id)
        time.sleep(0.1)  # the sender is idle, waiting for work (or the 600 s poll)
        remote.delete()
        deadline = time.monotonic() + 60
        while store.contains(remote.id) and time.monotonic() < deadline:
            time.sleep(0.02)
        assert not store.contains(remote.id)
    finally:
        client.close()
