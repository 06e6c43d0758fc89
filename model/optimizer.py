"""PaLM's optimizer: Adafactor without factorisation, i.e. Adam with parameter scaling.

PaLM (Chowdhery et al. 2022, Section 5 "Training Setup"):
  * Adafactor without factorisation, "effectively equivalent to Adam with parameter scaling", which
    scales the learning rate by the root-mean-square of the parameter matrix (at least 1e-3, so that
    zero-initialised parameters still move);
  * learning rate 1e-2 for the first 10,000 steps, then 1/sqrt(step);
  * beta1 = 0.9, beta2 = 1 - step^-0.8 (so the second moment starts as g^2 and averages ever longer);
  * global-norm gradient clipping at 1.0;
  * "dynamic" weight decay lr^2, decoupled from the gradient.

Written as pure functions over pytrees, with the step an explicit argument rather than a counter in
the state: the runtime exports the update as StableHLO and drives the step itself. The arithmetic
follows `optax.adafactor(factored=False, multiply_by_parameter_scale=True, momentum=0.9,
decay_rate=0.8, clipping_threshold=None)` step for step (tests/test_optimizer.py checks that), with
two deliberate differences: parameter scaling is per layer for stacked ('layers', ...) parameters,
since PaLM scales by the RMS of each parameter *matrix*, and the weight decay is lr^2 rather than a
fixed rate.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp

PyTree = Any


@dataclasses.dataclass(frozen=True)
class AdafactorConfig:
    """Hyperparameters of the PaLM optimizer; the defaults are the paper's.

    `constant_steps` is the length of the constant-lr phase (10k in PaLM); tiny CPU runs shorten it.
    `warmup_steps` adds an optional linear warm-up (PaLM has none).
    """

    peak_learning_rate: float = 1e-2
    constant_steps: int = 10_000
    warmup_steps: int = 0
    beta1: float = 0.9
    beta2_exponent: float = 0.8
    clip_global_norm: float | None = 1.0
    weight_decay_exponent: float | None = 2.0  # decay = lr ** 2; None disables it
    min_parameter_scale: float = 1e-3
    epsilon: float = 1e-30  # added to g^2, as in Adafactor

    def __post_init__(self) -> None:
        if self.peak_learning_rate <= 0 or self.constant_steps < 1 or self.warmup_steps < 0:
            raise ValueError(f"invalid schedule in {self}")
        if not 0.0 <= self.beta1 < 1.0:
            raise ValueError(f"beta1 must lie in [0, 1), got {self.beta1}")


def learning_rate(step: jax.Array | int, config: AdafactorConfig) -> jax.Array:
    """The learning rate at 0-based `step`: constant, then decaying as 1/sqrt(step).

    With k = step + 1, lr = peak * sqrt(constant_steps / max(k, constant_steps)); for PaLM's peak 1e-2
    and 10k constant steps that is exactly 1/sqrt(k) after the constant phase.
    """
    k = jnp.asarray(step, jnp.float32) + 1.0
    lr = config.peak_learning_rate * jnp.sqrt(config.constant_steps / jnp.maximum(k, config.constant_steps))
    if config.warmup_steps:
        lr = lr * jnp.minimum(1.0, k / config.warmup_steps)
    return lr


def second_moment_decay(step: jax.Array | int, config: AdafactorConfig) -> jax.Array:
    """beta2 at 0-based `step`: 1 - k^-0.8 with k = step + 1, so 0 on the first step."""
    k = jnp.asarray(step, jnp.float32) + 1.0
    return 1.0 - k ** (-config.beta2_exponent)


def init_optimizer_state(params: PyTree) -> dict[str, PyTree]:
    """Zero first and second moments, in float32 whatever the parameter dtype."""
    zeros = lambda p: jnp.zeros(p.shape, jnp.float32)  # noqa: E731
    return {"momentum": jax.tree.map(zeros, params), "second_moment": jax.tree.map(zeros, params)}


def global_norm(tree: PyTree) -> jax.Array:
    """sqrt of the sum of squares of every leaf, in float32."""
    leaves = jax.tree.leaves(tree)
    return jnp.sqrt(sum(jnp.sum(jnp.square(leaf.astype(jnp.float32))) for leaf in leaves))


def _parameter_scale(param: jax.Array, stacked: bool, min_scale: float) -> jax.Array:
    """max(RMS(param), min_scale), per layer when the leading axis stacks layers."""
    p = param.astype(jnp.float32)
    if stacked and p.ndim > 1:
        axes = tuple(range(1, p.ndim))
        rms = jnp.sqrt(jnp.mean(jnp.square(p), axis=axes, keepdims=True))
    else:
        rms = jnp.sqrt(jnp.mean(jnp.square(p)))
    return jnp.maximum(rms, min_scale)


def optimizer_update(
    params: PyTree,
    state: dict[str, PyTree],
    grads: PyTree,
    step: jax.Array | int,
    config: AdafactorConfig,
    stacked: PyTree | None = None,
) -> tuple[PyTree, dict[str, PyTree]]:
    """One Adafactor step; returns (new_params, new_state).

    `stacked` is a pytree of bools (same structure as params) marking leaves whose leading axis
    stacks layers; None treats every leaf as one matrix. The result is a deterministic function of
    its inputs: no reductions whose order depends on the device count beyond XLA's own.
    """
    lr = learning_rate(step, config)
    beta2 = second_moment_decay(step, config)
    if stacked is None:
        stacked = jax.tree.map(lambda _: False, params)
    if config.clip_global_norm is not None:
        norm = global_norm(grads)
        # Scale only when above the threshold, as optax.clip_by_global_norm does.
        factor = jnp.where(norm > config.clip_global_norm, config.clip_global_norm / norm, 1.0)
        grads = jax.tree.map(lambda g: g.astype(jnp.float32) * factor, grads)
    decay = lr**config.weight_decay_exponent if config.weight_decay_exponent is not None else 0.0

    def leaf_update(p, g, m, v, is_stacked):
        g = g.astype(jnp.float32)
        v = beta2 * v + (1.0 - beta2) * (jnp.square(g) + config.epsilon)
        direction = g * jax.lax.rsqrt(v)
        direction = direction * lr * _parameter_scale(p, is_stacked, config.min_parameter_scale)
        # Adafactor's momentum averages the already scaled step (optax's ema, debias=False).
        m = config.beta1 * m + (1.0 - config.beta1) * direction
        p32 = p.astype(jnp.float32)
        new_p = p32 - m - decay * p32  # decoupled weight decay: not scaled by the parameter RMS
        return new_p.astype(p.dtype), m, v

    out = jax.tree.map(leaf_update, params, grads, state["momentum"], state["second_moment"], stacked)
    is_triple = lambda node: isinstance(node, tuple) and len(node) == 3  # noqa: E731
    new_params = jax.tree.map(lambda t: t[0], out, is_leaf=is_triple)
    new_m = jax.tree.map(lambda t: t[1], out, is_leaf=is_triple)
    new_v = jax.tree.map(lambda t: t[2], out, is_leaf=is_triple)
    return new_params, {"momentum": new_m, "second_moment": new_v}
