"""The runtime through JAX's own proxy backend, as a system of the dispatch benchmark.

A plain JAX program (a subprocess: JAX's backend is chosen once per process) connected with
`runtime.proxy.connect` to a `pathways proxy` beside a one-island cluster runs exactly the JAX
baseline's functions (`make_step`/`make_fused`, on a Mesh of the island's devices). Each call
goes JAX -> proxy -> controller -> host, so this measures what plain JAX programs get from the
runtime, beside the client API ("runtime") and in-process JAX ("jax"). Calls are not awaited one
by one (the runtime orders them; only the last result is awaited), as the client API's are not;
JAX has no program construct, so Chained is a Python loop of calls, as for the JAX baseline.

The benchmark process drives the subprocess over stdin/stdout, one JSON line per call; each
timing is taken inside the subprocess.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Sequence

import numpy as np

from benchmarks.dispatch_baselines import MATMUL_DIM, PROGRAM_LENGTH, JaxSystem

#: Longest one call of the driven subprocess may take (compiles included).
CALL_TIMEOUT_S = 600.0


class ProxySystem:
    """Dispatches the chain from a proxy-backed JAX subprocess to a one-island cluster."""

    name = "proxy"

    def __init__(self, n_devices: int, *, n: int = MATMUL_DIM) -> None:
        import runtime
        from runtime.cli.proxy import ProxyProcess

        self.n_devices = n_devices
        self._cluster = runtime.ProcessCluster(islands=1, hosts_per_island=1,
                                               devices_per_host=n_devices)
        self._proxy = self._proc = None
        try:
            self._proxy = ProxyProcess(self._cluster.address, "127.0.0.1:0",
                                       self._cluster.credentials)
            env = dict(os.environ, PYTHONUNBUFFERED="1",
                       **self._cluster.credentials.for_clients().worker_environment())
            env.pop("JAX_PLATFORMS", None)
            self._proc = subprocess.Popen(
                [sys.executable, "-m", "benchmarks.dispatch_proxy", self._proxy.address,
                 str(n_devices), str(n)], env=env, stdin=subprocess.PIPE,
                stdout=subprocess.PIPE, text=True)
            self._call("state")  # connected, arrays in place
        except BaseException:
            self.close()
            raise

    def _call(self, method: str, *args):
        self._proc.stdin.write(json.dumps({"method": method, "args": args}) + "\n")
        self._proc.stdin.flush()
        line = self._proc.stdout.readline()
        if not line:
            raise RuntimeError(f"the proxy-backed JAX process exited ({self._proc.poll()})")
        reply = json.loads(line)
        if "error" in reply:
            raise RuntimeError(f"proxy-backed JAX: {reply['error']}")
        return reply["result"]

    def opbyop(self, n_computations: int) -> float:
        return self._call("opbyop", n_computations)

    def chained(self, n_programs: int, length: int = PROGRAM_LENGTH) -> float:
        return self._call("chained", n_programs, length)

    def fused(self, n_programs: int, length: int = PROGRAM_LENGTH) -> float:
        return self._call("fused", n_programs, length)

    def opbyop_sized(self, k: int, n_computations: int) -> float:
        return self._call("opbyop_sized", k, n_computations)

    def state(self) -> np.ndarray:
        return np.asarray(self._call("state"), np.float32)

    def close(self) -> None:
        if self._proc is not None and self._proc.poll() is None:
            self._proc.stdin.close()
            try:
                self._proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self._proc.kill()
        if self._proxy is not None:
            self._proxy.stop()
        self._cluster.close()


class _Unawaited(JaxSystem):
    """The JAX baseline's system, awaiting only the last of a run of calls."""

    def advance(self, x, fn, calls: int):
        for _ in range(calls):
            x = fn(x, self._w)
        x.block_until_ready()
        return x


def serve(argv: Sequence[str]) -> int:
    """In the subprocess: connect to the proxy at argv[0], then answer calls from stdin."""
    import runtime.proxy

    address, n_devices, n = argv[0], int(argv[1]), int(argv[2])
    runtime.proxy.connect(address, name="dispatch-bench-proxy")
    import jax

    system = _Unawaited(jax.devices()[:n_devices], n=n)
    for line in sys.stdin:
        call = json.loads(line)
        try:
            result = getattr(system, call["method"])(*call["args"])
            reply = {"result": result.tolist() if isinstance(result, np.ndarray) else result}
        except Exception as exc:  # reported to the driving process, which raises it
            reply = {"error": f"{type(exc).__name__}: {exc}"}
        print(json.dumps(reply), flush=True)
    # Executables go while the backend is still connected (at interpreter exit jaxlib drops the
    # client first, and each executable's release then fails, loudly).
    system.close()
    jax.clear_caches()
    return 0


def proxy_figures(report: dict) -> dict:
    """The proxy's break-even size (ms; None: never reached) and its throughput per program shape
    relative to the client API's, from a dispatch report."""
    import math

    from benchmarks.dispatch_baselines import break_even_ms

    rates = {(r["system"], r["shape"]): r["computations_per_s"] for r in report["results"]}
    break_even = break_even_ms(report["sweep"], system="proxy")
    return {"proxy_break_even_ms": None if math.isinf(break_even) else break_even,
            "proxy_vs_runtime": {shape: rates[("proxy", shape)] / rates[("runtime", shape)]
                                 for shape in ("opbyop", "chained", "fused")
                                 if rates.get(("runtime", shape)) and ("proxy", shape) in rates}}


if __name__ == "__main__":
    sys.exit(serve(sys.argv[1:]))
