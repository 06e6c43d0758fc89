"""Exclusive ports: a second server on a taken port fails at once with a clear message, and a
process removes only the token file it wrote."""

import os
import re
import socket
import subprocess
import sys
import time

import numpy as np
import pytest

import runtime
from proto import auth as _auth
from runtime.cluster.hosts import publish_token, withdraw_token
from runtime.server import Controller, create_controller_server
from proto.ports import PortInUseError, ensure_port_free

CLI = [sys.executable, "-m", "runtime.cli"]


def test_a_second_server_on_the_same_port_is_refused():
    first = Controller(heartbeat=False)
    server, port = create_controller_server(first)
    second = Controller(heartbeat=False)
    try:
        with pytest.raises(PortInUseError, match=rf"port {port} is already in use "
                                                 r"\(another pathways up\?\)"):
            create_controller_server(second, f"127.0.0.1:{port}")
        # Nor may a plain socket with SO_REUSEPORT share it (gRPC's default was on).
        with socket.socket() as sneaky:
            sneaky.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
            with pytest.raises(OSError):
                sneaky.bind(("127.0.0.1", port))
    finally:
        second.close()
        first.close()
        server.stop(grace=None).wait(5)
    ensure_port_free(f"127.0.0.1:{port}")  # free again once the server has stopped


def test_withdraw_token_leaves_another_clusters_token(tmp_path, monkeypatch):
    monkeypatch.setenv("PATHWAYS_HOME", str(tmp_path))
    mine = _auth.Credentials.generate()
    path = publish_token("127.0.0.1:51499", mine)
    theirs = _auth.generate_token()
    _auth.write_token_file(path, theirs)  # another process has published its own since
    withdraw_token(path, mine.token)
    assert _auth.read_token_file(path) == theirs
    withdraw_token(path, theirs)
    assert not os.path.exists(path)


def test_second_pathways_up_on_a_busy_port_fails_at_once_and_harms_nothing(tmp_path):
    env = dict(os.environ, PATHWAYS_HOME=str(tmp_path))
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    first = subprocess.Popen(CLI + ["up", "--islands", "1", "--devices-per-island", "1",
                                    "--port", str(port)], stdout=subprocess.PIPE,
                             stderr=subprocess.STDOUT, text=True, env=env)
    try:
        for line in first.stdout:
            if re.fullmatch(rf"controller listening on 127\.0\.0\.1:{port}\n", line):
                break
        else:
            pytest.fail("the first pathways up did not start")
        token_file = tmp_path / f"token-{port}"
        token = token_file.read_text()

        second = subprocess.run(CLI + ["up", "--islands", "1", "--devices-per-island", "1",
                                       "--port", str(port)], capture_output=True, text=True,
                                env=env, timeout=120)
        assert second.returncode == 1
        assert second.stderr.strip() == (f"error: port {port} is already in use "
                                         f"(another pathways up?)")
        assert "listening" not in second.stdout  # it started nothing

        assert token_file.read_text() == token  # the first cluster's token is untouched
        with runtime.Client(f"127.0.0.1:{port}",
                            credentials=_auth.Credentials(token=token.strip())) as client:
            s = client.slice({"d": 1})
            assert client.put(np.arange(3.0, dtype=np.float32), s).fetch().sum() == 3.0
    finally:
        first.terminate()
        first.wait(timeout=30)
    deadline = time.monotonic() + 10
    while (tmp_path / f"token-{port}").exists() and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not (tmp_path / f"token-{port}").exists()  # the first removes its own on exit
