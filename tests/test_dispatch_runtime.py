"""The runtime as a dispatch-benchmark system computes the same chain as the baselines, and the
`pathways bench dispatch` command writes the documented JSON (figures are the benchmark's job)."""

import json
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
         "--devices", "2", "--target-s", "0.05", "--no-ray", "--no-proxy", "--quick"],
        capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-2000:]
    report = json.loads((tmp_path / "dispatch.json").read_text())
    shapes = {(r["system"], r["shape"]) for r in report["results"]}
    assert shapes == {(s, p) for s in ("runtime", "jax") for p in ("opbyop", "chained", "fused")}
    assert all(r["computations_per_s"] > 0 for r in report["results"])
    assert report["break_even_ms"] is None or report["break_even_ms"] > 0
    assert (tmp_path / "dispatch.png").stat().st_size > 10_000
    assert "computations/s" in result.stdout
