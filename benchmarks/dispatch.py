"""`pathways bench dispatch`: the Pathways paper's §5.1 dispatch benchmark, all systems, one run.

Runs the runtime (a one-island worker subprocess behind the controller), in-process multi-device
JAX, and Ray actors (when Ray is installed) on the same chained computation, in the three program
shapes, then sweeps the computation size to find the runtime's break-even size.

The systems take turns in rounds (for each shape: runtime, JAX, Ray; --rounds of them, 5 by
default), so every ratio is taken between figures measured side by side; the report gives each
round's figures and ratios, and per ratio the median over the rounds and its spread (min, max).
DIR/dispatch.json is written after every round and at the end, with the software and machine
(versions, commit, CPU, cores, load average, CPU steal); the controller's logs go to
DIR/cluster.log, the worker's to DIR/workers.log. Also DIR/dispatch.png; prints a table. Last,
the runtime's dispatch latency per stage (p50, p99), one call at a time, as `pathways bench scale`
measures it on simulated hosts.
"""

from __future__ import annotations

import argparse
import math
import pathlib
import statistics
import sys
import time
from typing import Any

from benchmarks.environment import (Environment, cpu_times, logs_to, machine_load, recording,
                                    spread, write_json)

TARGETS = {  # issue targets on this machine, checked in the report (median ratios over rounds)
    "fused_vs_jax_fused": 0.9,
    "chained_vs_jax_opbyop": 1.0,
    "opbyop_vs_ray_opbyop": 3.0,
    "break_even_ms": 1.0,
}
RATIOS = ("fused_vs_jax_fused", "chained_vs_jax_opbyop", "opbyop_vs_ray_opbyop")


def _rate(report: dict[str, Any], system: str, shape: str) -> float | None:
    for record in report["results"]:
        if (record["system"], record["shape"]) == (system, shape):
            return record["computations_per_s"]
    return None


def target_ratios(report: dict[str, Any]) -> dict[str, float | None]:
    """The ratios the targets are stated in, computed from one set of results."""
    def ratio(a, b):
        return a / b if a is not None and b else None

    return {
        "fused_vs_jax_fused": ratio(_rate(report, "runtime", "fused"), _rate(report, "jax", "fused")),
        "chained_vs_jax_opbyop": ratio(_rate(report, "runtime", "chained"),
                                       _rate(report, "jax", "opbyop")),
        "opbyop_vs_ray_opbyop": ratio(_rate(report, "runtime", "opbyop"),
                                      _rate(report, "ray", "opbyop")),
        "break_even_ms": report.get("break_even_ms"),
    }


def measure_rounds(systems: dict[str, Any], rounds: int, target_s: float, *, on_measure=None,
                   on_round=None, shapes: tuple[str, ...] = ("opbyop", "chained", "fused")
                   ) -> list[dict[str, Any]]:
    """`rounds` rounds; in each, every shape is measured on every system in turn. Returns one
    record per round: its results (with each measurement's warm-up and timed runs), its ratios,
    the machine's load. `on_measure(label)` after each measurement, `on_round(records)` after
    each round."""
    from benchmarks import dispatch_baselines as db

    records: list[dict[str, Any]] = []
    for number in range(1, rounds + 1):
        since = cpu_times()
        results = []
        for shape in shapes:
            for name, system in systems.items():
                details: dict[str, Any] = {}
                rate = db.measure(system, shape, target_s=target_s, details=details)
                results.append({"system": name, "shape": shape, "n_devices": system.n_devices,
                                "computations_per_s": rate, **details})
                if on_measure is not None:
                    on_measure(f"round {number}: {name} {shape}")
        ratios = target_ratios({"results": results})
        ratios.pop("break_even_ms")
        records.append({"round": number, "results": results, "ratios": ratios,
                        "machine": machine_load(since)})
        if on_round is not None:
            on_round(records)
    return records


def summarize(records: list[dict[str, Any]]) -> dict[str, Any]:
    """Per system and shape the median rate over the rounds (with every round's), and per ratio
    its median and spread."""
    rates: dict[tuple[str, str], list[float]] = {}
    devices: dict[tuple[str, str], int] = {}
    for record in records:
        for r in record["results"]:
            rates.setdefault((r["system"], r["shape"]), []).append(r["computations_per_s"])
            devices[(r["system"], r["shape"])] = r["n_devices"]
    results = [{"system": system, "shape": shape, "n_devices": devices[(system, shape)],
                "computations_per_s": statistics.median(values), "rounds": values}
               for (system, shape), values in rates.items()]
    ratio_spread = {name: spread([r["ratios"][name] for r in records]) for name in RATIOS}
    return {"results": results, "spread": ratio_spread,
            "ratios": {name: s["median"] for name, s in ratio_spread.items()}}


def run(args: argparse.Namespace) -> int:
    import jax
    from tqdm import tqdm

    from benchmarks import dispatch_baselines as db
    from benchmarks.dispatch_plot import format_table, plot_dispatch

    out = pathlib.Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    started = time.time()
    env = Environment()
    json_path = out / "dispatch.json"
    report: dict[str, Any] = {"devices": args.devices, "target_s": args.target_s,
                              "rounds_planned": args.rounds, "targets": TARGETS,
                              "environment": env.record, "phase": "setup", "rounds": [],
                              "logs": {"cluster": "cluster.log", "workers": "workers.log"}}
    write_json(json_path, report)

    def progress(message: str) -> None:
        tqdm.write(f"[{time.time() - started:6.1f} s] {message}", file=sys.stdout)

    systems: dict[str, Any] = {}
    try:
        with recording(report, json_path, env), logs_to(out / "cluster.log"):
            if not args.no_ray:
                try:
                    progress("starting Ray actors (loopback)")
                    systems["ray"] = db.RaySystem(args.devices)  # before JAX starts its threads
                except ImportError:
                    progress("Ray is not installed (pip install -e '.[ray]'): skipping the ray "
                             "system")
            jax.config.update("jax_num_cpu_devices", args.devices)
            from benchmarks.dispatch_runtime import RuntimeSystem

            progress(f"starting a one-island runtime cluster with {args.devices} CPU devices")
            systems = {"runtime": RuntimeSystem(args.devices,
                                                worker_log=str(out / "workers.log")),
                       "jax": db.JaxSystem(jax.devices()[:args.devices]), **systems}
            if not args.no_proxy:
                from benchmarks.dispatch_proxy import ProxySystem

                progress("starting plain JAX through the proxy (a second one-island cluster)")
                systems["proxy"] = ProxySystem(args.devices)
            for system in systems.values():
                db.check_system(system)  # every system computes the same chain values
            ks = db.SWEEP_KS if not args.quick else (0, 4, 16)
            report["phase"] = "rounds"
            bar = tqdm(total=args.rounds * 3 * len(systems) + len(ks), desc="dispatch",
                       unit="measurement", file=sys.stdout)

            def on_measure(label: str) -> None:
                bar.set_postfix_str(label)
                bar.update(1)

            def on_round(records: list[dict[str, Any]]) -> None:
                report["rounds"] = records
                report.update(summarize(records))
                write_json(json_path, report)
                shown = ", ".join(f"{k} {v:.3g}" for k, v in records[-1]["ratios"].items()
                                  if v is not None)
                bar.write(f"[{time.time() - started:6.1f} s] round {len(records)}: {shown}")

            try:
                measure_rounds(systems, args.rounds, args.target_s, on_measure=on_measure,
                               on_round=on_round)
                report["phase"] = "sweep"

                def on_size(message: str) -> None:
                    bar.set_postfix_str(message)
                    bar.update(1)

                sweep = db.size_sweep(systems, ks, target_s=args.target_s / 2, progress=on_size)
                report["phase"] = "latency"
                bar.set_postfix_str("dispatch latency per stage")
                report["latency_ms"] = systems["runtime"].latency_probe(args.latency_rounds)
            finally:
                bar.close()
            break_even = db.break_even_ms(sweep)
            # JSON has no infinity: null means never reached.
            report.update(sweep=sweep, n_devices=args.devices, phase="complete",
                          break_even_ms=None if math.isinf(break_even) else break_even)
            report["ratios"]["break_even_ms"] = report["break_even_ms"]
            if "proxy" in systems:
                from benchmarks.dispatch_proxy import proxy_figures

                report.update(proxy_figures(report))
    finally:
        for system in systems.values():
            system.close()
    plot_dispatch(report, out / "dispatch.png")
    print(format_table(report))
    print(f"median (min - max) over {len(report['rounds'])} rounds:")
    for name in RATIOS:
        s = report["spread"][name]
        shown = "n/a" if s["median"] is None else f"{s['median']:.3g} ({s['min']:.3g} - {s['max']:.3g})"
        print(f"  {name:<24} {shown:>24}   (target >= {TARGETS[name]})")
    shown = "n/a" if report["break_even_ms"] is None else f"{report['break_even_ms']:.3g}"
    print(f"  {'break_even_ms':<24} {shown:>24}   (target <= {TARGETS['break_even_ms']})")
    if "proxy_vs_runtime" in report:
        shapes = ", ".join(f"{k} {v:.3g}" for k, v in report["proxy_vs_runtime"].items())
        print(f"  proxy / client API (medians): {shapes}; proxy break-even (ms): "
              f"{report['proxy_break_even_ms']}")
    print("runtime dispatch latency, one OpByOp call at a time (ms, p50 / p99):")
    for stage, figures in report.get("latency_ms", {}).items():
        shown = "n/a" if figures is None else f"{figures['p50']:.2f} / {figures['p99']:.2f}"
        print(f"  {stage:<26} {shown:>16}")
    print(f"wrote {out / 'dispatch.json'}, {out / 'dispatch.png'}, cluster.log, workers.log")
    return 0


def add_parser(bench: argparse._SubParsersAction) -> None:
    p = bench.add_parser("dispatch", help="dispatch throughput: runtime vs in-process JAX vs Ray",
                         description=__doc__)
    p.add_argument("--out", required=True, help="directory for dispatch.json and dispatch.png")
    p.add_argument("--devices", type=int, default=4, help="simulated CPU devices in the slice")
    p.add_argument("--target-s", type=float, default=1.0,
                   help="seconds per measurement (the whole run takes ~50x this with 5 rounds)")
    p.add_argument("--rounds", type=int, default=5,
                   help="rounds in which the systems take turns at each program shape")
    p.add_argument("--no-ray", action="store_true", help="skip the Ray baseline")
    p.add_argument("--no-proxy", action="store_true",
                   help="skip plain JAX through the proxy (runtime.proxy)")
    p.add_argument("--quick", action="store_true", help="fewer sizes in the sweep")
    p.add_argument("--latency-rounds", type=int, default=50,
                   help="OpByOp calls, one at a time, for the runtime's per-stage dispatch "
                        "latency (submit -> ordered -> host received -> execution start)")
    p.set_defaults(func=run)


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    add_parser(parser.add_subparsers(required=True))
    sys.exit(run(parser.parse_args(["dispatch"] + sys.argv[1:])))
