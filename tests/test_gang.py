"""Gang scheduling on a multi-host island: two worker processes form one JAX distributed system
(gloo collectives), one SPMD computation spans both, and every host runs the island's computations
in one order. The negative control breaks the order on purpose and shows the hang is real: the
deadline catches it, the report names who reached the computation, and the processes go away."""

import os
import signal
import threading
import time

import jax
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

import runtime
from proto import pathways_pb2 as pb
from proto import pathways_pb2_grpc as pb_grpc
from runtime import DeadlineExceededError
from proto import rpc as _rpc
from runtime.cli import format_status

MODULUS = 1000


@pytest.fixture(scope="module")
def island():
    """One island of two hosts x two CPU devices, as `pathways up --hosts-per-island 2` runs it;
    proportional share with equal weights, so concurrent clients' steps interleave one by one."""
    with runtime.ProcessCluster(islands=1, hosts_per_island=2, devices_per_host=2,
                                policy="share") as cluster:
        yield cluster


def collective_step(mesh):
    """x -> (x + psum over all four devices of x's blocks) mod 1000: every step crosses hosts."""
    def step(x):
        return jax.shard_map(lambda b: (b + jax.lax.psum(b, "d")) % MODULUS, mesh=mesh,
                             in_specs=P("d"), out_specs=P("d"))(x)
    return step


def reference(x, steps):
    blocks = x.reshape(4, -1, x.shape[-1]).astype(np.int64)
    for _ in range(steps):
        blocks = (blocks + blocks.sum(0)) % MODULUS
    return blocks.reshape(x.shape)


def timeline(cluster, island_index=0):
    """Per host: the (sequence, session) of every execution it ran, in order."""
    out = {}
    for h in cluster.controller.resources.island_hosts(island_index):
        with _rpc.open_channel(h.address, cluster._cluster_credentials) as channel:
            reply = pb_grpc.WorkerStub(channel).GetTimeline(pb.GetTimelineRequest(), timeout=10)
        out[h.host] = [(e.sequence, e.session_id) for e in reply.events]
    return out


def test_a_slice_spans_the_hosts_of_an_island(island):
    with runtime.Client(island.address) as client:
        s = client.slice({"d": 4})
        assert sorted({d.host for d in s.info.devices}) == [0, 1]
        x = np.arange(32, dtype=np.int32).reshape(8, 4)
        rx = client.put(x, s, P("d"))
        np.testing.assert_array_equal(rx.fetch(), x)  # each host holds and returns its shards
        y = client.jit(collective_step(s.mesh), s, in_specs=P("d"), out_specs=P("d"))(rx)
        np.testing.assert_array_equal(y.fetch(), reference(x, 1))
        total = client.jit(lambda v: v.sum(), s, in_specs=P("d"), out_specs=P())(rx)
        assert int(total.fetch()) == x.sum()


def test_transfers_to_and_from_a_multi_host_slice(island):
    """Copies into a slice spanning both hosts, and out of it: each host sends the blocks it holds
    when they are the destination's shards; otherwise its hosts first gather the array with a
    collective at the copy's place in the island's order, then the first one sends it."""
    with runtime.Client(island.address) as client:
        wide = client.slice({"d": 4})
        narrow = client.slice({"d": 2})  # one host's two devices
        assert len({d.host for d in narrow.info.devices}) == 1
        x = np.arange(16, dtype=np.float32)
        copy = client.put(x, narrow, P("d")).to(wide, P("d"))
        np.testing.assert_array_equal(copy.fetch(), x)
        doubled = client.jit(lambda v: v * 2, wide, in_specs=P("d"), out_specs=P("d"))(copy)
        back = doubled.to(narrow, P(None))  # spans both hosts -> one host, replicated
        np.testing.assert_array_equal(back.fetch(), x * 2)
        again = doubled.to(wide, P())  # spans both hosts -> both hosts, replicated
        np.testing.assert_array_equal(again.fetch(), x * 2)
        # Replicated over the hosts: the first host's own shards make the whole, no gathering.
        np.testing.assert_array_equal(again.to(narrow, P("d")).fetch(), x * 2)
        np.testing.assert_array_equal(doubled.to(narrow, P("d")).fetch(), x * 2)
        # Every destination shard is a block one host holds: each host sends its own, no gather
        # (runtime.worker.copy_plan); interleaved, each destination host gets one shard from
        # each source host, as one put in two parts.
        interleaved = client.slice({"d": 4}, island=0, devices=[(0, 0), (1, 0), (0, 1), (1, 1)])
        np.testing.assert_array_equal(doubled.to(wide, P("d")).fetch(), x * 2)
        mixed = doubled.to(interleaved, P("d"))
        np.testing.assert_array_equal(mixed.fetch(), x * 2)
        np.testing.assert_array_equal(mixed.to(wide, P("d")).fetch(), x * 2)


def run_clients(cluster, clients, steps):
    """`clients` sessions each chain `steps` cross-host collective steps at the same time, each on
    arrays of a different size (a misordered pair of collectives would hang, not mix data)."""
    results, errors = {}, []
    barrier = threading.Barrier(clients)

    def client_main(c):
        try:
            with runtime.Client(cluster.address, name=f"client{c}") as client:
                s = client.slice({"d": 4})
                x = (np.arange(4 * (c + 1) * 8, dtype=np.int32).reshape(4 * (c + 1), 8) * (c + 3)
                     ) % MODULUS
                step = client.jit(collective_step(s.mesh), s, in_specs=P("d"), out_specs=P("d"))
                rx = client.put(x, s, P("d"))
                barrier.wait(60)
                for _ in range(steps):
                    rx = step(rx)
                results[c] = (x, rx.fetch(timeout=120), client.session_id)
        except BaseException as exc:  # reported by the test
            errors.append(exc)
            barrier.abort()

    threads = [threading.Thread(target=client_main, args=(c,)) for c in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(300)
    assert not errors, errors
    assert not any(t.is_alive() for t in threads), "a client hung"
    for x, got, _ in results.values():
        np.testing.assert_array_equal(got, reference(x, steps))
    return results


def check_one_order(cluster, sessions):
    per_host = timeline(cluster)
    orders = [[e for e in events if e[1] in sessions] for events in per_host.values()]
    assert orders[0] == orders[1]  # both hosts ran the clients' steps in the same order
    interleaved = sum(a[1] != b[1] for a, b in zip(orders[0], orders[0][1:]))
    return interleaved


def test_four_clients_500_steps_each_in_one_order(island):
    """4 clients at once, 500 cross-host collective steps each (~5 s): all complete, results
    exact, both hosts ran the 2,000 steps in one order, and the clients' steps interleaved."""
    results = run_clients(island, clients=4, steps=500)
    assert check_one_order(island, {r[2] for r in results.values()}) > 50


def test_status_shows_each_hosts_order_and_activity(island):
    with runtime.Client(island.address, name="watcher") as client:
        status = client.status()
        text = format_status(island.address, status)
    assert [(h.island, h.host, h.distributed_hosts) for h in status.hosts] == [(0, 0, 2), (0, 1, 2)]
    assert all(h.activity == "idle" and h.executed == h.received for h in status.hosts)
    assert "island 0: order at #" in text and "client 'watcher'" not in text
    assert text.count("idle") == 2


def test_misordered_steps_hang_and_the_deadline_reports_it():
    """Negative control: the same two steps reach the hosts in opposite orders (bypassing the gang
    scheduler). Each host waits in a collective the other never joins (one sums over all four
    devices, the other over pairs across the hosts): a real hang. The deadline fails it with a
    report naming the computation, the host that reached it and the one that did not; the island
    refuses new work until `restart_lost_islands` replaces its processes; closing the cluster
    leaves no process behind."""
    cluster = runtime.ProcessCluster(islands=1, hosts_per_island=2, devices_per_host=2,
                                     execution_deadline_s=2.0)
    pids = [p.pid for p in cluster.procs]
    try:
        client = runtime.Client(cluster.address, name="control")
        s = client.slice({"x": 2, "y": 2})  # "x" runs across the two hosts

        def psum_over(axes):
            return lambda v: jax.shard_map(lambda b: jax.lax.psum(b, axes), mesh=s.mesh,
                                           in_specs=P(("x", "y")), out_specs=P(("x", "y")))(v)

        xa = xb = client.put(np.ones((4, 8), np.int32), s, P(("x", "y")))
        fa = client.jit(psum_over(("x", "y")), s, in_specs=P(("x", "y")),
                        out_specs=P(("x", "y")), name="step_a").lower(xa)
        fb = client.jit(psum_over("x"), s, in_specs=P(("x", "y")), out_specs=P(("x", "y")),
                        name="step_b").lower(xb)
        np.testing.assert_array_equal(fa(xa).fetch(), 4)  # in gang order both work
        np.testing.assert_array_equal(fb(xb).fetch(), 2)
        client.sync()

        base = cluster.controller.catalog.scheduler(0).sequence
        out_a, out_b = client._new_id(), client._new_id()

        def execute(sequence, f, x, out):
            return pb.Instruction(sequence=sequence, execute=pb.ExecuteInstruction(
                executable_id=f.executable_id, inputs=[x.id], outputs=[out],
                session_id=client.session_id))

        orders = {0: [execute(base + 1, fa, xa, out_a), execute(base + 2, fb, xb, out_b)],
                  1: [execute(base + 1, fb, xb, out_b), execute(base + 2, fa, xa, out_a)]}
        for h in cluster.controller.resources.island_hosts(0):
            with _rpc.open_channel(h.address, cluster._cluster_credentials) as channel:
                pb_grpc.WorkerStub(channel).Dispatch(pb.DispatchRequest(
                    controller_id=cluster.controller.controller_id, instructions=orders[h.host]),
                    timeout=10)

        a = runtime.RemoteArray(client, out_a, (4, 8), np.int32, P(("x", "y")), s, base + 1)
        with pytest.raises(DeadlineExceededError) as caught:
            a.fetch(timeout=30)
        report = str(caught.value)
        assert "exceeded its 2 s deadline" in report
        assert "reached by host 0." in report and "not reached by host 0." in report
        assert "step_a" in report and "step_b" in report  # one is stuck; the other, elsewhere

        for _ in range(50):  # the other host's deadline fires a moment later
            status = client.status()
            if all(h.hang for h in status.hosts):
                break
            time.sleep(0.1)
        assert all(h.state == "hung" and h.hang for h in status.hosts)
        assert all(h.activity.startswith("stuck: running step_") for h in status.hosts)
        assert "exceeded" in status.islands[0].failure
        assert "hang: " in format_status(cluster.address, status)
        with pytest.raises(DeadlineExceededError):  # the island refuses work until it restarts
            fa(xa).fetch(timeout=10)
        # Its hosts cannot leave XLA: a restart declares them lost and replaces their processes.
        assert cluster.restart_lost_islands() == [0]
        assert not {p.pid for p in cluster.procs} & set(pids)
        fresh = client.slice({"x": 2, "y": 2})
        f = client.jit(psum_over(("x", "y")), fresh, in_specs=P(("x", "y")),
                       out_specs=P(("x", "y")))
        np.testing.assert_array_equal(
            f(client.put(np.ones((4, 8), np.int32), fresh, P(("x", "y")))).fetch(timeout=60), 4)
        assert all(h.state == "alive" for h in client.status().hosts)
        client.close()
    finally:
        cluster.close(grace=3.0)
    for pid in pids:
        with pytest.raises(ProcessLookupError):
            os.killpg(pid, 0)  # the worker and its whole process group are gone
        with pytest.raises(ProcessLookupError):
            os.kill(pid, signal.SIGCONT)
