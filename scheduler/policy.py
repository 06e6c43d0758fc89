"""Multi-tenancy: which client's work takes the next place in an island's total order.

Each client session has a queue of instructions in front of each island's gang scheduler
(a `Tenant`). The order inside one tenant's queue is the client's own order and never changes; a
policy only decides which tenant goes next:

- `FifoPolicy`: the instruction that arrived first, whoever sent it (the paper's default).
- `ProportionalSharePolicy`: stride scheduling (weighted fair queuing) on device time. Each tenant
  has a virtual time that advances by the device seconds it is charged divided by its weight; the
  backlogged tenant with the smallest virtual time goes next. Charges are estimates when work is
  ordered, corrected by the hosts' measurements when it has run, so over time each backlogged
  tenant gets device time in proportion to its weight. A tenant whose queue ran dry for less than
  IDLE_GRACE_S keeps its virtual time (it was between two batches of commands: the moment others
  ran meanwhile is made up); one idle for longer, or new, re-enters at the current virtual time, so
  idling earns no credit to burst with later.

Policies are plain objects without locks: the gang scheduler calls them under its own lock.
"""

from __future__ import annotations

import collections
import dataclasses
from collections.abc import Sequence
from typing import Protocol

from proto.config import SchedulerConfig, from_env
from proto.errors import InvalidArgumentError

#: A tenant idle for less than this keeps its place (see ProportionalSharePolicy).
IDLE_GRACE_S = from_env(SchedulerConfig).idle_grace_s


@dataclasses.dataclass(eq=False)
class Tenant:
    """A client session's queue in front of one island's order, and its accounting there."""

    session_id: int
    name: str = ""
    weight: float = 1.0
    queue: collections.deque = dataclasses.field(default_factory=collections.deque)
    virtual_time: float = 0.0  # proportional share: charged device seconds / weight
    idle_since: float | None = None  # time.monotonic() when its queue last ran dry; None: new
    ordered: int = 0  # instructions ordered so far
    device_seconds: float = 0.0  # measured on the hosts
    closing: bool = False  # the session ended: forget the tenant once its queue drains

    @property
    def head_arrival(self) -> int:
        """Arrival stamp of the instruction at the head of the queue (queue must be non-empty)."""
        return self.queue[0].arrival


class SchedulingPolicy(Protocol):
    """Chooses the tenant whose head instruction is ordered next."""

    name: str

    def activate(self, tenant: Tenant, backlogged: Sequence[Tenant], now: float) -> None:
        """`tenant` had an empty queue and now has work; `backlogged` are the others with work;
        `now` is time.monotonic()."""

    def pick(self, backlogged: Sequence[Tenant]) -> Tenant:
        """The tenant to order next, among those with queued work (never empty)."""

    def charge(self, tenant: Tenant, seconds: float) -> None:
        """Accounts device seconds to a tenant (negative: a correction of an over-estimate)."""


class FifoPolicy:
    """First come, first ordered, across all tenants; weights are ignored."""

    name = "fifo"

    def activate(self, tenant: Tenant, backlogged: Sequence[Tenant], now: float) -> None:
        pass

    def pick(self, backlogged: Sequence[Tenant]) -> Tenant:
        return min(backlogged, key=lambda t: t.head_arrival)

    def charge(self, tenant: Tenant, seconds: float) -> None:
        tenant.virtual_time += seconds


class ProportionalSharePolicy:
    """Stride scheduling on device time: backlogged tenants share it in proportion to weight."""

    name = "share"

    def __init__(self) -> None:
        self._now = 0.0  # virtual time of the latest pick: where an idle tenant re-enters

    def activate(self, tenant: Tenant, backlogged: Sequence[Tenant], now: float) -> None:
        if tenant.idle_since is not None and now - tenant.idle_since < IDLE_GRACE_S:
            return
        floor = min((t.virtual_time for t in backlogged), default=self._now)
        tenant.virtual_time = max(tenant.virtual_time, floor)

    def pick(self, backlogged: Sequence[Tenant]) -> Tenant:
        tenant = min(backlogged, key=lambda t: (t.virtual_time, t.head_arrival))
        self._now = max(self._now, tenant.virtual_time)
        return tenant

    def charge(self, tenant: Tenant, seconds: float) -> None:
        tenant.virtual_time += seconds / tenant.weight


POLICIES = {"fifo": FifoPolicy, "share": ProportionalSharePolicy}


def make_policy(name: str) -> SchedulingPolicy:
    """A fresh policy by name: "fifo" or "share" (proportional share)."""
    try:
        return POLICIES[name]()
    except KeyError:
        raise InvalidArgumentError(f"unknown scheduling policy {name!r} (known: "
                                   f"{', '.join(POLICIES)})") from None


def check_weight(weight: float) -> float:
    """A session's weight: positive and finite; 0 means the default, 1."""
    weight = float(weight) or 1.0
    if not 0 < weight < float("inf"):
        raise InvalidArgumentError(f"a session's weight must be positive and finite, got {weight}")
    return weight
