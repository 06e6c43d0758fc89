"""Errors of the proxy server as IFRT statuses: what the JAX program raises as a Python exception.

Every runtime exception carries a gRPC status code (proto.errors); the IFRT proxy protocol
carries `tensorflow.StatusProto`s, whose codes are the same canonical numbers. The proxy client
turns such a status into `jax.errors.JaxRuntimeError("CODE: message")`.
"""

from __future__ import annotations

import logging

import grpc

from proto.errors import PathwaysError
from proto.ifrt import status_pb2

log = logging.getLogger(__name__)


class UnimplementedError(PathwaysError):
    """A request (or a variant of one) the proxy server does not serve; the message names it."""

    code = grpc.StatusCode.UNIMPLEMENTED


def status_of(exc: BaseException) -> status_pb2.StatusProto:
    """The status a request that raised `exc` answers with. A runtime error keeps its code; any
    other exception is a defect of the server: INTERNAL, logged with its traceback."""
    if isinstance(exc, PathwaysError):
        code = exc.code
    else:
        log.error("proxy request failed unexpectedly", exc_info=exc)
        code = grpc.StatusCode.INTERNAL
    message = str(exc) or type(exc).__name__
    return status_pb2.StatusProto(code=code.value[0], message=message)


def error_of(status: status_pb2.StatusProto) -> PathwaysError:
    """The runtime exception for an error status the client sent (MakeErrorArrays)."""
    exc = PathwaysError(status.message)
    for code in grpc.StatusCode:
        if code.value[0] == status.code:
            exc.code = code
    return exc
