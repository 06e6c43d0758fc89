"""FLOPs accounting and model/hardware FLOPs utilisation (MFU/HFU), after PaLM Appendix B.

Three pieces, kept apart so each can be checked alone: FLOPs per token from the model shape
(`FlopsModel`, here), peak FLOP/s per device kind (the datasheet table and CPU calibration of
`model.peaks`; `peak_flops` below only adapts it to "a number or a kind"), and the reporter
that divides them (`utilization`, here).

PaLM Appendix B ("Compute Usage and Environmental Impact", Chowdhery et al. 2022):
    model FLOPs per token = 6N + 12 L H Q T
    MFU = tokens/s x (6N + 12LHQT) / (chips x peak FLOP/s per chip)
N counts all parameters, embeddings included: only then do 238.3K tokens/s on 6144 TPU v4 chips
(275 TFLOP/s bf16 each) give the published 46.2% for the 540B model (without the 4.7B embedding
parameters it would be 45.8%). 6N is two FLOPs per multiply-add, times forward + 2x backward; with
tied embeddings the logits matmul is exactly the embedding's share. 12LHQT is the attention
score and value matmuls (Q K^T and A V: 2 x 2HQT per token forward, tripled for training), counted
over the full T x T matrix as the paper does. Element-wise work is ignored.

HFU counts the FLOPs the hardware actually executes, i.e. the model FLOPs plus whatever the
backward pass recomputes under rematerialisation (see `FlopsModel.rematerialized_flops_per_token`).

PaLM reports 57.8% HFU for the 540B run but not which activations it rematerialised. The ratio
57.8 / 46.2 = 1.25 says the hardware executed 1.25x the model FLOPs, i.e. the backward pass
recomputed three quarters of a forward pass: (6N + 12LHQT) + 0.75 (2N + 4LHQT). For comparison, on
the 540B shape: our 'palm' policy (recompute attention only) gives 46.4%, full block
rematerialisation 56.2% (it never recomputes output projections), a whole extra forward pass 61.6%.
`utilization(..., remat=0.75)` reproduces the published figure.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from model.config import PalmConfig
from model.palm import embedding_param_count, param_count
from model.peaks import peak_flops_for

Remat = str | float


@dataclasses.dataclass(frozen=True)
class FlopsModel:
    """The symbols of PaLM's FLOPs formula: N params, L layers, H heads, Q head size, T sequence
    length. Two optional parts of N matter only for full rematerialisation, which recomputes neither
    the logits (`embedding_params`) nor the blocks' output projections (`output_projection_params`,
    attention-out and MLP-down: no backward computation reads their outputs, so JAX's partial
    evaluation drops them from the recomputation). Left at 0, full remat is counted as a whole extra forward pass of N, the
    usual upper bound."""

    n_params: int
    n_layers: int
    n_heads: int
    head_dim: int
    seq_len: int
    embedding_params: int = 0
    output_projection_params: int = 0

    @classmethod
    def from_config(cls, config: PalmConfig) -> FlopsModel:
        """The formula's symbols for a model config, N by abstract evaluation."""
        return cls(
            n_params=param_count(config),
            n_layers=config.n_layers,
            n_heads=config.n_heads,
            head_dim=config.head_dim,
            seq_len=config.seq_len,
            embedding_params=embedding_param_count(config),
            output_projection_params=config.n_layers * config.d_model * (config.n_heads * config.head_dim + config.d_ff),
        )

    @property
    def attention_flops_per_token(self) -> int:
        """Forward FLOPs per token of the attention matmuls over all layers: 4LHQT."""
        return 4 * self.n_layers * self.n_heads * self.head_dim * self.seq_len

    def forward_flops_per_token(self) -> int:
        """One forward pass: 2N + 4LHQT."""
        return 2 * self.n_params + self.attention_flops_per_token

    def model_flops_per_token(self) -> int:
        """Training FLOPs per token without rematerialisation: 6N + 12LHQT (PaLM Appendix B)."""
        return 3 * self.forward_flops_per_token()

    def rematerialized_flops_per_token(self, remat: Remat) -> float:
        """FLOPs per token the backward pass recomputes under a remat policy.

        'none': 0. 'palm' (the policy of model.palm: save projection outputs, recompute attention):
        the attention matmuls, 4LHQT. 'full' (each block recomputed from its input): the blocks'
        forward pass except the output projections, 2(N - embedding - output projections) + 4LHQT
        (tests/test_flops.py checks both against XLA's own count). A float f: f forward passes,
        f(2N + 4LHQT), for runs whose policy is known only by its cost.
        """
        if isinstance(remat, (int, float)) and not isinstance(remat, bool):
            if remat < 0:
                raise ValueError(f"a recomputed fraction must be >= 0, got {remat}")
            return float(remat) * self.forward_flops_per_token()
        if remat == "none":
            return 0.0
        if remat == "palm":
            return float(self.attention_flops_per_token)
        if remat == "full":
            recomputed = self.n_params - self.embedding_params - self.output_projection_params
            return float(2 * recomputed + self.attention_flops_per_token)
        raise ValueError(f"unknown remat policy {remat!r}; expected 'none', 'palm', 'full' or a number")

    def hardware_flops_per_token(self, remat: Remat) -> float:
        """Model FLOPs plus rematerialised FLOPs per token."""
        return self.model_flops_per_token() + self.rematerialized_flops_per_token(remat)


def flops_per_token(config: PalmConfig) -> int:
    """Model FLOPs per training token, 6N + 12LHQT, for a config."""
    return FlopsModel.from_config(config).model_flops_per_token()


def peak_flops(device: str | float, dtype: Any = "bfloat16") -> float:
    """Peak FLOP/s per chip: a number (or numeric string) as given, else the datasheet figure of a
    device kind ("TPU v4", "tpu-v4", "NVIDIA H100 80GB HBM3", "h100") computing in `dtype`.

    Raises KeyError for kinds `model.peaks` does not know, CPUs included: a CPU's peak must be
    calibrated in the same run as the measurement it divides (`model.peaks.calibrate_cpu_peak`).
    """
    if isinstance(device, (int, float)):
        return float(device)
    try:
        return float(device)
    except ValueError:
        pass
    # The table matches JAX's device_kind strings ("TPU v4"); accept the dashed spelling too.
    return peak_flops_for(device.replace("-", " ").replace("_", " "), dtype)[0]


@dataclasses.dataclass(frozen=True)
class Utilization:
    """MFU and HFU as fractions (0.462, not 46.2), with the FLOP rates they came from."""

    mfu: float
    hfu: float
    model_flops_per_s: float
    hardware_flops_per_s: float
    peak_flops_per_s: float


def utilization(
    flops: FlopsModel | PalmConfig,
    tokens_per_s: float,
    n_chips: int,
    peak_flops_per_chip: float,
    remat: Remat = "none",
    *,
    hardware_flops_per_token: float | None = None,
) -> Utilization:
    """MFU and HFU of a run that processed `tokens_per_s` training tokens per second on `n_chips`.

    MFU = tokens/s x (6N + 12LHQT) / (n_chips x peak), PaLM Appendix B; HFU adds the FLOPs recomputed
    under `remat`, or counts `hardware_flops_per_token` when given (e.g. XLA's count of the step,
    model.hardware_flops).
    """
    model = FlopsModel.from_config(flops) if isinstance(flops, PalmConfig) else flops
    if tokens_per_s < 0 or n_chips < 1 or peak_flops_per_chip <= 0:
        raise ValueError("tokens_per_s must be >= 0, n_chips >= 1 and peak > 0")
    peak = n_chips * peak_flops_per_chip
    model_rate = tokens_per_s * model.model_flops_per_token()
    if hardware_flops_per_token is None:
        hardware_flops_per_token = model.hardware_flops_per_token(remat)
    hardware_rate = tokens_per_s * hardware_flops_per_token
    return Utilization(model_rate / peak, hardware_rate / peak, model_rate, hardware_rate, peak)
