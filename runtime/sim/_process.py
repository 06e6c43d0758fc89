"""One process serving every simulated host of whole islands: `pathways worker --platform sim`.

Each host has its own gRPC server (its own address) and its own registration with the
controller, as a real worker process has; all of them run on one asyncio event loop, so a process
serves hundreds of hosts. An island's hosts always share a process: a computation spanning hosts
completes when they meet (runtime.sim._rendezvous), which happens on their common event loop.

Registration and re-registration follow runtime.worker.membership: a host that has heard nothing from
any controller for SILENCE_S seconds registers again (the controller restarted). The checks run
on one task for all hosts; the blocking registration calls run on a small thread pool.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import logging
import resource
import signal
import sys
import time
from collections.abc import Callable, Sequence
from concurrent import futures

import grpc

from proto import auth as _auth
from proto.config import from_env
from proto.errors import PathwaysError
from runtime.sim._config import DEFAULT_FLOPS_PER_S, SimConfig
from runtime.sim._cost import CostModel
from runtime.sim._host import SimHost
from runtime.sim._rendezvous import Rendezvous
from runtime.sim._send import Transfers
from runtime.sim._service import start_sim_server
from runtime.worker import membership as _membership

log = logging.getLogger(__name__)

#: Registrations in flight at once (each one a blocking call on the pool), and departures.
REGISTRATION_THREADS = from_env(SimConfig).registration_threads
LEAVE_THREADS = from_env(SimConfig).leave_threads
#: Line a process prints once every host it serves has registered (runtime.sim._cluster waits
#: for it).
REGISTERED = "sim: registered"


class SimIslands:
    """The simulated hosts of `islands` (each of `hosts_per_island` hosts) in this process."""

    def __init__(self, controller: str, islands: Sequence[int], hosts_per_island: int,
                 config: SimConfig, credentials: _auth.Credentials | None = None, *,
                 bind: str = "127.0.0.1", port: int = 0) -> None:
        if hosts_per_island <= 0 or not islands:
            raise ValueError("a simulated process serves at least one island of one host")
        self.controller, self.islands = controller, list(islands)
        self.hosts_per_island, self.config = hosts_per_island, config
        self.credentials = credentials or _auth.Credentials()
        self.bind, self.port = bind, port
        self.hosts: list[SimHost] = []
        self.servers: list[grpc.aio.Server] = []
        self.registration_s = 0.0
        self.re_registrations = 0
        self.longest_stall_s = 0.0  # of the event loop (see watch_loop)
        self._registered_at: dict[tuple[int, int], float] = {}
        self._pool = futures.ThreadPoolExecutor(max_workers=REGISTRATION_THREADS,
                                                thread_name_prefix="sim-register")
        self._costs = CostModel(config)
        self._transfers = Transfers(self.credentials)

    async def start(self) -> None:
        """Creates the hosts, serves each on its own port and starts their executors."""
        for island in self.islands:
            rendezvous = Rendezvous()
            members: list[SimHost] = []

            def peer(h: int, members=members) -> SimHost | None:
                return members[h] if 0 <= h < len(members) else None

            for h in range(self.hosts_per_island):
                host = SimHost(island, h, self.config, island_size=self.hosts_per_island,
                               rendezvous=rendezvous, costs=self._costs, peer=peer,
                               credentials=self.credentials)
                host.transfers = self._transfers
                members.append(host)
            self.hosts.extend(members)
        for i, host in enumerate(self.hosts):
            port = self.port + i if self.port else 0
            server, _ = await start_sim_server(host, f"{self.bind}:{port}", self.credentials)
            self.servers.append(server)
            self._transfers.local[host.address] = host
            host.start()

    async def register(self, timeout: float = 60.0) -> None:
        """Registers every host with the controller (retrying while none answers, up to
        `timeout`); raises the first refusal."""
        loop = asyncio.get_running_loop()
        began = time.monotonic()

        async def one(host: SimHost) -> None:
            await loop.run_in_executor(self._pool, _membership.register, self.controller,
                                       host.info(), self.credentials, timeout)
            self._registered_at[(host.island, host.host)] = time.monotonic()

        await asyncio.gather(*(one(host) for host in self.hosts))
        self.registration_s = time.monotonic() - began

    async def keep_registered(self) -> None:
        """Registers a host again after SILENCE_S without a call from any controller; asks it
        for a progress report after half of that (runtime.worker.membership's report_due)."""
        loop = asyncio.get_running_loop()
        silence = _membership.SILENCE_S
        busy: set[tuple[int, int]] = set()

        async def again(host: SimHost, key: tuple[int, int]) -> None:
            try:
                await loop.run_in_executor(self._pool, _membership.register, self.controller,
                                           host.info(), self.credentials,
                                           _membership.ATTEMPT_TIMEOUT_S)
                self.re_registrations += 1
            except RuntimeError:  # the pool was shut down: the process is stopping
                return
            except grpc.RpcError as err:
                log.warning("registration of sim host %d.%d with %s failed: %s", *key,
                            self.controller, err.code().name)
            finally:
                self._registered_at[key] = time.monotonic()  # try again after another silence
                busy.discard(key)

        period = silence / 6
        checked = time.monotonic()
        while True:
            await asyncio.sleep(period)
            now = time.monotonic()
            late, checked = now - checked - period, now
            if late > period / 2:
                # This loop stalled (the process was starved): calls that came meanwhile are not
                # handled yet, so the silence is ours, not the controller's. Look again later.
                continue
            for host in self.hosts:
                key = (host.island, host.host)
                silent = now - max(host.last_contact, self._registered_at.get(key, now))
                if _membership.report_due(silent, silence):
                    host.report_soon()
                if key in busy or silent < silence:
                    continue
                log.warning("no controller has contacted sim host %d.%d for %.1f s: registering "
                            "again with %s", *key, silent, self.controller)
                busy.add(key)
                loop.create_task(again(host, key))

    async def watch_loop(self, period: float = 0.1, report_above: float = 0.5) -> None:
        """Notes how late the event loop runs a periodic task: a loop that stalls answers nobody
        (the controller's pings included), so simulated hosts would look slow or silent."""
        while True:
            began = time.monotonic()
            await asyncio.sleep(period)
            stall = time.monotonic() - began - period
            self.longest_stall_s = max(self.longest_stall_s, stall)
            if stall > report_above:
                log.warning("sim event loop stalled for %.2f s (%d hosts)", stall,
                            len(self.hosts))

    async def stop(self, unregister: bool = True) -> None:
        """Stops serving; tells the controller the hosts leave unless told not to (best effort:
        a second at most per host, LEAVE_THREADS at a time). Registrations still queued are
        dropped: with the controller gone each would retry for seconds."""
        loop = asyncio.get_running_loop()
        self._pool.shutdown(wait=False, cancel_futures=True)
        if unregister:
            with futures.ThreadPoolExecutor(LEAVE_THREADS, thread_name_prefix="sim-leave") as pool:
                await asyncio.gather(*(loop.run_in_executor(
                    pool, _membership.unregister, self.controller, host.info(), self.credentials)
                    for host in self.hosts))
        await asyncio.gather(*(server.stop(grace=1.0) for server in self.servers))
        for host in self.hosts:
            host.stop()
        await self._transfers.close()
        self._costs.close()


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The flags of the simulated platform (`--platform sim`)."""
    p.add_argument("--flops-per-s", type=float, default=DEFAULT_FLOPS_PER_S,
                   help="with --platform sim: speed of one simulated device; a computation "
                        "holds its devices for its per-device FLOPs (XLA's cost analysis) over "
                        "this")
    p.add_argument("--fixed-duration-ms", type=float, default=None,
                   help="with --platform sim: every computation holds its devices this long "
                        "instead")


def config_from_args(args: argparse.Namespace, devices_per_host: int) -> SimConfig:
    fixed = args.fixed_duration_ms
    # The environment's settings (PATHWAYS_<FIELD>), with the command line's on top.
    return dataclasses.replace(from_env(SimConfig), devices_per_host=devices_per_host,
                               flops_per_s=args.flops_per_s,
                               fixed_seconds=None if fixed is None else fixed / 1e3,
                               execution_deadline_s=args.execution_deadline)


def run_worker(args: argparse.Namespace, credentials: _auth.Credentials,
               after_start: Callable[[], None] = lambda: None) -> int:
    """`pathways worker --platform sim`: serves every host of islands ISLAND to
    ISLAND + --island-count - 1 (--num-hosts hosts each) until SIGINT or SIGTERM."""
    from runtime.cluster.process import die_with_parent

    if args.host != 0:
        print("error: with --platform sim a process serves whole islands (their hosts meet in "
              "one process): leave --host at 0", file=sys.stderr)
        return 2
    if not die_with_parent():
        return 1
    raise_file_limit()
    islands = list(range(args.island, args.island + args.island_count))
    sim = SimIslands(args.controller, islands, args.num_hosts,
                     config_from_args(args, args.devices), credentials, bind=args.bind,
                     port=args.port)
    return asyncio.run(_serve(sim, args.register_timeout, after_start))


async def _serve(sim: SimIslands, register_timeout: float, after_start: Callable[[], None]
                 ) -> int:
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    try:
        await sim.start()
    except PathwaysError as exc:
        print(f"error: {exc}", file=sys.stderr)
        await sim.stop(unregister=False)
        return 2
    islands = sim.islands
    ports = [h.address.rsplit(":", 1)[1] for h in sim.hosts]
    print(f"sim: islands {islands[0]}-{islands[-1]} x {sim.hosts_per_island} hosts x "
          f"{sim.config.devices_per_host} devices ({sim.config.device_kind}) listening on "
          f"{sim.bind} ports {ports[0]}-{ports[-1]}", flush=True)
    registering = loop.create_task(sim.register(register_timeout))
    stopping = loop.create_task(stop.wait())
    await asyncio.wait({registering, stopping}, return_when=asyncio.FIRST_COMPLETED)
    if not registering.done():
        registering.cancel()
        await sim.stop(unregister=False)
        return 0
    if registering.exception() is not None:
        print(f"error: cannot register with controller {sim.controller}: "
              f"{registering.exception()}", file=sys.stderr)
        await sim.stop(unregister=False)
        return 1
    print(f"{REGISTERED} {len(sim.hosts)} hosts with {sim.controller} in "
          f"{sim.registration_s:.2f} s", flush=True)
    after_start()
    watchers = [loop.create_task(sim.keep_registered()), loop.create_task(sim.watch_loop())]
    await stopping
    for watcher in watchers:
        watcher.cancel()
    await sim.stop(unregister=True)
    print(f"sim: {sim.re_registrations} re-registrations after silences; event loop stalled "
          f"{sim.longest_stall_s:.2f} s at most", flush=True)
    return 0


def raise_file_limit() -> None:
    """Every host holds a listening socket and a few connections: lift the soft limit on open
    files to the hard one."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
