"""What a caller of GetStatus may see of other clients.

Any holder of the cluster token may ask for the cluster's status; what it learns of other clients
is limited: their sessions (names, weights, device time, queues), their slices and what their
computations are called stay hidden unless the caller is one of the cluster's own processes (the
host token). A client sees the hosts, islands and orders (what every tenant shares), and its own
sessions and slices.
"""

from __future__ import annotations

import hmac
import re

import grpc

from proto import auth as _auth
from proto import pathways_pb2 as pb

#: `activity` of a host busy with another client's work, as a client sees it.
OTHERS_WORK = "busy with another client's work"
_SESSION = re.compile(r"\bsession (\d+)\b")


def viewer(context: grpc.ServicerContext, secret: str, host_token: str | None) -> int | None:
    """Whose status a caller may see: None for everything (the host token, or a cluster without
    one), else the session its key proves (0: none)."""
    presented = _auth.metadata_value(context, _auth.HOST_TOKEN_KEY)
    if host_token is None or (presented is not None
                              and hmac.compare_digest(presented.encode(), host_token.encode())):
        return None
    key = _auth.metadata_value(context, _auth.SESSION_KEY) or ""
    return _auth.check_session_key(secret, key) or 0


def restrict(reply: pb.GetStatusReply, session_id: int) -> None:
    """Removes from `reply` (in place) what concerns sessions other than `session_id`: their
    queues on each island, and what a host runs for them."""
    for island in reply.islands:
        mine = [t for t in island.tenants if t.session_id == session_id]
        del island.tenants[:]
        island.tenants.extend(mine)
    for host in reply.hosts:
        sessions = {int(s) for s in _SESSION.findall(host.activity)}
        if sessions - {session_id}:
            host.activity, host.current_name = OTHERS_WORK, ""
