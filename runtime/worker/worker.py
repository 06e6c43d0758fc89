"""A worker host: owns local devices, compiles StableHLO, stores arrays, runs its island's order.

The controller streams numbered instructions to every host of an island. A host does the cheap,
order-free part of each instruction when it arrives (defining meshes, creating pending entries for
outputs, so reads and puts can start), and runs the rest strictly in sequence order on one executor
thread. An execution with collectives is the only one in flight: several sharded executions with
collectives in flight at once can deadlock XLA's CPU rendezvous; one without may overlap the next
(runtime.worker.inflight). Either way executions start in the island's order, which is what gang
scheduling needs.

On a multi-host island (runtime.worker.distributed) a slice may span hosts: each host builds the
global mesh, holds only its own shards, and launches each computation on its devices in the island's
order; a host that holds no device of a slice skips that slice's work. If the hosts of a slice do
not all reach a computation (an order broken from outside, an input that never arrives), the ones
that did wait in its collectives forever: past `execution_deadline_s` a watchdog asks the slice's
other hosts where they are and fails the computation with a report naming who reached it and who
did not (runtime.worker.hang).

The host receives the order itself (here and runtime.worker.intake) and is composed of parts,
each built with what it uses of the host and reached as an attribute: the ordered executor
(`executor`: runtime.worker.executor, its state in runtime.worker.state), the announced puts
(`announcements`: runtime.worker.announced), the data plane (`dataplane`:
runtime.worker.dataplane) and host-to-host transfers (runtime.worker.transfers); the gRPC face
(runtime.worker.servicer) calls the part that owns each call.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
import uuid
from collections.abc import Callable, Iterator, Sequence

import jax
import numpy as np
from jax.sharding import Mesh

from proto import auth as _auth
from proto import limits as _limits
from proto import pathways_pb2 as pb
from proto import shm as _shm
from proto.admission import Admission
from proto.config import TransferConfig, from_env
from proto.errors import (DeadlineExceededError, FailedPreconditionError, InvalidArgumentError,
                          NotFoundError, PathwaysError)
from runtime import metrics_state as _metrics_state
from runtime.metrics import HostMetrics
from runtime.worker.announced import Announcements
from runtime.worker.dataplane import DataPlane
from runtime.worker.defaults import CALLER_CHECK_S, EXECUTION_DEADLINE_S, INPUT_TIMEOUT_S
from runtime.worker.distributed import device_memory_bytes
from runtime.worker.executor import Executor
from runtime.worker.forward import Forwarder
from runtime.worker.hang import HangWatchdog
from runtime.worker.inflight import InFlight
from runtime.worker.intake import fresh_instructions, receive_order_free
from runtime.worker.state import (ExecutionRecord, ExecutorState, current_state,
                                  describe_activity, entries_after)
from runtime.worker.store import ArrayStore
from runtime.worker.transfers import Transfers

log = logging.getLogger(__name__)


class Worker:
    """One host: receives its island's order, which its `executor` applies; puts and gets go to
    its `dataplane`. Instantiable: tests run several in one process.

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
        self.incarnation = uuid.uuid4().hex  # this host object's: tells a restart apart
        self.credentials = credentials or _auth.Credentials()
        self.forwarder = Forwarder(self.credentials)  # the island's fan-out tree
        self.last_contact = time.monotonic()  # of the controller's last ping or dispatch
        self.input_timeout_s = input_timeout_s
        self.execution_deadline_s = execution_deadline_s
        self.devices = list(devices)
        self.island_devices = [list(d) for d in island_devices] if island_devices else None
        self.memory_bytes = device_memory_bytes(self.devices)
        # Memory for the device buffers of this process's first puts and copies, faulted in now
        # rather than on their way.
        _shm.reserve_memory(from_env(TransferConfig).host_reserve_bytes)
        self.platform, self.backend = platform, backend
        self.ray_node = ""  # the Ray node of a host placed by Ray (runtime.cluster.ray_host)
        self.address = ""
        self.control_address = ""  # the control server's (create_worker_server)
        self.admission: Admission | None = None
        self.store = ArrayStore()
        self._progress = threading.Event()  # set as the executor moves on (WatchProgress)
        # Arrays the controller announced (Expect) whose data may be put, and those being put now:
        # a put of anything else is refused, so every stored byte is one the controller knows of.
        # Used under self._cond.
        # A report that should not wait out the stream's interval (an array's data arrived: work
        # for it waits in its client's queue until the controller hears; a hang).
        self._report_now = threading.Event()
        self.announcements = Announcements(self.store, on_arrival=self.report_soon)
        self._arrival: dict[int, float] = {}  # sequence -> time.time() of receipt
        self._slices: dict[int, tuple[Mesh | None, pb.SliceInfo]] = {}
        self._foreign: set[int] = set()  # slices with no device on this host
        self._executable_slices: dict[int, int] = {}  # executable id -> slice id, on receipt
        self._pending: dict[int, pb.Instruction] = {}
        self._received = 0
        self._next = 1
        self._controller_id = ""
        self._epoch = 0  # of the island's order (runtime.controller.controller: island restarts)
        # What the executor is doing (read by status, the progress stream and the watchdog).
        self.state = ExecutorState()
        self._cond = threading.Condition()
        self._stopped = False
        self._transfers = Transfers(self)
        self.dataplane = DataPlane(island, host, cond=self._cond, store=self.store,
                                   announcements=self.announcements, mesh=self.mesh,
                                   wait_received=self.wait_received)
        self.metrics = HostMetrics(island, host)
        self._inflight = InFlight(self.store, f"{island}.{host}", self._progress.set,
                                  on_record=self.metrics.execution)
        # Freeing a device buffer can wait for the computations still using it: the executor
        # hands deleted arrays to this thread, which drops them, instead of waiting itself.
        self._reaper: queue.SimpleQueue = queue.SimpleQueue()
        threading.Thread(target=_reap, args=(self._reaper,), daemon=True,
                         name=f"reaper-{island}.{host}").start()
        self.executor = Executor(
            island, host, take=self._take, cond=self._cond, pending=self._pending,
            arrival=self._arrival, slices=self._slices, foreign=self._foreign,
            executable_slices=self._executable_slices, mesh=self.mesh, store=self.store,
            announcements=self.announcements, state=self.state, progress=self._progress,
            inflight=self._inflight, transfers=self._transfers, reap=self._reaper.put,
            input_timeout_s=input_timeout_s)
        self._thread = threading.Thread(target=self.executor.run,
                                        name=f"executor-{island}.{host}", daemon=True)
        self._thread.start()
        self._watchdog = HangWatchdog(self) if execution_deadline_s > 0 else None
        _metrics_state.track(self, "worker")

    @property
    def executions(self) -> int:
        """Executions completed since start."""
        return self._inflight.executions

    @property
    def hang(self) -> str:
        """The report of a computation that ran past its deadline ("" while none has)."""
        return self.state.hang

    @property
    def executed(self) -> int:
        """The last sequence number of the island's order applied."""
        return self.state.executed

    @property
    def controller_id(self) -> str:
        """The incarnation of the controller whose order this host runs ("" before the first)."""
        return self._controller_id

    def holds_slice(self, slice_id: int) -> bool:
        """Whether a slice is defined here and has devices on this host."""
        entry = self._slices.get(slice_id)
        return entry is not None and entry[0] is not None

    def slice_info(self, slice_id: int) -> pb.SliceInfo | None:
        """The definition of a slice this host has received (None: not defined here)."""
        entry = self._slices.get(slice_id)
        return None if entry is None else entry[1]

    @property
    def distributed_hosts(self) -> int:
        """Hosts of this host's distributed island (0: not part of one)."""
        return len(self.island_devices) if self.island_devices else 0

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
            self.announcements.announce(announced)
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
        self._received, self._next, self.state.executed = 0, 1, 0
        self.announcements.clear()
        self._arrival.clear()
        self._slices.clear()
        self._foreign.clear()
        self._executable_slices.clear()
        self.executor.forget_loaded()
        self._transfers.early.clear()  # its sequence numbers were the old order's
        self.store.clear()

    def _take(self) -> pb.Instruction | None:
        """The next instruction of the island's order, for the executor, once it has arrived
        (None once the host stops)."""
        with self._cond:
            while self._next not in self._pending and not self._stopped:
                self._cond.wait(1.0)
            if self._stopped:
                return None
            ins = self._pending.pop(self._next)
            self._next += 1
            self.state.instruction = ins
            return ins

    def _fail_outputs(self, ex: pb.ExecuteInstruction, error: PathwaysError) -> None:
        """Fails an execution's outputs (at receipt, on a hung host: runtime.worker.intake)."""
        self.executor.fail_outputs(ex, error)

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

    def info(self) -> pb.HostInfo:
        kind = self.devices[0].device_kind if self.devices else ""
        with self._cond:
            depth, received = len(self._pending), self._received
        state = self.state.activity
        return pb.HostInfo(island=self.island, host=self.host, address=self.address,
                           platform=self.platform, num_devices=len(self.devices), device_kind=kind,
                           state="hung" if self.hang else "alive", backend=self.backend,
                           queue_depth=depth, activity=self.activity,
                           device_memory_bytes=self.memory_bytes,
                           distributed_hosts=self.distributed_hosts, received=received,
                           executed=self.executed, hang=self.hang,
                           current_sequence=state[2] if len(state) > 2 else 0,
                           current_name=state[1] if len(state) > 1 else "",
                           current_state=current_state(state),
                           ray_node=self.ray_node,
                           control_address=self.control_address, incarnation=self.incarnation,
                           data_port=self.dataplane.bulk.port if self.dataplane.bulk else 0)

    @property
    def activity(self) -> str:
        """What the executor is doing, e.g. "running step (#12, session 3) for 0.2 s"."""
        return describe_activity(self.state.activity, self.hang)

    @property
    def current(self) -> tuple:
        """The executor's state: (what, name, sequence, session, since, slice id), or ("idle",)."""
        return self.state.activity

    def report_soon(self) -> None:
        """Sends the next progress report now, not after the stream's interval (an arrival, a
        hang: what the controller waits on rather than merely counts)."""
        self._report_now.set()
        self._progress.set()

    def watch_progress(self, request: pb.WatchProgressRequest, active
                       ) -> Iterator[pb.WatchProgressReply]:
        """Progress reports while `active()`: one as the executor moves on, at most one per
        `min_interval_s` (sooner after `report_soon`), with the executions completed since the
        previous one; one per `idle_interval_s` when idle. The stream is the controller's: each
        report it takes counts as the controller's contact (runtime.worker.membership), as a Ping
        would."""
        interval, idle = _limits.report_intervals(request)
        timeline = self._inflight.timeline
        reported = timeline[-1][0] if timeline else 0  # last sequence reported
        arrivals_reported = 0  # every arrival still kept: the controller ignores old ones
        while active() and not self._stopped:
            self._progress.wait(idle)
            self._progress.clear()
            self._report_now.clear()
            fresh = entries_after(timeline, reported)
            if fresh:
                reported = fresh[-1][0]
            arrivals_reported, arrived = self.announcements.after(arrivals_reported)
            now = time.time()
            completed = [pb.CompletedExecution(sequence=e[0], seconds=e[5] - e[4],
                                               started_ago_s=now - e[4]) for e in fresh]
            with self._cond:
                received = self._received
            yield pb.WatchProgressReply(received=received, executed=self.executed,
                                        completed=completed, hang=self.hang,
                                        arrived=arrived)
            self.last_contact = time.monotonic()
            if interval:
                self._report_now.wait(interval)

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
        self._report_now.set()
        self._reaper.put(None)
        if self.admission is not None:
            self.admission.stop()
        wait_s = 0.5 if self.hang else 5  # a stuck execution never returns
        self._inflight.stop(timeout=wait_s)
        if self._watchdog is not None:
            self._watchdog.stop()
        self.store.clear()
        self._thread.join(timeout=wait_s)
        self._transfers.stop(wait_s)
        self.forwarder.close()


def _reap(doomed: queue.SimpleQueue) -> None:
    """Drops the arrays put on `doomed` (None stops it), then has JAX let go of the host memory
    their device buffers aliased: it queues those references and drops them only when asked (or
    at Python's next garbage collection, which a server may not run for long), and until then
    that memory cannot go back to the pool of warm buffers (proto.buffers) for the next put."""
    collect = _jax_collect_garbage()
    while doomed.get() is not None:
        if doomed.empty():
            collect()


def _jax_collect_garbage() -> Callable[[], None]:
    """jaxlib's own release of the Python references its freed buffers held (what its hook on
    Python's garbage collector calls); a no-op where this jaxlib has none."""
    try:
        from jax._src.lib import _jax
        return _jax.collect_garbage
    except (ImportError, AttributeError):
        return lambda: None
