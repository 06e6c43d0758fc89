"""Sends that start when their source is produced, not when the island's order reaches them.

A Send instruction sits in the island's order behind whatever the island was given before it: a
gradient copy issued after the next step's computations would wait for them, and a computation
with collectives holds the executor until it finishes. Yet all a send needs is its source. So a
host starts a send at receipt (`start`), on a thread of its own that waits for the source's entry
in the store and captures it the moment its producer stores it; the executor, reaching the send
at its place in the order, only makes sure the capture is done (`claim`) before it applies
anything later (which might donate or delete the source).

Only sends the host can make alone start early: the source on this host's devices, or spread
over several hosts with each sending its own blocks (runtime.worker.copy_plan; a source that must
be gathered first is gathered by a computation with collectives, at its place in the order), and a
destination on other hosts (a copy onto this host's own devices is made in order). Anything else,
or a send whose capture had not begun when the order reached it, takes the in-order path, which
for a gather-free copy sends the same blocks under the same put id, so the hosts of a source
slice may take either path.
"""

from __future__ import annotations

import threading
from concurrent import futures
from typing import TYPE_CHECKING

import jax

from proto import pathways_pb2 as pb
from runtime.worker.defaults import SETTINGS

if TYPE_CHECKING:
    from runtime.worker.transfers import Transfers

#: Whether sends start early at all (PATHWAYS_EARLY_SENDS=0: each at its place in the order).
ENABLED = bool(SETTINGS.early_sends)
#: Threads waiting for the sources of early sends (a wait holds one; a send that finds none free
#: by the time the order reaches it is made in order).
WAITING_THREADS = SETTINGS.early_send_threads


class EarlySends:
    """The sends of one host started at receipt, by sequence number (see the module docstring)."""

    def __init__(self, transfers: Transfers) -> None:
        self._transfers = transfers
        self._jobs: dict[int, futures.Future] = {}
        self._lock = threading.Lock()
        self._pool = futures.ThreadPoolExecutor(WAITING_THREADS, thread_name_prefix="early-send")

    def start(self, send: pb.SendInstruction, sequence: int) -> None:
        """At receipt of a Send: starts waiting for its source when this host can make the send
        alone and the source's entry exists here (pending or stored)."""
        if not ENABLED:
            return
        worker = self._transfers._worker
        if not worker.holds_slice(send.source_slice_id):
            return  # unknown here, or another host's slice
        if self._transfers._is_local_copy(send) or not worker.store.contains(send.array_id):
            return
        with self._lock:
            if sequence in self._jobs:
                return
            try:
                self._jobs[sequence] = self._pool.submit(self._capture, send, sequence)
            except RuntimeError:  # stopping
                pass

    def _capture(self, send: pb.SendInstruction, sequence: int) -> None:
        """Waits for the source and hands it (or, spread over hosts, this host's share of it) to
        a transfer thread (pinned); fails the destination if the source fails."""
        worker = self._transfers._worker
        try:
            value = worker.store.get(send.array_id, worker.input_timeout_s)
            if not isinstance(value, jax.Array):
                raise _InOrder()
            if value.is_fully_addressable:
                self._transfers.submit_stream(value, send)
                return
            direct = self._transfers._direct(value, send, sequence)
            if direct is None:
                raise _InOrder()  # gathered by a collective, in order
            self._transfers.submit_stream(value, send, direct)
        except _InOrder:
            raise
        except Exception as exc:
            self._transfers._fail_destination(send, exc, set())

    def claim(self, sequence: int) -> bool:
        """At the send's place in the order: True when it was started early (its capture is
        done when this returns: the wait is bounded by the source's, the host's input timeout);
        False when the caller must make it in order (not started early, not begun yet, or it
        found it cannot)."""
        with self._lock:
            job = self._jobs.pop(sequence, None)
        if job is None or job.cancel():
            return False
        try:
            job.result()
        except _InOrder:
            return False
        return True

    def clear(self) -> None:
        """Forgets sends not begun (a new order starts)."""
        with self._lock:
            jobs, self._jobs = self._jobs, {}
        for job in jobs.values():
            job.cancel()

    def stop(self) -> None:
        self.clear()
        self._pool.shutdown(wait=False, cancel_futures=True)


class _InOrder(Exception):
    """The send cannot be made early after all: the order makes it."""
