"""The resource manager: which islands, hosts and devices exist, and which virtual slices use them.

A virtual slice is a mesh-shaped set of devices on one island. Slices time-share devices (several
slices may use one device; the island's gang scheduler serialises their work), so the mapping from
virtual to physical devices spreads load: a new slice goes to the island, and the devices, that the
fewest live slices already use.
"""

from __future__ import annotations

import dataclasses
import itertools
import math
import threading
import time
from collections.abc import Sequence

from runtime._errors import InvalidArgumentError, NotFoundError, SliceUnavailableError

#: Refuse meshes with more axes than this (hostile input).
MAX_MESH_RANK = 8


@dataclasses.dataclass
class HostRecord:
    """A registered worker host."""

    island: int
    host: int
    address: str
    platform: str
    num_devices: int
    device_kind: str
    backend: str = "local"
    alive: bool = True
    lost_reason: str = ""
    registered_at: float = dataclasses.field(default_factory=time.time)

    def describe(self) -> str:
        return f"host {self.island}.{self.host} ({self.address})"


@dataclasses.dataclass(frozen=True)
class SliceRecord:
    """A granted virtual slice: mesh positions (row-major) mapped to (host, local device)."""

    slice_id: int
    session_id: int
    island: int
    mesh_shape: tuple[int, ...]
    axis_names: tuple[str, ...]
    devices: tuple[tuple[int, int], ...]

    @property
    def size(self) -> int:
        return math.prod(self.mesh_shape)


def validate_mesh(mesh_shape: Sequence[int], axis_names: Sequence[str]) -> None:
    """InvalidArgumentError unless the shape and names describe a mesh."""
    if not mesh_shape or len(mesh_shape) > MAX_MESH_RANK:
        raise InvalidArgumentError(f"mesh shape {tuple(mesh_shape)} must have 1 to "
                                   f"{MAX_MESH_RANK} axes")
    if any(int(n) <= 0 for n in mesh_shape):
        raise InvalidArgumentError(f"mesh shape {tuple(mesh_shape)} has a non-positive axis")
    if len(axis_names) != len(mesh_shape):
        raise InvalidArgumentError(f"{len(axis_names)} axis names for a {len(mesh_shape)}-axis mesh")
    if len(set(axis_names)) != len(axis_names) or not all(axis_names):
        raise InvalidArgumentError(f"axis names {tuple(axis_names)} must be distinct and non-empty")


class ResourceManager:
    """Registry of islands, hosts and slices; thread-safe."""

    def __init__(self) -> None:
        self._hosts: dict[tuple[int, int], HostRecord] = {}
        self._slices: dict[int, SliceRecord] = {}
        self._ids = itertools.count(1)
        self._lock = threading.Lock()

    def register_host(self, record: HostRecord) -> None:
        """Adds a host, or replaces an earlier registration of the same island and index."""
        with self._lock:
            self._hosts[(record.island, record.host)] = record

    def mark_lost(self, island: int, host: int, reason: str) -> HostRecord | None:
        """Marks a host lost; returns its record the first time, None if already lost or unknown."""
        with self._lock:
            record = self._hosts.get((island, host))
            if record is None or not record.alive:
                return None
            record.alive, record.lost_reason = False, reason
            return record

    def hosts(self) -> list[HostRecord]:
        with self._lock:
            return sorted(self._hosts.values(), key=lambda h: (h.island, h.host))

    def island_hosts(self, island: int) -> list[HostRecord]:
        return [h for h in self.hosts() if h.island == island]

    def lost_host(self, island: int) -> HostRecord | None:
        """A lost host of the island, if any."""
        return next((h for h in self.island_hosts(island) if not h.alive), None)

    def slices(self) -> list[SliceRecord]:
        with self._lock:
            return list(self._slices.values())

    def get_slice(self, slice_id: int) -> SliceRecord:
        with self._lock:
            record = self._slices.get(slice_id)
        if record is None:
            raise NotFoundError(f"slice {slice_id} is unknown or was released")
        return record

    def allocate(self, session_id: int, mesh_shape: Sequence[int], axis_names: Sequence[str],
                 island: int = -1) -> SliceRecord:
        """Grants a slice on `island` (or the least-loaded island that fits, for -1).

        Raises InvalidArgumentError for a malformed mesh and SliceUnavailableError when no live
        island (or not the one asked for) has that many devices.
        """
        validate_mesh(mesh_shape, axis_names)
        size = math.prod(mesh_shape)
        with self._lock:
            islands: dict[int, list[HostRecord]] = {}
            for h in self._hosts.values():
                islands.setdefault(h.island, []).append(h)
            if island >= 0 and island not in islands:
                raise SliceUnavailableError(f"island {island} does not exist (islands: "
                                            f"{sorted(islands)})")
            load = self._device_load()
            candidates = []
            for i, hosts in sorted(islands.items()):
                if island >= 0 and i != island:
                    continue
                if not all(h.alive for h in hosts):
                    continue
                devices = [(h.host, d) for h in sorted(hosts, key=lambda h: h.host)
                           for d in range(h.num_devices)]
                if len(devices) >= size:
                    candidates.append((sum(load.get((i, *d), 0) for d in devices) / len(devices),
                                       i, devices))
            if not candidates:
                sizes = {i: sum(h.num_devices for h in hs) for i, hs in islands.items()}
                where = f"island {island}" if island >= 0 else "any live island"
                raise SliceUnavailableError(
                    f"a {'x'.join(map(str, mesh_shape))} slice needs {size} devices; {where} "
                    f"cannot hold it (devices per island: {sizes})")
            _, chosen, devices = min(candidates)
            # Least-used devices first; ties keep device order so meshes stay host-contiguous.
            picked = sorted(devices, key=lambda d: (load.get((chosen, *d), 0), d))[:size]
            record = SliceRecord(next(self._ids), session_id, chosen, tuple(int(n) for n in mesh_shape),
                                 tuple(axis_names), tuple(sorted(picked)))
            self._slices[record.slice_id] = record
            return record

    def release(self, slice_id: int) -> SliceRecord:
        with self._lock:
            record = self._slices.pop(slice_id, None)
        if record is None:
            raise NotFoundError(f"slice {slice_id} is unknown or was released")
        return record

    def _device_load(self) -> dict[tuple[int, int, int], int]:
        load: dict[tuple[int, int, int], int] = {}
        for s in self._slices.values():
            for host, device in s.devices:
                load[(s.island, host, device)] = load.get((s.island, host, device), 0) + 1
        return load
