"""Session leases: a client that goes silent (killed, crashed, exited without `close()`) loses its
session, and the controller frees its arrays and slices, instead of holding them forever.

- The controller (`SessionLeases`) notes when it last heard from each session: any call naming
  the session renews its lease, and a session with a call in progress (an `Execute` waiting for
  its turn) is alive however long that takes. A reaper thread ends every session silent for longer
  than the lease, through the controller's own disconnect, and logs what it freed.
- The client (`KeepAlive`) renews its lease from a thread of its own, a few times per lease, so an
  idle client keeps its session, and a client busy in a long call does too.

A stalled controller process (stopped, starved of CPU) has heard nothing because it could not
listen, not because its clients went silent: when the reaper wakes up much later than it asked
to, it renews every lease instead of ending sessions.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections.abc import Callable, Iterator

import grpc

from proto import pathways_pb2 as pb
from proto import pathways_pb2_grpc as pb_grpc
from proto.config import ClientConfig, ControllerConfig, from_env

log = logging.getLogger(__name__)

#: How long a controller keeps a session it does not hear from (seconds; 0: forever).
DEFAULT_SESSION_LEASE_S = from_env(ControllerConfig).session_lease_s
#: Renewals a client sends per lease: several, so one late renewal costs nothing.
RENEWALS_PER_LEASE = from_env(ClientConfig).renewals_per_lease


class SessionLeases:
    """The controller's side: when each session was last heard from, and a reaper that calls
    `expire(session_id, silent_s)` for each session silent past `lease_s` (0: none ever is).
    `expire` runs on the reaper thread, outside this object's lock."""

    def __init__(self, lease_s: float, expire: Callable[[int, float], None]) -> None:
        if lease_s < 0:
            raise ValueError(f"a session lease cannot be negative, got {lease_s}")
        self.lease_s = float(lease_s)
        self.expired = 0  # sessions ended by their lease so far
        self._expire = expire
        self._heard: dict[int, float] = {}  # session id -> time.monotonic() last heard
        self._calls: dict[int, int] = {}  # session id -> calls in progress
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        if self.lease_s > 0:
            self._thread = threading.Thread(target=self._reap_loop, daemon=True,
                                            name="session-leases")
            self._thread.start()

    def open(self, session_id: int) -> None:
        """Starts a session's lease."""
        with self._lock:
            self._heard[session_id] = time.monotonic()

    def end(self, session_id: int) -> None:
        """Forgets a session (it disconnected or expired)."""
        with self._lock:
            self._heard.pop(session_id, None)

    def renew(self, session_id: int) -> None:
        """Notes that the session was heard from now (no effect on unknown sessions)."""
        with self._lock:
            if session_id in self._heard:
                self._heard[session_id] = time.monotonic()

    @contextlib.contextmanager
    def call(self, session_id: int) -> Iterator[None]:
        """Around a call of the session's: its lease does not run out while the call lasts."""
        with self._lock:
            self._calls[session_id] = self._calls.get(session_id, 0) + 1
        try:
            yield
        finally:
            with self._lock:
                left = self._calls.pop(session_id) - 1
                if left:
                    self._calls[session_id] = left
                if session_id in self._heard:
                    self._heard[session_id] = time.monotonic()

    def silent(self, now: float | None = None) -> list[tuple[int, float]]:
        """(session id, seconds silent) of every session past its lease, with no call running."""
        now = time.monotonic() if now is None else now
        with self._lock:
            return [(sid, now - heard) for sid, heard in self._heard.items()
                    if now - heard > self.lease_s and not self._calls.get(sid)]

    def _reap_loop(self) -> None:
        interval = min(1.0, self.lease_s / 4)
        last = time.monotonic()
        while not self._stop.wait(interval):
            now = time.monotonic()
            late, last = now - last - interval, now
            if late > self.lease_s / 2:
                log.warning("the controller stalled for %.1f s: renewing every session's lease "
                            "rather than ending sessions it could not hear from", late)
                with self._lock:
                    self._heard = dict.fromkeys(self._heard, now)
                continue
            for session_id, silent_s in self.silent(now):
                self.end(session_id)
                self.expired += 1
                try:
                    self._expire(session_id, silent_s)
                except Exception:  # the reaper must outlive any one session's clean-up
                    log.exception("ending expired session %d failed", session_id)

    def close(self) -> None:
        """Stops the reaper (returns once it has ended)."""
        self._stop.set()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout=5)


class KeepAlive:
    """The client's side: renews session `session_id` through `stub` (the client's controller
    stub, which presents its token and session key) every `lease_s / renewals_per_lease` seconds
    on a daemon thread until `stop()`. A controller that no longer knows the session (it expired,
    or the controller restarted) ends the renewals with a warning; other failures (a controller
    briefly unreachable) are retried at the next renewal."""

    def __init__(self, stub: pb_grpc.ControllerStub, session_id: int, lease_s: float,
                 address: str, renewals_per_lease: int = RENEWALS_PER_LEASE) -> None:
        self._stub, self._session_id, self._address = stub, session_id, address
        self.interval_s = lease_s / renewals_per_lease
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True, name="keepalive")
        self._thread.start()

    def _loop(self) -> None:
        request = pb.KeepAliveRequest(session_id=self._session_id)
        while not self._stop.wait(self.interval_s):
            try:
                self._stub.KeepAlive(request, timeout=max(1.0, self.interval_s))
            except grpc.RpcError as err:
                if err.code() in (grpc.StatusCode.NOT_FOUND, grpc.StatusCode.FAILED_PRECONDITION):
                    log.warning("controller %s no longer knows session %d: %s", self._address,
                                self._session_id, err.details())
                    return
            except ValueError:  # the channel was closed under us: the client is closing
                return

    def stop(self) -> None:
        """Ends the renewals (returns once the thread has, or after a second)."""
        self._stop.set()
        if self._thread is not threading.current_thread():
            self._thread.join(timeout=1.0)
