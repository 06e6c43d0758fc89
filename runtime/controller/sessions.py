"""The controller's records of sessions and executables, and the credential policy its server
applies to session calls."""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Mapping
from typing import TYPE_CHECKING, Protocol

from proto import access
from proto import auth as _auth
from proto import limits as _limits
from proto import pathways_pb2 as pb
from proto.errors import NotFoundError, ResourceExhaustedError

if TYPE_CHECKING:
    from runtime.controller.controller import Controller

#: Each session owns array ids [session_id << ID_BITS, (session_id + 1) << ID_BITS).
ID_BITS = _auth.ID_BITS
#: A host's address: HOST:PORT, HOST a name, an IPv4 address or a bracketed IPv6 one.
_ADDRESS = re.compile(r"^(\[[0-9a-fA-F:.]+\]|[A-Za-z0-9.-]{1,253}):([0-9]{1,5})$")


def is_address(address: str) -> bool:
    match = _ADDRESS.match(address)
    return match is not None and 0 < int(match.group(2)) < 65536

@dataclasses.dataclass
class Session:
    session_id: int
    name: str
    weight: float = 1.0  # proportional share
    slices: set[int] = dataclasses.field(default_factory=set)
    arrays: set[int] = dataclasses.field(default_factory=set)
    executables: set[int] = dataclasses.field(default_factory=set)
    executable_bytes: int = 0  # serialized bytes of its loaded executables
    programs: set[int] = dataclasses.field(default_factory=set)
    nbytes: int = 0  # device memory of its live arrays (replicas counted), for the quota

    def owns_id(self, array_id: int) -> bool:
        return array_id >> ID_BITS == self.session_id

@dataclasses.dataclass(frozen=True)
class Executable:
    executable_id: int
    session_id: int
    slice_id: int
    name: str
    inputs: tuple[pb.ValueSpec, ...]
    outputs: tuple[pb.ValueSpec, ...]
    donated: frozenset[int]
    fingerprint: str = ""
    output_bytes: tuple[int, ...] = ()  # device memory of each output, replicas counted
    nbytes: int = 0  # serialized size

    @property
    def key(self) -> tuple:
        """Equal loads of one session on one slice share an executable."""
        return (self.session_id, self.slice_id, self.fingerprint, self.donated)

def find_session(sessions: Mapping[int, Session], session_id: int) -> Session:
    """The open session `session_id` (NotFoundError otherwise)."""
    session = sessions.get(session_id)
    if session is None:
        raise NotFoundError(f"session {session_id} is unknown (connect first)")
    return session


def session_policy(controller: Controller) -> _auth.Authorize:
    """Session keys (proto.auth.session_policy) on the calls the access table marks SESSION
    (proto.access), and a clear error for a session this controller does not know (it
    restarted, or the session was closed)."""
    check = _auth.session_policy(lambda: controller.controller_id)

    def authorize(method: str, request, key: str | None, is_host: bool) -> None:
        check(method, request, key, is_host)
        if access.required(access.CONTROLLER, method) is not access.Credential.SESSION:
            return
        session_id = request.session_id
        if not controller.knows_session(session_id):
            raise NotFoundError(f"session {session_id} is unknown to this controller (closed, "
                                f"its lease ran out, or the controller restarted): connect again")
        controller.leases.renew(session_id)  # any call of the session's renews its lease
    return authorize


class Bounds(Protocol):
    """What bounds a session's holdings (the controller's settings, read at each check)."""

    limits: _limits.Limits
    session_quota_bytes: int | None


class SessionUsage(Protocol):
    """What the planner (runtime.controller.planner) may do to session records: the arrays and
    programs a session holds, and its device-memory quota. Only the sessions component changes
    the records; the planner reads them."""

    def check_room(self, session: Session, adding: int, nbytes: int, freeing: int = 0) -> None:
        """ResourceExhaustedError if `adding` more arrays, or `nbytes` more device bytes less
        `freeing`, would take the session past its array limit or quota."""

    def record_array(self, session: Session, array_id: int, nbytes: int) -> None:
        """The session holds a new array of `nbytes` device bytes."""

    def forget_array(self, session: Session, array_id: int, nbytes: int) -> None:
        """The session no longer holds the array (`nbytes`: what it counted; 0 if it was never
        counted)."""

    def record_program(self, session: Session, program_id: int) -> None:
        """The session holds a new program."""

    def forget_programs(self, session: Session) -> list[int]:
        """Drops every program of the session; returns their ids."""


class SessionLedger:
    """The one writer of what sessions hold: arrays and programs with their quota accounting
    (SessionUsage, for the planner), slices and executables (for the controller's catalog and
    health); called with the controller's lock held."""

    def __init__(self, bounds: Bounds) -> None:
        self._bounds = bounds

    def check_room(self, session: Session, adding: int, nbytes: int, freeing: int = 0) -> None:
        limit = self._bounds.limits.arrays_per_session
        if len(session.arrays) + adding > limit:
            raise ResourceExhaustedError(
                f"session {session.session_id} would hold {len(session.arrays) + adding} arrays, "
                f"over its limit of {limit}; delete arrays first")
        quota = self._bounds.session_quota_bytes
        if quota is None:
            return
        total = session.nbytes + nbytes - freeing
        if total > quota:
            raise ResourceExhaustedError(
                f"session {session.session_id} would hold {total} bytes of device memory, over "
                f"its quota of {quota} bytes (it holds {session.nbytes}); delete arrays first")

    def record_array(self, session: Session, array_id: int, nbytes: int) -> None:
        session.arrays.add(array_id)
        session.nbytes += nbytes

    def forget_array(self, session: Session, array_id: int, nbytes: int) -> None:
        session.arrays.discard(array_id)
        session.nbytes -= nbytes

    def record_program(self, session: Session, program_id: int) -> None:
        session.programs.add(program_id)

    def forget_programs(self, session: Session) -> list[int]:
        program_ids = sorted(session.programs)
        session.programs.clear()
        return program_ids

    def record_slice(self, session: Session, slice_id: int) -> None:
        session.slices.add(slice_id)

    def forget_slice(self, session: Session, slice_id: int) -> None:
        session.slices.discard(slice_id)

    def record_executable(self, session: Session, executable_id: int, nbytes: int) -> None:
        """The session holds a new executable of `nbytes` serialized bytes."""
        session.executables.add(executable_id)
        session.executable_bytes += nbytes

    def forget_executable(self, session: Session, executable_id: int, nbytes: int) -> None:
        session.executables.discard(executable_id)
        session.executable_bytes -= nbytes
