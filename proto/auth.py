"""Who may talk to the runtime's servers: the cluster token, session keys, TLS, and request guards
(the channels and servers that carry them: proto.rpc).

Three layers, all optional for in-process tests and all on by default for `pathways up`:

- **The cluster token.** `pathways up` generates a random token and writes it to a file only its
  owner can read. Every client and worker call carries it in the `pathways-token` metadata entry;
  a server configured with a token answers anything else with UNAUTHENTICATED before a handler
  runs. Compared in constant time.
- **The host token.** Every client holds the cluster token, so it cannot tell a host from a
  client. Calls only the cluster itself may make (a host registering or leaving, the controller's
  dispatch stream that can reset a host) also need the host token, which `pathways up` hands its
  workers and never writes where clients read.
- **Session keys.** The token admits a caller to the cluster; it does not say which session the
  caller is. A session key does: `HMAC(controller secret, session id)`, handed out by Connect and
  sent as `pathways-session` metadata. The controller secret reaches the hosts only over the
  controller's own dispatch stream (host token), so a host can check a key without asking the
  controller, and no client can make one for another session.
- **TLS.** With certificate files, servers listen with gRPC SSL credentials and channels use them;
  needed whenever a server listens beyond loopback (a token sent in clear text is no secret).

`ServerGuard` is the server interceptor that enforces the token and turns request bytes that do not
parse into INVALID_ARGUMENT (gRPC itself answers INTERNAL for them), so hostile input never reaches
a handler as anything but a well-formed message.
"""

from __future__ import annotations

import dataclasses
import hashlib
import hmac
import logging
import os
import secrets
import stat
from collections.abc import Callable, Iterator, Sequence

import grpc

from proto.access import CONTROLLER, REQUIRED, WORKER, Credential
from proto.config import WorkerConfig, from_env
from proto.errors import (ERROR_KEY, FailedPreconditionError, InvalidArgumentError, PathwaysError,
                          PermissionDeniedError, UnauthenticatedError)

log = logging.getLogger(__name__)

#: Metadata entry carrying the cluster token.
TOKEN_KEY = "pathways-token"
#: Metadata entry carrying the host token (calls only the cluster's own processes may make).
HOST_TOKEN_KEY = "pathways-host-token"
#: Metadata entry carrying a session's key: "<session id>:<hex HMAC>".
SESSION_KEY = "pathways-session"
#: Environment variables a token may come from (the value itself, or a file holding it).
TOKEN_ENV = "PATHWAYS_TOKEN"
TOKEN_FILE_ENV = "PATHWAYS_TOKEN_FILE"
HOST_TOKEN_ENV = "PATHWAYS_HOST_TOKEN"
#: Each session owns array ids [session_id << ID_BITS, (session_id + 1) << ID_BITS).
ID_BITS = 40
#: Bytes of randomness in a generated token.
TOKEN_BYTES = 32


def generate_token() -> str:
    """A fresh random token (URL-safe text, 256 bits)."""
    return secrets.token_urlsafe(TOKEN_BYTES)


def write_token_file(path: str, token: str) -> None:
    """Writes `token` to `path`, readable and writable by its owner only (mode 0600), replacing
    any earlier file; the file never exists with wider permissions, not even for a moment."""
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, mode=0o700, exist_ok=True)
    tmp = f"{path}.{secrets.token_hex(4)}.tmp"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        os.fchmod(fd, 0o600)  # whatever the umask
        os.write(fd, (token + "\n").encode())
    finally:
        os.close(fd)
    os.replace(tmp, path)


def read_token_file(path: str) -> str:
    """The token in `path`. FailedPreconditionError if the file is readable by its group or by
    others (a shared secret is no secret), or empty."""
    try:
        mode = os.stat(path).st_mode
        with open(path, encoding="utf-8") as f:
            token = f.read().strip()
    except OSError as exc:
        raise FailedPreconditionError(f"cannot read token file {path}: {exc}") from None
    if mode & (stat.S_IRWXG | stat.S_IRWXO):
        raise FailedPreconditionError(f"token file {path} is accessible by others (mode "
                                      f"{stat.S_IMODE(mode):o}); chmod 600 it")
    if not token:
        raise FailedPreconditionError(f"token file {path} is empty")
    return token


def default_token_file(address: str) -> str:
    """Where `pathways up` writes the token of a controller listening on `address`'s port:
    $PATHWAYS_HOME (default ~/.pathways)/token-PORT."""
    home = os.environ.get("PATHWAYS_HOME") or os.path.join(os.path.expanduser("~"), ".pathways")
    return os.path.join(home, f"token-{address.rsplit(':', 1)[-1]}")


def resolve_token(token: str | None = None, token_file: str | None = None,
                  address: str | None = None) -> str | None:
    """The token to use: `token`, else `token_file`'s, else $PATHWAYS_TOKEN, else the file named by
    $PATHWAYS_TOKEN_FILE, else (given the controller's `address`) the file `pathways up` wrote for
    it on this machine, else None (no authentication)."""
    if token:
        return token
    if token_file:
        return read_token_file(token_file)
    if os.environ.get(TOKEN_ENV):
        return os.environ[TOKEN_ENV].strip()
    if os.environ.get(TOKEN_FILE_ENV):
        return read_token_file(os.environ[TOKEN_FILE_ENV])
    if address and os.path.exists(default_token_file(address)):
        return read_token_file(default_token_file(address))
    return None


def _incarnation(secret: str) -> str:
    """A public tag of a controller secret: tells a key of an earlier controller from a forgery."""
    return hmac.new(secret.encode(), b"incarnation", hashlib.sha256).hexdigest()[:8]


def session_key(secret: str, session_id: int) -> str:
    """The key proving a caller is session `session_id` of the controller holding `secret`:
    "<session id>:<controller tag>:<hex HMAC>"."""
    mac = hmac.new(secret.encode(), f"session:{session_id}".encode(), hashlib.sha256)
    return f"{session_id}:{_incarnation(secret)}:{mac.hexdigest()}"


def check_session_key(secret: str, key: str) -> int | None:
    """The session id a key proves, or None when it proves nothing (malformed, forged, another
    controller's)."""
    head, _, _ = key.partition(":")
    if not secret or not head.isdigit() or len(head) > 20:
        return None
    session_id = int(head)
    return session_id if hmac.compare_digest(session_key(secret, session_id), key) else None


def is_earlier_controller_key(secret: str, key: str) -> bool:
    """Whether a key that does not check out was made by another controller (one that restarted),
    rather than forged for this one."""
    parts = key.split(":")
    return len(parts) == 3 and parts[1] != _incarnation(secret)


def metadata_value(context: grpc.ServicerContext, key: str) -> str | None:
    """One entry of a call's invocation metadata (None when absent)."""
    for k, v in context.invocation_metadata() or ():
        if k == key:
            return v if isinstance(v, str) else None
    return None


# -- TLS ------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class TLSConfig:
    """PEM files for gRPC SSL: `ca` verifies the peer; `cert` and `key` are this side's identity
    (required for a server; for a client only with mutual TLS). `server_name` overrides the name
    the client checks the server's certificate against."""

    ca: str = ""
    cert: str = ""
    key: str = ""
    server_name: str = ""

    def _read(self, path: str) -> bytes | None:
        if not path:
            return None
        with open(path, "rb") as f:
            return f.read()

    def server_credentials(self) -> grpc.ServerCredentials:
        if not (self.cert and self.key):
            raise FailedPreconditionError("a TLS server needs a certificate and a key")
        ca = self._read(self.ca)
        return grpc.ssl_server_credentials([(self._read(self.key), self._read(self.cert))],
                                           root_certificates=ca,
                                           require_client_auth=ca is not None)

    def channel_credentials(self) -> grpc.ChannelCredentials:
        return grpc.ssl_channel_credentials(self._read(self.ca), self._read(self.key),
                                            self._read(self.cert))


@dataclasses.dataclass(frozen=True)
class Credentials:
    """What a process presents and demands: the cluster token (None: no authentication), the host
    token (the cluster's own processes only; None for clients) and TLS (None: plain text, for
    loopback)."""

    token: str | None = dataclasses.field(default=None, repr=False)
    tls: TLSConfig | None = None
    host_token: str | None = dataclasses.field(default=None, repr=False)

    @classmethod
    def resolve(cls, token: str | None = None, token_file: str | None = None,
                tls: TLSConfig | None = None, host_token: str | None = None,
                address: str | None = None) -> Credentials:
        """Credentials from explicit values, else the environment (see resolve_token;
        $PATHWAYS_HOST_TOKEN for the host token)."""
        return cls(resolve_token(token, token_file, address), tls,
                   host_token or os.environ.get(HOST_TOKEN_ENV) or None)

    @classmethod
    def generate(cls, tls: TLSConfig | None = None) -> Credentials:
        """Fresh random cluster and host tokens (what `pathways up` and local clusters use)."""
        return cls(generate_token(), tls, generate_token())

    def for_clients(self) -> Credentials:
        """These credentials without the host token: what a client of the cluster gets."""
        return dataclasses.replace(self, host_token=None)

    def worker_environment(self) -> dict[str, str]:
        """Environment variables that hand these credentials to a worker subprocess."""
        env = {}
        if self.token:
            env[TOKEN_ENV] = self.token
        if self.host_token:
            env[HOST_TOKEN_ENV] = self.host_token
        return env


# -- the server side ------------------------------------------------------------------------------


#: authorize(method, request, session key or None, caller holds the host token): raises a
#: PathwaysError (e.g. PermissionDeniedError) when the caller may not make this call.
Authorize = Callable[[str, object, "str | None", bool], None]
#: screen(method, request): raises a PathwaysError when a parsed request (each message of a
#: stream) is out of bounds (proto.limits).
Screen = Callable[[str, object], None]


class ServerGuard(grpc.ServerInterceptor):
    """Checks every call's token, parses requests itself and asks the server's `authorize` policy,
    before any handler runs.

    - No or a wrong cluster token (when the server has one): UNAUTHENTICATED.
    - A method in `host_methods` without the host token (when the server has one):
      PERMISSION_DENIED.
    - Bytes that are not a valid message: INVALID_ARGUMENT (gRPC itself would answer INTERNAL).
    - `authorize` raising a PathwaysError: its status (streamed requests: checked on the first
      message).
    - `screen` raising a PathwaysError for a parsed message (proto.limits: fields out of
      bounds): its status; every message of a stream is screened.
    - A handler raising a stray ValueError, TypeError, KeyError, IndexError or OverflowError (a field
      combination validation missed): INVALID_ARGUMENT rather than UNKNOWN.

    The server keeps serving in every case.
    """

    def __init__(self, token: str | None = None, *, host_token: str | None = None,
                 host_methods: Sequence[str] = (), authorize: Authorize | None = None,
                 screen: Screen | None = None) -> None:
        self._token = token.encode() if token else None
        self._host_token = host_token.encode() if host_token else None
        self._host_methods = frozenset(host_methods)
        self._authorize = authorize
        self._screen = screen

    def intercept_service(self, continuation, handler_call_details):
        handler = continuation(handler_call_details)
        if handler is None:
            return None
        method = handler_call_details.method.rsplit("/", 1)[-1]
        metadata = {k: v for k, v in handler_call_details.invocation_metadata or ()
                    if isinstance(v, str)}
        if self._token is not None and not _equal(metadata.get(TOKEN_KEY), self._token):
            return _refusal(handler, grpc.StatusCode.UNAUTHENTICATED,
                            "missing or wrong cluster token (pass --token-file or set "
                            f"{TOKEN_ENV})", UnauthenticatedError.__name__)
        is_host = self._host_token is None or _equal(metadata.get(HOST_TOKEN_KEY),
                                                     self._host_token)
        if method in self._host_methods and not is_host:
            return _refusal(handler, grpc.StatusCode.PERMISSION_DENIED,
                            f"{method} is reserved to the cluster's own hosts and controller",
                            PermissionDeniedError.__name__)
        check = None
        if self._authorize is not None:
            authorize, key = self._authorize, metadata.get(SESSION_KEY)

            def check(request, context):
                try:
                    authorize(method, request, key, is_host)
                except PathwaysError as exc:
                    _abort(context, exc.code, str(exc), type(exc).__name__)
        return _guarded(handler, method, check, self._screened(method))

    def _screened(self, method: str):
        """The request screen for `method` as the parser applies it, or None."""
        if self._screen is None:
            return None
        screen = self._screen

        def apply(request, context):
            try:
                screen(method, request)
            except PathwaysError as exc:
                _abort(context, exc.code, str(exc), type(exc).__name__)
        return apply


def _equal(presented: str | None, expected: bytes) -> bool:
    return presented is not None and hmac.compare_digest(presented.encode(), expected)


def _abort(context, code: grpc.StatusCode, message: str, name: str) -> None:
    context.set_trailing_metadata(((ERROR_KEY, name),))
    context.abort(code, message)


def _refusal(handler, code: grpc.StatusCode, message: str, name: str):
    """A handler of the same shape as `handler` that fails every call with `code`."""
    def unary(request, context):
        _abort(context, code, message, name)

    def streaming(request, context):
        _abort(context, code, message, name)
        yield  # pragma: no cover - a generator, as the handler shape demands

    behaviour = streaming if handler.response_streaming else unary
    return _handler(handler, behaviour, None)


def _parse(deserializer, raw: bytes, context, method: str, screen=None):
    try:
        request = deserializer(raw) if deserializer is not None else raw
    except PathwaysError as exc:  # a parser that says what is wrong (proto.chunk_codec)
        _abort(context, exc.code, f"{method}: {exc}", type(exc).__name__)
    except Exception as exc:  # protobuf's DecodeError, or anything a corrupt message provokes
        _abort(context, grpc.StatusCode.INVALID_ARGUMENT,
               f"{method}: request is not a valid message ({type(exc).__name__})",
               InvalidArgumentError.__name__)
    if screen is not None:
        screen(request, context)
    return request


_STRAY = (ValueError, TypeError, KeyError, IndexError, OverflowError)


def _guarded(handler, method: str, check, screen):
    """`handler` with its requests parsed and screened (every message of a stream), the first
    one checked by the guard, and stray exceptions mapped."""
    deserialize = handler.request_deserializer
    behaviour = (handler.unary_unary or handler.unary_stream or handler.stream_unary
                 or handler.stream_stream)

    def stray(context, exc: Exception) -> None:
        log.debug("%s: unexpected %r from a handler", method, exc, exc_info=True)
        _abort(context, grpc.StatusCode.INVALID_ARGUMENT, f"{method}: bad request: {exc}",
               InvalidArgumentError.__name__)

    if handler.request_streaming:
        def requests(raw_iterator: Iterator[bytes], context) -> Iterator:
            first = True
            for raw in raw_iterator:
                request = _parse(deserialize, raw, context, method, screen)
                if first and check is not None:
                    check(request, context)
                first = False
                yield request

        if handler.response_streaming:
            def call(raw_iterator, context):
                try:
                    yield from behaviour(requests(raw_iterator, context), context)
                except _STRAY as exc:
                    stray(context, exc)
        else:
            def call(raw_iterator, context):
                try:
                    return behaviour(requests(raw_iterator, context), context)
                except _STRAY as exc:
                    stray(context, exc)
    elif handler.response_streaming:
        def call(raw, context):
            request = _parse(deserialize, raw, context, method, screen)
            if check is not None:
                check(request, context)
            try:
                yield from behaviour(request, context)
            except _STRAY as exc:
                stray(context, exc)
    else:
        def call(raw, context):
            request = _parse(deserialize, raw, context, method, screen)
            if check is not None:
                check(request, context)
            try:
                return behaviour(request, context)
            except _STRAY as exc:
                stray(context, exc)
    return _handler(handler, call, None)


def _handler(handler, behaviour, request_deserializer):
    make = {(False, False): grpc.unary_unary_rpc_method_handler,
            (False, True): grpc.unary_stream_rpc_method_handler,
            (True, False): grpc.stream_unary_rpc_method_handler,
            (True, True): grpc.stream_stream_rpc_method_handler}[
        (handler.request_streaming, handler.response_streaming)]
    return make(behaviour, request_deserializer=request_deserializer,
                response_serializer=handler.response_serializer)


# -- policies -------------------------------------------------------------------------------------


def session_policy(secret: Callable[[], str]) -> Authorize:
    """The controller's policy: a call the access table (proto.access) marks SESSION must carry
    the key of the session its request names, made with `secret()`."""
    def authorize(method: str, request, key: str | None, is_host: bool) -> None:
        if REQUIRED[CONTROLLER].get(method) is not Credential.SESSION:
            return
        session_id = request.session_id
        current = secret()
        if check_session_key(current, key or "") != session_id:
            if key and is_earlier_controller_key(current, key):
                raise FailedPreconditionError(
                    f"{method}: session {session_id} belongs to an earlier controller: the "
                    f"controller restarted and its sessions are gone; connect again (a new Client)")
            raise PermissionDeniedError(f"{method}: the caller is not session {session_id} "
                                        f"(no or a wrong {SESSION_KEY} key)")
    return authorize


#: How long a host waits for a new controller's first dispatch when a session key does not check
#: out: after a controller restart, a client of the new one can reach a host before it does.
NEW_CONTROLLER_WAIT_S = from_env(WorkerConfig).new_controller_wait_s


class ArrayOwnerPolicy:
    """A host's policy (an Authorize): a call the access table (proto.access) marks ARRAY_OWNER
    (reading or writing an array) needs the key of the session that owns its id (or the host
    token: a peer host moving it). A key that does not check out with the current secret is
    checked again once the secret changes (a new controller's first dispatch), for up to
    `wait_s` seconds: only that case waits (`at_once` says which)."""

    def __init__(self, secret: Callable[[], str], wait_s: float = NEW_CONTROLLER_WAIT_S
                 ) -> None:
        self.secret, self.wait_s = secret, wait_s

    def at_once(self, method: str, request, key: str | None, is_host: bool) -> bool:
        """Whether the call is allowed without waiting (an event loop's handler need not leave
        the loop for it)."""
        if is_host or REQUIRED[WORKER].get(method) is not Credential.ARRAY_OWNER:
            return True
        return check_session_key(self.secret(), key or "") == _owner(method, request)

    def __call__(self, method: str, request, key: str | None, is_host: bool) -> None:
        import time

        if self.at_once(method, request, key, is_host):
            return
        owner, current = _owner(method, request), self.secret()
        if key and check_session_key(current, key) is None and is_earlier_controller_key(
                current, key):
            deadline = time.monotonic() + self.wait_s
            while time.monotonic() < deadline and self.secret() == current:
                time.sleep(0.01)
            if check_session_key(self.secret(), key) == owner:
                return
        raise PermissionDeniedError(f"{method}: array {_array_id(method, request)} belongs to "
                                    f"another session")


def _array_id(method: str, request) -> int:
    return request.spec.array_id if method == "PutArray" else request.array_id


def _owner(method: str, request) -> int:
    """The session that owns the array a GetArray or PutArray names (its id's high bits)."""
    return _array_id(method, request) >> ID_BITS


def array_owner_policy(secret: Callable[[], str],
                       wait_s: float = NEW_CONTROLLER_WAIT_S) -> ArrayOwnerPolicy:
    """The policy of a host whose controller's secret `secret()` returns (ArrayOwnerPolicy)."""
    return ArrayOwnerPolicy(secret, wait_s)
