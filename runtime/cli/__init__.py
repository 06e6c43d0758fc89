"""The `pathways` command line: run controllers and workers, start local clusters, inspect them."""

from __future__ import annotations

import argparse
import logging
import sys

from runtime.cli.common import add_auth_args, add_lease_arg, add_metrics_arg, add_sim_args
from runtime.cli.serve import cmd_controller, cmd_up, cmd_worker
from runtime.cli.status import cmd_status, format_status

__all__ = ["build_parser", "format_status", "main"]


def build_parser() -> argparse.ArgumentParser:
    from proto.config import ClusterConfig
    from runtime.cli.args import Parser

    settings = ClusterConfig.from_env()  # flags default to the environment's settings

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
    add_auth_args(p, host=True)
    add_metrics_arg(p, "this host")
    p.add_argument("--execution-deadline", type=float,
                   default=settings.worker.execution_deadline_s,
                   help="seconds a computation on a multi-host slice may wait for the slice's "
                        "other hosts before it is reported hung (0: forever)")
    add_sim_args(p)
    p.set_defaults(func=cmd_worker)

    p = sub.add_parser("controller", help="run a controller",
                       description="Run a controller; workers register with it.")
    p.add_argument("--port", type=int, default=0, help="port to serve on (0: any free port)")
    p.add_argument("--bind", default="127.0.0.1", help="address to serve on")
    p.add_argument("--policy", choices=("fifo", "share"), default=settings.controller.policy,
                   help="how clients share an island: fifo (arrival order) or share "
                        "(device time in proportion to each client's weight)")
    p.add_argument("--session-quota", type=int,
                   default=settings.controller.session_quota_bytes or 0,
                   help="most bytes of device memory one client session may hold (0: no limit)")
    add_lease_arg(p)
    add_auth_args(p, host=True)
    add_metrics_arg(p, "the controller")
    p.set_defaults(func=cmd_controller)

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
    add_sim_args(p)
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
    p.add_argument("--policy", choices=("fifo", "share"), default=settings.controller.policy,
                   help="how clients share an island: fifo (arrival order) or share "
                        "(device time in proportion to each client's weight)")
    p.add_argument("--execution-deadline", type=float,
                   default=settings.worker.execution_deadline_s,
                   help="seconds a computation on a multi-host slice may wait for the slice's "
                        "other hosts before it is reported hung (0: forever)")
    p.add_argument("--session-quota", type=int,
                   default=settings.controller.session_quota_bytes or 0,
                   help="most bytes of device memory one client session may hold (0: no limit)")
    add_lease_arg(p)
    p.add_argument("--token-file",
                   help="where to write the generated client token, mode 0600 (default: "
                        "~/.pathways/token-PORT, removed on exit)")
    p.add_argument("--tls-cert", help="serve with TLS: PEM certificate")
    p.add_argument("--tls-key", help="PEM private key of --tls-cert")
    p.add_argument("--tls-ca", help="PEM CA bundle for verifying peers")
    p.add_argument("--proxy-port", type=int, default=None, metavar="P",
                   help="also serve plain JAX (the IFRT proxy protocol, `pathways proxy`) on "
                        "port P (0: any free port); programs call runtime.proxy.connect")
    add_metrics_arg(p, "the controller on P and of the local hosts on P+1, P+2, ... (island "
                        "by island)")
    p.set_defaults(func=cmd_up)

    p = sub.add_parser("status", help="list islands, hosts and slices of a controller",
                       description="Show a controller's islands, hosts, devices and slices. A "
                                   "client sees its own sessions and slices; with the host token "
                                   "(--host-token-file or $PATHWAYS_HOST_TOKEN), every client's.")
    p.add_argument("address", help="controller address HOST:PORT")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.add_argument("--timeout", type=float, default=10.0,
                   help="seconds to wait for the controller's answer (connecting takes at most "
                        "3 s: no answer by then means no controller is there)")
    add_auth_args(p, host=True)
    p.set_defaults(func=cmd_status)

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
