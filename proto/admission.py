"""Which client calls a server takes on: a bounded number per session and in all, and none that
sits idle on its client for long.

A gRPC server serves each call on a thread of a fixed pool; a call that waits (a put whose client
stalls, a fetch whose client does not read) holds its thread. Eighty idle PutArray streams once
took all 64 threads of a host: other clients waited, and the controller's heartbeat, which shared
the pool, failed, so a healthy host was declared lost. `Admission` is a server interceptor that
bounds such calls:

- per session: at most `per_session` calls of the limited methods at once (hosts:
  `Limits.streams_per_session`, the controller: `Limits.calls_per_session`; the
  session is the one the caller's session key proves; callers without a valid key share one
  anonymous allowance); a call over it fails at once with RESOURCE_EXHAUSTED;
- in all: at most `Limits.client_calls` at once, below the pool's size, so the server's own
  cluster (peer transfers, registration) always finds a thread; when the server is full, a
  session holding fewer calls than another still gets one: the other's longest idle (else
  oldest) call is cancelled for it, so many sessions of one attacker cannot lock others out;
- idle: a call that has waited `Limits.stream_idle_s` for its client (the next message of a
  request stream, the client taking the next message of a reply stream) is cancelled.

Calls with the host token (the cluster's own processes) are not limited. The heartbeat does not
depend on any of this: hosts serve it on a control server of its own (runtime.worker.worker).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Collection, Iterator

import grpc

from proto import auth as _auth
from proto.errors import ResourceExhaustedError, abort
from proto.limits import Limits

log = logging.getLogger(__name__)

#: The allowance of callers without a valid session key.
ANONYMOUS = -1


class _Call:
    """One admitted call: whose it is, and since when it waits on its client (None: it does not)."""

    __slots__ = ("session", "context", "waiting_since", "opened", "released", "evicted")

    def __init__(self, session: int, context) -> None:
        self.session, self.context = session, context
        self.waiting_since: float | None = None
        self.opened = time.monotonic()
        self.released = self.evicted = False


class Admission(grpc.ServerInterceptor):
    """Bounds the concurrent and idle client calls of `methods` (see the module docstring).

    `secret()` is what session keys are checked against (the controller's secret); `host_token`
    exempts the cluster's own calls (None: nobody is exempt, as in a cluster without tokens).
    `per_session` is a session's allowance of open calls; `limits` give the total and the idle
    timeout.
    """

    def __init__(self, what: str, methods: Collection[str], limits: Limits,
                 secret: Callable[[], str], host_token: str | None = None, *,
                 per_session: int) -> None:
        self.what, self.limits, self.per_session = what, limits, per_session
        self._methods = frozenset(methods)
        self._secret, self._host_token = secret, host_token
        self._lock = threading.Lock()
        self._calls: set[_Call] = set()
        self._per_session: dict[int, int] = {}
        self._stopped = threading.Event()
        self._watchdog = threading.Thread(target=self._watch, daemon=True,
                                          name=f"admission-{what}")
        self._watchdog.start()

    # -- the interceptor ----------------------------------------------------------------------------

    def intercept_service(self, continuation, handler_call_details):
        handler = continuation(handler_call_details)
        method = handler_call_details.method.rsplit("/", 1)[-1]
        if handler is None or method not in self._methods:
            return handler
        metadata = {k: v for k, v in handler_call_details.invocation_metadata or ()
                    if isinstance(v, str)}
        if self._host_token is not None and metadata.get(_auth.HOST_TOKEN_KEY) == self._host_token:
            return handler
        session = _auth.check_session_key(self._secret(), metadata.get(_auth.SESSION_KEY, ""))
        return self._limited(handler, method, ANONYMOUS if session is None else session)

    def _limited(self, handler, method: str, session: int):
        behaviour = (handler.unary_unary or handler.unary_stream or handler.stream_unary
                     or handler.stream_stream)
        admit, release = self._admit, self._release

        def wrap_requests(requests: Iterator, call: _Call) -> Iterator:
            while True:
                call.waiting_since = time.monotonic()
                try:
                    request = next(requests)
                except StopIteration:
                    return
                finally:
                    call.waiting_since = None
                yield request

        def wrap_replies(replies: Iterator, call: _Call) -> Iterator:
            for reply in replies:
                call.waiting_since = time.monotonic()
                yield reply
                call.waiting_since = None

        if handler.response_streaming:
            def limited(request, context):
                # Released when the handler ends, not when the client goes: a handler still
                # waiting holds its thread, and counts until it lets go.
                call = admit(session, method, context)
                try:
                    if handler.request_streaming:
                        request = wrap_requests(iter(request), call)
                    yield from wrap_replies(behaviour(request, context), call)
                finally:
                    release(call)
        else:
            def limited(request, context):
                call = admit(session, method, context)
                try:
                    if handler.request_streaming:
                        request = wrap_requests(iter(request), call)
                    return behaviour(request, context)
                finally:
                    release(call)

        return _auth._handler(handler, limited, handler.request_deserializer)

    # -- counting -----------------------------------------------------------------------------------

    def _admit(self, session: int, method: str, context) -> _Call:
        evicted = None
        with self._lock:
            mine = self._per_session.get(session, 0)
            if mine >= self.per_session:
                who = "callers without a session" if session == ANONYMOUS else f"session {session}"
                refusal = ResourceExhaustedError(
                    f"{method}: {who} already has {mine} calls open on this {self.what}, its "
                    f"limit of {self.per_session}; wait for one to finish")
            elif (len(self._calls) >= self.limits.client_calls
                  and (evicted := self._evictable(mine)) is None):
                refusal = ResourceExhaustedError(
                    f"{method}: this {self.what} serves {len(self._calls)} client calls, its "
                    f"limit; try again shortly")
            else:
                call = _Call(session, context)
                self._calls.add(call)
                self._per_session[session] = mine + 1
                refusal = None
        if evicted is not None:  # outside the lock: cancelling runs the call's callbacks
            log.warning("%s: cancelling a call of session %s to make room for session %s "
                        "(%d client calls open)", self.what, evicted.session, session,
                        len(self._calls))
            evicted.context.cancel()
        if refusal is None:
            return call
        abort(context, refusal)
        raise AssertionError("abort returns only by raising")  # pragma: no cover

    def _evictable(self, mine: int) -> _Call | None:
        """When the server is full: the call to cancel so a session with `mine` calls gets one,
        taken from the session holding the most (at least two more than `mine`), the one idle on
        its client longest, else its oldest; None when no session holds that many, or when the
        evicted calls have not gone yet (the server never holds more than a session's allowance
        over its limit)."""
        if len(self._calls) >= self.limits.client_calls + self.per_session:
            return None
        richest = max(self._per_session, key=self._per_session.get)
        if self._per_session[richest] < mine + 2:
            return None
        theirs = [c for c in self._calls if c.session == richest and not c.evicted]
        if not theirs:
            return None
        now = time.monotonic()
        victim = max(theirs, key=lambda c: (c.waiting_since is not None,
                                            now - (c.waiting_since or c.opened)))
        victim.evicted = True
        return victim

    def _release(self, call: _Call) -> None:
        with self._lock:
            if call.released:
                return
            call.released = True
            self._calls.discard(call)
            left = self._per_session.get(call.session, 1) - 1
            if left:
                self._per_session[call.session] = left
            else:
                self._per_session.pop(call.session, None)

    def open_calls(self, session: int | None = None) -> int:
        """Calls admitted and not yet finished (of one session, or all)."""
        with self._lock:
            return len(self._calls) if session is None else self._per_session.get(session, 0)

    # -- idle calls -----------------------------------------------------------------------------

    def _watch(self) -> None:
        period = min(1.0, max(0.05, self.limits.stream_idle_s / 4))
        while not self._stopped.wait(period):
            now = time.monotonic()
            with self._lock:
                idle = [c for c in self._calls if c.waiting_since is not None
                        and now - c.waiting_since > self.limits.stream_idle_s]
            for call in idle:
                log.warning("%s: cancelling a call of %s idle for more than %.0f s", self.what,
                            "an anonymous caller" if call.session == ANONYMOUS
                            else f"session {call.session}", self.limits.stream_idle_s)
                call.waiting_since = None
                call.context.cancel()

    def stop(self) -> None:
        """Stops the idle watchdog."""
        self._stopped.set()


class Chain(grpc.ServerInterceptor):
    """Interceptors applied in order, as one (the first sees a call first)."""

    def __init__(self, *interceptors: grpc.ServerInterceptor) -> None:
        self._interceptors = interceptors

    def intercept_service(self, continuation, handler_call_details):
        for interceptor in reversed(self._interceptors):
            continuation = (lambda c, i: lambda d: i.intercept_service(c, d))(continuation,
                                                                             interceptor)
        return continuation(handler_call_details)
