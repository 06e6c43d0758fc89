"""Islands on a Ray cluster: Ray places and supervises the hosts; the runtime's gRPC does the rest.

`RayCluster` reserves each island's hosts at once with a Ray placement group (one bundle per host,
gang reservation: an island gets all its hosts or none) and starts one actor per bundle. The actor
runs the same worker server as `pathways worker`, registers its gRPC address with the controller
and then only waits; programs, arrays and dispatch go over the runtime's own gRPC, never through
Ray's object store or pickled actor calls. Ray's part is placement, resource accounting and
supervision: an actor that dies is reported to the controller as a lost host.

Ray is an optional dependency (`pip install -e '.[ray]'`): this module imports it only when used.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from typing import Any

from runtime import _auth
from runtime._cluster import (STARTUP_TIMEOUT_S, publish_token, register_host, wait_for_hosts,
                              withdraw_token)
from runtime._controller import Controller, create_controller_server
from runtime._errors import FailedPreconditionError
from runtime._leases import DEFAULT_SESSION_LEASE_S

log = logging.getLogger(__name__)

#: How long an island's placement group may take to be reserved before the cluster gives up.
PLACEMENT_TIMEOUT_S = 120.0
#: Ray placement strategies an island may use; "auto" picks PACK on one node, STRICT_SPREAD on more.
PLACEMENT_STRATEGIES = ("auto", "PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD")
#: How often the supervisor looks for actors that have died.
SUPERVISE_INTERVAL_S = 0.2
_LOOPBACK = ("127.0.0.1", "localhost", "::1")


def start_local_ray(num_cpus: int = 2, num_gpus: int | None = None) -> bool:
    """Starts a single-node Ray bound to 127.0.0.1 only, unless Ray is already up; True if started.

    Ray resolves "127.0.0.1" to the machine's routable address (probing with a UDP socket) and then
    listens on all interfaces, unless RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0, which makes a node
    loopback-only; it is read when `ray` is imported, so it is set here before the import, and
    checked.
    `num_cpus` and `num_gpus` are the node's logical resources (what bundles reserve), not cores.
    """
    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")  # no usage report leaves the machine
    ray = _import_ray()
    from ray._private import ray_constants

    if ray.is_initialized():
        return False
    if ray_constants.ENABLE_RAY_CLUSTER:
        raise RuntimeError("ray was imported before RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 was set; "
                           "it would bind non-loopback addresses. Set it in the environment first.")
    ray.init(address="local", include_dashboard=False, num_cpus=num_cpus, num_gpus=num_gpus,
             _node_ip_address="127.0.0.1", object_store_memory=128 * 2**20)
    return True


def connect_ray(address: str | None, *, num_cpus: int, num_gpus: int | None = None) -> bool:
    """Makes this process a Ray driver; True if it started a local Ray instance (to stop later).

    address None: reuse the Ray this process is already connected to, else start a local instance
    on loopback with `num_cpus`/`num_gpus` logical resources. Otherwise ("auto", "HOST:PORT" of a
    head's GCS, "ray://HOST:PORT") connect to that cluster, leaving its resources as they are.
    """
    if address is None:
        return start_local_ray(num_cpus, num_gpus)
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    ray = _import_ray()
    if not ray.is_initialized():
        ray.init(address=address)
    return False


def _import_ray():
    try:
        import ray
    except ModuleNotFoundError as exc:
        raise ModuleNotFoundError("the Ray backend needs Ray: pip install -e '.[ray]'") from exc
    return ray


class HostActor:
    """One island host inside a Ray actor: the `pathways worker` server, nothing more.

    Wrapped by `ray.remote` in RayCluster (so this module does not import Ray to be imported). The
    constructor registers the host with the controller over gRPC; afterwards Ray only calls `serve`
    (which returns when the host stops, so the driver learns of a dead actor), `address` and `stop`.
    """

    def __init__(self, controller_address: str, island: int, host: int, platform: str,
                 register_timeout: float) -> None:
        import jax
        import ray

        # The device count comes from the bundle this actor holds: one simulated CPU device per
        # reserved CPU, or the GPUs Ray assigned (Ray sets CUDA_VISIBLE_DEVICES to them).
        assigned = ray.get_runtime_context().get_assigned_resources()
        if platform == "cpu":
            count = int(assigned.get("CPU", 0))
            # This actor is a fresh process whose XLA backend is not up yet; the option takes
            # precedence over a device count inherited through XLA_FLAGS.
            jax.config.update("jax_num_cpu_devices", count)
        else:
            count = len(ray.get_gpu_ids())
        from runtime._worker import Worker, create_worker_server

        devices = jax.devices(platform)
        if count <= 0 or len(devices) < count:
            raise FailedPreconditionError(
                f"host {island}.{host}: bundle assigned {assigned}, giving {count} {platform} "
                f"devices; this process has {len(devices)}")
        # The cluster's token and host token arrive in the environment (the actor's runtime_env).
        credentials = _auth.Credentials.resolve()
        self._worker = Worker(island, host, devices[:count], platform=platform, backend="ray",
                              credentials=credentials)
        # The node's address as Ray knows it: 127.0.0.1 on a loopback-only instance, the node's
        # routable address on a multi-node cluster (the controller and other hosts must reach it).
        bind = ray.util.get_node_ip_address()
        self._server, _ = create_worker_server(self._worker, f"{bind}:0")
        self._stopped = threading.Event()
        try:
            register_host(controller_address, self._worker.info(), timeout=register_timeout,
                          credentials=credentials)
        except Exception:
            self.stop()
            raise

    def address(self) -> str:
        """The worker's gRPC address, as registered with the controller."""
        return self._worker.address

    def process(self) -> tuple[str, int]:
        """(node address, pid) of the actor's process."""
        import ray

        return ray.util.get_node_ip_address(), os.getpid()

    def serve(self) -> None:
        """Returns when the host is stopped; fails with RayActorError when its process dies."""
        self._stopped.wait()

    def stop(self) -> None:
        """Stops the worker server and executor; idempotent."""
        if not self._stopped.is_set():
            self._server.stop(grace=1.0)
            self._worker.stop()
            self._stopped.set()


class RayCluster:
    """A controller in this process and every island host as a Ray actor, gang-reserved per island.

    Same interface as ProcessCluster (`address`, `controller`, `close()`, context manager). Each
    island is one placement group of `hosts_per_island` bundles, reserved all at once; a bundle is
    `{"CPU": devices_per_host}` on cpu (one simulated device per reserved CPU) or
    `{"CPU": cpus_per_host, "GPU": devices_per_host}` on cuda, and the actor takes its device
    count from it. With `ray_address=None` this process's Ray connection is reused, or a local Ray
    instance is started on loopback with just enough resources, and stopped by `close()`.

    The constructor returns once every host has registered. It does not restart dead actors: a
    dead actor is a lost host (HostLostError on its island), as with any other backend.

    As with the other backends the cluster makes its own token and host token (unless given
    `credentials`); the actors receive both in their runtime_env's environment (Ray's control
    plane, which the cluster trusts to start its processes anyway). `credentials` (the attribute)
    is what clients need; clients on this machine find the token by themselves. `policy` is the
    controller's scheduling policy ("fifo" or "share"); `session_lease_s` how long a silent
    client keeps its session (runtime._leases; 0: forever).
    """

    def __init__(self, islands: int = 2, hosts_per_island: int = 1, devices_per_host: int = 4, *,
                 ray_address: str | None = None, placement_strategy: str = "auto",
                 cpus_per_host: int = 1, port: int = 0, host: str = "127.0.0.1",
                 platform: str = "cpu", runtime_env: dict[str, Any] | None = None,
                 placement_timeout: float = PLACEMENT_TIMEOUT_S,
                 startup_timeout: float = STARTUP_TIMEOUT_S,
                 credentials: _auth.Credentials | None = None, policy: str = "fifo",
                 session_lease_s: float = DEFAULT_SESSION_LEASE_S) -> None:
        if placement_strategy not in PLACEMENT_STRATEGIES:
            raise ValueError(f"placement strategy {placement_strategy!r} is not one of "
                             f"{PLACEMENT_STRATEGIES}")
        if platform == "cpu":
            bundle = {"CPU": devices_per_host}
        else:
            bundle = {"CPU": cpus_per_host, "GPU": devices_per_host}
        hosts = islands * hosts_per_island
        self.bundle = bundle
        self._started_ray = connect_ray(ray_address, num_cpus=bundle["CPU"] * hosts,
                                        num_gpus=bundle.get("GPU", 0) * hosts or None)
        import ray

        self._ray = ray
        self._placement_groups: list[Any] = []
        self._actors: dict[tuple[int, int], Any] = {}
        self._serving: dict[Any, tuple[int, int]] = {}
        self._closing = threading.Event()
        self._supervisor: threading.Thread | None = None
        self.controller: Controller | None = None
        self._server = None
        self.token_file: str | None = None
        cluster_credentials = credentials or _auth.Credentials.generate()
        self.credentials = cluster_credentials.for_clients()
        try:
            self.placement_strategy = (_default_strategy(ray) if placement_strategy == "auto"
                                       else placement_strategy)
            self.controller = Controller(policy=policy, credentials=cluster_credentials,
                                         session_lease_s=session_lease_s)
            self._server, self.port = create_controller_server(self.controller, f"{host}:{port}")
            self.address = f"{_advertised(ray, host)}:{self.port}"
            self.token_file = publish_token(self.address, self.credentials)
            env = dict((runtime_env or {}).get("env_vars", {}))
            env.update(cluster_credentials.worker_environment())
            runtime_env = {**(runtime_env or {}), "env_vars": env}
            _check_reachable(ray, self.address)
            self._reserve(islands, hosts_per_island, placement_timeout)
            self._start_hosts(islands, hosts_per_island, platform, runtime_env, startup_timeout)
            wait_for_hosts(self.controller, hosts, startup_timeout)
        except BaseException:
            self.close()
            raise
        self._supervisor = threading.Thread(target=self._supervise, name="ray-supervisor",
                                            daemon=True)
        self._supervisor.start()

    def _reserve(self, islands: int, hosts_per_island: int, timeout: float) -> None:
        """One placement group per island, all bundles at once; fails if one is not granted."""
        from ray.util.placement_group import placement_group

        for island in range(islands):
            self._placement_groups.append(placement_group(
                [dict(self.bundle) for _ in range(hosts_per_island)],
                strategy=self.placement_strategy,
                name=f"pathways-{self.controller.name_tag}-island-{island}"))
        deadline = time.monotonic() + timeout
        for island, group in enumerate(self._placement_groups):
            left = max(0.0, deadline - time.monotonic())
            ready, _ = self._ray.wait([group.ready()], timeout=left)
            if not ready:
                raise FailedPreconditionError(
                    f"Ray did not reserve island {island} ({hosts_per_island} bundles of "
                    f"{self.bundle}, {self.placement_strategy}) within {timeout:.0f} s; the "
                    f"cluster has {self._ray.cluster_resources()} in "
                    f"{len(_alive_nodes(self._ray))} nodes")

    def _start_hosts(self, islands: int, hosts_per_island: int, platform: str,
                     runtime_env: dict[str, Any] | None, timeout: float) -> None:
        from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

        actor_class = self._ray.remote(HostActor)
        for island in range(islands):
            for h in range(hosts_per_island):
                options = dict(
                    num_cpus=self.bundle["CPU"], num_gpus=self.bundle.get("GPU", 0),
                    # serve() holds a thread for the actor's lifetime; the other calls need more
                    max_concurrency=4, max_restarts=0,
                    scheduling_strategy=PlacementGroupSchedulingStrategy(
                        self._placement_groups[island], placement_group_bundle_index=h))
                if runtime_env is not None:
                    options["runtime_env"] = runtime_env
                actor = actor_class.options(**options).remote(self.address, island, h, platform,
                                                              timeout)
                self._actors[(island, h)] = actor
                self._serving[actor.serve.remote()] = (island, h)
        # An actor whose constructor failed (no devices, controller unreachable) fails here, with
        # its error, rather than leaving wait_for_hosts to time out.
        addresses = [actor.address.remote() for actor in self._actors.values()]
        self._ray.get(addresses, timeout=timeout)

    def _supervise(self) -> None:
        """Reports an actor that ends (killed, crashed, its node gone) as a lost host."""
        while self._serving and not self._closing.is_set():
            done, _ = self._ray.wait(list(self._serving), num_returns=1,
                                     timeout=SUPERVISE_INTERVAL_S)
            for ref in done:
                island, h = self._serving.pop(ref)
                if self._closing.is_set():
                    return
                try:
                    self._ray.get(ref)
                    reason = "its Ray actor stopped"
                except Exception as exc:  # RayActorError and friends: the process is gone
                    reason = f"its Ray actor died ({type(exc).__name__})"
                record = self.controller.resources.mark_lost(island, h, reason)
                if record:
                    log.warning("lost %s: %s", record.describe(), reason)

    def hosts(self) -> dict[tuple[int, int], Any]:
        """The actor handle of every host, keyed (island, host)."""
        return dict(self._actors)

    def kill_worker(self, island: int, host: int = 0, timeout: float = 30.0) -> None:
        """Kills a host's actor process abruptly (fault injection for tests).

        Ray kills asynchronously; for an actor on this machine this returns once its process has
        exited, so that the next call to the host fails, on another node as soon as Ray is asked.
        """
        actor = self._actors[(island, host)]
        node, pid = self._ray.get(actor.process.remote(), timeout=timeout)
        self._ray.kill(actor, no_restart=True)
        if node != self._ray.util.get_node_ip_address():
            return
        deadline = time.monotonic() + timeout
        while _process_alive(pid) and time.monotonic() < deadline:
            time.sleep(0.02)

    def close(self, grace: float = 5.0) -> None:
        """Stops every host, frees the reservations, and stops Ray if this cluster started it."""
        if self._closing.is_set():
            return
        self._closing.set()
        withdraw_token(self.token_file, self.credentials.token)
        if self._supervisor is not None:
            self._supervisor.join(timeout=5)
        ray = self._ray
        # A graceful stop first (a dead actor's call just fails), then a kill for any that hangs.
        stops = [actor.stop.remote() for actor in self._actors.values()]
        if stops:
            ray.wait(stops, num_returns=len(stops), timeout=grace)
        for actor in self._actors.values():
            try:
                ray.kill(actor, no_restart=True)
            except Exception:  # already gone with its node or its Ray
                pass
        from ray.util.placement_group import remove_placement_group

        for group in self._placement_groups:
            try:
                remove_placement_group(group)
            except Exception:  # never created, or Ray is already gone
                pass
        if self.controller is not None:
            self.controller.close()
        if self._server is not None:
            self._server.stop(grace=None)
        if self._started_ray:
            ray.shutdown()

    def __enter__(self) -> RayCluster:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _process_alive(pid: int) -> bool:
    """Whether a local process exists and has not exited (a zombie has)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def _alive_nodes(ray) -> list[dict]:
    return [n for n in ray.nodes() if n.get("Alive")]


def _default_strategy(ray) -> str:
    """PACK on one machine (STRICT_SPREAD could not place two hosts), STRICT_SPREAD across nodes."""
    return "PACK" if len(_alive_nodes(ray)) <= 1 else "STRICT_SPREAD"


def _advertised(ray, host: str) -> str:
    """The address hosts dial: the bind address, or this node's Ray address for a wildcard bind."""
    if host in ("", "0.0.0.0", "::"):
        return ray.util.get_node_ip_address()
    return host


def _check_reachable(ray, address: str) -> None:
    """A loopback controller is unreachable from other machines: refuse early, not at timeout."""
    if address.rsplit(":", 1)[0] not in _LOOPBACK:
        return
    here = {*_LOOPBACK, ray.util.get_node_ip_address()}
    remote = [n["NodeManagerAddress"] for n in _alive_nodes(ray)
              if n["NodeManagerAddress"] not in here]
    if remote:
        raise FailedPreconditionError(
            f"the controller listens on {address}, which Ray nodes {remote} cannot reach; bind it "
            f"to an address they can (pathways up --bind 0.0.0.0, or RayCluster(host=...))")
