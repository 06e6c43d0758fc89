"""Plain JAX on the runtime: the IFRT proxy protocol, served beside the controller.

Client side (a JAX program)::

    import runtime.proxy
    runtime.proxy.connect("127.0.0.1:50052")   # a proxy started by `pathways up --proxy-port`
    import jax
    print(jax.devices())                       # the islands' devices

Server side: `pathways proxy --controller ADDR --port P`, `pathways up --proxy-port P`, or
`start_proxy(controller_address)` in Python. Each JAX program is one runtime session.
"""

from runtime.proxy._connect import connect, register_backend
from runtime.proxy._server import ProxyServer, RunningProxy, create_proxy_server, start_proxy

register_backend()

__all__ = ["ProxyServer", "RunningProxy", "connect", "create_proxy_server", "register_backend",
           "start_proxy"]
