"""`PalmConfig`, a frozen typed description of one PaLM model and its training hyperparameters,
and the registry of named presets.

The paper presets follow PaLM Table 1 (Chowdhery et al. 2022): d_ff = 4 d_model, head size 256,
a 256k SentencePiece vocabulary, sequence length 2048. The small presets keep the architecture and
shrink the sizes so they train on a CPU; they use the project's own 512-piece tokenizer.

Configs are hashable, so they can be `static_argnames` of `jax.jit` and keys of compile caches.
"""

from __future__ import annotations

import dataclasses
import types
from collections.abc import Mapping
from typing import Any, Literal

from model.optimizer import AdafactorConfig
from model.sharding import DEFAULT_RULES, LogicalAxisRules

RematPolicy = Literal["none", "full", "palm"]
REMAT_POLICIES: tuple[str, ...] = ("none", "full", "palm")
DTYPES: tuple[str, ...] = ("float32", "bfloat16", "float16")


@dataclasses.dataclass(frozen=True)
class PalmConfig:
    """One PaLM model: architecture, numerics, rematerialisation, sharding rules and optimizer.

    Attributes:
      name: preset name, informational.
      n_layers, d_model, n_heads, head_dim, d_ff, vocab_size, seq_len: the architecture (PaLM
        Table 1 symbols L, d_model, H, Q, d_ff, V, T).
      z_loss: coefficient of the auxiliary log^2(Z) loss (1e-4 in PaLM).
      remat: 'none' keeps every activation; 'full' recomputes each block in the backward pass;
        'palm' saves the projection matmul outputs and recomputes the rest (attention included).
      dtype: compute dtype of activations and matmuls (parameters are cast to it where used);
        param_dtype: storage dtype of parameters. Layer-norm statistics, RoPE, attention logits
        and softmax, the output logits, the loss and the optimizer always run in float32.
      dropout_rate: residual dropout on each block's attention + MLP output (0 in PaLM's
        pre-training; the paper fine-tunes with 0.1).
      batch_ramp: the global batch schedule as (first step, sequences) pairs, e.g. PaLM's
        ((0, 512), (50_000, 1024), (115_000, 2048)); empty for a constant batch chosen by the
        trainer.
      rope_base: RoPE wavelength base.
      layer_norm_epsilon: added to the variance in layer norm.
      logical_axis_rules: the table mapping logical axes to mesh axes (see model.sharding).
      optimizer: the Adafactor hyperparameters.
    """

    name: str
    n_layers: int
    d_model: int
    n_heads: int
    head_dim: int
    d_ff: int
    vocab_size: int
    seq_len: int
    z_loss: float = 1e-4
    remat: RematPolicy = "none"
    dtype: str = "float32"
    param_dtype: str = "float32"
    dropout_rate: float = 0.0
    batch_ramp: tuple[tuple[int, int], ...] = ()
    rope_base: float = 10_000.0
    layer_norm_epsilon: float = 1e-6
    # Unroll the scan over layers: the same computation, but XLA's cost analysis, which counts a
    # loop body once whatever its trip count, then sees every layer (compiles take longer).
    unroll_layers: bool = False
    logical_axis_rules: LogicalAxisRules = DEFAULT_RULES
    optimizer: AdafactorConfig = AdafactorConfig()

    def __post_init__(self) -> None:
        for field in ("n_layers", "d_model", "n_heads", "head_dim", "d_ff", "vocab_size", "seq_len"):
            if getattr(self, field) < 1:
                raise ValueError(f"{field} must be positive, got {getattr(self, field)}")
        if self.head_dim % 2:
            raise ValueError(f"RoPE rotates pairs of features: head_dim must be even, got {self.head_dim}")
        if self.remat not in REMAT_POLICIES:
            raise ValueError(f"remat must be one of {REMAT_POLICIES}, got {self.remat!r}")
        if self.dtype not in DTYPES or self.param_dtype not in DTYPES:
            raise ValueError(f"dtypes must be among {DTYPES}, got {self.dtype!r}, {self.param_dtype!r}")
        if not 0.0 <= self.dropout_rate < 1.0:
            raise ValueError(f"dropout_rate must lie in [0, 1), got {self.dropout_rate}")
        steps = [step for step, _ in self.batch_ramp]
        if self.batch_ramp and (steps[0] != 0 or steps != sorted(set(steps))
                                or any(size < 1 for _, size in self.batch_ramp)):
            raise ValueError("batch_ramp must start at step 0 with increasing steps and positive "
                             f"sizes, got {self.batch_ramp}")

    def batch_at(self, step: int, default: int) -> int:
        """Global batch (sequences) of 0-based `step`: the ramp's, or `default` without one."""
        size = default
        for first, sequences in self.batch_ramp:
            if step >= first:
                size = sequences
        return size
    def replace(self, **changes: Any) -> PalmConfig:
        """A copy with some fields changed (validated again)."""
        return dataclasses.replace(self, **changes)


# PaLM Section 5: "For the largest model, we use batch size 512 (1M tokens) until step 50k, then
# double it to 1024 (2M tokens) until step 115k, and finally double again to 2048 (4M tokens) ...
# The smaller models followed similar schedules."
PALM_BATCH_RAMP = ((0, 512), (50_000, 1024), (115_000, 2048))


def _paper(name: str, n_layers: int, n_heads: int, d_model: int, remat: RematPolicy) -> PalmConfig:
    # bfloat16 matmuls and activations over float32 parameters and optimizer state (README,
    # "Precision"); the paper does not say which activations each size rematerialised: 'full'
    # (each block recomputed from its input) for the sizes that need it to fit, whose HFU then
    # lands within 2 points of the 540B run's published 57.8%.
    return PalmConfig(
        name=name,
        n_layers=n_layers,
        d_model=d_model,
        n_heads=n_heads,
        head_dim=256,
        d_ff=4 * d_model,
        vocab_size=256_000,
        seq_len=2048,
        dtype="bfloat16",
        param_dtype="float32",
        remat=remat,
        batch_ramp=PALM_BATCH_RAMP,
    )


# Small presets: a short constant-lr phase so the 1/sqrt(step) decay shows within a short run.
_SMALL_OPTIMIZER = AdafactorConfig(constant_steps=100)

PRESETS: Mapping[str, PalmConfig] = types.MappingProxyType(
    {
        "palm-tiny": PalmConfig(
            name="palm-tiny", n_layers=2, d_model=128, n_heads=4, head_dim=32, d_ff=512,
            vocab_size=512, seq_len=128, optimizer=_SMALL_OPTIMIZER,
        ),
        "palm-small": PalmConfig(
            name="palm-small", n_layers=4, d_model=256, n_heads=8, head_dim=32, d_ff=1024,
            vocab_size=512, seq_len=256, optimizer=_SMALL_OPTIMIZER,
        ),
        # The utilization benchmark's CPU preset: matmuls large enough to run near the CPU's peak,
        # a step of well under a second at global batch 8 on two cores.
        "palm-bench": PalmConfig(
            name="palm-bench", n_layers=4, d_model=512, n_heads=8, head_dim=64, d_ff=2048,
            vocab_size=512, seq_len=256, optimizer=_SMALL_OPTIMIZER,
        ),
        # ~0.95B parameters with the paper's head size; for a single-GPU run, in bfloat16 compute.
        "palm-1b": PalmConfig(
            name="palm-1b", n_layers=16, d_model=2048, n_heads=8, head_dim=256, d_ff=8192,
            vocab_size=512, seq_len=2048, dtype="bfloat16", remat="palm",
            optimizer=AdafactorConfig(constant_steps=1000),
        ),
        "palm-8b": _paper("palm-8b", n_layers=32, n_heads=16, d_model=4096, remat="palm"),
        "palm-62b": _paper("palm-62b", n_layers=64, n_heads=32, d_model=8192, remat="full"),
        "palm-540b": _paper("palm-540b", n_layers=118, n_heads=48, d_model=18432, remat="full"),
    }
)


def get_config(name: str, **overrides: Any) -> PalmConfig:
    """The preset called `name`, with any fields in `overrides` replaced."""
    try:
        config = PRESETS[name]
    except KeyError:
        raise KeyError(f"unknown PaLM config {name!r}; known: {', '.join(PRESETS)}") from None
    return config.replace(**overrides) if overrides else config


def list_configs() -> list[str]:
    """Names of the registered presets, smallest first."""
    return list(PRESETS)
