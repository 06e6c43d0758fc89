"""Exceptions of the runtime and their gRPC status codes.

Every error a server raises travels as a canonical gRPC status code plus a message; the client turns
it back into one of the exceptions below, so callers catch Python types, not status codes.
"""

from __future__ import annotations

import grpc

#: Origins an error may carry (besides a peer's name, such as "controller 127.0.0.1:5000" or
#: "host 0.1 (127.0.0.1:5001)", which the client's translator gives errors that came over the wire).
#: STORE: a host's array store, about a wait itself (an array not produced in time, or not on the
#: host), as opposed to an error a failed producer stored, which names the producer already.
STORE = "store"


class PathwaysError(Exception):
    """Base class of every error the runtime raises. `origin` says who raised it ("" when not
    known): STORE, or the peer whose answer it was (see `translate_rpc_error`)."""

    code: grpc.StatusCode = grpc.StatusCode.UNKNOWN

    def __init__(self, *args: object, origin: str = "") -> None:
        super().__init__(*args)
        self.origin = origin


class InvalidArgumentError(PathwaysError, ValueError):
    """A request was malformed: wrong shape or dtype for a compiled function, bad mesh, bad bytes."""

    code = grpc.StatusCode.INVALID_ARGUMENT


class ArrayNotFoundError(PathwaysError, KeyError):
    """An array handle is unknown to the runtime or was deleted."""

    code = grpc.StatusCode.NOT_FOUND

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0]) if self.args else ""


class NotFoundError(PathwaysError, LookupError):
    """A slice, executable or session id is unknown."""

    code = grpc.StatusCode.NOT_FOUND


class SliceUnavailableError(PathwaysError):
    """No island (or not the island asked for) has enough devices for the requested slice."""

    code = grpc.StatusCode.RESOURCE_EXHAUSTED


class ResourceExhaustedError(PathwaysError):
    """A bound was hit: an island's backlog of work, or a quota."""

    code = grpc.StatusCode.RESOURCE_EXHAUSTED


class PermissionDeniedError(PathwaysError):
    """The caller may not do this: act as another session, touch another session's arrays, or make
    a call reserved to the cluster's own hosts."""

    code = grpc.StatusCode.PERMISSION_DENIED


class UnauthenticatedError(PathwaysError):
    """The call did not carry the cluster's token (or carried a wrong one)."""

    code = grpc.StatusCode.UNAUTHENTICATED


class FailedPreconditionError(PathwaysError):
    """The call is valid but the runtime is not in a state to run it (e.g. a slice was released)."""

    code = grpc.StatusCode.FAILED_PRECONDITION


class HostLostError(PathwaysError):
    """A worker host stopped answering; work on its island fails with this error."""

    code = grpc.StatusCode.UNAVAILABLE


class ControllerUnavailableError(PathwaysError, ConnectionError):
    """The controller could not be reached within the deadline."""

    code = grpc.StatusCode.UNAVAILABLE


class ExecutionError(PathwaysError):
    """A computation failed on its hosts (compilation or runtime error); the message says why."""

    code = grpc.StatusCode.INTERNAL


class DeadlineExceededError(PathwaysError, TimeoutError):
    """A wait ran past its deadline (e.g. an array that was never computed)."""

    code = grpc.StatusCode.DEADLINE_EXCEEDED


# One exception per status code, for turning a status back into a Python error. UNAVAILABLE maps to
# HostLostError here; the client raises ControllerUnavailableError itself when it is the controller
# that cannot be reached.
_BY_CODE: dict[grpc.StatusCode, type[PathwaysError]] = {
    cls.code: cls
    for cls in (InvalidArgumentError, ResourceExhaustedError, FailedPreconditionError,
                HostLostError, ExecutionError, DeadlineExceededError, PermissionDeniedError,
                UnauthenticatedError)
}


#: Trailing-metadata key naming the exception class a server raised.
ERROR_KEY = "pathways-error"
_BY_NAME: dict[str, type[PathwaysError]] = {
    cls.__name__: cls
    for cls in (InvalidArgumentError, ArrayNotFoundError, NotFoundError, SliceUnavailableError,
                ResourceExhaustedError, FailedPreconditionError, HostLostError, ExecutionError,
                DeadlineExceededError, PermissionDeniedError, UnauthenticatedError)
}


def error_from_name(name: str, message: str) -> PathwaysError:
    """The runtime exception a server named (PathwaysError for an unknown name)."""
    return _BY_NAME.get(name, PathwaysError)(message)


def from_rpc_error(err: grpc.RpcError) -> PathwaysError | None:
    """The runtime exception a server sent, or None when the RPC failed without reaching one.

    None means the failure came from the transport (peer unreachable, deadline passed before an
    answer); the caller knows which peer that was and raises the fitting error itself.
    """
    details = err.details() or ""
    for key, value in err.trailing_metadata() or ():
        if key == ERROR_KEY and value in _BY_NAME:
            return _BY_NAME[value](details)
    code = err.code()
    if code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED,
                grpc.StatusCode.CANCELLED):
        return None
    cls = _BY_CODE.get(code, NotFoundError if code == grpc.StatusCode.NOT_FOUND else PathwaysError)
    exc = cls(f"{code.name}: {details}")
    exc.code = code
    return exc


def translate_rpc_error(err: grpc.RpcError, peer: str, call: str,
                        unreachable: type[PathwaysError]) -> PathwaysError:
    """The one translation of a failed RPC into a runtime exception, for every client-side caller
    (the client's controller calls, its command stream, its reads and writes on hosts).

    The exception a server sent, when it sent one; DeadlineExceededError when the peer did not
    answer in time; else `unreachable` (ControllerUnavailableError for the controller,
    HostLostError for a host). Each carries `peer` ("controller ADDRESS", "host I.H (ADDRESS)")
    as its origin."""
    exc = from_rpc_error(err)
    if exc is None:
        if err.code() == grpc.StatusCode.DEADLINE_EXCEEDED:
            exc = DeadlineExceededError(f"{peer} did not answer {call} in time")
        else:
            exc = unreachable(f"{peer} is unreachable ({call}): {err.code().name}: "
                              f"{err.details()}")
    exc.origin = peer
    return exc


def abort(context: grpc.ServicerContext, exc: PathwaysError) -> None:
    """Ends the current RPC with the exception's status code, message and class (raises)."""
    context.set_trailing_metadata(((ERROR_KEY, type(exc).__name__),))
    context.abort(exc.code, str(exc))
