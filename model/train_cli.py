"""`pathways train` (PaLM's multi-pod training through the controller) and `pathways generate`."""

from __future__ import annotations

import argparse
import dataclasses
import json
import signal
import sys
from typing import Any

EXIT_INTERRUPTED = 130


def _mesh(text: str):
    from model.partitioning import PodMesh

    sizes = text.lower().split("x")
    if len(sizes) == 2 and all(size.isdigit() for size in sizes):  # the older AxB form
        return PodMesh((("fsdp", int(sizes[0])), ("model", int(sizes[1]))))
    try:
        return PodMesh.parse(text)
    except ValueError as err:
        raise argparse.ArgumentTypeError(str(err)) from None


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text}")
    return value


def resolve_config(name: str, overrides: list[str]):
    """The preset `name` with `key=value` overrides; ValueError with a clean message otherwise."""
    import difflib

    from model.config import get_config, list_configs
    from model.overrides import apply_overrides

    try:
        config = get_config(name)
    except KeyError:
        close = difflib.get_close_matches(name, list_configs(), n=3)
        hint = f"; did you mean {', '.join(close)}?" if close else ""
        raise ValueError(f"unknown config {name!r}{hint} (pathways model --list)") from None
    return apply_overrides(config, overrides)


class _StopOnInterrupt:
    """SIGINT handler: the first Ctrl-C asks the loop to stop after the step in flight (so no
    write or transfer is cut off half way); a second one aborts at once."""

    def __init__(self) -> None:
        self.requested = False

    def __call__(self, signum, frame) -> None:
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True
        print("\nCtrl-C: stopping after the step in flight (Ctrl-C again to abort)",
              file=sys.stderr, flush=True)


@dataclasses.dataclass
class _Progress:
    """What a Ctrl-C report needs from the attempt in flight."""

    step: int = 0
    store: Any = None
    stop: _StopOnInterrupt = dataclasses.field(default_factory=_StopOnInterrupt)


def _run_train(args: argparse.Namespace) -> int:
    from model.partitioning import LayoutError, check_layout, layout
    from model.pods import TrainSettings, check_batches

    try:
        config = resolve_config(args.config, args.overrides)
        if args.global_batch is not None and config.batch_ramp:
            config = config.replace(batch_ramp=())  # an explicit batch replaces the ramp
        settings = TrainSettings(config, global_batch=args.global_batch or 8, islands=args.islands,
                                 mesh_shape=args.mesh.shape, mesh_axes=args.mesh.names,
                                 seed=args.seed, eval_sequences=args.eval_sequences)
        check_batches(settings)
        if args.strict:
            check_layout(config, args.mesh, strict=True)
    except (ValueError, LayoutError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    for unsplit in layout(config, args.mesh).unsplit:
        print(f"warning: {unsplit.message()}", file=sys.stderr)
    devices, hosts = settings.mesh.size, args.hosts_per_island
    if hosts < 1 or devices % hosts or (hosts > 1 and args.in_process):
        print(f"error: --hosts-per-island {hosts} must divide the mesh's {devices} devices (and "
              f"needs worker processes, not --in-process)", file=sys.stderr)
        return 2
    if args.resume and not args.checkpoint_dir:
        print("error: --resume needs --checkpoint-dir", file=sys.stderr)
        return 2
    if not args.checkpoint_dir:
        print("no --checkpoint-dir: nothing will be saved", file=sys.stderr, flush=True)
    server = None
    if args.metrics_port is not None:  # pathways_training_* gauges, set every step (record)
        import runtime

        try:
            server = runtime.serve_metrics(args.metrics_port)
        except runtime.PathwaysError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 2
        print(f"training metrics on http://127.0.0.1:{server.server_port}/metrics", flush=True)
    try:
        return _run_train_reporting(args, settings)
    finally:
        if server is not None:
            server.shutdown()


def _run_train_reporting(args: argparse.Namespace, settings) -> int:
    progress = _Progress()
    previous = signal.signal(signal.SIGINT, progress.stop)
    try:
        return _run_cluster(args, settings, progress)
    except KeyboardInterrupt:
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # a second Ctrl-C must not interrupt the report
        print(file=sys.stderr)
        print(_interrupted_message(args, progress), file=sys.stderr, flush=True)
        return EXIT_INTERRUPTED
    finally:
        signal.signal(signal.SIGINT, previous)


def _interrupted_message(args: argparse.Namespace, progress: _Progress) -> str:
    if progress.store is None:
        return f"interrupted at step {progress.step}; nothing was saved (no --checkpoint-dir)"
    progress.store.wait()  # the checkpoint being written finishes before we name one
    latest = progress.store.latest_step()
    if latest is None:
        return f"interrupted at step {progress.step}; no checkpoint yet in {args.checkpoint_dir}"
    return (f"interrupted at step {progress.step}; last checkpoint step_{latest} in "
            f"{args.checkpoint_dir}; continue with --resume")


def _run_cluster(args: argparse.Namespace, settings, progress: _Progress) -> int:
    import jax

    import runtime

    devices, hosts = settings.mesh.size, args.hosts_per_island
    cluster = None
    if args.address:
        address = args.address
    elif args.in_process:
        jax.config.update("jax_num_cpu_devices", args.islands * devices)
        cluster = runtime.LocalCluster(args.islands, devices)
        address = cluster.address
    else:
        # The client lays checkpoints out over devices of its own shaped like a pod's mesh.
        jax.config.update("jax_num_cpu_devices", devices)
        if args.ray is not None:
            cluster = runtime.RayCluster(args.islands, hosts, devices // hosts,
                                         ray_address=args.ray or None,
                                         max_host_restarts=args.max_restarts)
        else:
            cluster = runtime.ProcessCluster(args.islands, hosts, devices // hosts)
        address = cluster.address
    credentials = getattr(cluster, "credentials", None)
    try:
        restarts = 0
        while True:
            try:
                return _train(args, settings, address, credentials, progress, cluster=cluster,
                              inject_fault=restarts == 0, must_resume=args.resume)
            except (runtime.HostLostError, runtime.ExecutionError,
                    runtime.DeadlineExceededError) as exc:
                # A lost worker: with a local cluster and checkpoints, restart its island and go
                # on from the last checkpoint (the same steps again give the same parameters).
                # The loss may first show as a failed computation on another island (one whose
                # input came from the lost host), or as a hang there (a cross-pod input that
                # reached one of its hosts and failed on the other leaves the first in a
                # collective for good): restart only if some island did lose a host or hang.
                restartable = cluster is not None and hasattr(cluster, "restart_lost_islands")
                if not (restartable and args.checkpoint_dir) or restarts >= args.max_restarts:
                    raise
                restarted = cluster.restart_lost_islands()
                if not isinstance(exc, runtime.HostLostError) and not restarted:
                    raise  # a computation that failed or ran out of time by itself
                restarts += 1
                print(f"lost a worker ({exc}); restarting its island and resuming from the last "
                      f"checkpoint (restart {restarts} of at most {args.max_restarts})",
                      file=sys.stderr, flush=True)
    finally:
        if cluster is not None:
            cluster.close()


def _train(args: argparse.Namespace, settings, address: str, credentials, progress: _Progress, *,
           cluster, inject_fault: bool, must_resume: bool) -> int:
    """One training attempt on the cluster at `address` (HostLostError if a worker goes away)."""
    import runtime
    from model.checkpoint import CheckpointMismatchError, CheckpointStore
    from model.flops import peak_flops
    from model.pods import PodTrainer
    from model.recipe import SpikePolicy
    from model.scalars import Hooks, ProgressBar, TensorBoardScalars

    config = settings.config
    extra = {"credentials": credentials} if credentials is not None else {}
    peak = peak_flops(args.peak, config.dtype) if args.peak else None
    store = None
    if args.checkpoint_dir:
        try:
            store = progress.store = CheckpointStore(args.checkpoint_dir, config, settings.seed,
                                                     keep=args.keep)
        except CheckpointMismatchError as err:
            print(f"error: {err}", file=sys.stderr)
            return 2
    board = TensorBoardScalars(args.tensorboard_dir) if args.tensorboard_dir else None
    try:
        with runtime.Client(address, name="pathways-train", **extra) as client:
            trainer = PodTrainer(client, settings, peak_flops_per_device=peak)
            start = 0
            if store is not None and store.latest_step() is not None:
                start = trainer.restore(store)
                print(f"resumed from step {start} ({store.folder(start)})", flush=True)
            elif must_resume:
                print(f"error: --resume: no checkpoint in {args.checkpoint_dir}", file=sys.stderr)
                return 2
            else:
                trainer.initialize()
            progress.step = start
            bar = ProgressBar(f"{config.name} x{settings.islands} pods", start, args.steps,
                              disable=args.quiet)
            history: list[dict] = []
            evals: list[dict] = []

            def record(info) -> None:
                progress.step = info.step
                runtime.record_training(tokens_per_s=info.tokens_per_s, mfu=info.mfu,
                                        step=info.step, loss=info.loss)
                history.append({"step": info.step, "loss": info.loss, "batch_size": info.batch_size,
                                "tokens_per_s": info.tokens_per_s, "mfu": info.mfu,
                                "learning_rate": info.learning_rate})
                if inject_fault and args.kill_worker_at_step == info.step and cluster is not None:
                    _kill_last_worker(cluster)

            def on_eval(step: int, result: dict) -> None:
                evals.append({"step": step, **result})
                bar.write(f"step {step}: held-out loss {result['loss']:.4f}, "
                          f"perplexity {result['perplexity']:.2f}")
                if board is not None:
                    board.evaluation(step, result)

            hooks = Hooks([record, bar] + ([board] if board is not None else []))
            spikes = SpikePolicy(args.spike_factor, args.spike_window, args.spike_rewind,
                                 args.spike_skip)
            trainer.run(max(0, args.steps - start), on_step=hooks, checkpoints=store,
                        checkpoint_every=args.checkpoint_every, eval_every=args.eval_every,
                        on_eval=on_eval, spikes=spikes, stop=lambda: progress.stop.requested)
            bar.close()
            if progress.stop.requested:
                print(_interrupted_message(args, progress), file=sys.stderr, flush=True)
                return EXIT_INTERRUPTED
            return _finish(args, settings, trainer, store, history, evals)
    finally:
        if board is not None:
            board.close()
        if store is not None:
            store.close()  # waits for a checkpoint being written; still answers latest_step


def _finish(args: argparse.Namespace, settings, trainer, store, history: list[dict],
            evals: list[dict]) -> int:
    """After the last step: the final checkpoint, the pods' agreement (--verify-pods) and the
    report (--json, or the last loss); 1 if the pods disagree."""
    from model.partitioning import layout

    if store is not None:
        store.wait()
        if (store.latest_step() or 0) < trainer.step:
            trainer.save(store)
            store.wait()
        print(f"checkpoint: {store.folder(store.latest_step())}")
    agree = trainer.pods_agree() if args.verify_pods else None
    if agree is False:
        print(f"error: the {settings.islands} pods hold different parameters", file=sys.stderr)
    if args.json:
        report = {"config": settings.config.name, "islands": settings.islands,
                  "final_step": trainer.step, **layout(settings.config, settings.mesh).as_json(),
                  "history": history, "evals": evals}
        if agree is not None:
            report["pods_bitwise_equal"] = agree
        print(json.dumps(report))
    else:
        if history:
            print(f"step {history[-1]['step']}: loss {history[-1]['loss']:.4f}")
        if agree:
            print(f"the {settings.islands} pods hold bitwise-identical parameters and optimizer "
                  "state")
    return 1 if agree is False else 0


def _kill_last_worker(cluster) -> None:
    """Fault injection (--kill-worker-at-step): SIGKILLs the last island's worker process."""
    import os

    if hasattr(cluster, "kill_worker") and hasattr(cluster, "hosts"):  # RayCluster
        island, host = max(cluster.hosts())
        print(f"fault injection: killing worker actor of host {island}.{host}", file=sys.stderr,
              flush=True)
        cluster.kill_worker(island, host)
        return
    procs = getattr(cluster, "procs", None)
    if not procs:
        raise RuntimeError("--kill-worker-at-step needs worker processes (not --in-process)")
    print(f"fault injection: killing worker process {procs[-1].pid}", file=sys.stderr, flush=True)
    os.kill(procs[-1].pid, signal.SIGKILL)


def _run_generate(args: argparse.Namespace) -> int:
    import jax
    import numpy as np

    from model.checkpoint import read_latest
    from model.generate import generate
    from model.tokenizer import Tokenizer

    try:
        config, _, tree = read_latest(args.checkpoint)
    except FileNotFoundError:
        print(f"error: no checkpoint under {args.checkpoint}", file=sys.stderr)
        return 1
    tokenizer = Tokenizer()
    prompt = tokenizer.encode(args.prompt)
    if not prompt:
        print("error: the prompt is empty", file=sys.stderr)
        return 2
    room = config.seq_len - len(prompt)
    new = min(args.max_new_tokens, room)
    if new <= 0:
        print(f"error: the prompt fills the {config.seq_len}-token context", file=sys.stderr)
        return 2
    run = jax.jit(generate, static_argnames=("config", "max_new_tokens", "temperature"))
    tokens = run(tree["params"], np.asarray([prompt], np.int32), config, new, args.temperature,
                 jax.random.key(args.seed))
    print(tokenizer.decode(np.asarray(tokens)[0].tolist()))
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    """Adds `train` and `generate` to the `pathways` command."""
    from model.partitioning import PodMesh
    from model.recipe import SpikePolicy

    spike = SpikePolicy()
    p = subparsers.add_parser(
        "train", help="train PaLM through the controller (PaLM's multi-pod scheme)",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
        description="Train a PaLM preset on island workers: each pod (island) runs forward and "
                    "backward on its share of the global batch on a 2-D mesh (fsdp x model), the "
                    "pods average gradients host to host, and each applies the same update. "
                    "Starts a local cluster unless --address names a running controller. "
                    "Config fields can be overridden as key=value (e.g. n_layers=4 "
                    "optimizer.peak_learning_rate=5e-3 dropout_rate=0.1 batch_ramp=0:4,20:8).")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="config field overrides")
    p.add_argument("--config", default="palm-tiny", help="PaLM preset (pathways model --list)")
    p.add_argument("--islands", type=_positive, default=2, help="islands (pods)")
    p.add_argument("--steps", type=int, default=20, help="train until this global step")
    p.add_argument("--global-batch", type=_positive, default=None,
                   help="sequences per step, all pods (default: the config's batch ramp, else 8)")
    p.add_argument("--mesh", type=_mesh, default=PodMesh.parse("fsdp=2,model=1"),
                   help="each pod's mesh: sizes of data, fsdp and model, e.g. fsdp=2,model=2 "
                        "(AxB means fsdp=A,model=B)")
    p.add_argument("--strict", action="store_true",
                   help="refuse a mesh that leaves a parameter dimension unsplit")
    p.add_argument("--seed", type=int, default=0, help="parameter and data seed")
    p.add_argument("--checkpoint-dir", help="where to write checkpoints; a run resumes from the "
                                            "newest one there")
    p.add_argument("--checkpoint-every", type=int, default=100, help="checkpoint every K steps")
    p.add_argument("--keep", type=_positive, default=3, help="checkpoints to keep")
    p.add_argument("--resume", action="store_true",
                   help="insist on resuming (fail when --checkpoint-dir holds no checkpoint)")
    p.add_argument("--eval-every", type=int, default=0,
                   help="held-out loss and perplexity every K steps (0: never)")
    p.add_argument("--eval-sequences", type=int, default=0,
                   help="held-out sequences per evaluation (0: one global batch)")
    p.add_argument("--spike-factor", type=float, default=spike.factor,
                   help="a loss above this multiple of the recent median is a spike (0: off)")
    p.add_argument("--spike-window", type=_positive, default=spike.window,
                   help="losses in the recent median")
    p.add_argument("--spike-rewind", type=int, default=spike.rewind,
                   help="restart from a checkpoint about this many steps before a spike")
    p.add_argument("--spike-skip", type=int, default=spike.skip,
                   help="data batches to skip after such a restart")
    p.add_argument("--tensorboard-dir", help="write TensorBoard scalars here")
    p.add_argument("--peak", help="peak FLOP/s per device (a number or a device kind such as "
                                  "tpu-v4) for the MFU of each step")
    p.add_argument("--address", help="use the controller at HOST:PORT instead of a local cluster")
    p.add_argument("--hosts-per-island", type=int, default=1,
                   help="worker hosts per island of the cluster it starts (they split the mesh's "
                        "devices and form one JAX distributed system)")
    p.add_argument("--ray", nargs="?", const="", default=None, metavar="ADDRESS",
                   help="start the hosts as Ray actors (pathways up --ray): on the Ray cluster at "
                        "ADDRESS, or a local Ray instance")
    p.add_argument("--in-process", action="store_true",
                   help="run the local cluster's workers in this process (faster start)")
    p.add_argument("--max-restarts", type=int, default=3,
                   help="with a cluster it starts and --checkpoint-dir: how often to restart an "
                        "island whose worker was lost and resume from the last checkpoint")
    p.add_argument("--kill-worker-at-step", type=int, default=-1, help=argparse.SUPPRESS)
    p.add_argument("--verify-pods", action="store_true",
                   help="at the end, fetch every pod's state and check they are bitwise equal")
    p.add_argument("--json", action="store_true",
                   help="print the run (bytes per device, loss history, evaluations) as JSON")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.add_argument("--metrics-port", type=int, default=None, metavar="P",
                   help="serve this process's Prometheus metrics (pathways_training_*: step, "
                        "loss, tokens/s, MFU) at http://127.0.0.1:P/metrics (0: any free port)")
    p.set_defaults(func=_run_train)

    g = subparsers.add_parser(
        "generate", help="sample text from a checkpoint (KV-cache, multi-query decoding)",
        description="Decode text after a prompt from a `pathways train` checkpoint directory.")
    g.add_argument("--checkpoint", required=True, help="a --checkpoint-dir of pathways train")
    g.add_argument("--prompt", required=True, help="text to continue")
    g.add_argument("--max-new-tokens", type=int, default=64, help="tokens to generate")
    g.add_argument("--temperature", type=float, default=0.0, help="0 for greedy decoding")
    g.add_argument("--seed", type=int, default=0, help="sampling seed")
    g.set_defaults(func=_run_generate)
