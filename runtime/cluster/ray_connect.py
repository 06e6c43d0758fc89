"""Connecting to Ray: a local instance kept on loopback, or an existing cluster.

Ray is an optional dependency (`pip install -e '.[ray]'`): this module imports it only when called.
"""

from __future__ import annotations

import os
import sys

#: Read by Ray when `ray` is imported: "0" keeps a local instance on loopback (start_local_ray).
LOOPBACK_ENV = "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"
#: The addresses of this machine only.
LOOPBACK = ("127.0.0.1", "localhost", "::1")


def loopback_ray_environment() -> None:
    """Sets, before `ray` is imported, what keeps Ray nodes started by this process on loopback.

    Ray resolves "127.0.0.1" to the machine's routable address (probing with a UDP socket) and then
    listens on all interfaces, unless RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0, which makes a node
    loopback-only; Ray reads it when it is imported. Also turns Ray's usage report off. Raises
    RuntimeError when Ray was imported before without it, or the environment asks for the opposite.
    """
    before = os.environ.get(LOOPBACK_ENV)
    os.environ.setdefault(LOOPBACK_ENV, "0")
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")  # no usage report leaves the machine
    if os.environ[LOOPBACK_ENV] != "0" or ("ray" in sys.modules and before != "0"):
        raise RuntimeError(f"ray was imported before {LOOPBACK_ENV}=0 was set (or it is set "
                           f"otherwise); it would bind non-loopback addresses. Set it in the "
                           f"environment first.")


def start_local_ray(num_cpus: int = 2, num_gpus: int | None = None) -> bool:
    """Starts a single-node Ray bound to 127.0.0.1 only, unless Ray is already up; True if started.

    `num_cpus` and `num_gpus` are the node's logical resources (what bundles reserve), not cores.
    """
    imported = sys.modules.get("ray")
    if imported is not None and imported.is_initialized():
        return False  # this process's own Ray connection, whatever its addresses
    loopback_ray_environment()
    ray = _import_ray()
    if ray.is_initialized():
        return False
    ray.init(address="local", include_dashboard=False, num_cpus=num_cpus, num_gpus=num_gpus,
             _node_ip_address="127.0.0.1", object_store_memory=128 * 2**20)
    if ray.util.get_node_ip_address() not in LOOPBACK:  # the environment came too late
        address = ray.util.get_node_ip_address()
        ray.shutdown()
        raise RuntimeError(f"the local Ray instance took address {address}, not loopback; set "
                           f"{LOOPBACK_ENV}=0 before ray is imported")
    return True


def connect_ray(address: str | None, *, num_cpus: int, num_gpus: int | None = None) -> bool:
    """Makes this process a Ray driver; True if it started a local Ray instance (to stop later).

    address None: reuse the Ray this process is already connected to, else start a local instance
    on loopback with `num_cpus`/`num_gpus` logical resources. Otherwise ("auto", "HOST:PORT" of a
    head's GCS, "ray://HOST:PORT") connect to that cluster, leaving its resources as they are.
    """
    if address is None:
        return start_local_ray(num_cpus, num_gpus)
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    ray = _import_ray()
    if not ray.is_initialized():
        ray.init(address=address)
    return False


def _import_ray():
    try:
        import ray
    except ModuleNotFoundError as exc:
        raise ModuleNotFoundError("the Ray backend needs Ray: pip install -e '.[ray]'") from exc
    return ray
