"""The figures of `pathways bench scale` from synthetic timelines: busy, throughput, per-stage
latency, the break-even crossing, the island layout and the sizes of the workload."""

import os
import subprocess
import sys
import time
import types
import unittest.mock

import jax
import pytest

from benchmarks.scale import LONE_COMMANDS, layout, lone_probe_rounds
from benchmarks.scale_measure import (crossing, latencies, parse_cpus, pin_process,
                                      point_figures, process_stats, split_cpus)
from benchmarks.scale_workload import Chain, make_fused, make_step, matrix_size, probe
from proto import pathways_pb2 as pb
from proto import wire as _wire
from runtime.sim import per_device_flops


def event(sequence, received, start, end):
    return pb.ExecutionEvent(sequence=sequence, name="step", received=received, picked=received,
                             start=start, end=end, devices=4)


def submission(island, submitted, sequence, answered):
    return types.SimpleNamespace(island=island, submitted=submitted,
                                 output=types.SimpleNamespace(sequence=sequence),
                                 ticket=types.SimpleNamespace(answered_at=answered))


def test_busy_throughput_and_latency_of_two_hosts():
    """Two hosts run calls #5 and #6 of 1 s each from t=10; host 1 receives each 0.1 s after
    host 0. The window is 10 -> 12.5 s (a 0.5 s gap before #6)."""
    hosts = [[event(5, 10.0, 10.2, 11.2), event(6, 11.0, 11.5, 12.5)],
             [event(5, 10.1, 10.2, 11.2), event(6, 11.1, 11.5, 12.5)]]
    subs = [submission(0, 10.0, 5, 10.05), submission(0, 10.9, 6, 10.95)]
    figures = point_figures(subs, {0: hosts}, per_execution=1)
    assert figures["computations"] == 2
    assert figures["window_s"] == pytest.approx(2.5)
    assert figures["busy"] == pytest.approx(2 / 2.5)
    assert figures["computations_per_s"] == pytest.approx(2 / 2.5)
    assert figures["computation_ms"] == pytest.approx(1000)
    lat = latencies(subs, {0: hosts})
    # submit -> last host received: 0.1 s and 0.2 s; last received -> start: 0.1 and 0.4 s.
    assert lat["submit_to_last_received"]["p50"] == pytest.approx(150)
    assert lat["last_received_to_start"]["p99"] == pytest.approx(100 + 0.99 * 300)
    assert lat["submit_to_ordered"]["p50"] == pytest.approx(50)
    assert lat["ordered_to_last_received"]["p50"] == pytest.approx(100)
    assert "submit_to_ordered" not in figures["loaded_latency_ms"]


def test_steady_busy_leaves_out_the_first_trip_and_the_wait_for_other_islands():
    """Island 0 starts 0.5 s after the first submission and runs back to back to 3.0 s; island
    1 starts at once, idles 0.5 s in the middle and ends at 2.0 s. The whole window (0 -> 3 s)
    counts island 0's start-up and island 1's wait for island 0; the steady state counts each
    island from its last host's first start to its own end."""
    island0 = [[event(1, 0.4, 0.5, 1.75), event(2, 0.4, 1.75, 3.0)],
               [event(1, 0.4, 0.5, 1.75), event(2, 0.4, 1.75, 3.0)]]
    island1 = [[event(1, 0.0, 0.0, 1.0), event(2, 1.5, 1.5, 2.0)]]
    figures = point_figures([submission(0, 0.0, 1, 0.0), submission(1, 0.0, 1, 0.0)],
                            {0: island0, 1: island1}, per_execution=1)
    assert figures["busy"] == pytest.approx((2.5 + 2.5 + 1.5) / 3 / 3.0)
    assert figures["busy_steady"] == pytest.approx((1.0 + 1.0 + 1.5 / 2.0) / 3)
    assert figures["startup_ms"] == pytest.approx(500)


def test_a_program_is_timed_by_its_first_execution():
    """Two chained programs of three executions each (#1-#3, #4-#6): each command's latency is
    that of its first execution."""
    host = [event(s, 1.0 if s <= 3 else 5.0, float(s), s + 1.0) for s in range(1, 7)]
    subs = [submission(0, 0.5, 3, 0.6), submission(0, 4.0, 6, 4.5)]
    lat = latencies(subs, {0: [host]})
    # first executions #1 (received 1.0, start 1.0) and #4 (received 5.0, start 4.0 -> max 5 s)
    assert lat["submit_to_last_received"]["p50"] == pytest.approx((0.5 + 1.0) / 2 * 1e3)
    figures = point_figures(subs, {0: [host]}, per_execution=1)
    assert figures["computations"] == 6


def test_fused_executions_count_their_computations():
    host = [event(1, 0.0, 0.0, 1.28), event(2, 0.1, 1.28, 2.56)]
    figures = point_figures([submission(0, 0.0, 1, 0.0)], {0: [host]}, per_execution=128)
    assert figures["computations"] == 256
    assert figures["computation_ms"] == pytest.approx(10.0)
    assert figures["busy"] == pytest.approx(1.0)


def test_break_even_crossing():
    assert crossing([0.1, 1, 10], [0.5, 0.9, 1.0]) == {
        "smallest_measured_ms": 10, "interpolated_ms": pytest.approx(10 ** 0.5)}
    assert crossing([1, 10], [0.96, 1.0])["interpolated_ms"] == 1
    assert crossing([1, 10], [0.2, 0.5]) == {"smallest_measured_ms": None,
                                             "interpolated_ms": None}


def test_layout_of_host_counts():
    assert layout(4, 64) == (1, 4)
    assert layout(64, 64) == (1, 64)
    assert layout(1024, 64) == (16, 64)
    with pytest.raises(ValueError):
        layout(65, 64)


def test_lone_probe_rounds_by_default_and_when_asked():
    # Default: about LONE_COMMANDS in all, but no more rounds than the other probe's.
    assert lone_probe_rounds(None, 16, 20) * 16 >= LONE_COMMANDS
    assert lone_probe_rounds(None, 16, 20) == -(-LONE_COMMANDS // 16)
    assert lone_probe_rounds(None, 1, 20) == 20
    assert lone_probe_rounds(None, 1, 0) == 1
    # Asked for: that many commands, in whole rounds, whatever the other probe does.
    assert lone_probe_rounds(1000, 16, 20) == 63
    assert lone_probe_rounds(5, 16, 1) == 1


def test_process_stats_of_this_process():
    import os

    stats = process_stats(os.getpid())
    assert stats["cpu_s"] > 0 and stats["threads"] >= 1 and stats["rss_bytes"] > 0


@pytest.mark.parametrize("duration_ms", [0.1, 10.0])
def test_the_workload_takes_its_duration_on_simulated_devices(duration_ms):
    """The step's FLOPs at 1 TFLOP/s give the duration asked for (to the matrix size's
    rounding); the fused program is PROGRAM_LENGTH of them, unrolled."""
    flops_per_s = 1e12
    n = matrix_size(duration_ms / 1e3, flops_per_s)
    mesh = jax.sharding.AbstractMesh((8,), ("d",))
    sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("d"))
    aval = jax.ShapeDtypeStruct((8,), "float32", sharding=sharding)
    spec = pb.ValueSpec(dtype="float32", shape=[8], sharding=_wire.spec_to_proto(
        0, jax.sharding.PartitionSpec("d")))
    seconds = []
    for fn in (make_step(mesh, n), make_fused(mesh, n, length=4)):
        with jax.sharding.use_abstract_mesh(mesh):
            exported = jax.export.export(jax.jit(fn, in_shardings=sharding,
                                                 out_shardings=sharding),
                                         platforms=("cpu",))(aval)
        seconds.append(per_device_flops(bytes(exported.serialize()), [spec], (8,), ("d",))
                       / flops_per_s)
    assert seconds[0] == pytest.approx(duration_ms / 1e3, rel=0.02)
    assert seconds[1] == pytest.approx(4 * seconds[0], rel=1e-3)


@pytest.mark.parametrize("alone", [False, True])
def test_the_probe_waits_for_every_island_or_for_each(alone):
    """The probe's rounds: one unit on every island, then one wait for them all; or, `alone`,
    one unit in the whole cluster at a time (submitted only once the one before is done). The
    results are read only once the controller has ordered every unit of the round and their
    device time has passed."""
    events = []

    class Client:
        def fetch(self, values, timeout):
            events.append(("fetch", sorted(v.island for v in values)))

    class Ticket:
        def __init__(self, island):
            self.island = island
            self.done = types.SimpleNamespace(wait=self.wait)

        def wait(self, timeout):
            events.append(("ordered", self.island))
            return True

    class Value:
        def __init__(self, island):
            self.island, self._ticket = island, Ticket(island)

    client = types.SimpleNamespace(client=Client())
    chains = [Chain(i, client, Value(i)) for i in range(3)]
    for chain in chains:
        chain.run = lambda x, i=chain.island: events.append(("run", i)) or Value(i)
    sleeps = []
    with unittest.mock.patch("time.sleep", sleeps.append):
        submissions, error = probe(chains, 2, time.monotonic() + 30, alone=alone, unit_s=0.01)
    assert error is None and [s.island for s in submissions] == [0, 1, 2] * 2
    if alone:
        assert events == [e for i in (0, 1, 2) for e in (
            ("run", i), ("ordered", i), ("fetch", [i]))] * 2
        assert sleeps == [0.01] * 6
    else:
        assert events == [("run", 0), ("run", 1), ("run", 2), ("ordered", 0), ("ordered", 1),
                          ("ordered", 2), ("fetch", [0, 1, 2])] * 2
        assert sleeps == [0.01] * 2


def test_controller_cpus_are_parsed_and_must_leave_some_for_the_rest():
    assert parse_cpus("0") == {0}
    assert parse_cpus("0-2,5") == {0, 1, 2, 5}
    for bad in ("", "a", "3-1", "-1", "0-x"):
        with pytest.raises(ValueError):
            parse_cpus(bad)
    usable = os.sched_getaffinity(0)
    with pytest.raises(ValueError, match="no CPU .* for the simulated hosts"):
        split_cpus(set(usable))
    with pytest.raises(ValueError, match="not among"):
        split_cpus({max(usable) + 1})
    if len(usable) > 1:
        first = min(usable)
        assert split_cpus({first}) == ({first}, usable - {first})


@pytest.mark.skipif(len(os.sched_getaffinity(0)) < 2, reason="needs two CPUs")
def test_pin_process_pins_every_thread_and_threads_started_later():
    """A child with a thread already running and one started after the pinning: all of its
    threads end up on the one CPU given."""
    cpu = max(os.sched_getaffinity(0))
    code = ("import os, sys, threading, time\n"
            "threading.Thread(target=time.sleep, args=(30,), daemon=True).start()\n"
            "print('ready', flush=True); sys.stdin.readline()\n"
            "threading.Thread(target=time.sleep, args=(30,), daemon=True).start()\n"
            "print(sorted({c for t in os.listdir('/proc/self/task') "
            "for c in os.sched_getaffinity(int(t))}), flush=True)\n")
    child = subprocess.Popen([sys.executable, "-c", code], stdin=subprocess.PIPE,
                             stdout=subprocess.PIPE, text=True)
    try:
        assert child.stdout.readline().strip() == "ready"
        assert pin_process(child.pid, {cpu}) >= 2
        child.stdin.write("go\n")
        child.stdin.flush()
        assert child.stdout.readline().strip() == str([cpu])
    finally:
        child.kill()
        child.wait(10)
