"""The figure and the table of `pathways bench utilization` (benchmarks.utilization's report)."""

from __future__ import annotations

import pathlib
from collections.abc import Mapping
from typing import Any

from benchmarks import utilization_timeline as tl

#: Targets of the figures (from the project's issues), drawn as lines and printed beside them.
TARGETS = {"ratio_vs_inprocess": 0.97, "ratio_two_vs_one_island": 0.97, "device_busy": 0.98,
           "mfu": 0.70}
SYSTEMS = (("inprocess", "in-process JAX"), ("one_island", "runtime, one island"),
           ("two_islands", "runtime, two islands"))


def title(report: Mapping[str, Any]) -> str:
    """Config, hardware and date of a run, for the figure."""
    env = report["environment"]
    return (f"PaLM {report['config']} ({report['dtype']}), {report['islands']} islands x "
            f"{report['devices_per_island']} {report['platform']} devices, global batch "
            f"{report['global_batch']} x {report['seq_len']}\n{env['cpu_model']}, "
            f"{env['cpu_cores_usable']} cores; {env['date'][:10]}; "
            f"{len(report['rounds'])} rounds, systems interleaved")


def plot(report: Mapping[str, Any], path: pathlib.Path,
         last: Mapping[str, Any] | None = None) -> None:
    """Tokens/s of the three systems (medians, every round's figure beside them), the ratios and
    MFU per round against their targets, and device busy over time in the last round (`last`:
    its two-island Turn) or per round."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rounds = report["rounds"]
    fig, axes = plt.subplots(2, 2, figsize=(13, 8.5))
    (ax_rate, ax_ratio), (ax_mfu, ax_busy) = axes
    for i, (key, label) in enumerate(SYSTEMS):
        values = [r["systems"][key]["tokens_per_s"] for r in rounds if key in r["systems"]]
        if not values:
            continue
        median = report["spread"][f"{key}_tokens_per_s"]["median"]
        ax_rate.bar(i, median, color=f"C{i}", alpha=0.6, label=f"{label}: {median:,.0f}")
        ax_rate.plot([i] * len(values), values, "k.", ms=5)
    for key, (x, y) in (("ratio_vs_inprocess", (0.02, 0.95)),
                        ("ratio_two_vs_one_island", (0.02, 0.88))):
        median = report["spread"][key]["median"]
        if median is not None:
            name = "runtime / in-process" if key == "ratio_vs_inprocess" else "two / one island"
            met = "met" if median >= TARGETS[key] else "missed"
            ax_rate.text(x, y, f"{name}: {median:.3f} (target >= {TARGETS[key]}: {met})",
                         transform=ax_rate.transAxes, fontsize=8, va="top")
    ax_rate.margins(y=0.2)
    ax_rate.set(title="Tokens/s (bars: median; dots: rounds)", ylabel="tokens/s",
                xticks=range(len(SYSTEMS)), xticklabels=[label for _, label in SYSTEMS])
    ax_rate.legend(loc="lower right", fontsize=8)
    numbers = range(1, len(rounds) + 1)
    for i, (key, label) in enumerate((("ratio_vs_inprocess", "runtime / in-process"),
                                      ("ratio_two_vs_one_island", "two islands / one"))):
        values = [r["ratios"][key] for r in rounds]
        if any(v is None for v in values):
            continue
        median = report["spread"][key]["median"]
        ax_ratio.plot(numbers, values, "o-", color=f"C{i}", label=f"{label} (median {median:.3f})")
    ax_ratio.axhline(TARGETS["ratio_vs_inprocess"], ls="--", color="gray", label="target 0.97")
    ax_ratio.set(title="Ratios per round", xlabel="round", ylabel="ratio",
                 xticks=list(numbers))
    ax_ratio.legend(fontsize=8)
    for i, (key, label) in enumerate(SYSTEMS):
        values = [r["systems"][key]["mfu"] for r in rounds if key in r["systems"]]
        if len(values) == len(rounds):
            ax_mfu.plot(numbers, values, "o-", color=f"C{i}", label=label)
    ax_mfu.axhline(TARGETS["mfu"], ls="--", color="gray", label="target 0.70")
    ax_mfu.set(title="MFU per round (each of its round's calibrated peak)", xlabel="round",
               ylabel="MFU", ylim=(0, 1), xticks=list(numbers))
    ax_mfu.legend(fontsize=8)
    if last is not None and last.window is not None:
        start, end = last.window
        bins = 40
        centers = [(i + 0.5) * (end - start) / bins for i in range(bins)]
        for t in last.timelines:
            ax_busy.plot(centers, tl.busy_over_time(t, start, end, bins),
                         label=f"island {t.island} host {t.host}")
        ax_busy.set(title="Device busy over the last round's measured steps", xlabel="seconds")
    ax_busy.axhline(TARGETS["device_busy"], ls="--", color="gray", label="target 0.98")
    ax_busy.set(ylabel="busy fraction", ylim=(0, 1.05))
    ax_busy.legend(loc="lower right", fontsize=8)
    fig.suptitle(title(report), fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def print_table(report: Mapping[str, Any]) -> None:
    spread = report["spread"]

    def figure(key: str, fmt: str) -> str:
        s = spread[key]
        if s["median"] is None:
            return "n/a"
        return f"{s['median']:{fmt}}  ({s['min']:{fmt}} - {s['max']:{fmt}})"

    rows = [
        ("tokens/s, runtime, two islands", figure("two_islands_tokens_per_s", ",.0f"), ""),
        ("tokens/s, in-process JAX", figure("inprocess_tokens_per_s", ",.0f"), ""),
        ("tokens/s, runtime, one island", figure("one_island_tokens_per_s", ",.0f"), ""),
        ("runtime / in-process", figure("ratio_vs_inprocess", ".3f"), ">= 0.97"),
        ("two islands / one island", figure("ratio_two_vs_one_island", ".3f"), ">= 0.97"),
        ("device busy (measured steps)", figure("device_busy", ".3f"), ">= 0.98"),
        ("MFU, two islands", figure("two_islands_mfu", ".3f"), ">= 0.70 of the peak"),
        ("MFU, in-process JAX", figure("inprocess_mfu", ".3f"), ""),
        ("peak FLOP/s (per round)", figure("peak_flops", ".3g"), ""),
    ]
    width = max(len(k) for k, _, _ in rows)
    print(f"\n{title(report)}\nmedian (min - max) over {len(report['rounds'])} rounds")
    for key, value, target in rows:
        print(f"  {key:<{width}}  {value:<32} {target}")
    print(f"  peak: {report['peak_source']}")
    print(f"  FLOPs/token 6N+12LHQT vs XLA: {report['flops_per_token']['model_6N_12LHQT']:.3g} "
          f"vs {report['flops_per_token']['xla_cost_analysis']:.3g}")
    for host, idle in report.get("idle_attribution_s", {}).items():
        print(f"  idle on host {host} (last round): dispatch {idle['dispatch']:.2f} s, host work "
              f"{idle['host_work']:.2f} s, inputs/transfer {idle['inputs_or_transfer']:.2f} s of "
              f"{idle['window']:.2f} s")
