"""The IFRT proxy server: JAX's "proxy" backend served through the runtime's client API.

`ProxyServer` runs beside a controller, as a client of it: each IFRT session of a JAX program is
one runtime session (runtime.Client) opened with the token, name and weight the program sent in its
initialization data (runtime.proxy.connect). So the controller authenticates every JAX program
itself, and sessions, quotas, the island's scheduling policy and failure handling apply to it as to
any client; the proxy holds no credential of its own beyond TLS settings. Host buffers (array bytes
between the program and the proxy) are kept per session; their calls name the session by a random
64-bit id only the session's own program learns.
"""

from __future__ import annotations

import dataclasses
import logging
import secrets
import threading
from concurrent import futures

import grpc

from proto import auth as _auth
from proto.config import ProxyConfig, from_env
from proto.errors import InvalidArgumentError, NotFoundError, PathwaysError
from proto.ifrt import grpc_ifrt_service_pb2 as grpc_ifrt
from proto.ifrt import grpc_ifrt_service_pb2_grpc as ifrt_grpc
from proto.ifrt import ifrt_service_pb2 as ifrt
from proto.ports import SERVER_OPTIONS, bind_failed, ensure_port_free
from runtime.client.client import Client
from runtime.proxy import _array_requests, _platform_requests, _program_requests  # noqa: F401
from runtime.proxy._devices import DeviceTable, attribute_value
from runtime.proxy._programs import Analyzer
from runtime.proxy._session import Session
from runtime.proxy._status import UnimplementedError, status_of

log = logging.getLogger(__name__)

#: The one protocol version served: what jaxlib 0.10's client speaks at most.
PROTOCOL_VERSION = 25
#: Newest serialization version of IFRT objects understood.
SERDES_VERSION = 3
SESSION_METADATA_KEY = "ifrt-proxy-grpc-ifrt-session-metadata-bin"
STORE_METADATA_KEY = "ifrt-proxy-grpc-host-buffer-store-metadata-bin"
#: Initialization-data keys the runtime reads (runtime.proxy.connect sets them).
TOKEN_KEY, NAME_KEY, WEIGHT_KEY = "pathways_token", "pathways_name", "pathways_weight"
_SETTINGS = from_env(ProxyConfig)
#: Largest message accepted (a compile request carries the whole program).
MAX_MESSAGE_BYTES = _SETTINGS.proxy_max_message_bytes
#: Bytes per HostBufferLookup message.
LOOKUP_CHUNK_BYTES = _SETTINGS.host_buffer_chunk_bytes


class ProxyServer:
    """Serves the IFRT proxy protocol for the controller at `controller_address`.

    `credentials` supply the TLS settings for the controller and its hosts; each session brings its
    own token. `analysis_devices` are local devices the proxy compiles programs on to learn their
    output shardings (runtime.proxy._programs.Analyzer).
    """

    def __init__(self, controller_address: str, *,
                 credentials: _auth.Credentials | None = None, analysis_devices=None) -> None:
        self.controller_address = controller_address
        self._tls = (credentials or _auth.Credentials()).tls
        self.analyzer = Analyzer(analysis_devices)
        self._sessions: dict[int, Session] = {}
        self._lock = threading.Lock()

    def open_session(self, initialization: dict) -> Session:
        """A session for a JAX program (its runtime session opened with the program's token)."""
        token = initialization.get(TOKEN_KEY)
        name = initialization.get(NAME_KEY, b"jax")
        try:
            weight = float(initialization.get(WEIGHT_KEY, b"1") or 1)
        except ValueError:
            raise InvalidArgumentError(f"{WEIGHT_KEY} must be a number") from None
        credentials = _auth.Credentials(token=token.decode() if token else None, tls=self._tls)
        client = Client(self.controller_address, name=_text(name), weight=weight,
                        credentials=credentials)
        try:
            devices = DeviceTable(client.status().hosts)
        except BaseException:
            client.close()
            raise
        session_id = secrets.randbits(63) or 1
        session = Session(session_id, client, devices, self.analyzer)
        with self._lock:
            self._sessions[session_id] = session
        log.info("IFRT session %x opened for %r (runtime session %d)", session_id, _text(name),
                 client.session_id)
        return session

    def close_session(self, session: Session, reason: str) -> None:
        with self._lock:
            self._sessions.pop(session.id, None)
        session.close(reason)

    def session(self, session_id: int) -> Session:
        with self._lock:
            session = self._sessions.get(session_id)
        if session is None:
            raise NotFoundError(f"IFRT session {session_id} is unknown")
        return session

    def close(self) -> None:
        """Ends every session (their runtime sessions close, freeing their arrays)."""
        with self._lock:
            sessions = list(self._sessions.values())
            self._sessions.clear()
        for session in sessions:
            session.close("the proxy server is stopping")


def _text(value) -> str:
    return value.decode(errors="replace") if isinstance(value, bytes) else str(value)


class _Servicer(ifrt_grpc.GrpcIfrtServiceServicer):
    """gRPC face of a ProxyServer: runtime errors become status codes."""

    def __init__(self, proxy: ProxyServer) -> None:
        self.proxy = proxy

    def GetVersion(self, request, context):
        low, high = request.min_version.protocol_version, request.max_version.protocol_version
        if not low <= PROTOCOL_VERSION <= high:
            context.abort(grpc.StatusCode.FAILED_PRECONDITION,
                          f"the client speaks IFRT proxy protocol versions {low} to {high}; this "
                          f"server speaks version {PROTOCOL_VERSION} (jaxlib 0.10)")
        serdes = min(request.max_version.ifrt_serdes_version_number or SERDES_VERSION,
                     SERDES_VERSION)
        return grpc_ifrt.GrpcGetVersionResponse(version=ifrt.IfrtProxyVersion(
            protocol_version=PROTOCOL_VERSION, ifrt_serdes_version_number=serdes))

    def IfrtSession(self, request_iterator, context):
        raw = dict(context.invocation_metadata() or ()).get(SESSION_METADATA_KEY)
        try:
            metadata = grpc_ifrt.GrpcIfrtSessionMetadata.FromString(raw or b"")
        except ValueError:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, "malformed session metadata")
        if metadata.version.protocol_version != PROTOCOL_VERSION:
            context.abort(grpc.StatusCode.FAILED_PRECONDITION,
                          f"session asks for protocol version "
                          f"{metadata.version.protocol_version}; this server speaks "
                          f"{PROTOCOL_VERSION}")
        initialization = {k: attribute_value(v)
                          for k, v in metadata.initialization_data.attributes.items()}
        try:
            session = self.proxy.open_session(initialization)
        except PathwaysError as exc:
            # Answered as the first request's status: the client raises it with this message
            # (a stream aborted before any answer only reads as CANCELLED there).
            refusal = type(exc)(f"cannot open a runtime session: {exc}")
            refusal.code = exc.code
            first = next(iter(request_iterator), None)
            if first is not None:
                yield ifrt.IfrtResponse(response_metadata=ifrt.ResponseMetadata(
                    op_id=first.request_metadata.op_id, status=status_of(refusal)))
            return

        def read() -> None:
            reason = "the client closed the session"
            try:
                for request in request_iterator:
                    session.submit(request)
            except Exception as exc:  # the stream broke (client gone, cancelled)
                reason = f"the session's stream ended: {exc}"
            self.proxy.close_session(session, reason)

        threading.Thread(target=read, daemon=True, name=f"ifrt-reader-{session.id:x}").start()
        context.add_callback(lambda: threading.Thread(
            target=self.proxy.close_session, args=(session, "the client went away"),
            daemon=True).start())
        yield from session.responses()

    def HostBufferStore(self, request_iterator, context):
        raw = dict(context.invocation_metadata() or ()).get(STORE_METADATA_KEY)
        try:
            metadata = grpc_ifrt.GrpcHostBufferStoreMetadata.FromString(raw or b"")
        except ValueError:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, "malformed host buffer metadata")
        try:
            buffers = self.proxy.session(metadata.session_id).host_buffers
        except PathwaysError as exc:
            context.abort(exc.code, str(exc))
        try:
            buffers.check_size(metadata.buffer_size)
            data = bytearray()
            for chunk in request_iterator:
                data += chunk.data
                if len(data) > metadata.buffer_size:
                    raise InvalidArgumentError(f"host buffer {metadata.handle} has more than "
                                               f"the {metadata.buffer_size} bytes announced")
            if len(data) != metadata.buffer_size:
                raise InvalidArgumentError(f"host buffer {metadata.handle}: {len(data)} of "
                                           f"{metadata.buffer_size} bytes arrived")
            buffers.store(metadata.handle, bytes(data))
        except PathwaysError as exc:
            buffers.fail(metadata.handle, exc)  # the request that uses it fails now, not later
            context.abort(exc.code, str(exc))
        return grpc_ifrt.GrpcHostBufferStoreResponse()

    def HostBufferLookup(self, request, context):
        try:
            data = self.proxy.session(request.session_id).host_buffers.lookup(
                request.handle, _time_left(context))
        except PathwaysError as exc:
            context.abort(exc.code, str(exc))
        view = memoryview(data)
        for offset in range(0, max(len(data), 1), LOOKUP_CHUNK_BYTES):
            yield grpc_ifrt.GrpcHostBufferLookupResponse(
                data=bytes(view[offset:offset + LOOKUP_CHUNK_BYTES]))

    def HostBufferDelete(self, request, context):
        try:
            self.proxy.session(request.session_id).host_buffers.delete(request.handle)
        except PathwaysError as exc:
            context.abort(exc.code, str(exc))
        return grpc_ifrt.GrpcHostBufferDeleteResponse()

    def HostBufferReadFromDisk(self, request, context):
        exc = UnimplementedError("HostBufferReadFromDisk is not supported by the Pathways proxy")
        context.abort(exc.code, str(exc))


def _time_left(context, most: float = 600.0) -> float:
    left = context.time_remaining()
    return most if left is None else max(0.0, min(most, left))


def create_proxy_server(proxy: ProxyServer, address: str = "127.0.0.1:0", *,
                        max_workers: int = 128) -> tuple[grpc.Server, int]:
    """A started gRPC server for `proxy` on `address` (port 0 picks one): (server, port).

    Insecure on purpose: jaxlib's proxy client speaks only plain gRPC (or ALTS); the JAX
    program's token travels in the session metadata, so serve on loopback or a private network.
    """
    ensure_port_free(address)
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=max_workers,
                                                    thread_name_prefix="ifrt-proxy"),
                         options=[("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
                                  ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
                                  *SERVER_OPTIONS])
    ifrt_grpc.add_GrpcIfrtServiceServicer_to_server(_Servicer(proxy), server)
    try:
        port = server.add_insecure_port(address)
    except RuntimeError:  # grpcio raises for a failed bind (older releases return 0)
        port = 0
    if port == 0:
        raise bind_failed("IFRT proxy", address)
    server.start()
    return server, port


@dataclasses.dataclass
class RunningProxy:
    """A started proxy server: stop() ends its sessions and its gRPC server."""

    proxy: ProxyServer
    server: grpc.Server
    address: str

    def stop(self, grace: float | None = 1.0) -> None:
        self.server.stop(grace=None)
        self.proxy.close()


def start_proxy(controller_address: str, address: str = "127.0.0.1:0", *,
                credentials: _auth.Credentials | None = None,
                analysis_devices=None) -> RunningProxy:
    """A proxy server for the controller at `controller_address`, serving on `address`."""
    proxy = ProxyServer(controller_address, credentials=credentials,
                        analysis_devices=analysis_devices)
    server, port = create_proxy_server(proxy, address)
    return RunningProxy(proxy, server, f"{address.rsplit(':', 1)[0]}:{port}")
