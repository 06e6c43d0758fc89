"""Who may make each call: one table, RPC -> the credential it requires, read by both servers
(runtime.controller.servicer, runtime.worker.servicer, and the simulated hosts' runtime.sim).

Every call of every server needs the cluster token first (proto.auth); the table says what a
call needs beyond it. A new RPC is a new row here: tests/test_access.py checks that every method
of both services has one, and that the session rows are exactly the requests naming a session.
"""

from __future__ import annotations

import enum


class Credential(enum.Enum):
    """What a call must present beyond the cluster token."""

    #: Nothing more: any member of the cluster (a client or a host) may call.
    TOKEN = "cluster token"
    #: The host token: calls only the cluster's own hosts and controller make.
    HOST = "host token"
    #: The key of the session the request names (its `session_id`).
    SESSION = "session key"
    #: The key of the session owning the array (its id's high bits), or the host token (a peer
    #: host moving the array).
    ARRAY_OWNER = "array owner's session key"


CONTROLLER = "pathways.Controller"
WORKER = "pathways.Worker"

#: service -> method -> the credential it requires.
REQUIRED: dict[str, dict[str, Credential]] = {
    CONTROLLER: {
        "Connect": Credential.TOKEN,
        "GetStatus": Credential.TOKEN,  # what it shows depends on the caller (visibility)
        "RegisterHost": Credential.HOST,
        "UnregisterHost": Credential.HOST,
        "Disconnect": Credential.SESSION,
        "CreateSlice": Credential.SESSION,
        "ReleaseSlice": Credential.SESSION,
        "LoadExecutable": Credential.SESSION,
        "RegisterArrays": Credential.SESSION,
        "Execute": Credential.SESSION,
        "RegisterProgram": Credential.SESSION,
        "DeleteArrays": Credential.SESSION,
        "KeepAlive": Credential.SESSION,
    },
    WORKER: {
        "Dispatch": Credential.HOST,  # can reset a host: the controller's alone
        "WatchProgress": Credential.HOST,
        "PutArray": Credential.ARRAY_OWNER,
        "GetArray": Credential.ARRAY_OWNER,
        "Ping": Credential.TOKEN,
        "GetTimeline": Credential.TOKEN,
    },
}


def methods_requiring(service: str, credential: Credential) -> frozenset[str]:
    """The methods of `service` that require `credential`."""
    return frozenset(m for m, c in REQUIRED[service].items() if c is credential)


def required(service: str, method: str) -> Credential:
    """The credential `method` of `service` requires (KeyError for a method not in the table:
    a server refuses what the table does not name)."""
    return REQUIRED[service][method]
