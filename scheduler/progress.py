"""What hosts report back to the gang scheduler through their links (scheduler.delivery's
LinkEvents): how far each has received and executed the order, the measured durations that refine
cost estimates and charge tenants, and a link's loss. A part of GangScheduler (scheduler.gang)."""

from __future__ import annotations

import time
from collections.abc import Sequence

from proto import pathways_pb2 as pb
from proto.errors import DeadlineExceededError


class Progress:
    """Progress accounting for a GangScheduler (a mixin: the state is the scheduler's)."""

    def on_progress(self, host: int, executed: int, received: int = 0,
                    completed: Sequence[pb.CompletedExecution] = (), hang: str = "",
                    arrived: Sequence[int] = ()) -> None:
        """A link's progress report (scheduler.delivery.LinkEvents): see note_progress."""
        self.note_progress(host, executed, received, completed, hang, arrived)

    def on_link_lost(self, host: int, reason: str) -> None:
        """A link found its host unreachable (scheduler.delivery.LinkEvents). The host's loss
        takes one path, `on_host_failure` (the controller's health: it fails this island's work
        and what other islands expect from it); the island's own failure is only set here when
        that path did not (a host the registry does not know)."""
        self.on_host_failure(self.island, host, reason)
        with self.cond:
            if self._failure is None:
                failure = self._link_failure()
                if failure is not None:
                    self._fail(failure)

    def note_progress(self, host: int, executed: int, received: int = 0,
                      completed: Sequence[pb.CompletedExecution] = (), hang: str = "",
                      arrived: Sequence[int] = ()) -> None:
        """Records how far a host has received and executed the order (from acks, progress
        reports and pings), the measured durations of its executions, and the arrays whose data
        reached it (or failed to)."""
        if arrived:
            self.readiness.arrived(self.island, host, arrived)
        with self.cond:
            link = self._links.get(host)
            if link is None:
                return
            if received > link.acked:  # flush() waits on this
                link.acked = received
                self.cond.notify_all()
            link.executed = max(link.executed, executed)
            for done in completed:
                self._measure(done.sequence, done.seconds)
            self.latency.started(completed)
            if hang and self._failure is None:
                self._fail(DeadlineExceededError(hang))
            self._recompute_progress()
            self._admit()

    def _measure(self, sequence: int, seconds: float) -> None:
        entry = self._unmeasured.pop(sequence, None)
        if entry is None:
            return  # another host of the island reported it first
        tenant, executable_id, estimate = entry
        tenant.device_seconds += seconds
        self.policy.charge(tenant, seconds - estimate)
        old, smoothing = self._costs.get(executable_id), self.config.cost_smoothing
        self._costs[executable_id] = (seconds if old is None else
                                      (1 - smoothing) * old + smoothing * seconds)

    def _recompute_progress(self) -> None:
        if not self._links:
            return
        self.latency.received_up_to(min(link.acked for link in self._links.values()))
        executed = min(link.executed for link in self._links.values())
        if executed > self._executed:
            self._executed = executed
            self._progress_at = time.monotonic()
            while self._inflight and self._inflight[0][0] <= executed:
                self._outstanding_s -= self._inflight.popleft()[1]
            if not self._inflight:
                self._outstanding_s = 0.0
