"""Places in an island's order: the ticket of one batch of a session's instructions, and the
entries that wait in a tenant's queue for their place."""

from __future__ import annotations

import dataclasses
import threading
from collections.abc import Sequence
from typing import TYPE_CHECKING

from proto import pathways_pb2 as pb
from proto.errors import PathwaysError

if TYPE_CHECKING:
    from scheduler.gang import GangScheduler
    from scheduler.policy import Tenant


@dataclasses.dataclass(eq=False)
class Queued:
    """An instruction waiting in a tenant's queue."""

    op: pb.Instruction
    ticket: OrderTicket
    index: int  # position in its ticket
    arrival: int  # global arrival stamp (FIFO)
    executes: bool  # device work; other instructions only need a place in the order
    inputs: tuple[int, ...] = ()  # arrays it reads (it waits until they exist or will)
    queued_at: float = 0.0  # time.monotonic() of its arrival


class OrderTicket:
    """The places in the island's order of one batch of a session's instructions."""

    __slots__ = ("scheduler", "tenant", "sequences", "remaining", "error", "failed", "done")

    def __init__(self, scheduler: GangScheduler, tenant: Tenant, count: int) -> None:
        self.scheduler, self.tenant = scheduler, tenant
        self.sequences = [0] * count
        self.remaining = count
        self.error: PathwaysError | None = None  # the island's failure: the whole batch failed
        self.failed: dict[int, PathwaysError] = {}  # instructions that never got a place
        self.done = threading.Event()
        if not count:
            self.done.set()

    def wait(self, timeout: float | None = None) -> list[int]:
        """The sequence numbers, once every instruction is ordered (0 for those in `failed`:
        their inputs never came). Past `timeout` s the rest of the batch is ordered at once, ahead
        of its turn: a client's deadline outranks the policy (but an instruction whose inputs do
        not exist yet fails instead). Raises the island's failure (HostLostError,
        DeadlineExceededError for a hang)."""
        if not self.done.wait(timeout):
            self.scheduler._force(self)
        return self.result()

    def result(self) -> list[int]:
        """The sequence numbers of a ticket that is done (see wait)."""
        if self.error is not None:
            raise self.error
        return self.sequences


def force_all(tickets: Sequence[OrderTicket]) -> None:
    """Orders the rest of several tickets' batches at once (a request's, on several islands):
    first whatever can be ordered, island after island, as long as that frees more (a copy's send
    ordered on one island lets what reads the copy on another be ordered), then what still waits
    for inputs fails."""
    late = [t for t in tickets if not t.done.is_set()]
    while any([t.scheduler._force(t, fail_blocked=False) for t in late]):
        pass
    for ticket in late:
        ticket.scheduler._force(ticket)
