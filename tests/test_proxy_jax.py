"""Unmodified JAX programs through the proxy (JAX's backends are process-global, so each program
runs in a subprocess against an in-process cluster and proxy)."""

import json
import os
import subprocess
import sys
import textwrap

import pytest

from runtime.proxy import start_proxy

ISSUE_EXAMPLE = """
import runtime.proxy                     # registers JAX's 'proxy' backend, as pathwaysutils.initialize() does
runtime.proxy.connect("{address}") # token found as the client API finds it
import jax, numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
print(jax.devices())                     # the islands' devices
mesh = Mesh(np.array(jax.devices()[:4]).reshape(2, 2), ("data", "model"))
x = jax.device_put(np.ones((8, 8), np.float32), NamedSharding(mesh, P("data", "model")))
y = jax.jit(lambda a: (a @ a.T).sum(0))(x)
print(np.asarray(y))
"""


def run_jax(code: str, token: str, timeout: float = 240) -> subprocess.CompletedProcess:
    env = dict(os.environ, PATHWAYS_TOKEN=token)
    env.pop("JAX_PLATFORMS", None)
    return subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                          timeout=timeout)


def test_the_issue_example_runs_unchanged(proxy, cluster):
    done = run_jax(ISSUE_EXAMPLE.format(address=proxy.address), cluster.credentials.token)
    assert done.returncode == 0, done.stderr[-3000:]
    devices, values = done.stdout.strip().splitlines()
    assert devices.count("PathwaysDevice") == 8 and "island=1" in devices
    assert values == "[64. 64. 64. 64. 64. 64. 64. 64.]"


PROBES = """
import json, sys
import runtime.proxy
runtime.proxy.connect("{address}")
import jax, jax.numpy as jnp, numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

def outcome(fn):
    try:
        fn()
        return "ok"
    except Exception as exc:
        return f"{{type(exc).__name__}}: {{exc}}"

d = jax.devices()
both = Mesh(np.array(d).reshape(2, 4), ("i", "x"))
island0 = Mesh(np.array(d[:4]), ("x",))
x0 = jax.device_put(np.ones(8, np.float32), NamedSharding(island0, P("x")))
results = {{
    "spanning_put": outcome(lambda: jax.device_put(np.ones((2, 8)), NamedSharding(
        both, P("i", "x"))).block_until_ready()),
    "spanning_jit": outcome(lambda: jax.jit(lambda a: a * 2, in_shardings=NamedSharding(
        both, P("i", "x"))).lower(jax.ShapeDtypeStruct((2, 8), np.float32)).compile()),
    "callback": outcome(lambda: jax.jit(lambda a: jax.pure_callback(
        lambda v: v, jax.ShapeDtypeStruct((8,), np.float32), a))(x0).block_until_ready()),
    "still_serving": float(np.asarray(jax.jit(lambda a: a.sum())(x0))),
}}
print(json.dumps(results))
"""


def test_what_the_runtime_cannot_run_is_a_python_exception(proxy, cluster):
    done = run_jax(PROBES.format(address=proxy.address), cluster.credentials.token)
    assert done.returncode == 0, done.stderr[-3000:]
    results = json.loads(done.stdout.strip().splitlines()[-1])
    assert "spans devices of islands 0, 1" in results["spanning_put"]
    assert "INVALID_ARGUMENT" in results["spanning_put"]
    assert "spans devices of islands 0, 1" in results["spanning_jit"]
    assert "UNIMPLEMENTED" in results["callback"]  # refused by jaxlib's client, or by the proxy
    assert results["still_serving"] == 8.0


def test_a_program_without_the_token_is_refused(proxy):
    code = textwrap.dedent(f"""
        import runtime.proxy
        runtime.proxy.connect("{proxy.address}", token="wrong", timeout_s=3)
        import jax
        jax.devices()
    """)
    done = run_jax(code, "")
    assert done.returncode != 0
    assert "UNAUTHENTICATED" in done.stderr


MULTI_HOST = """
import runtime.proxy, sys
runtime.proxy.connect("{address}")
import jax, numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
mesh = Mesh(np.array(jax.devices()[:4]).reshape(2, 2), ("data", "model"))
v = np.arange(64, dtype=np.float32).reshape(8, 8)
x = jax.device_put(v, NamedSharding(mesh, P("data", "model")))
y = jax.jit(lambda a: (a @ a.T).sum(0))(x)
z = jax.jit(lambda a: a * 2, out_shardings=NamedSharding(mesh, P("model")))(x)
print(bool(np.allclose(np.asarray(y), (v @ v.T).sum(0))), bool(np.allclose(np.asarray(z), v * 2)),
      [d.host for d in jax.devices()])
"""


@pytest.mark.slow
def test_a_program_spans_the_hosts_of_a_multi_host_island():
    import runtime

    with runtime.ProcessCluster(islands=1, hosts_per_island=2, devices_per_host=2) as cluster:
        running = start_proxy(cluster.address, credentials=cluster.credentials)
        try:
            done = run_jax(MULTI_HOST.format(address=running.address),
                           cluster.credentials.token)
        finally:
            running.stop()
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.strip().splitlines()[-1] == "True True [0, 0, 1, 1]"


ACROSS_ISLANDS = """
import runtime.proxy, sys
runtime.proxy.connect("{address}")
import jax, numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
d = jax.devices()
x = jax.device_put(np.arange(16, dtype=np.float32).reshape(4, 4),
                   NamedSharding(Mesh(np.array(d[:2]), ("x",)), P("x")))
y = jax.device_put(x, NamedSharding(Mesh(np.array(d[6:]), ("x",)), P("x")))
y.block_until_ready()
print(float(np.asarray(y).sum()), sorted({{dev.island for dev in y.devices()}}))
"""


def test_device_put_onto_another_island_moves_data_host_to_host(proxy, cluster, monkeypatch):
    from runtime.proxy import _session

    kinds = []
    handle = _session.Session._handle

    def recording(self, request):
        kinds.append(request.WhichOneof("request"))
        return handle(self, request)
    monkeypatch.setattr(_session.Session, "_handle", recording)
    done = run_jax(ACROSS_ISLANDS.format(address=proxy.address), cluster.credentials.token)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.strip().splitlines()[-1] == "120.0 [1]"
    # A copy (the hosts stream the shards to each other); nothing read back before it.
    copy = kinds.index("copy_arrays_request")
    assert "copy_to_host_buffer_request" not in kinds[:copy], kinds
