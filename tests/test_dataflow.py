"""Asynchronous dataflow: async dispatch, programs, cross-island transfers, array lifetime."""

import resource
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

import runtime
from proto import shm as _shm
from proto import same_host as _same_host


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize()


def wait_until_idle(client, cluster, island, timeout=30.0):
    """Waits until the island's host has run everything the controller has ordered so far."""
    client.sync()
    target = cluster.controller.catalog._schedulers[island].sequence
    deadline = time.monotonic() + timeout
    while cluster.workers[island].executed < target:
        assert time.monotonic() < deadline, "the host did not drain its queue"
        time.sleep(0.01)


def test_calls_return_before_running_and_batch_into_few_rpcs(client):
    s = client.slice({"d": 4}, island=0)
    slow = client.jit(lambda v: jax.lax.fori_loop(0, 30, lambda i, a: jnp.tanh(a @ a) * 2, v), s)
    x = client.put(np.eye(128, dtype=np.float32) * 0.1, s)
    slow(x).fetch()  # compile and load
    before = client.commands.batches
    start = time.perf_counter()
    y = x
    for _ in range(300):
        y = slow(y)
    submitted = time.perf_counter() - start
    client.sync()
    result = y.fetch()
    total = time.perf_counter() - start
    assert submitted < total / 3, (submitted, total)  # submission did not wait for execution
    assert client.commands.batches - before < 100  # far fewer RPCs than calls
    want = np.eye(128, dtype=np.float32) * 0.1
    f = jax.jit(lambda v: jax.lax.fori_loop(0, 30, lambda i, a: jnp.tanh(a @ a) * 2, v))
    for _ in range(301):
        want = f(want)
    np.testing.assert_allclose(result, np.asarray(want), rtol=1e-5, atol=1e-6)


def test_program_traces_once_and_reruns_with_new_inputs(cluster, client):
    s = client.slice({"d": 4}, island=0)
    inc = client.jit(lambda v: v + 1, s, in_specs=P("d"), out_specs=P("d"))
    dbl = client.jit(lambda v: v * 2, s, in_specs=P("d"), out_specs=P("d"))

    @client.program
    def chain(v):
        for _ in range(64):
            v = dbl(inc(v))
        return v

    x = client.put(np.zeros(8, np.float32), s, P("d"))
    first = chain(x).fetch()
    executables = len(cluster.controller.catalog._executables)
    loads = client.commands.batches
    out = chain(client.put(np.ones(8, np.float32), s, P("d")))
    assert chain.traces == 1
    assert len(cluster.controller.catalog._executables) == executables  # nothing re-sent
    assert client.commands.batches - loads <= 2
    want_first, want = np.zeros(8), np.ones(8)
    for _ in range(64):
        want_first, want = (want_first + 1) * 2, (want + 1) * 2
    np.testing.assert_array_equal(first, want_first.astype(np.float32))
    np.testing.assert_array_equal(out.fetch(), want.astype(np.float32))


def test_program_across_two_islands_with_transfer(client):
    s0 = client.slice((2, 2), ("x", "y"), island=0)
    s1 = client.slice({"d": 4}, island=1)
    square = client.jit(lambda a: a @ a, s0, in_specs=P("x", "y"), out_specs=P("x", "y"))
    total = client.jit(lambda a: a.sum(axis=1), s1, in_specs=P("d"), out_specs=P())

    @client.program
    def step(a):
        return total(square(a))  # the input of `total` moves to island 1 and is resharded

    a = np.arange(64, dtype=np.float32).reshape(8, 8) / 64
    out = step(client.put(a, s0, P("x", "y")))
    assert out.slice.island == 1
    np.testing.assert_allclose(out.fetch(), (a @ a).sum(axis=1), rtol=1e-6)
    again = step(client.put(a * 2, s0, P("x", "y")))
    np.testing.assert_allclose(again.fetch(), (4 * a @ a).sum(axis=1), rtol=1e-6)
    assert step.traces == 1


@pytest.mark.parametrize("src_spec,dst_spec", [
    (P("x", "y"), P()),           # sharded 2x2 -> replicated
    (P(), P("d")),                # replicated -> sharded along one axis
    (P("x"), P(None, "d")),       # sharded rows -> sharded columns
])
@pytest.mark.parametrize("way", ["process-memory", "shared-memory", "streamed"])
def test_cross_island_transfer_between_mesh_shapes(client, monkeypatch, src_spec, dst_spec, way):
    """Every way bytes move between hosts of one machine: by address (where the shards are
    whole blocks of the source's), a shared-memory segment, or chunks streamed over gRPC (as
    between machines)."""
    shared_memory = way != "streamed"
    monkeypatch.setenv("PATHWAYS_SHARED_MEMORY", "1" if shared_memory else "0")
    monkeypatch.setenv("PATHWAYS_PROCESS_MEMORY_READS", "1" if way == "process-memory" else "0")
    used = []
    real = _same_host.segment_holding
    monkeypatch.setattr(_same_host, "segment_holding", lambda *a: used.append(1) or real(*a))
    s0 = client.slice((2, 2), ("x", "y"), island=0)
    s1 = client.slice({"d": 4}, island=1)
    x = np.arange(128, dtype=np.int32).reshape(8, 16)
    moved = client.put(x, s0, src_spec).to(s1, dst_spec)
    assert moved.slice.island == 1 and moved.spec == dst_spec
    np.testing.assert_array_equal(moved.fetch(), x)
    back = moved.to(s0, P("y", "x"))  # and back, to a third layout
    np.testing.assert_array_equal(back.fetch(), x)
    if way != "process-memory":
        assert bool(used) == (shared_memory and _shm.segments_available())


def test_call_with_input_on_another_island_moves_it(client):
    s0, s1 = client.slice({"d": 2}, island=0), client.slice({"d": 2}, island=1)
    f1 = client.jit(lambda v: v * 10, s1, in_specs=P("d"), out_specs=P("d"))
    produced = client.jit(lambda v: v + 1, s0, in_specs=P("d"), out_specs=P("d"))(
        client.put(np.arange(4, dtype=np.float32), s0, P("d")))
    np.testing.assert_array_equal(f1(produced).fetch(), (np.arange(4) + 1) * 10)


def test_failed_producer_fails_the_transfer_with_its_error(client):
    s0, s1 = client.slice({"d": 2}, island=0), client.slice({"d": 2}, island=1)
    never = runtime.RemoteArray(client, client._new_id(), (2,), np.float32, P(), s0)
    moved = never.to(s1)
    with pytest.raises(runtime.ArrayNotFoundError):
        moved.fetch(timeout=30)
    never._mark_consumed()


def test_explicit_delete_and_donation_free_host_memory(cluster, client):
    s = client.slice({"d": 4}, island=1)
    store = cluster.workers[1].store
    x = client.put(np.ones(1 << 20, np.float32), s, P("d"))
    client.sync()
    base_count, base_bytes = store.stats()
    x.delete()
    client.sync()
    deadline = time.monotonic() + 10
    while store.stats()[1] > base_bytes - (4 << 20) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert store.stats()[1] <= base_bytes - (4 << 20)

    step = client.jit(lambda v: v + 1, s, in_specs=P("d"), out_specs=P("d"), donate_argnums=0)
    y = client.put(np.zeros(1 << 16, np.float32), s, P("d"))
    z = step(y)
    assert y.is_deleted()
    with pytest.raises(runtime.ArrayNotFoundError):
        y.fetch()
    np.testing.assert_array_equal(z.fetch(), np.ones(1 << 16, np.float32))


def test_ten_thousand_step_loop_keeps_host_memory_flat(cluster, client):
    s = client.slice({"d": 2}, island=0)
    step = client.jit(lambda v: v + 1, s, in_specs=P("d"), out_specs=P("d"))
    store = cluster.workers[0].store
    x = client.put(np.zeros(1024, np.float32), s, P("d"))
    samples = []
    for i in range(10_000):
        x = step(x)
        if i % 2000 == 1999:
            wait_until_idle(client, cluster, 0)  # what it stores now is what is live
            samples.append((store.stats()[0], rss_bytes()))
    np.testing.assert_array_equal(x.fetch(), np.full(1024, 10_000, np.float32))
    counts = [c for c, _ in samples]
    assert max(counts) - min(counts) < 64, counts  # live arrays only: flat, not one per step
    rss = [r for _, r in samples]
    assert rss[-1] - rss[1] < 64 << 20, [r >> 20 for r in rss]
    del x
    client.sync()
    deadline = time.monotonic() + 10
    while store.stats()[0] > counts[0] and time.monotonic() < deadline:
        time.sleep(0.05)


def test_program_rejects_bad_graphs(client):
    s = client.slice({"d": 2}, island=0)
    inc = client.jit(lambda v: v + 1, s)
    x = client.put(np.zeros(2, np.float32), s)
    with pytest.raises(runtime.InvalidArgumentError, match="computed inside the program"):
        client.program(lambda v: v)(x)
    with pytest.raises(runtime.InvalidArgumentError, match="not one of its arguments"):
        client.program(lambda v: inc(x))(client.put(np.zeros(2, np.float32), s))
    with pytest.raises(runtime.InvalidArgumentError, match="put it on a slice"):
        client.program(lambda v: inc(v))(np.zeros(2, np.float32))
    np.testing.assert_array_equal(client.program(lambda v: inc(inc(v)))(x).fetch(), [2, 2])
