"""`pathways bench dispatch`: the Pathways paper's §5.1 dispatch benchmark, all systems, one run.

Runs the runtime (a one-island worker subprocess behind the controller), in-process multi-device
JAX, and Ray actors (when Ray is installed) on the same chained computation, in the three program
shapes, then sweeps the computation size to find the runtime's break-even size. Writes
DIR/dispatch.json and DIR/dispatch.png, prints a table.
"""

from __future__ import annotations

import argparse
import json
import math
import pathlib
import sys
import time
from typing import Any

TARGETS = {  # issue targets on this machine, checked in the report (ratios from one run)
    "fused_vs_jax_fused": 0.9,
    "chained_vs_jax_opbyop": 1.0,
    "opbyop_vs_ray_opbyop": 3.0,
    "break_even_ms": 1.0,
}


def _rate(report: dict[str, Any], system: str, shape: str) -> float | None:
    for record in report["results"]:
        if (record["system"], record["shape"]) == (system, shape):
            return record["computations_per_s"]
    return None


def target_ratios(report: dict[str, Any]) -> dict[str, float | None]:
    """The ratios the targets are stated in, computed from one run's results."""
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


def run(args: argparse.Namespace) -> int:
    import jax

    from benchmarks import dispatch_baselines as db

    out = pathlib.Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    started = time.time()

    def progress(message: str) -> None:
        print(f"[{time.time() - started:6.1f} s] {message}", flush=True)

    systems: dict[str, Any] = {}
    try:
        if not args.no_ray:
            try:
                progress("starting Ray actors (loopback)")
                systems["ray"] = db.RaySystem(args.devices)  # before JAX starts its threads
            except ImportError:
                progress("Ray is not installed (pip install -e '.[ray]'): skipping the ray system")
        jax.config.update("jax_num_cpu_devices", args.devices)
        from benchmarks.dispatch_runtime import RuntimeSystem

        progress(f"starting a one-island runtime cluster with {args.devices} CPU devices")
        systems = {"runtime": RuntimeSystem(args.devices),
                   "jax": db.JaxSystem(jax.devices()[:args.devices]), **systems}
        if not args.no_proxy:
            from benchmarks.dispatch_proxy import ProxySystem

            progress("starting plain JAX through the proxy (a second one-island cluster)")
            systems["proxy"] = ProxySystem(args.devices)
        for system in systems.values():
            db.check_system(system)  # every system computes the same chain values
        ks = db.SWEEP_KS if not args.quick else (0, 4, 16)
        report = db.run_dispatch_benchmark(systems, target_s=args.target_s, ks=ks,
                                           progress=progress)
    finally:
        for system in systems.values():
            system.close()
    report["targets"] = TARGETS
    report["ratios"] = target_ratios(report)
    if "proxy" in systems and report["sweep"]:
        from benchmarks.dispatch_proxy import proxy_figures

        report.update(proxy_figures(report))
    if report.get("break_even_ms") is not None and math.isinf(report["break_even_ms"]):
        report["break_even_ms"] = None  # JSON has no infinity: null means never reached
    from benchmarks.dispatch_plot import format_table, plot_dispatch

    with open(out / "dispatch.json", "w") as f:
        json.dump(report, f, indent=1)
    plot_dispatch(report, out / "dispatch.png")
    print(format_table(report))
    for name, value in report["ratios"].items():
        shown = "n/a" if value is None else f"{value:.3g}"
        print(f"  {name:<24} {shown:>8}   (target {'<=' if name == 'break_even_ms' else '>='} "
              f"{TARGETS[name]})")
    if "proxy_vs_runtime" in report:
        shapes = ", ".join(f"{k} {v:.3g}" for k, v in report["proxy_vs_runtime"].items())
        print(f"  proxy / client API: {shapes}; proxy break-even (ms): "
              f"{report['proxy_break_even_ms']}")
    print(f"wrote {out / 'dispatch.json'} and {out / 'dispatch.png'}")
    return 0


def add_parser(bench: argparse._SubParsersAction) -> None:
    p = bench.add_parser("dispatch", help="dispatch throughput: runtime vs in-process JAX vs Ray",
                         description=__doc__)
    p.add_argument("--out", required=True, help="directory for dispatch.json and dispatch.png")
    p.add_argument("--devices", type=int, default=4, help="simulated CPU devices in the slice")
    p.add_argument("--target-s", type=float, default=1.0,
                   help="seconds per measurement (the whole run takes ~40x this)")
    p.add_argument("--no-ray", action="store_true", help="skip the Ray baseline")
    p.add_argument("--no-proxy", action="store_true",
                   help="skip plain JAX through the proxy (runtime.proxy)")
    p.add_argument("--quick", action="store_true", help="fewer sizes in the sweep")
    p.set_defaults(func=run)


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    add_parser(parser.add_subparsers(required=True))
    sys.exit(run(parser.parse_args(["dispatch"] + sys.argv[1:])))
