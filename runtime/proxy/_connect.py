"""The client side: JAX's "proxy" backend pointed at a Pathways proxy server.

`import runtime.proxy` registers the backend factory, as pathwaysutils does on Cloud TPU; `connect`
points JAX at a proxy and must run before JAX initializes its backends (the first jax.devices(),
jnp array or jit). From then on JAX's own IFRT proxy client (in jaxlib) talks to the proxy, which
serves every request through a runtime session.
"""

from __future__ import annotations

import os

import jax
from jax.extend import backend as jax_backend
from jax.extend.backend import ifrt_proxy

from proto import auth as _auth
from proto.config import ProxyConfig, from_env
from proto.errors import FailedPreconditionError
from runtime.proxy._server import NAME_KEY, TOKEN_KEY, WEIGHT_KEY

PLATFORM = "proxy"
#: jaxlib's client insists on ALTS credentials unless this is set; the proxy serves plain gRPC.
INSECURE_ENV = "IFRT_PROXY_USE_INSECURE_GRPC_CREDENTIALS"
#: Seconds the client keeps trying to reach the proxy before JAX reports the backend failed.
CONNECTION_TIMEOUT_S = int(from_env(ProxyConfig).proxy_connect_timeout_s)

_options: dict = {}


def _create_client():
    """JAX's backend factory: a proxy client for the target `connect` set."""
    target = jax.config.read("jax_backend_target")
    if not target:
        raise FailedPreconditionError("runtime.proxy.connect(address) was not called")
    options = ifrt_proxy.ClientConnectionOptions()
    options.connection_timeout_in_seconds = _options.get("timeout", CONNECTION_TIMEOUT_S)
    options.initialization_data = _options.get("initialization_data", {})
    return ifrt_proxy.get_client(target, options)


def register_backend() -> None:
    """Registers the "proxy" backend factory with JAX. Until `connect` names it in jax_platforms,
    JAX skips it quietly (it fails at once without a target), so other backends are unaffected."""
    try:
        jax_backend.register_backend_factory(PLATFORM, _create_client, priority=-1,
                                             fail_quietly=True)
    except RuntimeError:
        pass  # this process's proxy backend is up already


def connect(address: str, *, name: str = "jax", weight: float = 1.0, token: str | None = None,
            token_file: str | None = None, timeout_s: int = CONNECTION_TIMEOUT_S) -> None:
    """Makes this process's JAX run on the cluster behind the proxy at `address` ("host:port").

    After it, jax.devices() lists the islands' devices and every computation runs on their hosts.
    The token is found as the client API finds it (proto.auth.resolve_token: `token`,
    `token_file`, $PATHWAYS_TOKEN, $PATHWAYS_TOKEN_FILE, or the file `pathways up` wrote for
    `address`); `name` and `weight` are the session's name and proportional share, as for
    runtime.Client. Raises FailedPreconditionError if JAX's backends are already initialized (a
    process's backends are chosen once).
    """
    from jax._src import xla_bridge

    if xla_bridge.backends_are_initialized():
        raise FailedPreconditionError("JAX's backends are already initialized: call "
                                      "runtime.proxy.connect before any JAX computation")
    resolved = _auth.resolve_token(token, token_file, address)
    data: dict[str, bytes] = {NAME_KEY: name.encode(), WEIGHT_KEY: repr(float(weight)).encode()}
    if resolved:
        data[TOKEN_KEY] = resolved.encode()
    _options.update(initialization_data=data, timeout=int(timeout_s))
    os.environ.setdefault(INSECURE_ENV, "true")
    jax.config.update("jax_platforms", PLATFORM)
    jax.config.update("jax_backend_target", f"grpc://{address}")
