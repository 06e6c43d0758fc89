"""Dispatch latency per stage, as the controller sees it: for each computation of an island's
order, its request's arrival at the controller -> its place in the order -> the island's last
host acknowledged receiving it -> the last host reporting started it. p50 and p99 of each stage
over a recent window (ControllerConfig-independent: `SchedulerConfig.latency_window_s`), shown
by `pathways status` (`IslandStatus.latency`).

Every time is the controller's own monotonic clock, so no host's clock enters: a host reports how
long ago an execution started (`CompletedExecution.started_ago_s`) and the start is placed that
long before the report's arrival (later than the truth by the report's one-way delay, never
earlier). "Last host received" is when the acknowledgement of the last host arrived (a Dispatch
reply or a progress report): also the controller's view, a one-way delay late, so it is taken no
later than the start (a host receives a computation before it starts it).

The stage names match `pathways bench dispatch` and `pathways bench scale`
(benchmarks.scale_measure), whose "submit" is the client's; here it is the controller's receipt.
"""

from __future__ import annotations

import collections
import dataclasses
import threading
import time
from collections.abc import Iterable

import numpy as np

from proto import pathways_pb2 as pb

#: The stages reported, as (name, from, to) over a record's fields.
STAGES = (
    ("submit_to_ordered", "submitted", "ordered"),
    ("submit_to_last_received", "submitted", "received"),
    ("submit_to_start", "submitted", "started"),
    ("ordered_to_last_received", "ordered", "received"),
    ("last_received_to_start", "received", "started"),
)


@dataclasses.dataclass
class _Record:
    sequence: int
    submitted: float
    ordered: float
    received: float | None = None
    started: float | None = None


class StageLatency:
    """Per-stage times of one island's computations, kept for `window_s` seconds after they were
    ordered (and at most `most` of them). Thread-safe; every call is O(1) amortized but
    `received_up_to` (O(newly received)) and `percentiles` (O(kept))."""

    def __init__(self, window_s: float = 60.0, most: int = 100_000) -> None:
        self.window_s, self.most = window_s, most
        self._lock = threading.Lock()
        self._records: collections.deque[_Record] = collections.deque()  # in sequence order
        self._by_sequence: dict[int, _Record] = {}
        self._unreceived: collections.deque[_Record] = collections.deque()
        self._received = 0  # the island's every host has received up to this sequence

    def ordered(self, sequence: int, submitted: float, now: float | None = None) -> None:
        """A computation got its place `sequence`; its request reached the controller at
        `submitted` (time.monotonic())."""
        now = time.monotonic() if now is None else now
        record = _Record(sequence, submitted, now)
        with self._lock:
            if sequence <= self._received:  # e.g. no host to wait for
                record.received = now
            else:
                self._unreceived.append(record)
            self._records.append(record)
            self._by_sequence[sequence] = record
            self._trim(now)

    def received_up_to(self, sequence: int, now: float | None = None) -> float | None:
        """Every host of the island has acknowledged receiving the order up to `sequence`.
        Returns the longest time from ordered to received of the computations this receipt
        covers (seconds), or None when it covers none."""
        with self._lock:
            if sequence <= self._received:
                return None
            self._received = sequence
            now = time.monotonic() if now is None else now
            longest = None
            while self._unreceived and self._unreceived[0].sequence <= sequence:
                record = self._unreceived.popleft()
                record.received = now
                longest = max(longest or 0.0, now - record.ordered)
            return longest

    def started(self, completed: Iterable[pb.CompletedExecution], now: float | None = None
                ) -> None:
        """A host's report of completed executions: each started `started_ago_s` before now.
        The latest start of all hosts' reports counts (the island's last host)."""
        now = time.monotonic() if now is None else now
        with self._lock:
            for done in completed:
                record = self._by_sequence.get(done.sequence)
                if record is None:
                    continue
                start = max(now - done.started_ago_s, record.ordered)
                if record.started is None or start > record.started:
                    record.started = start

    def _trim(self, now: float) -> None:
        records = self._records
        while records and (len(records) > self.most
                           or now - records[0].ordered > self.window_s):
            old = records.popleft()
            self._by_sequence.pop(old.sequence, None)
        while self._unreceived and self._unreceived[0].sequence not in self._by_sequence:
            self._unreceived.popleft()

    def percentiles(self, now: float | None = None) -> list[pb.StageLatency]:
        """p50 and p99 (milliseconds) of each stage over the computations ordered in the last
        `window_s` seconds, with how many had reached the stage's end."""
        now = time.monotonic() if now is None else now
        with self._lock:
            self._trim(now)
            # Every host received a computation before it started it, so the last receipt is no
            # later than the last start, whatever the acknowledgement's delay on the way.
            rows = [(r.submitted, r.ordered, r.received if r.started is None or r.received is None
                     else min(r.received, r.started), r.started) for r in self._records]
        fields = {"submitted": 0, "ordered": 1, "received": 2, "started": 3}
        out = []
        for name, begin, end in STAGES:
            values = np.asarray([row[fields[end]] - row[fields[begin]] for row in rows
                                 if row[fields[end]] is not None
                                 and row[fields[begin]] is not None], dtype=float)
            if not values.size:
                out.append(pb.StageLatency(stage=name))
                continue
            p50, p99 = np.percentile(values, (50, 99)) * 1e3
            out.append(pb.StageLatency(stage=name, count=int(values.size), p50_ms=float(p50),
                                       p99_ms=float(p99)))
        return out
