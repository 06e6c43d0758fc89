"""Busy-time accounting from host timelines, the Prometheus exporter, and the utilization
benchmark end to end on a tiny model (its figures are the benchmark's business, not the test's)."""

import json
import statistics
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


@pytest.mark.slow
def test_bench_utilization_end_to_end(tmp_path):
    """Five rounds of the three systems on a tiny model: every round's figures and the medians,
    the environment, labelled warm-up steps, logs in --out, the trace and the figure."""
    result = subprocess.run(
        [sys.executable, "-m", "runtime.cli", "bench", "utilization", "--out", str(tmp_path),
         "--config", "palm-tiny", "--global-batch", "4", "--rounds", "5", "--steps", "1",
         "--round-warmup", "1", "--warmup", "1", "--metrics-port", "0"],
        capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads((tmp_path / "utilization.json").read_text())
    assert report["phase"] == "complete"
    for key in ("tokens_per_s", "mfu", "hfu", "device_busy", "peak_flops", "peak_source",
                "inprocess_tokens_per_s", "one_island_tokens_per_s"):
        assert report[key], key
    assert 0 < report["device_busy"] <= 1 and 0 < report["mfu"] < 1
    assert report["peak_source"].startswith("calibrated")
    rounds = report["rounds"]
    assert [r["round"] for r in rounds] == [1, 2, 3, 4, 5]
    flops_per_token = report["flops_per_token"]["model_6N_12LHQT"]
    for r in rounds:
        assert set(r["systems"]) == {"inprocess", "one_island", "two_islands"}
        for system in r["systems"].values():
            assert [s["warmup"] for s in system["steps"]] == [True, False]
            assert system["mfu"] == pytest.approx(system["tokens_per_s"] * flops_per_token
                                                  / r["peak_flops"])  # its own round's peak
        assert r["ratios"]["ratio_vs_inprocess"] == pytest.approx(
            r["systems"]["two_islands"]["tokens_per_s"] / r["systems"]["inprocess"]["tokens_per_s"])
    for key in ("ratio_vs_inprocess", "ratio_two_vs_one_island"):
        values = [r["ratios"][key] for r in rounds]
        assert report["spread"][key] == {"median": statistics.median(values), "min": min(values),
                                         "max": max(values), "values": values}
        assert report[key] == statistics.median(values)
    assert all(s["warmup"] for s in report["setup"]["two_islands"]["steps"])
    env = report["environment"]
    for key in ("jax", "jaxlib", "commit", "cpu_model", "cpu_cores", "load_average_at_start",
                "load_average_at_end", "cpu_steal"):
        assert key in env, key
    assert "listening" in (tmp_path / "workers.log").read_text()
    assert "registered host" in (tmp_path / "cluster.log").read_text()
    ratio = report["flops_per_token"]["xla_cost_analysis"] / flops_per_token
    assert 0.9 < ratio < 1.5  # XLA's count of the same step agrees with PaLM's formula
    trace = json.loads((tmp_path / "utilization_trace.json").read_text())
    assert any(e.get("name") == "component_a" for e in trace["traceEvents"])
    assert (tmp_path / "utilization.png").stat().st_size > 10_000


class FakeTraining:
    """A system of the utilization benchmark with set figures; fails in turn `fail_in_turn`."""

    def __init__(self, key, rate, fail_in_turn=None):
        self.key, self.label, self.rate, self.fail_in_turn = key, key, rate, fail_in_turn
        self.turns = []

    def run(self, warmup, steps, on_step):
        from benchmarks.utilization_systems import Turn

        self.turns.append((warmup, steps))
        if len(self.turns) == self.fail_in_turn:
            raise RuntimeError("a host was lost")
        for _ in range(warmup + steps):
            on_step()
        return Turn(self.rate * len(self.turns), [0.5] * (warmup + steps), warmup,
                    [2.0] * (warmup + steps))


def test_rounds_write_per_round_figures_and_medians_as_they_go(tmp_path, monkeypatch):
    """Each round calibrates its own peak (MFU of that round's peak), every system takes a turn
    of labelled warm-up and measured steps, and the JSON is rewritten after each round: a failure
    in round 3 leaves rounds 1 and 2 with their medians on disk."""
    import argparse
    import statistics

    from benchmarks import utilization
    from model.config import get_config
    from model.flops import FlopsModel

    peaks = iter([1e9, 2e9, 4e9, 8e9])
    monkeypatch.setattr(utilization, "_peak", lambda *_: (next(peaks), "fake peak"))
    config = get_config("palm-tiny")
    flops = FlopsModel.from_config(config)
    systems = [FakeTraining("inprocess", 100.0), FakeTraining("one_island", 95.0),
               FakeTraining("two_islands", 90.0, fail_in_turn=3)]
    args = argparse.Namespace(rounds=5, round_warmup=1, steps=2, platform="cpu", islands=2,
                              devices_per_island=1, global_batch=4)
    path = tmp_path / "utilization.json"
    report = {"rounds": [], "config": "palm-tiny"}
    with pytest.raises(RuntimeError, match="host was lost"):
        utilization._rounds(args, config, systems, flops, report, path, 0.0)
    assert all(s.turns == [(1, 2)] * len(s.turns) for s in systems)
    written = json.loads(path.read_text())
    assert [r["round"] for r in written["rounds"]] == [1, 2]
    for number, record in enumerate(written["rounds"], 1):
        assert record["peak_flops"] == [1e9, 2e9][number - 1]
        two = record["systems"]["two_islands"]
        assert two["tokens_per_s"] == 90.0 * number
        assert two["mfu"] == pytest.approx(two["tokens_per_s"] * flops.model_flops_per_token()
                                           / record["peak_flops"])
        assert [s["warmup"] for s in two["steps"]] == [True, False, False]
        assert record["ratios"]["ratio_vs_inprocess"] == pytest.approx(0.9)
        assert record["ratios"]["ratio_two_vs_one_island"] == pytest.approx(90 / 95)
        assert len(record["machine"]["load_average"]) == 3
    spread = written["spread"]
    assert spread["two_islands_tokens_per_s"]["values"] == [90.0, 180.0]
    assert written["tokens_per_s"] == statistics.median([90.0, 180.0])
    assert written["ratio_vs_inprocess"] == pytest.approx(0.9)
    assert spread["peak_flops"] == {"median": 1.5e9, "min": 1e9, "max": 2e9,
                                    "values": [1e9, 2e9]}
