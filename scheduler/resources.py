"""The resource manager: which islands, hosts and devices exist, and which virtual slices use them.

A virtual slice is a mesh-shaped set of devices on one island. Slices time-share devices (several
slices may use one device; the island's gang scheduler serialises their work), so the mapping from
virtual to physical devices spreads load: a new slice goes to the island, and the devices, that the
fewest live slices already use.

A slice spans several hosts only on an island whose hosts form one JAX distributed system
(`distributed_hosts` > 1, so one SPMD computation can run across them), and only once all of them
have registered; elsewhere a slice lives on one host. Hosts join by registering and leave by
unregistering (or are lost when they stop answering): an island with a missing host takes no new
slices, and a host that left is forgotten once no slice uses its island.
"""

from __future__ import annotations

import dataclasses
import itertools
import math
import threading
import time
from collections.abc import Sequence

from proto.bounded import Latest
from proto.config import ControllerConfig
from proto.errors import InvalidArgumentError, NotFoundError, SliceUnavailableError

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
    device_memory_bytes: int = 0  # per device
    distributed_hosts: int = 0  # hosts of the island's JAX distributed system (0/1: none)
    ray_node: str = ""  # id of the Ray node the host runs on (backend "ray")
    alive: bool = True
    lost_reason: str = ""
    left: bool = False  # unregistered on purpose (as opposed to lost)
    registered_at: float = dataclasses.field(default_factory=time.time)

    def describe(self) -> str:
        return f"host {self.island}.{self.host} ({self.address})"

    @property
    def state(self) -> str:
        if self.alive:
            return "alive"
        return "left" if self.left else f"lost: {self.lost_reason}"


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

    def __init__(self, dropped_remembered: int = ControllerConfig.max_dropped_remembered) -> None:
        self._hosts: dict[tuple[int, int], HostRecord] = {}
        # The hosts not alive (lost, or departed and not yet forgotten): every command checks
        # its island for one (lost_host), which must not cost a look at every host.
        self._lost: set[tuple[int, int]] = set()
        self._slices: dict[int, SliceRecord] = {}
        # slice id -> why it was released for its owner (an island restart), the latest few: a
        # client that still uses it learns why it is gone, not merely that it is unknown.
        self._dropped: Latest[int, str] = Latest(dropped_remembered)
        self._ids = itertools.count(1)
        self._lock = threading.Lock()

    def register_host(self, record: HostRecord) -> None:
        """Adds a host, or replaces an earlier registration of the same island and index (a host
        that restarted, or one that left and came back)."""
        if record.island < 0 or record.host < 0 or record.num_devices <= 0:
            raise InvalidArgumentError("a host needs island >= 0, host >= 0 and num_devices > 0")
        with self._lock:
            key = (record.island, record.host)
            self._hosts[key] = record
            if record.alive:
                self._lost.discard(key)
            else:
                self._lost.add(key)

    def remove_host(self, island: int, host: int, address: str = "") -> HostRecord | None:
        """A host leaves: it takes no more work, its island takes no new slices, and it is
        forgotten once no slice uses its island. Returns its record, or None when unknown (or when
        `address` is given and another host has since registered in its place)."""
        with self._lock:
            record = self._hosts.get((island, host))
            if record is None or (address and record.address != address):
                return None
            record.alive, record.left = False, True
            record.lost_reason = record.lost_reason or "left the cluster"
            self._lost.add((island, host))
            self._prune()
            return record

    def mark_lost(self, island: int, host: int, reason: str) -> HostRecord | None:
        """Marks a host lost; returns its record the first time, None if already lost or unknown."""
        with self._lock:
            record = self._hosts.get((island, host))
            if record is None or not record.alive:
                return None
            record.alive, record.lost_reason = False, reason
            self._lost.add((island, host))
            return record

    def hosts(self) -> list[HostRecord]:
        with self._lock:
            return sorted(self._hosts.values(), key=lambda h: (h.island, h.host))

    def island_hosts(self, island: int) -> list[HostRecord]:
        return [h for h in self.hosts() if h.island == island]

    def lost_host(self, island: int) -> HostRecord | None:
        """A lost (or departed) host of the island, if any (the lowest-numbered)."""
        with self._lock:
            lost = [self._hosts[key] for key in self._lost if key[0] == island]
        return min(lost, key=lambda h: h.host, default=None)

    def island_memory(self) -> dict[int, int]:
        """Total device memory per island, in bytes."""
        totals: dict[int, int] = {}
        for h in self.hosts():
            totals[h.island] = totals.get(h.island, 0) + h.num_devices * h.device_memory_bytes
        return totals

    def slices(self) -> list[SliceRecord]:
        with self._lock:
            return list(self._slices.values())

    def get_slice(self, slice_id: int) -> SliceRecord:
        with self._lock:
            record = self._slices.get(slice_id)
            why = self._dropped.get(slice_id) if record is None else None
        if why is not None:
            raise NotFoundError(f"slice {slice_id} is unknown: {why}, which dropped it (make a "
                                f"new slice)")
        if record is None:
            raise NotFoundError(f"slice {slice_id} is unknown or was released")
        return record

    def allocate(self, session_id: int, mesh_shape: Sequence[int], axis_names: Sequence[str],
                 island: int = -1, devices: Sequence[tuple[int, int]] = ()) -> SliceRecord:
        """Grants a slice on `island` (or the least-loaded island that fits, for -1).

        The devices come from one host, or from several hosts of a complete distributed island;
        the least-used devices are taken first, unless `devices` names them: (host, device) per
        mesh position, in row-major order, on `island`. Raises InvalidArgumentError for a
        malformed mesh or placement and SliceUnavailableError, saying what each island can hold,
        when no live island (or not the one asked for) can hold it.
        """
        validate_mesh(mesh_shape, axis_names)
        size = math.prod(mesh_shape)
        if devices:
            return self._place(session_id, mesh_shape, axis_names, island, devices)
        with self._lock:
            islands: dict[int, list[HostRecord]] = {}
            for h in self._hosts.values():
                islands.setdefault(h.island, []).append(h)
            if island >= 0 and island not in islands:
                raise SliceUnavailableError(f"island {island} does not exist (islands: "
                                            f"{sorted(islands)})")
            load = self._device_load()
            candidates, capacity = [], {}
            for i, hosts in sorted(islands.items()):
                if island >= 0 and i != island:
                    continue
                capacity[i], groups = _device_groups(hosts)
                for group in groups:
                    if len(group) >= size:
                        mean = sum(load.get((i, *d), 0) for d in group) / len(group)
                        candidates.append((mean, i, group))
            if not candidates:
                where = f"island {island}" if island >= 0 else "any live island"
                held = ", ".join(f"island {i}: {c}" for i, c in capacity.items()) or "no islands"
                raise SliceUnavailableError(
                    f"a {'x'.join(map(str, mesh_shape))} slice needs {size} devices; {where} "
                    f"cannot hold it (largest slice each can hold: {held})")
            _, chosen, devices = min(candidates, key=lambda c: c[:2])
            # Least-used devices first; ties keep device order so meshes stay host-contiguous.
            picked = sorted(devices, key=lambda d: (load.get((chosen, *d), 0), d))[:size]
            record = SliceRecord(next(self._ids), session_id, chosen,
                                 tuple(int(n) for n in mesh_shape), tuple(axis_names),
                                 tuple(sorted(picked)))
            self._slices[record.slice_id] = record
            return record

    def _place(self, session_id: int, mesh_shape: Sequence[int], axis_names: Sequence[str],
               island: int, devices: Sequence[tuple[int, int]]) -> SliceRecord:
        """A slice on exactly `devices` (what allocate does when the caller names them)."""
        devices = tuple((int(h), int(d)) for h, d in devices)
        if len(devices) != math.prod(mesh_shape) or len(set(devices)) != len(devices):
            raise InvalidArgumentError(f"a {'x'.join(map(str, mesh_shape))} slice needs "
                                       f"{math.prod(mesh_shape)} distinct devices, "
                                       f"{len(devices)} given")
        with self._lock:
            hosts = [h for h in self._hosts.values() if h.island == island]
            if island < 0 or not hosts:
                raise SliceUnavailableError(f"island {island} does not exist: a placed slice "
                                            f"names its island")
            capacity, groups = _device_groups(hosts)
            if not any(set(devices) <= set(group) for group in groups):
                raise SliceUnavailableError(
                    f"devices {list(devices)} (host, device) of island {island} cannot form one "
                    f"slice (the island can hold: {capacity})")
            record = SliceRecord(next(self._ids), session_id, island,
                                 tuple(int(n) for n in mesh_shape), tuple(axis_names), devices)
            self._slices[record.slice_id] = record
            return record

    def release(self, slice_id: int, why: str = "") -> SliceRecord:
        """Frees a slice; `why`, if given, is told to whoever uses it later (its owner did not
        release it: an island restart did)."""
        with self._lock:
            record = self._slices.pop(slice_id, None)
            if why and record is not None:
                self._dropped[slice_id] = why
            self._prune()
        if record is None:
            raise NotFoundError(f"slice {slice_id} is unknown or was released")
        return record

    def _prune(self) -> None:
        """Forgets departed hosts of islands that no slice uses any more."""
        used = {s.island for s in self._slices.values()}
        for key in [k for k, h in self._hosts.items() if h.left and h.island not in used]:
            del self._hosts[key]
            self._lost.discard(key)

    def _device_load(self) -> dict[tuple[int, int, int], int]:
        """Live slices per (island, host, device)."""
        load: dict[tuple[int, int, int], int] = {}
        for s in self._slices.values():
            for host, device in s.devices:
                load[(s.island, host, device)] = load.get((s.island, host, device), 0) + 1
        return load


def _device_groups(hosts: list[HostRecord]) -> tuple[str, list[list[tuple[int, int]]]]:
    """The device sets of one island a slice may use, as (host, device) lists, and a description
    of the largest slice it can hold (for errors).

    A complete, live distributed island is one group; otherwise each live host is its own group,
    and an island with a missing host (lost, departed, or not yet registered) holds nothing.
    """
    hosts = sorted(hosts, key=lambda h: h.host)
    missing = [h for h in hosts if not h.alive]
    if missing:
        return f"none ({missing[0].describe()} {missing[0].state})", []
    expected = max(h.distributed_hosts for h in hosts)
    if expected > 1:
        if len(hosts) < expected:
            return f"none ({len(hosts)} of its {expected} hosts registered)", []
        group = [(h.host, d) for h in hosts for d in range(h.num_devices)]
        return f"{len(group)} devices over {len(hosts)} hosts", [group]
    groups = [[(h.host, d) for d in range(h.num_devices)] for h in hosts]
    return f"{max(map(len, groups))} devices (one host)", groups
