"""Loss and train-step pieces as pure functions, ready for `jax.jit` and `jax.export`.

PaLM trains across two pods (Chowdhery et al. 2022, Section 4): each pod computes gradients on half
the global batch (component A, `grads_fn`), the pods swap gradients over the data-centre network,
and each applies the optimizer to both halves (component B, `apply_update`). Parameters must stay
bitwise identical in both pods without ever being compared, so B is symmetric in its two gradient
arguments: it averages them as (g_a + g_b) * 0.5, and IEEE addition is commutative, so island 0
calling B(g_0, g_1) and island 1 calling B(g_1, g_0) compute the same bits. Passing the halves in
island order costs nothing and keeps that guarantee even if someone later makes the sum
order-dependent (say, a compensated sum); tests/test_model.py checks both properties.

A batch is a dict: 'inputs' [B, T] int32 tokens, 'targets' [B, T] int32 next tokens, and optionally
'weights' [B, T] float32 (0 for padding). The loss is the weight-normalised mean, so two half
batches with equal weight sums average to exactly the full-batch loss.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import PartitionSpec

from model.config import PalmConfig
from model.optimizer import init_optimizer_state, optimizer_update
from model.palm import Params, constrain_params, forward, param_logical_axes
from model.sharding import logical_to_mesh_spec

Batch = dict[str, jax.Array]
OptState = dict[str, Any]


def batch_from_tokens(tokens: jax.Array | np.ndarray) -> Batch:
    """A training batch from [B, T + 1] token rows: predict each token from those before it."""
    tokens = jnp.asarray(tokens, jnp.int32)
    return {"inputs": tokens[:, :-1], "targets": tokens[:, 1:]}


def batch_partition_specs(
    config: PalmConfig, mesh: jax.sharding.Mesh | jax.sharding.AbstractMesh | None = None
) -> dict[str, PartitionSpec]:
    """PartitionSpecs for a batch dict ('batch', 'seq' logical axes) under the config's rules."""
    spec = logical_to_mesh_spec(("batch", "seq"), config.logical_axis_rules, mesh)
    return {"inputs": spec, "targets": spec, "weights": spec}


def loss_terms(params: Params, batch: Batch, config: PalmConfig,
               dropout_key: jax.Array | None = None) -> dict[str, jax.Array]:
    """The loss and its parts: {'loss', 'cross_entropy', 'z_loss'} (weighted token means).

    z_loss is PaLM's auxiliary term 1e-4 * log^2(Z) per token, which keeps the softmax normaliser
    log Z near 0 and stabilises training (Chowdhery et al. 2022, Section 5).
    """
    logits = forward(params, batch["inputs"], config, dropout_key=dropout_key)
    log_z = jax.nn.logsumexp(logits, axis=-1)
    target_logit = jnp.take_along_axis(logits, batch["targets"][..., None], axis=-1)[..., 0]
    cross_entropy = log_z - target_logit
    z_loss = config.z_loss * jnp.square(log_z)
    weights = batch.get("weights")
    weights = jnp.ones_like(cross_entropy) if weights is None else weights.astype(jnp.float32)
    total = jnp.sum(weights)

    def mean(x: jax.Array) -> jax.Array:
        return jnp.sum(x * weights) / total

    return {"loss": mean(cross_entropy + z_loss), "cross_entropy": mean(cross_entropy), "z_loss": mean(z_loss)}


def loss_fn(params: Params, batch: Batch, config: PalmConfig,
            dropout_key: jax.Array | None = None) -> jax.Array:
    """Scalar training loss: token-mean cross entropy plus z-loss."""
    return loss_terms(params, batch, config, dropout_key)["loss"]


def grads_fn(params: Params, batch: Batch, config: PalmConfig,
             dropout_key: jax.Array | None = None) -> tuple[jax.Array, Params]:
    """Component A: (loss, gradients) for one (half) batch, in the parameters' dtype. Dropout
    (if the config has any) needs `dropout_key`; without one the pass is deterministic."""
    loss, grads = jax.value_and_grad(loss_fn)(params, batch, config, dropout_key)
    return loss, constrain_params(grads, config)


def init_opt_state(params: Params, config: PalmConfig) -> OptState:  # noqa: ARG001 - uniform signature
    """The optimizer state for `params` (float32 moments)."""
    return init_optimizer_state(params)


def average_gradients(grads_a: Params, grads_b: Params, parts: int = 2) -> Params:
    """(g_a + g_b) * (1 / parts), leaf by leaf: symmetric to the bit, exact when g_a == g_b and
    parts == 2. `g_a + g_b` sums the gradients of `parts` equal shares of the batch."""
    scale = 1.0 / parts
    return jax.tree.map(lambda a, b: (a + b) * jnp.asarray(scale, a.dtype), grads_a, grads_b)


def apply_update(
    params: Params,
    opt_state: OptState,
    grads_a: Params,
    grads_b: Params,
    step: jax.Array | int,
    config: PalmConfig,
    parts: int = 2,
) -> tuple[Params, OptState]:
    """Component B: average the islands' gradients, then one Adafactor step.

    `grads_a + grads_b` is the sum of the gradients of `parts` equal shares of the global batch:
    two islands pass their halves (island 0's first, on both islands); N islands pass the two
    operands of the last addition of model.allreduce's plan, with parts=N; one island passes its
    gradients twice. `step` is the 0-based global step, which drives the learning-rate and beta2
    schedules. Returns (new_params, new_opt_state); inputs are not modified.
    """
    grads = average_gradients(grads_a, grads_b, parts)
    stacked = jax.tree.map(
        lambda axes: axes[0] == "layers", param_logical_axes(config), is_leaf=lambda n: isinstance(n, tuple)
    )
    params, opt_state = optimizer_update(params, opt_state, grads, step, config.optimizer, stacked)
    opt_state = {name: constrain_params(moment, config) for name, moment in opt_state.items()}
    return constrain_params(params, config), opt_state


def train_step(
    params: Params, opt_state: OptState, batch: Batch, step: jax.Array | int, config: PalmConfig
) -> tuple[Params, OptState, jax.Array]:
    """A one-island step (A then B with both halves the same gradients): (params, state, loss)."""
    loss, grads = grads_fn(params, batch, config)
    params, opt_state = apply_update(params, opt_state, grads, grads, step, config)
    return params, opt_state, loss
