"""A simulated worker host: the island's order, run strictly in sequence on devices that do not
compute.

It keeps a real host's contract (runtime.worker.worker): instructions arrive numbered; the order-free
part of each is done on receipt (slice definitions, pending entries for outputs, so reads and puts
can start); the rest runs strictly in sequence on one executor. Where a real host launches XLA, a
simulated one holds its devices for the computation's duration (runtime.sim._cost) on an asyncio
timer: no CPU is used while a computation "runs", so many hosts share one process and its cores.

Simulated time: a computation starts when its devices are free, its instruction has arrived, its
inputs exist and (on a slice spanning hosts) every host of the slice has reached it
(runtime.sim._rendezvous); it ends its duration later. The timeline records those times. The
executor wakes at the end (a timer may fire a millisecond late; the next computation still starts
at the simulated end, when it was already there), so the devices' time is exact while messages
(progress reports, reads) carry the host's real delays. A host whose slice partners never come
is reported hung after `execution_deadline_s`, as a real host's watchdog reports it (runtime.worker.hang).
"""

from __future__ import annotations

import asyncio
import collections
import logging
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterator, Sequence

from proto import auth as _auth
from proto import limits as _limits
from proto import pathways_pb2 as pb
from proto import transfer as _transfer
from proto import wire as _wire
from proto.errors import (DeadlineExceededError, ExecutionError, FailedPreconditionError,
                          InvalidArgumentError, NotFoundError, PathwaysError)
from runtime.sim._arrays import SimArray, SimStore, receive_shards
from runtime.sim._config import SimConfig
from runtime.sim._cost import CostModel
from runtime.sim._executable import Executable, Layout
from runtime.sim._rendezvous import Rendezvous
from runtime.sim._signal import Signal, wait_done
from runtime.worker.announced import Announcements, check_as_announced
from runtime.worker.defaults import ANNOUNCE_TIMEOUT_S, MAX_GET_TIMEOUT_S, SLICE_TIMEOUT_S
from runtime.worker.executor import check_runnable, execution_error
from runtime.worker.hang import diagnose
from runtime.worker.intake import fresh_instructions, receive_order_free
from runtime.worker.state import current_state, describe_activity

log = logging.getLogger(__name__)

_IDLE = ("idle",)


class SimHost:
    """One simulated host of an island; everything runs on the process's event loop.

    `rendezvous` is shared by the island's hosts, `costs` by the process's; `peer(h)` is host h of
    the same island (in this process), for gathering an array before a transfer.
    """

    def __init__(self, island: int, host: int, config: SimConfig, *, island_size: int,
                 rendezvous: Rendezvous, costs: CostModel,
                 peer: Callable[[int], SimHost | None] = lambda h: None,
                 credentials: _auth.Credentials | None = None) -> None:
        self.island, self.host, self.config = island, host, config
        self.island_size = island_size
        self.rendezvous, self.costs, self.peer = rendezvous, costs, peer
        self.credentials = credentials or _auth.Credentials()
        self.execution_deadline_s = config.execution_deadline_s  # read by runtime.worker.hang.diagnose
        self.address = ""
        self.last_contact = time.monotonic()  # of the controller's last ping or dispatch
        self.incarnation = uuid.uuid4().hex  # a new one in a restarted process
        self.store = SimStore()
        self.timeline: collections.deque[tuple] = collections.deque(maxlen=config.timeline_length)
        self.executions = 0
        self.hang = ""
        self.arrived = Signal()  # instructions arrived (the executor, reads and puts wait on it)
        self.progress = Signal()  # the executor moved on (WatchProgress)
        self.transfers = None  # set by the process: sends arrays to other hosts (runtime.sim._send)
        self._controller_id, self._epoch = "", 0
        self._task: asyncio.Task | None = None
        self._stopped = False
        self._clear()

    def _clear(self) -> None:
        self._pending: dict[int, pb.Instruction] = {}
        self._received, self._next, self.executed = 0, 1, 0
        self._arrival: dict[int, float] = {}
        self._slices: dict[int, pb.SliceInfo] = {}
        self._foreign: set[int] = set()
        self._executable_slices: dict[int, int] = {}
        self._executables: dict[int, Executable] = {}
        self._device_free = 0.0  # simulated end of the last computation
        self.announcements = Announcements(self.store)
        self._activity: tuple = _IDLE
        self._current: pb.Instruction | None = None

    def start(self) -> None:
        """Starts the executor (on the running event loop)."""
        self._task = asyncio.get_running_loop().create_task(self._run())

    # -- receipt ----------------------------------------------------------------------------------

    def receive(self, controller_id: str, instructions: Sequence[pb.Instruction],
                epoch: int = 0) -> int:
        """Queues instructions of the island's order; returns the highest sequence received."""
        now = time.time()
        if (controller_id, epoch) != (self._controller_id, self._epoch):
            self._reset(controller_id, epoch)
        fresh = fresh_instructions(instructions, self._next, self._pending)
        self.announcements.announce(receive_order_free(self, fresh, now))
        for _, ins in fresh:
            self._pending[ins.sequence] = ins
            self._received = max(self._received, ins.sequence)
        if fresh:  # not for the heartbeat's empty Dispatch (scheduler.delivery's keep_alive)
            self.arrived.fire()
        return self._received

    def take(self, controller_id: str, instructions: Sequence[pb.Instruction], epoch: int
             ) -> int:
        """A batch of the island's order from the controller, directly or through the fan-out
        tree (it counts as the controller's contact): `receive`."""
        self.last_contact = time.monotonic()
        return self.receive(controller_id, instructions, epoch)

    def dispatch(self, request: pb.DispatchRequest, timeout: float) -> pb.DispatchReply:
        """A Dispatch: takes the batch in, passes it on down the island's fan-out tree (returns
        at once, `timeout` s for each forwarded call) and answers where this host stands."""
        received = self.take(request.controller_id, request.instructions, request.epoch)
        forwarded = []
        if self.transfers is not None:
            forwarded = self.transfers.forward(self, request, timeout)
        return pb.DispatchReply(received=received, executed=self.executed, forwarded=forwarded)

    @property
    def stopped(self) -> bool:
        """Whether `stop` was called: the host answers nothing more."""
        return self._stopped

    def _reset(self, controller_id: str, epoch: int) -> None:
        """A new controller incarnation or island epoch: the order starts afresh."""
        if self._controller_id:
            log.warning("sim host %d.%d: new controller incarnation or island epoch %d, dropping "
                        "state", self.island, self.host, epoch)
        self._controller_id, self._epoch = controller_id, epoch
        if self._task is not None:
            self._task.cancel()
        self.rendezvous.leave(self.host)
        self.store.clear()
        self._clear()
        if self._task is not None and not self._stopped:
            self.start()

    def _define_slice(self, info: pb.SliceInfo) -> None:
        hosts = {d.host for d in info.devices}
        if any(d.host < 0 or d.host >= self.island_size or d.device < 0
               or d.device >= self.config.devices_per_host for d in info.devices):
            raise InvalidArgumentError(f"slice {info.slice_id} names a device island "
                                       f"{self.island} lacks")
        self._slices[info.slice_id] = info
        if self.host in hosts:
            self._foreign.discard(info.slice_id)
        else:
            self._foreign.add(info.slice_id)

    async def wait_received(self, sequence: int, timeout: float) -> None:
        """Waits until instructions up to `sequence` of the island's order have arrived."""
        deadline = time.monotonic() + timeout
        while self._received < sequence:
            left = deadline - time.monotonic()
            if left <= 0:
                raise DeadlineExceededError(
                    f"host {self.island}.{self.host} has not received instruction #{sequence} "
                    f"within {timeout:.1f} s (received up to #{self._received})")
            await self.arrived.wait(self.arrived.version, left)

    async def slice_info(self, slice_id: int, timeout: float = 0.0) -> pb.SliceInfo:
        """A slice's definition, waiting up to `timeout` s for it to arrive."""
        deadline = time.monotonic() + timeout
        while slice_id not in self._slices:
            left = deadline - time.monotonic()
            if left <= 0:
                raise NotFoundError(f"slice {slice_id} is not defined on host "
                                    f"{self.island}.{self.host}")
            await self.arrived.wait(self.arrived.version, left)
        if slice_id in self._foreign:
            raise FailedPreconditionError(f"slice {slice_id} has no device on host "
                                          f"{self.island}.{self.host}")
        return self._slices[slice_id]

    def holds_slice(self, slice_id: int) -> bool:
        """Whether a device of the slice is on this host (False while it is unknown)."""
        return slice_id in self._slices and slice_id not in self._foreign

    # -- the ordered executor ---------------------------------------------------------------------

    async def _run(self) -> None:
        while not self._stopped:
            ins = self._pending.pop(self._next, None)
            if ins is None:
                await self.arrived.wait(self.arrived.version, 1.0)
                continue
            self._next += 1
            self._current = ins
            try:
                await self._apply(ins)
            except asyncio.CancelledError:
                raise
            except Exception:  # an executor must survive any one instruction
                log.exception("sim host %d.%d: instruction %d failed", self.island, self.host,
                              ins.sequence)
            self._activity = _IDLE
            self.executed = ins.sequence
            self.progress.fire()

    async def _apply(self, ins: pb.Instruction) -> None:
        handler = _IN_ORDER.get(ins.WhichOneof("op"))
        if handler is not None:
            await handler(self, ins)

    async def _apply_load(self, ins: pb.Instruction) -> None:
        await self._load(ins.load)

    async def _apply_execute(self, ins: pb.Instruction) -> None:
        await self._execute(ins.sequence, ins.execute, self._arrival.pop(ins.sequence, 0.0))

    async def _apply_delete(self, ins: pb.Instruction) -> None:
        for array_id in ins.delete.array_ids:
            self.announcements.forget(array_id)
            self.store.delete(array_id)

    async def _apply_send(self, ins: pb.Instruction) -> None:
        if self.transfers is not None:
            await self.transfers.send(self, ins.send)

    async def _apply_release_slice(self, ins: pb.Instruction) -> None:
        self._slices.pop(ins.release_slice.slice_id, None)

    async def _load(self, load: pb.LoadInstruction) -> None:
        donated = tuple(load.donated)
        if load.slice_id in self._foreign:
            self._executables[load.executable_id] = Executable(load.name, donated=donated,
                                                                skip=True)
            return
        self._activity = ("compiling", load.name, 0, 0, time.monotonic(), load.slice_id)
        try:
            info = await self.slice_info(load.slice_id)
            seconds = await self.costs.seconds(load, info.mesh_shape, info.axis_names)
            outputs = tuple(Layout.of(v.shape, v.dtype, v.sharding, info, self.host)
                            for v in load.outputs)
            self._executables[load.executable_id] = Executable(
                load.name, seconds, None, outputs, donated, info,
                sum(d.host == self.host for d in info.devices),
                hosts=frozenset(d.host for d in info.devices))
        except Exception as exc:  # reported to whoever reads the outputs of a call
            error = exc if isinstance(exc, PathwaysError) else ExecutionError(
                f"loading {load.name!r} failed: {exc}")
            self._executables[load.executable_id] = Executable(load.name, error=error,
                                                                donated=donated)

    async def _execute(self, sequence: int, ex: pb.ExecuteInstruction, received: float) -> None:
        picked = time.time()
        exe = self._executables.get(ex.executable_id)
        if exe is not None and exe.skip:
            return
        try:
            check_runnable(exe, ex.executable_id, self.hang)
            slice_id = exe.info.slice_id
            self._activity = ("waiting for inputs of", exe.name, sequence, ex.session_id,
                              time.monotonic(), slice_id)
            inputs = await self.store.get_all(ex.inputs,
                                              time.monotonic() + self.config.input_timeout_s)
            ready = max([received or picked, self._device_free, *(v.ready_at for v in inputs)])
            self._activity = ("running", exe.name, sequence, ex.session_id, time.monotonic(),
                              slice_id)
            if len(exe.hosts) > 1:  # returns when the computation has ended on every host
                start = await self._meet(sequence, ex, exe, ready)
                end = start + exe.seconds
            else:
                start, end = ready, ready + exe.seconds
                if end > time.time():
                    await asyncio.sleep(end - time.time())
        except Exception as exc:
            self._fail_outputs(ex, execution_error(exc, exe, ex.executable_id, sequence,
                                                   f"{self.island}.{self.host}"))
            return
        self._device_free = end
        self.timeline.append((sequence, exe.name, received or picked, picked, start, end,
                              exe.devices, ex.session_id))
        self.executions += 1
        if self.hang:
            return  # reported hung meanwhile: its outputs already carry the report
        for array_id, layout in zip(ex.outputs, exe.outputs):
            self.store.set(array_id, layout.computed(end))
        for position in exe.donated:
            if position < len(ex.inputs):
                self.store.delete(ex.inputs[position])

    async def _meet(self, sequence: int, ex: pb.ExecuteInstruction, exe: Executable,
                    ready: float) -> float:
        """The simulated start of a computation spanning hosts (when the slice's last host gets
        there), returned once the computation has ended. Past the execution deadline (plus the
        computation's duration), asks the slice's other hosts where they are
        (runtime.worker.hang.diagnose) and declares this host hung if some never reached it; it then
        stays stuck here, as a real host stays stuck in a collective."""
        place = (self._controller_id, self._epoch, sequence, ex.executable_id)
        started = self.rendezvous.arrive(place, self.host, ready, exe.hosts, exe.seconds)
        deadline = self.config.execution_deadline_s
        slow_logged = False
        while True:
            if not started.done():
                await wait_done(started, deadline + exe.seconds if deadline > 0 else None)
            if started.done():
                return started.result()
            report = await asyncio.to_thread(diagnose, self, self._activity, exe.info)
            if started.done():
                return started.result()
            if report:
                self.declare_hang(report)
                return await started  # for ever, unless the island is reset
            if not slow_logged:
                slow_logged = True
                log.warning("sim host %d.%d: %s waits on every host of its slice", self.island,
                            self.host, exe.name)

    def _fail_outputs(self, ex: pb.ExecuteInstruction, error: PathwaysError) -> None:
        for out in ex.outputs:
            self.store.fail(out, error)

    def declare_hang(self, report: str) -> None:
        """Fails the stuck computation's outputs, and those of everything queued behind it, with
        DeadlineExceededError(report), now and on arrival."""
        if self.hang:
            return
        self.hang = report
        log.error("sim host %d.%d: %s", self.island, self.host, report)
        error = DeadlineExceededError(report)
        stuck = [ins.execute for ins in [self._current, *self._pending.values()]
                 if ins is not None and ins.HasField("execute")]
        for ex in stuck:
            if self._executable_slices.get(ex.executable_id) not in self._foreign:
                self._fail_outputs(ex, error)
        self.progress.fire()

    # -- data plane -------------------------------------------------------------------------------

    async def put(self, first: pb.ArrayChunk, rest: AsyncIterator[pb.ArrayChunk],
                  timeout: float = SLICE_TIMEOUT_S) -> int:
        """Stores an array streamed in (data kept only when small); returns the bytes received.
        Only an array announced to this host, as announced, once (runtime.worker.announced)."""
        array_id = first.spec.array_id
        if first.error:  # the sender's array failed, or its island was lost
            self.announcements.fail(array_id, ExecutionError(first.error))
            self.progress.fire()
            return 0
        if first.parts > 1:  # the sender puts it again in one stream
            raise FailedPreconditionError(_transfer.ONE_STREAM_ONLY)
        deadline = time.monotonic() + min(timeout, ANNOUNCE_TIMEOUT_S)
        while self.announcements.spec(array_id) is None and time.monotonic() < deadline:
            await self.arrived.wait(self.arrived.version, deadline - time.monotonic())
        announced = self.announcements.claim(array_id, f"{self.island}.{self.host}")
        try:
            check_as_announced(first.spec, announced)
            return await self._store_put(first, rest, timeout)
        finally:
            self.announcements.release(array_id)

    async def _store_put(self, first: pb.ArrayChunk, rest: AsyncIterator[pb.ArrayChunk],
                         timeout: float) -> int:
        received = await receive_shards(first, rest, self.config.data_limit_bytes)
        spec = received.spec
        info = await self.slice_info(spec.sharding.slice_id, min(timeout, SLICE_TIMEOUT_S))
        expected = dict(_wire.slice_shard_groups(spec.shape, info, spec.sharding))
        local = {p for p, d in enumerate(info.devices) if d.host == self.host}
        placed: set[int] = set()
        for index, positions, _ in received.shards:
            if expected.get(index) is None:
                raise InvalidArgumentError(f"shard {index} does not belong to the sharding")
            for position in positions:
                if position not in expected[index]:
                    raise InvalidArgumentError(f"mesh position {position} does not hold {index}")
                if position not in local:
                    raise InvalidArgumentError(f"mesh position {position} is on host "
                                               f"{info.devices[position].host}, not this one")
                placed.add(position)
        if placed != local:
            raise InvalidArgumentError(f"array {spec.array_id}: got shards for {len(placed)} of "
                                       f"the {len(local)} devices of this host")
        layout = Layout.of(spec.shape, spec.dtype, spec.sharding, info, self.host)
        if self.announcements.arrived(spec.array_id, lambda: self.store.set(  # else deleted
                spec.array_id, SimArray(layout.shape, layout.dtype,
                                        {index: data for index, _, data in received.shards},
                                        time.time(), layout.nbytes))):
            self.progress.fire()
        return received.nbytes

    async def get(self, request: pb.GetArrayRequest, limit: float = MAX_GET_TIMEOUT_S
                  ) -> Iterator[pb.ArrayChunk]:
        """Chunks of the requested (or all distinct local) shards of an array, waiting for it up
        to the request's timeout (at most `limit` s): its data, or zeros where it has none."""
        timeout = min(max(request.timeout_s, 0.0), MAX_GET_TIMEOUT_S, max(limit, 0.0))
        deadline = time.monotonic() + timeout
        await self.wait_received(request.after_sequence, timeout)
        value = await self.store.get(request.array_id, deadline - time.monotonic())
        wanted = [_wire.index_from_proto(i) for i in request.shards] or list(value.shards)
        missing = [w for w in wanted if w not in value.shards]
        if missing:
            raise NotFoundError(f"array {request.array_id}: shard {missing[0]} is not on this host")
        return value.chunks(wanted)

    # -- reports ----------------------------------------------------------------------------------

    def info(self) -> pb.HostInfo:
        state = self._activity
        return pb.HostInfo(
            island=self.island, host=self.host, address=self.address, platform="cpu",
            num_devices=self.config.devices_per_host, device_kind=self.config.device_kind,
            state="hung" if self.hang else "alive", backend="sim", queue_depth=len(self._pending),
            activity=self.activity, device_memory_bytes=self.config.device_memory_bytes,
            distributed_hosts=self.island_size if self.island_size > 1 else 0,
            received=self._received, executed=self.executed, hang=self.hang,
            incarnation=self.incarnation, current_sequence=state[2] if len(state) > 2 else 0,
            current_name=state[1] if len(state) > 1 else "", current_state=current_state(state))

    @property
    def activity(self) -> str:
        """What the executor is doing, as a real host says it (runtime.worker.worker)."""
        return describe_activity(self._activity, self.hang)

    def report_soon(self) -> None:
        """Sends the next progress report now, not after the stream's idle interval."""
        self.progress.fire()

    async def watch_progress(self, request: pb.WatchProgressRequest
                             ) -> AsyncIterator[pb.WatchProgressReply]:
        """Progress reports: one as the executor moves on, at most one per `min_interval_s`, with
        the executions completed since the previous one; one per `idle_interval_s` when idle.
        Each report taken counts as the controller's contact, as a real host counts it."""
        interval, idle = _limits.report_intervals(request)
        reported = self.timeline[-1][0] if self.timeline else 0
        arrivals_reported = 0  # every arrival still kept: the controller ignores old ones
        seen = self.progress.version
        while not self._stopped:
            seen = await self.progress.wait(seen, idle)
            fresh = []
            for entry in reversed(self.timeline):
                if entry[0] <= reported:
                    break
                fresh.append(entry)
            if fresh:
                reported = fresh[0][0]
            arrivals_reported, arrived = self.announcements.after(arrivals_reported)
            now = time.time()
            yield pb.WatchProgressReply(
                received=self._received, executed=self.executed, hang=self.hang, arrived=arrived,
                completed=[pb.CompletedExecution(sequence=e[0], seconds=e[5] - e[4],
                                                 started_ago_s=now - e[4])
                           for e in reversed(fresh)])
            self.last_contact = time.monotonic()
            if interval:
                await asyncio.sleep(interval)

    def events(self, since: float = 0.0) -> list[pb.ExecutionEvent]:
        """Executions that ended after `since` (GetTimeline)."""
        recent = []
        for e in reversed(self.timeline):  # newest first: a poll reads only what is new
            if e[5] <= since:
                break
            recent.append(e)
        return [pb.ExecutionEvent(sequence=e[0], name=e[1], received=e[2], picked=e[3],
                                  start=e[4], end=e[5], devices=e[6], session_id=e[7])
                for e in reversed(recent)]

    def stop(self) -> None:
        """Stops the executor; every wait on this host's arrays fails at once."""
        self._stopped = True
        if self._task is not None:
            self._task.cancel()
        self.rendezvous.leave(self.host)
        self.store.clear()
        self.arrived.fire()
        self.progress.fire()


#: The handler per kind of instruction run in order, as on a real host (runtime.worker.executor).
_IN_ORDER = {"load": SimHost._apply_load, "execute": SimHost._apply_execute,
             "delete": SimHost._apply_delete, "send": SimHost._apply_send,
             "release_slice": SimHost._apply_release_slice}
