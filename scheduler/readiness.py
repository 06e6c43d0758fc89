"""Which arrays exist, or will: the gate a computation passes before it enters an island's order.

An island runs its order one execution at a time, so an execution that waits for an input holds
up every client behind it. Most inputs are produced by something already ordered (an earlier
computation, a copy whose send is ordered): they will come. Two kinds may never come, and are
tracked here until they are on their way:

- a put: the client declares the array, then streams it to its hosts itself. It exists once every
  host holding part of it has reported its arrival (or its failure) on the progress stream. A
  client that stalls its put, or never sends it, must not stop the island for everyone.
- a copy from another slice: it is on its way once the send on the source's island is ordered
  (the send itself waits for its own source, on its own island, in the same way).

An instruction reading an array still tracked here waits in its client's queue (GangScheduler);
other clients' work goes ahead. Thread-safe; listeners hear of every array that becomes ready (or
is forgotten), outside the registry's lock.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterable


class Readiness:
    """Arrays that do not exist yet and that nothing ordered produces."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        # array id -> (island, hosts still to report arrival); None: waits for its send
        self._waiting: dict[int, tuple[int, set[int] | None]] = {}
        self._listeners: list[Callable[[], None]] = []

    def subscribe(self, listener: Callable[[], None]) -> None:
        """Calls `listener()` (which must not block) whenever some array becomes ready."""
        with self._lock:
            self._listeners.append(listener)

    def unsubscribe(self, listener: Callable[[], None]) -> None:
        with self._lock:
            if listener in self._listeners:
                self._listeners.remove(listener)

    def expect_put(self, array_id: int, island: int, hosts: Iterable[int]) -> None:
        """A client will put this array on these hosts of `island`."""
        with self._lock:
            self._waiting[array_id] = (island, set(hosts))

    def expect_send(self, array_id: int, island: int) -> None:
        """This copy, on `island`, exists once the send that makes it is ordered."""
        with self._lock:
            self._waiting[array_id] = (island, None)

    def arrived(self, island: int, host: int, array_ids: Iterable[int]) -> None:
        """A host of `island` has (or has failed to get) these arrays' data."""
        ready = False
        with self._lock:
            for array_id in array_ids:
                entry = self._waiting.get(array_id)
                if entry is None or entry[0] != island or entry[1] is None:
                    continue
                entry[1].discard(host)
                if not entry[1]:
                    del self._waiting[array_id]
                    ready = True
        if ready:
            self._notify()

    def sent(self, array_id: int) -> None:
        """The send that makes this copy is ordered."""
        self.forget([array_id])

    def forget(self, array_ids: Iterable[int]) -> None:
        """Stops tracking arrays (deleted, or made ready by other means)."""
        with self._lock:
            gone = [a for a in array_ids if self._waiting.pop(a, None) is not None]
        if gone:
            self._notify()

    def forget_island(self, island: int) -> None:
        """Stops tracking the arrays of an island (it failed or restarted)."""
        with self._lock:
            gone = [a for a, (i, _) in self._waiting.items() if i == island]
            for array_id in gone:
                del self._waiting[array_id]
        if gone:
            self._notify()

    def blocking(self, array_ids: Iterable[int]) -> int | None:
        """The first of `array_ids` that does not exist yet and that nothing ordered produces,
        or None when all of them will come."""
        with self._lock:
            for array_id in array_ids:
                if array_id in self._waiting:
                    return array_id
        return None

    def waiting(self) -> int:
        """How many arrays are tracked."""
        with self._lock:
            return len(self._waiting)

    def _notify(self) -> None:
        with self._lock:
            listeners = list(self._listeners)
        for listener in listeners:
            listener()
