"""The runtime as a dispatch-benchmark system computes the same chain as the baselines, and the
`pathways bench dispatch` command writes the documented JSON (figures are the benchmark's job)."""

import json
import statistics
import subprocess
import sys

from benchmarks.dispatch_baselines import check_system, expected_state, initial_values
from benchmarks.dispatch_runtime import RuntimeSystem


def test_runtime_system_advances_the_chain_exactly():
    system = RuntimeSystem(2)
    try:
        check_system(system, length=4)
        before = system.state()
        system.chained(2, length=8)
        assert (system.state() == expected_state(before, 16)).all()
    finally:
        system.close()
    assert initial_values(2)[0].shape == (2,)


def test_bench_dispatch_writes_json_and_plot(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "runtime.cli", "bench", "dispatch", "--out", str(tmp_path),
         "--devices", "2", "--target-s", "0.05", "--no-ray", "--no-proxy", "--quick", "--rounds", "5",
         "--latency-rounds", "10"],
        capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-2000:]
    report = json.loads((tmp_path / "dispatch.json").read_text())
    assert report["phase"] == "complete"
    shapes = {(r["system"], r["shape"]) for r in report["results"]}
    assert shapes == {(s, p) for s in ("runtime", "jax") for p in ("opbyop", "chained", "fused")}
    assert all(r["computations_per_s"] > 0 and len(r["rounds"]) == 5 for r in report["results"])
    assert report["break_even_ms"] is None or report["break_even_ms"] > 0
    # Every round's figures, and the medians over the rounds.
    assert [r["round"] for r in report["rounds"]] == [1, 2, 3, 4, 5]
    for name in ("fused_vs_jax_fused", "chained_vs_jax_opbyop"):
        values = [r["ratios"][name] for r in report["rounds"]]
        assert report["spread"][name]["values"] == values
        assert report["ratios"][name] == report["spread"][name]["median"] == statistics.median(
            values)
    assert all(r["machine"]["load_average"][0] >= 0 for r in report["rounds"])
    env = report["environment"]
    for key in ("jax", "jaxlib", "commit", "cpu_model", "cpu_cores", "load_average_at_start",
                "load_average_at_end", "cpu_steal", "date"):
        assert key in env, key
    assert env["jax"] and env["cpu_cores"] >= 1
    assert "listening" in (tmp_path / "workers.log").read_text()  # the worker's output, not ours
    assert "registered host" in (tmp_path / "cluster.log").read_text()
    assert "registered host" not in result.stdout + result.stderr
    assert (tmp_path / "dispatch.png").stat().st_size > 10_000
    assert "computations/s" in result.stdout and "median" in result.stdout
    # Dispatch latency per stage, one call at a time: each stage ends after the one before.
    latency = report["latency_ms"]
    for stage in ("submit_to_ordered", "submit_to_last_received", "submit_to_start"):
        assert 0 < latency[stage]["p50"] <= latency[stage]["p99"], (stage, latency)
    assert latency["submit_to_start"]["p50"] >= latency["submit_to_last_received"]["p50"]
    assert "runtime dispatch latency" in result.stdout
