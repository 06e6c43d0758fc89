"""PaLM (Chowdhery et al. 2022) in pure functional JAX, for the Pathways-style runtime.

Parameters are plain dict pytrees; every function is pure and traceable by `jax.jit` and
`jax.export` with the config as a static argument. Modules: config (presets), palm (init, forward,
counting), layers (the block), sharding (logical axes -> mesh axes), partitioning (a pod's mesh,
bytes per device, unsplit dimensions), training (loss, component A `grads_fn`, component B
`apply_update`), optimizer (Adafactor), flops and hardware_flops (MFU/HFU), generate (KV-cache
decoding), tokenizer/corpus/dataset (the shipped lossless tokenizer, its data, packed documents),
pods (multi-pod training on the runtime), allreduce (the pods' gradient exchange), recipe (batch
ramp, skips, loss spikes), checkpoint (Orbax), overrides (key=value), scalars (step hooks), cli.
"""

from model.config import PRESETS, REMAT_POLICIES, PalmConfig, get_config, list_configs
from model.flops import FlopsModel, Utilization, flops_per_token, peak_flops, utilization
from model.generate import decode_step, generate, init_cache, prefill
from model.optimizer import AdafactorConfig, learning_rate
from model.palm import (
    abstract_params,
    forward,
    hidden_states,
    init_params,
    param_count,
    param_logical_axes,
    param_partition_specs,
    param_shardings,
)
from model.sharding import (
    DATA_PARALLEL_RULES,
    DEFAULT_RULES,
    constrain,
    logical_to_mesh_spec,
    make_mesh,
)
from model.tokenizer import Tokenizer
from model.training import (
    apply_update,
    average_gradients,
    batch_from_tokens,
    batch_partition_specs,
    grads_fn,
    init_opt_state,
    loss_fn,
    loss_terms,
    train_step,
)

__all__ = [
    "DATA_PARALLEL_RULES",
    "DEFAULT_RULES",
    "PRESETS",
    "REMAT_POLICIES",
    "AdafactorConfig",
    "FlopsModel",
    "PalmConfig",
    "Tokenizer",
    "Utilization",
    "abstract_params",
    "apply_update",
    "average_gradients",
    "batch_from_tokens",
    "batch_partition_specs",
    "constrain",
    "decode_step",
    "flops_per_token",
    "forward",
    "generate",
    "get_config",
    "grads_fn",
    "hidden_states",
    "init_cache",
    "init_opt_state",
    "init_params",
    "learning_rate",
    "list_configs",
    "logical_to_mesh_spec",
    "loss_fn",
    "loss_terms",
    "make_mesh",
    "param_count",
    "param_logical_axes",
    "param_partition_specs",
    "param_shardings",
    "peak_flops",
    "prefill",
    "train_step",
    "utilization",
]
