"""Island-to-island copies overlap with computation: a copy starts once its source is produced,
not when the island's order reaches it (runtime.worker.early_sends), and the receiving island's
computations wait only for the arrays they read."""

from __future__ import annotations

import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

import runtime
from hooks import OrderHold


@pytest.fixture(scope="module")
def cluster():
    with runtime.LocalCluster(islands=2, devices_per_island=2) as c:
        yield c


def hold_the_order(v):
    return v * 3


def produce(v):
    return v * 2 + 1


def _setup(cluster):
    client = cluster.client()
    s0, s1 = client.slice({"d": 2}, island=0), client.slice({"d": 2}, island=1)
    make, hold = client.jit(produce, s0), client.jit(hold_the_order, s0)
    x = client.put(np.arange(4096, dtype=np.float32), s0, P("d"))
    make(x).to(s1).fetch(), hold(x).fetch()  # compiled and loaded everywhere
    return client, s1, make, hold, x


def test_a_copy_completes_while_an_unrelated_computation_holds_the_order(cluster):
    client, s1, make, hold, x = _setup(cluster)
    try:
        with OrderHold(cluster.workers[0], "hold_the_order") as hook:
            y = make(x)
            blocked = hold(x)  # ahead of the copy in island 0's order, held by the hook
            moved = y.to(s1)  # the copy: its source is ready before `blocked` starts
            assert hook.held.wait(60), "the hook never held the order"
            got = moved.fetch(timeout=60)
            assert not hook.release.is_set()  # the order is still held
            np.testing.assert_array_equal(got, np.arange(4096, dtype=np.float32) * 2 + 1)
            # The receiving island computes on the copy meanwhile: it waits only for what it reads.
            after = client.jit(lambda v: v - 1, s1)(moved)
            np.testing.assert_array_equal(after.fetch(timeout=60),
                                          np.arange(4096, dtype=np.float32) * 2)
        np.testing.assert_array_equal(blocked.fetch(timeout=60),
                                      np.arange(4096, dtype=np.float32) * 3)
    finally:
        client.close()


def test_a_copy_of_the_held_computations_output_waits_for_it(cluster):
    client, s1, make, hold, x = _setup(cluster)
    try:
        with OrderHold(cluster.workers[0], "hold_the_order") as hook:
            held = hold(x)
            moved = held.to(s1)  # started at receipt: waits for its source, which is held
            assert hook.held.wait(60)
            assert not cluster.workers[1].store.ready(moved.id)
            hook.release.set()
            np.testing.assert_array_equal(moved.fetch(timeout=60),
                                          np.arange(4096, dtype=np.float32) * 3)
    finally:
        client.close()


def test_a_new_order_forgets_the_early_sends_of_the_old_one():
    """Sequence numbers start again with a new controller or island epoch: an early send of the
    old order must not be claimed by the new order's instruction of the same number."""
    with runtime.LocalCluster(islands=1, devices_per_island=1) as own:
        worker = own.workers[0]
        early = worker._transfers.early
        waiting = early._pool.submit(lambda: None)  # as a capture started at receipt
        with early._lock:
            early._jobs[987654] = waiting
        worker.receive("another-controller", [], epoch=0)  # the order starts afresh here
        assert not early.claim(987654)  # forgotten: the new #987654 is made in order
