"""gRPC plumbing of every runtime server and channel: binding a server to its port alone (with
TLS when configured, proto.ports), the options of a channel, and the interceptor that adds the
credentials (proto.auth) to each call."""

from __future__ import annotations

import ipaddress
import logging
from collections.abc import Callable, Sequence

import grpc
import grpc.experimental

from proto import auth as _auth
from proto import wire as _wire
from proto.ports import SERVER_OPTIONS, bind_failed, ensure_port_free

log = logging.getLogger(__name__)

#: A sync channel's option (read by grpc's Python layer, not its core): server-streaming calls
#: run in the thread that iterates them, without a thread of the channel's.
_SINGLE_THREADED_UNARY_STREAM = grpc.experimental.ChannelOptions.SingleThreadedUnaryStream


def is_loopback(address: str) -> bool:
    """Whether a "host:port" address is a loopback one (localhost, 127.0.0.0/8, ::1)."""
    host = address.rsplit(":", 1)[0].strip("[]")
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def add_port(server: grpc.Server, address: str, credentials: _auth.Credentials | None) -> int:
    """Binds `server` to `address`, with TLS when configured; returns the port (0: failed).

    Binding beyond loopback without TLS is allowed (a private network may be trusted) but logged:
    the token would travel in clear text."""
    credentials = credentials or _auth.Credentials()
    if credentials.tls is not None:
        return server.add_secure_port(address, credentials.tls.server_credentials())
    if not is_loopback(address):
        log.warning("serving on %s without TLS: calls, and the token, travel in clear text",
                    address)
    return server.add_insecure_port(address)


def start_server(what: str, address: str, credentials: _auth.Credentials | None,
                 guard: grpc.ServerInterceptor, add_servicer: Callable[[grpc.Server], None], *,
                 max_workers: int) -> tuple[grpc.Server, int]:
    """A started gRPC server for `what` ("controller", "worker") on `address` (port 0 picks a
    free one), every call passing through `guard`: (server, port). The port is this server's
    alone (proto.ports): a port another process holds raises PortInUseError."""
    from concurrent import futures

    ensure_port_free(address)  # before gRPC's own bind, which logs its failure at length
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=max_workers),
                         options=[*_wire.GRPC_OPTIONS, *SERVER_OPTIONS], interceptors=[guard])
    add_servicer(server)
    try:
        port = add_port(server, address, credentials)
    except RuntimeError:  # grpcio raises for a failed bind (older releases return 0)
        port = 0
    if port == 0:
        raise bind_failed(what, address)
    server.start()
    return server, port


def channel_options(credentials: _auth.Credentials) -> list[tuple[str, object]]:
    """gRPC options of a channel to a runtime server (message limits; TLS name override).

    Each channel keeps its connections to itself (grpc's local subchannel pool). With the
    process-wide pool grpc shares by default, a channel still open to a host that went away
    keeps retrying its address with a growing backoff, and a new channel to that address shares
    the failing connection: a host started again on the same address (a fixed port, or a port the
    kernel handed out again) was refused to every new channel, at once, with the old
    "Connection refused", until the backoff ran out (tests/test_rpc_channels.py)."""
    options = [*_wire.GRPC_OPTIONS, ("grpc.use_local_subchannel_pool", 1)]
    if credentials.tls is not None and credentials.tls.server_name:
        options.append(("grpc.ssl_target_name_override", credentials.tls.server_name))
    return options


def open_channel(address: str, credentials: _auth.Credentials | None = None,
                 metadata: Sequence[tuple[str, str]] | Callable[[], Sequence[tuple[str, str]]]
                 = ()) -> grpc.Channel:
    """A channel to a runtime server presenting `credentials` (TLS, token) and `metadata` (a
    sequence, or a function returning one per call: e.g. a session key learnt later)."""
    credentials = credentials or _auth.Credentials()
    # Server-streaming calls (GetArray reads) run in the calling thread rather than on a thread
    # the channel starts for them: a read from each of 64 hosts took 1.7 ms of a client's CPU,
    # most of it starting and switching to those threads; 0.8 ms this way (grpc's option;
    # benchmarks/RESULTS.md).
    options = [*channel_options(credentials), (_SINGLE_THREADED_UNARY_STREAM, 1)]
    if credentials.tls is not None:
        channel = grpc.secure_channel(address, credentials.tls.channel_credentials(), options)
    else:
        channel = grpc.insecure_channel(address, options=options)
    fixed = [(_auth.TOKEN_KEY, credentials.token)] if credentials.token else []
    if credentials.host_token:
        fixed.append((_auth.HOST_TOKEN_KEY, credentials.host_token))
    if not fixed and not callable(metadata) and not metadata:
        return channel
    extra = metadata if callable(metadata) else (lambda: metadata)
    return grpc.intercept_channel(channel, _MetadataInterceptor(lambda: [*fixed, *extra()]))


def open_aio_channel(address: str, credentials: _auth.Credentials | None = None
                     ) -> grpc.aio.Channel:
    """An asyncio channel to a runtime server, with TLS when the credentials have it (its calls
    carry `credential_metadata(credentials)` themselves). Call on the event loop that uses it."""
    credentials = credentials or _auth.Credentials()
    options = channel_options(credentials)
    if credentials.tls is not None:
        return grpc.aio.secure_channel(address, credentials.tls.channel_credentials(), options)
    return grpc.aio.insecure_channel(address, options=options)


def credential_metadata(credentials: _auth.Credentials | None) -> list[tuple[str, str]]:
    """The metadata a call presents for `credentials`: the cluster token and the host token."""
    metadata = []
    if credentials is not None and credentials.token:
        metadata.append((_auth.TOKEN_KEY, credentials.token))
    if credentials is not None and credentials.host_token:
        metadata.append((_auth.HOST_TOKEN_KEY, credentials.host_token))
    return metadata


class _CallDetails(grpc.ClientCallDetails):
    def __init__(self, details: grpc.ClientCallDetails, metadata: list) -> None:
        self.method, self.timeout = details.method, details.timeout
        self.credentials = details.credentials
        self.wait_for_ready = getattr(details, "wait_for_ready", None)
        self.compression = getattr(details, "compression", None)
        self.metadata = metadata


class _MetadataInterceptor(grpc.UnaryUnaryClientInterceptor, grpc.UnaryStreamClientInterceptor,
                           grpc.StreamUnaryClientInterceptor, grpc.StreamStreamClientInterceptor):
    """Adds the token and session metadata to every call of a channel."""

    def __init__(self, metadata: Callable[[], Sequence[tuple[str, str]]]) -> None:
        self._metadata = metadata

    def _details(self, details: grpc.ClientCallDetails) -> grpc.ClientCallDetails:
        return _CallDetails(details, [*(details.metadata or ()), *self._metadata()])

    def intercept_unary_unary(self, continuation, details, request):
        return continuation(self._details(details), request)

    def intercept_unary_stream(self, continuation, details, request):
        return continuation(self._details(details), request)

    def intercept_stream_unary(self, continuation, details, request_iterator):
        return continuation(self._details(details), request_iterator)

    def intercept_stream_stream(self, continuation, details, request_iterator):
        return continuation(self._details(details), request_iterator)
