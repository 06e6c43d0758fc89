"""PaLM's two-pod training scheme on the runtime: islands agree bitwise, two islands equal one
island with the same global batch, and a resumed run equals an uninterrupted one."""

import subprocess
import sys

import jax
import numpy as np
import pytest

from model.config import get_config
from model.pods import PodTrainer, TrainSettings

CONFIG = get_config("palm-tiny", n_layers=1, seq_len=32)
STEPS = 4


def leaves(tree):
    return jax.tree.leaves(tree)


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
    assert [r.step for r in results] == list(range(STEPS))
    (p0, o0, s0), (p1, o1, s1) = trainer.fetch_state(0), trainer.fetch_state(1)
    assert s0 == s1 == STEPS
    for a, b in zip(leaves((p0, o0)), leaves((p1, o1))):
        assert a.dtype == b.dtype and np.array_equal(a, b)


def test_two_islands_match_one_island_with_the_same_global_batch(cluster, two_island_run):
    trainer, results = two_island_run
    client = cluster.client("one-pod")
    try:
        one = PodTrainer(client, TrainSettings(CONFIG, global_batch=4, islands=1, mesh_shape=(2, 1)))
        one.initialize()
        single = one.run(STEPS)
        np.testing.assert_allclose([r.loss for r in single], [r.loss for r in results], rtol=1e-5)
        for a, b in zip(leaves(one.fetch_state(0)[0]), leaves(trainer.fetch_state(0)[0])):
            np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)
        assert results[-1].loss < results[0].loss  # and it learns
    finally:
        client.close()


def test_two_pods_of_two_hosts_each(two_island_run):
    """PaLM's real setting: each pod is several hosts (here 2 worker processes of 2 devices, one
    JAX distributed system per island, a 2 x 2 data x model mesh across them). Gradients sharded
    over a pod's hosts are gathered there and sent across; the islands stay bitwise identical and
    follow the single-host run's losses."""
    import runtime

    _, results = two_island_run
    settings = TrainSettings(CONFIG, global_batch=4, islands=2, mesh_shape=(2, 2))
    with runtime.ProcessCluster(islands=2, hosts_per_island=2, devices_per_host=2) as pods, \
            runtime.Client(pods.address, credentials=pods.credentials) as client:
        trainer = PodTrainer(client, settings)
        assert all(len({d.host for d in s.info.devices}) == 2 for s in trainer.slices)
        trainer.initialize()
        losses = [r.loss for r in trainer.run(STEPS)]
        (p0, o0, s0), (p1, o1, s1) = trainer.fetch_state(0), trainer.fetch_state(1)
    assert s0 == s1 == STEPS
    assert all(np.array_equal(a, b) for a, b in zip(leaves((p0, o0)), leaves((p1, o1))))
    np.testing.assert_allclose(losses, [r.loss for r in results], rtol=1e-4)


def test_resume_continues_the_same_trajectory_exactly(cluster, two_island_run, tmp_path):
    trainer, results = two_island_run
    client = cluster.client("resume")
    try:
        settings = TrainSettings(CONFIG, global_batch=4, islands=2, mesh_shape=(2, 1))
        first = PodTrainer(client, settings)
        first.initialize()
        first.run(STEPS // 2, checkpoint_dir=str(tmp_path), checkpoint_every=STEPS // 2)
        resumed = PodTrainer(client, settings)
        assert resumed.restore(str(tmp_path)) == STEPS // 2
        rest = resumed.run(STEPS - STEPS // 2)
        assert [r.loss for r in rest] == [r.loss for r in results[STEPS // 2:]]
        for a, b in zip(leaves(resumed.fetch_state(0)[:2]), leaves(trainer.fetch_state(0)[:2])):
            assert np.array_equal(a, b)
    finally:
        client.close()


def test_train_and_generate_commands(tmp_path):
    ckpt = tmp_path / "ckpt"
    train = subprocess.run(
        [sys.executable, "-m", "runtime.cli", "train", "--steps", "3", "--in-process", "--quiet",
         "--global-batch", "4", "--checkpoint-dir", str(ckpt), "--json"],
        capture_output=True, text=True, timeout=600)
    assert train.returncode == 0, train.stderr[-2000:]
    history = __import__("json").loads(train.stdout.strip().splitlines()[-1])["history"]
    assert [h["step"] for h in history] == [0, 1, 2] and all(h["loss"] > 0 for h in history)
    assert (ckpt / "step_3" / "state.msgpack").exists()
    gen = subprocess.run(
        [sys.executable, "-m", "runtime.cli", "generate", "--checkpoint", str(ckpt), "--prompt",
         "The island", "--max-new-tokens", "8"], capture_output=True, text=True, timeout=600)
    assert gen.returncode == 0, gen.stderr[-2000:]
    assert gen.stdout.startswith("The island")
