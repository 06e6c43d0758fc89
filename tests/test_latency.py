"""Dispatch latency per stage as the controller keeps it (scheduler.latency), and as `pathways
status` shows it on a real island and on a simulated one."""

import json
import time

import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

import runtime
from proto import pathways_pb2 as pb
from runtime.cli import format_status
from runtime.cli.status_json import message_to_json
from scheduler.latency import STAGES, StageLatency


def by_stage(rows):
    return {row.stage: row for row in rows}


def test_stages_from_controller_times_and_host_reported_ages():
    latency = StageLatency(window_s=1000.0)
    for sequence in range(1, 101):  # submitted at t, ordered 1 ms later
        latency.ordered(sequence, submitted=float(sequence), now=sequence + 0.001)
    latency.received_up_to(50, now=60.5)  # the last host acknowledged 1..50 at 60.5
    # Two hosts report the first 50 executions; the later start counts.
    latency.started([pb.CompletedExecution(sequence=q, started_ago_s=0.5) for q in range(1, 51)],
                    now=61.0)
    latency.started([pb.CompletedExecution(sequence=q, started_ago_s=0.4) for q in range(1, 51)],
                    now=61.0)
    rows = by_stage(latency.percentiles(now=61.0))
    assert [row.stage for row in latency.percentiles(now=61.0)] == [s[0] for s in STAGES]
    assert rows["submit_to_ordered"].count == 100
    assert rows["submit_to_ordered"].p50_ms == pytest.approx(1.0)
    assert rows["ordered_to_last_received"].count == 50  # 51..100 not acknowledged
    assert rows["last_received_to_start"].count == 50
    assert rows["last_received_to_start"].p99_ms == pytest.approx(100.0)  # 60.6 - 60.5
    # submit_to_last_received of sequence q is 60.5 - q, q = 1..50: median 35 s.
    assert rows["submit_to_last_received"].p50_ms == pytest.approx(35_000.0)


def test_only_the_window_counts_and_unknown_reports_are_ignored():
    latency = StageLatency(window_s=10.0)
    latency.ordered(1, submitted=0.0, now=0.0)
    latency.ordered(2, submitted=20.0, now=20.002)
    latency.started([pb.CompletedExecution(sequence=7, started_ago_s=1.0)], now=21.0)
    rows = by_stage(latency.percentiles(now=25.0))
    assert rows["submit_to_ordered"].count == 1
    assert rows["submit_to_ordered"].p50_ms == pytest.approx(2.0)
    assert rows["submit_to_start"].count == 0 and rows["submit_to_start"].p99_ms == 0
    assert all(row.count == 0 for row in latency.percentiles(now=40.0))
    # A start is never placed before the computation's place in the order.
    latency.ordered(3, submitted=50.0, now=50.0)
    latency.received_up_to(3, now=50.001)
    latency.started([pb.CompletedExecution(sequence=3, started_ago_s=99.0)], now=50.01)
    assert by_stage(latency.percentiles(now=51.0))["submit_to_start"].p50_ms == 0.0


def check_status_latency(address, status, computations):
    """The island's stages in the status, its text and its JSON: counted, in order, positive."""
    rows = by_stage(status.islands[0].latency)
    for name, _, _ in STAGES:
        assert rows[name].count >= computations, name
        assert 0 <= rows[name].p50_ms <= rows[name].p99_ms < 60_000, name
    assert rows["submit_to_ordered"].p50_ms <= rows["submit_to_last_received"].p50_ms
    assert rows["submit_to_last_received"].p50_ms <= rows["submit_to_start"].p50_ms
    assert "dispatch latency, last minute, p50 / p99 ms" in format_status(address, status)
    stages = json.loads(json.dumps(message_to_json(status)))["islands"][0]["latency"]
    assert {row["stage"] for row in stages} == {s[0] for s in STAGES}
    assert all(set(row) == {"stage", "count", "p50_ms", "p99_ms"} for row in stages)


def twenty_calls_then_status(cluster, devices, calls=20, deadline_s=60.0):
    """Twenty calls on a slice of the island's devices, then the controller's status once every
    stage has counted them: a host reports its starts in its next progress report, which may
    still be on its way when the fetch of the last result returns."""
    with cluster.client() as client:
        s = client.slice({"d": devices})
        x = client.put(np.ones(devices, np.float32), s, P("d"))
        f = client.jit(lambda v: v * 2 + 1, s, in_specs=P("d"), out_specs=P("d"))
        for _ in range(calls):
            x = f(x)
        x.fetch(timeout=60)
        client.sync()
        deadline = time.monotonic() + deadline_s
        while True:
            status = client.status()
            if (all(row.count >= calls for row in status.islands[0].latency)
                    or time.monotonic() > deadline):
                return status
            time.sleep(0.05)


def test_status_shows_dispatch_latency_on_a_real_island():
    with runtime.ProcessCluster(islands=1, hosts_per_island=2, devices_per_host=1) as cluster:
        with cluster.client() as client:
            assert all(row.count == 0 for row in client.status().islands[0].latency)
        check_status_latency(cluster.address, twenty_calls_then_status(cluster, 2), 20)


def test_status_shows_dispatch_latency_on_simulated_hosts():
    from runtime.sim import SimCluster

    with SimCluster(islands=1, hosts_per_island=8, devices_per_host=1) as cluster:
        check_status_latency(cluster.address, twenty_calls_then_status(cluster, 8), 20)
