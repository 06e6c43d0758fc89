"""Islands on a Ray cluster: Ray places, supervises and replaces the hosts; the runtime's gRPC
does the rest.

`RayCluster` reserves each island's hosts at once with a Ray placement group (one bundle per host,
gang reservation: an island gets all its hosts or none) and starts one actor per bundle
(runtime.cluster.ray_host). The hosts of an island form one JAX distributed system, as local worker
processes do, so a slice may span them and so Ray's nodes. Programs, arrays and dispatch go over
the runtime's own gRPC, never through Ray's object store or pickled actor calls. Ray's part is
placement, resource accounting and supervision: an actor that dies is reported to the controller
as a lost host, and its island is restarted as a whole on a fresh placement group.

Ray is an optional dependency (`pip install -e '.[ray]'`): this module imports it only when used,
and only its public API.
"""

from __future__ import annotations

import dataclasses
import logging
import threading
import time
from typing import Any

from proto import auth as _auth
from proto.config import ClusterConfig
from proto.errors import DeadlineExceededError, FailedPreconditionError
from runtime.cluster.clients import OpensClients
from runtime.cluster.hosts import (islands_to_restart, publish_token, wait_for_hosts,
                                   withdraw_token)
from runtime.cluster.ray_connect import \
    start_local_ray  # noqa: F401  (imported from here by callers)
from runtime.cluster.ray_connect import LOOPBACK, connect_ray
from runtime.cluster.ray_host import HostActor
from runtime.server import Controller, controller_options, create_controller_server

log = logging.getLogger(__name__)

_SETTINGS = ClusterConfig.from_env()

#: How long an island's placement group may take to be reserved before the cluster gives up.
PLACEMENT_TIMEOUT_S = _SETTINGS.placement_timeout_s
#: Ray placement strategies an island may use; "auto" picks PACK on one node, STRICT_SPREAD on more.
PLACEMENT_STRATEGIES = ("auto", "PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD")
#: How often the supervisor looks for actors that have died.
SUPERVISE_INTERVAL_S = _SETTINGS.supervise_interval_s
#: How often each island may be restarted after it lost a host, unless told otherwise.
MAX_HOST_RESTARTS = _SETTINGS.max_host_restarts
@dataclasses.dataclass
class _Island:
    """An island's Ray side: its placement group and actors (one per host, in host order)."""

    group: Any = None
    actors: list = dataclasses.field(default_factory=list)
    serving: dict = dataclasses.field(default_factory=dict)  # serve() ref -> host
    generation: int = 0  # restarts done
    restarting: bool = False
    failure: str = ""  # why its last restart failed, or why it is not restarted any more


class RayCluster(OpensClients):
    """A controller in this process and every island host as a Ray actor, gang-reserved per island.

    Same interface as ProcessCluster (`address`, `controller`, `credentials`, `close()`, context
    manager, `restart_lost_islands()`). Each island is one placement group of `hosts_per_island`
    bundles, reserved all at once; a bundle is `{"CPU": devices_per_host}` on cpu (one simulated
    device per reserved CPU) or `{"CPU": cpus_per_host, "GPU": devices_per_host}` on cuda, and the
    actor takes its device count from it. The hosts of an island form one JAX distributed system
    (host 0's actor coordinates it, on a free port of its node), so a slice may span them. With
    `ray_address=None` this process's Ray connection is reused, or a local Ray instance is started
    on loopback with just enough resources, and stopped by `close()`.

    The constructor returns once every host has registered. A host whose actor dies (killed,
    crashed, its node gone) is reported to the controller as lost at once: work on its island
    fails with HostLostError. The cluster then restarts the island as a whole (its other actors
    are killed, its placement group replaced by a fresh one, new actors join a new distributed
    system and register), at most `max_host_restarts` times per island (negative: no limit);
    the controller starts the restarted island empty (runtime.controller.controller).

    As with the other backends the cluster makes its own token and host token (unless given
    `credentials`); the actors receive both in their runtime_env's environment (Ray's control
    plane, which the cluster trusts to start its processes anyway). `credentials` (the attribute)
    is what clients need; clients on this machine find the token by themselves. `policy`,
    `execution_deadline_s` and `session_quota_bytes` mean what they mean for ProcessCluster;
    `session_lease_s` is how long a silent client keeps its session (proto.leases; 0: forever).
    Actors and placement groups are named `pathways-TAG-island-I-host-H` (`-restart-N` after a
    restart), so Ray's state API and dashboard show which host each is.
    """

    def __init__(self, islands: int = 2, hosts_per_island: int = 1, devices_per_host: int = 4, *,
                 ray_address: str | None = None, placement_strategy: str = "auto",
                 cpus_per_host: int = 1, port: int = 0, host: str = "127.0.0.1",
                 platform: str = "cpu", runtime_env: dict[str, Any] | None = None,
                 placement_timeout: float = PLACEMENT_TIMEOUT_S,
                 startup_timeout: float | None = None,
                 credentials: _auth.Credentials | None = None, policy: str | None = None,
                 execution_deadline_s: float | None = None,
                 session_quota_bytes: int | None = None,
                 max_host_restarts: int = MAX_HOST_RESTARTS,
                 session_lease_s: float | None = None,
                 config: ClusterConfig | None = None) -> None:
        self.config = (config or ClusterConfig.from_env()).replace(
            startup_timeout_s=startup_timeout, policy=policy,
            execution_deadline_s=execution_deadline_s, session_quota_bytes=session_quota_bytes,
            session_lease_s=session_lease_s)
        if placement_strategy not in PLACEMENT_STRATEGIES:
            raise ValueError(f"placement strategy {placement_strategy!r} is not one of "
                             f"{PLACEMENT_STRATEGIES}")
        if min(islands, hosts_per_island, devices_per_host) < 1:
            raise ValueError("a Ray cluster needs at least 1 island, 1 host per island and 1 "
                             "device per host")
        if platform == "cpu":
            bundle = {"CPU": devices_per_host}
        else:
            bundle = {"CPU": cpus_per_host, "GPU": devices_per_host}
        self.bundle = bundle
        self.hosts_per_island, self.platform = hosts_per_island, platform
        self.max_host_restarts = max_host_restarts
        self._placement_timeout = placement_timeout
        self._startup_timeout = self.config.startup_timeout_s
        self._execution_deadline_s = self.config.worker.execution_deadline_s
        hosts = islands * hosts_per_island
        self._started_ray = connect_ray(ray_address, num_cpus=bundle["CPU"] * hosts,
                                        num_gpus=bundle.get("GPU", 0) * hosts or None)
        import ray

        self._ray = ray
        self._actor_class = ray.remote(HostActor)
        # Guards _islands; notified when a restart ends.
        self._lock = threading.Condition()
        self._islands = [_Island() for _ in range(islands)]
        self._closing = threading.Event()
        self._restarts: list[threading.Thread] = []
        self._supervisor: threading.Thread | None = None
        self.controller: Controller | None = None
        self._server = None
        self.token_file: str | None = None
        cluster_credentials = credentials or _auth.Credentials.generate()
        self.credentials = cluster_credentials.for_clients()
        try:
            self.placement_strategy = (_default_strategy(ray, bundle, hosts_per_island)
                                       if placement_strategy == "auto" else placement_strategy)
            self.controller = Controller(credentials=cluster_credentials,
                                         **controller_options(self.config))
            self._server, self.port = create_controller_server(self.controller, f"{host}:{port}")
            self.address = f"{_advertised(ray, host)}:{self.port}"
            self.token_file = publish_token(self.address, self.credentials)
            env = dict((runtime_env or {}).get("env_vars", {}))
            env.update(cluster_credentials.worker_environment())
            self._runtime_env = {**(runtime_env or {}), "env_vars": env}
            _check_reachable(ray, self.address)
            self._reserve(range(islands))
            self._launch(range(islands))
            wait_for_hosts(self.controller, hosts, self._startup_timeout)
        except BaseException:
            self.close()
            raise
        self._supervisor = threading.Thread(target=self._supervise, name="ray-supervisor",
                                            daemon=True)
        self._supervisor.start()

    def _name(self, island: int, host: int | None = None) -> str:
        """The Ray name of an island's placement group (host None) or of a host's actor."""
        name = f"pathways-{self.controller.name_tag}-island-{island}"
        if host is not None:
            name += f"-host-{host}"
        generation = self._islands[island].generation
        return name + (f"-restart-{generation}" if generation else "")

    def _reserve(self, islands) -> None:
        """One fresh placement group per island, all bundles at once, all islands asked for at
        once; fails if one is not granted within the placement timeout."""
        from ray.util.placement_group import placement_group, remove_placement_group

        groups = {}
        for island in islands:
            group = placement_group([dict(self.bundle) for _ in range(self.hosts_per_island)],
                                    strategy=self.placement_strategy, name=self._name(island))
            with self._lock:  # close() removes what it finds here; after it, nothing may remain
                if self._closing.is_set():
                    remove_placement_group(group)
                    raise FailedPreconditionError("the cluster is closing")
                self._islands[island].group = groups[island] = group
        deadline = time.monotonic() + self._placement_timeout
        for island, group in groups.items():
            left = max(0.0, deadline - time.monotonic())
            ready, _ = self._ray.wait([group.ready()], timeout=left)
            if not ready:
                raise FailedPreconditionError(
                    f"Ray did not reserve island {island} ({self.hosts_per_island} bundles of "
                    f"{self.bundle}, {self.placement_strategy}) within "
                    f"{self._placement_timeout:.0f} s; the cluster has "
                    f"{self._ray.cluster_resources()} in {len(_alive_nodes(self._ray))} nodes")

    def _launch(self, islands) -> None:
        """Starts the actors of `islands` on their reserved groups; returns once every host has
        joined its island's distributed system and registered with the controller."""
        from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

        actors = {}
        for island in islands:
            with self._lock:
                if self._closing.is_set():
                    raise FailedPreconditionError("the cluster is closing")
                state = self._islands[island]
                state.actors = [self._actor_class.options(
                    name=self._name(island, h), num_cpus=self.bundle["CPU"],
                    num_gpus=self.bundle.get("GPU", 0), runtime_env=self._runtime_env,
                    # serve() holds a thread for the actor's lifetime, start() one while it joins
                    max_concurrency=4, max_restarts=0,
                    scheduling_strategy=PlacementGroupSchedulingStrategy(
                        state.group, placement_group_bundle_index=h),
                ).remote(island, h, self.platform) for h in range(self.hosts_per_island)]
                state.serving = {a.serve.remote(): h for h, a in enumerate(state.actors)}
                actors[island] = state.actors
        coordinators = {}
        if self.hosts_per_island > 1:
            asked = {island: hosts[0].coordinator.remote() for island, hosts in actors.items()}
            coordinators = dict(zip(asked, _get_all(self._ray, list(asked.values()),
                                                    self._startup_timeout)))
        # An actor that cannot start (no devices, controller unreachable) fails here, with its
        # error, rather than leaving its island's other hosts waiting for it.
        _get_all(self._ray, [actor.start.remote(self.address, self.hosts_per_island,
                                                coordinators.get(island, ""),
                                                self._startup_timeout, self._execution_deadline_s)
                             for island, hosts in actors.items() for actor in hosts],
                 self._startup_timeout)

    def _supervise(self) -> None:
        """Reports an actor that ends (killed, crashed, its node gone) as a lost host, and has
        its island restarted."""
        while not self._closing.is_set():
            with self._lock:
                watched = {ref: (island, host) for island, state in enumerate(self._islands)
                           for ref, host in state.serving.items()}
            if not watched:
                self._closing.wait(SUPERVISE_INTERVAL_S)
                continue
            try:
                done, _ = self._ray.wait(list(watched), num_returns=1,
                                         timeout=SUPERVISE_INTERVAL_S)
            except Exception as exc:  # Ray itself is gone: the controller's heartbeat tells
                log.debug("ray.wait failed: %s", exc)
                self._closing.wait(SUPERVISE_INTERVAL_S)
                continue
            for ref in done:
                island, host = watched[ref]
                try:
                    self._ray.get(ref)
                    reason = "its Ray actor stopped"
                except Exception as exc:  # RayActorError and friends: the process is gone
                    reason = f"its Ray actor died ({type(exc).__name__})"
                with self._lock:
                    # Not watched any more: the cluster is closing, or a restart replaced it.
                    replaced = self._islands[island].serving.pop(ref, None) is None
                    if replaced or self._closing.is_set():
                        continue
                    # Under the lock: the restart cannot register the island's new hosts first.
                    self.controller.health.report_host_lost(island, host, reason)
                    self._begin_restart(island, f"host {island}.{host}: {reason}")

    def _begin_restart(self, island: int, reason: str) -> None:
        """Starts restarting an island unless it is being restarted or has no restarts left
        (called under the lock)."""
        state = self._islands[island]
        if state.restarting or self._closing.is_set():
            return
        if 0 <= self.max_host_restarts <= state.generation:
            if not state.failure:
                state.failure = (f"island {island} is not restarted again ({reason}): it was "
                                 f"restarted {state.generation} times, the most allowed "
                                 f"(max_host_restarts)")
                log.error("%s", state.failure)
            return
        state.restarting, state.failure = True, ""
        thread = threading.Thread(target=self._restart, args=(island, reason), daemon=True,
                                  name=f"ray-restart-island-{island}")
        self._restarts.append(thread)
        thread.start()

    def _restart(self, island: int, reason: str) -> None:
        """Replaces every actor of an island, on a fresh placement group; waits until the new
        hosts have registered (which restarts the island in the controller)."""
        with self._lock:
            state = self._islands[island]
            old_actors, old_group = state.actors, state.group
            state.actors, state.serving, state.group = [], {}, None
            state.generation += 1
            log.warning("restarting island %d on a fresh placement group (restart %d; "
                        "max_host_restarts %d): %s", island, state.generation,
                        self.max_host_restarts, reason)
        self._kill(old_actors)
        _remove_group(old_group)
        try:
            self._reserve([island])
            self._launch([island])
            log.warning("island %d is back: %d hosts registered", island, self.hosts_per_island)
            failure = ""
        except Exception as exc:
            failure = f"restarting island {island} failed: {exc}"
            if not self._closing.is_set():
                log.error("%s", failure)
            with self._lock:
                actors, group = self._islands[island].actors, self._islands[island].group
                self._islands[island].serving = {}
            self._kill(actors)
            _remove_group(group)
            if not self._closing.is_set():
                for host in range(self.hosts_per_island):  # any of them that did register
                    self.controller.health.report_host_lost(island, host, failure)
        with self._lock:
            state.restarting, state.failure = False, failure
            self._lock.notify_all()

    def restart_lost_islands(self, timeout: float | None = None) -> list[int]:
        """Restarts each island that lost a host or has one hung in a computation
        (runtime.cluster.hosts.islands_to_restart) and is not being restarted yet (within
        `max_host_restarts`), and waits for every restart under way (at most `timeout` s, default
        the placement and startup timeouts together). Returns the islands restarted, or being
        restarted when this was called; raises FailedPreconditionError naming the islands that
        could not be, DeadlineExceededError when a restart takes too long."""
        lost = islands_to_restart(self.controller)
        deadline = time.monotonic() + (timeout if timeout is not None
                                       else self._placement_timeout + self._startup_timeout)
        with self._lock:
            lost |= {island for island, state in enumerate(self._islands) if state.restarting}
            for island in sorted(lost):
                self._begin_restart(island, "it lost a host")
            while any(self._islands[island].restarting for island in lost):
                if not self._lock.wait(timeout=max(0.0, deadline - time.monotonic())):
                    raise DeadlineExceededError(f"islands {sorted(lost)} were not back in time")
            failures = [self._islands[island].failure for island in sorted(lost)
                        if self._islands[island].failure]
        if failures:
            raise FailedPreconditionError("; ".join(failures))
        return sorted(lost)

    def hosts(self) -> dict[tuple[int, int], Any]:
        """The actor handle of every host, keyed (island, host)."""
        with self._lock:
            return {(island, host): actor for island, state in enumerate(self._islands)
                    for host, actor in enumerate(state.actors)}

    def kill_worker(self, island: int, host: int = 0, timeout: float = 30.0) -> None:
        """Kills a host's actor process abruptly (fault injection for tests).

        Ray kills asynchronously; for an actor on this machine this returns once its process has
        exited, so that the next call to the host fails, on another node as soon as Ray is asked.
        """
        actor = self.hosts()[(island, host)]
        node, pid = self._ray.get(actor.process.remote(), timeout=timeout)
        self._ray.kill(actor, no_restart=True)
        if node != self._ray.util.get_node_ip_address():
            return
        deadline = time.monotonic() + timeout
        while _process_alive(pid) and time.monotonic() < deadline:
            time.sleep(0.02)

    def _kill(self, actors: list) -> None:
        """Kills an island's actors: host 0, which coordinates their distributed system, last."""
        for actor in actors[1:] + actors[:1]:
            try:
                self._ray.kill(actor, no_restart=True)
            except Exception:  # already gone with its node or its Ray
                pass

    def close(self, grace: float = 5.0) -> None:
        """Stops every host, frees the reservations, and stops Ray if this cluster started it."""
        if self._closing.is_set():
            return
        self._closing.set()
        withdraw_token(self.token_file, self.credentials.token)
        self.close_clients()
        if self._supervisor is not None:
            self._supervisor.join(timeout=5)
        if self.controller is not None:
            self.controller.close()  # first: stopping the hosts is not a host loss to report
        with self._lock:  # from now on no restart starts actors or reserves groups
            islands = [(state.actors, state.group) for state in self._islands]
        ray = self._ray
        # A graceful stop first (a dead actor's call just fails), then a kill for any that hangs.
        stops = [actor.stop.remote() for actors, _ in islands for actor in actors]
        if stops:
            ray.wait(stops, num_returns=len(stops), timeout=grace)
        for actors, group in islands:
            self._kill(actors)
            _remove_group(group)
        for thread in self._restarts:  # their actors are gone: they end soon
            thread.join(timeout=grace)
        if self._server is not None:
            self._server.stop(grace=None)
        if self._started_ray:
            ray.shutdown()

    def __enter__(self) -> RayCluster:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _get_all(ray, refs: list, timeout: float) -> list:
    """The results of `refs`; raises the first failure as soon as it comes (ray.get would wait
    for the refs before it), or DeadlineExceededError after `timeout` s."""
    pending, deadline = list(refs), time.monotonic() + timeout
    while pending:
        done, pending = ray.wait(pending, num_returns=1,
                                 timeout=max(0.0, deadline - time.monotonic()))
        if not done:
            raise DeadlineExceededError(f"{len(pending)} Ray calls did not finish within "
                                        f"{timeout:.0f} s")
        ray.get(done)
    return ray.get(refs)


def _remove_group(group) -> None:
    if group is None:
        return
    from ray.util.placement_group import remove_placement_group

    try:
        remove_placement_group(group)
    except Exception:  # never created, or Ray is already gone
        pass


def _process_alive(pid: int) -> bool:
    """Whether a local process exists and has not exited (a zombie has)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def _alive_nodes(ray) -> list[dict]:
    return [n for n in ray.nodes() if n.get("Alive")]


def _default_strategy(ray, bundle: dict[str, float], hosts_per_island: int) -> str:
    """PACK on one machine (STRICT_SPREAD could not place two hosts), STRICT_SPREAD (one host of an
    island per node) when enough nodes could each hold a host, else SPREAD."""
    nodes = [n for n in _alive_nodes(ray)
             if all(n.get("Resources", {}).get(k, 0) >= v for k, v in bundle.items())]
    if len(nodes) <= 1:
        return "PACK"
    return "STRICT_SPREAD" if len(nodes) >= hosts_per_island else "SPREAD"


def _advertised(ray, host: str) -> str:
    """The address hosts dial: the bind address, or this node's Ray address for a wildcard bind."""
    if host in ("", "0.0.0.0", "::"):
        return ray.util.get_node_ip_address()
    return host


def _check_reachable(ray, address: str) -> None:
    """A loopback controller is unreachable from other machines: refuse early, not at timeout."""
    if address.rsplit(":", 1)[0] not in LOOPBACK:
        return
    here = {*LOOPBACK, ray.util.get_node_ip_address()}
    remote = [n["NodeManagerAddress"] for n in _alive_nodes(ray)
              if n["NodeManagerAddress"] not in here]
    if remote:
        raise FailedPreconditionError(
            f"the controller listens on {address}, which Ray nodes {remote} cannot reach; bind it "
            f"to an address they can (pathways up --bind 0.0.0.0, or RayCluster(host=...))")
