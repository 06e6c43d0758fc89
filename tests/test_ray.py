"""The Ray backend: islands as Ray actors on a local two-node Ray bound to loopback.

The module's Ray has two nodes (a head and a worker node, each with its own raylet and half the
logical CPUs), so islands of two hosts are placed STRICT_SPREAD, one host per node, and form one
JAX distributed system across the nodes. The foundation's end-to-end checks run on islands of one
host and on islands of two hosts and must equal in-process JAX exactly; two-pod PaLM training on
2-host pods ends bitwise equal to the local-process run; a killed actor is a lost host, and its
island is restarted on a fresh placement group, also under `pathways train`, which resumes from its
checkpoint; `pathways up --ray` starts, reports and stops everything it started. Ray is imported
only inside fixtures and tests, after `loopback_ray_environment` has set what keeps it on loopback.
"""

import json
import os
import pathlib
import re
import shutil
import signal
import subprocess
import tempfile
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
from runtime.cluster.ray_connect import loopback_ray_environment

pytestmark = pytest.mark.ray

#: Logical CPUs of the module's Ray, half on each node: room for a 2 x 1 x 2 and two 2 x 2 x 2
#: clusters at once (a 2-host island takes 2 CPUs on each node).
RAY_CPUS = 24
PALM_STEPS = 4


@pytest.fixture(scope="module")
def ray_instance():
    """A local Ray of two nodes on loopback, in a temporary directory of its own (its sessions and
    the address file Ray writes for `ray.init("auto")`); yields its GCS address."""
    loopback_ray_environment()
    import ray
    from ray.cluster_utils import Cluster

    if ray.is_initialized():
        pytest.fail("this process is already a Ray driver")
    before = os.environ.get("RAY_TMPDIR")
    temp = tempfile.mkdtemp(prefix="pw-ray-")  # short: Ray's socket paths live under it
    os.environ["RAY_TMPDIR"] = temp
    node = dict(num_cpus=RAY_CPUS // 2, node_ip_address="127.0.0.1",
                object_store_memory=100 * 2**20)
    nodes = Cluster(initialize_head=True, head_node_args=dict(node, include_dashboard=False))
    try:
        nodes.add_node(**node)
        ray.init(address=nodes.address)
        yield nodes.address
    finally:
        ray.shutdown()
        nodes.shutdown()
        if before is None:
            os.environ.pop("RAY_TMPDIR", None)
        else:
            os.environ["RAY_TMPDIR"] = before
        shutil.rmtree(temp, ignore_errors=True)


@pytest.fixture(scope="module")
def ray_cluster(ray_instance):
    """2 islands of one host with 2 devices each."""
    with runtime.RayCluster(islands=2, devices_per_host=2) as cluster:
        yield cluster


@pytest.fixture(scope="module")
def ray_pods(ray_instance):
    """2 islands of 2 hosts x 2 devices: each island one distributed system over both nodes."""
    with runtime.RayCluster(islands=2, hosts_per_island=2, devices_per_host=2) as cluster:
        yield cluster


@pytest.fixture(params=["1-host islands", "2-host islands"])
def client(request):
    cluster = request.getfixturevalue("ray_cluster" if request.param.startswith("1")
                                      else "ray_pods")
    with runtime.Client(cluster.address, name="test") as c:
        yield c


def test_status_shows_ray_backend_and_node(ray_cluster, ray_pods):
    """Every host reports backend "ray" and the Ray node of its actor; the hosts of a 2-host
    island form one distributed system with one host on each node."""
    import ray

    nodes = {n["NodeID"] for n in ray.nodes() if n["Alive"]}
    assert len(nodes) == 2
    with runtime.Client(ray_cluster.address) as c:
        hosts = c.status().hosts
    assert [(h.island, h.host, h.backend, h.num_devices, h.distributed_hosts, h.state)
            for h in hosts] == [(0, 0, "ray", 2, 0, "alive"), (1, 0, "ray", 2, 0, "alive")]
    assert {h.ray_node for h in hosts} <= nodes
    with runtime.Client(ray_pods.address) as c:
        hosts = c.status().hosts
    assert [(h.island, h.host, h.backend, h.num_devices, h.distributed_hosts, h.state)
            for h in hosts] == [(i, h, "ray", 2, 2, "alive") for i in (0, 1) for h in (0, 1)]
    for island in (0, 1):
        assert {h.ray_node for h in hosts if h.island == island} == nodes


def test_two_host_islands_are_strict_spread_and_named(ray_pods):
    """On a two-node Ray "auto" places each island STRICT_SPREAD, a bundle on each node; groups
    and actors carry island and host in their names (Ray's state API lists them); a slice of an
    island's 4 devices spans both hosts."""
    import ray

    assert ray_pods.placement_strategy == "STRICT_SPREAD"
    tag = ray_pods.controller.name_tag
    groups = {g["name"]: g for g in ray.util.placement_group_table().values()}
    for island in (0, 1):
        group = groups[f"pathways-{tag}-island-{island}"]
        assert (group["strategy"], group["state"]) == ("STRICT_SPREAD", "CREATED")
        assert len(set(group["bundles_to_node_id"].values())) == 2
    names = {a["name"] for a in ray.util.list_named_actors(all_namespaces=True)}
    assert {f"pathways-{tag}-island-{i}-host-{h}" for i in (0, 1) for h in (0, 1)} <= names
    with runtime.Client(ray_pods.address) as c:
        s = c.slice({"d": 4}, island=1)
        assert sorted(d.host for d in s.info.devices) == [0, 0, 1, 1]


def test_ray_cluster_demands_its_token(ray_cluster):
    """Controller and Ray-placed hosts refuse calls without the cluster's token, as on the local
    backend; the hosts got their tokens through the actors' environment."""
    import grpc

    from proto import pathways_pb2 as pb
    from proto import pathways_pb2_grpc as pb_grpc
    from proto import auth as _auth
    from proto import rpc as _rpc

    token = ray_cluster.credentials.token
    assert token and ray_cluster.credentials.host_token is None  # clients get no host token
    calls = [(ray_cluster.address,
              lambda ch: pb_grpc.ControllerStub(ch).GetStatus(pb.GetStatusRequest(), timeout=10))]
    calls += [(h.address, lambda ch: pb_grpc.WorkerStub(ch).Ping(pb.PingRequest(), timeout=10))
              for h in ray_cluster.controller.status_report.status().hosts]
    assert len(calls) == 3
    for address, call in calls:
        for wrong in (None, token + "x"):
            with _rpc.open_channel(address, _auth.Credentials(wrong)) as channel:
                with pytest.raises(grpc.RpcError) as info:
                    call(channel)
                assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED
    with runtime.Client(ray_cluster.address, credentials=ray_cluster.credentials) as c:
        s = c.slice({"d": 2}, island=0)
        assert c.jit(lambda v: v + 1, s)(c.put(np.float32(1), s)).fetch() == 2


def test_two_island_palm_training_on_ray(ray_cluster):
    """PaLM's two-pod scheme with Ray-placed islands: the loss falls and the islands end with
    bitwise identical parameters."""
    from model.config import get_config
    from model.pods import PodTrainer, TrainSettings

    settings = TrainSettings(get_config("palm-tiny", n_layers=1, seq_len=32), global_batch=4,
                             islands=2, mesh_shape=(2, 1))
    with runtime.Client(ray_cluster.address) as client:
        trainer = PodTrainer(client, settings)
        trainer.initialize()
        losses = [r.loss for r in trainer.run(3)]
        (p0, _, s0), (p1, _, s1) = trainer.fetch_state(0), trainer.fetch_state(1)
    assert losses[-1] < losses[0]
    assert s0 == s1 == 3
    assert all(np.array_equal(a, b) for a, b in zip(jax.tree.leaves(p0), jax.tree.leaves(p1)))


@pytest.mark.timeout(900)
def test_two_pods_of_two_hosts_on_ray_equal_local_processes(ray_pods):
    """PaLM's real setting on Ray: 2 pods of 2 hosts (each pod one distributed system over both
    Ray nodes, a 2 x 2 data x model mesh). The islands end bitwise identical, and bitwise equal to
    the same run on local worker processes (tests/test_pods.py)."""
    from model.config import get_config
    from model.pods import PodTrainer, TrainSettings

    settings = TrainSettings(get_config("palm-tiny", n_layers=1, seq_len=32), global_batch=4,
                             islands=2, mesh_shape=(2, 2))

    def train(cluster):
        with runtime.Client(cluster.address, credentials=cluster.credentials) as client:
            trainer = PodTrainer(client, settings)
            assert all(len({d.host for d in s.info.devices}) == 2 for s in trainer.slices)
            trainer.initialize()
            losses = [r.loss for r in trainer.run(PALM_STEPS)]
            return losses, [trainer.fetch_state(island) for island in (0, 1)]

    on_ray, ray_states = train(ray_pods)
    with runtime.ProcessCluster(islands=2, hosts_per_island=2, devices_per_host=2) as local:
        on_local, local_states = train(local)
    assert on_ray == on_local and on_ray[-1] < on_ray[0]
    reference = jax.tree.leaves(local_states[0][:2])
    for params, opt_state, step in ray_states + local_states[1:]:
        assert step == PALM_STEPS
        assert all(a.dtype == b.dtype and np.array_equal(a, b)
                   for a, b in zip(jax.tree.leaves((params, opt_state)), reference))


def test_ray_and_hosts_listen_on_loopback_only(ray_cluster, ray_pods):
    """Ray's processes and every host, with the distributed-system coordinators and collectives
    of the 2-host islands, listen on loopback only."""
    import ray

    actors = [*ray_cluster.hosts().values(), *ray_pods.hosts().values()]
    actor_pids = {pid for _, pid in ray.get([a.process.remote() for a in actors])}
    assert len(actor_pids) == 6
    ours = {os.getpid(), *descendants(os.getpid())}
    assert actor_pids <= ours  # the actors run under this process's raylets
    listeners = [(addr, pid) for addr, pid in tcp_listeners() if pid in ours]
    assert actor_pids <= {pid for _, pid in listeners}
    assert {"gcs_server", "raylet"} <= {process_name(pid) for _, pid in listeners}
    assert [a for a, _ in listeners if not is_loopback(a)] == []


def test_killed_actor_is_a_lost_host(ray_instance):
    """With no restarts allowed (max_host_restarts=0) a killed actor's island stays lost, and
    restart_lost_islands says why."""
    with runtime.RayCluster(islands=2, devices_per_host=2, max_host_restarts=0) as cluster, \
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
        with pytest.raises(runtime.PathwaysError, match="max_host_restarts"):
            cluster.restart_lost_islands()
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
        hosts = check_status(port, [(0, 0), (1, 0)])
        host_pids = listener_pids(hosts)
        assert len(host_pids) == 2 and host_pids <= set(started)
        compute(port, 2)
    finally:
        up.send_signal(signal.SIGTERM)
        up.wait(timeout=60)
    assert up.returncode == 0
    assert wait_gone(started) == []


def test_up_joins_an_existing_ray_cluster(ray_instance):
    """`pathways up --ray ADDRESS --hosts-per-island 2` places each island on both nodes of the
    cluster, as one distributed system, and leaves the cluster running."""
    import ray

    port = free_port()
    up = start_up(["--ray", ray_instance, "--hosts-per-island", "2", "--devices-per-host", "2"],
                  port)
    try:
        hosts = check_status(port, [(0, 0), (0, 1), (1, 0), (1, 1)])
        host_pids = listener_pids(hosts)
        assert len(host_pids) == 4 and host_pids <= set(descendants(os.getpid()))
        compute(port, 4)
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


def check_status(port: int, hosts: list[tuple[int, int]]) -> list[str]:
    """Checks `pathways status` (table and JSON) shows `hosts` (island, host) as alive ray hosts
    of 2 cpu devices, each with its Ray node; returns their addresses."""
    status = subprocess.run(CLI + ["status", f"127.0.0.1:{port}"], capture_output=True,
                            text=True, timeout=60)
    assert status.returncode == 0, status.stderr
    rows = [r.split() for r in status.stdout.splitlines() if re.match(r"\s+\d+\s+\d+\s", r)]
    assert [(r[0], r[1], r[3], r[4], r[5], r[-1]) for r in rows] == [
        (str(i), str(h), "ray", "cpu", "2", "alive") for i, h in hosts]
    nodes = re.findall(r"^\s+ray node ([0-9a-f]+)$", status.stdout, re.M)
    status = subprocess.run(CLI + ["status", f"127.0.0.1:{port}", "--json"], capture_output=True,
                            text=True, timeout=60)
    listed = json.loads(status.stdout)["hosts"]
    assert all(re.fullmatch(r"[0-9a-f]{56}", h["ray_node"]) for h in listed)
    assert nodes == [h["ray_node"] for h in listed]
    return [h["address"] for h in listed]


def compute(port: int, devices: int) -> None:
    """A computation on a slice of every device of island 1."""
    with runtime.Client(f"127.0.0.1:{port}") as client:
        s = client.slice({"d": devices}, island=1)
        x = np.arange(4.0 * devices, dtype=np.float32)
        out = client.jit(lambda v: v.sum() * 2, s)(client.put(x, s))
        assert out.fetch() == x.sum() * 2


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
