"""Local clusters: a controller plus island workers, in this process or as subprocesses.

`LocalCluster` runs everything in the calling process (workers as gRPC servers on loopback, each
owning a disjoint subset of this process's devices): fast to start, for scripts and tests.
`ProcessCluster` runs each worker as a `pathways worker` subprocess, as `pathways up` does; the
hosts of a multi-host island form one JAX distributed system (runtime._distributed), so a slice may
span them.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Sequence

import grpc
import jax

from proto import pathways_pb2 as pb
from proto import pathways_pb2_grpc as pb_grpc
from runtime import _wire
from runtime._client import Client
from runtime._controller import Controller, create_controller_server
from runtime._distributed import free_port
from runtime._errors import DeadlineExceededError, FailedPreconditionError
from runtime._worker import EXECUTION_DEADLINE_S, INPUT_TIMEOUT_S, Worker, create_worker_server

#: How long a cluster waits for every host to register.
STARTUP_TIMEOUT_S = 120.0


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


def register_host(controller_address: str, info: pb.HostInfo, timeout: float = 60.0) -> None:
    """Registers a worker with the controller, retrying until `timeout` while it is not up yet."""
    deadline = time.monotonic() + timeout
    with grpc.insecure_channel(controller_address, options=_wire.GRPC_OPTIONS) as channel:
        stub = pb_grpc.ControllerStub(channel)
        while True:
            try:
                stub.RegisterHost(pb.RegisterHostRequest(host=info), timeout=5.0)
                return
            except grpc.RpcError as err:
                if err.code() != grpc.StatusCode.UNAVAILABLE or time.monotonic() > deadline:
                    raise
                time.sleep(0.2)


def unregister_host(controller_address: str, info: pb.HostInfo, timeout: float = 1.0) -> None:
    """Tells the controller a host is leaving; best effort (the controller may be gone already)."""
    try:
        with grpc.insecure_channel(controller_address, options=_wire.GRPC_OPTIONS) as channel:
            pb_grpc.ControllerStub(channel).UnregisterHost(pb.UnregisterHostRequest(
                island=info.island, host=info.host, address=info.address), timeout=timeout)
    except grpc.RpcError:
        pass


class LocalCluster:
    """A controller and `islands` single-host islands in this process, on loopback.

    The process needs `islands * devices_per_island` JAX devices: set
    `jax.config.update("jax_num_cpu_devices", N)` before JAX initialises (the constructor does it
    when it still can). Use as a context manager; `client()` opens sessions.
    """

    def __init__(self, islands: int = 2, devices_per_island: int = 4, *,
                 platform: str = "cpu", heartbeat: bool = True,
                 input_timeout_s: float = INPUT_TIMEOUT_S, policy: str = "fifo") -> None:
        total = islands * devices_per_island
        if platform == "cpu":
            _ensure_cpu_devices(total)
        devices = jax.devices(platform)
        if len(devices) < total:
            raise FailedPreconditionError(
                f"{islands} islands x {devices_per_island} devices need {total} {platform} "
                f"devices; this process has {len(devices)}")
        self.controller = Controller(heartbeat=heartbeat, policy=policy)
        self._server, self.port = create_controller_server(self.controller)
        self.address = f"127.0.0.1:{self.port}"
        self.workers: list[Worker] = []
        self._worker_servers: list[grpc.Server] = []
        for island in range(islands):
            worker = Worker(island, 0, devices[island * devices_per_island:
                                               (island + 1) * devices_per_island],
                            platform=platform, input_timeout_s=input_timeout_s)
            server, _ = create_worker_server(worker)
            self.workers.append(worker)
            self._worker_servers.append(server)
            self.controller.register_host(worker.info())
        self._clients: list[Client] = []

    def client(self, name: str = "client", weight: float = 1.0) -> Client:
        """A new session with this cluster's controller (closed with the cluster)."""
        client = Client(self.address, name=name, weight=weight)
        self._clients.append(client)
        return client

    def kill_worker(self, island: int) -> None:
        """Stops an island's worker server abruptly (fault injection for tests)."""
        self._worker_servers[island].stop(grace=None)

    def close(self) -> None:
        for client in self._clients:
            client.close()
        self.controller.close()
        self._server.stop(grace=None)
        for server in self._worker_servers:
            server.stop(grace=None)
        for worker in self.workers:
            worker.stop()

    def __enter__(self) -> LocalCluster:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _ensure_cpu_devices(n: int) -> None:
    try:
        if jax.config.jax_num_cpu_devices < n:
            jax.config.update("jax_num_cpu_devices", n)
    except RuntimeError:
        pass  # backend already initialised: the device count check below reports a shortfall


class ProcessCluster:
    """A controller in this process and each host as a `pathways worker` subprocess.

    With `hosts_per_island` > 1 the hosts of each island join one JAX distributed system (host 0
    coordinates, on a free port of `host`), so one SPMD computation spans them. `policy` is the
    controller's scheduling policy ("fifo" or "share"); `execution_deadline_s` bounds how long a
    computation on a multi-host slice waits for the slice's other hosts (runtime._hang).

    Workers die with this process (PR_SET_PDEATHSIG), each in its own process group, and are
    stopped by `close()`, which is idempotent and leaves no worker process behind (a worker stuck
    in a collective is killed after `grace` seconds).
    """

    def __init__(self, islands: int = 2, hosts_per_island: int = 1, devices_per_host: int = 4, *,
                 port: int = 0, host: str = "127.0.0.1", platform: str = "cpu",
                 startup_timeout: float = STARTUP_TIMEOUT_S, policy: str = "fifo",
                 execution_deadline_s: float = EXECUTION_DEADLINE_S) -> None:
        self.controller = Controller(policy=policy)
        self._server, self.port = create_controller_server(self.controller, f"{host}:{port}")
        self.address = f"{host}:{self.port}"
        self.procs: list[subprocess.Popen] = []
        try:
            for island in range(islands):
                coordinator = (f"{host}:{free_port(host)}" if hosts_per_island > 1 else "")
                for h in range(hosts_per_island):
                    self.procs.append(_spawn_worker(
                        self.address, island, h, devices_per_host, platform,
                        coordinator=coordinator, num_hosts=hosts_per_island,
                        execution_deadline_s=execution_deadline_s))
            wait_for_hosts(self.controller, islands * hosts_per_island, startup_timeout, self.procs)
        except BaseException:
            self.close()
            raise

    def close(self, grace: float = 5.0) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                proc.terminate()
        deadline = time.monotonic() + grace
        for proc in self.procs:
            try:
                proc.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                kill_process_group(proc)
        self.controller.close()
        self._server.stop(grace=None)

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


def _die_with_parent() -> None:
    """Runs in the child before exec: SIGTERM it when the parent dies (Linux), own process group
    (so a terminal's Ctrl-C reaches only the parent, which stops its workers in order)."""
    os.setpgid(0, 0)
    try:
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except OSError:
        pass


def _spawn_worker(controller: str, island: int, host: int, devices: int, platform: str, *,
                  coordinator: str = "", num_hosts: int = 1,
                  execution_deadline_s: float = EXECUTION_DEADLINE_S) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "runtime.cli", "worker", "--controller", controller,
           "--island", str(island), "--host", str(host), "--devices", str(devices),
           "--platform", platform, "--execution-deadline", str(execution_deadline_s)]
    if num_hosts > 1:
        cmd += ["--coordinator", coordinator, "--num-hosts", str(num_hosts)]
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    # A worker reads nothing from stdin; giving it /dev/null also keeps fd 0 a real file when the
    # parent's is closed (the distributed runtime's sockets would otherwise take fd 0).
    return subprocess.Popen(cmd, env=env, stdin=subprocess.DEVNULL, preexec_fn=_die_with_parent)
