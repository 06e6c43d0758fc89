"""`pathways bench utilization`: MFU, HFU and device busy time of PaLM training on the runtime.

One run, so every ratio compares like with like on this machine:

1. peak FLOP/s: the device table, or for CPUs a calibration (best of a sweep of large matmuls in the
   benchmark's dtype) over the same devices;
2. in-process JAX: the same training step (components A and B on the whole global batch) jitted in
   this process on all the devices (`inprocess_tokens_per_s`), plus XLA's FLOP count of that step;
3. one island holding all the devices, through the controller (`one_island_tokens_per_s`);
4. two islands with half the devices each, PaLM's two-pod scheme (`tokens_per_s`, MFU, HFU, device
   busy from the hosts' timelines, idle time attributed, a Perfetto trace).
"""

from __future__ import annotations

import argparse
import json
import pathlib
import sys
import time
from typing import Any

import numpy as np

from benchmarks import utilization_timeline as tl


def _log(message: str, started: float) -> None:
    print(f"[{time.time() - started:6.1f} s] {message}", flush=True)


def inprocess_step(config, settings, devices, abstract: bool = False):
    """(jitted A+B step on one mesh of `devices`, params, opt_state, batch sharding); with
    `abstract`, params and opt_state are ShapeDtypeStructs (for lowering only)."""
    import jax
    from jax.sharding import NamedSharding
    from jax.sharding import PartitionSpec as P

    from model.palm import init_params, param_partition_specs
    from model.sharding import make_mesh
    from model.training import init_opt_state, train_step

    mesh = make_mesh((len(devices), 1), ("data", "model"), devices)
    specs = param_partition_specs(config, mesh)
    named = jax.tree.map(lambda s: NamedSharding(mesh, s), specs,
                         is_leaf=lambda s: isinstance(s, P))
    state_sh = (named, {"momentum": named, "second_moment": named})
    batch_sh = NamedSharding(mesh, P("data"))
    rep = NamedSharding(mesh, P())

    def step(params, opt_state, batch, i):
        with jax.sharding.use_abstract_mesh(mesh.abstract_mesh):
            params, opt_state, loss = train_step(params, opt_state, batch, i, config)
        return params, opt_state, loss

    jitted = jax.jit(step, in_shardings=(*state_sh, batch_sh, rep),
                     out_shardings=(*state_sh, rep), donate_argnums=(0, 1))
    init = jax.jit(lambda k: init_params(config, k), out_shardings=named)
    if abstract:
        params = init.eval_shape(jax.random.key(settings.seed))
        params = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                              params, named)
        opt_state = {k: params for k in ("momentum", "second_moment")}
        opt_state = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, np.float32,
                                                                sharding=a.sharding), opt_state)
        return jitted, params, opt_state, batch_sh
    params = init(jax.random.key(settings.seed))
    opt_state = jax.device_put(init_opt_state(params, config), state_sh[1])
    return jitted, params, opt_state, batch_sh


def xla_flops_per_step(config, settings, devices) -> float:
    """XLA's FLOP count of the training step (HLO cost analysis of the lowered step, nothing
    allocated). The layer scan is unrolled for it: XLA counts a loop body once whatever the trip
    count."""
    import jax

    jitted, params, opt_state, batch_sh = inprocess_step(
        config.replace(unroll_layers=True), settings, devices, abstract=True)
    batch = {k: jax.ShapeDtypeStruct((settings.global_batch, config.seq_len), np.int32,
                                     sharding=batch_sh) for k in ("inputs", "targets")}
    cost = jitted.lower(params, opt_state, batch, np.int32(0)).cost_analysis()
    return float((cost[0] if isinstance(cost, (list, tuple)) else cost)["flops"])


def measure_inprocess(config, settings, devices, steps: int, warmup: int) -> dict[str, float]:
    """Tokens/s of the step jitted in this process, and XLA's FLOPs per step."""
    import jax

    from model.pods import global_batch

    jitted, params, opt_state, batch_sh = inprocess_step(config, settings, devices)
    batches = [jax.device_put(global_batch(settings, i), batch_sh) for i in range(warmup + steps)]
    compiled = jitted.lower(params, opt_state, batches[0], np.int32(0)).compile()
    for i in range(warmup):
        params, opt_state, loss = compiled(params, opt_state, batches[i], np.int32(i))
    jax.block_until_ready(loss)
    start = time.perf_counter()
    for i in range(warmup, warmup + steps):
        params, opt_state, loss = compiled(params, opt_state, batches[i], np.int32(i))
    jax.block_until_ready((params, loss))
    seconds = time.perf_counter() - start
    tokens = settings.global_batch * config.seq_len
    return {"tokens_per_s": tokens * steps / seconds,
            "xla_flops_per_step": xla_flops_per_step(config, settings, devices),
            "loss": float(loss)}


def measure_runtime(settings, islands: int, devices_per_island: int, steps: int, warmup: int,
                    platform: str, on_step=None, started: float = 0.0) -> dict[str, Any]:
    """Trains through the controller; tokens/s over the steady state and the hosts' timelines."""
    import runtime
    from model.pods import PodTrainer, TrainSettings
    from proto import pathways_pb2 as pb

    mesh = (devices_per_island, 1)
    run_settings = TrainSettings(settings.config, settings.global_batch, islands, mesh, settings.seed)
    with runtime.ProcessCluster(islands, 1, devices_per_island, platform=platform) as cluster:
        with runtime.Client(cluster.address, name="bench-utilization") as client:
            trainer = PodTrainer(client, run_settings)
            trainer.initialize()
            seen: list[tuple[float, Any]] = []
            dispatches: list[tuple[str, float]] = []

            def record(result):
                seen.append((time.time(), result))
                dispatches.append((f"step {result.step}", time.time()))
                if on_step is not None:
                    on_step(result, seen)

            trainer.run(warmup + steps, on_step=record)
            client.fetch([state[2] for state in trainer.states], timeout=600)
            tokens = settings.global_batch * settings.config.seq_len
            timelines = []
            for h in client.status().hosts:
                stub = client._worker_stub(h.address)
                reply = stub.GetTimeline(pb.GetTimelineRequest(), timeout=30)
                timelines.append(tl.HostTimeline(reply.island, reply.host, tuple(reply.events)))
            losses = [r.loss for _, r in seen]
    # Steps end when component B ends on the first host (device clock, not the client's, which
    # reads losses a step behind); the steady state runs from the end of step `warmup - 1`.
    ends = sorted(e.end for e in timelines[0].events if e.name == "component_b")
    steady = ends[max(0, warmup - 1):]
    t0, t1 = steady[0], steady[-1]
    return {"tokens_per_s": tokens * (len(steady) - 1) / (t1 - t0), "window": (t0, t1),
            "timelines": timelines, "losses": losses, "dispatches": dispatches,
            "step_times": ends}


def run(args: argparse.Namespace) -> int:
    import jax

    from benchmarks.peak import calibrate_cpu_peak, peak_flops_for
    from model.config import get_config
    from model.flops import FlopsModel, utilization
    from model.pods import TrainSettings
    from runtime import record_training

    started = time.time()
    out = pathlib.Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    total = args.islands * args.devices_per_island
    if args.platform == "cpu":
        jax.config.update("jax_num_cpu_devices", total)
    overrides = {"dtype": args.dtype} if args.dtype else {}
    config = get_config(args.config, **overrides)
    settings = TrainSettings(config, global_batch=args.global_batch, islands=args.islands,
                             mesh_shape=(args.devices_per_island, 1), seed=0)
    devices = jax.devices(args.platform)[:total]
    metrics = None
    if args.metrics_port is not None:
        from runtime import serve_metrics

        metrics = serve_metrics(args.metrics_port)
        _log(f"Prometheus metrics on http://127.0.0.1:{metrics.server_port}/metrics", started)

    _log(f"{config.name}: calibrating peak FLOP/s ({config.dtype}) on {total} {args.platform} "
         f"devices", started)
    if args.platform == "cpu":
        peak, peak_source = calibrate_cpu_peak(config.dtype, devices=devices)
    else:
        per_chip, peak_source = peak_flops_for(devices[0].device_kind, config.dtype)
        peak = per_chip * total
    flops = FlopsModel.from_config(config)
    tokens_per_step = args.global_batch * config.seq_len

    _log("in-process JAX: the same step jitted in this process", started)
    inproc = measure_inprocess(config, settings, devices, args.steps, args.warmup)
    _log(f"  {inproc['tokens_per_s']:,.0f} tokens/s", started)
    one = None
    if args.islands > 1:
        _log(f"runtime, one island of {total} devices", started)
        one = measure_runtime(settings, 1, total, args.steps, args.warmup, args.platform)
        _log(f"  {one['tokens_per_s']:,.0f} tokens/s", started)

    _log(f"runtime, {args.islands} islands x {args.devices_per_island} devices "
         f"(PaLM two-pod scheme)", started)
    from tqdm import tqdm

    bar = tqdm(total=args.warmup + args.steps, unit="step", desc="training", file=sys.stdout)

    def on_step(result, seen):
        rate = (tokens_per_step / (seen[-1][0] - seen[-2][0])) if len(seen) > 1 else 0.0
        mfu = utilization(flops, rate, 1, peak, config.remat).mfu
        bar.set_postfix(step=result.step, loss=f"{result.loss:.3f}", tok_s=f"{rate:,.0f}",
                        mfu=f"{mfu:.1%}")
        bar.update(1)
        record_training(tokens_per_s=rate, mfu=mfu, step=result.step, loss=result.loss)

    two = measure_runtime(settings, args.islands, args.devices_per_island, args.steps,
                          args.warmup, args.platform, on_step, started)
    bar.close()
    start, end = two["window"]
    busy = [tl.host_busy(t, start, end) for t in two["timelines"]]
    device_busy = float(np.mean([b.utilization for b in busy]))
    util = utilization(flops, two["tokens_per_s"], 1, peak, config.remat)
    report = build_report(args, config, flops, peak, peak_source, inproc, one, two, busy,
                          device_busy, util, tokens_per_step)
    write_outputs(out, report, two, start, end)
    print_table(report)
    if metrics is not None:
        metrics.shutdown()
    _log(f"wrote {out}/utilization.json, utilization_trace.json, utilization.png", started)
    return 0


def build_report(args, config, flops, peak, peak_source, inproc, one, two, busy, device_busy,
                 util, tokens_per_step) -> dict[str, Any]:
    xla_per_token = inproc["xla_flops_per_step"] / tokens_per_step
    tokens_per_s = two["tokens_per_s"]
    return {
        "config": config.name, "dtype": config.dtype, "remat": config.remat,
        "platform": args.platform, "islands": args.islands,
        "devices_per_island": args.devices_per_island, "global_batch": args.global_batch,
        "seq_len": config.seq_len, "steps": args.steps, "warmup_steps": args.warmup,
        "tokens_per_s": tokens_per_s, "mfu": util.mfu, "hfu": util.hfu,
        "device_busy": device_busy,
        "device_busy_per_host": {f"{b.island}.{b.host}": b.utilization for b in busy},
        "idle_attribution_s": {f"{b.island}.{b.host}": {
            "dispatch": b.idle_dispatch_s, "host_work": b.idle_host_s,
            "inputs_or_transfer": b.idle_inputs_s, "window": b.window_s} for b in busy},
        "peak_flops": peak, "peak_source": peak_source,
        "inprocess_tokens_per_s": inproc["tokens_per_s"],
        "one_island_tokens_per_s": one["tokens_per_s"] if one else None,
        "ratio_vs_inprocess": tokens_per_s / inproc["tokens_per_s"],
        "ratio_two_vs_one_island": tokens_per_s / one["tokens_per_s"] if one else None,
        "flops_per_token": {
            "model_6N_12LHQT": flops.model_flops_per_token(),
            "hardware_with_remat": flops.hardware_flops_per_token(config.remat),
            "xla_cost_analysis": xla_per_token,
            "note": "XLA's HLO cost analysis of the same step (layer scan unrolled, as XLA counts a "
                    "loop body once) counts every op: elementwise, softmax, norms, the optimizer "
                    "update. 6N + 12LHQT (PaLM Appendix B) counts the matmuls of forward and "
                    "backward only, so XLA's figure is slightly higher; both count the full "
                    "T x T attention (the causal mask halves neither).",
        },
        "inprocess_mfu": inproc["tokens_per_s"] * flops.model_flops_per_token() / peak,
        "losses": two["losses"],
    }


def write_outputs(out: pathlib.Path, report: dict, two: dict, start: float, end: float) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    with open(out / "utilization.json", "w") as f:
        json.dump(report, f, indent=1)
    origin = min((e.start for t in two["timelines"] for e in t.events), default=start)
    tl.write_trace(out / "utilization_trace.json",
                   tl.chrome_trace(two["timelines"], two["dispatches"], origin))
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(13, 4.2))
    bins = 40
    centers = [(i + 0.5) * (end - start) / bins for i in range(bins)]
    for t in two["timelines"]:
        ax1.plot(centers, tl.busy_over_time(t, start, end, bins),
                 label=f"island {t.island} host {t.host}")
    ax1.set(title="Device utilisation over time (steady state)", xlabel="seconds",
            ylabel="busy fraction", ylim=(0, 1.05))
    ax1.legend(loc="lower right")
    times = two["step_times"]
    rates = [report["global_batch"] * report["seq_len"] / (b - a) for a, b in zip(times, times[1:])]
    mfu = [r * report["flops_per_token"]["model_6N_12LHQT"] / report["peak_flops"] for r in rates]
    ax2.plot(range(1, len(mfu) + 1), mfu, marker=".")
    ax2.axhline(report["mfu"], ls="--", color="gray", label=f"steady-state MFU {report['mfu']:.1%}")
    ax2.set(title="MFU per step", xlabel="step", ylabel="MFU (of calibrated peak)", ylim=(0, 1))
    ax2.legend()
    fig.tight_layout()
    fig.savefig(out / "utilization.png", dpi=110)
    plt.close(fig)


def print_table(report: dict) -> None:
    rows = [
        ("tokens/s (runtime, two islands)", f"{report['tokens_per_s']:,.0f}"),
        ("tokens/s (in-process JAX)", f"{report['inprocess_tokens_per_s']:,.0f}"),
        ("tokens/s (runtime, one island)", f"{report['one_island_tokens_per_s'] or 0:,.0f}"),
        ("runtime / in-process", f"{report['ratio_vs_inprocess']:.3f}   (target >= 0.97)"),
        ("two islands / one island", f"{report['ratio_two_vs_one_island'] or 0:.3f}   "
                                      f"(target >= 0.97)"),
        ("device busy (steady state)", f"{report['device_busy']:.3f}   (target >= 0.98)"),
        ("MFU", f"{report['mfu']:.3f}   (target >= 0.70 of the calibrated peak)"),
        ("HFU", f"{report['hfu']:.3f}"),
        ("MFU of in-process JAX", f"{report['inprocess_mfu']:.3f}"),
        ("peak FLOP/s", f"{report['peak_flops']:.3g}  ({report['peak_source']})"),
        ("FLOPs/token 6N+12LHQT vs XLA", f"{report['flops_per_token']['model_6N_12LHQT']:.3g} vs "
                                          f"{report['flops_per_token']['xla_cost_analysis']:.3g}"),
    ]
    width = max(len(k) for k, _ in rows)
    print(f"\nPaLM {report['config']} ({report['dtype']}), {report['islands']} islands x "
          f"{report['devices_per_island']} {report['platform']} devices, global batch "
          f"{report['global_batch']} x {report['seq_len']} tokens")
    for key, value in rows:
        print(f"  {key:<{width}}  {value}")
    for host, idle in report["idle_attribution_s"].items():
        print(f"  idle on host {host}: dispatch {idle['dispatch']:.2f} s, host work "
              f"{idle['host_work']:.2f} s, inputs/transfer {idle['inputs_or_transfer']:.2f} s "
              f"of {idle['window']:.2f} s")


def add_parser(bench: argparse._SubParsersAction) -> None:
    p = bench.add_parser("utilization", help="MFU/HFU and device busy time of PaLM training",
                         description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, help="directory for JSON, trace and plots")
    p.add_argument("--config", default="palm-bench", help="PaLM preset (pathways model --list)")
    p.add_argument("--islands", type=int, default=2, help="islands (pods)")
    p.add_argument("--devices-per-island", type=int, default=2, help="devices per island")
    p.add_argument("--global-batch", type=int, default=16,
                   help="sequences per step (larger: less of each step spent moving gradients)")
    p.add_argument("--steps", type=int, default=10, help="measured steps")
    p.add_argument("--warmup", type=int, default=3, help="steps before measuring (compiles)")
    p.add_argument("--platform", choices=("cpu", "cuda"), default="cpu", help="device platform")
    p.add_argument("--dtype", choices=("float32", "bfloat16"), default=None,
                   help="compute dtype (default: the preset's)")
    p.add_argument("--metrics-port", type=int, default=None,
                   help="serve live Prometheus metrics on this port (0: any free port)")
    p.set_defaults(func=run)
