"""Plain JAX through the proxy, against `pathways up` in a subprocess: every program of
tests/proxy_programs.py (device_put, jit, shard_map with collectives, grad, donation, pytrees,
dtypes, transfers between the islands' device sets) gives what in-process JAX gives, and
jax.devices() maps to the islands' hosts."""

import os
import re
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

import proxy_programs

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STARTUP_TIMEOUT_S = 180


@pytest.fixture(scope="module")
def pathways_up(tmp_path_factory):
    """`pathways up` with 2 islands x 4 devices and a proxy: (proxy address, token file)."""
    token_file = str(tmp_path_factory.mktemp("up") / "token")
    proc = subprocess.Popen(
        [sys.executable, "-m", "runtime.cli", "up", "--islands", "2", "--devices-per-island",
         "4", "--port", "0", "--proxy-port", "0", "--token-file", token_file],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=ROOT)
    lines = []
    deadline = time.monotonic() + STARTUP_TIMEOUT_S
    proxy = None
    while proxy is None and time.monotonic() < deadline and proc.poll() is None:
        line = proc.stdout.readline()
        lines.append(line)
        match = re.search(r"IFRT proxy .* listening on (\S+)", line)
        proxy = match.group(1) if match else None
    try:
        assert proxy, "pathways up did not start its proxy:\n" + "".join(lines)
        yield proxy, token_file
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()


def test_plain_jax_programs_match_in_process_jax(pathways_up, tmp_path):
    proxy, token_file = pathways_up
    out = tmp_path / "results.npz"
    env = dict(os.environ, PATHWAYS_TOKEN_FILE=token_file, PYTHONPATH=ROOT)
    env.pop("PATHWAYS_TOKEN", None)
    done = subprocess.run([sys.executable, os.path.join(ROOT, "tests", "proxy_programs.py"),
                           proxy, str(out)], env=env, capture_output=True, text=True,
                          timeout=900)
    assert done.returncode == 0, done.stderr[-5000:]
    got = np.load(out)
    devices = got["__devices__"]  # id, island, host, process index per device
    assert devices.tolist() == [[i, i // 4, 0, 0] for i in range(8)]

    expected = proxy_programs.run_all(jax.devices()[:8])
    assert len(expected) >= 40
    for name, values in expected.items():
        for i, want in enumerate(values):
            key = f"{name}/{i}"
            assert key in got, f"{name}: output {i} missing"
            assert str(got[f"{key}/dtype"]) == want.dtype.name, f"{name}: output {i} dtype"
            have = got[key]
            want = proxy_programs.portable(want)
            assert have.shape == want.shape, f"{name}: output {i} shape"
            if want.dtype.kind in "fc":
                tolerance = 1e-2 if want.dtype.itemsize <= 2 else 1e-5
                np.testing.assert_allclose(have, want, rtol=tolerance, atol=tolerance,
                                           err_msg=f"{name}: output {i}")
            else:
                np.testing.assert_array_equal(have, want, err_msg=f"{name}: output {i}")
