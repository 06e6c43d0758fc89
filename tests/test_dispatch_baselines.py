"""The dispatch micro-benchmark's computations, baselines, measurement helpers and plot (fast but Ray)."""

import math

import jax
import numpy as np
import pytest
from jax.sharding import AbstractMesh

from benchmarks.dispatch_baselines import (
    SHAPES,
    DispatchSystem,
    JaxSystem,
    break_even_ms,
    check_system,
    expected_state,
    find_break_even,
    initial_values,
    input_specs,
    make_fused,
    make_step,
    measure,
    run_dispatch_benchmark,
    time_per_computation_ms,
)
from benchmarks.dispatch_plot import format_table, plot_dispatch

N_DEVICES = 4


@pytest.fixture(scope="module")
def jax_system():
    if len(jax.devices()) < N_DEVICES:
        pytest.skip(f"needs {N_DEVICES} CPU devices (tests/conftest.py sets jax_num_cpu_devices)")
    system = JaxSystem(jax.devices()[:N_DEVICES])
    yield system
    system.close()


class SyntheticSystem:
    """A DispatchSystem whose timings are a formula: dispatch overhead hidden under computations
    longer than it (`pipelined`) or added to each (not pipelined)."""

    def __init__(self, name, overhead_ms, pipelined):
        self.name, self.n_devices = name, N_DEVICES
        self._overhead, self._pipelined = overhead_ms / 1e3, pipelined
        self._x = initial_values(N_DEVICES)[0]
        self.calls = 0

    def _run(self, computations, k):
        self.calls += 1
        self._x = expected_state(self._x, computations)
        compute = (0.1 + 0.1 * k) / 1e3
        per = max(self._overhead, compute) if self._pipelined else self._overhead + compute
        return computations * per

    def opbyop(self, n_computations):
        return self._run(n_computations, 0)

    def chained(self, n_programs, length=128):
        return self._run(n_programs * length, 0)

    def fused(self, n_programs, length=128):
        return self._run(n_programs * length, 0)

    def opbyop_sized(self, k, n_computations):
        return self._run(n_computations, k)

    def state(self):
        return self._x

    def close(self):
        pass


def test_step_chain_gives_expected_values(jax_system):
    x0, w = initial_values(N_DEVICES)
    x, w = jax_system.put(x0), jax_system.put(w)
    for k in (0, 3):
        step = make_step(jax_system.mesh, k)
        y = x
        for _ in range(5):
            y = step(y, w)
        np.testing.assert_array_equal(np.asarray(y), expected_state(x0, 5))
    fused = make_fused(jax_system.mesh, length=7, k=2)
    np.testing.assert_array_equal(np.asarray(fused(x, w)), expected_state(x0, 7))


def test_every_shape_advances_the_jax_chain(jax_system):
    assert isinstance(jax_system, DispatchSystem)
    check_system(jax_system)


def test_exported_step_matches_jit(jax_system):
    """The runtime ships `make_step` as jax.export output; the exported function must compute the same."""
    mesh = AbstractMesh((N_DEVICES,), ("island",))
    exported = jax.export.deserialize(
        jax.export.export(make_step(mesh, 2), platforms=["cpu"])(*input_specs(mesh)).serialize())
    x0, w = initial_values(N_DEVICES)
    y = exported.call(jax_system.put(x0), jax_system.put(w))
    np.testing.assert_array_equal(np.asarray(y), expected_state(x0, 1))


@pytest.mark.parametrize("shape", SHAPES)
def test_measure_is_positive(jax_system, shape):
    assert measure(jax_system, shape, length=8, target_s=0.05, repeats=2) > 0


def test_sized_computations_take_longer(jax_system):
    small = time_per_computation_ms(0, jax_system, target_s=0.05)
    large = time_per_computation_ms(32, jax_system, target_s=0.05)
    assert 0 < small < large


def test_measure_rejects_sized_programs(jax_system):
    with pytest.raises(ValueError):
        measure(jax_system, "fused", k=2)


def test_break_even_interpolates_in_log_size():
    sweep = [{"system": s, "ms": ms, "computations_per_s": rate}
             for ms, ratio in [(0.1, 0.5), (1.0, 0.9), (10.0, 1.0)]
             for s, rate in [("jax", 1e3 / ms), ("runtime", ratio * 1e3 / ms)]]
    assert break_even_ms(sweep) == pytest.approx(math.sqrt(10))
    assert break_even_ms(sweep, fraction=0.4) == 0.1  # already there at the smallest size
    assert break_even_ms(sweep, fraction=1.01) == math.inf


def test_find_break_even_on_synthetic_systems():
    # jax: 0.1 + 0.1 k ms per computation. runtime: 1 ms of dispatch hidden under longer computations,
    # so the ratio is 0.1, 0.2, 0.3, 0.5, 0.9, 1.0 at ks 0..16: crossing 0.95 halfway (in log size)
    # between 0.9 ms and 1.7 ms.
    jax_like = SyntheticSystem("jax", overhead_ms=0.0, pipelined=True)
    runtime_like = SyntheticSystem("runtime", overhead_ms=1.0, pipelined=True)
    result = find_break_even(runtime_like, jax_like, ks=(0, 1, 2, 4, 8, 16), target_s=0.01)
    assert result == pytest.approx(math.sqrt(0.9 * 1.7))
    never = SyntheticSystem("runtime", overhead_ms=1.0, pipelined=False)
    assert find_break_even(never, jax_like, ks=(0, 1, 2), target_s=0.01) == math.inf


def test_report_table_and_plot(tmp_path):
    systems = {"runtime": SyntheticSystem("runtime", 0.5, True), "jax": SyntheticSystem("jax", 0.0, True),
               "ray": SyntheticSystem("ray", 1.0, False)}
    report = run_dispatch_benchmark(systems, ks=(0, 2, 8, 32), target_s=0.01)
    assert {(r["system"], r["shape"]) for r in report["results"]} == {
        (s, shape) for s in systems for shape in SHAPES}
    assert all(r["computations_per_s"] > 0 for r in report["results"] + report["sweep"])
    assert 0 < report["break_even_ms"] < math.inf and report["n_devices"] == N_DEVICES
    table = format_table(report)
    assert "OpByOp" in table and "break-even" in table and "ray" in table
    path = plot_dispatch(report, tmp_path / "dispatch.png")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # Figure 5 as lines when results span several device counts; no sweep panel without a sweep.
    lines = {"results": [dict(r, n_devices=d) for r in report["results"] for d in (4, 8)]}
    assert plot_dispatch(lines, tmp_path / "lines.png").stat().st_size > 0


@pytest.mark.ray
def test_ray_baseline_chains_and_measures():
    from benchmarks.dispatch_baselines import RaySystem

    system = RaySystem(N_DEVICES)
    try:
        check_system(system)
        for shape in SHAPES:
            assert measure(system, shape, length=8, target_s=0.1, repeats=1) > 0
    finally:
        system.close()


def test_rounds_interleave_systems_and_report_medians():
    """A machine that slows down round by round moves every rate, not the ratios measured side by
    side: each round's ratio is the same, and the report holds every round and the medians."""
    from benchmarks.dispatch import measure_rounds, summarize

    class Loaded(SyntheticSystem):
        slowdown = [1.0]

        def _run(self, computations, k):
            order.append(self.name)
            return super()._run(computations, k) * self.slowdown[0]

    order = []
    systems = {"runtime": Loaded("runtime", 0.5, True), "jax": Loaded("jax", 0.0, True),
               "ray": Loaded("ray", 1.0, False)}

    def next_round(records):
        Loaded.slowdown[0] = 1.0 + len(records)  # the machine gets busier

    records = measure_rounds(systems, 5, 0.01, on_round=next_round)
    assert [r["round"] for r in records] == [1, 2, 3, 4, 5]
    # Interleaved: within a round, each shape is measured on runtime, jax, ray in turn.
    firsts = [name for i, name in enumerate(order) if i == 0 or order[i - 1] != name]
    assert firsts[:3] == ["runtime", "jax", "ray"] and len(firsts) == 5 * 3 * 3
    fused = [r for r in records[0]["results"] if r["shape"] == "fused"]
    assert [r["system"] for r in fused] == ["runtime", "jax", "ray"]
    assert fused[0]["warmup_runs"] >= 3 and len(fused[0]["run_rates"]) == 3
    rates = [next(r["computations_per_s"] for r in rec["results"]
                  if (r["system"], r["shape"]) == ("jax", "opbyop")) for rec in records]
    assert rates[0] > 4 * rates[-1]  # the rates moved with the machine...
    summary = summarize(records)
    for name in ("fused_vs_jax_fused", "chained_vs_jax_opbyop", "opbyop_vs_ray_opbyop"):
        values = [r["ratios"][name] for r in records]
        assert summary["spread"][name]["values"] == values
        assert summary["ratios"][name] == pytest.approx(sorted(values)[2])  # the median of 5
        assert max(values) == pytest.approx(min(values), rel=0.05)  # ...the ratios did not
    jax_opbyop = next(r for r in summary["results"] if (r["system"], r["shape"]) == (
        "jax", "opbyop"))
    assert jax_opbyop["rounds"] == rates and jax_opbyop["computations_per_s"] == sorted(rates)[2]
