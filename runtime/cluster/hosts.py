"""What every launcher does with the hosts and tokens of the cluster it starts: wait for the
hosts to register, register or unregister one, find the islands to restart, publish the
clients' token for this machine."""

from __future__ import annotations

import os
import subprocess
import time
from collections.abc import Sequence

from proto import auth as _auth
from proto import pathways_pb2 as pb
from proto.config import ClusterConfig
from proto.errors import DeadlineExceededError, FailedPreconditionError
from runtime.server import Controller
from runtime.worker import membership as _membership

#: How long a cluster waits for every host to register.
STARTUP_TIMEOUT_S = ClusterConfig.from_env().startup_timeout_s


def wait_for_hosts(controller: Controller, expected: int, timeout: float,
                   procs: Sequence[subprocess.Popen] = ()) -> None:
    """Waits until `expected` hosts are registered and alive; fails fast if a subprocess died."""
    deadline = time.monotonic() + timeout
    while True:
        alive = [h for h in controller.resources.hosts() if h.alive]
        if len(alive) >= expected:
            return
        dead = [p for p in procs if p.poll() is not None]
        if dead:
            raise FailedPreconditionError(f"worker process {dead[0].args} exited with "
                                          f"{dead[0].returncode} before registering")
        if time.monotonic() > deadline:
            raise DeadlineExceededError(f"only {len(alive)} of {expected} hosts registered "
                                        f"within {timeout:.0f} s")
        time.sleep(0.05)


def islands_to_restart(controller: Controller) -> set[int]:
    """The islands a launcher's `restart_lost_islands` replaces: each that lost a host, and each
    with a host hung in a computation it cannot leave (runtime.worker.hang: a collective that the
    slice's other hosts never join, as when an input from a lost island reached some of them
    and failed on the others). Only fresh processes serve such an island again, so its hung
    hosts are declared lost here first, with the hang as the reason. The hang is read from the
    hosts now (a status with pings) rather than from their progress reports, which may come
    after the error a client has already seen."""
    for host in controller.status_report.status().hosts:
        if host.hang:
            controller.health.report_host_lost(host.island, host.host, f"hung: {host.hang}")
    return {h.island for h in controller.resources.hosts() if not h.alive}


def register_host(controller_address: str, info: pb.HostInfo, timeout: float = 60.0,
                  credentials: _auth.Credentials | None = None) -> None:
    """Registers a worker with the controller, retrying until `timeout` while it is not up yet."""
    _membership.register(controller_address, info, credentials, timeout)


def unregister_host(controller_address: str, info: pb.HostInfo, timeout: float = 1.0,
                    credentials: _auth.Credentials | None = None) -> None:
    """Tells the controller a host is leaving; best effort (the controller may be gone already)."""
    _membership.unregister(controller_address, info, credentials, timeout)


def publish_token(address: str, credentials: _auth.Credentials) -> str | None:
    """Writes a cluster's client token where clients on this machine look for it
    (proto.auth.default_token_file, mode 0600), so `Client(address)` needs no flags; returns
    the file, or None when there is no token or the file cannot be written."""
    if not credentials.token:
        return None
    path = _auth.default_token_file(address)
    try:
        _auth.write_token_file(path, credentials.token)
    except OSError:
        return None
    return path


def withdraw_token(path: str | None, token: str | None) -> None:
    """Removes a token file this process wrote: only while it still holds `token`. Another
    cluster may have written its own token to the same path since (a later `pathways up` on the
    port); removing that would lock its clients out."""
    if not path or not token:
        return
    try:
        with open(path, encoding="utf-8") as f:
            if f.read().strip() != token:
                return
        os.remove(path)
    except OSError:
        pass
