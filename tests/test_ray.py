"""The Ray backend: islands as Ray actors on a local Ray instance bound to loopback.

The foundation's end-to-end checks run on a RayCluster of 2 islands x 2 devices and must equal
in-process JAX exactly; a killed actor is a lost host; `pathways up --ray` starts, reports,
and stops everything it started. Ray is imported only inside fixtures and tests, after
`start_local_ray` has set the environment that keeps it on loopback.
"""

import json
import os
import pathlib
import re
import signal
import subprocess
import threading
import time

import jax
import numpy as np
import pytest
from test_cli import CLI, free_port
# The foundation's end-to-end checks, collected here again with this module's Ray `client`.
from test_runtime import (  # noqa: F401
    test_300mb_array_round_trip, test_chained_calls_and_reuse_of_compiled_function,
    test_dtypes_round_trip_and_compute, test_outputs_exist_before_the_computation_runs,
    test_pytree_in_and_out, test_replicated_and_partially_sharded_arrays, test_scalar,
    test_shard_map_psum, test_sharded_matmul_plus_reduction_matches_jax)

import runtime
from runtime._ray import start_local_ray

pytestmark = pytest.mark.ray

#: Logical CPUs of the test's Ray instance: two 2-island x 2-device clusters at once.
RAY_CPUS = 8


@pytest.fixture(scope="module")
def ray_instance():
    """A local Ray on loopback shared by the module's clusters; its GCS address."""
    started = start_local_ray(num_cpus=RAY_CPUS)
    import ray

    yield ray.get_runtime_context().gcs_address
    if started:
        ray.shutdown()


@pytest.fixture(scope="module")
def ray_cluster(ray_instance):
    with runtime.RayCluster(islands=2, devices_per_host=2) as cluster:
        yield cluster


@pytest.fixture
def client(ray_cluster):
    with runtime.Client(ray_cluster.address, name="test") as c:
        yield c


def test_status_shows_ray_backend(client):
    hosts = client.status().hosts
    assert [(h.island, h.host, h.backend, h.num_devices, h.state) for h in hosts] == [
        (0, 0, "ray", 2, "alive"), (1, 0, "ray", 2, "alive")]


def test_ray_cluster_demands_its_token(ray_cluster):
    """Controller and Ray-placed hosts refuse calls without the cluster's token, as on the local
    backend; the hosts got their tokens through the actors' environment."""
    import grpc

    from proto import pathways_pb2 as pb
    from proto import pathways_pb2_grpc as pb_grpc
    from runtime import _auth

    token = ray_cluster.credentials.token
    assert token and ray_cluster.credentials.host_token is None  # clients get no host token
    calls = [(ray_cluster.address,
              lambda ch: pb_grpc.ControllerStub(ch).GetStatus(pb.GetStatusRequest(), timeout=10))]
    calls += [(h.address, lambda ch: pb_grpc.WorkerStub(ch).Ping(pb.PingRequest(), timeout=10))
              for h in ray_cluster.controller.status().hosts]
    assert len(calls) == 3
    for address, call in calls:
        for wrong in (None, token + "x"):
            with _auth.open_channel(address, _auth.Credentials(wrong)) as channel:
                with pytest.raises(grpc.RpcError) as info:
                    call(channel)
                assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED
    with runtime.Client(ray_cluster.address, credentials=ray_cluster.credentials) as c:
        s = c.slice({"d": 2}, island=0)
        assert c.jit(lambda v: v + 1, s)(c.put(np.float32(1), s)).fetch() == 2


def test_two_island_palm_training_on_ray(client):
    """PaLM's two-pod scheme with Ray-placed islands: the loss falls and the islands end with
    bitwise identical parameters."""
    from model.config import get_config
    from model.pods import PodTrainer, TrainSettings

    settings = TrainSettings(get_config("palm-tiny", n_layers=1, seq_len=32), global_batch=4,
                             islands=2, mesh_shape=(2, 1))
    trainer = PodTrainer(client, settings)
    trainer.initialize()
    losses = [r.loss for r in trainer.run(3)]
    assert losses[-1] < losses[0]
    (p0, _, s0), (p1, _, s1) = trainer.fetch_state(0), trainer.fetch_state(1)
    assert s0 == s1 == 3
    assert all(np.array_equal(a, b) for a, b in zip(jax.tree.leaves(p0), jax.tree.leaves(p1)))


def test_ray_and_hosts_listen_on_loopback_only(ray_cluster):
    import ray

    actor_pids = {pid for _, pid in ray.get([a.process.remote()
                                             for a in ray_cluster.hosts().values()])}
    ours = {os.getpid(), *descendants(os.getpid())}
    assert actor_pids <= ours  # the actors run under this process's raylet
    listeners = [(addr, pid) for addr, pid in tcp_listeners() if pid in ours]
    assert actor_pids <= {pid for _, pid in listeners}
    assert len({pid for _, pid in listeners}) >= 4  # this process, GCS, raylet, the actors
    assert [a for a, _ in listeners if not is_loopback(a)] == []


def test_killed_actor_is_a_lost_host(ray_instance):
    with runtime.RayCluster(islands=2, devices_per_host=2) as cluster, \
            runtime.Client(cluster.address) as client:
        s0, s1 = client.slice({"d": 2}, island=0), client.slice({"d": 2}, island=1)
        f1 = client.jit(lambda v: v + 1, s1)
        x1 = f1(client.put(np.zeros(2, np.float32), s1))
        np.testing.assert_array_equal(x1.fetch(), [1, 1])
        cluster.kill_worker(1)
        start = time.monotonic()
        with pytest.raises(runtime.HostLostError, match="host 1.0"):
            x1.fetch(timeout=5)
        with pytest.raises(runtime.HostLostError, match="host 1.0"):
            while time.monotonic() < start + 5:
                f1(x1).fetch(timeout=5)
                time.sleep(0.1)
        with pytest.raises(runtime.HostLostError, match="host 1.0"):
            while time.monotonic() < start + 5:  # Ray's supervision or the heartbeat tells it
                client.slice({"d": 2}, island=1)
                time.sleep(0.1)
        assert time.monotonic() - start < 5
        f0 = client.jit(lambda v: v * 2, s0)
        np.testing.assert_array_equal(f0(client.put(np.ones(2, np.float32), s0)).fetch(), [2, 2])
        states = {h.island: (h.backend, h.state) for h in client.status().hosts}
        assert states[0] == ("ray", "alive")
        assert states[1][0] == "ray" and states[1][1].startswith("lost")


def test_up_ray_starts_reports_and_sigterm_stops_everything():
    """`pathways up --ray` with no address starts its own Ray and leaves nothing behind."""
    port = free_port()
    up = start_up(["--ray"], port)
    try:
        started = descendants(up.pid)
        names = {process_name(p) for p in started}
        assert {"gcs_server", "raylet"} <= names, names
        hosts = check_status(port)
        host_pids = listener_pids(hosts)
        assert len(host_pids) == 2 and host_pids <= set(started)
        compute(port)
    finally:
        up.send_signal(signal.SIGTERM)
        up.wait(timeout=60)
    assert up.returncode == 0
    assert wait_gone(started) == []


def test_up_joins_an_existing_ray_cluster(ray_instance):
    """`pathways up --ray ADDRESS` uses the cluster's nodes and leaves the cluster running."""
    import ray

    port = free_port()
    up = start_up(["--ray", ray_instance], port)
    try:
        hosts = check_status(port)
        host_pids = listener_pids(hosts)
        assert len(host_pids) == 2 and host_pids <= set(descendants(os.getpid()))
        compute(port)
    finally:
        up.send_signal(signal.SIGTERM)
        up.wait(timeout=60)
    assert up.returncode == 0
    assert wait_gone(host_pids) == []
    assert ray.is_initialized() and ray.cluster_resources().get("CPU") == RAY_CPUS


def start_up(extra: list[str], port: int) -> subprocess.Popen:
    """`pathways up` of 2 islands x 2 devices, returned once it reports its address."""
    up = subprocess.Popen(CLI + ["up", "--islands", "2", "--devices-per-island", "2", "--port",
                                 str(port)] + extra,
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines = []
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        line = up.stdout.readline()
        if not line:
            up.kill()
            pytest.fail(f"pathways up exited early: {''.join(lines)}")
        lines.append(line)
        if re.fullmatch(rf"controller listening on 127\.0\.0\.1:{port}\n", line):
            # Keep draining its output so that Ray's log lines never fill the pipe.
            threading.Thread(target=up.stdout.read, daemon=True).start()
            return up
    up.kill()
    pytest.fail(f"pathways up did not report its address in time: {''.join(lines)}")


def check_status(port: int) -> list[str]:
    """Checks `pathways status` (table and JSON) shows two ray hosts; returns their addresses."""
    status = subprocess.run(CLI + ["status", f"127.0.0.1:{port}"], capture_output=True,
                            text=True, timeout=60)
    assert status.returncode == 0, status.stderr
    rows = [r.split() for r in status.stdout.splitlines() if re.match(r"\s+\d+\s+\d+\s", r)]
    assert [(r[0], r[1], r[3], r[4], r[5], r[-1]) for r in rows] == [
        ("0", "0", "ray", "cpu", "2", "alive"), ("1", "0", "ray", "cpu", "2", "alive")]
    status = subprocess.run(CLI + ["status", f"127.0.0.1:{port}", "--json"], capture_output=True,
                            text=True, timeout=60)
    return [h["address"] for h in json.loads(status.stdout)["hosts"]]


def compute(port: int) -> None:
    with runtime.Client(f"127.0.0.1:{port}") as client:
        s = client.slice({"d": 2}, island=1)
        out = client.jit(lambda v: v.sum() * 2, s)(client.put(np.arange(6.0, dtype=np.float32), s))
        assert out.fetch() == 30.0


def tcp_listeners() -> list[tuple[str, int]]:
    """(local address, pid) of every listening TCP socket of this user's processes."""
    out = subprocess.run(["ss", "-Hltnp"], capture_output=True, text=True, check=True).stdout
    found = []
    for line in out.splitlines():
        fields = line.split()
        for pid in re.findall(r"pid=(\d+)", line):
            found.append((fields[3], int(pid)))
    return found


def listener_pids(addresses: list[str]) -> set[int]:
    ports = {a.rsplit(":", 1)[1] for a in addresses}
    return {pid for addr, pid in tcp_listeners() if addr.rsplit(":", 1)[1] in ports}


def is_loopback(address: str) -> bool:
    host = address.rsplit(":", 1)[0].strip("[]")
    return host.startswith("127.") or host in ("::1", "::ffff:127.0.0.1") or \
        host.startswith("::ffff:127.")


def _ppids() -> dict[int, int]:
    table = {}
    for proc in pathlib.Path("/proc").iterdir():
        if proc.name.isdigit():
            try:
                stat = (proc / "stat").read_text()
            except OSError:
                continue
            table[int(proc.name)] = int(stat.rsplit(")", 1)[1].split()[1])
    return table


def descendants(pid: int) -> list[int]:
    """Every live process below `pid` in the process tree."""
    children: dict[int, list[int]] = {}
    for child, parent in _ppids().items():
        children.setdefault(parent, []).append(child)
    found, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def process_name(pid: int) -> str:
    try:
        return pathlib.Path(f"/proc/{pid}/comm").read_text().strip()
    except OSError:
        return ""


def alive(pid: int) -> bool:
    try:
        stat = pathlib.Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def wait_gone(pids, timeout: float = 15.0) -> list[int]:
    """The pids still alive after waiting up to `timeout` s for them all to exit."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and any(alive(p) for p in pids):
        time.sleep(0.2)
    return [p for p in pids if alive(p)]
