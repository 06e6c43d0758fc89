"""Announced puts on a host, real (runtime.worker) or simulated (runtime.sim).

A host stores only arrays the controller announced to it (an Expect instruction), with the spec
it announced, and only once. Each arrival (or failure) is logged for the progress stream, where
the controller's readiness gate (scheduler.readiness) learns that a put is complete. A failure
can overtake its announcement; it is kept and applied when the announcement comes.

`Announcements` holds no lock: a real host calls it under its own condition variable (whose
waiters it wakes when an announcement comes), a simulated one from its event loop. Only the
arrivals log is read without the caller's lock (`after`, by the progress stream), safely.
"""

from __future__ import annotations

import collections
from collections.abc import Callable
from typing import Protocol

from proto import pathways_pb2 as pb
from proto.bounded import Latest
from proto.errors import FailedPreconditionError, InvalidArgumentError, PathwaysError
from runtime.worker.defaults import ARRIVALS_KEPT, MAX_FAILED_EARLY
from runtime.worker.state import entries_after


def check_as_announced(given: pb.ArraySpec, announced: pb.ArraySpec) -> None:
    """InvalidArgumentError unless a put's stream names its array as the controller announced it
    (real and simulated hosts alike)."""
    if given != announced:
        raise InvalidArgumentError(
            f"array {announced.array_id} was announced as {announced.dtype}"
            f"{list(announced.shape)} on slice {announced.sharding.slice_id}; the stream says "
            f"{given.dtype}{list(given.shape)} on slice {given.sharding.slice_id}")


class PendingStore(Protocol):
    """What announcements need of a host's array store (runtime.worker.store, runtime.sim)."""

    def fail(self, array_id: int, error: PathwaysError, *, only_pending: bool = False) -> None:
        """Readers of the array get `error` (only while it is pending, if `only_pending`)."""

    def ready(self, array_id: int) -> bool:
        """Whether the array holds its data."""


class Announcements:
    """Arrays announced to one host and not yet put, and the log of their arrivals.
    `on_arrival()` is called as an arrival (or failure) is logged; the log keeps the last `kept`."""

    def __init__(self, store: PendingStore, *, kept: int = ARRIVALS_KEPT,
                 on_arrival: Callable[[], None] = lambda: None) -> None:
        self._store = store
        self._on_arrival = on_arrival
        self._announced: dict[int, pb.ArraySpec] = {}
        self._receiving: set[int] = set()
        self._failed_early: Latest[int, PathwaysError] = Latest(MAX_FAILED_EARLY)
        # (number, array id) of announced arrays that arrived or failed, for WatchProgress.
        self._arrivals: collections.deque[tuple[int, int]] = collections.deque(maxlen=kept)
        self._count = 0

    def announce(self, specs: list[pb.ArraySpec]) -> None:
        """The controller announced these arrays (their store entries are pending)."""
        for spec in specs:
            early = self._failed_early.pop(spec.array_id, None)
            if early is None:
                self._announced[spec.array_id] = spec
            else:
                self._store.fail(spec.array_id, early)
                self._note(spec.array_id)

    def spec(self, array_id: int) -> pb.ArraySpec | None:
        """The announced spec of an array not yet put (None: not announced, or already put)."""
        return self._announced.get(array_id)

    def announced(self) -> list[int]:
        """The ids of the arrays announced and not yet put."""
        return list(self._announced)

    def claim(self, array_id: int, where: str) -> pb.ArraySpec:
        """Starts the one put of an announced array; FailedPreconditionError otherwise."""
        spec = self._announced.get(array_id)
        if spec is None:
            raise FailedPreconditionError(
                f"array {array_id} was not announced to host {where} by the controller (declare "
                f"arrays before putting them), or it already holds its data")
        if array_id in self._receiving:
            raise FailedPreconditionError(f"array {array_id} is being put by another stream")
        self._receiving.add(array_id)
        return spec

    def release(self, array_id: int) -> None:
        """The put of `array_id` ended (stored or not)."""
        self._receiving.discard(array_id)

    def arrived(self, array_id: int, keep: Callable[[], None]) -> bool:
        """A claimed array is complete: runs `keep` (which stores it) and logs its arrival; False,
        keeping nothing, when it was deleted meanwhile. No longer announced afterwards (a second
        put is refused)."""
        if self._announced.pop(array_id, None) is None:
            return False
        keep()
        self._note(array_id)
        return True

    def fail(self, array_id: int, error: PathwaysError) -> None:
        """An announced array will not come: readers get `error`. One not announced yet fails
        when it is; one that holds its data, or was deleted, is left alone."""
        if self._announced.pop(array_id, None) is not None:
            self._store.fail(array_id, error, only_pending=True)
            self._note(array_id)
        elif not self._store.ready(array_id):
            self._failed_early[array_id] = error

    def forget(self, array_id: int) -> None:
        """The array was deleted: a put still to come is refused."""
        self._announced.pop(array_id, None)

    def clear(self) -> None:
        """A new order (the controller restarted, or the island): announcements, early failures
        and logged arrivals go (ids repeat under a new controller); the log's numbering goes on,
        so a progress stream's cursor stays valid."""
        self._announced.clear()
        self._failed_early.clear()
        self._arrivals.clear()

    def after(self, cursor: int) -> tuple[int, list[int]]:
        """(new cursor, array ids that arrived or failed since `cursor`); safe without the
        caller's lock while others log arrivals (state.entries_after)."""
        fresh = entries_after(self._arrivals, cursor)
        return (fresh[-1][0] if fresh else cursor), [array_id for _, array_id in fresh]

    def _note(self, array_id: int) -> None:
        self._count += 1
        self._arrivals.append((self._count, array_id))
        self._on_arrival()
