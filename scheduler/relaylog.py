"""What an island's fan-out tree is to bring the hosts it reaches (scheduler.fanout): the order as
the scheduler handed it over, kept once for the island rather than copied onto every relayed
host's link (at 64 hosts that was 63 appends per instruction under the island's lock, on every
command's way). Each relayed link (scheduler.delivery.HostLink) reads the part it is owed: what
came after its floor (before it, the host got the order directly) and after what it has
acknowledged; that part goes directly when the tree changes or does not bring it in time.
The log keeps only what some relayed host still lacks."""

from __future__ import annotations

import bisect
import threading
import time
from collections.abc import Sequence

from proto import pathways_pb2 as pb


class RelayLog:
    """An island's instructions in sequence order, each with when it was handed over; safe to
    use from any thread."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._sequences: list[int] = []
        self._ops: list[pb.Instruction] = []
        self._times: list[float] = []
        self._last = 0
        self._trim_at = 0  # the length at which `full` says it is time to trim

    def __len__(self) -> int:
        return len(self._sequences)

    @property
    def last(self) -> int:
        """The highest sequence number appended so far (0: none)."""
        return self._last

    def append(self, ops: Sequence[pb.Instruction]) -> None:
        """Adds instructions handed over now; those at or below `last` (a repeat) are skipped."""
        now = time.monotonic()
        with self._lock:
            for op in ops:
                if op.sequence > self._last:
                    self._sequences.append(op.sequence)
                    self._ops.append(op)
                    self._times.append(now)
                    self._last = op.sequence

    def after(self, sequence: int) -> list[pb.Instruction]:
        """The instructions above `sequence`, in order."""
        with self._lock:
            return self._ops[bisect.bisect_right(self._sequences, sequence):]

    def count_after(self, sequence: int) -> int:
        with self._lock:
            return len(self._sequences) - bisect.bisect_right(self._sequences, sequence)

    def waiting_since(self, sequence: int) -> float | None:
        """When the first instruction above `sequence` was handed over (time.monotonic()), or
        None if there is none."""
        with self._lock:
            i = bisect.bisect_right(self._sequences, sequence)
            return self._times[i] if i < len(self._times) else None

    def trim(self, sequence: int, hosts: int = 0) -> None:
        """Forgets the instructions at or below `sequence` (what every relayed host of an
        island of `hosts` has): `full` says it is time again once the log has doubled and holds
        more than four instructions per host, so that looking at every host stays rare per
        instruction however far behind one of them is."""
        with self._lock:
            i = bisect.bisect_right(self._sequences, sequence)
            del self._sequences[:i], self._ops[:i], self._times[:i]
            self._trim_at = max(2 * len(self._sequences), 4 * hosts)

    def full(self) -> bool:
        """Whether it is time to trim (`trim`)."""
        return len(self._sequences) > self._trim_at
