"""Announced puts on a simulated host, as on a real one (runtime.worker.worker).

A host stores only arrays the controller announced to it (an Expect instruction), with the spec
it announced, and only once. Each arrival (or failure) is logged for the progress stream, where
the controller's readiness gate (scheduler.readiness) learns that a put is complete. A failure
can overtake its announcement; it is kept and applied when the announcement comes.
Everything runs on the host's event loop: no locks.
"""

from __future__ import annotations

import collections

from proto import pathways_pb2 as pb
from proto.config import WorkerConfig, from_env
from proto.errors import FailedPreconditionError, PathwaysError
from runtime.sim._arrays import SimStore
from runtime.worker.defaults import MAX_FAILED_EARLY

#: Arrivals kept for progress reports (a stream that falls further behind misses the oldest; the
#: controller's gate then learns of them by the client's deadline instead).
MAX_ARRIVALS = from_env(WorkerConfig).arrivals_kept


class Announcements:
    """Arrays announced to one host and not yet put, and the log of their arrivals."""

    def __init__(self, store: SimStore) -> None:
        self._store = store
        self._announced: dict[int, pb.ArraySpec] = {}
        self._receiving: set[int] = set()
        self._failed_early: collections.OrderedDict[int, PathwaysError] = (
            collections.OrderedDict())
        self._arrivals: collections.deque[tuple[int, int]] = collections.deque(
            maxlen=MAX_ARRIVALS)
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

    def arrived(self, array_id: int) -> bool:
        """Marks a claimed array stored; False when it was deleted meanwhile (keep nothing)."""
        if self._announced.pop(array_id, None) is None:
            return False
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
            while len(self._failed_early) > MAX_FAILED_EARLY:
                self._failed_early.popitem(last=False)

    def forget(self, array_id: int) -> None:
        """The array was deleted: a put still to come is refused."""
        self._announced.pop(array_id, None)

    def after(self, cursor: int) -> tuple[int, list[int]]:
        """(new cursor, array ids that arrived or failed since `cursor`)."""
        fresh = []
        for number, array_id in reversed(self._arrivals):  # newest first: stop at the cursor
            if number <= cursor:
                break
            fresh.append(array_id)
        fresh.reverse()
        return self._count, fresh

    def _note(self, array_id: int) -> None:
        self._count += 1
        self._arrivals.append((self._count, array_id))
