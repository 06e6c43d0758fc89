"""`LocalCluster`: a controller and single-host islands in the calling process (workers as gRPC
servers on loopback, each owning a disjoint subset of this process's devices): fast to start, for
scripts and tests."""

from __future__ import annotations

import grpc
import jax

from proto import auth as _auth
from proto.config import ClusterConfig
from proto.errors import FailedPreconditionError
from runtime.cluster.clients import OpensClients
from runtime.cluster.hosts import publish_token, withdraw_token
from runtime.server import Controller, controller_options, create_controller_server, worker_options
from runtime.worker.servicer import create_worker_server
from runtime.worker.worker import Worker


class LocalCluster(OpensClients):
    """A controller and `islands` single-host islands in this process, on loopback.

    The process needs `islands * devices_per_island` JAX devices: set
    `jax.config.update("jax_num_cpu_devices", N)` before JAX initialises (the constructor does it
    when it still can). Use as a context manager; `client()` opens sessions (with the client
    settings of `config`).

    The cluster makes its own token and host token (proto.auth) unless given `credentials`;
    `credentials` (the attribute) is what its clients need: the token, not the host token.
    `session_quota_bytes` bounds each session's device memory (None: unbounded);
    `session_lease_s` is how long a silent client keeps its session (proto.leases; 0: forever).
    """

    def __init__(self, islands: int = 2, devices_per_island: int = 4, *,
                 platform: str = "cpu", heartbeat: bool = True,
                 input_timeout_s: float | None = None, policy: str | None = None,
                 credentials: _auth.Credentials | None = None,
                 session_quota_bytes: int | None = None,
                 session_lease_s: float | None = None,
                 execution_deadline_s: float | None = None,
                 config: ClusterConfig | None = None) -> None:
        self.config = (config or ClusterConfig.from_env()).replace(
            input_timeout_s=input_timeout_s, policy=policy, session_quota_bytes=session_quota_bytes,
            session_lease_s=session_lease_s, execution_deadline_s=execution_deadline_s)
        total = islands * devices_per_island
        if platform == "cpu":
            _ensure_cpu_devices(total)
        devices = jax.devices(platform)
        if len(devices) < total:
            raise FailedPreconditionError(
                f"{islands} islands x {devices_per_island} devices need {total} {platform} "
                f"devices; this process has {len(devices)}")
        self._cluster_credentials = credentials or _auth.Credentials.generate()
        self.credentials = self._cluster_credentials.for_clients()
        self.controller = Controller(heartbeat=heartbeat, credentials=self._cluster_credentials,
                                     **controller_options(self.config))
        self._server, self.port = create_controller_server(self.controller)
        self.address = f"127.0.0.1:{self.port}"
        self.token_file = publish_token(self.address, self.credentials)
        self.workers: list[Worker] = []
        self._worker_servers: list[grpc.Server] = []
        for island in range(islands):
            worker = Worker(island, 0, devices[island * devices_per_island:
                                               (island + 1) * devices_per_island],
                            platform=platform, credentials=self._cluster_credentials,
                            **worker_options(self.config))
            server, _ = create_worker_server(worker)
            self.workers.append(worker)
            self._worker_servers.append(server)
            self.controller.health.register_host(worker.info())

    def kill_worker(self, island: int) -> None:
        """Stops an island's worker server abruptly (fault injection for tests)."""
        self._worker_servers[island].stop(grace=None)

    def close(self) -> None:
        withdraw_token(self.token_file, self.credentials.token)
        self.close_clients()
        self.controller.close()
        # Wait for the servers to finish stopping: their threads must not outlive the cluster.
        stopped = [self._server.stop(grace=None)]
        stopped += [server.stop(grace=None) for server in self._worker_servers]
        for worker in self.workers:
            worker.stop()
        for event in stopped:
            event.wait(5)

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
