"""What `pathways status` shows: hosts (pinged now), slices within a byte budget, and each
island's order and queues. A component of Controller (runtime.controller.controller)."""

from __future__ import annotations

import threading
from collections.abc import Callable, Mapping, Sequence

import grpc

from proto import limits as _limits
from proto import pathways_pb2 as pb
from proto.leases import SessionLeases
from runtime.controller import visibility as _visibility
from runtime.controller.defaults import STATUS_PING_TIMEOUT_S
from scheduler.gang import GangScheduler
from scheduler.resources import HostRecord, ResourceManager, SliceRecord


class StatusReport:
    """Status for a Controller, read under its `lock` from what its parts hold: the open
    `sessions` and their `leases`, `array_count()` (the planner's live arrays), the hosts in
    `resources` and their probe channels (`probes()`, pinged with `ping`:
    runtime.controller.health), the islands' `schedulers`, and `slice_info`
    (runtime.controller.catalog); `limits` bound the slices listed."""

    def __init__(self, lock: threading.RLock, resources: ResourceManager,
                 schedulers: Mapping[int, GangScheduler], sessions: Mapping, *,
                 leases: SessionLeases, array_count: Callable[[], int], probes: Callable[[], dict],
                 ping: Callable[..., object],
                 slice_info: Callable[..., pb.SliceInfo], limits: _limits.Limits) -> None:
        self._lock = lock
        self.resources = resources
        self._schedulers = schedulers
        self._sessions = sessions
        self.leases = leases
        self._array_count = array_count
        self._probes = probes
        self._ping = ping
        self._slice_info = slice_info
        self.limits = limits

    def status(self, viewer: int | None = None, ping_hosts: bool = True) -> pb.GetStatusReply:
        """Hosts (each pinged now, unless not `ping_hosts`: what it runs or waits for), slices,
        and per island the order and the client queues in front of it. With a `viewer` session,
        only what concerns it (runtime.controller.visibility: its slices and queues; not what hosts run for
        others). Slices are listed up to Limits.status_slice_bytes; `slices_omitted` counts the
        rest."""
        with self._lock:
            depth = {i: s.queue_depth() for i, s in self._schedulers.items()}
            reply = pb.GetStatusReply(sessions=len(self._sessions), arrays=self._array_count(),
                                      session_lease_s=self.leases.lease_s,
                                      sessions_expired=self.leases.expired)
            probes = self._probes()
            schedulers = sorted(self._schedulers.items())
        hosts = self.resources.hosts()
        self._list_slices(reply, [r for r in self.resources.slices()
                                  if viewer is None or r.session_id == viewer])
        pings = {key: self._ping(key, stub, STATUS_PING_TIMEOUT_S, fresh_s=0.0)
                 for key, (_, stub) in probes.items()
                 if ping_hosts and any((h.island, h.host) == key and h.alive for h in hosts)}
        for h in hosts:
            info = pb.HostInfo(
                island=h.island, host=h.host, address=h.address, platform=h.platform,
                num_devices=h.num_devices, device_kind=h.device_kind, backend=h.backend,
                state=h.state, device_memory_bytes=h.device_memory_bytes,
                distributed_hosts=h.distributed_hosts, ray_node=h.ray_node,
                undelivered=depth.get(h.island, {}).get(h.host, 0))
            ping = pings.get((h.island, h.host))
            if ping is not None:
                try:
                    live = ping.result().host
                    info.activity, info.queue_depth = live.activity, live.queue_depth
                    info.received, info.executed = live.received, live.executed
                    info.hang = live.hang
                    info.current_sequence, info.current_name = (live.current_sequence,
                                                                live.current_name)
                    info.current_state = live.current_state
                    if live.hang:
                        info.state = "hung"
                except grpc.RpcError as err:
                    info.activity = f"not answering ({err.code().name})"
                except ValueError:  # its channel was replaced or closed meanwhile
                    info.activity = "not answering"
            reply.hosts.append(info)
        for _, scheduler in schedulers:
            reply.islands.append(scheduler.status())
        if viewer is not None:
            _visibility.restrict(reply, viewer)
        return reply

    def _list_slices(self, reply: pb.GetStatusReply, records: Sequence[SliceRecord]) -> None:
        """Adds slice descriptions to a status reply, within its byte budget."""
        budget = self.limits.status_slice_bytes
        hosts: dict[int, list[HostRecord]] = {}
        for record in sorted(records, key=lambda r: r.slice_id):
            island = hosts.get(record.island)
            if island is None:
                island = hosts[record.island] = self.resources.island_hosts(record.island)
            info = self._slice_info(record, island)
            budget -= info.ByteSize()
            if budget < 0:
                reply.slices_omitted += 1
            else:
                reply.slices.append(info)
