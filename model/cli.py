"""Command-line hooks of the model package: `pathways model` and `pathways mfu`.

The main CLI (runtime/cli/) calls `register(subparsers)`; each subcommand sets `func`, a function
of the parsed arguments returning an exit code. Everything here works by abstract evaluation
(`jax.eval_shape`), so asking about the 540B model allocates nothing.

Standalone: `python -m model.cli model --config palm-540b`.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from typing import Any

from model.config import PalmConfig, list_configs
from model.flops import FlopsModel, peak_flops, utilization
from model.palm import embedding_param_count, param_count
from model.partitioning import PodMesh
from model.peaks import PEAK_FLOPS

_SUFFIXES = {"k": 1e3, "m": 1e6, "b": 1e9, "g": 1e9, "t": 1e12}


def _count(text: str) -> int:
    """Parses '540350000000', '540.35e9' or '540.35B' into an int."""
    text = text.strip().replace("_", "").replace(",", "")
    scale = _SUFFIXES.get(text[-1:].lower())
    value = float(text[:-1]) * scale if scale else float(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected a non-negative count, got {text!r}")
    return int(round(value))


def _remat(text: str) -> str | float:
    if text in ("none", "palm", "full"):
        return text
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"--remat must be none, palm, full or a recomputed fraction of a forward pass, got {text!r}"
        ) from None


def _human(n: float) -> str:
    for unit, scale in (("E", 1e18), ("P", 1e15), ("T", 1e12), ("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(n) >= scale:
            return f"{n / scale:.2f}{unit}"
    return f"{n:.0f}"


def describe(config: PalmConfig) -> dict[str, Any]:
    """A JSON-ready summary of a config: sizes, parameter counts and FLOPs per token."""
    flops = FlopsModel.from_config(config)
    n = flops.n_params
    return {
        "name": config.name,
        "params": n,
        "params_including_norm_scales": param_count(config, include_norm_scales=True),
        "embedding_params": embedding_param_count(config),
        "non_embedding_params": n - embedding_param_count(config),
        "flops_per_token": flops.model_flops_per_token(),
        "hardware_flops_per_token": int(flops.hardware_flops_per_token(config.remat)),
        "layers": config.n_layers,
        "d_model": config.d_model,
        "heads": config.n_heads,
        "head_dim": config.head_dim,
        "kv_heads": 1,
        "d_ff": config.d_ff,
        "vocab_size": config.vocab_size,
        "seq_len": config.seq_len,
        "remat": config.remat,
        "dtype": config.dtype,
    }


def _mesh(text: str) -> PodMesh:
    try:
        return PodMesh.parse(text)
    except ValueError as err:
        raise argparse.ArgumentTypeError(str(err)) from None


def _config(name: str, overrides: Sequence[str]) -> PalmConfig:
    from model.train_cli import resolve_config

    return resolve_config(name, list(overrides))


def _run_model(args: argparse.Namespace) -> int:
    from model.partitioning import layout

    try:
        names = list_configs() if args.list else [args.config]
        configs = [_config(name, [] if args.list else args.overrides) for name in names]
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    summaries = [describe(config) for config in configs]
    if args.mesh is not None and not args.list:
        placed = layout(configs[0], args.mesh)
        summaries[0]["layout"] = placed.as_json()
        for unsplit in placed.unsplit:
            print(f"warning: {unsplit.message()}", file=sys.stderr)
    if args.json:
        print(json.dumps(summaries if args.list else summaries[0], indent=None if args.list else 2))
        return 0
    if args.list:
        print(f"{'name':<12}{'params':>10}{'layers':>8}{'d_model':>9}{'heads':>7}{'FLOPs/token':>13}")
        for s in summaries:
            print(f"{s['name']:<12}{_human(s['params']):>10}{s['layers']:>8}{s['d_model']:>9}"
                  f"{s['heads']:>7}{_human(s['flops_per_token']):>13}")
        return 0
    summary = summaries[0]
    width = max(len(key) for key in summary)
    for key, value in summary.items():
        if key == "layout":
            continue
        shown = f"{value:,} ({_human(value)})" if isinstance(value, int) and value >= 10_000 else value
        print(f"{key:<{width}}  {shown}")
    if "layout" in summary:
        placed = summary["layout"]
        print(f"{'mesh':<{width}}  {args.mesh} ({placed['devices']:,} devices per pod)")
        for key in ("param_bytes_per_device", "optimizer_bytes_per_device", "state_bytes_per_device"):
            print(f"{key:<{width}}  {placed[key]:,} ({placed[key] / 2**30:.2f} GiB)")
    return 0


def _run_mfu(args: argparse.Namespace) -> int:
    hardware = None  # hardware FLOPs per token, when XLA counts them
    try:
        if args.config:
            config = _config(args.config, args.overrides)
            if isinstance(args.remat, str):
                config = config.replace(remat=args.remat)
            flops = FlopsModel.from_config(config)
            remat = args.remat if args.remat is not None else config.remat
            if not isinstance(remat, float):
                from model.hardware_flops import xla_flops_per_token

                # The rematerialised step as XLA counts it, not a formula per policy.
                hardware = xla_flops_per_token(config)
        else:
            missing = [f"--{name}" for name in ("params", "layers", "heads", "head-dim", "seq")
                       if getattr(args, name.replace("-", "_")) is None]
            if missing:
                print(f"error: without --config, give {', '.join(missing)}", file=sys.stderr)
                return 2
            flops = FlopsModel(args.params, args.layers, args.heads, args.head_dim, args.seq, args.embedding_params)
            remat = args.remat if args.remat is not None else "none"
        peak = peak_flops(args.peak, args.dtype)
        result = utilization(flops, args.tokens_per_s, args.chips, peak, remat,
                             hardware_flops_per_token=hardware)
    except (KeyError, ValueError) as err:
        print(f"error: {err.args[0] if err.args else err}", file=sys.stderr)
        return 2
    source = (f"XLA cost analysis of the lowered step (remat={remat})" if hardware is not None
              else f"the formula (remat={remat})")
    report = {
        "mfu": result.mfu,
        "hfu": result.hfu,
        "model_flops_per_token": flops.model_flops_per_token(),
        "hardware_flops_per_token": hardware if hardware is not None else flops.hardware_flops_per_token(remat),
        "hardware_flops_source": source,
        "tokens_per_s": args.tokens_per_s,
        "chips": args.chips,
        "peak_flops_per_chip": peak,
        "remat": remat,
    }
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        print(f"MFU {100 * result.mfu:.1f}%  HFU {100 * result.hfu:.1f}%  "
              f"({_human(result.model_flops_per_s)}FLOP/s model, {_human(result.hardware_flops_per_s)}FLOP/s "
              f"hardware, of {_human(result.peak_flops_per_s)}FLOP/s peak; hardware FLOPs from {source})")
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    """Adds the `model` and `mfu` subcommands to an argparse subparsers object."""
    model = subparsers.add_parser(
        "model",
        help="describe a PaLM config: parameters, FLOPs per token, shapes",
        description="Describe a PaLM preset by abstract evaluation (no memory is allocated, even for "
        "palm-540b). Parameters are counted as PaLM Table 1 does (weights and the shared embedding).",
    )
    model.add_argument("overrides", nargs="*", metavar="key=value", help="config field overrides")
    model.add_argument("--config", default="palm-tiny", help="preset name (default: palm-tiny; see --list)")
    model.add_argument("--mesh", type=_mesh, default=None,
                       help="a pod's mesh (e.g. fsdp=256,model=12): report parameter and optimizer "
                       "bytes per device and every dimension left unsplit")
    model.add_argument("--list", action="store_true", help="list every preset instead")
    model.add_argument("--json", action="store_true", help="print JSON instead of a table")
    model.set_defaults(func=_run_model)

    mfu = subparsers.add_parser(
        "mfu",
        help="model and hardware FLOPs utilisation of a training run",
        description="MFU = tokens/s x (6N + 12LHQT) / (chips x peak FLOP/s), PaLM Appendix B; HFU adds "
        "the FLOPs recomputed by rematerialisation. Example (PaLM 540B, 46.2% MFU): pathways mfu "
        "--config palm-540b --tokens-per-s 238.3e3 --chips 6144 --peak tpu-v4",
    )
    source = mfu.add_argument_group("model (either --config or all of --params/--layers/--heads/--head-dim/--seq)")
    source.add_argument("--config", help="preset name")
    source.add_argument("overrides", nargs="*", metavar="key=value", help="config field overrides")
    source.add_argument("--params", type=_count, help="N, parameters including embeddings (e.g. 540.35B)")
    source.add_argument("--layers", type=int, help="L, number of layers")
    source.add_argument("--heads", type=int, help="H, number of query heads")
    source.add_argument("--head-dim", type=int, help="Q, head size")
    source.add_argument("--seq", type=int, help="T, sequence length")
    source.add_argument("--embedding-params", type=_count, default=0,
                        help="embedding parameters within N (only for --remat full)")
    mfu.add_argument("--tokens-per-s", type=float, required=True, help="achieved training tokens per second")
    mfu.add_argument("--chips", type=int, default=1, help="number of accelerator chips (default 1)")
    mfu.add_argument("--peak", required=True,
                     help=f"peak FLOP/s per chip: a number, or a device kind ({', '.join(PEAK_FLOPS)})")
    mfu.add_argument("--dtype", default="bfloat16",
                     help="training dtype, for a --peak given as a device kind (default bfloat16)")
    mfu.add_argument("--remat", type=_remat, default=None,
                     help="none, palm, full (counted by XLA in the lowered step), or a fraction of a "
                     "forward pass recomputed (by formula); default: the config's policy, else none")
    mfu.add_argument("--json", action="store_true", help="print JSON")
    mfu.set_defaults(func=_run_mfu)


def main(argv: Sequence[str] | None = None) -> int:
    """Runs the two subcommands without the runtime's CLI."""
    parser = argparse.ArgumentParser(prog="python -m model.cli", description="PaLM model tools")
    register(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
