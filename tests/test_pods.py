"""PaLM's multi-pod training scheme on the runtime: pods agree bitwise (two and four of them), two
pods equal one with the same global batch, pods of two hosts on a 2-D mesh, and a resumed run
equals an uninterrupted one."""

import json
import subprocess
import sys

import jax
import numpy as np
import pytest

from model.checkpoint import CheckpointStore
from model.config import get_config
from model.optimizer import AdafactorConfig
from model.pods import PodTrainer, TrainSettings

CONFIG = get_config("palm-tiny", n_layers=1, seq_len=32)
STEPS = 4


def leaves(tree):
    return jax.tree.leaves(tree)


def assert_close_but_for_rounding_flips(a, b):
    """Parameters of two runs whose gradients were summed in another order: equal to rounding,
    but for the few elements whose gradient sat at rounding noise, where Adafactor's update
    (about lr x the parameter's RMS, whatever the gradient's size) may go either way: at most
    0.1% of them, each within STEPS such updates each way."""
    far = ~np.isclose(a, b, rtol=1e-4, atol=1e-6)
    assert far.mean() <= 1e-3, f"{far.sum()} of {far.size} elements differ"
    bound = 2 * STEPS * AdafactorConfig().peak_learning_rate * max(
        float(np.sqrt(np.mean(np.square(a, dtype=np.float64)))), 1e-3)
    assert np.all(np.abs(a - b)[far] <= bound), np.abs(a - b)[far].max()


@pytest.fixture(scope="module")
def two_island_run(cluster):
    client = cluster.client("two-pods")
    trainer = PodTrainer(client, TrainSettings(CONFIG, global_batch=4, islands=2, mesh_shape=(2, 1)))
    trainer.initialize()
    results = trainer.run(STEPS)
    yield trainer, results
    client.close()


def test_islands_hold_bitwise_identical_parameters(two_island_run):
    trainer, results = two_island_run
    assert [r.step for r in results] == list(range(1, STEPS + 1))  # updates applied, as step_K
    (p0, o0, s0), (p1, o1, s1) = trainer.fetch_state(0), trainer.fetch_state(1)
    assert s0 == s1 == STEPS
    for a, b in zip(leaves((p0, o0)), leaves((p1, o1))):
        assert a.dtype == b.dtype and np.array_equal(a, b)
    assert trainer.pods_agree()
    assert trainer.slices[0].shape == {"fsdp": 2, "model": 1}  # the default pod mesh


def test_two_islands_match_one_island_with_the_same_global_batch(cluster, two_island_run):
    trainer, results = two_island_run
    client = cluster.client("one-pod")
    try:
        one = PodTrainer(client, TrainSettings(CONFIG, global_batch=4, islands=1, mesh_shape=(2, 1)))
        one.initialize()
        single = one.run(STEPS)
        np.testing.assert_allclose([r.loss for r in single], [r.loss for r in results], rtol=1e-5)
        for a, b in zip(leaves(one.fetch_state(0)[0]), leaves(trainer.fetch_state(0)[0])):
            assert_close_but_for_rounding_flips(a, b)
        assert results[-1].loss < results[0].loss  # and it learns
    finally:
        client.close()


def test_two_pods_of_two_hosts_each(two_island_run):
    """PaLM's real setting: each pod is several hosts (here 2 worker processes of 2 devices, one
    JAX distributed system per island, a 2 x 2 fsdp x model mesh across them: parameters and
    optimizer state sharded over both axes). Gradients sharded over a pod's hosts are gathered
    there and sent across; the islands stay bitwise identical and follow the single-host run's
    losses."""
    import runtime

    _, results = two_island_run
    settings = TrainSettings(CONFIG, global_batch=4, islands=2, mesh_shape=(2, 2))
    with runtime.ProcessCluster(islands=2, hosts_per_island=2, devices_per_host=2) as pods, \
            runtime.Client(pods.address, credentials=pods.credentials) as client:
        trainer = PodTrainer(client, settings)
        assert all(len({d.host for d in s.info.devices}) == 2 for s in trainer.slices)
        assert trainer.param_specs["layers"]["w_up"] == jax.sharding.PartitionSpec(None, "fsdp", "model")
        trainer.initialize()
        losses = [r.loss for r in trainer.run(STEPS)]
        (p0, o0, s0), (p1, o1, s1) = trainer.fetch_state(0), trainer.fetch_state(1)
    assert s0 == s1 == STEPS
    assert all(np.array_equal(a, b) for a, b in zip(leaves((p0, o0)), leaves((p1, o1))))
    np.testing.assert_allclose(losses, [r.loss for r in results], rtol=1e-4)


@pytest.mark.slow
def test_resume_continues_the_same_trajectory_exactly(cluster, two_island_run, tmp_path):
    trainer, results = two_island_run
    client = cluster.client("resume")
    try:
        settings = TrainSettings(CONFIG, global_batch=4, islands=2, mesh_shape=(2, 1))
        first = PodTrainer(client, settings)
        first.initialize()
        with CheckpointStore(tmp_path, CONFIG, settings.seed) as store:
            first.run(STEPS // 2, checkpoints=store, checkpoint_every=STEPS // 2)
        resumed = PodTrainer(client, settings)
        assert resumed.restore(str(tmp_path)) == STEPS // 2
        rest = resumed.run(STEPS - STEPS // 2)
        assert [r.loss for r in rest] == [r.loss for r in results[STEPS // 2:]]
        for a, b in zip(leaves(resumed.fetch_state(0)[:2]), leaves(trainer.fetch_state(0)[:2])):
            assert np.array_equal(a, b)
    finally:
        client.close()


@pytest.mark.slow
def test_four_pods_from_the_command_line():
    """`pathways train --islands 4 --mesh fsdp=2,model=1`: four simulated pods average their
    gradients host to host and end with bitwise-equal parameters and optimizer state."""
    train = subprocess.run(
        [sys.executable, "-m", "runtime.cli", "train", "--config", "palm-tiny", "n_layers=1",
         "seq_len=32", "--islands", "4", "--mesh", "fsdp=2,model=1", "--in-process", "--steps", "3",
         "--quiet", "--verify-pods", "--json"],
        capture_output=True, text=True, timeout=900)
    assert train.returncode == 0, train.stderr[-3000:]
    report = json.loads(train.stdout.strip().splitlines()[-1])
    assert report["islands"] == 4 and report["mesh"] == {"fsdp": 2, "model": 1}
    assert report["pods_bitwise_equal"] is True
    assert [h["step"] for h in report["history"]] == [1, 2, 3]
    assert report["param_bytes_per_device"] > 0
    assert report["optimizer_bytes_per_device"] == 2 * report["param_bytes_per_device"]
    assert "nothing will be saved" in train.stderr


@pytest.mark.slow
def test_three_pods_fold_in_and_hand_back(cluster):
    """A number of pods that is not a power of two: pod 2 folds its gradients into pod 0, then
    receives both operands of the update; the three agree bitwise and match one pod."""
    import runtime

    settings = TrainSettings(CONFIG, global_batch=6, islands=3, mesh_shape=(2, 1))
    with runtime.LocalCluster(islands=3, devices_per_island=2) as pods:
        client = pods.client("three-pods")
        trainer = PodTrainer(client, settings)
        trainer.initialize()
        losses = [r.loss for r in trainer.run(STEPS)]
        assert trainer.pods_agree()
        client.close()
    one_client = cluster.client("one-pod-of-six")
    try:
        one = PodTrainer(one_client, TrainSettings(CONFIG, global_batch=6, islands=1, mesh_shape=(2, 1)))
        one.initialize()
        np.testing.assert_allclose(losses, [r.loss for r in one.run(STEPS)], rtol=1e-5)
    finally:
        one_client.close()
