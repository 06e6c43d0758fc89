"""Figures 9 and 11 of the Pathways paper from a multitenant benchmark report, and a text table.

The report is what `benchmarks.multitenant.run` writes: {"runs": [{"clients", "policy",
"weights", "shares", "expected_shares", "device_busy", "sessions", "timeline": [(session, start,
end, devices)]}, ...], "devices": int}; timeline times are seconds from the start of the run's
measurement window.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # files only: no display on benchmark machines
import matplotlib.pyplot as plt  # noqa: E402  (the backend must be chosen first)

__all__ = ["format_table", "plot_multitenant"]

#: Length of the timeline excerpt drawn per run.
EXCERPT_S = 0.02


def _label(run: Mapping[str, Any]) -> str:
    weights = run["weights"]
    pattern = ":".join(f"{w:g}" for w in weights[:4]) + ("..." if len(weights) > 4 else "")
    return f"{run['policy']} {run['clients']} clients ({pattern})"


def _plot_timeline(ax: Any, run: Mapping[str, Any], devices: int) -> None:
    """Which client ran on each device over a short excerpt (every program spans all devices)."""
    colors = plt.get_cmap("tab20")
    index = {s: i for i, s in enumerate(run["sessions"])}
    for session, start, end, _ in run["timeline"]:
        if start > EXCERPT_S:
            continue
        for device in range(devices):
            ax.barh(device, (end - start) * 1e3, left=start * 1e3, height=0.8,
                    color=colors(index.get(session, 0) % 20), edgecolor="white", linewidth=0.3)
    ax.set_xlim(0, EXCERPT_S * 1e3)
    ax.set_yticks(range(devices))
    ax.set_ylabel("device")
    ax.set_title(f"{_label(run)}: busy {run['device_busy']:.2f} (one color per client)",
                 fontsize=9)


def _plot_shares(ax: Any, runs: list[Mapping[str, Any]]) -> None:
    """Measured share of device time against the weights' share, one point per client."""
    for run in runs:
        ax.scatter(run["expected_shares"], run["shares"], s=14, label=_label(run))
    top = max((max(r["expected_shares"] + r["shares"]) for r in runs), default=1.0) * 1.1
    ax.plot([0, top], [0, top], color="gray", linewidth=0.8)
    ax.fill_between([0, top], [0, top * 0.9], [0, top * 1.1], color="gray", alpha=0.15,
                    label="target +-10%")
    ax.set_xlabel("share of its weight")
    ax.set_ylabel("measured share of device time")
    ax.set_title("Figure 11: proportional share", fontsize=9)
    ax.legend(fontsize=6)


def _plot_busy(ax: Any, runs: list[Mapping[str, Any]]) -> None:
    """Device busy against clients, per policy and weight pattern (Figure 9)."""
    series: dict[str, list[tuple[int, float]]] = {}
    for run in runs:
        pattern = ":".join(f"{w:g}" for w in run["weights"][:4])
        key = run["policy"] if run["policy"] == "fifo" else f"share {pattern}"
        series.setdefault(key, []).append((run["clients"], run["device_busy"]))
    for key, points in series.items():
        ax.plot(*zip(*sorted(points)), marker="o", label=key)
    ax.axhline(0.95, color="gray", linestyle="--", linewidth=0.8, label="target 0.95")
    ax.set_xscale("log", base=2)
    ax.set_ylim(0, 1.02)
    ax.set_xlabel("clients")
    ax.set_ylabel("device busy")
    ax.set_title("Figure 9: utilization with concurrent clients", fontsize=9)
    ax.legend(fontsize=7)


def plot_multitenant(report: Mapping[str, Any], path: str | Path) -> Path:
    """Writes the figure: timelines of the 4-client runs (or the smallest), shares, busy."""
    runs = report["runs"]
    shown = [r for r in runs if r["clients"] == 4] or runs[:3]
    fig = plt.figure(figsize=(12, 3 + 1.6 * len(shown)))
    grid = fig.add_gridspec(len(shown) + 2, 2)
    for i, run in enumerate(shown):
        _plot_timeline(fig.add_subplot(grid[i, :]), run, report.get("devices", 4))
    fig.axes[-1].set_xlabel("ms")
    _plot_shares(fig.add_subplot(grid[len(shown):, 0]), [r for r in runs if r["clients"] > 1])
    _plot_busy(fig.add_subplot(grid[len(shown):, 1]), runs)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return Path(path)


def format_table(report: Mapping[str, Any]) -> str:
    """One line per run: policy, clients, weights, device busy, shares against expected."""
    lines = [f"{'policy':<6} {'clients':>7}  {'weights':<18} {'busy':>5}  {'max err':>7}  shares "
             f"(expected)"]
    for run in report["runs"]:
        weights = ":".join(f"{w:g}" for w in run["weights"][:8])
        shares = " ".join(f"{s:.3f}({e:.3f})" for s, e in
                          list(zip(run["shares"], run["expected_shares"]))[:8])
        more = " ..." if run["clients"] > 8 else ""
        lines.append(f"{run['policy']:<6} {run['clients']:>7}  {weights:<18} "
                     f"{run['device_busy']:>5.3f}  {run['share_relative_error']:>7.3f}  "
                     f"{shares}{more}")
    return "\n".join(lines)
