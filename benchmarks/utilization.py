"""`pathways bench utilization`: MFU, HFU and device busy time of PaLM training on the runtime.

Three systems train the same PaLM step on the same devices, and take turns in rounds (A B C, A B C,
...: at least 5 by default), so each ratio compares figures measured side by side, and a busy
machine shows up as spread across rounds instead of moving one system's figure:

- in-process JAX: the step (components A and B on the whole global batch) jitted in this process
  on all the devices;
- the runtime with one island holding all the devices;
- the runtime with the devices split over the islands, PaLM's two-pod scheme.

Every round first calibrates the peak FLOP/s (for CPUs: the best of a sweep of large matmuls in
the benchmark's dtype over the same devices; accelerators: the datasheet), and each system's MFU
in the round is taken of that round's peak. Each turn trains --round-warmup steps (labelled
warm-up) and --steps measured ones. The report gives every round's figures and, per figure, the
median over the rounds with its spread (min, max).

DIR/utilization.json is written as each phase ends (setup, each round, the end), with the
software and machine (versions, commit, CPU, cores, load average, CPU steal); the controller's and
scheduler's logs go to DIR/cluster.log and the workers' to DIR/workers.log. Deadlines are scaled by
the step time measured during setup. Also DIR/utilization.png (headline comparison against
targets) and DIR/utilization_trace.json (Perfetto trace of the last round's two-island steps).
"""

from __future__ import annotations

import argparse
import pathlib
import sys
import time
from typing import Any

from benchmarks import utilization_timeline as tl
from benchmarks.environment import (Environment, cpu_times, logs_to, machine_load, recording,
                                    spread, write_json)
from benchmarks.utilization_plot import TARGETS, plot, print_table

#: RPC deadlines: this many measured step times (at least the client's default).
DEADLINE_STEPS = 30


def _log(message: str, started: float) -> None:
    print(f"[{time.time() - started:6.1f} s] {message}", flush=True)


def run(args: argparse.Namespace) -> int:
    import jax

    from model.config import get_config
    from model.flops import FlopsModel
    from model.pods import TrainSettings

    if args.steps + min(args.round_warmup, 1) < 2 or args.warmup < 1 or args.rounds < 1:
        print("error: need --rounds >= 1, --warmup >= 1 (it compiles), and two step ends per "
              "turn to time: --steps 2, or --steps 1 with --round-warmup 1", file=sys.stderr)
        return 2
    started = time.time()
    out = pathlib.Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    total = args.islands * args.devices_per_island
    if args.platform == "cpu":
        jax.config.update("jax_num_cpu_devices", total)
    config = get_config(args.config, **({"dtype": args.dtype} if args.dtype else {}))
    settings = TrainSettings(config, global_batch=args.global_batch, islands=args.islands,
                             mesh_shape=(args.devices_per_island, 1), seed=0)
    env = Environment()
    flops = FlopsModel.from_config(config)
    report: dict[str, Any] = {
        "config": config.name, "dtype": config.dtype, "remat": config.remat,
        "platform": args.platform, "islands": args.islands,
        "devices_per_island": args.devices_per_island, "global_batch": args.global_batch,
        "seq_len": config.seq_len, "rounds_planned": args.rounds, "steps_per_round": args.steps,
        "warmup_steps_per_round": args.round_warmup, "setup_warmup_steps": args.warmup,
        "targets": TARGETS, "environment": env.record, "phase": "setup", "rounds": [],
        "logs": {"cluster": "cluster.log", "workers": "workers.log"},
    }
    json_path = out / "utilization.json"
    write_json(json_path, report)
    metrics = None
    if args.metrics_port is not None:
        from runtime import serve_metrics

        metrics = serve_metrics(args.metrics_port)
        _log(f"Prometheus metrics on http://127.0.0.1:{metrics.server_port}/metrics (hosts: "
             f"ports in workers.log)", started)
    systems: list[Any] = []
    try:
        with recording(report, json_path, env), logs_to(out / "cluster.log"):
            _setup(args, settings, flops, report, out, started, systems)
            write_json(json_path, report)
            last = _rounds(args, config, systems, flops, report, json_path, started)
            _finish(report, last, out)
            report["phase"] = "complete"
    finally:
        for system in systems:
            system.close()
        if metrics is not None:
            metrics.shutdown()
    print_table(report)
    _log(f"wrote {out}/utilization.json, utilization.png, utilization_trace.json, cluster.log, "
         f"workers.log", started)
    return 0


def _setup(args, settings, flops, report, out: pathlib.Path, started: float,
           systems: list[Any]) -> None:
    """Brings the three systems up into `systems` (the caller closes them, whatever happens),
    each compiled and warmed up by --warmup steps (labelled), and scales the deadlines by the
    slowest warmed-up step."""
    import jax
    from tqdm import tqdm

    from benchmarks.utilization_systems import (InProcessTraining, RuntimeTraining,
                                                xla_flops_per_step)
    from runtime.client.client import RPC_TIMEOUT_S

    total = args.islands * args.devices_per_island
    devices = jax.devices(args.platform)[:total]
    tokens_per_step = args.global_batch * settings.config.seq_len
    worker_log = str(out / "workers.log")
    metrics_port = 0 if args.metrics_port is not None else None
    plan = [("XLA's FLOP count of the step", None),
            ("in-process JAX: compile", lambda: InProcessTraining(settings, devices))]
    if args.islands > 1:
        plan.append((f"runtime, one island of {total} devices: start", lambda: RuntimeTraining(
            "one_island", "runtime, one island", settings, 1, total, args.platform,
            worker_log=worker_log, timeout_s=10 * RPC_TIMEOUT_S, worker_metrics_port=metrics_port)))
    plan.append((f"runtime, {args.islands} islands x {args.devices_per_island}: start",
                 lambda: RuntimeTraining("two_islands", f"runtime, {args.islands} islands",
                                         settings, args.islands, args.devices_per_island,
                                         args.platform, worker_log=worker_log,
                                         timeout_s=10 * RPC_TIMEOUT_S,
                                         worker_metrics_port=metrics_port)))
    setup: dict[str, Any] = {}
    bar = tqdm(total=len(plan) + (len(plan) - 1) * args.warmup, desc="setup", unit="task",
               file=sys.stdout)
    try:
        for description, make in plan:
            bar.set_postfix_str(description)
            if make is None:
                xla = xla_flops_per_step(settings.config, settings, devices)
                report["flops_per_token"] = _flops_per_token(flops, xla / tokens_per_step,
                                                             settings.config.remat)
                bar.update(1)
                continue
            system = make()
            systems.append(system)
            bar.update(1)
            bar.set_postfix_str(f"{system.label}: {args.warmup} warm-up steps (compiles)")
            turn = system.run(args.warmup, 0, on_step=lambda *_: bar.update(1))
            setup[system.key] = {"steps": turn.record()["steps"]}
    finally:
        bar.close()
    step_s = max(s["steps"][-1]["seconds"] for s in setup.values() if s["steps"])
    report["setup"] = setup
    report["deadline_s"] = _scale_deadlines(systems, [step_s])
    report["phase"] = "rounds"
    _log(f"setup done: last warm-up step {step_s:.2f} s at most; RPC deadlines "
         f"{report['deadline_s']:.0f} s", started)


def _scale_deadlines(systems, step_seconds) -> float:
    """Sets the runtime systems' deadlines to DEADLINE_STEPS of the slowest of `step_seconds`
    (at least the client's default); returns them."""
    from runtime.client.client import RPC_TIMEOUT_S

    deadline = max(RPC_TIMEOUT_S, DEADLINE_STEPS * max(step_seconds, default=0.0))
    for system in systems:
        if hasattr(system, "scale_deadlines"):
            system.scale_deadlines(deadline)
    return deadline


def _flops_per_token(flops, xla_per_token: float, remat) -> dict[str, Any]:
    return {
        "model_6N_12LHQT": flops.model_flops_per_token(),
        "hardware_with_remat": flops.hardware_flops_per_token(remat),
        "xla_cost_analysis": xla_per_token,
        "note": "XLA's HLO cost analysis of the same step (layer scan unrolled, as XLA counts a "
                "loop body once) counts every op: elementwise, softmax, norms, the optimizer "
                "update. 6N + 12LHQT (PaLM Appendix B) counts the matmuls of forward and "
                "backward only, so XLA's figure is slightly higher; both count the full T x T "
                "attention (the causal mask halves neither).",
    }


def _peak(args, dtype, devices) -> tuple[float, str]:
    from model.peaks import calibrate_cpu_peak, peak_flops_for

    if args.platform == "cpu":
        return calibrate_cpu_peak(dtype, devices=devices)
    per_chip, source = peak_flops_for(devices[0].device_kind, dtype)
    return per_chip * len(devices), source


def _rounds(args, config, systems, flops, report, json_path: pathlib.Path, started: float):
    """The rounds: each calibrates the peak, then every system takes its turn; the report is
    rewritten after each. Returns the last round's two-island turn (for the trace and plot)."""
    import jax
    from tqdm import tqdm

    from model.flops import utilization
    from runtime import record_training

    devices = jax.devices(args.platform)[:args.islands * args.devices_per_island]
    tokens_per_step = args.global_batch * config.seq_len
    per_turn = args.round_warmup + args.steps
    bar = tqdm(total=args.rounds * (1 + len(systems) * per_turn), desc="rounds", unit="step",
               file=sys.stdout)
    last = None
    try:
        for number in range(1, args.rounds + 1):
            since = cpu_times()
            bar.set_postfix_str(f"round {number}: calibrating the peak")
            peak, report["peak_source"] = _peak(args, config.dtype, devices)
            bar.update(1)
            record: dict[str, Any] = {"round": number, "peak_flops": peak, "systems": {}}
            for system in systems:
                bar.set_postfix_str(f"round {number}: {system.label}")
                step_clock = [time.perf_counter()]

                def on_step(result=None, system=system, clock=step_clock) -> None:
                    bar.update(1)
                    if result is not None and system.key == "two_islands":
                        now = time.perf_counter()
                        rate = tokens_per_step / max(now - clock[0], 1e-9)
                        clock[0] = now
                        record_training(tokens_per_s=rate, step=result.step, loss=result.loss,
                                        mfu=rate * flops.model_flops_per_token() / peak)

                turn = system.run(args.round_warmup, args.steps, on_step)
                util = utilization(flops, turn.tokens_per_s, 1, peak, config.remat)
                record["systems"][system.key] = {**turn.record(), "mfu": util.mfu,
                                                 "hfu": util.hfu}
                if system.key == "two_islands":
                    last = turn
            rates = {k: v["tokens_per_s"] for k, v in record["systems"].items()}
            record["ratios"] = {
                "ratio_vs_inprocess": rates["two_islands"] / rates["inprocess"],
                "ratio_two_vs_one_island": (rates["two_islands"] / rates["one_island"]
                                            if "one_island" in rates else None)}
            record["device_busy"] = record["systems"]["two_islands"].get("device_busy")
            record["machine"] = machine_load(since)
            report["deadline_s"] = _scale_deadlines(systems, [
                s["seconds"] for r in record["systems"].values() for s in r["steps"]
                if not s["warmup"]])
            report["rounds"].append(record)
            _summarize(report)
            write_json(json_path, report)
            bar.write(f"[{time.time() - started:6.1f} s] round {number}: runtime/in-process "
                      f"{record['ratios']['ratio_vs_inprocess']:.3f}, MFU "
                      f"{record['systems']['two_islands']['mfu']:.3f} (peak {peak:.3g}), load "
                      f"{record['machine']['load_average'][0]:.1f}")
    finally:
        bar.close()
    return last


def _summarize(report: dict[str, Any]) -> None:
    """Medians and spreads over the rounds so far, and the headline figures (medians)."""
    rounds = report["rounds"]
    summary: dict[str, Any] = {}
    for key in ("inprocess", "one_island", "two_islands"):
        if key in rounds[0]["systems"]:
            for figure in ("tokens_per_s", "mfu"):
                summary[f"{key}_{figure}"] = spread([r["systems"][key][figure] for r in rounds])
    for key in ("ratio_vs_inprocess", "ratio_two_vs_one_island"):
        summary[key] = spread([r["ratios"][key] for r in rounds])
    summary["device_busy"] = spread([r["device_busy"] for r in rounds])
    summary["peak_flops"] = spread([r["peak_flops"] for r in rounds])
    report["spread"] = summary
    two = rounds[-1]["systems"]["two_islands"]
    report.update({
        "tokens_per_s": summary["two_islands_tokens_per_s"]["median"],
        "mfu": summary["two_islands_mfu"]["median"],
        "hfu": spread([r["systems"]["two_islands"]["hfu"] for r in rounds])["median"],
        "device_busy": summary["device_busy"]["median"],
        "device_busy_per_host": two.get("device_busy_per_host"),
        "idle_attribution_s": two.get("idle_attribution_s"),
        "peak_flops": summary["peak_flops"]["median"],
        "inprocess_tokens_per_s": summary["inprocess_tokens_per_s"]["median"],
        "inprocess_mfu": summary["inprocess_mfu"]["median"],
        "one_island_tokens_per_s": (summary["one_island_tokens_per_s"]["median"]
                                    if "one_island_tokens_per_s" in summary else None),
        "ratio_vs_inprocess": summary["ratio_vs_inprocess"]["median"],
        "ratio_two_vs_one_island": summary["ratio_two_vs_one_island"]["median"],
    })


def _finish(report: dict[str, Any], last, out: pathlib.Path) -> None:
    """The trace of the last round's two-island steps and the figure."""
    if last is not None:
        origin = min((e.start for t in last.timelines for e in t.events), default=0.0)
        tl.write_trace(out / "utilization_trace.json", tl.chrome_trace(last.timelines, [], origin))
    plot(report, out / "utilization.png", last)


def add_parser(bench: argparse._SubParsersAction) -> None:
    p = bench.add_parser("utilization", help="MFU/HFU and device busy time of PaLM training",
                         description=__doc__)
    p.add_argument("--out", required=True, help="directory for JSON, trace, plots and logs")
    p.add_argument("--config", default="palm-bench", help="PaLM preset (pathways model --list)")
    p.add_argument("--islands", type=int, default=2, help="islands (pods)")
    p.add_argument("--devices-per-island", type=int, default=2, help="devices per island")
    p.add_argument("--global-batch", type=int, default=16,
                   help="sequences per step (larger: less of each step spent moving gradients)")
    p.add_argument("--rounds", type=int, default=5,
                   help="rounds in which the systems take turns (A B C, A B C, ...)")
    p.add_argument("--steps", type=int, default=2, help="measured steps per system per round")
    p.add_argument("--round-warmup", type=int, default=1,
                   help="warm-up steps at the start of every turn (labelled, not measured)")
    p.add_argument("--warmup", type=int, default=2,
                   help="warm-up steps of each system at setup (compiles; labelled)")
    p.add_argument("--platform", choices=("cpu", "cuda"), default="cpu", help="device platform")
    p.add_argument("--dtype", choices=("float32", "bfloat16"), default=None,
                   help="compute dtype (default: the preset's)")
    p.add_argument("--metrics-port", type=int, default=None,
                   help="serve live Prometheus metrics on this port (0: any free port)")
    p.set_defaults(func=run)
