"""The `pathways` command line: run controllers and workers, start local clusters, inspect them."""

from __future__ import annotations

import argparse
import gc
import json
import logging
import math
import signal
import sys
import time


#: Python thread switch interval in worker processes (see _cmd_worker).
WORKER_SWITCH_INTERVAL_S = 0.0002
#: Allocations between young-generation collections in long-running processes (Python: 700).
GC_YOUNG_THRESHOLD = 20_000


def _quiet_collector() -> None:
    """For a long-running server process, once started: what exists now (JAX's modules, compiled
    executables) lives as long as the process, so it leaves the cyclic collector's view, and
    collections run less often. A full collection otherwise walks it all and stalls dispatch or
    execution for tens of milliseconds (seen: 40-70 ms in the controller under load)."""
    gc.collect()
    gc.freeze()
    gc.set_threshold(GC_YOUNG_THRESHOLD, *gc.get_threshold()[1:])


#: After SIGINT or SIGTERM, how long a server process may take to stop in order before it is
#: ended regardless (PATHWAYS_STOP_GRACE_S overrides it).
STOP_GRACE_S = 30.0


class _Signalled:
    """Notes SIGINT and SIGTERM (handlers installed on creation). The handler only sets a flag: a
    handler that takes a lock deadlocks when the signal lands while the main thread holds it
    (threading.Event.set from a handler, while the main thread is inside Event.wait).

    The first signal also arms an alarm: if the process has not stopped `grace_s` seconds later
    (a thread that never returns, a lock that is never released), the kernel ends it with SIGALRM,
    whatever Python is doing. A second signal ends it at once."""

    def __init__(self, grace_s: float | None = None) -> None:
        import os

        self.received = False
        self.grace_s = grace_s if grace_s is not None else float(
            os.environ.get("PATHWAYS_STOP_GRACE_S", STOP_GRACE_S))
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, self._note)

    def _note(self, signum, _frame) -> None:
        import os

        if self.received:
            os._exit(128 + signum)
        self.received = True
        # SIGALRM's default action ends the process in the kernel: no Python code has to run.
        signal.signal(signal.SIGALRM, signal.SIG_DFL)
        signal.alarm(max(1, math.ceil(self.grace_s)))

    def wait(self) -> None:
        """Blocks until a signal has come (time.sleep wakes up for the handler)."""
        while not self.received:
            time.sleep(0.2)


def _stop_on_signal() -> _Signalled:
    return _Signalled()


def _wait_for_signal(stop: _Signalled | None = None) -> None:
    """Blocks until SIGINT or SIGTERM."""
    (stop or _Signalled()).wait()


def _add_auth_args(p: argparse.ArgumentParser, *, host: bool = False) -> None:
    """Flags that say what credentials a command presents (proto.auth)."""
    p.add_argument("--token-file", help="file holding the cluster token (default: $PATHWAYS_TOKEN, "
                                        "$PATHWAYS_TOKEN_FILE, or the file `pathways up` wrote)")
    if host:
        p.add_argument("--host-token-file", help="file holding the host token (default: "
                                                 "$PATHWAYS_HOST_TOKEN; `pathways up` sets it)")
    p.add_argument("--tls-cert", help="PEM certificate (servers; clients with mutual TLS)")
    p.add_argument("--tls-key", help="PEM private key of --tls-cert")
    p.add_argument("--tls-ca", help="PEM CA bundle that verifies the peer")


def _add_lease_arg(p: argparse.ArgumentParser) -> None:
    from proto.leases import DEFAULT_SESSION_LEASE_S

    def seconds(text: str) -> float:
        value = float(text)
        if not value >= 0:
            raise argparse.ArgumentTypeError(f"expected seconds >= 0, got {text!r}")
        return value

    p.add_argument("--session-lease", type=seconds, default=DEFAULT_SESSION_LEASE_S, metavar="S",
                   help="seconds a client's session outlives its last call: the controller then "
                        "frees the arrays and slices of a client gone silent (0: never)")


def _add_metrics_arg(p: argparse.ArgumentParser, what: str) -> None:
    p.add_argument("--metrics-port", type=int, default=None, metavar="P",
                   help=f"serve Prometheus metrics of {what} at http://BIND:P/metrics "
                        f"(0: any free port; README: Metrics)")


def _serve_metrics(args: argparse.Namespace, what: str) -> None:
    """Starts the metrics endpoint asked for by --metrics-port (PortInUseError if taken)."""
    if args.metrics_port is None:
        return
    from runtime.metrics import serve_metrics

    server = serve_metrics(args.metrics_port, args.bind)
    print(f"{what} metrics on http://{args.bind}:{server.server_port}/metrics", flush=True)
def _add_sim_args(p: argparse.ArgumentParser) -> None:
    from runtime.sim import add_arguments

    add_arguments(p)


def _credentials(args: argparse.Namespace, address: str | None = None):
    from proto import auth as _auth

    tls = None
    if args.tls_cert or args.tls_ca:
        tls = _auth.TLSConfig(ca=args.tls_ca or "", cert=args.tls_cert or "",
                              key=args.tls_key or "")
    host_file = getattr(args, "host_token_file", None)
    return _auth.Credentials.resolve(token_file=args.token_file, tls=tls, address=address,
                                     host_token=_auth.read_token_file(host_file)
                                     if host_file else None)


def _cmd_worker(args: argparse.Namespace) -> int:
    import os

    from runtime.cluster.clusters import die_with_parent

    if args.platform == "sim":  # simulated hosts of whole islands, one event loop
        from runtime.sim import run_worker

        return run_worker(args, _credentials(args, args.controller), _quiet_collector)
    if not die_with_parent():
        return 1  # the process that started this worker is gone already
    from runtime.worker.distributed import host_devices
    from proto.errors import FailedPreconditionError
    from runtime.worker.membership import Membership
    from runtime.server import Worker, create_worker_server

    # The executor thread gives the GIL up while a computation runs; it must get it back within
    # tens of microseconds, not the default 5 ms, when another thread (a Dispatch batch) holds it.
    sys.setswitchinterval(WORKER_SWITCH_INTERVAL_S)
    distributed = args.num_hosts > 1
    if distributed and not args.coordinator:
        print("error: --num-hosts > 1 needs --coordinator", file=sys.stderr)
        return 2
    try:
        devices, hosts = host_devices(args.platform, args.devices, args.num_hosts, args.host,
                                      args.coordinator)
    except FailedPreconditionError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    # After the distributed runtime, which takes SIGTERM over: until the worker has registered,
    # a signal ends it at once (registration retries for a minute and would not notice).
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: os._exit(0))
    _serve_metrics(args, f"worker {args.island}.{args.host}")
    worker = Worker(args.island, args.host, devices, platform=args.platform,
                    island_devices=hosts, execution_deadline_s=args.execution_deadline,
                    credentials=_credentials(args, args.controller))
    server, _ = create_worker_server(worker, f"{args.bind}:{args.port}")
    # Registers now, and again whenever the controller restarts (runtime.worker.membership).
    membership = Membership(args.controller, worker.info, lambda: worker.last_contact,
                            worker.credentials)
    try:
        membership.start(timeout=args.register_timeout)
    except Exception as exc:
        print(f"error: cannot register with controller {args.controller}: {exc}", file=sys.stderr)
        server.stop(grace=None)
        return 1
    stop = _stop_on_signal()  # from now on a signal stops the worker in order
    _quiet_collector()
    print(f"worker {args.island}.{args.host} listening on {worker.address} "
          f"({args.devices} {args.platform} devices"
          f"{f', host {args.host} of {args.num_hosts}' if distributed else ''})", flush=True)
    _wait_for_signal(stop)
    membership.stop()
    server.stop(grace=1.0)
    worker.stop()
    if distributed or worker.hang:
        # Skip interpreter teardown: the distributed runtime's shutdown waits for hosts that may be
        # gone, and a computation stuck in a collective never returns.
        logging.shutdown()
        os._exit(0)
    return 0


def _cmd_controller(args: argparse.Namespace) -> int:
    from runtime.cluster.clusters import die_with_parent
    from runtime.server import Controller, create_controller_server

    if not die_with_parent():  # started by a cluster (runtime.sim) that is gone already
        return 1

    credentials = _credentials(args)
    if credentials.token is None:
        print("warning: no token (--token-file, $PATHWAYS_TOKEN): calls are not authenticated",
              file=sys.stderr)
    controller = Controller(policy=args.policy, credentials=credentials,
                            session_quota_bytes=args.session_quota or None,
                            session_lease_s=args.session_lease)
    server, port = create_controller_server(controller, f"{args.bind}:{args.port}")
    _serve_metrics(args, "controller")
    _quiet_collector()
    print(f"controller listening on {args.bind}:{port} (policy {args.policy})", flush=True)
    _wait_for_signal()
    controller.close()
    server.stop(grace=1.0)
    return 0


def _cmd_up(args: argparse.Namespace) -> int:
    from proto import auth as _auth

    devices_per_host = args.devices_per_host or max(1, args.devices_per_island // args.hosts_per_island)
    _serve_metrics(args, "controller")  # first: a port in use stops everything before it starts
    if args.platform == "sim":
        from runtime.sim import SimCluster

        if args.ray is not None or args.tls_cert:
            print("error: --platform sim runs its own simulated processes, without --ray or "
                  "--tls-cert", file=sys.stderr)
            return 2
        fixed = args.fixed_duration_ms
        cluster = SimCluster(args.islands, args.hosts_per_island, devices_per_host,
                             processes=args.sim_processes or None, flops_per_s=args.flops_per_s,
                             fixed_duration_s=None if fixed is None else fixed / 1e3,
                             execution_deadline_s=args.execution_deadline, port=args.port,
                             host=args.bind, policy=args.policy,
                             session_quota_bytes=args.session_quota or None,
                             session_lease_s=args.session_lease)
        backend = (f"simulated hosts in {len(cluster.procs)} processes (registered in "
                   f"{cluster.registration_s:.1f} s)")
    elif args.ray is None:
        from runtime.cluster.clusters import ProcessCluster

        tls = None
        if args.tls_cert:
            tls = _auth.TLSConfig(ca=args.tls_ca or "", cert=args.tls_cert, key=args.tls_key or "")
        cluster = ProcessCluster(args.islands, args.hosts_per_island, devices_per_host,
                                 port=args.port, host=args.bind, platform=args.platform,
                                 policy=args.policy, execution_deadline_s=args.execution_deadline,
                                 credentials=_auth.Credentials.generate(tls),
                                 session_quota_bytes=args.session_quota or None,
                                 session_lease_s=args.session_lease,
                                 worker_metrics_port=(None if args.metrics_port is None else
                                                      args.metrics_port and args.metrics_port + 1))
        backend = "local processes"
    else:
        from runtime.cluster.ray_cluster import RayCluster

        if args.tls_cert:
            print("error: --tls-cert is not supported with --ray (the certificate files would "
                  "have to be on every Ray node)", file=sys.stderr)
            return 2
        cluster = RayCluster(args.islands, args.hosts_per_island, devices_per_host,
                             ray_address=args.ray or None,
                             placement_strategy=args.placement_strategy, port=args.port,
                             host=args.bind, platform=args.platform, policy=args.policy,
                             execution_deadline_s=args.execution_deadline,
                             session_quota_bytes=args.session_quota or None,
                             max_host_restarts=args.max_host_restarts,
                             credentials=_auth.Credentials.generate(),
                             session_lease_s=args.session_lease)
        backend = (f"Ray actors ({cluster.placement_strategy}, "
                   f"{'local Ray instance' if not args.ray else 'Ray at ' + args.ray})")
    # The clients' token, readable by this user only (the cluster published it for this
    # machine's clients); the host token stays with the workers.
    token_file = cluster.token_file
    if args.token_file:
        _auth.write_token_file(args.token_file, cluster.credentials.token)
        token_file = args.token_file
    _quiet_collector()
    proxy = proxy_token = None
    try:
        print(f"{args.islands} islands x {args.hosts_per_island} hosts x {devices_per_host} "
              f"{args.platform} devices up as {backend}", flush=True)
        print(f"controller listening on {cluster.address}", flush=True)
        if args.metrics_port and args.ray is None:
            hosts = args.islands * args.hosts_per_island
            print(f"host metrics on ports {args.metrics_port + 1}-{args.metrics_port + hosts} "
                  f"(island by island)", flush=True)
        if token_file:
            print(f"token in {token_file} (clients on this machine find it; elsewhere set "
                  f"{_auth.TOKEN_FILE_ENV})", flush=True)
        if args.proxy_port is not None:
            from runtime.cluster.clusters import publish_token
            from runtime.cli.proxy import ProxyProcess

            proxy = ProxyProcess(cluster.address, f"{args.bind}:{args.proxy_port}",
                                 cluster.credentials)
            proxy_token = publish_token(proxy.address, cluster.credentials)
            print(f"IFRT proxy (plain JAX: runtime.proxy.connect) listening on {proxy.address}",
                  flush=True)
        _wait_for_signal()
    finally:
        if proxy is not None:
            from runtime.cluster.clusters import withdraw_token

            proxy.stop()
            withdraw_token(proxy_token, cluster.credentials.token)
        cluster.close()
        if args.token_file:
            from runtime.cluster.clusters import withdraw_token

            withdraw_token(args.token_file, cluster.credentials.token)
    print("stopped", flush=True)
    return 0


def _cmd_status(args: argparse.Namespace) -> int:
    from runtime.client.client import Client
    from proto.errors import PathwaysError

    try:
        with Client(args.address, name="status", timeout_s=args.timeout,
                    credentials=_credentials(args, args.address)) as client:
            status = client.status()
    except PathwaysError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    if args.json:
        from runtime.cli.status_json import message_to_json

        print(json.dumps(message_to_json(status), indent=2))
        return 0
    print(format_status(args.address, status))
    return 0


def format_status(address: str, status) -> str:
    """`pathways status` as text: per island its order, its hosts (what each runs or waits for)
    and the client queues in front of it; then the slices."""
    lease = (f"lease {status.session_lease_s:g} s, {status.sessions_expired} expired"
             if status.session_lease_s else "no lease")
    lines = [f"controller {address}: {status.sessions} sessions ({lease}), {status.arrays} arrays, "
             f"{len(status.slices)} slices"]
    islands = {i.island: i for i in status.islands}
    for island in sorted({h.island for h in status.hosts} | set(islands)):
        order = islands.get(island)
        head = f"island {island}"
        if order is not None:
            head += (f": order at #{order.sequence}, policy {order.policy}, "
                     f"{order.outstanding_s * 1e3:.1f} ms of work ahead of the hosts")
        lines.append(head)
        if order is not None and order.failure:
            lines.append(f"  FAILED: {order.failure}")
        lines.append(f"  {'island':>6} {'host':>4}  {'address':<21} {'backend':<7} {'platform':<8} "
                     f"{'devices':>7} {'GiB/dev':>7} {'received':>8} {'executed':>8} "
                     f"{'queued':>6}  state")
        for h in (h for h in status.hosts if h.island == island):
            memory = f"{h.device_memory_bytes / 2**30:.1f}" if h.device_memory_bytes else "-"
            lines.append(f"  {h.island:>6} {h.host:>4}  {h.address:<21} {h.backend:<7} "
                         f"{h.platform:<8} {h.num_devices:>7} {memory:>7} {h.received:>8} "
                         f"{h.executed:>8} {h.queue_depth + h.undelivered:>6}  {h.state}")
            lines.append(f"{'':>15}{h.activity or '-'}")
            if h.ray_node:
                lines.append(f"{'':>15}ray node {h.ray_node}")
            if h.hang:
                lines.append(f"{'':>15}hang: {h.hang}")
        for t in order.tenants if order is not None else ():
            lines.append(f"  client {t.client_name!r} (session {t.session_id}, weight "
                         f"{t.weight:g}): {t.queued} queued, {t.ordered} ordered, "
                         f"{t.device_seconds:.3f} device s")
    for s in status.slices:
        mesh = "x".join(f"{n}{a}" for n, a in zip(s.mesh_shape, s.axis_names))
        hosts = sorted({d.host for d in s.devices})
        lines.append(f"slice {s.slice_id}: island {s.island}, mesh {mesh}, hosts "
                     f"{','.join(map(str, hosts))}")
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    from runtime.cli.args import Parser

    parser = Parser(prog="pathways", description="A Pathways-style single-controller runtime "
                                                 "for JAX.")
    parser.add_argument("-v", "--verbose", action="store_true", help="log at INFO level")
    parser.add_argument("--version", action="version", version=_version())
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("worker", help="run one worker host of an island",
                       description="Run a worker host: owns local devices, registers with the "
                                   "controller, runs its island's instructions in order.")
    p.add_argument("--controller", required=True, help="controller address HOST:PORT")
    p.add_argument("--island", type=int, required=True, help="island (pod) index")
    p.add_argument("--host", type=int, default=0, help="host index inside the island")
    p.add_argument("--devices", type=int, default=4, help="number of local devices to own")
    p.add_argument("--platform", choices=("cpu", "cuda", "sim"), default="cpu",
                   help="device platform (cpu: CPU devices; sim: simulated devices that "
                        "execute nothing, for every host of whole islands in one process)")
    p.add_argument("--island-count", type=int, default=1,
                   help="with --platform sim: serve islands ISLAND .. ISLAND+N-1")
    p.add_argument("--bind", default="127.0.0.1", help="address to serve on")
    p.add_argument("--port", type=int, default=0, help="port to serve on (0: any free port)")
    p.add_argument("--register-timeout", type=float, default=60.0,
                   help="seconds to keep trying to reach the controller")
    p.add_argument("--num-hosts", type=int, default=1,
                   help="hosts of the island; above 1 they form one JAX distributed system")
    p.add_argument("--coordinator", default="",
                   help="HOST:PORT of the island's distributed-system coordinator (served by "
                        "host 0; needed with --num-hosts > 1)")
    _add_auth_args(p, host=True)
    _add_metrics_arg(p, "this host")
    p.add_argument("--execution-deadline", type=float, default=30.0,
                   help="seconds a computation on a multi-host slice may wait for the slice's "
                        "other hosts before it is reported hung (0: forever)")
    _add_sim_args(p)
    p.set_defaults(func=_cmd_worker)

    p = sub.add_parser("controller", help="run a controller",
                       description="Run a controller; workers register with it.")
    p.add_argument("--port", type=int, default=0, help="port to serve on (0: any free port)")
    p.add_argument("--bind", default="127.0.0.1", help="address to serve on")
    p.add_argument("--policy", choices=("fifo", "share"), default="fifo",
                   help="how clients share an island: fifo (arrival order) or share "
                        "(device time in proportion to each client's weight)")
    p.add_argument("--session-quota", type=int, default=0,
                   help="most bytes of device memory one client session may hold (0: no limit)")
    _add_lease_arg(p)
    _add_auth_args(p, host=True)
    _add_metrics_arg(p, "the controller")
    p.set_defaults(func=_cmd_controller)

    p = sub.add_parser("up", help="start a controller and local island workers",
                       description="Start a controller in this process and every island host as a "
                                   "local worker subprocess; Ctrl-C or SIGTERM stops them all.")
    p.add_argument("--islands", type=int, default=2, help="number of islands")
    p.add_argument("--devices-per-island", type=int, default=4,
                   help="devices per island (split over its hosts)")
    p.add_argument("--hosts-per-island", type=int, default=1,
                   help="worker hosts per island; the hosts of an island form one JAX "
                        "distributed system, so a slice may span them")
    p.add_argument("--devices-per-host", type=int, default=0,
                   help="devices per host (overrides --devices-per-island)")
    p.add_argument("--platform", choices=("cpu", "cuda", "sim"), default="cpu",
                   help="device platform (sim: simulated devices that execute nothing, many "
                        "hosts per process)")
    p.add_argument("--sim-processes", type=int, default=0,
                   help="with --platform sim: processes serving the hosts, whole islands each "
                        "(0: about 256 hosts per process)")
    _add_sim_args(p)
    p.add_argument("--port", type=int, default=0, help="controller port (0: any free port)")
    p.add_argument("--bind", default="127.0.0.1", help="address to serve on")
    p.add_argument("--ray", nargs="?", const="", default=None, metavar="ADDRESS",
                   help="run each host as a Ray actor, each island gang-reserved by a placement "
                        "group; ADDRESS (auto, HEAD:6379, ray://HEAD:10001) joins a Ray cluster, "
                        "none starts a local Ray instance on loopback and stops it afterwards")
    p.add_argument("--placement-strategy", default="auto",
                   choices=("auto", "PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD"),
                   help="Ray placement strategy of an island's bundles (auto: PACK on one node, "
                        "STRICT_SPREAD where each host of an island can have its own node, "
                        "else SPREAD)")
    p.add_argument("--max-host-restarts", type=int, default=3,
                   help="with --ray: how often each island is restarted, on a fresh placement "
                        "group, after one of its hosts' actors died (0: never; -1: no limit)")
    p.add_argument("--policy", choices=("fifo", "share"), default="fifo",
                   help="how clients share an island: fifo (arrival order) or share "
                        "(device time in proportion to each client's weight)")
    p.add_argument("--execution-deadline", type=float, default=30.0,
                   help="seconds a computation on a multi-host slice may wait for the slice's "
                        "other hosts before it is reported hung (0: forever)")
    p.add_argument("--session-quota", type=int, default=0,
                   help="most bytes of device memory one client session may hold (0: no limit)")
    _add_lease_arg(p)
    p.add_argument("--token-file",
                   help="where to write the generated client token, mode 0600 (default: "
                        "~/.pathways/token-PORT, removed on exit)")
    p.add_argument("--tls-cert", help="serve with TLS: PEM certificate")
    p.add_argument("--tls-key", help="PEM private key of --tls-cert")
    p.add_argument("--tls-ca", help="PEM CA bundle for verifying peers")
    p.add_argument("--proxy-port", type=int, default=None, metavar="P",
                   help="also serve plain JAX (the IFRT proxy protocol, `pathways proxy`) on "
                        "port P (0: any free port); programs call runtime.proxy.connect")
    _add_metrics_arg(p, "the controller on P and of the local hosts on P+1, P+2, ... (island "
                        "by island)")
    p.set_defaults(func=_cmd_up)

    p = sub.add_parser("status", help="list islands, hosts and slices of a controller",
                       description="Show a controller's islands, hosts, devices and slices.")
    p.add_argument("address", help="controller address HOST:PORT")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.add_argument("--timeout", type=float, default=10.0,
                   help="seconds to wait for the controller's answer (connecting takes at most "
                        "3 s: no answer by then means no controller is there)")
    _add_auth_args(p)
    p.set_defaults(func=_cmd_status)

    for module in _EXTENSIONS:
        __import__(module, fromlist=["register"]).register(sub)
    from runtime.cli.args import finish

    return finish(parser)


def _version() -> str:
    """`pathways --version`: this package's version and the JAX it runs on."""
    from importlib import metadata

    def version(package: str) -> str:
        try:
            return metadata.version(package)
        except metadata.PackageNotFoundError:
            return "not installed"

    return (f"pathways {version('pathways-runtime')} (jax {version('jax')}, "
            f"jaxlib {version('jaxlib')}, Python {sys.version.split()[0]})")


#: Packages that add their own subcommands through `register(subparsers)`.
_EXTENSIONS: list[str] = ["model.cli", "model.train_cli", "benchmarks.cli",
                          "runtime.cli.proxy"]


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    from proto.ports import PortInUseError

    try:
        return args.func(args)
    except PortInUseError as exc:  # a user's mistake, not a crash: one line, no traceback
        print(f"error: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
