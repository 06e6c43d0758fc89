"""Prometheus metrics from the cluster itself: scraped over HTTP from an in-process cluster, and
from `pathways up --metrics-port` (controller and host processes)."""

import re
import signal
import socket
import subprocess
import sys
import time
import urllib.request

import grpc
import numpy as np
import pytest
from prometheus_client.parser import text_string_to_metric_families

import runtime
from proto import pathways_pb2 as pb
from runtime.metrics import record_training, serve_metrics
from proto.ports import PortInUseError


def scrape(port: int) -> dict[tuple, float]:
    """{(sample name, frozenset of labels): value} of the endpoint on `port`."""
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=30).read().decode()
    return {(s.name, frozenset(s.labels.items())): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def value(samples, name: str, **labels) -> float:
    """The sum of `name`'s samples whose labels include `labels` (0 when none)."""
    wanted = {(k, str(v)) for k, v in labels.items()}
    return sum(v for (n, ls), v in samples.items() if n == name and wanted <= ls)


def test_in_process_cluster_metrics(tmp_path):
    server = serve_metrics(0)
    port = server.server_port
    try:
        before = scrape(port)
        with runtime.LocalCluster(islands=2, devices_per_island=2) as cluster:
            client = cluster.client()
            s = client.slice({"d": 2}, island=1)
            x = client.put(np.ones((256, 256), np.float32), s)  # 256 KiB
            f = client.jit(lambda v: v @ v, s)
            for _ in range(5):
                x = f(x)
            assert x.fetch().shape == (256, 256)
            with pytest.raises(runtime.SliceUnavailableError):
                client.slice({"d": 64})  # the controller refuses
            unknown = pb.GetArrayRequest(array_id=(client.session_id << 40) + 12345)
            with pytest.raises(grpc.RpcError) as refused:  # the host refuses
                list(client.worker_stub(s.info.host_addresses[0]).GetArray(unknown, timeout=30))
            record_training(tokens_per_s=1234.5, mfu=0.42, step=7, loss=2.5)
            during = scrape(port)
        after = scrape(port)
    finally:
        server.shutdown()

    def grew(name, **labels):
        return value(during, name, **labels) - value(before, name, **labels)

    host = dict(island=1, host=0)
    assert grew("pathways_executions_total", **host) == 5
    assert grew("pathways_execution_seconds_count", **host) == 5
    assert grew("pathways_device_busy_seconds_total", **host) > 0
    for stage in ("queue", "inputs"):  # per execution
        assert grew("pathways_dispatch_latency_seconds_count", stage=stage, **host) == 5
    assert grew("pathways_dispatch_latency_seconds_count", stage="receive", **host) >= 1
    assert grew("pathways_dispatch_latency_seconds_count", stage="order", island="") >= 1
    assert grew("pathways_bytes_moved_total", direction="in", **host) >= 256 * 1024
    assert grew("pathways_bytes_moved_total", direction="out", **host) >= 256 * 1024
    code = refused.value.code().name
    assert grew("pathways_errors_total", server="worker", method="GetArray", code=code,
                **host) == 1
    assert grew("pathways_errors_total", server="controller", method="CreateSlice") == 1
    # State is added up over the live clusters of the process (other tests' may linger): the
    # figures of this cluster are what it adds while it lives.
    assert grew("pathways_instructions_ordered_total", island=1) >= 8
    assert grew("pathways_sessions") == 1 and grew("pathways_slices") == 1
    assert grew("pathways_hosts", state="alive") == 2
    assert grew("pathways_devices", **host) == 2
    assert grew("pathways_device_memory_used_bytes", **host) >= 256 * 1024
    assert grew("pathways_device_memory_capacity_bytes", **host) > 2**20
    assert 0 <= value(during, "pathways_device_busy_ratio", **host) <= 1
    assert grew("pathways_queue_depth", stage="clients", island=1) == 0
    assert value(during, "pathways_session_lease_seconds") == 10
    assert value(during, "pathways_training_tokens_per_second") == 1234.5
    assert value(during, "pathways_training_mfu_ratio") == 0.42
    assert value(during, "process_resident_memory_bytes") > 0  # the process's own
    # A closed cluster reports nothing: no stale hosts or sessions.
    for name in ("pathways_devices", "pathways_sessions", "pathways_hosts", "pathways_slices"):
        assert value(after, name) == value(before, name), name


def test_a_busy_metrics_port_is_refused():
    server = serve_metrics(0)
    try:
        with pytest.raises(PortInUseError):
            serve_metrics(server.server_port)
    finally:
        server.shutdown()


def _free_port_pair() -> int:
    """A port P with P + 1 free as well (for a controller and one host)."""
    for _ in range(50):
        with socket.socket() as a:
            a.bind(("127.0.0.1", 0))
            port = a.getsockname()[1]
            try:
                with socket.socket() as b:
                    b.bind(("127.0.0.1", port + 1))
                    return port
            except OSError:
                continue
    pytest.skip("no two adjacent free ports")


def test_pathways_up_serves_controller_and_host_metrics():
    metrics_port = _free_port_pair()
    up = subprocess.Popen([sys.executable, "-m", "runtime.cli", "up", "--islands", "1",
                           "--devices-per-island", "2", "--metrics-port", str(metrics_port)],
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        address = None
        for line in up.stdout:
            match = re.match(r"controller listening on (\S+)", line)
            if match:
                address = match.group(1)
                break
        assert address, "pathways up did not start"
        with runtime.Client(address) as client:
            s = client.slice({"d": 2})
            client.jit(lambda v: v + 1, s)(client.put(np.zeros(4, np.float32), s)).fetch()
            controller = scrape(metrics_port)
            deadline = time.monotonic() + 60
            while True:  # the host records the execution once it has finished
                host = scrape(metrics_port + 1)
                if value(host, "pathways_executions_total", island=0, host=0) >= 1:
                    break
                assert time.monotonic() < deadline
                time.sleep(0.2)
        assert value(controller, "pathways_hosts", state="alive") == 1
        assert value(controller, "pathways_sessions") == 1
        assert value(controller, "pathways_dispatch_latency_seconds_count", stage="order") >= 1
        assert value(host, "pathways_devices", island=0, host=0) == 2
        assert value(host, "pathways_bytes_moved_total", direction="in", island=0) >= 16
        assert value(host, "process_cpu_seconds_total") > 0
        assert value(host, "pathways_sessions") == 0  # no controller in a host's process
    finally:
        up.send_signal(signal.SIGTERM)
        up.wait(timeout=60)


def test_pathways_train_reports_its_progress_as_training_gauges(capsys):
    """`pathways train --metrics-port` serves the pathways_training_* gauges, set every step."""
    from prometheus_client import REGISTRY

    from runtime.cli import main

    record_training(step=0, loss=0.0, tokens_per_s=0.0)
    with runtime.LocalCluster(islands=1, devices_per_island=2) as cluster:
        code = main(["train", "--config", "palm-tiny", "n_layers=1", "seq_len=32", "--islands",
                     "1", "--mesh", "fsdp=2", "--global-batch", "4", "--steps", "2", "--quiet",
                     "--address", cluster.address, "--metrics-port", "0"])
    assert code == 0
    assert re.search(r"training metrics on http://127\.0\.0\.1:\d+/metrics",
                     capsys.readouterr().out)
    assert REGISTRY.get_sample_value("pathways_training_step") == 2
    assert REGISTRY.get_sample_value("pathways_training_tokens_per_second") > 0
    assert 0 < REGISTRY.get_sample_value("pathways_training_loss") < 100
