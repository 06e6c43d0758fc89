"""PaLM's training recipe: batch ramp, skipped batches, spike detection, packed documents with
end-of-document separators, held-out documents, dropout, and key=value config overrides."""

import functools

import jax
import numpy as np
import pytest

import model
from model.config import PALM_BATCH_RAMP, get_config
from model.dataset import corpus_documents, packed_sequences, sequences_per_epoch
from model.overrides import apply_overrides
from model.recipe import DataSchedule, SpikeDetector, SpikePolicy, rewind_target
from model.tokenizer import EOS_ID


def test_paper_batch_ramp():
    config = get_config("palm-540b")
    assert config.batch_ramp == PALM_BATCH_RAMP
    assert [config.batch_at(s, 0) for s in (0, 49_999, 50_000, 114_999, 115_000, 255_000)] == \
        [512, 512, 1024, 1024, 2048, 2048]
    schedule = DataSchedule(8, config.batch_ramp)
    assert schedule.first_sequence(50_000) == 512 * 50_000
    assert schedule.first_sequence(115_001) == 512 * 50_000 + 1024 * 65_000 + 2048


def test_schedule_offsets_are_the_sum_of_batch_sizes_and_skips():
    schedule = DataSchedule(4, ((0, 2), (3, 4), (6, 8)))
    sizes = [schedule.batch_size(s) for s in range(10)]
    assert sizes == [2, 2, 2, 4, 4, 4, 8, 8, 8, 8]
    assert [schedule.first_sequence(s) for s in range(10)] == list(np.cumsum([0] + sizes[:-1]))
    skipped = schedule.skipping(2, 3)  # from step 2, jump over the batches of steps 2, 3, 4
    assert skipped.first_sequence(1) == schedule.first_sequence(1)
    assert skipped.first_sequence(2) == schedule.first_sequence(5)
    assert skipped.first_sequence(4) == schedule.first_sequence(5) + 2 + 4
    restored = DataSchedule(4, schedule.ramp).with_skips_from_json(skipped.as_json())
    assert restored == skipped
    assert DataSchedule(4).first_sequence(7) == 28


def test_spike_detection_and_rewind_target():
    detector = SpikeDetector(SpikePolicy(factor=2.0, window=4))
    assert not any(detector.is_spike(x) for x in (5.0, 4.0, 3.0, 3.0, 2.9, 2.8))
    assert detector.is_spike(7.0)  # > 2 x median(3.0, 3.0, 2.9, 2.8)
    assert not detector.is_spike(3.0)
    assert detector.is_spike(float("nan"))
    detector.reset()
    assert not detector.is_spike(100.0)  # no history after a restart
    assert not any(SpikeDetector(SpikePolicy(factor=0)).is_spike(x) for x in (1.0, 1e9, float("inf")))
    assert rewind_target([100, 200, 300, 400], 420, 100) == 300
    assert rewind_target([300, 400], 420, 100) == 300
    assert rewind_target([400], 420, 100) == 400  # the oldest before the spike
    assert rewind_target([500], 420, 100) is None


def test_documents_are_packed_with_end_of_document_tokens():
    train, held_out = corpus_documents()
    assert len(held_out) * 15 < len(train) < len(held_out) * 25
    assert all(doc[-1] == EOS_ID and EOS_ID not in doc[:-1] for doc in train + held_out)
    assert not {d.tobytes() for d in train} & {d.tobytes() for d in held_out}
    seq = 64
    batch = packed_sequences(train, seq, 0, 8, seed=0)
    assert batch["inputs"].shape == (8, seq)
    np.testing.assert_array_equal(batch["inputs"][:, 1:], batch["targets"][:, :-1])
    np.testing.assert_array_equal(batch["targets"][:-1, -1], batch["inputs"][1:, 0])  # no gaps
    assert np.sum(batch["inputs"] == EOS_ID) >= 1  # documents are short: separators show up
    again = packed_sequences(train, seq, 5, 3, seed=0)
    np.testing.assert_array_equal(again["inputs"], batch["inputs"][5:8])
    # An epoch later the same sequence index reads another document order.
    per_epoch = sequences_per_epoch(train, seq)
    later = packed_sequences(train, seq, per_epoch, 1, seed=0)
    assert not np.array_equal(later["inputs"][0], batch["inputs"][0])


def test_dropout_changes_training_and_only_with_a_key():
    config = get_config("palm-tiny", n_layers=1, seq_len=16, dropout_rate=0.5)
    params = model.init_params(config, jax.random.key(0))
    tokens = jax.random.randint(jax.random.key(1), (2, 17), 0, config.vocab_size)
    batch = model.batch_from_tokens(tokens)
    loss = jax.jit(functools.partial(model.loss_fn, config=config))
    plain = loss(params, batch)
    assert plain == loss(params, batch, dropout_key=None)
    assert plain == jax.jit(functools.partial(model.loss_fn, config=config.replace(dropout_rate=0.0)))(params, batch)
    a, b = loss(params, batch, dropout_key=jax.random.key(2)), loss(params, batch, dropout_key=jax.random.key(3))
    assert a != plain and a != b
    with pytest.raises(ValueError):
        config.replace(dropout_rate=1.0)


def test_key_value_overrides():
    config = apply_overrides(get_config("palm-tiny"), [
        "n_layers=3", "dtype=bfloat16", "optimizer.peak_learning_rate=5e-3", "dropout_rate=0.1",
        "batch_ramp=0:4,10:8", "unroll_layers=true"])
    assert (config.n_layers, config.dtype, config.dropout_rate) == (3, "bfloat16", 0.1)
    assert config.optimizer.peak_learning_rate == 5e-3
    assert config.batch_ramp == ((0, 4), (10, 8)) and config.unroll_layers is True
    with pytest.raises(ValueError, match="n_layer.*did you mean n_layers"):
        apply_overrides(config, ["n_layer=2"])
    with pytest.raises(ValueError, match="n_layers=two"):
        apply_overrides(config, ["n_layers=two"])
    with pytest.raises(ValueError, match="n_layers=0"):
        apply_overrides(config, ["n_layers=0"])  # validated like any config
    with pytest.raises(ValueError, match="batch_ramp"):
        apply_overrides(config, ["batch_ramp=4,8"])


def test_paper_presets_compute_in_bfloat16_over_float32_state():
    for name, remat in (("palm-8b", "palm"), ("palm-62b", "full"), ("palm-540b", "full")):
        config = get_config(name)
        assert (config.dtype, config.param_dtype, config.remat) == ("bfloat16", "float32", remat)
    config = get_config("palm-tiny", n_layers=1, seq_len=16, dtype="bfloat16")
    params = model.abstract_params(config)
    tokens = jax.ShapeDtypeStruct((2, 16), np.int32)
    batch = {"inputs": tokens, "targets": tokens}
    assert jax.eval_shape(functools.partial(model.hidden_states, config=config), params, tokens).dtype == "bfloat16"
    assert jax.eval_shape(functools.partial(model.forward, config=config), params, tokens).dtype == "float32"
    loss, grads = jax.eval_shape(functools.partial(model.grads_fn, config=config), params, batch)
    assert loss.dtype == "float32" and {g.dtype for g in jax.tree.leaves(grads)} == {np.dtype("float32")}
    # Every matmul of the blocks runs on bfloat16 operands.
    jaxpr = jax.make_jaxpr(functools.partial(model.loss_fn, config=config))(params, batch)
    inner = [e for eq in jaxpr.jaxpr.eqns if eq.primitive.name == "scan"
             for e in eq.params["jaxpr"].jaxpr.eqns if e.primitive.name == "dot_general"]
    assert inner and all(v.aval.dtype == np.dtype("bfloat16") for e in inner for v in e.invars)
