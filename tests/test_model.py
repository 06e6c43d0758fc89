"""Tests of the PaLM model: each architectural feature has a test that fails if it is removed.

Small shapes throughout (palm-tiny at sequence length 16) so the file runs in seconds on 2 cores.
Sharded tests need >= 4 (or 8) CPU devices, which tests/conftest.py provides; they skip otherwise.
"""

from __future__ import annotations

import contextlib
import functools
import io
import json
import math

import jax
import jax.ad_checkpoint
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding

import model
from model import cli
from model.layers import apply_rope, parallel_block, project_qkv, rope_angles
from model.palm import hidden_states

CFG = model.get_config("palm-tiny", seq_len=16)
BATCH, SEQ = 8, CFG.seq_len


@pytest.fixture(scope="module")
def params():
    return jax.jit(model.init_params, static_argnums=0)(CFG, jax.random.key(0))  # one compile, not seven


@pytest.fixture(scope="module")
def batch():
    tokens = jax.random.randint(jax.random.key(1), (BATCH, SEQ + 1), 0, CFG.vocab_size)
    return model.batch_from_tokens(tokens)


@functools.cache
def _jitted(name: str, config=CFG):
    return jax.jit(functools.partial(getattr(model, name), config=config))


def _leaves_with_paths(tree):
    return [(jax.tree_util.keystr(path), leaf) for path, leaf in jax.tree_util.tree_leaves_with_path(tree)]


def test_paper_presets_param_counts():
    # PaLM Table 1: 8.63B, 62.50B, 540.35B parameters.
    for name, expected, (layers, heads, d_model) in [
        ("palm-8b", "8.63", (32, 16, 4096)),
        ("palm-62b", "62.50", (64, 32, 8192)),
        ("palm-540b", "540.35", (118, 48, 18432)),
    ]:
        config = model.get_config(name)
        assert (config.n_layers, config.n_heads, config.d_model) == (layers, heads, d_model)
        assert (config.head_dim, config.d_ff, config.vocab_size, config.seq_len) == (256, 4 * d_model, 256_000, 2048)
        assert f"{model.param_count(config) / 1e9:.2f}" == expected


def test_small_presets_sizes():
    assert model.param_count(model.get_config("palm-tiny")) < 1e6
    assert 1e6 < model.param_count(model.get_config("palm-small")) < 1e7
    assert 0.9e9 < model.param_count(model.get_config("palm-1b")) < 1.1e9
    with pytest.raises(KeyError):
        model.get_config("palm-3b")
    with pytest.raises(ValueError):
        CFG.replace(remat="sometimes")


def test_no_biases_one_norm_per_block(params):
    names = {path for path, _ in _leaves_with_paths(params)}
    # Exactly these tensors: kernels, the shared embedding, layer-norm scales. No biases anywhere.
    assert names == {
        "['embedding']", "['final_ln_scale']", "['layers']['ln_scale']", "['layers']['wq']", "['layers']['wk']",
        "['layers']['wv']", "['layers']['wo']", "['layers']['w_gate']", "['layers']['w_up']", "['layers']['w_down']",
    }
    assert not any("bias" in name for name in names)
    # One layer norm per parallel block: a single [L, d] scale, initialised to ones.
    np.testing.assert_array_equal(params["layers"]["ln_scale"], np.ones((CFG.n_layers, CFG.d_model)))


def test_initialisation_scales_and_distinct_keys(params):
    layers = params["layers"]
    fan_in = {"wq": CFG.d_model, "wk": CFG.d_model, "wv": CFG.d_model, "wo": CFG.n_heads * CFG.head_dim,
              "w_gate": CFG.d_model, "w_up": CFG.d_model, "w_down": CFG.d_ff}
    for name, n_in in fan_in.items():
        assert float(jnp.std(layers[name])) == pytest.approx(1 / math.sqrt(n_in), rel=0.1), name
    assert float(jnp.std(params["embedding"])) == pytest.approx(1.0, rel=0.05)
    # Same-shaped tensors drawn from one reused key would be identical.
    assert not np.allclose(layers["wk"], layers["wv"])
    assert not np.allclose(layers["w_gate"], layers["w_up"])
    assert not np.allclose(layers["wq"][0], layers["wq"][1])


def test_multi_query_attention_has_one_kv_head(params):
    layers = params["layers"]
    assert layers["wq"].shape == (CFG.n_layers, CFG.d_model, CFG.n_heads, CFG.head_dim)
    assert layers["wk"].shape == layers["wv"].shape == (CFG.n_layers, CFG.d_model, CFG.head_dim)
    layer0 = jax.tree.map(lambda x: x[0], layers)
    h = jnp.ones((2, 5, CFG.d_model))
    q, k, v = jax.eval_shape(functools.partial(project_qkv, config=CFG), layer0, h, jnp.zeros((2, 5), jnp.int32))
    assert q.shape == (2, 5, CFG.n_heads, CFG.head_dim) and k.shape == v.shape == (2, 5, CFG.head_dim)
    cache = model.init_cache(CFG, batch_size=2, max_len=7)
    assert cache["k"].shape == cache["v"].shape == (CFG.n_layers, 2, 7, CFG.head_dim)


def _reference_block(p, x, config):
    """PaLM's parallel block written out in float64 numpy, independently of model.layers."""
    p = {k: np.asarray(v, np.float64) for k, v in p.items()}
    x = np.asarray(x, np.float64)
    mean = x.mean(-1, keepdims=True)
    h = (x - mean) / np.sqrt(((x - mean) ** 2).mean(-1, keepdims=True) + config.layer_norm_epsilon) * p["ln_scale"]
    t = x.shape[1]
    half = config.head_dim // 2
    angle = np.arange(t)[:, None] * config.rope_base ** (-np.arange(half) / half)  # [T, Q/2]

    def rope(a):  # a [..., T, (H,) Q] with T at axis 1
        sin, cos = np.sin(angle), np.cos(angle)
        if a.ndim == 4:
            sin, cos = sin[:, None], cos[:, None]
        a1, a2 = a[..., :half], a[..., half:]
        return np.concatenate([a1 * cos - a2 * sin, a2 * cos + a1 * sin], -1)

    q = rope(np.einsum("btd,dhk->bthk", h, p["wq"]))
    k = rope(h @ p["wk"])
    v = h @ p["wv"]
    scores = np.einsum("bthk,bsk->bhts", q, k) / np.sqrt(config.head_dim)
    scores = np.where(np.tril(np.ones((t, t), bool)), scores, -np.inf)
    probs = np.exp(scores - scores.max(-1, keepdims=True))
    probs /= probs.sum(-1, keepdims=True)
    attention = np.einsum("bthk,hkd->btd", np.einsum("bhts,bsk->bthk", probs, v), p["wo"])
    gate = h @ p["w_gate"]
    mlp = (gate / (1 + np.exp(-gate)) * (h @ p["w_up"])) @ p["w_down"]
    return x + mlp + attention  # y = x + MLP(LN(x)) + Attention(LN(x))


def test_parallel_block_matches_formula(params):
    layer0 = jax.tree.map(lambda x: x[0], params["layers"])
    # A non-trivial norm scale, so a block that normalised twice or skipped the scale would differ.
    layer0["ln_scale"] = 1.0 + 0.5 * jax.random.normal(jax.random.key(5), (CFG.d_model,))
    x = jax.random.normal(jax.random.key(2), (2, 9, CFG.d_model))
    positions = jnp.broadcast_to(jnp.arange(9), (2, 9))
    got = jax.jit(functools.partial(parallel_block, config=CFG))(layer0, x, positions)
    np.testing.assert_allclose(got, _reference_block(layer0, x, CFG), rtol=2e-4, atol=2e-4)


def test_rope_scores_depend_only_on_relative_offset():
    q = jax.random.normal(jax.random.key(3), (CFG.head_dim,))
    k = jax.random.normal(jax.random.key(4), (CFG.head_dim,))

    def score(m, n):
        sin_m, cos_m = rope_angles(jnp.array(m), CFG.head_dim, CFG.rope_base)
        sin_n, cos_n = rope_angles(jnp.array(n), CFG.head_dim, CFG.rope_base)
        return float(apply_rope(q, sin_m, cos_m) @ apply_rope(k, sin_n, cos_n))

    assert score(3, 1) == pytest.approx(score(10, 8), abs=1e-4) == pytest.approx(score(60, 58), abs=1e-4)
    assert abs(score(3, 1) - score(3, 2)) > 1e-3  # fails if RoPE is the identity


def test_model_is_translation_invariant_in_position(params, batch):
    # No absolute position information anywhere: shifting every position leaves the logits alone.
    tokens = batch["inputs"][:2]
    base = _jitted("forward")(params, tokens)
    shifted = _jitted("forward")(params, tokens, positions=jnp.arange(SEQ)[None].repeat(2, 0) + 7)
    np.testing.assert_allclose(base, shifted, atol=2e-4)


def test_embeddings_are_tied_and_logits_scaled(params, batch):
    odd_vocab = CFG.replace(vocab_size=389)  # a size no other dimension has
    shapes = model.abstract_params(odd_vocab)
    assert [path for path, leaf in _leaves_with_paths(shapes) if 389 in leaf.shape] == ["['embedding']"]
    tokens = batch["inputs"][:2]
    hidden = jax.jit(functools.partial(hidden_states, config=CFG))(params, tokens)
    expected = hidden @ params["embedding"].T / math.sqrt(CFG.d_model)  # PaLM: logits scaled 1/sqrt(d)
    np.testing.assert_allclose(_jitted("forward")(params, tokens), expected, rtol=1e-5, atol=1e-5)
    # A token that is never input or target still gets a gradient: its row serves the output layer.
    unused = np.setdiff1d(np.arange(CFG.vocab_size), np.concatenate([np.ravel(batch["inputs"]), np.ravel(batch["targets"])]))[0]
    _, grads = _jitted("grads_fn")(params, batch)
    assert float(jnp.abs(grads["embedding"][unused]).sum()) > 0


def test_z_loss_term_present(params, batch):
    terms = _jitted("loss_terms")(params, batch)
    log_z = jax.nn.logsumexp(_jitted("forward")(params, batch["inputs"]), axis=-1)
    assert float(terms["z_loss"]) == pytest.approx(1e-4 * float(jnp.mean(log_z**2)), rel=1e-4)
    assert float(terms["z_loss"]) > 0
    assert float(terms["loss"]) == pytest.approx(float(terms["cross_entropy"] + terms["z_loss"]), rel=1e-6)
    cross_entropy = jnp.mean(log_z - jnp.take_along_axis(
        _jitted("forward")(params, batch["inputs"]), batch["targets"][..., None], -1)[..., 0])
    assert float(terms["cross_entropy"]) == pytest.approx(float(cross_entropy), rel=1e-5)


def test_remat_policies_same_gradients_fewer_residuals(params, batch):
    ref_loss, ref_grads = _jitted("grads_fn")(params, batch)
    loss, grads = _jitted("grads_fn", CFG.replace(remat="palm"))(params, batch)
    np.testing.assert_allclose(loss, ref_loss, rtol=1e-6)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6), grads, ref_grads)
    # The policies are wired in: each saves fewer activations for the backward pass than the last.
    residuals = {}
    for policy in ("none", "palm", "full"):
        config = CFG.replace(remat=policy)
        out = io.StringIO()
        with contextlib.redirect_stdout(out):
            jax.ad_checkpoint.print_saved_residuals(lambda p, c=config: model.loss_fn(p, batch, c), params)
        residuals[policy] = len(out.getvalue().splitlines())
    assert residuals["none"] > residuals["palm"] > residuals["full"]


def test_loss_falls_on_shipped_corpus(params):
    from model.dataset import corpus_tokens, random_batches

    # Components A and B as the runtime runs them, at the shapes other tests already compiled.
    grads_fn, apply_update = _jitted("grads_fn"), _jitted("apply_update")
    state = model.init_opt_state(params, CFG)
    losses = []
    for step, batch in zip(range(30), random_batches(corpus_tokens(), batch_size=BATCH, seq_len=SEQ, seed=0)):
        loss, grads = grads_fn(params, batch)
        params, state = apply_update(params, state, grads, grads, step)
        losses.append(float(loss))
    assert np.isfinite(losses).all()
    assert np.mean(losses[-3:]) < np.mean(losses[:3]) - 2.0, losses  # ~7.4 -> ~4.6 nats


def _mesh_or_skip(shape, names):
    needed = int(np.prod(shape))
    if len(jax.devices()) < needed:
        pytest.skip(f"needs {needed} devices (tests/conftest.py sets 8 CPU devices)")
    return model.make_mesh(shape, names, devices=jax.devices()[:needed])


@pytest.mark.parametrize("shape,names", [((2, 2), ("data", "model")), ((2, 2, 2), ("data", "fsdp", "model"))])
def test_sharded_matches_unsharded(params, batch, shape, names):
    mesh = _mesh_or_skip(shape, names)
    ref_loss, ref_grads = _jitted("grads_fn")(params, batch)
    with jax.set_mesh(mesh):
        sharded_params = jax.device_put(params, model.param_shardings(CFG, mesh))
        specs = model.batch_partition_specs(CFG, mesh)
        sharded_batch = {k: jax.device_put(v, NamedSharding(mesh, specs[k])) for k, v in batch.items()}
        if len(shape) == 2:  # the forward pass alone once; the gradients (which contain it) on both
            logits = jax.jit(functools.partial(model.forward, config=CFG))(sharded_params, sharded_batch["inputs"])
            np.testing.assert_allclose(logits, _jitted("forward")(params, batch["inputs"]), rtol=1e-5, atol=1e-5)
        loss, grads = jax.jit(functools.partial(model.grads_fn, config=CFG))(sharded_params, sharded_batch)
    assert "model" in str(sharded_params["layers"]["wq"].sharding.spec)
    assert grads["layers"]["wq"].sharding.spec == sharded_params["layers"]["wq"].sharding.spec
    np.testing.assert_allclose(loss, ref_loss, rtol=1e-6)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6), grads, ref_grads)


def test_two_island_update_equals_full_batch_and_is_symmetric(params, batch):
    grads_fn, apply_update = _jitted("grads_fn"), _jitted("apply_update")
    # Warm the optimizer first: on Adam's first step the update is ~sign(g), which turns rounding
    # noise in near-zero gradients into full-size steps; after a few steps it is smooth in g.
    state = model.init_opt_state(params, CFG)
    p = params
    for step in range(3):
        _, g = grads_fn(p, batch)
        p, state = apply_update(p, state, g, g, step)
    half0 = {k: v[: BATCH // 2] for k, v in batch.items()}
    half1 = {k: v[BATCH // 2 :] for k, v in batch.items()}
    _, g0 = grads_fn(p, half0)  # island 0
    _, g1 = grads_fn(p, half1)  # island 1
    _, g_full = grads_fn(p, batch)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-7),
                 model.average_gradients(g0, g1), g_full)
    on_island0 = apply_update(p, state, g0, g1, 3)
    on_island1 = apply_update(p, state, g1, g0, 3)  # even if an island swaps the order
    single = apply_update(p, state, g_full, g_full, 3)
    for a, b in zip(jax.tree.leaves(on_island0), jax.tree.leaves(on_island1)):
        assert np.array_equal(a, b)  # bitwise
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6), on_island0, single)


def test_export_components_as_stablehlo(params, batch):
    state = model.init_opt_state(params, CFG)
    grads_export = jax.export.export(_jitted("grads_fn"), platforms=("cpu", "cuda"))(params, batch)
    update_export = jax.export.export(_jitted("apply_update"), platforms=("cpu", "cuda"))(
        params, state, params, params, jnp.int32(0)
    )
    grads_rt = jax.export.deserialize(grads_export.serialize())
    update_rt = jax.export.deserialize(update_export.serialize())
    assert grads_rt.in_avals == grads_export.in_avals and grads_rt.out_avals == grads_export.out_avals
    assert grads_rt.platforms == update_rt.platforms == ("cpu", "cuda")
    _, grads = _jitted("grads_fn")(params, batch)
    new_params, new_state = update_rt.call(params, state, grads, grads, jnp.int32(0))
    ref_params, ref_state = _jitted("apply_update")(params, state, grads, grads, 0)
    for a, b in zip(jax.tree.leaves((new_params, new_state)), jax.tree.leaves((ref_params, ref_state))):
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)


def test_export_for_an_abstract_mesh():
    # A program is exported for an island's mesh by a process that does not own its devices.
    mesh = jax.sharding.AbstractMesh((2, 2), ("data", "model"), axis_types=(jax.sharding.AxisType.Auto,) * 2)
    with jax.sharding.use_abstract_mesh(mesh):
        param_specs = model.param_partition_specs(CFG, mesh)
        shard = lambda spec: NamedSharding(mesh, spec)  # noqa: E731
        params_in = jax.tree.map(shard, param_specs, is_leaf=lambda s: isinstance(s, jax.sharding.PartitionSpec))
        batch_in = {k: shard(model.logical_to_mesh_spec(("batch", "seq"), CFG.logical_axis_rules, mesh))
                    for k in ("inputs", "targets")}
        fn = jax.jit(functools.partial(model.grads_fn, config=CFG), in_shardings=(params_in, batch_in),
                     out_shardings=(shard(jax.sharding.PartitionSpec()), params_in))
        batch = {k: jax.ShapeDtypeStruct((BATCH, SEQ), jnp.int32) for k in ("inputs", "targets")}
        exported = jax.export.export(fn, platforms=("cpu", "cuda"))(model.abstract_params(CFG), batch)
    assert exported.nr_devices == 4


def test_cached_decoding_equals_full_forward(params, batch):
    tokens = batch["inputs"][:2]
    full = _jitted("forward")(params, tokens)
    prefill = jax.jit(functools.partial(model.prefill, config=CFG), static_argnames="max_len")
    logits, cache = prefill(params, tokens[:, :5], max_len=SEQ)
    np.testing.assert_allclose(logits, full[:, :5], atol=1e-5)
    step = jax.jit(functools.partial(model.decode_step, config=CFG))
    for position in range(5, SEQ):
        logits, cache = step(params, cache, tokens[:, position], position)
        np.testing.assert_allclose(logits, full[:, position], rtol=1e-4, atol=1e-4)


def test_generate_greedy_and_sampled(params, batch):
    generate = jax.jit(model.generate, static_argnames=("config", "max_new_tokens", "temperature"))
    prompt = batch["inputs"][:2, :4]
    new = SEQ - 4
    out = generate(params, prompt, CFG, new)
    assert out.shape == (2, SEQ)
    np.testing.assert_array_equal(out[:, :4], prompt)
    # Greedy decoding with the cache picks the argmax of a full recomputation at every position.
    np.testing.assert_array_equal(out[:, 4:], jnp.argmax(_jitted("forward")(params, out)[:, 3:-1], -1))
    a = generate(params, prompt, CFG, new, temperature=1.0, key=jax.random.key(7))
    b = generate(params, prompt, CFG, new, temperature=1.0, key=jax.random.key(7))
    c = generate(params, prompt, CFG, new, temperature=1.0, key=jax.random.key(8))
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)


def test_param_partition_specs_follow_rules():
    specs = model.param_partition_specs(CFG, model.make_mesh((1, 1), ("data", "model"), jax.devices()[:1]))
    assert specs["layers"]["wq"] == jax.sharding.PartitionSpec(None, None, "model")
    assert specs["embedding"] == jax.sharding.PartitionSpec("model")
    replicated = model.param_partition_specs(CFG, rules=model.DATA_PARALLEL_RULES)
    assert all(spec == jax.sharding.PartitionSpec() for spec in jax.tree.leaves(
        replicated, is_leaf=lambda s: isinstance(s, jax.sharding.PartitionSpec)))
    # Without a mesh in context, constraints are no-ops.
    x = jnp.ones((2, 3))
    assert model.constrain(x, ("batch", "act_embed"), CFG.logical_axis_rules) is x


def test_cli_model_json_and_list(capsys):
    assert cli.main(["model", "--config", "palm-540b", "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["params"] == model.param_count(model.get_config("palm-540b"))
    assert info["flops_per_token"] == model.flops_per_token(model.get_config("palm-540b"))
    assert (info["layers"], info["d_model"], info["heads"], info["kv_heads"]) == (118, 18432, 48, 1)
    assert cli.main(["model", "--list"]) == 0
    listing = capsys.readouterr().out
    assert all(name in listing for name in model.list_configs())
    assert cli.main(["model", "--config", "no-such-model"]) == 2
