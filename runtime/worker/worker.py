"""A worker host: owns local devices, compiles StableHLO, stores arrays, runs its island's order.

The controller streams numbered instructions to every host of an island. A host does the cheap,
order-free part of each instruction when it arrives (defining meshes, creating pending entries for
outputs, so reads and puts can start), and runs the rest strictly in sequence order on one executor
thread. An execution with collectives is the only one in flight: several sharded executions with
collectives in flight at once can deadlock XLA's CPU rendezvous (DESIGN.md); one without may overlap
the next (runtime.worker.inflight). Either way executions start in the island's order, which is what gang
scheduling needs.

On a multi-host island (runtime.worker.distributed) a slice may span hosts: each host builds the global
mesh, holds only its own shards, and launches each computation on its devices in the island's
order; a host that holds no device of a slice skips that slice's work. If the hosts of a slice do
not all reach a computation (an order broken from outside, an input that never arrives), the ones
that did wait in its collectives forever: past `execution_deadline_s` a watchdog asks the slice's
other hosts where they are and fails the computation with a report naming who reached it and who
did not (runtime.worker.hang).
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import hashlib
import itertools
import logging
import math
import queue
import threading
import time
from collections.abc import Callable, Container, Iterator, Sequence
from concurrent import futures

import grpc
import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from proto import pathways_pb2 as pb
from proto import pathways_pb2_grpc as pb_grpc
from proto import auth as _auth
from proto import limits as _limits
from runtime import metrics_state as _metrics_state
from proto import stablehlo as _stablehlo
from proto import wire as _wire
from proto.admission import Admission, Chain
from runtime.worker.distributed import device_memory_bytes
from proto.errors import (ArrayNotFoundError, DeadlineExceededError, ExecutionError,
                             FailedPreconditionError, InvalidArgumentError, NotFoundError,
                             PathwaysError, abort)
from runtime.worker.hang import HangWatchdog
from runtime.worker.inflight import InFlight, collective_free
from runtime.metrics import CountingInterceptor, HostMetrics
from runtime.worker.pins import SendPins
from proto.servers import ServerGroup
from runtime.worker.store import ArrayStore, wait_all

log = logging.getLogger(__name__)

_IDLE = ("idle",)

#: How long an execution waits for its inputs before failing. Inputs may come from another island
#: that is still compiling or computing its part of a program (PaLM's first step compiles both
#: components on every island), so this is minutes, not seconds.
INPUT_TIMEOUT_S = 600.0
#: How long a put waits for the controller's definition of the array's slice to arrive.
SLICE_TIMEOUT_S = 30.0
#: How long a put waits for the controller's announcement of its array (the client sends it once
#: the controller has ordered the announcement, which may still be on its way to this host).
ANNOUNCE_TIMEOUT_S = 10.0
#: Failures of incoming arrays remembered until their announcement arrives.
MAX_FAILED_EARLY = 4096
#: Arrivals of announced arrays kept for the progress stream (the controller lets computations
#: that read a put into the order once every host of the put has reported it).
ARRIVALS_KEPT = 1 << 16
#: Deadline for streaming one array to another host.
TRANSFER_TIMEOUT_S = 300.0
#: Longest wait a GetArray may ask for, and how often a waiting one checks its caller is there.
MAX_GET_TIMEOUT_S = 3600.0
CALLER_CHECK_S = 0.5
#: Longest a computation on a multi-host slice may wait for the slice's other hosts to reach it
#: (0: forever). Past it the computation is reported hung (runtime.worker.hang).
EXECUTION_DEADLINE_S = 30.0


@dataclasses.dataclass
class _Loaded:
    """An executable compiled for this host's devices."""

    name: str
    compiled: object  # jax.stages.Compiled, or None when loading failed
    error: PathwaysError | None
    out_nbytes: tuple[int, ...]  # bytes of each output on this host's devices
    donated: tuple[int, ...]
    devices: int = 0  # devices of this host it runs on
    slice_id: int = 0
    skip: bool = False  # this host holds no device of the slice: nothing to do here
    multi_host: bool = False  # the slice spans hosts (its collectives cross processes)
    overlap: bool = False  # no collectives: may run while the previous execution finishes
    cache_key: tuple | None = None  # its compilation's, shared by alike loads


@dataclasses.dataclass(frozen=True)
class ExecutionRecord:
    """Timestamps of one execution on this host (time.time() seconds), for utilisation accounting:
    received (instruction arrived), picked (executor took it up), start (inputs present, computation
    launched), end (computation done)."""

    sequence: int
    name: str
    received: float
    picked: float
    start: float
    end: float
    devices: int
    session_id: int = 0


class Worker:
    """State and executor of one host. Instantiable: tests run several in one process.

    `island_devices` (hosts of a distributed island only): every host's devices indexed by host,
    as `runtime.worker.distributed.island_devices` gives them; `devices` is this host's entry.
    """

    def __init__(self, island: int, host: int, devices: Sequence[jax.Device], *,
                 platform: str = "cpu", backend: str = "local",
                 input_timeout_s: float = INPUT_TIMEOUT_S,
                 island_devices: Sequence[Sequence[jax.Device]] | None = None,
                 execution_deadline_s: float = EXECUTION_DEADLINE_S,
                 credentials: _auth.Credentials | None = None,
                 limits: _limits.Limits = _limits.DEFAULT) -> None:
        self.island, self.host = island, host
        self.limits = limits
        # Presented to peer hosts; the worker's server demands the same (create_worker_server).
        self.credentials = credentials or _auth.Credentials()
        self.last_contact = time.monotonic()  # of the controller's last ping or dispatch
        self.input_timeout_s = input_timeout_s
        self.execution_deadline_s = execution_deadline_s
        self.devices = list(devices)
        self.island_devices = [list(d) for d in island_devices] if island_devices else None
        self.memory_bytes = device_memory_bytes(self.devices)
        self.platform, self.backend = platform, backend
        self.ray_node = ""  # the Ray node of a host placed by Ray (runtime.cluster.ray_host)
        self.address = ""
        self.control_address = ""  # the control server's (create_worker_server)
        self.admission: Admission | None = None
        self.store = ArrayStore()
        # Arrays the controller announced (Expect) whose data may be put, and those being put now:
        # a put of anything else is refused, so every stored byte is one the controller knows of.
        self._announced: dict[int, pb.ArraySpec] = {}
        self._receiving: set[int] = set()
        self._failed_early: collections.OrderedDict[int, PathwaysError] = (
            collections.OrderedDict())  # failures that came before their announcement
        # (number, array id) of announced arrays that arrived or failed, for WatchProgress.
        self._arrivals: collections.deque[tuple[int, int]] = collections.deque(
            maxlen=ARRIVALS_KEPT)
        self._arrivals_count = 0
        self._arrival: dict[int, float] = {}  # sequence -> time.time() of receipt
        self._slices: dict[int, tuple[Mesh | None, pb.SliceInfo]] = {}
        self._foreign: set[int] = set()  # slices with no device on this host
        self._executable_slices: dict[int, int] = {}  # executable id -> slice id, on receipt
        self._loaded: dict[int, _Loaded] = {}
        self._compile_cache: dict[tuple, object] = {}
        self._pending: dict[int, pb.Instruction] = {}
        self._received = 0
        self._next = 1
        self.executed = 0  # last sequence number applied
        self._controller_id = ""
        self._epoch = 0  # of the island's order (runtime.controller.controller: island restarts)
        # (state, name, sequence, session, since, slice id): rendered only when someone asks.
        self._activity: tuple = _IDLE
        self._current_instruction: pb.Instruction | None = None
        self._progress = threading.Event()  # set as the executor moves on (WatchProgress)
        self.hang = ""  # the report of a computation that ran past its deadline
        self._cond = threading.Condition()
        self._stopped = False
        self._peers: dict[str, pb_grpc.WorkerStub] = {}
        self._transfers = futures.ThreadPoolExecutor(max_workers=4,
                                                     thread_name_prefix=f"send-{island}.{host}")
        self._pins = SendPins()  # sources captured by sends, not yet streamed
        self.metrics = HostMetrics(island, host)
        self._inflight = InFlight(self.store, f"{island}.{host}", self._progress.set,
                                  on_record=self.metrics.execution)
        # Freeing a device buffer can wait for the computations still using it: the executor
        # hands deleted arrays to this thread, which drops them, instead of waiting itself.
        self._reaper: queue.SimpleQueue = queue.SimpleQueue()
        threading.Thread(target=_reap, args=(self._reaper,), daemon=True,
                         name=f"reaper-{island}.{host}").start()
        self._thread = threading.Thread(target=self._run, name=f"executor-{island}.{host}",
                                        daemon=True)
        self._thread.start()
        self._watchdog = HangWatchdog(self) if execution_deadline_s > 0 else None
        _metrics_state.track(self)

    @property
    def executions(self) -> int:
        """Executions completed since start."""
        return self._inflight.executions

    @property
    def distributed_hosts(self) -> int:
        """Hosts of this host's distributed island (0: not part of one)."""
        return len(self.island_devices) if self.island_devices else 0

    # -- receipt: order-free work done as instructions arrive -------------------------------------

    def receive(self, controller_id: str, instructions: Sequence[pb.Instruction],
                epoch: int = 0) -> int:
        """Queues instructions of the island's order; returns the highest sequence received.

        The order-free work runs outside the executor's lock (a batch holds up to a thousand
        instructions; the executor must not wait for it), and the instructions become visible to
        the executor together once it is done.
        """
        now = time.time()
        with self._cond:
            if (controller_id, epoch) != (self._controller_id, self._epoch):
                self._reset(controller_id, epoch)
            fresh = fresh_instructions(instructions, self._next, self._pending)
        announced = receive_order_free(self, fresh, now)
        with self._cond:
            for spec in announced:
                early = self._failed_early.pop(spec.array_id, None)
                if early is None:
                    self._announced[spec.array_id] = spec
                else:
                    self.store.fail(spec.array_id, early)
                    self._note_arrival(spec.array_id)
            for _, ins in fresh:
                self._pending[ins.sequence] = ins
                self._received = max(self._received, ins.sequence)
            self._cond.notify_all()
            return self._received

    def _reset(self, controller_id: str, epoch: int = 0) -> None:
        """A new controller incarnation, or a restart of the island: the order starts afresh, and
        the old one's state is gone."""
        if self._controller_id:
            log.warning("host %d.%d: new controller incarnation or island epoch %d, dropping "
                        "state", self.island, self.host, epoch)
        self._controller_id, self._epoch = controller_id, epoch
        self._pending.clear()
        self._received, self._next, self.executed = 0, 1, 0
        self._announced.clear()
        self._failed_early.clear()
        self._arrivals.clear()  # ids repeat under a new controller
        self._arrival.clear()
        self._slices.clear()
        self._foreign.clear()
        self._executable_slices.clear()
        self._loaded.clear()
        self.store.clear()

    def _define_slice(self, info: pb.SliceInfo) -> None:
        """Builds a slice's mesh: local devices, or global ones for a slice spanning hosts."""
        hosts = {d.host for d in info.devices}
        if self.host not in hosts:
            self._slices[info.slice_id] = (None, info)
            self._foreign.add(info.slice_id)
            return
        if hosts != {self.host} and self.island_devices is None:
            raise InvalidArgumentError(f"slice {info.slice_id} spans hosts {sorted(hosts)}, but "
                                       f"island {self.island} is not a distributed system")
        table = self.island_devices or {self.host: self.devices}
        if any(d.device < 0 for d in info.devices):
            raise InvalidArgumentError(f"slice {info.slice_id} names a negative device index")
        try:
            devices = [table[d.host][d.device] for d in info.devices]
        except (IndexError, KeyError):
            raise InvalidArgumentError(f"slice {info.slice_id} names a device island "
                                       f"{self.island} lacks") from None
        mesh = Mesh(np.array(devices).reshape(tuple(info.mesh_shape)), tuple(info.axis_names))
        self._slices[info.slice_id] = (mesh, info)
        self._foreign.discard(info.slice_id)

    def wait_received(self, sequence: int, timeout: float,
                      active: Callable[[], bool] = lambda: True) -> None:
        """Waits until instructions up to `sequence` of the island's order have arrived, or the
        caller is gone (`active()` false)."""
        timeout = _limits.check_seconds(timeout, "timeout")
        deadline = time.monotonic() + timeout
        with self._cond:
            while self._received < sequence:
                left = deadline - time.monotonic()
                if left <= 0 or not active():
                    raise DeadlineExceededError(
                        f"host {self.island}.{self.host} has not received instruction #{sequence} "
                        f"within {timeout:.1f} s (received up to #{self._received})")
                self._cond.wait(min(left, CALLER_CHECK_S))

    def mesh(self, slice_id: int, timeout: float = 0.0) -> tuple[Mesh, pb.SliceInfo]:
        """The concrete mesh of a slice, waiting up to `timeout` s for its definition to arrive."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while slice_id not in self._slices:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise NotFoundError(f"slice {slice_id} is not defined on host "
                                        f"{self.island}.{self.host}")
                self._cond.wait(left)
            mesh, info = self._slices[slice_id]
        if mesh is None:
            raise FailedPreconditionError(f"slice {slice_id} has no device on host "
                                          f"{self.island}.{self.host}")
        return mesh, info

    # -- the ordered executor ---------------------------------------------------------------------

    def _run(self) -> None:
        while True:
            with self._cond:
                while self._next not in self._pending and not self._stopped:
                    self._cond.wait(1.0)
                if self._stopped:
                    return
                ins = self._pending.pop(self._next)
                self._next += 1
                self._current_instruction = ins
            try:
                self._apply(ins)
            except Exception:  # an executor must survive any one instruction
                log.exception("host %d.%d: instruction %d failed", self.island, self.host,
                              ins.sequence)
            finally:
                self._activity = _IDLE
                self.executed = ins.sequence
                self._progress.set()

    def _apply(self, ins: pb.Instruction) -> None:
        kind = ins.WhichOneof("op")
        if kind == "load":
            self._load(ins.load)
        elif kind == "execute":
            self._execute(ins.sequence, ins.execute, self._arrival.pop(ins.sequence, 0.0))
        elif kind == "delete":
            doomed = []
            for array_id in ins.delete.array_ids:
                with self._cond:  # a put finishing now stores its array before or not at all
                    self._announced.pop(array_id, None)
                    if not self.store.contains(array_id):
                        continue
                    try:  # keep a reference: the reaper thread drops the last one
                        doomed.append(self.store.get(array_id, 0.0))
                    except PathwaysError:
                        pass  # pending or failed: nothing to free
                    self.store.delete(array_id)
            if doomed:
                self._reaper.put(doomed)
        elif kind == "send":
            self._send(ins.send, ins.sequence)
        elif kind == "release_slice":
            self._release_slice(ins.release_slice.slice_id)

    def _load(self, load: pb.LoadInstruction) -> None:
        donated = tuple(load.donated)
        if load.slice_id in self._foreign:
            self._loaded[load.executable_id] = _Loaded(load.name, None, None, (), donated,
                                                       slice_id=load.slice_id, skip=True)
            return
        self._activity = ("compiling", load.name, 0, 0, time.monotonic(), load.slice_id)
        try:
            mesh, info = self.mesh(load.slice_id)
            # Slices on the same devices share compilations (clients often ask for alike slices).
            key = (load.fingerprint, tuple(d.id for d in mesh.devices.flat), mesh.axis_names,
                   donated)
            cached = self._compile_cache.get(key)
            if cached is None:
                compiled = (_compile_stablehlo(load, mesh) if load.format == pb.STABLEHLO
                            else _compile(load, mesh))
                cached = self._compile_cache[key] = (compiled, collective_free(compiled))
            compiled, no_collectives = cached
            multi_host = any(d.host != self.host for d in info.devices)
            self._loaded[load.executable_id] = _Loaded(
                load.name, compiled, None, tuple(_host_nbytes(v, info, self.host)
                                                 for v in load.outputs), donated,
                sum(d.host == self.host for d in info.devices), load.slice_id,
                multi_host=multi_host, overlap=no_collectives and not multi_host, cache_key=key)
        except Exception as exc:  # reported to whoever reads the outputs of a call
            error = exc if isinstance(exc, PathwaysError) else ExecutionError(
                f"loading {load.name!r} failed: {exc}")
            self._loaded[load.executable_id] = _Loaded(load.name, None, error, (), donated,
                                                       slice_id=load.slice_id)

    def _release_slice(self, slice_id: int) -> None:
        """Forgets a released slice and unloads its executables; a compilation goes with the
        last executable that uses it (alike slices of several sessions share one)."""
        with self._cond:
            self._slices.pop(slice_id, None)
            self._foreign.discard(slice_id)
        gone = [e for e, loaded in self._loaded.items() if loaded.slice_id == slice_id]
        for executable_id in gone:
            del self._loaded[executable_id]
        for executable_id in [e for e, s in self._executable_slices.items() if s == slice_id]:
            del self._executable_slices[executable_id]
        if gone:
            used = {loaded.cache_key for loaded in self._loaded.values()}
            for key in [k for k in self._compile_cache if k not in used]:
                del self._compile_cache[key]

    def _execute(self, sequence: int, ex: pb.ExecuteInstruction, received: float) -> None:
        picked = time.time()
        loaded = self._loaded.get(ex.executable_id)
        if loaded is not None and loaded.skip:
            return
        try:
            if loaded is None:
                raise NotFoundError(f"executable {ex.executable_id} is not loaded on this host")
            if loaded.error is not None:
                raise loaded.error
            if self.hang:
                raise DeadlineExceededError(self.hang)
            self._activity = ("waiting for inputs of", loaded.name, sequence, ex.session_id,
                              time.monotonic(), loaded.slice_id)
            inputs = wait_all(self.store, ex.inputs, time.monotonic() + self.input_timeout_s)
            self._activity = ("running", loaded.name, sequence, ex.session_id, time.monotonic(),
                              loaded.slice_id)
            if not loaded.overlap:
                self._inflight.drain()  # collectives: the only execution in flight
            self._pins.spare_donated(inputs, loaded.donated)  # earlier sends keep their data
            start = time.time()
            outputs = loaded.compiled(*inputs)
            record = (sequence, loaded.name, received or picked, picked, start, loaded.devices,
                      ex.session_id)
            if loaded.overlap:
                self._inflight.hand_off(record, outputs, ex.outputs)
            else:
                for out in outputs:
                    out.block_until_ready()
                self._inflight.record(record, time.time())
        except Exception as exc:
            name = loaded.name if loaded else f"executable {ex.executable_id}"
            where = f"{name} (#{sequence}) on host {self.island}.{self.host}"
            if isinstance(exc, PathwaysError) and not getattr(exc, "raised_by_store", False):
                error = exc  # an input's producer failed: its error names it; pass it on as is
            elif isinstance(exc, PathwaysError):
                error = type(exc)(f"{where}: {exc}")
            else:
                error = ExecutionError(f"{where} failed: {exc}")
            for out in ex.outputs:
                self.store.fail(out, error)
            return
        if self.hang:
            return  # reported hung meanwhile: its outputs already carry the report
        for array_id, value, nbytes in zip(ex.outputs, outputs, loaded.out_nbytes):
            self.store.set(array_id, value, nbytes)
        for position in loaded.donated:
            self.store.delete(ex.inputs[position])

    def _fail_outputs(self, ex: pb.ExecuteInstruction, error: PathwaysError) -> None:
        for out in ex.outputs:
            self.store.fail(out, error)

    def declare_hang(self, report: str) -> None:
        """The executor is stuck (runtime.worker.hang): fails the outputs of the stuck computation and
        of everything queued behind it with DeadlineExceededError(report), now and on arrival."""
        with self._cond:
            if self.hang:
                return
            self.hang = report
            stuck = self._current_instruction
            pending = [ins.execute for ins in self._pending.values() if ins.HasField("execute")]
        log.error("host %d.%d: %s", self.island, self.host, report)
        error = DeadlineExceededError(report)
        if stuck is not None and stuck.HasField("execute"):
            pending.append(stuck.execute)
        for ex in pending:
            if self._executable_slices.get(ex.executable_id) not in self._foreign:
                self._fail_outputs(ex, error)
        self._progress.set()

    # -- transfers between hosts ------------------------------------------------------------------

    def _send(self, send: pb.SendInstruction, sequence: int) -> None:
        """Captures the source at this place in the island's order; streams it on a transfer thread.

        Nothing later in the order changes what is sent: the send holds the source's buffers (a
        delete only drops the store's reference) and a later computation donating them donates a
        copy instead (runtime.worker.pins). A copy onto this host's own devices is made here, in order,
        into fresh buffers: a copy never shares buffers with its source. A send that fails, here
        or while streaming, fails its destination at once, naming the source and the cause.
        """
        if send.source_slice_id in self._foreign:
            return  # another host of the island holds the array
        try:
            value = self.store.get(send.array_id, self.input_timeout_s)
            if not value.is_fully_addressable:
                value = self._gather(value, send, sequence)
                if value is None:
                    return  # the slice's first host sends it
            if self._is_local_copy(send):
                mesh, _ = self.mesh(send.destination.sharding.slice_id, SLICE_TIMEOUT_S)
                sharding = NamedSharding(mesh, _wire.spec_from_proto(send.destination.sharding))
                self.store.set(send.destination.array_id,
                               jax.device_put(value, sharding, may_alias=False))
                return
            if isinstance(value, jax.Array):
                self._pins.pin(value)
            try:
                self._transfers.submit(self._stream, value, send)
            except RuntimeError:  # the host is stopping
                self._pins.unpin(value)
                raise
        except Exception as exc:
            self._fail_destination(send, exc, set())

    def _is_local_copy(self, send: pb.SendInstruction) -> bool:
        """Whether the destination lies entirely on this host's devices."""
        info = send.destination_slice
        return bool(info.devices) and all(d.host == self.host for d in info.devices) and (
            len(info.host_addresses) > self.host
            and info.host_addresses[self.host] == self.address)

    def _gather(self, value: jax.Array, send: pb.SendInstruction,
                sequence: int) -> np.ndarray | None:
        """The whole of an array whose shards lie on several hosts, on the source slice's first
        host (None on the others). When the first host's shards already make up the array
        (replicated over the hosts), from them; else every host of the slice runs, at the same
        place in the island's order, a computation replicating the array over the slice, whose
        collectives span the hosts (and whose hang, if a host never comes, the watchdog reports)."""
        mesh, info = self.mesh(send.source_slice_id)
        first = min(d.host for d in info.devices)
        first_holds = _held_by(value, [d for d, where in zip(mesh.devices.flat, info.devices)
                                       if where.host == first])
        if first_holds is not None:  # the first host holds all of it (replicated over the hosts)
            return first_holds() if self.host == first else None
        self._inflight.drain()  # collectives: the only execution in flight
        self._activity = ("running", f"gather of array {send.array_id} for a transfer", sequence,
                          0, time.monotonic(), send.source_slice_id)
        try:
            replicated = _replicator(NamedSharding(mesh, PartitionSpec()))(value)
            replicated.block_until_ready()
        except Exception as exc:
            raise ExecutionError(f"gathering array {send.array_id} on host "
                                 f"{self.island}.{self.host} for a transfer failed: {exc}") from exc
        if self.host != min(d.host for d in info.devices):
            return None
        return np.asarray(replicated.addressable_data(0))

    def _stream(self, value: jax.Array | np.ndarray, send: pb.SendInstruction) -> None:
        """Streams a captured source to each host of the destination slice, then lets it go."""
        dest, info = send.destination, send.destination_slice
        delivered: set[int] = set()
        try:
            full = None
            for host, address in enumerate(info.host_addresses):
                positions = [p for p, d in enumerate(info.devices) if d.host == host]
                if not positions:
                    continue
                full = np.asarray(value) if full is None else full
                groups = _wire.shard_groups(dest.shape, _wire.MeshShape(
                    tuple(info.mesh_shape), tuple(info.axis_names)), dest.sharding)
                shards = [(index, [p for p in ps if p in positions], full[_wire.as_slices(index)])
                          for index, ps in groups if set(ps) & set(positions)]
                if not self._put_shared(address, dest, shards):
                    self._peer(address).PutArray(_wire.iter_chunks(dest, shards),
                                                 timeout=TRANSFER_TIMEOUT_S)
                delivered.add(host)
        except Exception as exc:
            self._fail_destination(send, exc, delivered)
        finally:
            if isinstance(value, jax.Array):
                self._pins.unpin(value)

    def _fail_destination(self, send: pb.SendInstruction, cause: Exception,
                          delivered: set[int]) -> None:
        """Fails the copy on every destination host not yet `delivered`: readers get an
        ExecutionError naming the source and `cause` at once, instead of waiting for data that
        will not come. A host that cannot be told is lost: the controller reports it."""
        dest, info = send.destination, send.destination_slice
        if isinstance(cause, grpc.RpcError):
            reason = f"{cause.code().name}: {cause.details()}"
        else:
            reason = str(cause) or type(cause).__name__
        message = (f"transfer of array {send.array_id} from host {self.island}.{self.host} to "
                   f"array {dest.array_id} on slice {dest.sharding.slice_id} failed: {reason}")
        log.warning("%s", message)
        for host, address in enumerate(info.host_addresses):
            if host in delivered or not any(d.host == host for d in info.devices):
                continue
            if address == self.address:
                self.store.fail(dest.array_id, ExecutionError(message), only_pending=True)
                continue
            try:
                self._peer(address).PutArray(iter([pb.ArrayChunk(spec=dest, error=message)]),
                                             timeout=SLICE_TIMEOUT_S)
            except grpc.RpcError as err:
                log.warning("could not tell host %s that %s: %s", address, message,
                            err.code().name)

    def _put_shared(self, address: str, dest: pb.ArraySpec, shards: list) -> bool:
        """Sends shards to a host on this machine through shared-memory files; False when that
        path is not open (another machine, or no room: the caller streams them instead)."""
        if not (_auth.is_loopback(address) and _wire.shared_memory_available()):
            return False
        try:
            with _wire.shared_chunks(dest, shards) as chunks:
                self._peer(address).PutArray(iter(chunks), timeout=TRANSFER_TIMEOUT_S)
        except OSError as exc:
            log.info("shared-memory transfer to %s not possible (%s): streaming it", address, exc)
            return False
        return True

    def _peer(self, address: str) -> pb_grpc.WorkerStub:
        with self._cond:
            stub = self._peers.get(address)
            if stub is None:
                channel = _auth.open_channel(address, self.credentials)
                stub = self._peers[address] = pb_grpc.WorkerStub(channel)
            return stub

    # -- data plane -------------------------------------------------------------------------------

    def put(self, chunks: Iterator[pb.ArrayChunk], timeout: float = SLICE_TIMEOUT_S) -> int:
        """Stores an array streamed in as chunks; returns the bytes received.

        Only an array the controller announced to this host (an Expect instruction), with the spec
        it announced, and only until it holds its data: anything else is refused
        (FailedPreconditionError; InvalidArgumentError for another spec), so every byte a host
        stores belongs to an array the controller accounts for and frees. Waits up to `timeout` s
        for the announcement and the definition of the array's slice."""
        chunks = iter(chunks)
        first = next(chunks, None)
        if first is None:
            raise InvalidArgumentError("empty array stream")
        if not first.HasField("spec"):
            raise InvalidArgumentError("array stream does not start with its spec")
        array_id = first.spec.array_id
        if first.error:  # the sender's array failed, or (from the controller) its island was lost
            self._fail_incoming(array_id, ExecutionError(first.error))
            return 0
        announced = self._claim(array_id, min(timeout, ANNOUNCE_TIMEOUT_S))
        try:
            if first.spec != announced:
                raise InvalidArgumentError(
                    f"array {array_id} was announced as {announced.dtype}"
                    f"{list(announced.shape)} on slice {announced.sharding.slice_id}; the stream "
                    f"says {first.spec.dtype}{list(first.spec.shape)} on slice "
                    f"{first.spec.sharding.slice_id}")
            return self._store_put(announced, first, chunks, timeout)
        finally:
            with self._cond:
                self._receiving.discard(array_id)

    def _fail_incoming(self, array_id: int, error: PathwaysError) -> None:
        """An announced array will not come: its entry fails (readers get `error`). One not
        announced yet (the announcement may still be on its way) fails on arrival; one that
        already holds its data, or was deleted, is left alone."""
        with self._cond:
            if self._announced.pop(array_id, None) is not None:
                self.store.fail(array_id, error, only_pending=True)
                self._note_arrival(array_id)
            elif not self.store.ready(array_id):
                self._failed_early[array_id] = error
                while len(self._failed_early) > MAX_FAILED_EARLY:
                    self._failed_early.popitem(last=False)

    def _claim(self, array_id: int, timeout: float) -> pb.ArraySpec:
        """The announced spec of an array about to be put, once announced (waiting up to
        `timeout` s); no other stream may put it meanwhile."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while array_id not in self._announced:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise FailedPreconditionError(
                        f"array {array_id} was not announced to host {self.island}.{self.host} "
                        f"by the controller (declare arrays before putting them), or it already "
                        f"holds its data")
                self._cond.wait(left)
            if array_id in self._receiving:
                raise FailedPreconditionError(f"array {array_id} is being put by another stream")
            self._receiving.add(array_id)
            return self._announced[array_id]

    def _settle(self, array_id: int, store: Callable[[], None]) -> None:
        """Runs `store` for a claimed array unless it was deleted meanwhile; no longer announced
        afterwards (a second put is refused)."""
        with self._cond:
            if self._announced.pop(array_id, None) is None:
                raise FailedPreconditionError(f"array {array_id} was deleted while it was put")
            store()
            self._note_arrival(array_id)

    def _note_arrival(self, array_id: int) -> None:
        """Logs that an announced array arrived or failed (under self._cond), for the progress
        stream."""
        self._arrivals_count += 1
        self._arrivals.append((self._arrivals_count, array_id))
        self._progress.set()

    def _store_put(self, spec: pb.ArraySpec, first: pb.ArrayChunk,
                   chunks: Iterator[pb.ArrayChunk], timeout: float) -> int:
        mesh, info = self.mesh(spec.sharding.slice_id, min(timeout, SLICE_TIMEOUT_S))
        shape = tuple(spec.shape)
        expected = dict(_wire.shard_groups(shape, _wire.MeshShape(tuple(info.mesh_shape),
                                                                  tuple(info.axis_names)),
                                           spec.sharding))
        _, shards = _wire.assemble_chunks(_at_most_shards(
            itertools.chain([first], chunks), len(expected), spec.array_id))
        flat_devices = mesh.devices.reshape(-1)
        local = [p for p, d in enumerate(info.devices) if d.host == self.host]
        placed: dict[int, jax.Array] = {}
        for shard in shards:
            if expected.get(shard.index) is None:
                raise InvalidArgumentError(f"shard {shard.index} does not belong to the sharding")
            for position in shard.positions:
                if position not in expected[shard.index]:
                    raise InvalidArgumentError(f"mesh position {position} does not hold {shard.index}")
                if info.devices[position].host != self.host:
                    raise InvalidArgumentError(f"mesh position {position} is on host "
                                               f"{info.devices[position].host}, not this one")
                if position in placed:
                    raise InvalidArgumentError(f"mesh position {position} is sent twice")
                placed[position] = jax.device_put(shard.data, flat_devices[position])
        if len(placed) != len(local):
            raise InvalidArgumentError(f"array {spec.array_id}: got shards for {len(placed)} of "
                                       f"the {len(local)} devices of this host")
        sharding = NamedSharding(mesh, _wire.spec_from_proto(spec.sharding))
        # Only this host's shards: on a slice spanning hosts the array is a global one.
        value = jax.make_array_from_single_device_arrays(shape, sharding,
                                                         [placed[p] for p in local])
        self._settle(spec.array_id, lambda: self.store.set(
            spec.array_id, value, sum(placed[p].nbytes for p in placed)))
        return sum(s.data.nbytes for s in shards)

    def get(self, request: pb.GetArrayRequest, limit: float = MAX_GET_TIMEOUT_S,
            active: Callable[[], bool] = lambda: True) -> Iterator[pb.ArrayChunk]:
        """Chunks of the requested (or all distinct) shards of an array, waiting for it if pending
        (up to the request's timeout, at most `limit` s: the caller's deadline; no longer once
        `active()` says the caller is gone: a cancelled read does not hold its thread)."""
        timeout = min(_limits.check_seconds(request.timeout_s, "timeout_s", MAX_GET_TIMEOUT_S),
                      max(limit, 0.0))
        deadline = time.monotonic() + timeout
        self.wait_received(request.after_sequence, timeout, active)
        while True:
            left = max(0.0, deadline - time.monotonic())
            try:
                value = self.store.get(request.array_id, min(left, CALLER_CHECK_S))
                break
            except DeadlineExceededError as exc:
                if not getattr(exc, "raised_by_store", False):
                    raise  # the producer's own failure
                if left <= CALLER_CHECK_S or not active():
                    raise DeadlineExceededError(f"array {request.array_id} was not produced "
                                                f"within {timeout:.1f} s") from None
        if request.ready_only:
            value.block_until_ready()
            return iter(())
        distinct: dict[_wire.Index, jax.Array] = {}
        for shard in value.addressable_shards:
            index = tuple((s.start or 0, value.shape[d] if s.stop is None else s.stop)
                          for d, s in enumerate(shard.index))
            distinct.setdefault(index, shard.data)
        wanted = [_wire.index_from_proto(i) for i in request.shards] or list(distinct)
        missing = [w for w in wanted if w not in distinct]
        if missing:
            raise NotFoundError(f"array {request.array_id}: shard {missing[0]} is not on this host")
        return _wire.iter_chunks(None, ((w, (), np.asarray(distinct[w])) for w in wanted))

    def info(self) -> pb.HostInfo:
        kind = self.devices[0].device_kind if self.devices else ""
        with self._cond:
            depth, received = len(self._pending), self._received
        state = self._activity
        return pb.HostInfo(island=self.island, host=self.host, address=self.address,
                           platform=self.platform, num_devices=len(self.devices), device_kind=kind,
                           state="hung" if self.hang else "alive", backend=self.backend,
                           queue_depth=depth, activity=self.activity,
                           device_memory_bytes=self.memory_bytes,
                           distributed_hosts=self.distributed_hosts, received=received,
                           executed=self.executed, hang=self.hang,
                           current_sequence=state[2] if len(state) > 2 else 0,
                           current_name=state[1] if len(state) > 1 else "",
                           ray_node=self.ray_node,
                           control_address=self.control_address)

    @property
    def activity(self) -> str:
        """What the executor is doing, e.g. "running step (#12, session 3) for 0.2 s"."""
        return describe_activity(self._activity, self.hang)

    @property
    def current(self) -> tuple:
        """The executor's state: (what, name, sequence, session, since, slice id), or ("idle",)."""
        return self._activity

    def watch_progress(self, min_interval_s: float, active) -> Iterator[pb.WatchProgressReply]:
        """Progress reports while `active()`: one as the executor moves on, at most one per
        `min_interval_s`, with the executions completed since the previous one; one a second
        when idle, so the stream stays alive."""
        interval = _limits.check_seconds(min_interval_s, "min_interval_s", 1.0)
        timeline = self._inflight.timeline
        reported = timeline[-1][0] if timeline else 0  # last sequence reported
        arrivals_reported = 0  # every arrival still kept: the controller ignores old ones
        while active() and not self._stopped:
            self._progress.wait(1.0)
            self._progress.clear()
            fresh = _entries_after(timeline, reported)
            if fresh:
                reported = fresh[-1][0]
            arrived = _entries_after(self._arrivals, arrivals_reported)
            if arrived:
                arrivals_reported = arrived[-1][0]
            completed = [pb.CompletedExecution(sequence=e[0], seconds=e[5] - e[4])
                         for e in fresh]
            with self._cond:
                received = self._received
            yield pb.WatchProgressReply(received=received, executed=self.executed,
                                        completed=completed, hang=self.hang,
                                        arrived=[a for _, a in arrived])
            if interval:
                time.sleep(interval)

    @property
    def timeline(self) -> list[ExecutionRecord]:
        """Timestamps of the most recent executions, oldest first."""
        return [ExecutionRecord(*entry) for entry in list(self._inflight.timeline)]

    def stop(self) -> None:
        """Stops the executor and fails every wait on this host's arrays (no thread stays blocked)."""
        _metrics_state.untrack(self)
        with self._cond:
            self._stopped = True
            self._cond.notify_all()
        self._progress.set()
        self._reaper.put(None)
        if self.admission is not None:
            self.admission.stop()
        wait_s = 0.5 if self.hang else 5  # a stuck execution never returns
        self._inflight.stop(timeout=wait_s)
        if self._watchdog is not None:
            self._watchdog.stop()
        self.store.clear()
        self._thread.join(timeout=wait_s)
        self._transfers.shutdown(wait=False, cancel_futures=True)
        # Threads still inside gRPC or XLA when the interpreter exits can abort the process: wait
        # (boundedly) for the senders, whose calls all have deadlines.
        deadline = time.monotonic() + wait_s
        for thread in list(getattr(self._transfers, "_threads", ())):
            thread.join(max(0.0, deadline - time.monotonic()))


def _entries_after(log: collections.deque, cursor: int) -> list[tuple]:
    """The entries of an append-only log of (increasing number, ...) tuples numbered above
    `cursor`, oldest first. Writers append meanwhile: it walks back from the end by index (each
    read is atomic), skipping entries seen twice as the end moves."""
    fresh: list[tuple] = []
    back = 1
    while back <= len(log):
        try:
            entry = log[-back]
        except IndexError:
            break
        if entry[0] <= cursor:
            break
        if not fresh or entry[0] < fresh[-1][0]:
            fresh.append(entry)
        back += 1
    fresh.reverse()
    return fresh


def _at_most_shards(chunks: Iterator[pb.ArrayChunk], most: int,
                    array_id: int) -> Iterator[pb.ArrayChunk]:
    """`chunks`, refusing a stream with more shard headers than the array has distinct shards
    (zero-size shards cost a sender nothing; each one costs the host a buffer)."""
    headers = 0
    for chunk in chunks:
        if chunk.HasField("shard"):
            headers += 1
            if headers > most:
                raise InvalidArgumentError(f"array {array_id}: more than its {most} distinct "
                                           f"shards in one stream")
        yield chunk
def fresh_instructions(instructions: Sequence[pb.Instruction], next_sequence: int,
                       pending: Container[int]) -> list[tuple[str, pb.Instruction]]:
    """The instructions of a Dispatch batch a host has not received before (none below
    `next_sequence` nor in `pending`: a resend), each with its kind. InvalidArgumentError for a
    non-positive sequence number or an instruction without an operation."""
    fresh = []
    for ins in instructions:
        if ins.sequence <= 0:
            raise InvalidArgumentError(f"instruction sequence {ins.sequence} is not positive")
        if ins.sequence < next_sequence or ins.sequence in pending:
            continue  # a resend of something already received
        kind = ins.WhichOneof("op")
        if kind is None:
            raise InvalidArgumentError(f"instruction {ins.sequence} has no operation")
        fresh.append((kind, ins))
    return fresh


def receive_order_free(host, fresh: Sequence[tuple[str, pb.Instruction]], now: float) -> None:
    """The order-free part of receiving instructions (`fresh_instructions`), done at once: pending
    entries for the outputs of executions and for expected arrays (so reads and puts can start),
    slice definitions, which slice each executable runs on, and arrival times. Shared by real and
    simulated hosts (runtime.sim); `host` has the attributes used here. Returns the specs of the
    arrays announced to this host (Expect instructions), which it will accept puts of."""
    announced = []
    for kind, ins in fresh:
        if kind == "execute":
            if host._executable_slices.get(ins.execute.executable_id) not in host._foreign:
                host._arrival[ins.sequence] = now
                for out in ins.execute.outputs:
                    host.store.expect(out)
                if host.hang:  # the executor is stuck: this will never run
                    host._fail_outputs(ins.execute, DeadlineExceededError(host.hang))
        elif kind == "define_slice":
            host._define_slice(ins.define_slice.slice)
        elif kind == "load":
            host._executable_slices[ins.load.executable_id] = ins.load.slice_id
        elif kind == "expect":
            if ins.expect.spec.sharding.slice_id not in host._foreign:
                host.store.expect(ins.expect.spec.array_id)
                announced.append(ins.expect.spec)
    return announced


def describe_activity(state: tuple, hang: str) -> str:
    """An executor's state (what, name, sequence, session, since, slice id), or ("idle",), as
    status shows it: e.g. "running step (#12, session 3) for 0.2 s"; "stuck: ..." once hung."""
    if len(state) < 6:
        return state[0]
    what, name, sequence, session, since, _ = state
    where = f"#{sequence}, session {session}" if session else f"#{sequence}"
    text = (f"{what} {name} ({where}) for {time.monotonic() - since:.1f} s" if sequence
            else f"{what} {name} for {time.monotonic() - since:.1f} s")
    return f"stuck: {text}" if hang else text


def _reap(doomed: queue.SimpleQueue) -> None:
    """Drops the arrays put on `doomed` (None stops it)."""
    while doomed.get() is not None:
        pass


def _host_nbytes(value: pb.ValueSpec, info: pb.SliceInfo, host: int) -> int:
    """Bytes a value of this spec occupies on one host's devices of the slice."""
    shape = tuple(value.shape)
    groups = _wire.shard_groups(shape, _wire.MeshShape(tuple(info.mesh_shape),
                                                       tuple(info.axis_names)), value.sharding)
    itemsize = _wire.dtype_from_name(value.dtype).itemsize
    on_host = {p for p, d in enumerate(info.devices) if d.host == host}
    return sum(int(np.prod(_wire.shard_shape(index), dtype=np.int64)) * itemsize
               * len(on_host.intersection(positions)) for index, positions in groups)


def _held_by(value: jax.Array, devices: Sequence[jax.Device]
             ) -> Callable[[], np.ndarray] | None:
    """When the shards on `devices` make up the whole of `value`: a function assembling it (to
    call where those devices are local); else None. Decided from the sharding alone, so every
    host of the slice decides alike."""
    wanted = set(devices)
    parts: dict[tuple, jax.Device] = {}
    for device, index in value.sharding.devices_indices_map(value.shape).items():
        if device in wanted:
            bounds = tuple(part.indices(size)[:2] for part, size in zip(index, value.shape))
            parts.setdefault(bounds, device)
    covered = sum(math.prod(b - a for a, b in bounds) for bounds in parts)
    if covered != math.prod(value.shape):  # disjoint shards: covering is adding up
        return None

    def assemble() -> np.ndarray:
        local = {shard.device: shard.data for shard in value.addressable_shards}
        whole = np.empty(value.shape, value.dtype)
        for bounds, device in parts.items():
            whole[tuple(slice(a, b) for a, b in bounds)] = np.asarray(local[device])
        return whole
    return assemble


@functools.lru_cache(maxsize=64)
def _replicator(sharding: NamedSharding) -> Callable[[jax.Array], jax.Array]:
    """A compiled identity whose output is laid out as `sharding` (one per sharding)."""
    return jax.jit(lambda v: v, out_shardings=sharding)


def _compile(load: pb.LoadInstruction, mesh: Mesh):
    """Deserializes StableHLO and compiles it for the mesh's devices."""
    if hashlib.sha256(load.serialized).hexdigest() != load.fingerprint:
        raise InvalidArgumentError(f"{load.name}: serialized bytes do not match their fingerprint")
    try:
        exported = jax.export.deserialize(bytearray(load.serialized))
    except Exception as exc:
        raise InvalidArgumentError(f"{load.name}: not a serialized jax.export module: {exc}") from exc
    in_shardings = tuple(NamedSharding(mesh, _wire.spec_from_proto(v.sharding)) for v in load.inputs)
    out_shardings = tuple(NamedSharding(mesh, _wire.spec_from_proto(v.sharding))
                          for v in load.outputs)
    avals = [jax.ShapeDtypeStruct(tuple(v.shape), _wire.dtype_from_name(v.dtype), sharding=s)
             for v, s in zip(load.inputs, in_shardings)]
    fn = jax.jit(exported.call, in_shardings=in_shardings, out_shardings=out_shardings,
                 donate_argnums=tuple(load.donated))
    return fn.lower(*avals).compile()


def _compile_stablehlo(load: pb.LoadInstruction, mesh: Mesh) -> _stablehlo.StableHLOExecutable:
    """Compiles a StableHLO module with the client's options for the mesh's devices
    (proto.stablehlo), its outputs laid out as the load's output specs."""
    if _stablehlo.fingerprint(load.serialized, load.compile_options) != load.fingerprint:
        raise InvalidArgumentError(f"{load.name}: module bytes do not match their fingerprint")
    executable = _stablehlo.compile_module(load.serialized, load.compile_options,
                                           list(mesh.devices.flat))
    in_shardings, out_shardings = ([NamedSharding(mesh, _wire.spec_from_proto(v.sharding))
                                    for v in values] for values in (load.inputs, load.outputs))
    _stablehlo.check_shardings(executable, load.name, in_shardings, out_shardings,
                               [len(v.shape) for v in load.inputs],
                               [len(v.shape) for v in load.outputs])
    return _stablehlo.StableHLOExecutable(
        executable, out_shardings,
        [(tuple(v.shape), _wire.dtype_from_name(v.dtype)) for v in load.outputs])


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
        return pb.DispatchReply(received=received, executed=self.worker.executed)

    def PutArray(self, request_iterator, context):
        try:
            nbytes = self.worker.put(request_iterator, _time_left(context, SLICE_TIMEOUT_S))
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
            yield from self.worker.get(request, _time_left(context, MAX_GET_TIMEOUT_S),
                                       context.is_active)
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
            yield from self.worker.watch_progress(request.min_interval_s, context.is_active)
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
HOST_METHODS = ("Dispatch", "WatchProgress")
#: Client calls that hold a thread while they wait, bounded per session and cancelled when idle
#: (proto.admission).
LIMITED_METHODS = ("PutArray", "GetArray", "GetTimeline")
#: Threads of the control server: a few progress streams, dispatches and pings at a time.
CONTROL_THREADS = 8


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

    def guard(host_methods):
        return CountingInterceptor(_auth.ServerGuard(
            credentials.token, host_token=credentials.host_token, host_methods=host_methods,
            authorize=_auth.array_owner_policy(lambda: worker._controller_id),
            screen=lambda method, request: _limits.check_request(worker.limits, method, request)),
            "worker", worker.island, worker.host)

    servicer = WorkerServicer(worker)

    def add(server):
        pb_grpc.add_WorkerServicer_to_server(servicer, server)

    admission = Admission(f"host {worker.island}.{worker.host}", LIMITED_METHODS, worker.limits,
                          lambda: worker._controller_id, credentials.host_token,
                          per_session=worker.limits.streams_per_session)
    worker.admission = admission
    server, port = _auth.start_server("worker", address, credentials,
                                      Chain(guard(HOST_METHODS), admission), add,
                                      max_workers=max_workers)
    every = [m.name for m in pb.DESCRIPTOR.services_by_name["Worker"].methods]
    try:
        control, control_port = _auth.start_server("worker control", f"{host}:0", credentials,
                                                   guard(every), add,
                                                   max_workers=CONTROL_THREADS)
    except BaseException:
        server.stop(None)
        raise
    worker.address = f"{host}:{port}"
    worker.control_address = f"{host}:{control_port}"
    return ServerGroup([server, control]), port
