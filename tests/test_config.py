"""Every tunable in one place (proto.config): defaults, environment overrides, and launchers that
hand the whole configuration to every process."""

import ast
import dataclasses
import inspect
import os
import pathlib
import subprocess
import sys

import pytest

from proto import config
from proto.config import ClusterConfig, ControllerConfig, WorkerConfig


def test_field_names_are_unique_across_the_parts():
    names = [f.name for cls in (config.ControllerConfig, config.WorkerConfig,
                                config.SchedulerConfig, config.ClientConfig, ClusterConfig,
                                config.TransferConfig, config.ProxyConfig)
             for f in dataclasses.fields(cls)]
    assert len(names) == len(set(names))
    # A simulated host shares only the worker's own settings (one variable sets both).
    shared = ({f.name for f in dataclasses.fields(config.SimConfig)} & set(names))
    assert shared == {"execution_deadline_s", "input_timeout_s", "timeline_length"}


def test_the_proxy_and_the_simulated_hosts_read_the_environment():
    assert config.from_env(config.ProxyConfig, {"PATHWAYS_PROXY_MAX_FUTURES": "10"}
                           ).proxy_max_futures == 10
    sim = config.from_env(config.SimConfig, {"PATHWAYS_FLOPS_PER_S": "1e9",
                                             "PATHWAYS_FIXED_SECONDS": "0.002"})
    assert sim.flops_per_s == 1e9 and sim.fixed_seconds == 0.002
    assert config.from_env(config.SimConfig, {}) == config.SimConfig()


def test_the_environment_overrides_the_defaults_and_round_trips():
    env = {"PATHWAYS_EXECUTION_DEADLINE_S": "5", "PATHWAYS_SESSION_QUOTA_BYTES": "1024",
           "PATHWAYS_POLICY": "share", "PATHWAYS_WINDOW_S": "0.2", "PATHWAYS_RPC_TIMEOUT_S": "9"}
    settings = ClusterConfig.from_env(env)
    assert settings.worker.execution_deadline_s == 5.0
    assert settings.controller.session_quota_bytes == 1024
    assert settings.controller.policy == "share"
    assert settings.scheduler.window_s == 0.2 and settings.client.rpc_timeout_s == 9.0
    assert ClusterConfig.from_env(settings.to_env()) == settings
    assert ClusterConfig.from_env({}) == ClusterConfig()


def test_a_bad_value_names_its_variable():
    with pytest.raises(ValueError, match="PATHWAYS_MAX_BACKLOG"):
        ClusterConfig.from_env({"PATHWAYS_MAX_BACKLOG": "many"})


def test_replace_reaches_every_part_and_refuses_unknown_names():
    settings = ClusterConfig().replace(execution_deadline_s=7, policy="share", stall_s=1.0,
                                       startup_timeout_s=3, session_lease_s=None)
    assert settings.worker.execution_deadline_s == 7 and settings.controller.policy == "share"
    assert settings.scheduler.stall_s == 1.0 and settings.startup_timeout_s == 3
    assert settings.controller.session_lease_s == ControllerConfig().session_lease_s
    with pytest.raises(TypeError, match="no setting is called 'deadline'"):
        ClusterConfig().replace(deadline=1)


def test_the_modules_defaults_are_the_configs():
    from runtime.controller import defaults as controller_defaults
    from runtime.worker import defaults as worker_defaults
    from scheduler import defaults as scheduler_defaults

    assert worker_defaults.EXECUTION_DEADLINE_S == WorkerConfig().execution_deadline_s
    assert controller_defaults.MAX_BACKLOG == ControllerConfig().max_backlog
    assert scheduler_defaults.WINDOW_S == config.SchedulerConfig().window_s


def test_every_launcher_takes_the_whole_configuration():
    import runtime
    from runtime.sim import SimCluster

    for launcher in (runtime.LocalCluster, runtime.ProcessCluster, runtime.RayCluster,
                     SimCluster):
        assert "config" in inspect.signature(launcher).parameters, launcher


def test_a_local_cluster_hands_its_workers_the_worker_settings(monkeypatch):
    """An option set once (here through the environment) reaches the in-process workers, which
    used to get no execution deadline from LocalCluster."""
    import runtime

    monkeypatch.setenv("PATHWAYS_EXECUTION_DEADLINE_S", "7")
    monkeypatch.setenv("PATHWAYS_SESSION_QUOTA_BYTES", "4096")
    with runtime.LocalCluster(1, 1, heartbeat=False, input_timeout_s=9) as cluster:
        assert cluster.workers[0].execution_deadline_s == 7.0
        assert cluster.workers[0].input_timeout_s == 9
        assert cluster.controller.session_quota_bytes == 4096


def test_a_setting_in_the_environment_reaches_every_module_of_a_process():
    """What a launcher hands a subprocess (ClusterConfig.to_env) sets the constants its modules
    use, not only the few a constructor takes."""
    settings = ClusterConfig().replace(slice_timeout_s=7.0, stall_s=0.25, rpc_timeout_s=12.0,
                                       heartbeat_interval_s=0.75)
    code = ("from runtime.worker import defaults as w; from scheduler import defaults as s; "
            "from runtime.client import client as c; from runtime.controller import defaults as k; "
            "print(w.SLICE_TIMEOUT_S, s.STALL_S, c.RPC_TIMEOUT_S, k.HEARTBEAT_INTERVAL_S)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                         env={**os.environ, **settings.to_env()}, check=True).stdout.split()
    assert out == ["7.0", "0.25", "12.0", "0.75"]


def test_scheduler_and_client_settings_given_in_process_reach_the_scheduler_and_the_clients():
    """A ClusterConfig handed to LocalCluster reaches each island's gang scheduler and its host
    links, and the clients `cluster.client()` opens, whole (they used to take only a few
    constructor arguments, or the environment's defaults)."""
    import numpy as np

    import runtime

    settings = ClusterConfig().replace(window_s=0.2, stall_s=1.5, max_batch=7, rpc_timeout_s=7.5,
                                       stream_batch=2, transfer_floor_s=40.0, input_wait_s=5.0)
    with runtime.LocalCluster(1, 1, heartbeat=False, config=settings) as cluster:
        scheduler = cluster.controller.catalog.scheduler(0)
        # Whole, but that without a heartbeat no host reports rarely (nothing would reach an
        # idle fan-out tree: runtime.controller.health).
        assert scheduler.config == dataclasses.replace(
            settings.scheduler, progress_idle_tree_s=settings.scheduler.progress_idle_s)
        assert scheduler.window_s == 0.2
        assert scheduler.input_wait_s == 5.0  # not the request limits' (it used to be)
        client = cluster.client()
        assert client.config == settings.client
        assert client.timeout_s == 7.5  # the deadline of each of its controller calls
        s = client.slice({"d": 1}, island=0)
        x = client.put(np.arange(4, dtype=np.float32), s)
        assert np.array_equal(x.fetch(), np.arange(4, dtype=np.float32))


#: Module constants that are facts, not choices: protocol versions and bounds of the wire format,
#: sizes fixed by security or by JAX, and the granularity of internal bookkeeping. Every other
#: number a module names is a setting and lives in proto/config.py.
FACTS = {
    "proto/admission.py": {"ANONYMOUS"},
    "proto/auth.py": {"ID_BITS", "TOKEN_BYTES"},
    "proto/buffers.py": {"DEVICE_ALIGNMENT"},
    "proto/bulk.py": {"TICKET_BYTES"},  # a ticket's length on the wire (128 random bits)
    "proto/chunk_codec.py": {"_LENGTH_DELIMITED"},  # protobuf's wire type
    "proto/heap.py": {"M_TRIM_THRESHOLD", "M_MMAP_THRESHOLD", "MAX_MMAP_THRESHOLD", "_INT_MAX"},
    "proto/wire.py": {"MAX_MESSAGE_BYTES", "MAX_RANK"},
    "scheduler/resources.py": {"MAX_MESH_RANK"},
    "runtime/controller/ordering.py": {"INSTRUCTIONS_PER_PIECE", "RESULT_MESSAGE_CHARS"},
    "runtime/controller/placement.py": {"MAX_ARRAY_BYTES"},
    "runtime/controller/planner.py": {"IDS_PER_DELETE"},
    "runtime/proxy/_server.py": {"PROTOCOL_VERSION", "SERDES_VERSION"},
    "runtime/proxy/_session.py": {"SERVER_HANDLES_START"},
}


def _is_number(node: ast.expr) -> bool:
    if isinstance(node, ast.Constant):
        return isinstance(node.value, (int, float)) and not isinstance(node.value, bool)
    if isinstance(node, ast.BinOp):
        return _is_number(node.left) and _is_number(node.right)
    return isinstance(node, ast.UnaryOp) and _is_number(node.operand)


def test_no_module_hides_a_setting_in_a_number():
    root = pathlib.Path(__file__).resolve().parent.parent
    found = {}
    for package in ("proto", "scheduler", "runtime"):
        for path in sorted((root / package).rglob("*.py")):
            name = path.relative_to(root).as_posix()
            if name == "proto/config.py" or path.name.endswith(("_pb2.py", "_pb2_grpc.py")):
                continue
            for node in ast.parse(path.read_text()).body:
                if isinstance(node, ast.Assign):
                    targets, value = node.targets, node.value
                elif isinstance(node, ast.AnnAssign) and node.value is not None:
                    targets, value = [node.target], node.value
                else:
                    continue
                for target in targets:
                    if (isinstance(target, ast.Name) and target.id.isupper()
                            and _is_number(value) and target.id not in FACTS.get(name, ())):
                        found.setdefault(name, []).append(target.id)
    assert not found, f"settings outside proto/config.py: {found}"
