"""A host's executions in flight, and the timeline they leave behind.

The executor launches computations in the island's order. One with collectives is the only one in
flight: the executor waits for it (several sharded executions with collectives in flight at once
can deadlock XLA's CPU rendezvous: README.md, design notes). One without collectives is handed to
a finisher thread instead, and the executor goes on to launch the next while it runs, up to
PIPELINE_DEPTH of
them, so the devices do not idle while the executor does its Python bookkeeping. Either way each
execution is recorded in order: its device time starts no earlier than the previous one's end.
"""

from __future__ import annotations

import collections
import re
import threading
import time
from collections.abc import Callable, Sequence

import jax

from proto.errors import ExecutionError
from runtime.worker.defaults import SETTINGS as _WORKER
from runtime.worker.store import ArrayStore

#: Most executions without collectives in flight at once.
PIPELINE_DEPTH = _WORKER.pipeline_depth
#: Executions kept in the timeline.
TIMELINE_LENGTH = _WORKER.timeline_length
#: HLO operations that make an execution wait for other devices or processes.
_COLLECTIVE_OPS = re.compile(r"\b(all-reduce|all-gather|all-to-all|collective-permute|"
                             r"reduce-scatter|collective-broadcast|send|recv)(-start|-done)?\(")


def collective_free(compiled) -> bool:
    """Whether a compiled executable runs without collectives (so it may overlap another)."""
    return not _COLLECTIVE_OPS.search(compiled.as_text() or "")


class InFlight:
    """Executions launched on one host and not yet recorded; the timeline of the recorded ones.

    A record is (sequence, name, received, picked, start, devices, session); the timeline holds
    (sequence, name, received, picked, start, end, devices, session) tuples, oldest first.
    `on_finish` is called (on the finisher thread) after each pipelined execution finishes;
    `on_record`, if given, with each timeline entry as it is recorded (runtime.metrics).
    """

    def __init__(self, store: ArrayStore, name: str, on_finish: Callable[[], None],
                 on_record: Callable[[tuple], None] | None = None) -> None:
        self.store, self.on_finish, self.on_record = store, on_finish, on_record
        self.timeline: collections.deque[tuple] = collections.deque(maxlen=TIMELINE_LENGTH)
        self.executions = 0
        self._last_end = 0.0
        self._finishing: collections.deque[tuple] = collections.deque()
        self._cond = threading.Condition()
        self._stopped = False
        self._thread = threading.Thread(target=self._finish_loop, daemon=True,
                                        name=f"finisher-{name}")
        self._thread.start()

    def record(self, record: tuple, end: float) -> None:
        """Appends a finished execution to the timeline."""
        sequence, name, received, picked, start, devices, session = record
        entry = (sequence, name, received, picked, max(start, self._last_end), end, devices,
                 session)
        self.timeline.append(entry)
        self._last_end = end
        self.executions += 1
        if self.on_record is not None:
            self.on_record(entry)

    def hand_off(self, record: tuple, outputs: Sequence[jax.Array], ids: Sequence[int]) -> None:
        """Gives a launched execution to the finisher (its outputs `ids` were stored at launch);
        waits while PIPELINE_DEPTH are in flight."""
        with self._cond:
            self._finishing.append((record, outputs, tuple(ids)))
            self._cond.notify_all()
            while len(self._finishing) >= PIPELINE_DEPTH and not self._stopped:
                self._cond.wait(1.0)

    def drain(self) -> None:
        """Waits until every handed-off execution has finished."""
        with self._cond:
            while self._finishing and not self._stopped:
                self._cond.wait(1.0)

    def _finish_loop(self) -> None:
        while True:
            with self._cond:
                while not self._finishing and not self._stopped:
                    self._cond.wait(1.0)
                if not self._finishing:
                    return
                record, outputs, ids = self._finishing[0]
            try:
                for out in outputs:
                    out.block_until_ready()
                self.record(record, time.time())
            except Exception as exc:  # the arrays were stored at launch: readers get this instead
                error = ExecutionError(f"{record[1]} (#{record[0]}) failed: {exc}")
                for array_id in ids:
                    self.store.fail(array_id, error)
            with self._cond:
                self._finishing.popleft()
                self._cond.notify_all()
            self.on_finish()

    def stop(self, timeout: float = 5.0) -> None:
        """Stops taking executions; returns once the finisher has ended (or after `timeout` s)."""
        with self._cond:
            self._stopped = True
            self._cond.notify_all()
        if self._thread is not threading.current_thread():
            self._thread.join(timeout)
