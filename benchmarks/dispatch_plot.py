"""Figures 5 and 6 of the Pathways paper from a dispatch benchmark report, and a text table of it.

The report is the dict `benchmarks.dispatch_baselines.run_dispatch_benchmark` returns:
{"results": [{"system", "shape", "computations_per_s", optional "n_devices"}, ...],
 "sweep": [{"system", "ms", "computations_per_s"}, ...], "break_even_ms": float | None}.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # files only: no display on benchmark machines
import matplotlib.pyplot as plt  # noqa: E402  (the backend must be chosen first)

__all__ = ["format_table", "plot_dispatch", "print_table"]

_SHAPE_ORDER = ("opbyop", "chained", "fused")
_SHAPE_LABELS = {"opbyop": "OpByOp", "chained": "Chained", "fused": "Fused"}
_SYSTEM_ORDER = ("runtime", "proxy", "jax", "ray")
_SYSTEM_LABELS = {"runtime": "Pathways-style runtime", "jax": "JAX (multi-controller)", "ray": "Ray",
                  "proxy": "runtime via JAX's proxy backend"}
_SYSTEM_COLORS = {"runtime": "tab:blue", "jax": "tab:orange", "ray": "tab:green",
                  "proxy": "tab:purple"}
_SHAPE_MARKERS = {"opbyop": "o", "chained": "s", "fused": "^"}


def _ordered(names: set[str], order: tuple[str, ...]) -> list[str]:
    return [n for n in order if n in names] + sorted(names - set(order))


def _label(mapping: Mapping[str, str], key: str) -> str:
    return mapping.get(key, key)


def _plot_throughput(ax: Any, results: list[Mapping[str, Any]]) -> None:
    """Figure 5: computations/s per system and program shape, log scale.

    With one device count the figure is grouped bars; with several (records carrying "n_devices") it
    is the paper's lines of throughput against devices.
    """
    systems = _ordered({r["system"] for r in results}, _SYSTEM_ORDER)
    shapes = _ordered({r["shape"] for r in results}, _SHAPE_ORDER)
    device_counts = sorted({r["n_devices"] for r in results if "n_devices" in r})
    if len(device_counts) > 1:
        for system in systems:
            for shape in shapes:
                points = sorted((r["n_devices"], r["computations_per_s"]) for r in results
                                if r["system"] == system and r["shape"] == shape and "n_devices" in r)
                if points:
                    ax.plot(*zip(*points), marker=_SHAPE_MARKERS.get(shape, "o"),
                            color=_SYSTEM_COLORS.get(system), label=f"{_label(_SYSTEM_LABELS, system)} "
                            f"{_label(_SHAPE_LABELS, shape)}")
        ax.set_xscale("log", base=2)
        ax.set_xlabel("devices")
    else:
        width = 0.8 / max(len(systems), 1)
        for i, system in enumerate(systems):
            rates = {r["shape"]: r["computations_per_s"] for r in results if r["system"] == system}
            xs = [j + (i - (len(systems) - 1) / 2) * width for j, shape in enumerate(shapes) if shape in rates]
            ys = [rates[shape] for shape in shapes if shape in rates]
            bars = ax.bar(xs, ys, width, color=_SYSTEM_COLORS.get(system), label=_label(_SYSTEM_LABELS, system))
            ax.bar_label(bars, labels=[f"{y:,.0f}" for y in ys], fontsize=7, rotation=90, padding=2)
        ax.set_xticks(range(len(shapes)), [_label(_SHAPE_LABELS, s) for s in shapes])
        ax.set_xlabel("program shape" + (f" ({device_counts[0]} devices)" if device_counts else ""))
        ax.margins(y=0.25)
    ax.set_yscale("log")
    ax.set_ylabel("computations / s")
    ax.set_title("Dispatch throughput (Pathways Fig. 5)")
    ax.legend(fontsize=7)


def _plot_sweep(ax: Any, sweep: list[Mapping[str, Any]], break_even: float | None) -> None:
    """Figure 6: OpByOp computations/s against computation size, log-log, with the break-even size.

    Sizes are JAX's own time per computation, so JAX's line is 1000 / ms by construction: the ceiling
    a system with no dispatch overhead beyond JAX's would reach.
    """
    for system in _ordered({r["system"] for r in sweep}, _SYSTEM_ORDER):
        points = sorted((r["ms"], r["computations_per_s"]) for r in sweep if r["system"] == system)
        ax.plot(*zip(*points), marker="o", color=_SYSTEM_COLORS.get(system),
                label=_label(_SYSTEM_LABELS, system))
    if break_even is not None and math.isfinite(break_even):
        ax.axvline(break_even, linestyle="--", color="black", label=f"break-even {break_even:.2f} ms")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("computation size (ms per computation, JAX OpByOp)")
    ax.set_ylabel("computations / s (OpByOp)")
    ax.set_title("Throughput vs computation size (Pathways Fig. 6)")
    ax.legend(fontsize=7)


def _plot_rounds(ax: Any, report: Mapping[str, Any]) -> None:
    """The target ratios in every round, their medians and their targets."""
    rounds = report["rounds"]
    numbers = range(1, len(rounds) + 1)
    for i, (name, target) in enumerate((report.get("targets") or {}).items()):
        values = [r["ratios"].get(name) for r in rounds]
        if name == "break_even_ms" or not values or any(v is None for v in values):
            continue
        median = report["spread"][name]["median"]
        ax.plot(numbers, values, "o-", color=f"C{i}", label=f"{name}: median {median:.3g}")
        ax.axhline(target, ls="--", color=f"C{i}", lw=0.8, label=f"target {target:g}")
    ax.set_yscale("log")
    ax.set(title="Ratios per round (systems interleaved)", xlabel="round", ylabel="ratio",
           xticks=list(numbers))
    ax.legend(fontsize=7)


def _title(report: Mapping[str, Any]) -> str | None:
    env = report.get("environment")
    if not env:
        return None
    return (f"Dispatch, {report.get('n_devices', report.get('devices'))} CPU devices, "
            f"{report.get('target_s')} s per measurement; {env['cpu_model']}, "
            f"{env['cpu_cores_usable']} cores; {env['date'][:10]}")


def plot_dispatch(report: Mapping[str, Any], path: str | Path) -> Path:
    """Writes Figures 5 and 6 side by side as a PNG at `path` and returns the path.

    A report without "sweep" records gets only the Figure 5 panel; one with "rounds" also the
    target ratios of every round; one with "environment" a title naming the hardware and date.
    """
    results = list(report.get("results", []))
    sweep = list(report.get("sweep", []))
    rounds = bool(report.get("rounds"))
    panels = 1 + bool(sweep) + rounds
    fig, axes = plt.subplots(1, panels, figsize=(6.5 * panels, 4.8), squeeze=False)
    try:
        _plot_throughput(axes[0][0], results)
        if sweep:
            _plot_sweep(axes[0][1], sweep, report.get("break_even_ms"))
        if rounds:
            _plot_rounds(axes[0][-1], report)
        title = _title(report)
        if title:
            fig.suptitle(title, fontsize=10)
        fig.tight_layout()
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(path, dpi=120)
    finally:
        plt.close(fig)
    return path


def format_table(report: Mapping[str, Any]) -> str:
    """The report as text: computations/s per system (rows) and program shape (columns), the sweep
    (computations/s per system at each size) and the break-even size."""
    results = list(report.get("results", []))
    systems = _ordered({r["system"] for r in results}, _SYSTEM_ORDER)
    shapes = _ordered({r["shape"] for r in results}, _SHAPE_ORDER)
    rates = {(r["system"], r["shape"]): r["computations_per_s"] for r in results}
    lines = ["computations/s " + "".join(f"{_label(_SHAPE_LABELS, s):>12}" for s in shapes)]
    for system in systems:
        cells = "".join(f"{rates[system, s]:>12,.0f}" if (system, s) in rates else f"{'-':>12}" for s in shapes)
        lines.append(f"{system:<15}{cells}")
    sweep = list(report.get("sweep", []))
    if sweep:
        sweep_systems = _ordered({r["system"] for r in sweep}, _SYSTEM_ORDER)
        by_size = {(r["ms"], r["system"]): r["computations_per_s"] for r in sweep}
        lines += ["", "size (ms)      " + "".join(f"{s:>12}" for s in sweep_systems)]
        for ms in sorted({r["ms"] for r in sweep}):
            cells = "".join(f"{by_size[ms, s]:>12,.0f}" if (ms, s) in by_size else f"{'-':>12}"
                            for s in sweep_systems)
            lines.append(f"{ms:<15.3f}{cells}")
    break_even = report.get("break_even_ms")
    if break_even is not None:
        lines += ["", f"break-even computation size: {break_even:.3f} ms" if math.isfinite(break_even)
                  else "break-even computation size: never reached in the sweep"]
    return "\n".join(lines)


def print_table(report: Mapping[str, Any]) -> None:
    """Prints `format_table(report)`."""
    print(format_table(report))
