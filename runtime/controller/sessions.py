"""The controller's records of sessions and executables, and the credential policy its server
applies to session calls."""

from __future__ import annotations

import dataclasses
import re
from typing import TYPE_CHECKING

from proto import access
from proto import auth as _auth
from proto import pathways_pb2 as pb
from proto.errors import NotFoundError

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
