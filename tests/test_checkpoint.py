"""Orbax checkpoints of PodTrainer: sharded and asynchronous, --keep, a directory refuses another
config, restore onto another mesh shape or number of pods continues bitwise, and a loss spike
rewinds to an earlier checkpoint and skips batches."""

import jax
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from model.checkpoint import CheckpointMismatchError, CheckpointStore, read_run
from model.config import get_config
from model.partitioning import PodMesh
from model.pods import PodTrainer, TrainSettings
from model.recipe import DataSchedule, SpikePolicy

CONFIG = get_config("palm-tiny", n_layers=1, seq_len=32)


def _state(value: float):
    return {"w": np.full((8, 4), value, np.float32), "b": np.arange(4, dtype=np.int32)}


SPECS = {"w": P("fsdp", "model"), "b": P()}


def test_async_sharded_saves_keep_the_newest(tmp_path):
    mesh = PodMesh.parse("fsdp=2,model=2")
    with CheckpointStore(tmp_path, CONFIG, seed=0, keep=2) as store:
        for step in (1, 2, 3):
            store.save(step, _state(step), SPECS, mesh, {"skips": []})  # returns before written
        store.wait()
        assert store.steps() == [2, 3]
        assert sorted(p.name for p in tmp_path.glob("step_*")) == ["step_2", "step_3"]
        like = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype), _state(0))
        # Read back for another mesh shape: the 2 x 2 chunks serve a 4 x 1 layout.
        state, meta = store.restore(3, like, {"w": P("fsdp"), "b": P()}, PodMesh.parse("fsdp=4,model=1"))
    np.testing.assert_array_equal(state["w"], _state(3)["w"])
    assert meta["step"] == 3 and meta["mesh"] == {"fsdp": 2, "model": 2}
    assert read_run(tmp_path) == (CONFIG, 0)


def test_a_directory_refuses_another_config_or_seed(tmp_path):
    CheckpointStore(tmp_path, CONFIG, seed=0).close()
    with pytest.raises(CheckpointMismatchError, match="n_layers: 1 there, 2 here"):
        CheckpointStore(tmp_path, CONFIG.replace(n_layers=2), seed=0)
    with pytest.raises(CheckpointMismatchError, match="seed"):
        CheckpointStore(tmp_path, CONFIG, seed=1)
    # How a run executes (rematerialisation) does not change what its checkpoints hold.
    CheckpointStore(tmp_path, CONFIG.replace(remat="full"), seed=0).close()


@pytest.mark.slow
def test_restore_a_2x2_checkpoint_onto_4x1_and_onto_two_pods(client, tmp_path):
    """A checkpoint written by one pod on a 2 x 2 (fsdp x model) mesh, restored onto one pod of
    4 x 1, continues bitwise as that pod continues from the in-memory state; restored onto two
    pods, they agree bitwise; both follow the uninterrupted 2 x 2 run closely."""
    square = TrainSettings(CONFIG, global_batch=4, islands=1, mesh_shape=(2, 2))
    writer = PodTrainer(client, square)
    writer.initialize()
    with CheckpointStore(tmp_path, CONFIG, square.seed) as store:
        writer.run(2, checkpoints=store, checkpoint_every=2)
    params, opt_state, step = writer.fetch_state()
    uninterrupted = [r.loss for r in writer.run(2)]

    tall = TrainSettings(CONFIG, global_batch=4, islands=1, mesh_shape=(4, 1))
    reference = PodTrainer(client, tall)
    reference.set_state(params, opt_state, step)
    expected = [r.loss for r in reference.run(2)]
    restored = PodTrainer(client, tall)
    assert restored.restore(str(tmp_path)) == 2
    assert restored.slices[0].shape == {"fsdp": 4, "model": 1}
    assert [r.loss for r in restored.run(2)] == expected
    for a, b in zip(jax.tree.leaves(restored.fetch_state()), jax.tree.leaves(reference.fetch_state())):
        assert np.array_equal(a, b)
    np.testing.assert_allclose(expected, uninterrupted, rtol=1e-4)

    two = PodTrainer(client, TrainSettings(CONFIG, global_batch=4, islands=2, mesh_shape=(2, 2)))
    assert two.restore(str(tmp_path)) == 2
    np.testing.assert_allclose([r.loss for r in two.run(2)], uninterrupted, rtol=1e-4)
    assert two.pods_agree()


def test_a_loss_spike_rewinds_and_skips_batches(client, tmp_path):
    settings = TrainSettings(CONFIG, global_batch=4, islands=1, mesh_shape=(2, 1))
    trainer = PodTrainer(client, settings)
    trainer.initialize()
    # factor 0.5: the first loss after a two-step history counts as a spike (a real one is a
    # loss far above the recent median); rewind 2 steps, skip 3 batches, once.
    policy = SpikePolicy(factor=0.5, window=2, rewind=2, skip=3, max_restarts=1)
    with CheckpointStore(tmp_path, CONFIG, settings.seed, keep=None) as store:
        results = trainer.run(5, checkpoints=store, checkpoint_every=1, spikes=policy)
        store.wait()
        _, meta = store.restore(5, jax.eval_shape(trainer._abstract_state),
                                {"params": trainer.param_specs, "opt_state": trainer.opt_specs},
                                settings.mesh)
    steps = [r.step for r in results]
    assert steps == [1, 2, 3, 2, 3, 4, 5]  # spike at 3: back to step_1, go on from there
    assert meta["skips"] == [{"at_step": 1, "batches": 3}]
    plain = DataSchedule(4)
    assert trainer.schedule.first_sequence(1) == plain.first_sequence(4)  # steps 1-3 skipped
    assert results[3].loss != results[1].loss  # step 2 again, on other data
