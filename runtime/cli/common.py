"""What the `pathways` subcommands share: their common flags, credentials, signal handling and
the collector settings of long-running processes."""

from __future__ import annotations

import argparse
import gc
import math
import signal
import time

from proto.config import ClusterConfig

_SETTINGS = ClusterConfig.from_env()

#: Python thread switch interval in worker processes (see cmd_worker).
WORKER_SWITCH_INTERVAL_S = _SETTINGS.worker.switch_interval_s

#: Allocations between young-generation collections in long-running processes (Python: 700).
GC_YOUNG_THRESHOLD = _SETTINGS.gc_young_threshold


def quiet_collector() -> None:
    """For a long-running server process, once started: what exists now (JAX's modules, compiled
    executables) lives as long as the process, so it leaves the cyclic collector's view, and
    collections run less often. A full collection otherwise walks it all and stalls dispatch or
    execution for tens of milliseconds (seen: 40-70 ms in the controller under load)."""
    gc.collect()
    gc.freeze()
    gc.set_threshold(GC_YOUNG_THRESHOLD, *gc.get_threshold()[1:])


#: After SIGINT or SIGTERM, how long a server process may take to stop in order before it is
#: ended regardless (PATHWAYS_STOP_GRACE_S overrides it).
STOP_GRACE_S = _SETTINGS.stop_grace_s


class Signalled:
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


def stop_on_signal() -> Signalled:
    return Signalled()


def wait_for_signal(stop: Signalled | None = None) -> None:
    """Blocks until SIGINT or SIGTERM."""
    (stop or Signalled()).wait()


def add_auth_args(p: argparse.ArgumentParser, *, host: bool = False) -> None:
    """Flags that say what credentials a command presents (proto.auth)."""
    p.add_argument("--token-file", help="file holding the cluster token (default: $PATHWAYS_TOKEN, "
                                        "$PATHWAYS_TOKEN_FILE, or the file `pathways up` wrote)")
    if host:
        p.add_argument("--host-token-file", help="file holding the host token (default: "
                                                 "$PATHWAYS_HOST_TOKEN; `pathways up` sets it)")
    p.add_argument("--tls-cert", help="PEM certificate (servers; clients with mutual TLS)")
    p.add_argument("--tls-key", help="PEM private key of --tls-cert")
    p.add_argument("--tls-ca", help="PEM CA bundle that verifies the peer")


def positive_int(text: str) -> int:
    """An argparse type: an integer of at least 1."""
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return value


def add_lease_arg(p: argparse.ArgumentParser) -> None:
    from proto.config import ControllerConfig, from_env

    def seconds(text: str) -> float:
        value = float(text)
        if not value >= 0:
            raise argparse.ArgumentTypeError(f"expected seconds >= 0, got {text!r}")
        return value

    p.add_argument("--session-lease", type=seconds,
                   default=from_env(ControllerConfig).session_lease_s, metavar="S",
                   help="seconds a client's session outlives its last call: the controller then "
                        "frees the arrays and slices of a client gone silent (0: never)")


def add_metrics_arg(p: argparse.ArgumentParser, what: str) -> None:
    p.add_argument("--metrics-port", type=int, default=None, metavar="P",
                   help=f"serve Prometheus metrics of {what} at http://BIND:P/metrics "
                        f"(0: any free port; README: Metrics)")


def start_metrics(args: argparse.Namespace, what: str) -> None:
    """Starts the metrics endpoint asked for by --metrics-port (PortInUseError if taken)."""
    if args.metrics_port is None:
        return
    from runtime.metrics import serve_metrics

    server = serve_metrics(args.metrics_port, args.bind)
    print(f"{what} metrics on http://{args.bind}:{server.server_port}/metrics", flush=True)


def add_sim_args(p: argparse.ArgumentParser) -> None:
    from runtime.sim import add_arguments

    add_arguments(p)


def cli_credentials(args: argparse.Namespace, address: str | None = None):
    from proto import auth as _auth

    tls = None
    if args.tls_cert or args.tls_ca:
        tls = _auth.TLSConfig(ca=args.tls_ca or "", cert=args.tls_cert or "",
                              key=args.tls_key or "")
    host_file = getattr(args, "host_token_file", None)
    return _auth.Credentials.resolve(token_file=args.token_file, tls=tls, address=address,
                                     host_token=_auth.read_token_file(host_file)
                                     if host_file else None)
