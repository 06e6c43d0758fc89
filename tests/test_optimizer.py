"""Tests of PaLM's Adafactor: schedules, equivalence with optax's Adafactor, weight decay, scaling."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from model.optimizer import (
    AdafactorConfig,
    init_optimizer_state,
    learning_rate,
    optimizer_update,
    second_moment_decay,
)

PALM = AdafactorConfig()


def test_learning_rate_schedule_is_palms():
    # 1e-2 for the first 10k steps, then 1/sqrt(k) (k = 1-based step).
    assert float(learning_rate(0, PALM)) == pytest.approx(1e-2)
    assert float(learning_rate(9_999, PALM)) == pytest.approx(1e-2)
    assert float(learning_rate(39_999, PALM)) == pytest.approx(1 / np.sqrt(40_000))
    assert float(learning_rate(999_999, PALM)) == pytest.approx(1e-3)
    short = AdafactorConfig(constant_steps=10, warmup_steps=4)
    assert float(learning_rate(0, short)) == pytest.approx(1e-2 / 4)
    assert float(learning_rate(39, short)) == pytest.approx(1e-2 * np.sqrt(10 / 40))


def test_beta2_schedule():
    assert float(second_moment_decay(0, PALM)) == 0.0  # first step: v = g^2
    assert float(second_moment_decay(99, PALM)) == pytest.approx(1 - 100**-0.8)


def _tree(key):
    k1, k2, k3 = jax.random.split(key, 3)
    return {"w": jax.random.normal(k1, (6, 5)), "b": {"v": jax.random.normal(k2, (7,))}, "z": jnp.zeros((3, 4))}, k3


def test_matches_optax_adafactor_with_global_norm_clip():
    """Without weight decay the update is optax's unfactored Adafactor after a global-norm clip."""
    config = AdafactorConfig(weight_decay_exponent=None, constant_steps=3)
    reference = optax.chain(
        optax.clip_by_global_norm(1.0),
        optax.adafactor(
            learning_rate=lambda count: learning_rate(count, config),
            factored=False,
            decay_rate=0.8,
            multiply_by_parameter_scale=True,
            clipping_threshold=None,
            momentum=0.9,
            eps=1e-30,
        ),
    )
    params, key = _tree(jax.random.key(0))
    ours_params, ours_state = params, init_optimizer_state(params)
    ref_params, ref_state = params, reference.init(params)
    update = jax.jit(lambda p, s, g, step: optimizer_update(p, s, g, step, config))

    @jax.jit
    def reference_update(p, s, g):
        updates, s = reference.update(g, s, p)
        return optax.apply_updates(p, updates), s

    for step in range(6):
        key, sub = jax.random.split(key)
        grads, _ = _tree(sub)
        grads = jax.tree.map(lambda g: g * (3.0 if step % 2 else 0.2), grads)  # clip on odd steps only
        ours_params, ours_state = update(ours_params, ours_state, grads, step)
        ref_params, ref_state = reference_update(ref_params, ref_state, grads)
        jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=2e-5, atol=1e-7), ours_params, ref_params)


def test_weight_decay_is_lr_squared_and_decoupled():
    params = {"w": jnp.full((4, 4), 2.0)}
    zero = {"w": jnp.zeros((4, 4))}
    new, _ = optimizer_update(params, init_optimizer_state(params), zero, 0, PALM)
    # Zero gradient: only the decay acts, p <- p (1 - lr^2), independent of the parameter scale.
    np.testing.assert_allclose(new["w"], 2.0 * (1 - 1e-2**2), rtol=1e-6)


def test_parameter_scaling_is_per_layer_for_stacked_params():
    layer = jnp.ones((3, 3))
    params = {"stacked": jnp.stack([10 * layer, layer]), "flat": jnp.stack([10 * layer, layer])}
    grads = jax.tree.map(jnp.ones_like, params)
    config = AdafactorConfig(weight_decay_exponent=None)
    new, _ = optimizer_update(params, init_optimizer_state(params), grads, 0, config,
                              stacked={"stacked": True, "flat": False})
    step_stacked = params["stacked"] - new["stacked"]
    step_flat = params["flat"] - new["flat"]
    # Per layer: the step is proportional to each layer's own RMS (10 vs 1).
    np.testing.assert_allclose(step_stacked[0] / step_stacked[1], 10.0, rtol=1e-3)
    # One block: both layers move by the same amount, set by the RMS of the whole tensor.
    np.testing.assert_allclose(step_flat[0], step_flat[1], rtol=1e-3)


def test_zero_initialised_params_still_move():
    params = {"w": jnp.zeros((2, 2))}
    new, _ = optimizer_update(params, init_optimizer_state(params), {"w": jnp.ones((2, 2))}, 0, PALM)
    # RMS(0) is floored at 1e-3, so the first step is -lr * 1e-3 * (1 - beta1) * sign(g).
    np.testing.assert_allclose(new["w"], -1e-2 * 1e-3 * 0.1, rtol=1e-5)
