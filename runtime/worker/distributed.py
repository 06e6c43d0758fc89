"""Multi-host islands: the hosts of one island form one JAX distributed system.

Each host process of such an island calls `initialize_island` before it touches a device: JAX's
distributed runtime (coordinator on host 0) joins the processes, and on CPU the cross-process
collectives go over gloo. Afterwards `jax.devices()` lists every host's devices, so one SPMD
computation on a mesh of them runs across hosts, each process launching it on its own devices
(in the same order: the island's gang order guarantees that).

Host h of the island is JAX process h, and a slice's device (host h, device d) is the d-th device
of process h in id order (`island_devices`).
"""

from __future__ import annotations

import socket
from collections.abc import Sequence

import jax

from runtime.worker.defaults import SETTINGS as _WORKER

#: How long a host waits for the island's other hosts to join the distributed system.
INITIALIZE_TIMEOUT_S = _WORKER.distributed_init_timeout_s  # whole seconds (JAX takes an int)


def initialize_island(coordinator: str, num_hosts: int, host: int, platform: str = "cpu",
                      timeout_s: int = INITIALIZE_TIMEOUT_S) -> None:
    """Joins this process, as host `host`, to its island's distributed system of `num_hosts`
    processes coordinated at `coordinator` ("ip:port", served by host 0). Call before JAX
    initialises its backends; returns once every host has joined (or raises after `timeout_s`).

    JAX's preemption handling takes over SIGTERM here: install your own handlers afterwards.
    """
    if platform == "cpu":
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
    # The coordinator binds the address it is reached at (not every interface), and a host that
    # exits does not wait minutes for hosts that are gone.
    jax.distributed.initialize(coordinator, num_processes=num_hosts, process_id=host,
                               initialization_timeout=timeout_s,
                               coordinator_bind_address=coordinator, shutdown_timeout_seconds=5)


def island_devices(platform: str, num_hosts: int) -> list[list[jax.Device]]:
    """Every host's devices of the island's distributed system, indexed by host, in id order."""
    per_host: list[list[jax.Device]] = [[] for _ in range(num_hosts)]
    for device in jax.devices(platform):
        per_host[device.process_index].append(device)
    return [sorted(devices, key=lambda d: d.id) for devices in per_host]


def host_devices(platform: str, count: int, num_hosts: int = 1, host: int = 0,
                 coordinator: str = "") -> tuple[list[jax.Device], list[list[jax.Device]] | None]:
    """The devices a worker host owns, in a process whose JAX backends are not up yet: (its first
    `count` devices, every host's first `count` devices indexed by host, or None on a single-host
    island). With `num_hosts` > 1 the process first joins its island's distributed system at
    `coordinator` as host `host` (`initialize_island`). On cpu it makes `count` simulated devices.

    Raises FailedPreconditionError when the process has fewer than `count` devices.
    """
    from proto.errors import FailedPreconditionError

    if platform == "cpu":
        # Takes precedence over a device count inherited through XLA_FLAGS.
        jax.config.update("jax_num_cpu_devices", count)
    # Arrays are stored in the dtype the wire names: 64-bit ones too, for clients that enable x64.
    jax.config.update("jax_enable_x64", True)
    if num_hosts > 1:
        if not coordinator:
            raise ValueError(f"an island of {num_hosts} hosts needs a coordinator address")
        initialize_island(coordinator, num_hosts, host, platform)
        hosts = [devices[:count] for devices in island_devices(platform, num_hosts)]
        devices = hosts[host]
    else:
        hosts, devices = None, jax.devices(platform)[:count]
    if len(devices) < count or any(len(d) < count for d in hosts or ()):
        found = [len(d) for d in hosts] if hosts else len(devices)
        raise FailedPreconditionError(f"host {host} needs {count} {platform} devices per host; "
                                      f"found {found}")
    return devices, hosts


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port free on `host` right now (for a coordinator the caller starts soon after)."""
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def device_memory_bytes(devices: Sequence[jax.Device]) -> int:
    """Memory per device: the backend's limit where it reports one (GPUs), otherwise the machine's
    physical memory split evenly over the devices (simulated CPU devices share it)."""
    if not devices:
        return 0
    try:
        stats = devices[0].memory_stats() or {}
    except Exception:  # not every backend implements it
        stats = {}
    if stats.get("bytes_limit"):
        return int(stats["bytes_limit"])
    try:
        import os

        total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return 0
    return total // len(devices)
