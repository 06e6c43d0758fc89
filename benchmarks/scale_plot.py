"""Plots and the table of `pathways bench scale` (benchmarks/scale.py), from its report.

scale_busy.png: device busy fraction against computation duration, one line per host count, one
panel per program shape (the Pathways paper's Figure 6 question: from what size does dispatch keep
the devices busy?). scale_throughput.png: computations per second against duration, with the
ceiling the devices allow (Figure 5's measure). scale_controller.png: the controller's CPU per
computation and its threads against host count.
"""

from __future__ import annotations

import pathlib

from benchmarks.dispatch_baselines import SHAPES


def _curves(report: dict, shape: str) -> dict[int, list[dict]]:
    curves: dict[int, list[dict]] = {}
    for point in report["points"]:
        if point["shape"] == shape and point.get("busy") is not None:
            curves.setdefault(point["hosts"], []).append(point)
    return {h: sorted(c, key=lambda p: p["target_ms"]) for h, c in sorted(curves.items())}


def plot_scale(report: dict, out: pathlib.Path) -> None:
    """Writes scale_busy.png, scale_throughput.png and scale_controller.png into `out`."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    shapes = [s for s in SHAPES if any(p["shape"] == s for p in report["points"])] or ["opbyop"]
    colors = plt.get_cmap("viridis")
    hosts_all = sorted({p["hosts"] for p in report["points"]}) or [1]

    def color(hosts: int):
        return colors(hosts_all.index(hosts) / max(1, len(hosts_all) - 1) * 0.9)

    for kind in ("busy", "throughput"):
        fig, axes = plt.subplots(1, len(shapes), figsize=(5 * len(shapes), 4), squeeze=False)
        for ax, shape in zip(axes[0], shapes):
            for hosts, curve in _curves(report, shape).items():
                x = [p.get("computation_ms") or p["target_ms"] for p in curve]
                if kind == "busy":
                    ax.plot(x, [p["busy"] for p in curve], "o-", color=color(hosts),
                            label=f"{hosts} hosts")
                else:
                    ax.plot(x, [p["computations_per_s"] for p in curve], "o-",
                            color=color(hosts), label=f"{hosts} hosts")
                    ceiling = [p["islands"] * 1e3 / ms for p, ms in zip(curve, x)]
                    ax.plot(x, ceiling, ":", color=color(hosts), linewidth=1)
            if not ax.lines:
                ax.set_title(f"{shape}: no measurements")
                continue
            ax.set_xscale("log")
            ax.set_xlabel("computation duration (ms)")
            ax.set_title(shape)
            if kind == "busy":
                ax.axhline(0.95, color="gray", linestyle="--", linewidth=1)
                ax.set_ylim(0, 1.05)
                ax.set_ylabel("device busy fraction")
            else:
                ax.set_yscale("log")
                ax.set_ylabel("computations / s (dotted: devices always busy)")
            ax.grid(True, which="both", alpha=0.3)
            ax.legend(fontsize=8)
        fig.suptitle(f"dispatch on simulated hosts: {kind}")
        fig.tight_layout()
        fig.savefig(out / f"scale_{kind}.png", dpi=110)
        plt.close(fig)

    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    for shape in shapes:
        smallest = {}
        for hosts, curve in _curves(report, shape).items():
            cpu = curve[0]["controller"].get("cpu_s_per_computation")
            if cpu:
                smallest[hosts] = cpu * 1e3
        if smallest:
            left.plot(list(smallest), list(smallest.values()), "o-", label=f"{shape} (shortest)")
    left.set(xlabel="hosts", ylabel="controller CPU ms per computation")
    clusters = [c for c in report["clusters"] if c.get("controller_idle")]
    right.plot([c["hosts"] for c in clusters], [c["controller_idle"]["threads"] for c in clusters],
               "o-", label="threads (idle)")
    right.set(xlabel="hosts", ylabel="controller threads")
    for ax in (left, right):
        if any(len(line.get_xdata()) for line in ax.lines):
            ax.set(xscale="log", yscale="log")
            ax.legend(fontsize=8)
        ax.grid(True, which="both", alpha=0.3)
    fig.tight_layout()
    fig.savefig(out / "scale_controller.png", dpi=110)
    plt.close(fig)


def format_table(report: dict) -> str:
    """The sweep as text: a row per point, then clusters and break-evens."""
    rows = ["latency (ms, p50/p99) of a probe: one command per island at a time; each stage's own "
            "length; last column: submit -> last host received with one command in the whole "
            "cluster at a time",
            f"{'hosts':>5} {'shape':<8} {'ms':>6} {'busy':>6} {'steady':>6} {'comp/s':>9} "
            f"{'ctl ms/comp':>11} "
            f"{'submit->ordered':>16} {'ordered->last recv':>19} {'last recv->start':>17} "
            f"{'alone':>13}"]
    for p in report["points"]:
        died = (f" [the controller exited with {p['controller_exit_code']}]"
                if p.get("controller_exit_code") is not None else "")
        if p.get("busy") is None:
            rows.append(f"{p['hosts']:>5} {p['shape']:<8} {p['target_ms']:>6g}  "
                        f"{p.get('error', 'no computations')}{died}")
            continue
        def pair(key: str, figures: str = "latency_ms") -> str:
            value = (p.get(figures) or {}).get(key)
            return f"{value['p50']:.2f}/{value['p99']:.2f}" if value else "-"
        cpu = p["controller"].get("cpu_s_per_computation")
        rows.append(f"{p['hosts']:>5} {p['shape']:<8} {p.get('computation_ms') or 0:>6.3g} "
                    f"{p['busy']:>6.3f} {p.get('busy_steady') or float('nan'):>6.3f} "
                    f"{p['computations_per_s']:>9.1f} "
                    f"{cpu * 1e3 if cpu else float('nan'):>11.3f} {pair('submit_to_ordered'):>16} "
                    f"{pair('ordered_to_last_received'):>19} {pair('last_received_to_start'):>17} "
                    f"{pair('submit_to_last_received', 'lone_latency_ms'):>13}"
                    + (" *" if p.get("error") else "") + died)
    for c in report["clusters"]:
        if c.get("error") and not c.get("controller_idle"):
            most = (c.get("controller_during_startup") or {}).get("most_threads")
            rows.append(f"{c['hosts']} hosts: did not come up: {c['error']}"
                        + (f" (controller reached {most} threads)" if most else ""))
        elif c.get("controller_idle"):
            idle = c["controller_idle"]
            ping, health = c.get("ping_round") or {}, c.get("sim_health") or {}
            rows.append(f"{c['hosts']} hosts ({c['islands']} islands): registered in "
                        f"{c['registration_s']:.1f} s; idle controller {idle['threads']} threads, "
                        f"{idle['rss_bytes'] / 2**20:.0f} MiB, {idle['cpu_fraction']:.0%} of a core"
                        + (f"; pinging every host took {ping['seconds']:.2f} s" if ping else "")
                        + (f"; {health['re_registrations']:.0f} re-registrations, loop stalls up "
                           f"to {health['longest_loop_stall_s']:.2f} s" if health else "")
                        + (f"; controller alone on CPUs {c['pinned']['controller_cpus']}"
                           if c.get("pinned") else "")
                        + (f"; {c['error']}" if c.get("error") else "")
                        + (f"; {c['gave_up']}" if c.get("gave_up") else ""))
    def shown(b: dict) -> str:
        return (f"{b['interpolated_ms']:.3g} ms (smallest measured {b['smallest_measured_ms']:g} "
                f"ms)" if b.get("interpolated_ms") is not None else "not reached")

    for b in report["break_even"]:
        rows.append(f"break-even {b['hosts']} hosts {b['shape']}: {shown(b)}; steady state "
                    f"{shown(b.get('steady') or {})}")
    return "\n".join(rows)


def format_markdown(report: dict) -> str:
    """The sweep as Markdown tables (for benchmarks/RESULTS.md): device busy and computations/s
    per host count, shape and duration; controller CPU per computation; probe latencies."""
    points = [p for p in report["points"] if p.get("busy") is not None]
    durations = sorted({p["target_ms"] for p in report["points"]})
    hosts_all = sorted({p["hosts"] for p in report["points"]})
    shapes = [s for s in SHAPES if any(p["shape"] == s for p in report["points"])]

    def cell(hosts, shape, duration, fmt):
        for p in report["points"]:
            if (p["hosts"], p["shape"], p["target_ms"]) == (hosts, shape, duration):
                if p.get("busy") is None:
                    return "failed"
                return fmt(p) + ("*" if p.get("error") else "")
        return ""

    head = "| hosts | shape | " + " | ".join(f"{d:g} ms" for d in durations) + " |"
    rule = "|---|---|" + "---|" * len(durations)
    out = []
    for title, fmt in (
            ("device busy", lambda p: f"{p['busy']:.2f}"),
            ("computations/s", lambda p: f"{p['computations_per_s']:.0f}"),
            ("controller CPU ms per computation",
             lambda p: f"{p['controller']['cpu_s_per_computation'] * 1e3:.2f}"
             if p["controller"].get("cpu_s_per_computation") else "-"),
            ("probe: submit -> last host received, p50 / p99 ms",
             lambda p: _pair(p.get("latency_ms"), "submit_to_last_received"))):
        out += [f"**{title}**", "", head, rule]
        for hosts in hosts_all:
            for shape in shapes:
                out.append(f"| {hosts} | {shape} | " + " | ".join(
                    cell(hosts, shape, d, fmt) for d in durations) + " |")
        out.append("")
    if not points:
        out.append("(no point measured)")
    out += ["**clusters** (idle: the first seconds after every host registered; ping round: this "
            "process pinging every host one after another, as the controller's heartbeat does)", "",
            "| hosts | islands | registered in | idle controller: threads, MiB, CPU | ping round "
            "| re-registrations | outcome |", "|---|---|---|---|---|---|---|"]
    for c in report["clusters"]:
        idle, ping = c.get("controller_idle"), c.get("ping_round")
        most = (c.get("controller_during_startup") or {}).get("most_threads")
        health = c.get("sim_health") or {}
        out.append(
            f"| {c['hosts']} | {c['islands']} | "
            + (f"{c['registration_s']:.1f} s" if c.get("registration_s") else "-") + " | "
            + (f"{idle['threads']}, {idle['rss_bytes'] / 2**20:.0f}, {idle['cpu_fraction']:.0%}"
               if idle else f"(reached {most} threads)" if most else "-") + " | "
            + (f"{ping['seconds']:.2f} s" if ping else "-") + " | "
            + f"{health.get('re_registrations', 0):.0f} | "
            + "; ".join(x for x in (c.get("error"), c.get("ended_by"), c.get("gave_up")) if x)
            .replace("|", "/")[:240] + " |")
    return "\n".join(out)


def _pair(latency: dict | None, key: str) -> str:
    value = (latency or {}).get(key)
    return f"{value['p50']:.1f} / {value['p99']:.1f}" if value else "-"


def main(argv: list[str] | None = None) -> None:
    """Re-plots a scale.json and prints its table: python -m benchmarks.scale_plot DIR/scale.json
    [--markdown]."""
    import argparse
    import json

    parser = argparse.ArgumentParser(description=main.__doc__)
    parser.add_argument("report", help="a scale.json written by pathways bench scale")
    parser.add_argument("--markdown", action="store_true", help="print Markdown tables")
    args = parser.parse_args(argv)
    with open(args.report) as f:
        report = json.load(f)
    plot_scale(report, pathlib.Path(args.report).parent)
    print(format_markdown(report) if args.markdown else format_table(report))


if __name__ == "__main__":
    main()
