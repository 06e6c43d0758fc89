"""Plot and table of `pathways bench transfer` (benchmarks.transfer): ratio to memcpy by size."""

from __future__ import annotations

import json
import pathlib
import sys
from typing import Any

OPERATIONS = ("put", "fetch", "copy")


def _parse(key: str) -> tuple[str, str, float]:
    path, layout, size = key.split("/")
    return path, layout, float(size.removesuffix("MiB"))


def plot_transfer(report: dict[str, Any], path: pathlib.Path) -> pathlib.Path:
    """One panel per operation: median ratio to memcpy (bars: min-max over rounds) by size,
    one line per path and layout; the targets as dashed lines."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    summary = report.get("summary", {})
    fig, axes = plt.subplots(1, len(OPERATIONS), figsize=(5 * len(OPERATIONS), 4), sharey=True,
                             constrained_layout=True)
    curves: dict[tuple[str, str], list[tuple[float, dict]]] = {}
    for key, ops in summary.items():
        p, layout, mib = _parse(key)
        curves.setdefault((p, layout), []).append((mib, ops))
    for ax, op in zip(axes, OPERATIONS):
        for (p, layout), points in sorted(curves.items()):
            points = sorted((mib, ops[op]["ratio"]) for mib, ops in points if op in ops)
            if not points:
                continue
            xs = [mib for mib, _ in points]
            med = [s["median"] for _, s in points]
            lo = [s["median"] - s["min"] for _, s in points]
            hi = [s["max"] - s["median"] for _, s in points]
            ax.errorbar(xs, med, yerr=[lo, hi], marker="o", capsize=3,
                        linestyle="-" if layout == "sharded" else "--", label=f"{p}, {layout}")
        for p, target in (("shm", report["targets"]["shm"]), ("stream", report["targets"]["stream"])):
            ax.axhline(target, color="grey", linestyle=":", linewidth=1)
            ax.text(1, target, f" {p} target", fontsize=7, va="bottom", color="grey")
        ax.set_xscale("log", base=2)
        ax.set_xlabel("array size (MiB)")
        ax.set_title(op)
        ax.grid(True, alpha=0.3)
    axes[0].set_ylabel("throughput / memcpy (same run)")
    axes[0].legend(fontsize=7)
    env = report.get("environment", {})
    paths = {r["path"] for r in report.get("rounds", [])}
    rounds = len(report.get("rounds", [])) // max(1, len(paths))
    fig.suptitle(f"bench transfer: {env.get('cpu_model', '')}, {env.get('cpu_cores_usable', '')} "
                 f"cores; median (min-max) over {rounds} interleaved rounds per path",
                 fontsize=9)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def format_table(report: dict[str, Any]) -> str:
    """Median GiB/s and ratio to memcpy (min-max) per path, layout, size and operation."""
    lines = ["median GiB/s, ratio to memcpy (min-max over rounds) [ratio to a copy into new memory]",
             f"{'path/layout/size':<28}" + "".join(f"{op:>36}" for op in OPERATIONS)]
    for key in sorted(report.get("summary", {}), key=lambda k: (_parse(k)[0], _parse(k)[1],
                                                                 _parse(k)[2])):
        ops = report["summary"][key]
        cells = []
        for op in OPERATIONS:
            if op not in ops:
                cells.append(f"{'-':>36}")
                continue
            r, g = ops[op]["ratio"], ops[op]["gib_per_s"]
            fresh = ops[op].get("ratio_fresh", {}).get("median")
            shown_fresh = "" if fresh is None else f" [{fresh:.2f}]"
            cells.append(f"{g['median']:>6.2f} GiB/s {r['median']:.2f} ({r['min']:.2f}-"
                         f"{r['max']:.2f}){shown_fresh}".rjust(36))
        lines.append(f"{key:<28}" + "".join(cells))
    for path, first in report.get("first", {}).items():
        lines.append(f"first of {path} ({report['first_mib']:g} MiB): put {first['put']:.3f} s, "
                     f"fetch {first['fetch']:.3f} s")
    for name, t in report.get("targets_met", {}).items():
        value = t.get("ratio", t.get("first_over_warm"))
        verdict = "not measured" if t["met"] is None else "met" if t["met"] else "NOT met"
        shown = "-" if value is None else f"{value:.2f}"
        lines.append(f"target {name}: {shown} (target {'<=' if 'first' in name else '>='} "
                     f"{t['target']}) {verdict}")
    palm = report.get("palm_exchange", {})
    for path in ("shm", "stream"):
        if path in palm:
            lines.append(f"PaLM two-pod exchange of {palm['gradient_bytes'] / (1 << 30):.1f} GiB "
                         f"({path}): {palm[path]['exchange_s']:.2f} s, "
                         f"{palm[path]['share_of_step']:.0%} of a step with "
                         f"{palm['compute_step_s']} s of computation")
    exchange = report.get("exchange", {})
    for name in ("in_order", "early"):
        figures = exchange.get(name, {}).get("summary")
        if figures:
            share, serial = figures["share_of_step"], figures["serial_share"]
            lines.append(
                f"measured step exchange, {exchange['gradient_mib']:g} MiB of gradients, sends "
                f"{name.replace('_', ' ')}: {share['median']:.0%} of the step "
                f"({share['min']:.0%}-{share['max']:.0%}; step {figures['step_s']['median']:.2f} s,"
                f" computations alone {figures['compute_s']['median']:.2f} s, copy alone "
                f"{figures['copy_s']['median']:.2f} s: {serial['median']:.0%} if serial)")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    """`python -m benchmarks.transfer_plot DIR`: redraws DIR/transfer.png, prints the table."""
    out = pathlib.Path((argv or sys.argv[1:])[0])
    report = json.loads((out / "transfer.json").read_text())
    plot_transfer(report, out / "transfer.png")
    print(format_table(report))


if __name__ == "__main__":
    main()
