"""The Pathways paper's dispatch micro-benchmark (Barham et al. 2022, §5.1, Figures 5 and 6): baselines.

One *computation* is a scalar all-reduce across a slice of D devices followed by an add; its output is the
next computation's input, so computations form one chain. Three program shapes submit that chain:

* OpByOp: every computation is its own dispatch.
* Chained: a program of `length` (128) computations is one submission.
* Fused: one compiled function holds `length` computations.

The size sweep (Figure 6) adds `k` matmuls of (n, n) on every device's shard to each computation, so the
time per computation can be set from about 0.1 ms to several ms; sizes are expressed in milliseconds as
measured by the JAX baseline (`time_per_computation_ms`). The break-even size is the smallest one at
which a system's OpByOp throughput reaches 95% of JAX's.

A system under test implements `DispatchSystem`. The runtime's implementation lives elsewhere; it must run
exactly the functions `make_step` and `make_fused` build (e.g. via `jax.export` against `input_specs`),
starting from `initial_values`, so that every system's chain yields the same numbers (`check_system`).
"""

from __future__ import annotations

import math
import os
import statistics
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Protocol, runtime_checkable

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import AbstractMesh, Mesh, NamedSharding, PartitionSpec

# Shared with the runtime's Ray backend; re-exported here. Imports no Ray until called.
from runtime.cluster.ray_cluster import start_local_ray

__all__ = [
    "BREAK_EVEN_FRACTION", "MATMUL_DIM", "PROGRAM_LENGTH", "SHAPES", "SWEEP_KS",
    "DispatchSystem", "JaxSystem", "RaySystem", "break_even_ms", "check_system", "expected_state",
    "find_break_even", "initial_values", "input_specs", "make_fused", "make_step", "measure",
    "run_dispatch_benchmark", "size_sweep", "start_local_ray", "time_per_computation_ms",
]

PROGRAM_LENGTH = 128  # computations per Chained or Fused program, as in the paper
MATMUL_DIM = 128  # n of the size sweep's per-device (n, n) matmuls
SWEEP_KS = (0, 1, 2, 4, 8, 16, 32, 64, 128)  # ~0.13 ms to ~6 ms per computation on 4 CPU devices
BREAK_EVEN_FRACTION = 0.95
SHAPES = ("opbyop", "chained", "fused")

StepFn = Callable[[jax.Array, jax.Array], jax.Array]


def _computation(x: jax.Array, w: jax.Array, k: int, axes: tuple[str, ...]) -> jax.Array:
    """One computation on one device's shards: x is (1,), w is this device's (n, n) identity block."""
    if k > 0:
        # w is the identity, so m @ w == m exactly and m[0, 1] (== x, since w[0, 1] == 0) survives the
        # loop unchanged; XLA cannot know w's values, so every matmul really runs.
        m = jax.lax.fori_loop(0, k, lambda _, m: m @ w, w + x[0])
        x = m[0, 1:2]
    # pmean rather than psum keeps the chain bounded: after the first step every device holds
    # mean(x0) + steps, a value every system can check exactly.
    return jax.lax.pcast(jax.lax.pmean(x, axes) + 1.0, axes, to="varying")


def _sharding(mesh: Mesh | AbstractMesh) -> NamedSharding:
    return NamedSharding(mesh, PartitionSpec(tuple(mesh.axis_names)))


def make_step(mesh: Mesh | AbstractMesh, k: int = 0, *, n: int = MATMUL_DIM) -> StepFn:
    """The jitted computation `step(x, w) -> x'` on every device of `mesh` (all axes flattened).

    x: float32[D] and w: float32[D * n, n], both split over all mesh axes (see `input_specs`). k = 0 is
    the paper's computation (w is then unused); k > 0 adds k (n, n) matmuls per device first.
    Accepts an AbstractMesh so a controller can `jax.export` it for meshes it does not hold.
    """
    if k < 0 or n < 2:
        raise ValueError(f"need k >= 0 and n >= 2, got k={k}, n={n}")
    axes = tuple(mesh.axis_names)
    spec = PartitionSpec(axes)
    body = jax.shard_map(lambda x, w: _computation(x, w, k, axes), mesh=mesh, in_specs=(spec, spec),
                         out_specs=spec)
    sharding = _sharding(mesh)
    return jax.jit(body, in_shardings=(sharding, sharding), out_shardings=sharding)


def make_fused(mesh: Mesh | AbstractMesh, length: int = PROGRAM_LENGTH, k: int = 0, *,
               n: int = MATMUL_DIM) -> StepFn:
    """One jitted function running `length` chained computations of `make_step(mesh, k)`'s kind."""
    if length < 1:
        raise ValueError(f"length must be >= 1, got {length}")
    axes = tuple(mesh.axis_names)
    spec = PartitionSpec(axes)

    def program(x: jax.Array, w: jax.Array) -> jax.Array:
        return jax.lax.fori_loop(0, length, lambda _, x: _computation(x, w, k, axes), x)

    body = jax.shard_map(program, mesh=mesh, in_specs=(spec, spec), out_specs=spec)
    sharding = _sharding(mesh)
    return jax.jit(body, in_shardings=(sharding, sharding), out_shardings=sharding)


def input_specs(mesh: Mesh | AbstractMesh, n: int = MATMUL_DIM) -> tuple[jax.ShapeDtypeStruct, ...]:
    """(x, w) shapes, dtypes and shardings of `make_step`/`make_fused` arguments, for `jax.export`."""
    d = math.prod(mesh.axis_sizes)
    sharding = _sharding(mesh)
    return (jax.ShapeDtypeStruct((d,), jnp.float32, sharding=sharding),
            jax.ShapeDtypeStruct((d * n, n), jnp.float32, sharding=sharding))


def initial_values(n_devices: int, n: int = MATMUL_DIM) -> tuple[np.ndarray, np.ndarray]:
    """Host values of (x0, w) every system starts from: x0 = 0..D-1, w = D stacked identities."""
    return (np.arange(n_devices, dtype=np.float32),
            np.tile(np.eye(n, dtype=np.float32), (n_devices, 1)))


def expected_state(x0: np.ndarray, n_computations: int) -> np.ndarray:
    """The chain's value after `n_computations` (>= 1) computations starting from x0, for any k."""
    return np.full(x0.shape, np.mean(x0, dtype=np.float64) + n_computations, dtype=np.float32)


@runtime_checkable
class DispatchSystem(Protocol):
    """A system that dispatches the benchmark's chain of computations.

    Each timing method continues the system's one chain from its current value, returns the wall-clock
    seconds from its first submission until the last result is computed (not necessarily fetched), and
    leaves the chain's value at the result. A call advances the chain by exactly the number of
    computations it names, whatever `k`.
    """

    name: str
    n_devices: int

    def opbyop(self, n_computations: int) -> float:
        """Runs n computations, each submitted separately."""
        ...

    def chained(self, n_programs: int, length: int = PROGRAM_LENGTH) -> float:
        """Runs n_programs * length computations, submitted one program of `length` at a time."""
        ...

    def fused(self, n_programs: int, length: int = PROGRAM_LENGTH) -> float:
        """Runs n_programs calls of `make_fused(mesh, length)`: n_programs * length computations."""
        ...

    def opbyop_sized(self, k: int, n_computations: int) -> float:
        """Like `opbyop`, with `make_step(mesh, k)` as the computation."""
        ...

    def state(self) -> np.ndarray:
        """The chain's current value on the host: float32[n_devices]."""
        ...

    def close(self) -> None:
        """Releases the system's devices and processes."""
        ...


class JaxSystem:
    """Multi-controller JAX baseline: this process jits the computation and dispatches every call.

    Blocks on each result before the next dispatch. Measured hazard: on simulated CPU devices, many
    sharded executions with collectives in flight at once deadlock inside XLA's CPU rendezvous (8
    devices, 2000 unblocked chained calls: stuck, then a fatal abort); 4 devices survived, and gained
    only ~30% (8.5k vs 6.3k computations/s), so the safe mode is used throughout.
    """

    name = "jax"

    def __init__(self, devices: Sequence[jax.Device] | None = None, *, n: int = MATMUL_DIM) -> None:
        devices = list(devices if devices is not None else jax.devices())
        self.n_devices = len(devices)
        self.mesh = Mesh(np.array(devices), ("slice",))
        self._n = n
        x0, w = initial_values(self.n_devices, n)
        self._x = self.put(x0)
        self._w = self.put(w)
        self._compiled: dict[tuple[str, int, int], StepFn] = {}

    def put(self, value: np.ndarray) -> jax.Array:
        """Places a host array on the mesh, split along its first axis."""
        return jax.device_put(value, _sharding(self.mesh))

    def function(self, kind: str, k: int = 0, length: int = 1) -> StepFn:
        """The cached jitted "step" (`make_step`) or "fused" (`make_fused`) function."""
        key = (kind, k, length)
        if key not in self._compiled:
            self._compiled[key] = (make_step(self.mesh, k, n=self._n) if kind == "step"
                                   else make_fused(self.mesh, length, k, n=self._n))
        return self._compiled[key]

    def advance(self, x: jax.Array, fn: StepFn, calls: int) -> jax.Array:
        """x after `calls` chained calls of fn, each awaited before the next (see the class docstring)."""
        for _ in range(calls):
            x = fn(x, self._w)
            x.block_until_ready()
        return x

    def _timed(self, fn: StepFn, calls: int) -> float:
        start = time.perf_counter()
        self._x = self.advance(self._x, fn, calls)
        return time.perf_counter() - start

    def opbyop(self, n_computations: int) -> float:
        return self._timed(self.function("step"), n_computations)

    def chained(self, n_programs: int, length: int = PROGRAM_LENGTH) -> float:
        # JAX has no program construct: a program is a Python loop of single-computation calls.
        return self._timed(self.function("step"), n_programs * length)

    def fused(self, n_programs: int, length: int = PROGRAM_LENGTH) -> float:
        return self._timed(self.function("fused", length=length), n_programs)

    def opbyop_sized(self, k: int, n_computations: int) -> float:
        return self._timed(self.function("step", k), n_computations)

    def state(self) -> np.ndarray:
        return np.asarray(self._x)

    def close(self) -> None:
        self._compiled.clear()


class _RayDispatchActor:
    """Hosts a JaxSystem in its own process; wrapped by `ray.remote` in RaySystem."""

    def __init__(self, n_devices: int, n: int) -> None:
        # The actor is a fresh process whose XLA backend is not up yet; this sets its CPU device count
        # and takes precedence over an inherited XLA_FLAGS device count.
        jax.config.update("jax_num_cpu_devices", n_devices)
        self._jax = JaxSystem(jax.devices()[:n_devices], n=n)

    def _run(self, x: np.ndarray, fn: StepFn, calls: int) -> np.ndarray:
        return np.asarray(self._jax.advance(self._jax.put(x), fn, calls))

    def step(self, x: np.ndarray, k: int) -> np.ndarray:
        return self._run(x, self._jax.function("step", k), 1)

    def run_chain(self, x: np.ndarray, length: int) -> np.ndarray:
        return self._run(x, self._jax.function("step"), length)

    def run_fused(self, x: np.ndarray, length: int) -> np.ndarray:
        return self._run(x, self._jax.function("fused", length=length), 1)


class RaySystem:
    """The Ray baseline: one actor hosts the jitted computations on its own D CPU devices.

    OpByOp and sized OpByOp are one actor call per computation; Chained is one call running `length`
    computations inside the actor; Fused is one call of the fused function. Calls are chained by
    passing the previous call's ObjectRef, so the client never waits between submissions; the value
    (float32[D]) travels actor -> object store -> actor between calls, as Ray's data plane does.
    """

    name = "ray"

    def __init__(self, n_devices: int, *, n: int = MATMUL_DIM) -> None:
        self._started_ray = start_local_ray()
        import ray

        self._ray = ray
        self.n_devices = n_devices
        self._actor = ray.remote(num_cpus=0)(_RayDispatchActor).remote(n_devices, n)
        self._ref = ray.put(initial_values(n_devices, n)[0])
        self._ref = self._actor.step.remote(self._ref, 0)  # fails here if the actor could not start
        ray.get(self._ref)

    def _timed(self, method: Any, calls: int, arg: int) -> float:
        start = time.perf_counter()
        ref = self._ref
        for _ in range(calls):
            ref = method.remote(ref, arg)
        self._ray.get(ref)
        self._ref = ref
        return time.perf_counter() - start

    def opbyop(self, n_computations: int) -> float:
        return self._timed(self._actor.step, n_computations, 0)

    def chained(self, n_programs: int, length: int = PROGRAM_LENGTH) -> float:
        return self._timed(self._actor.run_chain, n_programs, length)

    def fused(self, n_programs: int, length: int = PROGRAM_LENGTH) -> float:
        return self._timed(self._actor.run_fused, n_programs, length)

    def opbyop_sized(self, k: int, n_computations: int) -> float:
        return self._timed(self._actor.step, n_computations, k)

    def state(self) -> np.ndarray:
        return np.asarray(self._ray.get(self._ref))

    def close(self) -> None:
        self._ray.kill(self._actor)
        if self._started_ray:
            self._ray.shutdown()


def check_system(system: DispatchSystem, *, length: int = 3) -> None:
    """Raises AssertionError unless every program shape advances `system`'s chain by what it names."""
    runs: list[tuple[str, Callable[[], float], int]] = [
        ("opbyop", lambda: system.opbyop(2), 2),
        ("chained", lambda: system.chained(1, length), length),
        ("fused", lambda: system.fused(2, length), 2 * length),
        ("opbyop_sized", lambda: system.opbyop_sized(2, 2), 2),
    ]
    for shape, run, computations in runs:
        before = system.state()
        run()
        got, want = system.state(), expected_state(before, computations)
        if not np.allclose(got, want, rtol=1e-6):
            raise AssertionError(f"{system.name} {shape}: chain value {got}, expected {want}")


def _runner(system: DispatchSystem, shape: str, k: int, length: int) -> tuple[Callable[[int], float], int]:
    """(run(units) -> seconds, computations per unit) for one program shape."""
    if shape == "opbyop":
        if k == 0:
            return system.opbyop, 1
        return (lambda units: system.opbyop_sized(k, units)), 1
    if k != 0:
        raise ValueError(f"the size sweep is OpByOp only; got shape {shape!r} with k={k}")
    if shape == "chained":
        return (lambda units: system.chained(units, length)), length
    if shape == "fused":
        return (lambda units: system.fused(units, length)), length
    raise ValueError(f"unknown program shape {shape!r}; expected one of {SHAPES}")


def measure(system: DispatchSystem, shape: str, *, k: int = 0, length: int = PROGRAM_LENGTH,
            target_s: float = 1.0, repeats: int = 3, statistic: str = "best",
            details: dict[str, Any] | None = None) -> float:
    """Computations per second of `system` running `shape` ("opbyop", "chained" or "fused").

    Warms up (compiles) first, picks a count of units so that each of `repeats` timed runs lasts about
    target_s / repeats, and returns the best (default: robust to other load on a shared machine, which
    only ever slows a run) or the median of the runs. k > 0 measures sized OpByOp. Takes roughly
    1.3 * target_s plus compile time. `details`, if given, receives what was run: the warm-up runs
    (not measured: compiling, then sizing the timed runs) and every timed run's rate.
    """
    if statistic not in ("best", "median"):
        raise ValueError(f"statistic must be 'best' or 'median', got {statistic!r}")
    run, per_unit = _runner(system, shape, k, length)
    run(1)
    run(1)
    units, elapsed = 1, run(1)
    warmup_runs = 3
    # Double until a run is long enough to extrapolate from without timer and jitter noise.
    while elapsed < target_s / (8 * repeats) and units < 1 << 20:
        units *= 2
        elapsed = run(units)
        warmup_runs += 1
    units = max(1, round(units * target_s / (repeats * max(elapsed, 1e-9))))
    rates = [units * per_unit / run(units) for _ in range(repeats)]
    if details is not None:
        details.update(warmup_runs=warmup_runs, units_per_run=units,
                       computations_per_unit=per_unit, run_rates=rates, statistic=statistic)
    return max(rates) if statistic == "best" else statistics.median(rates)


def time_per_computation_ms(k: int, system: JaxSystem | None = None, *, target_s: float = 0.5) -> float:
    """Milliseconds per sized computation (k matmuls) when the JAX baseline runs it OpByOp.

    This is the size axis of Figure 6. With no `system`, a JaxSystem on all local devices is used.
    """
    system = system if system is not None else JaxSystem()
    return 1e3 / measure(system, "opbyop", k=k, target_s=target_s)


def size_sweep(systems: Mapping[str, DispatchSystem], ks: Sequence[int] = SWEEP_KS, *,
               reference: str = "jax", target_s: float = 0.5,
               progress: Callable[[str], None] = lambda _: None) -> list[dict[str, Any]]:
    """OpByOp throughput of every system at every size k.

    Returns one record per (system, k): {"system", "k", "ms", "computations_per_s"}, where "ms" is the
    size of the computation, measured as `reference`'s (the JAX baseline's) time per computation.
    """
    records = []
    for k in ks:
        progress(f"size sweep: k={k} matmuls per computation")
        reference_rate = measure(systems[reference], "opbyop", k=k, target_s=target_s)
        for name, system in systems.items():
            rate = (reference_rate if name == reference
                    else measure(system, "opbyop", k=k, target_s=target_s))
            records.append({"system": name, "k": k, "ms": 1e3 / reference_rate, "computations_per_s": rate})
    return records


def break_even_ms(sweep: Sequence[Mapping[str, Any]], *, system: str = "runtime", reference: str = "jax",
                  fraction: float = BREAK_EVEN_FRACTION) -> float:
    """Smallest computation size (ms) at which `system` reaches `fraction` of `reference`'s throughput.

    Linear interpolation in log(ms) between the last size below the threshold and the first at or
    above it; the smallest size measured if already there; inf if no size gets there.
    """
    rates: dict[str, dict[float, float]] = {system: {}, reference: {}}
    for record in sweep:
        if record["system"] in rates:
            rates[record["system"]][record["ms"]] = record["computations_per_s"]
    sizes = sorted(set(rates[system]) & set(rates[reference]))
    ratios = [rates[system][ms] / rates[reference][ms] for ms in sizes]
    for i, (ms, ratio) in enumerate(zip(sizes, ratios)):
        if ratio >= fraction:
            if i == 0:
                return ms
            lo_ms, lo_ratio = sizes[i - 1], ratios[i - 1]
            t = (fraction - lo_ratio) / (ratio - lo_ratio)
            return math.exp(math.log(lo_ms) + t * (math.log(ms) - math.log(lo_ms)))
    return math.inf


def find_break_even(runtime_system: DispatchSystem, jax_system: DispatchSystem,
                    ks: Sequence[int] = SWEEP_KS, *, fraction: float = BREAK_EVEN_FRACTION,
                    target_s: float = 0.5) -> float:
    """Break-even computation size in ms (inf if never) of `runtime_system` against `jax_system`."""
    sweep = size_sweep({"runtime": runtime_system, "jax": jax_system}, ks, target_s=target_s)
    return break_even_ms(sweep, fraction=fraction)


def run_dispatch_benchmark(systems: Mapping[str, DispatchSystem], *, shapes: Sequence[str] = SHAPES,
                           ks: Sequence[int] = SWEEP_KS, target_s: float = 1.0,
                           progress: Callable[[str], None] = lambda _: None) -> dict[str, Any]:
    """Figures 5 and 6 for `systems` (keyed "runtime", "jax", "ray"; "jax" is needed for the sweep).

    Returns the dict `benchmarks.dispatch_plot` reads: "results" (one record per system and shape),
    "sweep" (see `size_sweep`; empty without "jax"), "break_even_ms" (None without "runtime") and
    "n_devices".
    """
    results = []
    for name, system in systems.items():
        for shape in shapes:
            progress(f"{name} {shape}")
            results.append({"system": name, "shape": shape, "n_devices": system.n_devices,
                            "computations_per_s": measure(system, shape, target_s=target_s)})
    sweep = (size_sweep(systems, ks, target_s=target_s / 2, progress=progress)
             if "jax" in systems and ks else [])
    break_even = break_even_ms(sweep) if "runtime" in systems and sweep else None
    n_devices = {system.n_devices for system in systems.values()}
    return {"results": results, "sweep": sweep, "break_even_ms": break_even,
            "n_devices": n_devices.pop() if len(n_devices) == 1 else sorted(n_devices)}


def main(argv: Sequence[str] | None = None) -> None:
    """Runs the baselines: python -m benchmarks.dispatch_baselines --devices 4 --ray --out results/x."""
    import argparse
    import json

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--devices", type=int, default=4, help="simulated CPU devices in the slice")
    parser.add_argument("--ray", action="store_true", help="also measure the Ray baseline")
    parser.add_argument("--target-s", type=float, default=1.0, help="seconds per measurement")
    parser.add_argument("--out", default=None, help="write OUT.json and OUT.png")
    args = parser.parse_args(argv)
    jax.config.update("jax_num_cpu_devices", args.devices)
    # Ray first: it forks helper processes, which JAX warns about once its backend threads run.
    systems: dict[str, DispatchSystem] = {"ray": RaySystem(args.devices)} if args.ray else {}
    systems = {"jax": JaxSystem(jax.devices()[:args.devices]), **systems}
    try:
        for system in systems.values():
            check_system(system)
        report = run_dispatch_benchmark(systems, target_s=args.target_s)
    finally:
        for system in systems.values():
            system.close()
    from benchmarks.dispatch_plot import format_table, plot_dispatch

    print(format_table(report))
    if args.out:
        os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
        with open(args.out + ".json", "w") as f:
            json.dump(report, f, indent=1)
        plot_dispatch(report, args.out + ".png")


if __name__ == "__main__":
    main()
