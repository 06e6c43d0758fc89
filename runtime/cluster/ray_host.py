"""One island host inside a Ray actor: the `pathways worker` server, started in two steps.

RayCluster (runtime.cluster.ray_cluster) wraps `HostActor` with `ray.remote` (so this module does not import Ray
to be imported) and starts an island's actors together: once they exist, host 0 names a free
address on its node for the island's JAX distributed-system coordinator (`coordinator`), then every
host `start`s with that address, joins the distributed system (gloo collectives on CPU, NCCL on
CUDA, as `pathways worker --num-hosts` does), starts its worker server and registers it with the
controller over gRPC. Afterwards Ray only calls `serve` (which returns when the host stops, so the
driver learns of a dead actor), `process` and `stop`: programs, arrays and dispatch travel over the
runtime's own gRPC, never as Ray calls.
"""

from __future__ import annotations

import os
import threading

from proto import auth as _auth
from proto.errors import FailedPreconditionError
from runtime.worker.defaults import EXECUTION_DEADLINE_S
from runtime.worker.distributed import free_port, host_devices
from runtime.worker.membership import register
from runtime.worker.servicer import create_worker_server
from runtime.worker.worker import Worker


class HostActor:
    """Host `host` of island `island` on the devices of the Ray bundle the actor holds: one
    simulated CPU device per reserved CPU on cpu, the GPUs Ray assigned (it sets
    CUDA_VISIBLE_DEVICES to them) on cuda. The constructor touches no device, so that `start` can
    still join a distributed system before JAX's backends come up."""

    def __init__(self, island: int, host: int, platform: str) -> None:
        import ray

        context = ray.get_runtime_context()
        assigned = context.get_assigned_resources()
        count = int(assigned.get("CPU", 0)) if platform == "cpu" else len(ray.get_gpu_ids())
        if count <= 0:
            raise FailedPreconditionError(f"host {island}.{host}: its bundle {assigned} gives no "
                                          f"{platform} devices")
        self.island, self.host, self.platform, self.count = island, host, platform, count
        # The node's address as Ray knows it: 127.0.0.1 on a loopback-only instance, the node's
        # routable address on a multi-node cluster (the controller and other hosts must reach it).
        self.node_ip = ray.util.get_node_ip_address()
        self.node_id = context.get_node_id()
        self._worker: Worker | None = None
        self._server = None
        self._stopped = threading.Event()

    def coordinator(self) -> str:
        """An address free now on this actor's node, for its island's distributed-system
        coordinator (asked of host 0, which serves it from `start`)."""
        return f"{self.node_ip}:{free_port(self.node_ip)}"

    def start(self, controller_address: str, num_hosts: int = 1, coordinator: str = "",
              register_timeout: float = 60.0,
              execution_deadline_s: float = EXECUTION_DEADLINE_S) -> str:
        """Joins the island's distributed system when it has `num_hosts` > 1 (returns once every
        host has joined), starts the worker server, registers it with the controller and returns
        its gRPC address. Called once per actor."""
        import jax

        # Ray, not JAX's preemption notifier, owns this process's SIGTERM: Ray stops its workers
        # with it, and a process that swallowed it would linger until Ray's kill timeout.
        jax.config.update("jax_enable_preemption_service", False)
        devices, hosts = host_devices(self.platform, self.count, num_hosts, self.host, coordinator)
        # The cluster's token and host token arrive in the environment (the actor's runtime_env).
        credentials = _auth.Credentials.resolve()
        worker = Worker(self.island, self.host, devices, platform=self.platform, backend="ray",
                        island_devices=hosts, execution_deadline_s=execution_deadline_s,
                        credentials=credentials)
        worker.ray_node = self.node_id
        self._worker = worker
        self._server, _ = create_worker_server(worker, f"{self.node_ip}:0")
        try:
            register(controller_address, worker.info(), credentials, register_timeout)
        except Exception:
            self.stop()
            raise
        return worker.address

    def process(self) -> tuple[str, int]:
        """(node address, pid) of the actor's process."""
        return self.node_ip, os.getpid()

    def serve(self) -> None:
        """Returns when the host is stopped; fails with RayActorError when its process dies."""
        self._stopped.wait()

    def stop(self) -> None:
        """Stops the worker server and executor; idempotent."""
        if not self._stopped.is_set():
            if self._server is not None:
                self._server.stop(grace=1.0)
            if self._worker is not None:
                self._worker.stop()
            self._stopped.set()
