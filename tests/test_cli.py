"""The `pathways` command: `up` starts a real multi-process cluster, `status` reads it, a client
computes on it, and stopping `up` leaves no worker process behind."""

import os
import pathlib
import re
import signal
import socket
import subprocess
import sys
import time

import numpy as np
import pytest
from jax.sharding import PartitionSpec

import runtime

CLI = [sys.executable, "-m", "runtime.cli"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def worker_pids(port: int) -> list[int]:
    """Live `pathways worker` processes registered to the controller on `port`."""
    pids = []
    for proc in pathlib.Path("/proc").iterdir():
        try:
            cmd = (proc / "cmdline").read_bytes().split(b"\0")
            state = (proc / "stat").read_text().split()[2]
        except (OSError, IndexError):
            continue
        if b"worker" in cmd and f"127.0.0.1:{port}".encode() in cmd and state != "Z":
            pids.append(int(proc.name))
    return pids


@pytest.mark.parametrize("stop_signal", [signal.SIGTERM, signal.SIGINT])
def test_up_status_compute_and_clean_stop(stop_signal):
    port = free_port()
    up = subprocess.Popen(CLI + ["up", "--islands", "2", "--devices-per-island", "2", "--port",
                                 str(port)], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                          text=True)
    try:
        lines = []
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            line = up.stdout.readline()
            assert line, f"pathways up exited early: {''.join(lines)}"
            lines.append(line)
            if re.fullmatch(rf"controller listening on 127\.0\.0\.1:{port}\n", line):
                break
        else:
            pytest.fail("pathways up did not report its address in time")
        assert len(worker_pids(port)) == 2

        status = subprocess.run(CLI + ["status", f"127.0.0.1:{port}"], capture_output=True,
                                text=True, timeout=60)
        assert status.returncode == 0, status.stderr
        rows = [r.split() for r in status.stdout.splitlines() if re.match(r"\s+\d+\s+\d+\s", r)]
        assert [(r[0], r[1], r[4], r[5], r[-1]) for r in rows] == [
            ("0", "0", "cpu", "2", "alive"), ("1", "0", "cpu", "2", "alive")]

        with runtime.Client(f"127.0.0.1:{port}") as client:
            s = client.slice({"d": 2}, island=1)
            out = client.jit(lambda v: v.sum() * 2, s)(client.put(np.arange(6.0, dtype=np.float32), s))
            assert out.fetch() == 30.0
    finally:
        up.send_signal(stop_signal)
        up.wait(timeout=30)
    deadline = time.monotonic() + 10
    while worker_pids(port) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert worker_pids(port) == []
    assert up.returncode == 0


def test_every_subcommand_has_help():
    for sub in ("worker", "controller", "up", "status"):
        result = subprocess.run(CLI + [sub, "--help"], capture_output=True, text=True, timeout=60)
        assert result.returncode == 0 and "usage: pathways " + sub in result.stdout


def test_status_of_a_controller_that_is_not_there():
    result = subprocess.run(CLI + ["status", "127.0.0.1:1", "--timeout", "1"], capture_output=True,
                            text=True, timeout=60)
    assert result.returncode == 1 and "no controller" in result.stderr


def test_workers_die_with_a_killed_up():
    port = free_port()
    up = subprocess.Popen(CLI + ["up", "--islands", "1", "--devices-per-island", "1", "--port",
                                 str(port)], stdout=subprocess.PIPE, text=True)
    try:
        for line in up.stdout:
            if "controller listening" in line:
                break
        assert len(worker_pids(port)) == 1
    finally:
        os.kill(up.pid, signal.SIGKILL)
        up.wait(timeout=10)
    deadline = time.monotonic() + 10
    while worker_pids(port) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert worker_pids(port) == []


def test_up_with_simulated_hosts():
    """`pathways up --platform sim`: 8 simulated hosts in one process behind the controller;
    status lists them, a slice spans an island's 4 hosts, and stopping `up` stops them."""
    port = free_port()
    up = subprocess.Popen(CLI + ["up", "--platform", "sim", "--islands", "2", "--hosts-per-island",
                                 "4", "--devices-per-host", "2", "--port", str(port)],
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        lines = []
        for line in up.stdout:
            lines.append(line)
            if f"controller listening on 127.0.0.1:{port}" in line:
                break
        else:
            pytest.fail(f"pathways up exited early: {''.join(lines)}")
        assert len(worker_pids(port)) == 1  # one process serves both islands
        status = subprocess.run(CLI + ["status", f"127.0.0.1:{port}"], capture_output=True,
                                text=True, timeout=60)
        assert status.returncode == 0, status.stderr
        rows = [r.split() for r in status.stdout.splitlines() if re.match(r"\s+\d+\s+\d+\s", r)]
        assert len(rows) == 8 and {(r[3], r[-1]) for r in rows} == {("sim", "alive")}
        with runtime.Client(f"127.0.0.1:{port}") as client:
            s = client.slice({"d": 8}, island=1)
            assert {d.host for d in s.info.devices} == {0, 1, 2, 3}
            x = client.put(np.arange(8, dtype=np.float32), s, PartitionSpec("d"))
            np.testing.assert_array_equal(x.fetch(), np.arange(8, dtype=np.float32))
            assert client.jit(lambda v: v * 2, s)(x).fetch(timeout=60).shape == (8,)
    finally:
        up.send_signal(signal.SIGTERM)
        up.wait(timeout=30)
    deadline = time.monotonic() + 10
    while worker_pids(port) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert worker_pids(port) == []
    assert up.returncode == 0
