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


def _parse_error(capsys, argv) -> str:
    """What `pathways ARGV` prints when it refuses its arguments (exit status 2)."""
    from runtime.cli import main

    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    return err


@pytest.mark.parametrize("argv", [["train"], ["model"], ["mfu", "--tokens-per-s", "1"],
                                  ["bench", "utilization", "--out", "x"]])
def test_unknown_config_is_one_clean_error_with_close_matches(capsys, argv):
    err = _parse_error(capsys, argv + ["--config", "palm-tny"])
    first = err.splitlines()[0]
    assert first.startswith(f"pathways {argv[0]}")
    assert "unknown PaLM config 'palm-tny'; did you mean palm-tiny" in first


def test_misspelt_options_choices_and_commands_get_close_matches(capsys):
    assert "unrecognized arguments: --polcy share; did you mean --policy" in _parse_error(
        capsys, ["up", "--polcy", "share"])
    assert "invalid choice: 'fifi'; did you mean fifo?" in _parse_error(
        capsys, ["controller", "--policy", "fifi"])
    assert "invalid choice: 'stauts'; did you mean status?" in _parse_error(capsys, ["stauts"])
    assert "did you mean --global-batch" in _parse_error(
        capsys, ["bench", "utilization", "--out", "x", "--global-bach", "4"])


def test_help_shows_defaults_and_version(capsys):
    from runtime.cli import main

    for argv, shown in ((["up", "--help"], "(default: 4)"),
                        (["bench", "dispatch", "--help"], "(default: 4)"),
                        (["train", "--help"], "(default: palm-tiny)")):
        with pytest.raises(SystemExit) as exit_info:
            main(argv)
        assert exit_info.value.code == 0
        # Help text wraps, at spaces and hyphens.
        assert shown.replace(" ", "") in "".join(capsys.readouterr().out.split()), argv
    with pytest.raises(SystemExit):
        main(["--version"])
    assert re.match(r"pathways \d+\.\d+\.\d+ \(jax \d", capsys.readouterr().out)


def test_a_wrong_address_is_named_at_once():
    port = free_port()  # nothing listens there
    result = subprocess.run(CLI + ["status", f"127.0.0.1:{port}"], capture_output=True,
                            text=True, timeout=60)
    assert result.returncode == 1
    assert result.stderr.strip() == (f"error: no controller answers at 127.0.0.1:{port} — is "
                                     f"`pathways up` running there?")
    started = time.monotonic()
    with pytest.raises(runtime.ControllerUnavailableError, match="no controller answers"):
        runtime.Client(f"127.0.0.1:{port}")
    # A refused connection ends the wait at once; the old client waited out 10 s. The bound
    # leaves room for a starved machine and is no speed target.
    assert time.monotonic() - started < 8


def test_a_worker_address_is_not_taken_for_a_controller():
    with runtime.LocalCluster(islands=1, devices_per_island=1) as cluster:
        with pytest.raises(runtime.ControllerUnavailableError, match="not a pathways controller"):
            runtime.Client(cluster.workers[0].address, credentials=cluster.credentials)
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
