"""The pieces of one PaLM block, as pure functions of explicit parameter dicts.

PaLM (Chowdhery et al. 2022, Section 2) departs from the GPT-style block in ways each function here
encodes, and each has a test in tests/test_model.py that fails if it is removed:
  * parallel formulation: y = x + MLP(LN(x)) + Attention(LN(x)), one shared layer norm per block;
  * SwiGLU MLP: Swish(x W_gate) * (x W_up), then W_down: three matmuls;
  * multi-query attention: H query heads, but one key and one value head of size Q shared by all;
  * RoPE position embeddings on queries and keys;
  * no biases anywhere, including layer norm (scale only).

Activations are annotated with logical axes ('batch', 'seq', 'act_embed', 'heads', 'kv', 'mlp') via
`model.sharding.constrain`, a no-op without a mesh.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from model.config import PalmConfig
from model.sharding import constrain

Params = dict[str, jax.Array]


def layer_norm(x: jax.Array, scale: jax.Array, epsilon: float) -> jax.Array:
    """Layer norm without bias (PaLM: "no biases ... in dense kernels or layer norms").

    Statistics in float32 whatever the compute dtype; the result is cast back.
    """
    x32 = x.astype(jnp.float32)
    mean = jnp.mean(x32, axis=-1, keepdims=True)
    var = jnp.mean(jnp.square(x32 - mean), axis=-1, keepdims=True)
    normed = (x32 - mean) * jax.lax.rsqrt(var + epsilon)
    return (normed * scale.astype(jnp.float32)).astype(x.dtype)


def rope_angles(positions: jax.Array, head_dim: int, base: float) -> tuple[jax.Array, jax.Array]:
    """(sin, cos) of shape positions.shape + (head_dim // 2,) for RoPE (Su et al. 2021)."""
    half = head_dim // 2
    inv_freq = base ** (-jnp.arange(half, dtype=jnp.float32) / half)
    angles = positions.astype(jnp.float32)[..., None] * inv_freq
    return jnp.sin(angles), jnp.cos(angles)


def apply_rope(x: jax.Array, sin: jax.Array, cos: jax.Array) -> jax.Array:
    """Rotates feature pairs (i, i + Q/2) of `x` [..., Q] by position-dependent angles.

    `sin`/`cos` must broadcast against x[..., :Q/2]. Because each pair is rotated by angle
    position * freq, the dot product of a rotated query and key depends only on the difference of
    their positions: the relative-position property tests/test_model.py checks.
    """
    x32 = x.astype(jnp.float32)
    x1, x2 = jnp.split(x32, 2, axis=-1)
    rotated = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
    return rotated.astype(x.dtype)


def project_qkv(
    p: Params, h: jax.Array, positions: jax.Array, config: PalmConfig
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Queries [B, T, H, Q], and the single key and value head [B, T, Q], with RoPE applied.

    Multi-query attention: `wk` and `wv` are [d_model, Q], one head each, so the KV cache of
    incremental decoding is H times smaller than with multi-head attention.
    """
    rules = config.logical_axis_rules
    dtype = h.dtype
    q = jnp.einsum("btd,dhk->bthk", h, p["wq"].astype(dtype))
    k = jnp.einsum("btd,dk->btk", h, p["wk"].astype(dtype))
    v = jnp.einsum("btd,dk->btk", h, p["wv"].astype(dtype))
    sin, cos = rope_angles(positions, config.head_dim, config.rope_base)  # [B, T, Q/2]
    q = apply_rope(q, sin[:, :, None, :], cos[:, :, None, :])
    k = apply_rope(k, sin, cos)
    q = constrain(q, ("batch", "seq", "heads", "kv"), rules)
    k = constrain(k, ("batch", "seq", "kv"), rules)
    v = constrain(v, ("batch", "seq", "kv"), rules)
    return q, k, v


def attend(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    q_positions: jax.Array,
    k_positions: jax.Array,
    config: PalmConfig,
) -> jax.Array:
    """Causal multi-query attention: every query head attends over the one shared K/V head.

    q: [B, T, H, Q]; k, v: [B, S, Q]; q_positions [B, T]; k_positions [B, S]. A key is visible to a
    query when its position is not later; decoding passes the whole cache with positions past the
    current one masked out by the same rule. Returns [B, T, H, Q].
    """
    scores = jnp.einsum("bthk,bsk->bhts", q, k).astype(jnp.float32) / math.sqrt(config.head_dim)
    visible = k_positions[:, None, None, :] <= q_positions[:, None, :, None]
    scores = jnp.where(visible, scores, jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
    out = jnp.einsum("bhts,bsk->bthk", probs, v)
    return constrain(out, ("batch", "seq", "heads", "kv"), config.logical_axis_rules)


def attention_output(p: Params, attended: jax.Array, config: PalmConfig) -> jax.Array:
    """Merges heads back to d_model with `wo` [H, Q, d_model]."""
    out = jnp.einsum("bthk,hkd->btd", attended, p["wo"].astype(attended.dtype))
    return constrain(out, ("batch", "seq", "act_embed"), config.logical_axis_rules)


def swiglu_mlp(p: Params, h: jax.Array, config: PalmConfig) -> jax.Array:
    """SwiGLU (Shazeer 2020): (Swish(h W_gate) * h W_up) W_down, three bias-free matmuls."""
    rules = config.logical_axis_rules
    gate = jnp.einsum("btd,df->btf", h, p["w_gate"].astype(h.dtype))
    up = jnp.einsum("btd,df->btf", h, p["w_up"].astype(h.dtype))
    hidden = constrain(jax.nn.silu(gate) * up, ("batch", "seq", "mlp"), rules)
    out = jnp.einsum("btf,fd->btd", hidden, p["w_down"].astype(h.dtype))
    return constrain(out, ("batch", "seq", "act_embed"), rules)


def dropout(x: jax.Array, rate: float, key: jax.Array) -> jax.Array:
    """Inverted dropout: zeroes each element with probability `rate`, scales the rest by
    1 / (1 - rate) so the expectation is unchanged."""
    keep = jax.random.bernoulli(key, 1.0 - rate, x.shape)
    return jnp.where(keep, x / jnp.asarray(1.0 - rate, x.dtype), jnp.zeros((), x.dtype))


def parallel_block(p: Params, x: jax.Array, positions: jax.Array, config: PalmConfig,
                   dropout_key: jax.Array | None = None) -> jax.Array:
    """One PaLM layer: y = x + MLP(LN(x)) + Attention(LN(x)), with a single shared layer norm.

    The parallel form lets the attention and MLP input matmuls read the same normalised input
    (PaLM reports ~15% faster training at large scale, neutral quality at 62B+). With a
    `dropout_key` and a positive `config.dropout_rate`, both branches pass through residual
    dropout before they join the residual stream.
    """
    h = layer_norm(x, p["ln_scale"], config.layer_norm_epsilon)
    q, k, v = project_qkv(p, h, positions, config)
    attn = attention_output(p, attend(q, k, v, positions, positions, config), config)
    mlp = swiglu_mlp(p, h, config)
    if dropout_key is not None and config.dropout_rate > 0:
        mlp_key, attn_key = jax.random.split(dropout_key)
        mlp = dropout(mlp, config.dropout_rate, mlp_key)
        attn = dropout(attn, config.dropout_rate, attn_key)
    y = x + mlp + attn
    return constrain(y, ("batch", "seq", "act_embed"), config.logical_axis_rules)
