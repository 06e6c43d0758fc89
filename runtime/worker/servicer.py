"""The Worker gRPC service of a host, and the two servers that carry it: one for clients and
peer hosts, one (with threads of its own) for the controller's control traffic."""

from __future__ import annotations

import logging
import time

import grpc

from proto import access
from proto import auth as _auth
from proto import limits as _limits
from proto import pathways_pb2 as pb
from proto import pathways_pb2_grpc as pb_grpc
from proto import heap as _heap
from proto import rpc as _rpc
from proto.chunk_codec import add_worker_servicer
from proto.admission import Admission, Chain
from proto.config import TransferConfig, from_env
from proto.errors import (ArrayNotFoundError, ExecutionError, InvalidArgumentError, PathwaysError,
                          abort)
from proto.servers import ServerGroup
from runtime.metrics import CountingInterceptor
from runtime.worker.defaults import MAX_GET_TIMEOUT_S, SLICE_TIMEOUT_S
from runtime.worker.defaults import SETTINGS as _WORKER
from runtime.worker.bulk import BulkListener
from runtime.worker.worker import Worker


class WorkerServicer(pb_grpc.WorkerServicer):
    """gRPC face of a Worker: maps its exceptions to status codes."""

    def __init__(self, worker: Worker) -> None:
        self.worker = worker

    def Dispatch(self, request, context):
        self.worker.last_contact = time.monotonic()
        try:
            received = self.worker.receive(request.controller_id, request.instructions,
                                           request.epoch)
        except PathwaysError as exc:
            abort(context, exc)
        forwarded = self.worker.forwarder.forward(request, _time_left(context, SLICE_TIMEOUT_S))
        return pb.DispatchReply(received=received, executed=self.worker.executed,
                                forwarded=forwarded)

    def PutArray(self, request_iterator, context):
        try:
            nbytes = self.worker.dataplane.put(request_iterator,
                                               _time_left(context, SLICE_TIMEOUT_S))
        except PathwaysError as exc:
            abort(context, exc)
        except (ValueError, TypeError) as exc:
            abort(context, InvalidArgumentError(f"bad array: {exc}"))
        except Exception as exc:  # the devices refused it: a runtime error, not UNKNOWN
            if type(exc) is Exception:  # gRPC's own abort (an authorization check): let it be
                raise
            abort(context, ExecutionError(f"storing an array on host {self.worker.island}."
                                          f"{self.worker.host} failed: {exc}"))
        return pb.PutArrayReply(nbytes=nbytes)

    def GetArray(self, request, context):
        try:
            yield from self.worker.dataplane.get(
                request, _time_left(context, MAX_GET_TIMEOUT_S), context.is_active)
        except PathwaysError as exc:
            abort(context, exc)
        except Exception as exc:  # reading the buffers failed: a runtime error, never UNKNOWN
            if type(exc) is Exception:  # gRPC's own abort (an authorization check): let it be
                raise
            what = f"reading array {request.array_id} on host {self.worker.island}.{self.worker.host}"
            if "deleted" in str(exc):
                abort(context, ArrayNotFoundError(f"{what}: its buffers were freed ({exc})"))
            abort(context, ExecutionError(f"{what} failed: {exc}"))

    def GetTimeline(self, request, context):
        events = [pb.ExecutionEvent(sequence=r.sequence, name=r.name, received=r.received,
                                    picked=r.picked, start=r.start, end=r.end, devices=r.devices,
                                    session_id=r.session_id)
                  for r in self.worker.timeline if r.end > request.since]
        return pb.GetTimelineReply(island=self.worker.island, host=self.worker.host, events=events)

    def WatchProgress(self, request, context):
        try:
            yield from self.worker.watch_progress(request, context.is_active)
        except PathwaysError as exc:
            abort(context, exc)

    def Ping(self, request, context):
        host_token = self.worker.credentials.host_token
        if host_token is None or _auth.metadata_value(context, _auth.HOST_TOKEN_KEY) == host_token:
            self.worker.last_contact = time.monotonic()  # the controller's heartbeat
        count, nbytes = self.worker.store.stats()
        return pb.PingReply(host=self.worker.info(), stored_arrays=count, stored_bytes=nbytes,
                            executions=self.worker.executions, executed=self.worker.executed)

def _time_left(context: grpc.ServicerContext, most: float) -> float:
    """Seconds until the caller's deadline, at most `most`: a wait never outlives its caller."""
    left = context.time_remaining()
    return most if left is None else min(most, max(0.0, left))

#: Calls only the controller (and peer hosts) may make: they need the host token, when there is
#: one. A dispatch from anyone else could reset the host; a progress stream never ends by design.
HOST_METHODS = access.methods_requiring(access.WORKER, access.Credential.HOST)

#: Client calls that hold a thread while they wait, bounded per session and cancelled when idle
#: (proto.admission).
LIMITED_METHODS = ("PutArray", "GetArray", "GetTimeline")

log = logging.getLogger(__name__)
_TRANSFER = from_env(TransferConfig)

#: Threads of the control server: a few progress streams, dispatches and pings at a time.
CONTROL_THREADS = _WORKER.control_threads

def create_worker_server(worker: Worker, address: str = "127.0.0.1:0", *,
                         max_workers: int = 64) -> tuple[ServerGroup, int]:
    """Started gRPC servers for `worker` on `address` (port 0 picks a free port), stopped as one:
    (servers, port of the main one).

    The main server takes client traffic: puts and fetches, bounded per session and in all, idle
    ones cancelled (proto.admission). A control server on a port of its own, with threads of
    its own (`worker.control_address`, which the host registers with), takes only the cluster's
    own calls: the controller's dispatch, progress stream and heartbeat, so no client traffic can
    make them late. Both demand the worker's credentials (proto.auth): the cluster token on
    every call, the host token on HOST_METHODS (on the control server, on every call), and for
    reading or writing an array the key of the session that owns it (or the host token); TLS when
    the credentials have it."""
    credentials = worker.credentials
    host = address.rsplit(":", 1)[0]
    _heap.keep_freed_memory_as_configured()  # stream messages reuse freed memory

    def guard(host_methods):
        return CountingInterceptor(_auth.ServerGuard(
            credentials.token, host_token=credentials.host_token, host_methods=host_methods,
            authorize=_auth.array_owner_policy(lambda: worker.controller_id),
            screen=lambda method, request: _limits.check_request(worker.limits, method, request)),
            "worker", worker.island, worker.host)

    servicer = WorkerServicer(worker)

    def add(server):
        add_worker_servicer(servicer, server)  # array bytes uncopied by protobuf

    admission = Admission(f"host {worker.island}.{worker.host}", LIMITED_METHODS, worker.limits,
                          lambda: worker.controller_id, credentials.host_token,
                          per_session=worker.limits.streams_per_session)
    worker.admission = admission
    server, port = _rpc.start_server("worker", address, credentials,
                                      Chain(guard(HOST_METHODS), admission), add,
                                      max_workers=max_workers)
    every = [m.name for m in pb.DESCRIPTOR.services_by_name["Worker"].methods]
    try:
        control, control_port = _rpc.start_server("worker control", f"{host}:0", credentials,
                                                   guard(every), add,
                                                   max_workers=CONTROL_THREADS)
    except BaseException:
        server.stop(None)
        raise
    servers = [server, control]
    # Array bytes over plain TCP (proto.bulk); not beside TLS, whose bytes must stay encrypted.
    if _TRANSFER.bulk_channel and credentials.tls is None:
        try:
            worker.dataplane.bulk = BulkListener(host, _TRANSFER)
            servers.append(worker.dataplane.bulk)
        except OSError as exc:
            log.warning("host %d.%d: no bulk channel on %s (%s): transfers stream over gRPC",
                        worker.island, worker.host, host, exc)
    worker.address = f"{host}:{port}"
    worker.control_address = f"{host}:{control_port}"
    return ServerGroup(servers), port
