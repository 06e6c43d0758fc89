"""Instructions of one request on their way into the islands' orders: the emitter that collects
them per island, the tickets of their places, and the result of a rejected command."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TYPE_CHECKING

from proto import pathways_pb2 as pb
from proto.errors import PathwaysError
from scheduler.tickets import force_all

if TYPE_CHECKING:
    from scheduler import OrderTicket

#: Queues a session's instructions on an island: order(island, ops) -> OrderTicket.
Order = Callable[[int, list[pb.Instruction]], "OrderTicket"]

#: Instructions planned per hold of the controller's lock (a long request is planned in pieces).
INSTRUCTIONS_PER_PIECE = 1024

#: Longest error message of one rejected command (a reply of thousands of them must fit).
RESULT_MESSAGE_CHARS = 512

def command_result(error: PathwaysError) -> pb.CommandResult:
    """A rejected command's result, its message cut to RESULT_MESSAGE_CHARS."""
    message = str(error)
    if len(message) > RESULT_MESSAGE_CHARS:
        message = message[:RESULT_MESSAGE_CHARS - 3] + "..."
    return pb.CommandResult(error=type(error).__name__, message=message,
                            code=error.code.value[0])

class Emitter:
    """Instructions of one request, per island in order; queued together at the end."""

    def __init__(self) -> None:
        self.ops: dict[int, list[pb.Instruction]] = {}
        self.count = 0
        self.owner: int | None = None  # the command being planned (None: not one to blame)
        self.owners: dict[tuple[int, int], int] = {}  # handle -> command that emitted it

    def add(self, island: int, instruction: pb.Instruction) -> tuple[int, int]:
        ops = self.ops.setdefault(island, [])
        ops.append(instruction)
        self.count += 1
        handle = island, len(ops) - 1
        if self.owner is not None:
            self.owners[handle] = self.owner
        return handle

    def submit(self, order: Order) -> Ordering:
        tickets: dict[int, OrderTicket | PathwaysError] = {}
        for island, ops in self.ops.items():
            try:
                tickets[island] = order(island, ops)
            except PathwaysError as exc:  # the island failed: the commands on it fail
                tickets[island] = exc
        return Ordering(tickets)

class Ordering:
    """The places of one request's instructions in their islands' orders, once given."""

    def __init__(self, tickets: dict[int, OrderTicket | PathwaysError]) -> None:
        self._tickets = tickets

    def wait(self, timeout: float | None) -> tuple[dict[tuple[int, int], int],
                                                   dict[int, PathwaysError],
                                                   dict[tuple[int, int], PathwaysError]]:
        """(sequence number per emitted handle, error per island whose instructions failed,
        error per handle that got no place: its inputs never came). `timeout` bounds the whole
        wait, over every island."""
        deadline = None if timeout is None else time.monotonic() + timeout
        tickets = [t for t in self._tickets.values() if not isinstance(t, PathwaysError)]
        for ticket in tickets:
            if not ticket.done.wait(None if deadline is None
                                    else max(0.0, deadline - time.monotonic())):
                force_all(tickets)  # the client's deadline is near: all islands at once
                break
        sequence, errors, failed = {}, {}, {}
        for island, ticket in self._tickets.items():
            try:
                if isinstance(ticket, PathwaysError):
                    raise ticket
                for i, seq in enumerate(ticket.result()):
                    if i in ticket.failed:
                        failed[(island, i)] = ticket.failed[i]
                    else:
                        sequence[(island, i)] = seq
            except PathwaysError as exc:
                errors[island] = exc
        return sequence, errors, failed
