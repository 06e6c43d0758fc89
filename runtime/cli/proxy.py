"""`pathways proxy`: serve the IFRT proxy protocol for a controller, so plain JAX runs on it; and
the proxy process `pathways up --proxy-port` starts beside its controller."""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import threading
import time

from proto import auth as _auth
from proto.config import ClusterConfig, ProxyConfig, from_env

#: Devices the proxy compiles programs on when it cannot ask the controller how many an island has.
DEFAULT_ANALYSIS_DEVICES = from_env(ProxyConfig).proxy_analysis_devices
#: How long `spawn_proxy` waits for the proxy to serve.
STARTUP_TIMEOUT_S = ClusterConfig.from_env().startup_timeout_s
READY_LINE = "proxy listening on "


def register(sub) -> None:
    """Adds the `proxy` subcommand (runtime.cli's extension hook)."""
    from runtime.cli.common import add_auth_args

    p = sub.add_parser("proxy", help="serve plain JAX (the IFRT proxy protocol) for a controller",
                       description="Serve the IFRT proxy protocol that JAX's 'proxy' backend "
                                   "speaks (runtime.proxy.connect), as a client of the "
                                   "controller: each JAX program is one runtime session.")
    p.add_argument("--controller", required=True, help="controller address HOST:PORT")
    p.add_argument("--port", type=int, default=0, help="port to serve on (0: any free port)")
    p.add_argument("--bind", default="127.0.0.1",
                   help="address to serve on (plain gRPC: keep it on loopback or a private "
                        "network)")
    p.add_argument("--analysis-devices", type=int, default=0,
                   help="local CPU devices to compile programs on for their shardings (0: as "
                        "many as the controller's largest island has)")
    add_auth_args(p)
    p.set_defaults(func=_cmd_proxy)


def _cmd_proxy(args: argparse.Namespace) -> int:
    import jax

    from runtime.cli.common import cli_credentials, quiet_collector, wait_for_signal
    from runtime.cluster.process import die_with_parent

    if not die_with_parent():
        return 1
    credentials = cli_credentials(args, args.controller)
    devices = args.analysis_devices or _largest_island(args.controller, credentials)
    jax.config.update("jax_platforms", "cpu")
    jax.config.update("jax_num_cpu_devices", devices)
    from runtime.proxy import start_proxy

    running = start_proxy(args.controller, f"{args.bind}:{args.port}", credentials=credentials)
    quiet_collector()
    print(f"{READY_LINE}{running.address} (controller {args.controller}, {devices} analysis "
          f"devices)", flush=True)
    wait_for_signal()
    running.stop()
    return 0


def _largest_island(controller: str, credentials: _auth.Credentials) -> int:
    """Devices of the controller's largest island (DEFAULT_ANALYSIS_DEVICES if it cannot say)."""
    from proto.errors import PathwaysError
    from runtime.client.client import Client

    try:
        with Client(controller, name="proxy", timeout_s=10.0, credentials=credentials) as client:
            hosts = client.status().hosts
    except PathwaysError as exc:
        print(f"warning: cannot size the proxy's analysis devices from {controller} ({exc}); "
              f"using {DEFAULT_ANALYSIS_DEVICES}", file=sys.stderr)
        return DEFAULT_ANALYSIS_DEVICES
    islands: dict[int, int] = {}
    for h in hosts:
        islands[h.island] = islands.get(h.island, 0) + h.num_devices
    return max(islands.values(), default=DEFAULT_ANALYSIS_DEVICES)


class ProxyProcess:
    """A `pathways proxy` subprocess beside a controller; stop() ends it."""

    def __init__(self, controller_address: str, address: str,
                 credentials: _auth.Credentials, timeout: float = STARTUP_TIMEOUT_S) -> None:
        from runtime.cluster.process import PARENT_PID_ENV

        host, port = address.rsplit(":", 1)
        cmd = [sys.executable, "-m", "runtime.cli", "proxy", "--controller", controller_address,
               "--bind", host, "--port", port]
        if credentials.tls is not None and credentials.tls.ca:
            cmd += ["--tls-ca", credentials.tls.ca]
        env = dict(os.environ, PYTHONUNBUFFERED="1", **credentials.for_clients().worker_environment())
        env[PARENT_PID_ENV] = str(os.getpid())
        self.proc = subprocess.Popen(cmd, env=env, stdin=subprocess.DEVNULL,
                                     stdout=subprocess.PIPE, text=True, start_new_session=True)
        self.address = self._await_ready(timeout)
        threading.Thread(target=self._relay, daemon=True, name="proxy-stdout").start()

    def _await_ready(self, timeout: float) -> str:
        from proto.errors import DeadlineExceededError, FailedPreconditionError

        deadline = time.monotonic() + timeout
        lines: list[str] = []
        reader = threading.Thread(target=lambda: lines.append(self.proc.stdout.readline()),
                                  daemon=True)
        reader.start()
        reader.join(timeout)
        if lines and lines[0].startswith(READY_LINE):
            return lines[0][len(READY_LINE):].split()[0]
        self.stop()
        if time.monotonic() >= deadline:
            raise DeadlineExceededError(f"the proxy did not serve within {timeout:.0f} s")
        raise FailedPreconditionError(f"the proxy exited with {self.proc.returncode} before "
                                      f"serving")

    def _relay(self) -> None:
        for line in self.proc.stdout:
            sys.stdout.write(line)

    def stop(self, grace: float = 5.0) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=grace)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=5)
