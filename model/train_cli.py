"""`pathways train` (PaLM two-pod training through the controller) and `pathways generate`."""

from __future__ import annotations

import argparse
import json
import sys


def _mesh(text: str) -> tuple[int, int]:
    try:
        data, model = (int(n) for n in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"mesh must look like 2x1 (data x model), got {text!r}")
    return data, model


def _run_train(args: argparse.Namespace) -> int:
    import jax

    import runtime
    from model.config import get_config
    from model.pods import TrainSettings

    config = get_config(args.config)
    settings = TrainSettings(config, global_batch=args.global_batch, islands=args.islands,
                             mesh_shape=args.mesh, seed=args.seed)
    devices = args.mesh[0] * args.mesh[1]
    hosts = args.hosts_per_island
    if hosts < 1 or devices % hosts or (hosts > 1 and args.in_process):
        print(f"error: --hosts-per-island {hosts} must divide the mesh's {devices} devices (and "
              f"needs worker processes, not --in-process)", file=sys.stderr)
        return 2
    if args.resume and not args.checkpoint_dir:
        print("error: --resume needs --checkpoint-dir", file=sys.stderr)
        return 2
    cluster = None
    if args.address:
        address = args.address
    elif args.in_process:
        jax.config.update("jax_num_cpu_devices", args.islands * devices)
        cluster = runtime.LocalCluster(args.islands, devices)
        address = cluster.address
    elif args.ray is not None:
        from runtime._ray import RayCluster

        cluster = RayCluster(args.islands, hosts, devices // hosts, ray_address=args.ray or None,
                             max_host_restarts=args.max_restarts)
        address = cluster.address
    else:
        cluster = runtime.ProcessCluster(args.islands, hosts, devices // hosts)
        address = cluster.address
    credentials = getattr(cluster, "credentials", None)
    try:
        restarts = 0
        while True:
            try:
                return _train(args, settings, address, credentials,
                              resume=args.resume or restarts > 0, cluster=cluster,
                              inject_fault=restarts == 0)
            except runtime.HostLostError as exc:
                # A lost worker: with a local cluster and checkpoints, restart its island and go
                # on from the last checkpoint (the same steps again give the same parameters).
                restartable = cluster is not None and hasattr(cluster, "restart_lost_islands")
                if not (restartable and args.checkpoint_dir) or restarts >= args.max_restarts:
                    raise
                restarts += 1
                print(f"lost a worker ({exc}); restarting its island and resuming from the last "
                      f"checkpoint (restart {restarts} of at most {args.max_restarts})",
                      file=sys.stderr, flush=True)
                cluster.restart_lost_islands()
    finally:
        if cluster is not None:
            cluster.close()


def _train(args: argparse.Namespace, settings, address: str, credentials, *, resume: bool,
           cluster, inject_fault: bool) -> int:
    """One training attempt on the cluster at `address` (HostLostError if a worker goes away)."""
    from tqdm import tqdm

    import runtime
    from model import checkpoint
    from model.pods import PodTrainer

    config = settings.config
    extra = {"credentials": credentials} if credentials is not None else {}
    with runtime.Client(address, name="pathways-train", **extra) as client:
        trainer = PodTrainer(client, settings)
        start = 0
        if resume and args.checkpoint_dir and checkpoint.latest(args.checkpoint_dir) is not None:
            start = trainer.restore(args.checkpoint_dir)
            print(f"resumed from step {start} ({checkpoint.latest(args.checkpoint_dir)})")
        else:
            trainer.initialize()
        todo = max(0, args.steps - start)
        bar = tqdm(total=todo, desc=f"{config.name} x{settings.islands} islands", unit="step",
                   disable=args.quiet)
        history = []

        def on_step(result):
            history.append({"step": result.step, "loss": result.loss,
                            "tokens_per_s": result.tokens / max(result.seconds, 1e-9)})
            bar.set_postfix(step=result.step, loss=f"{result.loss:.4f}",
                            tok_s=f"{history[-1]['tokens_per_s']:,.0f}")
            bar.update(1)
            if inject_fault and args.kill_worker_at_step == result.step and cluster is not None:
                _kill_last_worker(cluster)

        trainer.run(todo, on_step=on_step, checkpoint_dir=args.checkpoint_dir,
                    checkpoint_every=args.checkpoint_every)
        bar.close()
        if args.checkpoint_dir:
            print(f"checkpoint: {trainer.save(args.checkpoint_dir)}")
        if args.json:
            print(json.dumps({"config": config.name, "islands": settings.islands,
                              "final_step": trainer.step, "history": history}))
        elif history:
            print(f"step {history[-1]['step']}: loss {history[-1]['loss']:.4f}")
    return 0


def _kill_last_worker(cluster) -> None:
    """Fault injection (--kill-worker-at-step): SIGKILLs the last island's worker process."""
    import os
    import signal

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

    from model import checkpoint
    from model.config import get_config
    from model.generate import generate
    from model.palm import init_params
    from model.tokenizer import Tokenizer
    from model.training import init_opt_state

    folder = checkpoint.latest(args.checkpoint)
    if folder is None:
        print(f"error: no checkpoint under {args.checkpoint}", file=sys.stderr)
        return 1
    with open(folder / checkpoint.META_FILE) as f:
        config = get_config(json.load(f)["config"])

    def abstract():
        params = init_params(config, jax.random.key(0))
        return {"params": params, "opt_state": init_opt_state(params, config)}

    tree, meta = checkpoint.load(folder, jax.eval_shape(abstract))
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
    p = subparsers.add_parser(
        "train", help="train PaLM through the controller (PaLM's two-pod scheme)",
        description="Train a PaLM preset on island workers: each island runs forward and backward on "
                    "its half of the global batch, gradients cross between islands host to host, each "
                    "island applies the update to both halves' gradients. Starts a local cluster "
                    "unless --address names a running controller.")
    p.add_argument("--config", default="palm-tiny", help="PaLM preset (pathways model --list)")
    p.add_argument("--islands", type=int, default=2, choices=(1, 2), help="islands (pods)")
    p.add_argument("--steps", type=int, default=20, help="train until this global step")
    p.add_argument("--global-batch", type=int, default=8, help="sequences per step, all islands")
    p.add_argument("--mesh", type=_mesh, default=(2, 1), help="per-island mesh, data x model")
    p.add_argument("--seed", type=int, default=0, help="parameter and data seed")
    p.add_argument("--checkpoint-dir", help="where to write checkpoints")
    p.add_argument("--checkpoint-every", type=int, default=0, help="checkpoint every K steps")
    p.add_argument("--resume", action="store_true", help="continue from the newest checkpoint")
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
    p.add_argument("--json", action="store_true", help="print the loss history as JSON at the end")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=_run_train)

    g = subparsers.add_parser(
        "generate", help="sample text from a checkpoint (KV-cache, multi-query decoding)",
        description="Decode text after a prompt from a `pathways train` checkpoint.")
    g.add_argument("--checkpoint", required=True, help="checkpoint folder (or a folder of them)")
    g.add_argument("--prompt", required=True, help="text to continue")
    g.add_argument("--max-new-tokens", type=int, default=64, help="tokens to generate")
    g.add_argument("--temperature", type=float, default=0.0, help="0 for greedy decoding")
    g.add_argument("--seed", type=int, default=0, help="sampling seed")
    g.set_defaults(func=_run_generate)
