"""Hardware FLOPs per token as XLA counts them in the rematerialised training step.

HFU (PaLM Appendix B) counts what the hardware executes: the model FLOPs plus whatever the
backward pass recomputes. Rather than a formula per remat policy, this lowers the real training
step (component A and B at the config's batch) and reads XLA's HLO cost analysis, so whatever the
preset's `remat` policy makes JAX recompute is counted, and so is the element-wise work.

Nothing is allocated: the step is lowered against abstract shapes (`jax.ShapeDtypeStruct`), which
is how this answers for palm-540b on a laptop. XLA counts a loop body once whatever its trip
count, so the step is lowered with one and with two unrolled layers; the difference is one layer,
and L layers cost F(1) + (L - 1) (F(2) - F(1)), exactly, since every layer is the same.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from model.config import PalmConfig
from model.palm import abstract_params
from model.training import init_opt_state, train_step


def reference_batch(config: PalmConfig) -> int:
    """The batch the count is taken at: the last of the config's ramp (the batch most steps
    use), else 8 sequences. It matters only for the optimizer's share, spread over the batch."""
    return config.batch_ramp[-1][1] if config.batch_ramp else 8


def _step_flops(config: PalmConfig, batch_size: int) -> float:
    params = abstract_params(config)
    opt_state = jax.eval_shape(functools.partial(init_opt_state, config=config), params)
    batch = {k: jax.ShapeDtypeStruct((batch_size, config.seq_len), jnp.int32)
             for k in ("inputs", "targets")}
    step = jax.ShapeDtypeStruct((), jnp.int32)
    lowered = jax.jit(functools.partial(train_step, config=config)).lower(params, opt_state, batch, step)
    cost = lowered.cost_analysis()
    return float((cost[0] if isinstance(cost, (list, tuple)) else cost)["flops"])


@functools.lru_cache(maxsize=32)
def xla_flops_per_token(config: PalmConfig, batch_size: int | None = None) -> float:
    """FLOPs per training token of one whole step (forward, backward with the config's
    rematerialisation, gradient averaging, optimizer), by XLA's count of the lowered step."""
    batch_size = batch_size or reference_batch(config)
    one = _step_flops(config.replace(n_layers=1, unroll_layers=False), batch_size)
    two = _step_flops(config.replace(n_layers=2, unroll_layers=True), batch_size)
    total = one + (config.n_layers - 1) * (two - one)
    return total / (batch_size * config.seq_len)
