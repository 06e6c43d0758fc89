"""A cluster of simulated islands: a controller and a few processes serving many hosts each.

`pathways up --platform sim` runs one. The controller runs in this process, or (for measuring its
own CPU, memory and threads) in a `pathways controller` process of its own; the islands are split
over a few `pathways worker --platform sim` processes, whole islands each.
"""

from __future__ import annotations

import math
import os
import queue
import re
import subprocess
import sys
import threading
import time
from typing import IO

from proto import auth as _auth
from proto.config import ClusterConfig, SimConfig, from_env
from proto.errors import DeadlineExceededError, FailedPreconditionError
from runtime.cluster.clients import OpensClients
from runtime.cluster.hosts import publish_token, wait_for_hosts, withdraw_token
from runtime.cluster.process import PARENT_PID_ENV, kill_process_group
from runtime.server import Controller, controller_options, create_controller_server
from runtime.sim._config import DEFAULT_FLOPS_PER_S
from runtime.sim._process import REGISTERED

#: Hosts one simulated process serves by default (it may serve more: whole islands).
HOSTS_PER_PROCESS = from_env(SimConfig).hosts_per_process
_LISTENING = re.compile(r"controller listening on (\S+)")


def default_processes(islands: int, hosts_per_island: int) -> int:
    """A few processes: about HOSTS_PER_PROCESS hosts each, whole islands each."""
    return max(1, min(islands, math.ceil(islands * hosts_per_island / HOSTS_PER_PROCESS)))


class SimCluster(OpensClients):
    """A controller and `islands` simulated islands of `hosts_per_island` hosts x
    `devices_per_host` devices, in `processes` simulated processes (default: default_processes).

    A computation holds its devices for `fixed_duration_s` if given, else for its per-device FLOPs
    over `flops_per_s`. With `controller_process`, the controller runs as `pathways controller` in
    a process of its own (`controller_pid`), else in this one (`controller`). Output of the child
    processes goes to files in `log_dir` when given, else to this process's stdout and stderr.
    `registration_s` is how long the hosts took from being started to being registered. With
    `start=False` nothing runs until `start()` (so a caller can watch the start-up, e.g. the
    controller's process). Use as a context manager; `close()` stops everything and is idempotent.
    """

    def __init__(self, islands: int = 1, hosts_per_island: int = 4, devices_per_host: int = 4, *,
                 processes: int | None = None, flops_per_s: float = DEFAULT_FLOPS_PER_S,
                 fixed_duration_s: float | None = None, execution_deadline_s: float | None = None,
                 port: int = 0, host: str = "127.0.0.1", policy: str | None = None,
                 controller_process: bool = False, startup_timeout: float | None = None,
                 credentials: _auth.Credentials | None = None,
                 session_quota_bytes: int | None = None,
                 session_lease_s: float | None = None, log_dir: str | None = None,
                 start: bool = True, config: ClusterConfig | None = None) -> None:
        self.config = (config or ClusterConfig.from_env()).replace(
            startup_timeout_s=startup_timeout, policy=policy,
            execution_deadline_s=execution_deadline_s, session_quota_bytes=session_quota_bytes,
            session_lease_s=session_lease_s)
        if islands <= 0 or hosts_per_island <= 0 or devices_per_host <= 0:
            raise ValueError("a simulated cluster needs islands, hosts and devices")
        self.islands, self.hosts_per_island = islands, hosts_per_island
        self.devices_per_host = devices_per_host
        self._cluster_credentials = credentials or _auth.Credentials.generate()
        self.credentials = self._cluster_credentials.for_clients()
        self._env = dict(os.environ, PYTHONUNBUFFERED="1", **self.config.to_env(),
                         **self._cluster_credentials.worker_environment())
        self._env[PARENT_PID_ENV] = str(os.getpid())
        self._log_dir = log_dir
        self._logs: list[IO] = []
        self._lines: queue.SimpleQueue = queue.SimpleQueue()
        self.controller: Controller | None = None
        self.controller_proc: subprocess.Popen | None = None
        self._server = None
        self.procs: list[subprocess.Popen] = []
        self.token_file: str | None = None
        self.registration_s = 0.0
        self.address = ""
        self._options = dict(processes=processes, flops_per_s=flops_per_s,
                             fixed_duration_s=fixed_duration_s,
                             execution_deadline_s=self.config.worker.execution_deadline_s,
                             port=port, host=host, policy=self.config.controller.policy,
                             controller_process=controller_process,
                             startup_timeout=self.config.startup_timeout_s,
                             session_quota_bytes=self.config.controller.session_quota_bytes,
                             session_lease_s=self.config.controller.session_lease_s)
        if start:
            self.start()

    def start(self) -> None:
        """Starts the controller and the simulated processes; returns once every host has
        registered (DeadlineExceededError past the start-up timeout, FailedPreconditionError when
        a process dies first; either way everything started is stopped)."""
        o = self._options
        host = o["host"]
        deadline = time.monotonic() + o["startup_timeout"]
        try:
            if o["controller_process"]:
                self.address = self._spawn_controller(host, o["port"], o["policy"],
                                                      o["session_quota_bytes"],
                                                      o["session_lease_s"], deadline)
            else:
                self.controller = Controller(credentials=self._cluster_credentials,
                                             **controller_options(self.config))
                self._server, bound = create_controller_server(self.controller,
                                                               f"{host}:{o['port']}")
                self.address = f"{host}:{bound}"
            self.token_file = publish_token(self.address, self.credentials)
            began = time.monotonic()
            count = o["processes"] or default_processes(self.islands, self.hosts_per_island)
            per = math.ceil(self.islands / count)
            for first in range(0, self.islands, per):
                cmd = [sys.executable, "-m", "runtime.cli", "worker", "--platform", "sim",
                       "--controller", self.address, "--island", str(first),
                       "--island-count", str(min(per, self.islands - first)),
                       "--num-hosts", str(self.hosts_per_island),
                       "--devices", str(self.devices_per_host), "--bind", host,
                       "--flops-per-s", repr(o["flops_per_s"]),
                       "--execution-deadline", repr(o["execution_deadline_s"]),
                       "--register-timeout", repr(o["startup_timeout"])]
                if o["fixed_duration_s"] is not None:
                    cmd += ["--fixed-duration-ms", repr(o["fixed_duration_s"] * 1e3)]
                self.procs.append(self._spawn(cmd, f"sim-{first}"))
            self._wait_for(REGISTERED, len(self.procs), deadline)
            if self.controller is not None:
                wait_for_hosts(self.controller, self.islands * self.hosts_per_island,
                               max(0.0, deadline - time.monotonic()), self.procs)
            self.registration_s = time.monotonic() - began
        except BaseException:
            self.close()
            raise

    @property
    def controller_pid(self) -> int:
        """The process the controller runs in."""
        return self.controller_proc.pid if self.controller_proc is not None else os.getpid()

    def _spawn(self, cmd: list[str], name: str) -> subprocess.Popen:
        stderr = None
        if self._log_dir:
            os.makedirs(self._log_dir, exist_ok=True)
            stderr = open(os.path.join(self._log_dir, f"{name}.err"), "w")
            self._logs.append(stderr)
        # Own session: a terminal's Ctrl-C reaches only this process, which stops the others.
        proc = subprocess.Popen(cmd, env=self._env, stdin=subprocess.DEVNULL,
                                stdout=subprocess.PIPE, stderr=stderr, text=True,
                                start_new_session=True)
        out = open(os.path.join(self._log_dir, f"{name}.out"), "w") if self._log_dir else None
        if out is not None:
            self._logs.append(out)
        threading.Thread(target=self._relay, args=(proc, out), daemon=True,
                         name=f"relay-{name}").start()
        return proc

    def _relay(self, proc: subprocess.Popen, out: IO | None) -> None:
        """Passes a child's output lines on (to its log, or this process's stdout), and to
        `_wait_for`."""
        try:
            for line in proc.stdout:
                self._lines.put((proc.pid, line))
                target = out if out is not None else sys.stdout
                target.write(line)
                target.flush()
        except (ValueError, OSError):  # the cluster closed its logs: nothing more to pass on
            pass

    def _wait_for(self, prefix: str, count: int, deadline: float) -> list[str]:
        """The next `count` output lines starting with `prefix`; fails fast when a child dies."""
        found: list[str] = []
        while len(found) < count:
            try:
                _, line = self._lines.get(timeout=0.1)
                if line.startswith(prefix) or (prefix == "controller" and _LISTENING.search(line)):
                    found.append(line)
                continue
            except queue.Empty:
                pass
            dead = [p for p in [self.controller_proc, *self.procs]
                    if p is not None and p.poll() is not None]
            if dead:
                raise FailedPreconditionError(f"process {' '.join(dead[0].args[2:5])} exited "
                                              f"with {dead[0].returncode} before it was ready")
            if time.monotonic() > deadline:
                raise DeadlineExceededError(f"{len(found)} of {count} processes ready ({prefix!r}) "
                                            f"before the startup deadline")
        return found

    def _spawn_controller(self, host: str, port: int, policy: str, quota: int | None,
                          lease_s: float, deadline: float) -> str:
        cmd = [sys.executable, "-m", "runtime.cli", "controller", "--bind", host,
               "--port", str(port), "--policy", policy, "--session-lease", repr(lease_s)]
        if quota:
            cmd += ["--session-quota", str(quota)]
        self.controller_proc = self._spawn(cmd, "controller")
        line = self._wait_for("controller", 1, deadline)[0]
        return _LISTENING.search(line).group(1)

    def close(self, grace: float = 5.0) -> None:
        """Stops the controller first (stopping hosts is no loss to report), then the hosts."""
        withdraw_token(self.token_file, self.credentials.token)
        self.token_file = None
        self.close_clients()
        if self.controller is not None:
            self.controller.close()
        procs = [p for p in [self.controller_proc, *self.procs] if p is not None]
        deadline = time.monotonic() + grace
        for proc in procs:
            if proc.poll() is None:
                proc.terminate()
            try:
                proc.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                kill_process_group(proc)
        if self._server is not None:
            self._server.stop(grace=None).wait(5)
            self._server = None
        for log in self._logs:
            log.close()
        self._logs.clear()

    def __enter__(self) -> SimCluster:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
