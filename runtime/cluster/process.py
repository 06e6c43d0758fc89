"""`ProcessCluster`: a controller in this process and each worker a `pathways worker` subprocess,
as `pathways up` runs them; the hosts of a multi-host island form one JAX distributed system
(runtime.worker.distributed), so a slice may span them. And what keeps subprocesses tied to
their parent (process groups, parent-death signals)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

from proto import auth as _auth
from proto.config import ClusterConfig
from proto.errors import DeadlineExceededError
from runtime.cluster.clients import OpensClients
from runtime.cluster.hosts import (islands_to_restart, publish_token, wait_for_hosts,
                                   withdraw_token)
from runtime.server import Controller, controller_options, create_controller_server
from runtime.worker.defaults import EXECUTION_DEADLINE_S
from runtime.worker.distributed import free_port


class ProcessCluster(OpensClients):
    """A controller in this process and each host as a `pathways worker` subprocess.

    With `hosts_per_island` > 1 the hosts of each island join one JAX distributed system (host 0
    coordinates, on a free port of `host`), so one SPMD computation spans them. `policy` is the
    controller's scheduling policy ("fifo" or "share"); `execution_deadline_s` bounds how long a
    computation on a multi-host slice waits for the slice's other hosts (runtime.worker.hang).

    Workers die with this process (PR_SET_PDEATHSIG), each in its own process group, and are
    stopped by `close()`, which is idempotent and leaves no worker process behind (a worker stuck
    in a collective is killed after `grace` seconds).

    The cluster makes its own token and host token (proto.auth) unless given `credentials`, and
    hands both to its workers through their environment; `credentials` (the attribute) is what its
    clients need. `restart_lost_islands()` replaces the workers of islands that lost one;
    `restart_controller()` replaces the controller on the same address (the workers register
    again by themselves). `session_quota_bytes` and `session_lease_s` are the controller's
    (runtime.controller.controller.Controller).

    With `worker_metrics_port` P the k-th host (k = 0, 1, ..., island by island) serves Prometheus
    metrics on port P + k (P = 0: each on a free port it prints); with `worker_log` a file, the workers log
    at INFO level and write all their output there instead of this process's terminal.
    """

    def __init__(self, islands: int = 2, hosts_per_island: int = 1, devices_per_host: int = 4, *,
                 port: int = 0, host: str = "127.0.0.1", platform: str = "cpu",
                 startup_timeout: float | None = None, policy: str | None = None,
                 execution_deadline_s: float | None = None,
                 credentials: _auth.Credentials | None = None,
                 session_quota_bytes: int | None = None,
                 session_lease_s: float | None = None,
                 worker_metrics_port: int | None = None, worker_log: str | None = None,
                 config: ClusterConfig | None = None) -> None:
        self.config = (config or ClusterConfig.from_env()).replace(
            startup_timeout_s=startup_timeout, policy=policy,
            execution_deadline_s=execution_deadline_s, session_quota_bytes=session_quota_bytes,
            session_lease_s=session_lease_s)
        self._cluster_credentials = credentials or _auth.Credentials.generate()
        self.credentials = self._cluster_credentials.for_clients()
        self._worker_metrics_port, self._worker_log = worker_metrics_port, worker_log
        self._controller_options = dict(credentials=self._cluster_credentials,
                                        **controller_options(self.config))
        self.controller = Controller(**self._controller_options)
        try:
            self._server, self.port = create_controller_server(self.controller, f"{host}:{port}")
        except BaseException:  # e.g. PortInUseError: nothing was started but the controller
            self.controller.close()
            raise
        self.address = f"{host}:{self.port}"
        self.token_file = publish_token(self.address, self.credentials)
        self._host, self._startup_timeout = host, self.config.startup_timeout_s
        self._shape = (islands, hosts_per_island, devices_per_host, platform,
                       self.config.worker.execution_deadline_s)
        self.procs: list[subprocess.Popen] = []
        try:
            for island in range(islands):
                self.procs.extend(self._spawn_island(island))
            wait_for_hosts(self.controller, islands * hosts_per_island, self._startup_timeout,
                           self.procs)
        except BaseException:
            self.close()
            raise

    def _spawn_island(self, island: int) -> list[subprocess.Popen]:
        _, hosts_per_island, devices_per_host, platform, execution_deadline_s = self._shape
        coordinator = (f"{self._host}:{free_port(self._host)}" if hosts_per_island > 1 else "")

        def metrics_port(h: int) -> int | None:
            base = self._worker_metrics_port
            return base + island * hosts_per_island + h if base else base

        return [_spawn_worker(self.address, island, h, devices_per_host, platform,
                              coordinator=coordinator, num_hosts=hosts_per_island,
                              execution_deadline_s=execution_deadline_s,
                              env={**self.config.to_env(),
                                   **self._cluster_credentials.worker_environment()},
                              metrics_port=metrics_port(h), log=self._worker_log)
                for h in range(hosts_per_island)]

    def restart_lost_islands(self) -> list[int]:
        """Replaces every worker of each island that lost one (its process died or stopped
        answering) or has one hung in a computation (runtime.cluster.hosts.islands_to_restart)
        with fresh ones, and waits until they have registered. The controller starts such an
        island empty: slices, arrays and executables on it are gone
        (runtime.controller.controller). Returns the islands restarted."""
        islands, hosts_per_island = self._shape[:2]
        lost = sorted(islands_to_restart(self.controller)
                      | {i // hosts_per_island for i, p in enumerate(self.procs)
                         if p.poll() is not None})
        for island in lost:
            first = island * hosts_per_island
            for proc in self.procs[first:first + hosts_per_island]:
                if proc.poll() is None:
                    kill_process_group(proc)
                else:
                    proc.wait()
            self.procs[first:first + hosts_per_island] = self._spawn_island(island)
        if lost:
            expected = islands * hosts_per_island
            deadline = time.monotonic() + self._startup_timeout
            while True:  # the new hosts, on every island restarted
                wait_for_hosts(self.controller, expected, self._startup_timeout, self.procs)
                fresh = {(h.island, h.address) for h in self.controller.resources.hosts() if h.alive}
                if all(any(i == island for i, _ in fresh) for island in lost):
                    break
                if time.monotonic() > deadline:
                    raise DeadlineExceededError(f"islands {lost} did not come back")
                time.sleep(0.05)
        return lost

    def restart_controller(self) -> None:
        """Replaces the controller by a fresh one on the same address (fault injection): sessions
        are gone; the workers outlive it and register with the new one within a few seconds."""
        self.controller.close()
        self._server.stop(grace=None).wait(5)
        self.controller = Controller(**self._controller_options)
        self._server, _ = create_controller_server(self.controller, self.address)

    def close(self, grace: float = 5.0) -> None:
        withdraw_token(getattr(self, "token_file", None), self.credentials.token)
        self.close_clients()
        self.controller.close()  # first: stopping workers is not a host loss to report
        # Host 0 of a multi-host island coordinates its JAX distributed system: the other hosts
        # abort (with a stack trace) when it goes first, so they stop first.
        hosts_per_island = self._shape[1]
        deadline = time.monotonic() + grace
        for wave in ([p for i, p in enumerate(self.procs) if i % hosts_per_island],
                     self.procs[::hosts_per_island]):
            for proc in wave:
                if proc.poll() is None:
                    proc.terminate()
            for proc in wave:
                try:
                    proc.wait(timeout=max(0.1, deadline - time.monotonic()))
                except subprocess.TimeoutExpired:
                    kill_process_group(proc)
        self._server.stop(grace=None).wait(5)

    def __enter__(self) -> ProcessCluster:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def kill_process_group(proc: subprocess.Popen) -> None:
    """SIGKILLs a worker's process group (the worker and anything it started) and reaps it."""
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        proc.kill()
    proc.wait(timeout=5)


#: Tells a worker subprocess which process it must die with (runtime.cli: die_with_parent).
PARENT_PID_ENV = "PATHWAYS_PARENT_PID"


def die_with_parent() -> bool:
    """In a worker subprocess: asks Linux to SIGTERM this process when the process named by
    $PATHWAYS_PARENT_PID dies; False if it is already gone. The worker does this itself, not a
    preexec_fn in the parent: running Python between fork and exec in a process with gRPC threads
    can abort the child (gRPC's fork handlers), and without one the fork is a plain vfork."""
    parent = os.environ.get(PARENT_PID_ENV)
    if not parent:
        return True
    try:
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except OSError:
        pass
    return os.getppid() == int(parent)


def _spawn_worker(controller: str, island: int, host: int, devices: int, platform: str, *,
                  coordinator: str = "", num_hosts: int = 1,
                  execution_deadline_s: float = EXECUTION_DEADLINE_S,
                  env: dict[str, str] | None = None, metrics_port: int | None = None,
                  log: str | None = None) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "runtime.cli", *(["-v"] if log else []), "worker",
           "--controller", controller,
           "--island", str(island), "--host", str(host), "--devices", str(devices),
           "--platform", platform, "--execution-deadline", str(execution_deadline_s)]
    if num_hosts > 1:
        cmd += ["--coordinator", coordinator, "--num-hosts", str(num_hosts)]
    if metrics_port is not None:
        cmd += ["--metrics-port", str(metrics_port)]
    env = dict(os.environ, PYTHONUNBUFFERED="1", **(env or {}))
    env[PARENT_PID_ENV] = str(os.getpid())
    # A worker reads nothing from stdin; giving it /dev/null also keeps fd 0 a real file when the
    # parent's is closed (the distributed runtime's sockets would otherwise take fd 0).
    # Own session and process group: a terminal's Ctrl-C reaches only the parent, which stops its
    # workers in order; kill_process_group reaches the worker and anything it started.
    if log is None:
        return subprocess.Popen(cmd, env=env, stdin=subprocess.DEVNULL, start_new_session=True)
    with open(log, "ab") as output:  # the worker keeps its own descriptor of the file
        return subprocess.Popen(cmd, env=env, stdin=subprocess.DEVNULL, stdout=output,
                                stderr=subprocess.STDOUT, start_new_session=True)
