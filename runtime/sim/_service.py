"""The Worker gRPC service of a simulated host, on grpc.aio: one event loop serves many hosts.

Each host has its own server (its own address and port), with the guards of a real host
(proto.auth): the cluster token on every call (UNAUTHENTICATED without it), the host token on
Dispatch (PERMISSION_DENIED), the owning session's key (or the host token) to read or write an
array; request bytes that do not parse get INVALID_ARGUMENT, runtime errors their own status code,
and the server keeps serving.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable

import grpc

from proto import auth as _auth
from proto import pathways_pb2 as pb
from proto import rpc as _rpc
from proto import wire as _wire
from proto.errors import (ERROR_KEY, InvalidArgumentError, PathwaysError,
                          PermissionDeniedError, UnauthenticatedError)
from proto.ports import SERVER_OPTIONS, bind_failed
from runtime.sim._host import MAX_GET_TIMEOUT_S, SLICE_TIMEOUT_S, SimHost
from runtime.worker.servicer import HOST_METHODS

_SERVICE = "pathways.Worker"
#: Request type of each method, and whether requests / replies stream.
_METHODS: dict[str, tuple[type, bool, bool]] = {
    "Dispatch": (pb.DispatchRequest, False, False),
    "PutArray": (pb.ArrayChunk, True, False),
    "GetArray": (pb.GetArrayRequest, False, True),
    "Ping": (pb.PingRequest, False, False),
    "GetTimeline": (pb.GetTimelineRequest, False, False),
    "WatchProgress": (pb.WatchProgressRequest, False, True),
}
#: Exceptions a handler may raise on a field combination validation missed: INVALID_ARGUMENT.
_STRAY = (ValueError, TypeError, KeyError, IndexError, OverflowError)


async def _abort(context: grpc.aio.ServicerContext, code: grpc.StatusCode, message: str,
                 name: str) -> None:
    context.set_trailing_metadata(((ERROR_KEY, name),))
    await context.abort(code, message)


async def _fail(context: grpc.aio.ServicerContext, exc: Exception, method: str) -> None:
    if isinstance(exc, PathwaysError):
        await _abort(context, exc.code, str(exc), type(exc).__name__)
        return
    await _abort(context, grpc.StatusCode.INVALID_ARGUMENT, f"{method}: bad request: {exc}",
                 InvalidArgumentError.__name__)


def _time_left(context: grpc.aio.ServicerContext, most: float) -> float:
    left = context.time_remaining()
    return most if left is None else min(most, max(0.0, left))


class _Calls:
    """What each method does on one host, given a parsed request."""

    def __init__(self, host: SimHost) -> None:
        self.host = host

    async def Dispatch(self, request: pb.DispatchRequest, context) -> pb.DispatchReply:
        return self.host.dispatch(request, _time_left(context, 10.0))

    async def Ping(self, request: pb.PingRequest, context, is_host: bool) -> pb.PingReply:
        if is_host:
            self.host.last_contact = time.monotonic()  # the controller's heartbeat
        count, nbytes = self.host.store.stats()
        return pb.PingReply(host=self.host.info(), stored_arrays=count, stored_bytes=nbytes,
                            executions=self.host.executions, executed=self.host.executed)

    async def GetTimeline(self, request: pb.GetTimelineRequest, context) -> pb.GetTimelineReply:
        return pb.GetTimelineReply(island=self.host.island, host=self.host.host,
                                   events=self.host.events(request.since))


class _Handlers(grpc.GenericRpcHandler):
    """Checks credentials, parses requests and maps errors for one host's Worker service."""

    def __init__(self, host: SimHost, credentials: _auth.Credentials) -> None:
        self.host, self.calls = host, _Calls(host)
        self._token = credentials.token.encode() if credentials.token else None
        self._host_token = credentials.host_token.encode() if credentials.host_token else None
        self._authorize = _auth.array_owner_policy(lambda: host._controller_id)

    def service(self, details: grpc.HandlerCallDetails):
        service, _, method = details.method.lstrip("/").partition("/")
        if service != _SERVICE or method not in _METHODS:
            return None
        request_type, streaming_in, streaming_out = _METHODS[method]
        metadata = {k: v for k, v in details.invocation_metadata or () if isinstance(v, str)}
        if self._token is not None and not _auth._equal(metadata.get(_auth.TOKEN_KEY),
                                                        self._token):
            return _refusal(streaming_in, streaming_out, grpc.StatusCode.UNAUTHENTICATED,
                            f"missing or wrong cluster token (pass --token-file or set "
                            f"{_auth.TOKEN_ENV})", UnauthenticatedError.__name__)
        is_host = self._host_token is None or _auth._equal(
            metadata.get(_auth.HOST_TOKEN_KEY), self._host_token)
        if method in HOST_METHODS and not is_host:
            return _refusal(streaming_in, streaming_out, grpc.StatusCode.PERMISSION_DENIED,
                            f"{method} is reserved to the cluster's own hosts and controller",
                            PermissionDeniedError.__name__)
        key = metadata.get(_auth.SESSION_KEY)

        async def parse(raw: bytes, context):
            try:
                return request_type.FromString(raw)
            except Exception as exc:  # protobuf's DecodeError, or anything corrupt bytes provoke
                await _abort(context, grpc.StatusCode.INVALID_ARGUMENT,
                             f"{method}: request is not a valid message ({type(exc).__name__})",
                             InvalidArgumentError.__name__)

        async def authorize(request, context) -> None:
            if self._authorize.at_once(method, request, key, is_host):
                return
            try:  # may wait for a new controller's first dispatch: off the event loop
                await asyncio.to_thread(self._authorize, method, request, key, is_host)
            except PathwaysError as exc:
                await _fail(context, exc, method)

        serialize = _serializer
        if method == "PutArray":
            async def put(raw_iterator: AsyncIterator[bytes], context):
                try:
                    first = await parse(await raw_iterator.__anext__(), context)
                except StopAsyncIteration:
                    await _fail(context, InvalidArgumentError("empty array stream"), method)
                await authorize(first, context)

                async def rest() -> AsyncIterator[pb.ArrayChunk]:
                    async for raw in raw_iterator:
                        yield await parse(raw, context)
                try:
                    nbytes = await self.host.put(first, rest(), _time_left(context,
                                                                           SLICE_TIMEOUT_S))
                except (PathwaysError, *_STRAY) as exc:
                    await _fail(context, exc, method)
                return pb.PutArrayReply(nbytes=nbytes)
            return grpc.stream_unary_rpc_method_handler(put, response_serializer=serialize)

        if streaming_out:
            async def stream(raw: bytes, context):
                request = await parse(raw, context)
                await authorize(request, context)
                try:
                    if method == "GetArray":
                        replies = iter(await self.host.get(request, _time_left(
                            context, MAX_GET_TIMEOUT_S)))
                        for reply in replies:
                            yield reply
                    else:
                        async for reply in self.host.watch_progress(request):
                            yield reply
                except (PathwaysError, *_STRAY) as exc:
                    await _fail(context, exc, method)
            return grpc.unary_stream_rpc_method_handler(stream, response_serializer=serialize)

        call = getattr(self.calls, method)

        async def unary(raw: bytes, context):
            request = await parse(raw, context)
            try:
                if method == "Ping":
                    return await call(request, context, is_host)
                return await call(request, context)
            except (PathwaysError, *_STRAY) as exc:
                await _fail(context, exc, method)
        return grpc.unary_unary_rpc_method_handler(unary, response_serializer=serialize)


def _serializer(message) -> bytes:
    return message.SerializeToString()


def _refusal(streaming_in: bool, streaming_out: bool, code: grpc.StatusCode, message: str,
             name: str):
    """A handler of the method's shape that fails every call with `code`."""
    async def unary(request, context):
        await _abort(context, code, message, name)

    async def streaming(request, context):
        await _abort(context, code, message, name)
        yield  # pragma: no cover - an async generator, as the handler shape demands

    make: Callable = {(False, False): grpc.unary_unary_rpc_method_handler,
                      (False, True): grpc.unary_stream_rpc_method_handler,
                      (True, False): grpc.stream_unary_rpc_method_handler}[
        (streaming_in, streaming_out)]
    return make(streaming if streaming_out else unary, response_serializer=_serializer)


async def start_sim_server(host: SimHost, address: str = "127.0.0.1:0",
                           credentials: _auth.Credentials | None = None
                           ) -> tuple[grpc.aio.Server, int]:
    """A started grpc.aio server for `host` on `address` (port 0 picks one): (server, port).
    Sets the host's address."""
    credentials = credentials or host.credentials
    # Exclusive, as every server of the project: a second process cannot share the port.
    server = grpc.aio.server(options=[*_wire.GRPC_OPTIONS, *SERVER_OPTIONS])
    server.add_generic_rpc_handlers((_Handlers(host, credentials),))
    try:
        port = _rpc.add_port(server, address, credentials)
    except RuntimeError:  # grpcio raises for a failed bind (older releases return 0)
        port = 0
    if port == 0:
        raise bind_failed("simulated host", address)
    await server.start()
    host.address = f"{address.rsplit(':', 1)[0]}:{port}"
    return server, port
