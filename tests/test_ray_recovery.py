"""Recovery on Ray: a dead actor's island is restarted as a whole on a fresh placement group.

Until the island is back its work fails with HostLostError; afterwards it serves again, empty, as
one distributed system over both nodes of the module's two-node local Ray (tests/test_ray.py's
`ray_instance`); `max_host_restarts` bounds how often. `pathways train --ray` with an actor killed
mid-run resumes from its checkpoint and ends with the parameters of an uninterrupted run.
"""

import os
import subprocess
import sys

import numpy as np
import pytest
from test_ray import ray_instance  # noqa: F401  (the module's own two-node Ray)
from test_recovery import assert_same_newest_checkpoint

import runtime

pytestmark = pytest.mark.ray


def island_hosts(client, island: int) -> list:
    return [h for h in client.status().hosts if h.island == island]


def test_dead_actor_is_replaced_by_a_restarted_island(ray_instance):  # noqa: F811
    import ray

    with runtime.RayCluster(islands=2, hosts_per_island=2, devices_per_host=2,
                            max_host_restarts=1) as cluster, \
            runtime.Client(cluster.address) as client:
        tag = cluster.controller.name_tag
        s0, s1 = client.slice({"d": 4}, island=0), client.slice({"d": 4}, island=1)
        x0 = client.put(np.arange(8, dtype=np.float32), s0)
        f1 = client.jit(lambda v: v + 1, s1)
        x1 = f1(client.put(np.zeros(8, np.float32), s1))
        np.testing.assert_array_equal(x1.fetch(), np.ones(8))
        before = {h.address for h in island_hosts(client, 1)}

        cluster.kill_worker(1, 1)
        # Until the island is back, its work fails (which host is named depends on which of the
        # island's hosts the controller finds lost first: the restart kills the other one).
        with pytest.raises(runtime.HostLostError, match=r"host 1\.[01]"):
            f1(x1).fetch(timeout=30)
        assert cluster.restart_lost_islands() == [1]

        after = island_hosts(client, 1)
        assert [(h.host, h.state, h.distributed_hosts) for h in after] == [
            (0, "alive", 2), (1, "alive", 2)]
        assert not {h.address for h in after} & before
        assert len({h.ray_node for h in after}) == 2  # a fresh STRICT_SPREAD group
        names = {a["name"] for a in ray.util.list_named_actors(all_namespaces=True)}
        assert {f"pathways-{tag}-island-1-host-{h}-restart-1" for h in (0, 1)} <= names
        # The other island kept its arrays; the restarted one starts empty.
        np.testing.assert_array_equal(x0.fetch(timeout=30), np.arange(8))
        with pytest.raises(runtime.PathwaysError):
            x1.fetch(timeout=30)
        s1 = client.slice({"d": 4}, island=1)
        assert sorted(d.host for d in s1.info.devices) == [0, 0, 1, 1]
        y = client.jit(lambda v: v.sum() + v, s1)(client.put(np.arange(8, dtype=np.float32), s1))
        np.testing.assert_array_equal(y.fetch(timeout=60), np.arange(8) + 28)

        # Its one restart used, the island stays lost after the next death.
        cluster.kill_worker(1, 0)
        with pytest.raises(runtime.HostLostError, match=r"host 1\.[01]"):
            client.jit(lambda v: v * 2, s1)(y).fetch(timeout=30)
        with pytest.raises(runtime.PathwaysError, match="max_host_restarts"):
            cluster.restart_lost_islands()
        states = [h.state for h in island_hosts(client, 1)]
        assert states[0].startswith("lost: its Ray actor died"), states


def train(tmp_path, name: str, *extra: str) -> subprocess.CompletedProcess:
    """`pathways train` of 2 pods of 2 hosts x 2 devices for 6 steps, checkpointing every 2."""
    cmd = [sys.executable, "-m", "runtime.cli", "train", "--config", "palm-tiny", "--steps", "6",
           "--mesh", "2x2", "--hosts-per-island", "2", "--checkpoint-every", "2",
           "--checkpoint-dir", str(tmp_path / name), "--quiet", *extra]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=900,
                          env=dict(os.environ, PYTHONUNBUFFERED="1"))


@pytest.mark.timeout(1800)
def test_train_on_ray_survives_a_killed_actor(ray_instance, tmp_path):  # noqa: F811
    """`pathways train --ray` with an actor of the second pod killed at step 3: its island is
    restarted on a fresh placement group, training resumes from its last checkpoint, and the
    final parameters equal those of an uninterrupted run on local worker processes, bit for bit."""
    clean = train(tmp_path, "clean")
    assert clean.returncode == 0, clean.stderr[-3000:]
    faulty = train(tmp_path, "faulty", "--ray", ray_instance, "--kill-worker-at-step", "3")
    assert faulty.returncode == 0, faulty.stderr[-3000:]
    assert "fault injection: killing worker actor of host 1.1" in faulty.stderr
    assert "restarting island 1 on a fresh placement group" in faulty.stderr
    assert "resumed from step" in faulty.stdout
    assert_same_newest_checkpoint(tmp_path / "clean", tmp_path / "faulty", step=6)
