"""The controller: sessions, slices, executables and arrays, and dispatch to the islands.

The controller keeps the bookkeeping per logical array (not per shard) and validates every call
against it, so a bad call fails at once with a precise status, before any host sees it. Valid calls
become instructions in the session's queue on their island; the island's gang scheduler
(scheduler.GangScheduler) orders them by its policy (FIFO, or proportional share by the sessions'
weights), and the reply goes back as soon as they are ordered, before they run.

The controller is composed of parts, each built with what it needs and reached as an attribute:
sessions (here and runtime.controller.sessions), the catalog of slices and executables
(`catalog`: runtime.controller.catalog), hosts and their loss (`health`:
runtime.controller.health), status (`status_report`: runtime.controller.status), arrays and
commands (`planner`: runtime.controller.planner); the gRPC face (runtime.controller.servicer)
calls the part that owns each call.
"""

from __future__ import annotations

import itertools
import logging
import secrets
import threading
import time
import uuid
from collections.abc import Sequence

from proto import auth as _auth
from proto import limits as _limits
from proto import pathways_pb2 as pb
from proto.admission import Admission
from proto.config import SchedulerConfig, from_env
from proto.errors import InvalidArgumentError, NotFoundError, ResourceExhaustedError
from proto.leases import DEFAULT_SESSION_LEASE_S, SessionLeases
from runtime import metrics_state as _metrics_state
from runtime.controller.catalog import Catalog
from runtime.controller.defaults import BACKLOG_TIMEOUT_S, DROPPED_REMEMBERED, MAX_BACKLOG
from runtime.controller.health import Health
from runtime.controller.ordering import command_result
from runtime.controller.placement import Placer
from runtime.controller.planner import Planner
from runtime.controller.sessions import Session, SessionLedger, find_session
from runtime.controller.status import StatusReport
from scheduler.gang import GangScheduler
from scheduler.policy import check_weight, make_policy
from scheduler.readiness import Readiness
from scheduler.resources import ResourceManager

log = logging.getLogger(__name__)


class Controller:
    """Controller state and logic, independent of gRPC. Instantiable: tests run several.

    `policy` is how each island's gang scheduler orders the work of several clients: "fifo"
    (arrival order) or "share" (device time in proportion to the sessions' weights).
    `credentials` are what the controller presents to its hosts (proto.auth; the same ones its
    server demands). `session_quota_bytes` bounds the device memory of each session's live arrays
    (None: unbounded); a command that would pass it fails with ResourceExhaustedError, alone.
    A session not heard from for `session_lease_s` seconds is ended as if it had disconnected,
    its arrays and slices freed (proto.leases; 0: sessions live until they disconnect).
    `limits` bound every request and what each session may hold (proto.limits).
    `scheduler_config` is handed whole to each island's gang scheduler (default: SchedulerConfig
    as this process's environment sets it).
    """

    def __init__(self, *, heartbeat: bool = True, policy: str = "fifo",
                 credentials: _auth.Credentials | None = None,
                 session_quota_bytes: int | None = None,
                 session_lease_s: float = DEFAULT_SESSION_LEASE_S,
                 limits: _limits.Limits = _limits.DEFAULT,
                 scheduler_config: SchedulerConfig | None = None) -> None:
        make_policy(policy)  # InvalidArgumentError for an unknown name
        self.policy = policy
        self.limits = limits
        self.scheduler_config = (from_env(SchedulerConfig) if scheduler_config is None
                                 else scheduler_config)
        self.credentials = credentials or _auth.Credentials()
        if session_quota_bytes is not None and session_quota_bytes < 0:
            raise InvalidArgumentError("the session quota cannot be negative")
        self.session_quota_bytes = session_quota_bytes
        # Secret (session keys are made with it; hosts learn it over the dispatch stream only).
        self.controller_id = secrets.token_hex(16)
        # Public: names things outside the runtime (Ray actors) after this incarnation.
        self.name_tag = uuid.uuid4().hex[:8]
        self.resources = ResourceManager(DROPPED_REMEMBERED)
        # Arrays that do not exist yet (puts on their way, copies whose send is not ordered):
        # what reads them waits in its client's queue, not in an island's order.
        self.readiness = Readiness()
        # Each island's gang scheduler: health adds and drops them, the catalog finds them.
        self._schedulers: dict[int, GangScheduler] = {}
        self._sessions: dict[int, Session] = {}
        self.sessions = SessionLedger(self)  # the one writer of what sessions hold
        self._session_ids = itertools.count(1)
        self._lock = threading.RLock()
        self.admission: Admission | None = None  # its server's (create_controller_server)
        self.catalog = Catalog(self._lock, self.resources, self._schedulers, self._sessions,
                               self.sessions, limits,
                               lambda session, slice_id: self.planner.forget_slice(session,
                                                                                   slice_id))
        self.health = Health(self._lock, self.resources, self._schedulers,
                             controller_id=self.controller_id, policy=policy,
                             credentials=self.credentials, readiness=self.readiness,
                             scheduler_config=self.scheduler_config,
                             forget_island=self.catalog.forget_island, heartbeat=heartbeat)
        self.planner = Planner(self.catalog, self.sessions, self.readiness,
                               self.health.note_transfer)
        self.leases = SessionLeases(session_lease_s, self._expire_session)
        self.status_report = StatusReport(
            self._lock, self.resources, self._schedulers, self._sessions, leases=self.leases,
            array_count=lambda: self.planner.array_count, probes=self.health.probes,
            ping=self.health.ping,
            slice_info=self.catalog.slice_info, limits=limits)
        _metrics_state.track(self, "controller")

    def connect(self, name: str, weight: float = 1.0) -> Session:
        """Opens a session; `weight` is its proportional share (0: 1)."""
        weight = check_weight(weight)
        with self._lock:
            if len(self._sessions) >= self.limits.sessions:
                raise ResourceExhaustedError(f"the controller has {len(self._sessions)} open "
                                             f"sessions, its limit; close one first")
            session = Session(next(self._session_ids), name, weight)
            self._sessions[session.session_id] = session
            self.leases.open(session.session_id)
            return session

    def disconnect(self, session_id: int) -> None:
        """Closes a session: deletes its arrays and releases its slices (after its queued work)."""
        with self._lock:
            session = self._session(session_id)
            self.planner.drop_session(session)
            for slice_id in sorted(session.slices):
                self.catalog.release_slice(session_id, slice_id)
            for executable_id in list(session.executables):
                self.catalog.forget_executable(executable_id)
            del self._sessions[session_id]
            self.leases.end(session_id)
            for scheduler in self._schedulers.values():
                scheduler.end_session(session_id)

    def _expire_session(self, session_id: int, silent_s: float) -> None:
        """Ends a session whose client went silent for longer than its lease (proto.leases)."""
        with self._lock:
            session = self._sessions.get(session_id)
            if session is None:
                return  # it disconnected meanwhile
            arrays, slices = len(session.arrays), len(session.slices)
            self.disconnect(session_id)
        log.warning("session %d (%r) not heard from for %.1f s (lease %.1f s): ended it, freeing "
                    "%d arrays and %d slices", session_id, session.name, silent_s,
                    self.leases.lease_s, arrays, slices)

    def session_key(self, session_id: int) -> str:
        """The key a client presents to prove it is session `session_id` (proto.auth)."""
        return _auth.session_key(self.controller_id, session_id)

    def knows_session(self, session_id: int) -> bool:
        return session_id in self._sessions

    def register_arrays(self, session_id: int, specs: Sequence[pb.ArraySpec],
                        timeout: float | None = None) -> list[int]:
        """Declares arrays a client is about to stream to their hosts; returns, per array, the
        island sequence number from which its hosts expect it."""
        placements = self.planner.place_arrays(Placer(self.resources, session_id), specs)
        with self._lock:
            sequences = self.planner.register_arrays(self._session(session_id), specs, placements)
        return sequences(timeout)

    def execute(self, session_id: int, commands: Sequence[pb.Command],
                timeout: float | None = None) -> list[pb.CommandResult]:
        """Checks each command and queues the accepted ones; returns once they are ordered,
        before any of them runs.

        The wait for their turn (set by the island's policy) happens outside the lock, so other
        clients go on; after `timeout` s the rest are ordered at once. Waits first while an island
        is more than MAX_BACKLOG instructions ahead of its slowest host.
        """
        for scheduler in list(self._schedulers.values()):
            scheduler.wait_backlog(MAX_BACKLOG, BACKLOG_TIMEOUT_S)
        deadline = None if timeout is None else time.monotonic() + timeout
        pieces, start, emitted = [], 0, 0
        while True:  # a bounded piece per hold of the lock: other clients go on in between
            with self._lock:
                try:
                    session = self._session(session_id)
                except NotFoundError as exc:  # closed meanwhile: the rest of it fails
                    if not pieces:
                        raise
                    pieces.append(lambda _, n=len(commands) - start, exc=exc:
                                  [command_result(exc)] * n)
                    break
                results, start, emitted = self.planner.execute(session, commands, start, emitted)
            pieces.append(results)
            if start >= len(commands):
                break
        return [result for piece in pieces for result in piece(
            None if deadline is None else max(0.0, deadline - time.monotonic()))]

    def register_program(self, request: pb.RegisterProgramRequest) -> int:
        """Checks a traced program (outside the lock: its work is the request's own) and
        registers it."""
        with self._lock:
            session = self._session(request.session_id)
        program = self.planner.plan_program(session, request)
        with self._lock:
            return self.planner.add_program(self._session(request.session_id), program)

    def delete_arrays(self, session_id: int, array_ids: Sequence[int]) -> None:
        """Deletes arrays (NOT_FOUND for an unknown id) after the work already ordered."""
        with self._lock:
            self.planner.delete(self._session(session_id), array_ids, strict=True)

    def _session(self, session_id: int) -> Session:
        return find_session(self._sessions, session_id)

    def close(self) -> None:
        """Stops dispatch and the heartbeat; returns once the heartbeat thread has ended
        (Health.close)."""
        self.health.close()
        _metrics_state.untrack(self)
        self.leases.close()
        if self.admission is not None:
            self.admission.stop()
        with self._lock:
            schedulers = list(self._schedulers.values())
        for scheduler in schedulers:  # outside the lock: their threads may take it to report
            scheduler.close()
