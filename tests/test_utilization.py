"""Busy-time accounting from host timelines, the Prometheus exporter, and the utilization
benchmark end to end on a tiny model (its figures are the benchmark's business, not the test's)."""

import json
import subprocess
import sys

import pytest

from benchmarks import utilization_timeline as tl
from proto import pathways_pb2 as pb


def event(seq, received, picked, start, end):
    return pb.ExecutionEvent(sequence=seq, name=f"f{seq}", received=received, picked=picked,
                             start=start, end=end, devices=2)


def test_busy_time_and_idle_attribution():
    timeline = tl.HostTimeline(0, 0, (
        event(1, 0.0, 0.0, 0.0, 4.0),   # busy 0-4
        event(2, 5.0, 5.5, 6.0, 8.0),   # idle 4-5 dispatch, 5-5.5 host work, 5.5-6 inputs
        event(3, 1.0, 8.0, 8.0, 9.0),   # back to back: no idle
    ))
    busy = tl.host_busy(timeline, 0.0, 10.0)
    assert busy.busy_s == pytest.approx(7.0)
    assert busy.utilization == pytest.approx(0.7)
    assert busy.idle_dispatch_s == pytest.approx(1.0 + 1.0)  # the gap at 4-5 and the tail 9-10
    assert busy.idle_host_s == pytest.approx(0.5)
    assert busy.idle_inputs_s == pytest.approx(0.5)
    assert busy.busy_s + busy.idle_dispatch_s + busy.idle_host_s + busy.idle_inputs_s == (
        pytest.approx(busy.window_s))
    clipped = tl.host_busy(timeline, 2.0, 7.0)  # a window cuts executions
    assert clipped.busy_s == pytest.approx(2.0 + 1.0)
    assert tl.busy_over_time(timeline, 0.0, 10.0, 5) == pytest.approx([1, 1, 0, 1, 0.5])


def test_chrome_trace_has_executions_waits_and_dispatches():
    timeline = tl.HostTimeline(1, 0, (event(1, 0.0, 0.0, 0.5, 1.0),))
    trace = tl.chrome_trace([timeline], [("step 0", 0.1)], origin=0.0)
    names = {(e["ph"], e["name"]) for e in trace["traceEvents"]}
    assert ("X", "f1") in names and ("X", "inputs / transfer") in names and ("i", "step 0") in names
    durations = [e["dur"] for e in trace["traceEvents"] if e.get("name") == "f1"]
    assert durations == [pytest.approx(0.5e6)] * 2  # one track per device of the host


def test_bench_utilization_end_to_end(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "runtime.cli", "bench", "utilization", "--out", str(tmp_path),
         "--config", "palm-tiny", "--global-batch", "4", "--steps", "2", "--warmup", "1",
         "--metrics-port", "0"], capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads((tmp_path / "utilization.json").read_text())
    for key in ("tokens_per_s", "mfu", "hfu", "device_busy", "peak_flops", "peak_source",
                "inprocess_tokens_per_s", "one_island_tokens_per_s"):
        assert report[key], key
    assert 0 < report["device_busy"] <= 1 and 0 < report["mfu"] < 1
    assert report["peak_source"].startswith("calibrated")
    ratio = report["flops_per_token"]["xla_cost_analysis"] / report["flops_per_token"][
        "model_6N_12LHQT"]
    assert 0.9 < ratio < 1.5  # XLA's count of the same step agrees with PaLM's formula
    trace = json.loads((tmp_path / "utilization_trace.json").read_text())
    assert any(e.get("name") == "component_a" for e in trace["traceEvents"])
    assert (tmp_path / "utilization.png").stat().st_size > 10_000
