"""One IFRT proxy session: the JAX client's stream of requests, served through a runtime session.

Requests are taken up one at a time in the order they arrive, as the client sends them: a request
may use the arrays any earlier one made. A handler does the ordering-sensitive part at once
(registering arrays, queueing computations with the controller) and returns either the response or
a `Later`: work that waits (for a computation, a fetch) runs on a thread pool and answers when it
is done, while the next requests go on. Responses carry the request's op_id and may come back in
any order; a failed request answers with its error as the status, and the arrays it was to make
hold that error, so every later use of them fails with it too.
"""

from __future__ import annotations

import dataclasses
import itertools
import logging
import queue
import threading
from collections.abc import Callable, Iterator
from concurrent import futures
from typing import Any

from google.protobuf.message import Message

from proto.config import ProxyConfig, from_env
from proto.errors import ExecutionError, FailedPreconditionError, NotFoundError, PathwaysError
from proto.ifrt import ifrt_service_pb2 as ifrt
from runtime.client.client import Client
from runtime.proxy._arrays import ProxyArray
from runtime.proxy._devices import DeviceTable
from runtime.proxy._host_buffers import HostBufferStore
from runtime.proxy._status import UnimplementedError, status_of

log = logging.getLogger(__name__)

#: Handles the server makes start here; the client makes those below (the IFRT proxy convention).
SERVER_HANDLES_START = 1 << 48
_SETTINGS = from_env(ProxyConfig)
#: Threads per session for answers that wait (reads, ready checks, futures, compiles).
LATER_THREADS = _SETTINGS.proxy_later_threads
#: Most futures remembered per session (a client need not check them all).
MAX_FUTURES = _SETTINGS.proxy_max_futures


@dataclasses.dataclass(frozen=True)
class Later:
    """A response that waits: `fn` runs on the session's pool and returns the response message."""

    fn: Callable[[], Message]


#: A request handler: (session, request message) -> response message or Later.
Handler = Callable[["Session", Any], "Message | Later"]
#: Handlers by the name of the request's field in IfrtRequest (filled by the handler modules).
HANDLERS: dict[str, Handler] = {}
#: Per request kind, the handles of the arrays it makes (they hold its error if it fails).
RESULT_HANDLES: dict[str, Callable[[Any], list[int]]] = {}


def handles(kind: str, result_handles: Callable[[Any], list[int]] | None = None):
    """Registers the decorated function as the handler of IfrtRequest field `kind`."""
    def register(fn: Handler) -> Handler:
        HANDLERS[kind] = fn
        if result_handles is not None:
            RESULT_HANDLES[kind] = result_handles
        return fn
    return register


class Session:
    """The state of one JAX client: its runtime session, arrays, executables, futures, buffers."""

    def __init__(self, session_id: int, client: Client, devices: DeviceTable, analyzer) -> None:
        self.id, self.client, self.devices = session_id, client, devices
        self.analyzer = analyzer  # runtime.proxy._programs.Analyzer
        self.host_buffers = HostBufferStore()
        self.arrays: dict[int, Any] = {}  # handle -> runtime.proxy._arrays.ProxyArray
        self.executables: dict[int, Any] = {}  # handle -> runtime.proxy._programs.Executable
        self.slices: dict[tuple, Any] = {}  # placement key -> VirtualSlice
        self.slices_lock = threading.Lock()  # compiles make slices off the session's thread
        # Futures the client may check: a function that waits (None: already complete).
        self.futures: dict[int, Callable[[], None] | None] = {}
        # Its own threads for waits: a session whose arrays never arrive cannot hold up others.
        self._pool = futures.ThreadPoolExecutor(max_workers=LATER_THREADS,
                                                thread_name_prefix=f"ifrt-later-{session_id:x}")
        self._handles = itertools.count(SERVER_HANDLES_START)
        self._requests: queue.SimpleQueue = queue.SimpleQueue()
        self._responses: queue.SimpleQueue = queue.SimpleQueue()
        self._closed = threading.Event()
        self._thread = threading.Thread(target=self._serve, daemon=True,
                                        name=f"ifrt-session-{session_id:x}")
        self._thread.start()

    # -- the stream ------------------------------------------------------------------------------

    def submit(self, request: ifrt.IfrtRequest) -> None:
        """Queues a request of the stream (in stream order)."""
        self._requests.put(request)

    def responses(self) -> Iterator[ifrt.IfrtResponse]:
        """Responses as they are ready, until the session closes."""
        while True:
            response = self._responses.get()
            if response is None:
                return
            yield response

    def close(self, reason: str) -> None:
        """Ends the session: pending waits fail, the runtime session (and with it every array and
        slice of this client) is closed. Idempotent."""
        if self._closed.is_set():
            return
        self._closed.set()
        self._requests.put(None)
        self.host_buffers.close(reason)
        self._thread.join(timeout=30)
        self._pool.shutdown(wait=False, cancel_futures=True)
        self.arrays.clear()
        self.executables.clear()
        self.client.close()
        self._responses.put(None)

    # -- serving ---------------------------------------------------------------------------------

    def new_handle(self) -> int:
        """A fresh server-made handle (futures, executables)."""
        return next(self._handles)

    def add_future(self, wait: Callable[[], None] | None = None, handle: int = 0) -> int:
        """A future (under `handle`, or a fresh one) that is complete once `wait` returns, failed
        with what it raises (complete at once when None). It waits only when the client checks
        it (CheckFuture), so futures never checked cost no thread; the oldest unchecked ones are
        forgotten past MAX_FUTURES."""
        handle = handle or self.new_handle()
        self.futures[handle] = wait
        while len(self.futures) > MAX_FUTURES:
            self.futures.pop(next(iter(self.futures)))
        return handle

    def _serve(self) -> None:
        while True:
            request = self._requests.get()
            if request is None:
                return
            self._handle(request)

    def _handle(self, request: ifrt.IfrtRequest) -> None:
        op_id = request.request_metadata.op_id
        kind = request.WhichOneof("request")
        handler = HANDLERS.get(kind) if kind else None
        try:
            if handler is None:
                raise UnimplementedError(f"IFRT proxy request {kind or '(empty)'} is not "
                                         f"supported by the Pathways proxy server")
            result = handler(self, getattr(request, kind))
        except Exception as exc:  # every failure becomes the request's status
            self._fail(op_id, kind, request, exc)
            return
        if isinstance(result, Later):
            try:
                job = self._pool.submit(result.fn)
            except RuntimeError:  # the session closed meanwhile
                self._fail(op_id, kind, request, FailedPreconditionError("the session closed"))
                return
            job.add_done_callback(lambda done: self._answer_later(op_id, kind, request, done))
        else:
            self._respond(op_id, kind, result)

    def _answer_later(self, op_id: int, kind: str, request, done: futures.Future) -> None:
        if done.cancelled():  # the session closed before it ran: nobody waits for the answer
            return
        exc = done.exception()
        if exc is not None:
            self._fail(op_id, kind, request, exc)
        else:
            self._respond(op_id, kind, done.result())

    def _respond(self, op_id: int, kind: str, message: Message) -> None:
        response = ifrt.IfrtResponse(response_metadata=ifrt.ResponseMetadata(op_id=op_id))
        getattr(response, kind.replace("_request", "_response")).CopyFrom(message)
        self._responses.put(response)

    def _fail(self, op_id: int, kind: str | None, request, exc: BaseException) -> None:
        if kind in RESULT_HANDLES:
            error = exc if isinstance(exc, PathwaysError) else ExecutionError(
                f"{kind} failed: {exc}")
            for handle in RESULT_HANDLES[kind](getattr(request, kind)):
                self.arrays[handle] = ProxyArray.failed(error)
        self._responses.put(ifrt.IfrtResponse(response_metadata=ifrt.ResponseMetadata(
            op_id=op_id, status=status_of(exc))))


@handles("check_future_request")
def check_future(session: Session, request: ifrt.CheckFutureRequest) -> Later:
    """Waits for a future the server handed out (each is checked once, then forgotten)."""
    if request.future_handle not in session.futures:
        raise NotFoundError(f"future {request.future_handle} is unknown")
    wait = session.futures.pop(request.future_handle)

    def check() -> ifrt.CheckFutureResponse:
        if wait is not None:
            wait()
        return ifrt.CheckFutureResponse()
    return Later(check)
