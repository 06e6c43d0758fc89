"""Prometheus metrics of the cluster itself, through `prometheus_client`.

Every process of the runtime (controller, worker, or one holding both, such as a LocalCluster's)
keeps its metrics in prometheus_client's default registry, and `serve_metrics(port)` exposes them
over HTTP (`pathways up/controller/worker --metrics-port P`). Two kinds:

- **Events**, counted where they happen: executions, device busy time, execution time and the
  dispatch stages of every computation (histograms), bytes moved, errors by status code. Counters
  end in `_total`; all values are in base units (seconds, bytes, ratios).
- **State**, read when scraped (runtime.metrics_state): sessions, arrays, slices, hosts, queue
  depths, the instructions each island has ordered, device memory held, device busy ratio.

Labels: `island` and `host` (empty on the controller's own metrics), `stage`, `direction`,
`server`, `method`, `code`. prometheus_client adds the process's own metrics (CPU seconds,
resident memory, open files, garbage collections).

Training code reports its throughput with `record_training(...)` (pathways_training_* gauges).
"""

from __future__ import annotations

import collections
import errno
import threading
import time
from collections.abc import Callable

import grpc
from prometheus_client import REGISTRY, Counter, Gauge, Histogram, start_http_server

from proto.config import WorkerConfig, from_env

#: Buckets of latency histograms (seconds): 50 µs to 2 min.
LATENCY_BUCKETS = (5e-5, 1e-4, 2.5e-4, 5e-4, 1e-3, 2.5e-3, 5e-3, 1e-2, 2.5e-2, 5e-2, 0.1, 0.25,
                   0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 120.0)
#: The window over which `pathways_device_busy_ratio` is measured (seconds).
BUSY_WINDOW_S = from_env(WorkerConfig).busy_window_s

HOST = ("island", "host")
EXECUTIONS = Counter("pathways_executions", "Computations a host has executed.", HOST)
DEVICE_BUSY = Counter("pathways_device_busy_seconds",
                      "Wall-clock seconds a host's devices spent computing.", HOST)
EXECUTION_TIME = Histogram("pathways_execution_seconds",
                           "Device time of each computation, launch to completion.", HOST,
                           buckets=LATENCY_BUCKETS)
DISPATCH_LATENCY = Histogram(
    "pathways_dispatch_latency_seconds",
    "Time a computation's dispatch spends in each stage: order (controller: a client's Execute "
    "until its commands have their place in the islands' orders), receive (host: taking in a "
    "batch of instructions), queue (host: received until the executor takes it up), inputs "
    "(host: taken up until its inputs are present and it is launched).",
    (*HOST, "stage"), buckets=LATENCY_BUCKETS)
BYTES_MOVED = Counter("pathways_bytes_moved",
                      "Array bytes a host received (direction=in: puts and copies from other "
                      "hosts) or served (direction=out: fetches).", (*HOST, "direction"))
ERRORS = Counter("pathways_errors", "Calls a server answered with an error, by status code.",
                 (*HOST, "server", "method", "code"))
TRAINING_TOKENS = Gauge("pathways_training_tokens_per_second",
                        "Training throughput reported by the training loop (record_training).")
TRAINING_MFU = Gauge("pathways_training_mfu_ratio",
                     "Model FLOPs utilisation reported by the training loop (record_training).")
TRAINING_STEP = Gauge("pathways_training_step", "Last training step reported (record_training).")
TRAINING_LOSS = Gauge("pathways_training_loss", "Last training loss reported (record_training).")

#: Calls whose duration is a dispatch stage: (server, method) -> stage.
_STAGES = {("controller", "Execute"): "order", ("worker", "Dispatch"): "receive"}
#: Calls that move array bytes: method -> (direction, bytes of a reply or streamed chunk).
_BYTES: dict[str, tuple[str, Callable[[object], int]]] = {
    "PutArray": ("in", lambda reply: reply.nbytes),
    # A shard written into the caller's shared memory (proto.shm) or straight into its memory
    # (proto.cma) comes as its header alone.
    "GetArray": ("out", lambda chunk: len(chunk.data) or (
        chunk.shard.nbytes if chunk.shard.shared_array or chunk.shard.process_address else 0)),
}


def record_training(*, tokens_per_s: float | None = None, mfu: float | None = None,
                    step: int | None = None, loss: float | None = None) -> None:
    """Reports training progress as this process's pathways_training_* gauges (the ones given;
    `mfu` as a ratio, 0.5 for 50%). Cheap: call it every step. The figures reach Prometheus through
    this process's `serve_metrics` endpoint."""
    for gauge, value in ((TRAINING_TOKENS, tokens_per_s), (TRAINING_MFU, mfu),
                         (TRAINING_STEP, step), (TRAINING_LOSS, loss)):
        if value is not None:
            gauge.set(value)


def serve_metrics(port: int, host: str = "127.0.0.1"):
    """Serves this process's metrics at http://HOST:PORT/metrics on a daemon thread (port 0 picks
    a free one); returns the HTTP server (`server.server_port`, `server.shutdown()`). Raises
    PortInUseError when the port is taken."""
    from proto.ports import PortInUseError

    try:
        server, _ = start_http_server(port, addr=host, registry=REGISTRY)
    except OSError as exc:
        if exc.errno == errno.EADDRINUSE:
            raise PortInUseError(port) from None
        raise
    return server


class HostMetrics:
    """A worker's event metrics: `execution` takes each timeline entry of runtime.worker.inflight
    (sequence, name, received, picked, start, end, devices, session) as it is recorded."""

    def __init__(self, island: int, host: int) -> None:
        labels = (str(island), str(host))
        self._executions = EXECUTIONS.labels(*labels)
        self._busy = DEVICE_BUSY.labels(*labels)
        self._time = EXECUTION_TIME.labels(*labels)
        self._queue = DISPATCH_LATENCY.labels(*labels, "queue")
        self._inputs = DISPATCH_LATENCY.labels(*labels, "inputs")
        self._recent: collections.deque[tuple[float, float]] = collections.deque()
        self._lock = threading.Lock()

    def execution(self, entry: tuple) -> None:
        _, _, received, picked, start, end = entry[:6]
        self._executions.inc()
        self._busy.inc(max(0.0, end - start))
        self._time.observe(max(0.0, end - start))
        self._queue.observe(max(0.0, picked - received))
        self._inputs.observe(max(0.0, start - picked))
        with self._lock:
            self._recent.append((start, end))
            self._forget(end - BUSY_WINDOW_S)

    def _forget(self, before: float) -> None:
        while self._recent and self._recent[0][1] < before:
            self._recent.popleft()

    def busy_ratio(self, now: float | None = None) -> float:
        """Fraction of the last BUSY_WINDOW_S seconds the host's devices computed (executions
        count once they end; they never overlap, runtime.worker.inflight)."""
        now = time.time() if now is None else now
        with self._lock:
            self._forget(now - BUSY_WINDOW_S)
            busy = sum(max(0.0, min(end, now) - max(start, now - BUSY_WINDOW_S))
                       for start, end in self._recent)
        return min(1.0, busy / BUSY_WINDOW_S)


class CountingInterceptor(grpc.ServerInterceptor):
    """Wraps a server's interceptor (proto.auth.ServerGuard): counts the errors of every call
    by status code, times the calls that are dispatch stages, and counts the array bytes of puts
    and fetches. The guard's refusals are counted too (they are errors the caller sees)."""

    def __init__(self, inner: grpc.ServerInterceptor, server: str, island: int | None = None,
                 host: int | None = None) -> None:
        self._inner, self._server = inner, server
        self._labels = ("" if island is None else str(island), "" if host is None else str(host))

    def intercept_service(self, continuation, handler_call_details):
        handler = self._inner.intercept_service(continuation, handler_call_details)
        if handler is None:
            return None
        method = handler_call_details.method.rsplit("/", 1)[-1]
        return _counted(handler, self._server, method, self._labels)


def _counted(handler, server: str, method: str, labels: tuple[str, str]):
    stage = _STAGES.get((server, method))
    latency = DISPATCH_LATENCY.labels(*labels, stage) if stage else None
    moved = _BYTES.get(method)
    bytes_moved = BYTES_MOVED.labels(*labels, moved[0]) if moved else None
    size = moved[1] if moved else None

    def failed(context) -> None:
        code = context.code()
        ERRORS.labels(*labels, server, method, code.name if code is not None else "UNKNOWN").inc()

    def done(context, started: float) -> None:
        if latency is not None:
            latency.observe(time.perf_counter() - started)
        code = context.code()
        if code is not None and code != grpc.StatusCode.OK:  # set without raising
            failed(context)

    if handler.response_streaming:
        inner = handler.stream_stream or handler.unary_stream

        def behaviour(request, context):
            started = time.perf_counter()
            try:
                for response in inner(request, context):
                    if bytes_moved is not None:
                        bytes_moved.inc(size(response))
                    yield response
            except Exception:
                failed(context)
                raise
            done(context, started)
    else:
        inner = handler.stream_unary or handler.unary_unary

        def behaviour(request, context):
            started = time.perf_counter()
            try:
                response = inner(request, context)
            except Exception:
                failed(context)
                raise
            if bytes_moved is not None and response is not None:
                bytes_moved.inc(size(response))
            done(context, started)
            return response

    kind = {(False, False): "unary_unary", (False, True): "unary_stream",
            (True, False): "stream_unary", (True, True): "stream_stream"}[
        (handler.request_streaming, handler.response_streaming)]
    return handler._replace(**{kind: behaviour})
