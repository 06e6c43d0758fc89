"""The PaLM decoder: parameter initialisation, logical axes, forward pass, parameter counting.

Parameters are a plain dict pytree. Per-layer weights are stacked on a leading 'layers' axis and the
blocks run under `jax.lax.scan`, so compile time does not grow with depth (118 layers for 540B).

    embedding       [V, d]          shared by the input lookup and the output logits
    layers/ln_scale [L, d]          the one layer norm of each parallel block (scale, no bias)
    layers/wq       [L, d, H, Q]    H query heads
    layers/wk       [L, d, Q]       one key head (multi-query)
    layers/wv       [L, d, Q]       one value head (multi-query)
    layers/wo       [L, H, Q, d]
    layers/w_gate   [L, d, F]       SwiGLU
    layers/w_up     [L, d, F]
    layers/w_down   [L, F, d]
    final_ln_scale  [d]
"""

from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from model.config import PalmConfig
from model.layers import layer_norm, parallel_block
from model.sharding import (
    LogicalAxisRules,
    constrain,
    tree_partition_specs,
    tree_shardings,
)

Params = dict[str, Any]

# (shape as a function of the config, logical axes, fan-in) for each stacked per-layer kernel.
_LAYER_KERNELS: dict[str, tuple[Any, tuple[str, ...], Any]] = {
    "wq": (lambda c: (c.d_model, c.n_heads, c.head_dim), ("embed", "heads", "kv"), lambda c: c.d_model),
    "wk": (lambda c: (c.d_model, c.head_dim), ("embed", "kv"), lambda c: c.d_model),
    "wv": (lambda c: (c.d_model, c.head_dim), ("embed", "kv"), lambda c: c.d_model),
    "wo": (lambda c: (c.n_heads, c.head_dim, c.d_model), ("heads", "kv", "embed"), lambda c: c.n_heads * c.head_dim),
    "w_gate": (lambda c: (c.d_model, c.d_ff), ("embed", "mlp"), lambda c: c.d_model),
    "w_up": (lambda c: (c.d_model, c.d_ff), ("embed", "mlp"), lambda c: c.d_model),
    "w_down": (lambda c: (c.d_ff, c.d_model), ("mlp", "embed"), lambda c: c.d_ff),
}


def init_params(config: PalmConfig, key: jax.Array) -> Params:
    """Fresh parameters, initialised as in PaLM Section 5 ("Weight initialization").

    Kernels ~ N(0, 1/fan_in) ("fan-in variance scaling": std 1/sqrt(n_in)); the embedding ~ N(0, 1)
    because no layer norm is applied to embeddings; layer-norm scales start at 1. Every tensor gets
    its own key from one explicit split; a stacked tensor is one draw covering all layers.
    """
    dtype = jnp.dtype(config.param_dtype)
    names = sorted(_LAYER_KERNELS)
    keys = jax.random.split(key, len(names) + 1)
    layers: dict[str, jax.Array] = {"ln_scale": jnp.ones((config.n_layers, config.d_model), dtype)}
    for name, sub in zip(names, keys[1:]):
        shape_fn, _, fan_in_fn = _LAYER_KERNELS[name]
        std = 1.0 / math.sqrt(fan_in_fn(config))
        shape = (config.n_layers, *shape_fn(config))
        layers[name] = (std * jax.random.normal(sub, shape, jnp.float32)).astype(dtype)
    embedding = jax.random.normal(keys[0], (config.vocab_size, config.d_model), jnp.float32).astype(dtype)
    return {"embedding": embedding, "layers": layers, "final_ln_scale": jnp.ones((config.d_model,), dtype)}


def param_logical_axes(config: PalmConfig) -> Params:
    """A pytree like the parameters whose leaves are tuples of logical axis names."""
    layers: dict[str, tuple[str, ...]] = {"ln_scale": ("layers", "embed")}
    for name, (_, axes, _) in _LAYER_KERNELS.items():
        layers[name] = ("layers", *axes)
    return {"embedding": ("vocab", "embed"), "layers": layers, "final_ln_scale": ("embed",)}


def abstract_params(config: PalmConfig) -> Params:
    """Parameter shapes and dtypes by abstract evaluation (`jax.eval_shape`): no memory used."""
    return jax.eval_shape(lambda key: init_params(config, key), jax.ShapeDtypeStruct((2,), jnp.uint32))


def param_count(config: PalmConfig, *, include_norm_scales: bool = False) -> int:
    """Number of parameters, embeddings included: the N of PaLM's 6N + 12LHQT.

    By default this counts as PaLM Table 1 does: weight matrices and the embedding, not the
    layer-norm scale vectors. Only that convention reproduces all three published sizes; the 2.19M
    scales of the 540B model would turn 540.354B into 540.356B, printed 540.36B instead of the
    paper's 540.35B (8B and 62B round the same either way). `include_norm_scales=True` counts every
    leaf of the parameter pytree.
    """
    shapes = jax.tree.leaves(abstract_params(config))
    axes = jax.tree.leaves(param_logical_axes(config), is_leaf=lambda n: isinstance(n, tuple))
    return sum(
        int(np.prod(shape.shape))
        for shape, names in zip(shapes, axes, strict=True)
        if include_norm_scales or tuple(n for n in names if n != "layers") != ("embed",)
    )


def embedding_param_count(config: PalmConfig) -> int:
    """Parameters in the (shared) embedding matrix."""
    return config.vocab_size * config.d_model


def param_partition_specs(
    config: PalmConfig, mesh: jax.sharding.Mesh | jax.sharding.AbstractMesh | None = None,
    rules: LogicalAxisRules | None = None,
) -> Params:
    """PartitionSpecs for the parameters under `rules` (default: the config's) on `mesh`."""
    rules = config.logical_axis_rules if rules is None else rules
    return tree_partition_specs(param_logical_axes(config), abstract_params(config), rules, mesh)


def param_shardings(config: PalmConfig, mesh: jax.sharding.Mesh, rules: LogicalAxisRules | None = None) -> Params:
    """NamedShardings for the parameters on a concrete `mesh`."""
    rules = config.logical_axis_rules if rules is None else rules
    return tree_shardings(param_logical_axes(config), abstract_params(config), rules, mesh)


def constrain_params(tree: Params, config: PalmConfig) -> Params:
    """Constrains a parameter-shaped pytree (parameters, gradients, moments) to the parameter
    sharding; a no-op without a mesh. Applied to gradients it makes FSDP reduce-scatter them."""
    return jax.tree.map(
        lambda axes, leaf: constrain(leaf, axes, config.logical_axis_rules),
        param_logical_axes(config),
        tree,
        is_leaf=lambda node: isinstance(node, tuple),
    )


def _remat(fn: Any, policy: str) -> Any:
    if policy == "none":
        return fn
    if policy == "full":
        return jax.checkpoint(fn, prevent_cse=False)  # saves only the block input
    # 'palm': keep the outputs of matmuls against weights (q, k, v, MLP gate/up, both output
    # projections); recompute layer norm, RoPE, softmax and the two attention matmuls, whose
    # [B, H, T, T] intermediates are the largest activations. prevent_cse=False is safe under scan.
    return jax.checkpoint(fn, policy=jax.checkpoint_policies.dots_with_no_batch_dims_saveable, prevent_cse=False)


def default_positions(tokens: jax.Array) -> jax.Array:
    """Positions 0..T-1 for every sequence of a [B, T] token batch."""
    return jnp.broadcast_to(jnp.arange(tokens.shape[1], dtype=jnp.int32), tokens.shape)


def embed(params: Params, tokens: jax.Array, config: PalmConfig) -> jax.Array:
    """Token embeddings [B, T, d] in the compute dtype; unscaled, as PaLM's N(0, 1) init intends."""
    # Gather an FSDP-sharded table over 'fsdp' before the lookup (as for any FSDP weight): a lookup
    # into a table sharded along d_model yields activations XLA cannot reshard to batch-sharded ones
    # without replicating them first.
    table = constrain(params["embedding"], ("vocab", "act_embed"), config.logical_axis_rules)
    x = jnp.take(table, tokens, axis=0).astype(config.dtype)
    return constrain(x, ("batch", "seq", "act_embed"), config.logical_axis_rules)


def logits_from_hidden(params: Params, hidden: jax.Array, config: PalmConfig) -> jax.Array:
    """Output logits [B, T, V] in float32 through the shared embedding matrix.

    PaLM Section 5: "Because the input and output embedding layers are shared, we scale the
    pre-softmax output logits by 1/sqrt(n), where n is the embedding size."
    """
    emb = params["embedding"].astype(hidden.dtype)
    logits = jnp.einsum("btd,vd->btv", hidden, emb, preferred_element_type=jnp.float32)
    logits = logits / math.sqrt(config.d_model)
    return constrain(logits, ("batch", "seq", "vocab"), config.logical_axis_rules)


def hidden_states(
    params: Params, tokens: jax.Array, config: PalmConfig, positions: jax.Array | None = None,
    dropout_key: jax.Array | None = None,
) -> jax.Array:
    """The final layer-normed hidden states [B, T, d] for a [B, T] int token batch.

    `dropout_key` turns on the config's residual dropout (one key per layer, split from it)."""
    positions = default_positions(tokens) if positions is None else positions
    x = embed(params, tokens, config)
    keys = None
    if dropout_key is not None and config.dropout_rate > 0:
        keys = jax.random.split(dropout_key, config.n_layers)

    def body(carry: jax.Array, xs: tuple[Params, jax.Array | None]) -> tuple[jax.Array, None]:
        layer_params, key = xs
        return parallel_block(layer_params, carry, positions, config, key), None

    x, _ = jax.lax.scan(_remat(body, config.remat), x, (params["layers"], keys),
                        unroll=config.n_layers if config.unroll_layers else 1)
    return layer_norm(x, params["final_ln_scale"], config.layer_norm_epsilon)


def forward(
    params: Params, tokens: jax.Array, config: PalmConfig, positions: jax.Array | None = None,
    dropout_key: jax.Array | None = None,
) -> jax.Array:
    """Causal language-model logits [B, T, V] (float32) for a [B, T] int token batch."""
    hidden = hidden_states(params, tokens, config, positions, dropout_key)
    return logits_from_hidden(params, hidden, config)
