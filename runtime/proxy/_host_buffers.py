"""A session's host buffers: array bytes on their way between the JAX client and the proxy.

The client streams a buffer in (HostBufferStore) while, or before, it sends the request that uses
it; the request waits for it. The proxy stores the bytes an array was copied to (CopyToHostBuffer)
and the client streams them out (HostBufferLookup). Every wait has a deadline; closing the store
wakes every waiter with an error.
"""

from __future__ import annotations

import threading
import time

from proto.config import ProxyConfig, from_env
from proto.errors import (DeadlineExceededError, FailedPreconditionError, InvalidArgumentError,
                          NotFoundError, PathwaysError, ResourceExhaustedError)

#: How long a request waits for a host buffer the client has not finished sending.
_SETTINGS = from_env(ProxyConfig)

LOOKUP_TIMEOUT_S = _SETTINGS.host_buffer_lookup_timeout_s
#: Largest single host buffer accepted.
MAX_BUFFER_BYTES = _SETTINGS.max_host_buffer_bytes
#: Most bytes of host buffers one session may hold at once.
MAX_SESSION_BYTES = _SETTINGS.max_session_host_buffer_bytes
#: Failed stores remembered per session.
MAX_FAILED = _SETTINGS.max_failed_host_buffers


class HostBufferStore:
    """Host buffers of one session, by the handles the client gives them. Thread-safe."""

    def __init__(self) -> None:
        self._buffers: dict[int, bytes] = {}
        self._failed: dict[int, PathwaysError] = {}  # stores that failed: their requests fail too
        self._nbytes = 0
        self._cond = threading.Condition()
        self._closed = ""

    def check_size(self, nbytes: int) -> None:
        """RESOURCE_EXHAUSTED for a buffer this store cannot take (before its bytes arrive)."""
        if nbytes < 0:
            raise InvalidArgumentError(f"host buffer size {nbytes} is negative")
        if nbytes > MAX_BUFFER_BYTES:
            raise ResourceExhaustedError(f"host buffer of {nbytes} bytes exceeds the proxy's "
                                         f"limit of {MAX_BUFFER_BYTES} bytes")
        with self._cond:
            if self._nbytes + nbytes > MAX_SESSION_BYTES:
                raise ResourceExhaustedError(
                    f"the session holds {self._nbytes} bytes of host buffers; {nbytes} more "
                    f"would exceed the limit of {MAX_SESSION_BYTES}")

    def store(self, handle: int, data: bytes) -> None:
        """Stores a buffer; INVALID_ARGUMENT if the handle is taken."""
        self.check_size(len(data))
        with self._cond:
            if self._closed:
                raise FailedPreconditionError(f"session closed: {self._closed}")
            if handle in self._buffers:
                raise InvalidArgumentError(f"host buffer {handle} already exists")
            self._buffers[handle] = data
            self._nbytes += len(data)
            self._cond.notify_all()

    def lookup(self, handle: int, timeout: float = LOOKUP_TIMEOUT_S) -> bytes:
        """The buffer, waiting up to `timeout` s for it to arrive."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while handle not in self._buffers:
                if handle in self._failed:
                    error = self._failed.pop(handle)
                    raise type(error)(f"host buffer {handle} was not stored: {error}")
                if self._closed:
                    raise FailedPreconditionError(f"session closed: {self._closed}")
                left = deadline - time.monotonic()
                if left <= 0:
                    raise DeadlineExceededError(f"host buffer {handle} did not arrive within "
                                                f"{timeout:.0f} s")
                self._cond.wait(left)
            return self._buffers[handle]

    def take(self, handle: int, timeout: float = LOOKUP_TIMEOUT_S) -> bytes:
        """The buffer, removed from the store (a request that consumes it)."""
        data = self.lookup(handle, timeout)
        self.delete(handle)
        return data

    def fail(self, handle: int, error: PathwaysError) -> None:
        """Notes that storing a buffer failed: whatever waits for it fails at once with `error`
        (most MAX_FAILED remembered)."""
        with self._cond:
            self._failed[handle] = error
            while len(self._failed) > MAX_FAILED:
                self._failed.pop(next(iter(self._failed)))
            self._cond.notify_all()

    def delete(self, handle: int) -> None:
        """Drops a buffer; NOT_FOUND if there is none."""
        with self._cond:
            data = self._buffers.pop(handle, None)
            if data is None:
                raise NotFoundError(f"host buffer {handle} does not exist")
            self._nbytes -= len(data)

    def close(self, reason: str) -> None:
        """Drops every buffer; waiting lookups fail with `reason`."""
        with self._cond:
            self._closed = reason or "closed"
            self._buffers.clear()
            self._nbytes = 0
            self._cond.notify_all()
