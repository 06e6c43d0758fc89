"""Progress of an island's hosts, coalesced: the reports of all its links that arrive in one turn
of the link loop (scheduler.link_loop) reach the scheduler as one batch, so the scheduler takes
its lock, finds the slowest host and refills its window once per turn, not once per report.
Two reports of one host in a turn merge (the furthest position, every completed execution and
arrival)."""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import Callable, Sequence

from proto import pathways_pb2 as pb


@dataclasses.dataclass
class HostReport:
    """How far one host has received and executed the order, and what it finished since its
    last report (see scheduler.progress.Progress.note_reports)."""

    host: int
    executed: int
    received: int = 0
    completed: list[pb.CompletedExecution] = dataclasses.field(default_factory=list)
    hang: str = ""
    arrived: list[int] = dataclasses.field(default_factory=list)
    contacted: bool = False  # it answered a Dispatch (forwarded to it: scheduler.fanout)

    def merge(self, later: HostReport) -> None:
        """Folds a later report of the same host into this one."""
        self.executed = max(self.executed, later.executed)
        self.received = max(self.received, later.received)
        self.completed.extend(later.completed)
        self.arrived.extend(later.arrived)
        self.hang = later.hang or self.hang
        self.contacted = self.contacted or later.contacted


class ProgressCoalescer:
    """Collects one island's host reports on the link loop and hands them over in batches to
    `deliver` (called on the loop, once per loop turn that had reports)."""

    def __init__(self, deliver: Callable[[Sequence[HostReport]], None]) -> None:
        self._deliver = deliver
        self._pending: dict[int, HostReport] = {}
        self._scheduled = False
        self.batches = 0  # batches delivered (for tests and status)
        self.reports = 0  # reports received

    def add(self, report: HostReport) -> None:
        """A host's report (on the loop thread)."""
        self.reports += 1
        pending = self._pending.get(report.host)
        if pending is None:
            self._pending[report.host] = report
        else:
            pending.merge(report)
        if not self._scheduled:
            self._scheduled = True
            asyncio.get_running_loop().call_soon(self._flush)

    def _flush(self) -> None:
        reports, self._pending, self._scheduled = list(self._pending.values()), {}, False
        if reports:
            self.batches += 1
            self._deliver(reports)
