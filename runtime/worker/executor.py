"""The ordered executor of a host: applies the island's instructions strictly in sequence order
on one thread. A component of Worker (runtime.worker.worker), built with what it uses of the
host; what it is doing is in an ExecutorState (runtime.worker.state)."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Mapping

from jax.sharding import Mesh

from proto import pathways_pb2 as pb
from proto.errors import STORE, DeadlineExceededError, ExecutionError, NotFoundError, PathwaysError
from runtime.worker.compile import Loaded, compile_export, compile_stablehlo, host_nbytes
from runtime.worker.announced import Announcements
from runtime.worker.inflight import InFlight, collective_free
from runtime.worker.state import IDLE, ExecutorState
from runtime.worker.store import ArrayStore, wait_all
from runtime.worker.transfers import Transfers

log = logging.getLogger(__name__)


class Executor:
    """The executor thread's work for host `island`.`host` (`run`, the thread's loop).

    `take()` waits for the next instruction of the island's order (None once the host stops);
    `cond` is the host's condition, under which `pending` holds the instructions received and
    not yet taken (`arrival`: when each execution among them arrived), and the slice tables
    change: `slices` (slice id -> (mesh, info)), `foreign`
    (slices with no device here), `executable_slices` (executable id -> slice id); `mesh(slice_id)`
    gives a defined slice's mesh. Executions read and write `store`, wait up to `input_timeout_s`
    for their inputs and run through `inflight`; deletes withdraw `announcements` and hand the
    arrays to `reap` (freeing a buffer can wait); sends go to `transfers`. It writes `state`
    (status, the progress stream and the hang watchdog read it) and sets `progress` as it moves
    on."""

    def __init__(self, island: int, host: int, *, take: Callable[[], pb.Instruction | None],
                 cond: threading.Condition, pending: Mapping[int, pb.Instruction],
                 arrival: dict[int, float],
                 slices: dict[int, tuple[Mesh | None, pb.SliceInfo]], foreign: set[int],
                 executable_slices: dict[int, int],
                 mesh: Callable[[int], tuple[Mesh, pb.SliceInfo]], store: ArrayStore,
                 announcements: Announcements, state: ExecutorState,
                 progress: threading.Event, inflight: InFlight, transfers: Transfers,
                 reap: Callable[[list], None], input_timeout_s: float) -> None:
        self.island, self.host = island, host
        self._take = take
        self._cond, self._pending = cond, pending
        self._slices, self._foreign = slices, foreign
        self._executable_slices = executable_slices
        self.mesh = mesh
        self.store = store
        self.announcements = announcements
        self.state = state
        self._progress = progress
        self._inflight = inflight
        self._transfers = transfers
        self._reap = reap
        self.input_timeout_s = input_timeout_s
        self._arrival = arrival
        self._loaded: dict[int, Loaded] = {}
        self._compile_cache: dict[tuple, object] = {}

    @property
    def hang(self) -> str:
        """The report of a computation that ran past its deadline ("" while none has)."""
        return self.state.hang

    def forget_loaded(self) -> None:
        """A new order (the controller or the island restarted): its executables are gone
        (compilations stay cached)."""
        self._loaded.clear()

    def run(self) -> None:
        """Applies the island's order until the host stops."""
        while True:
            ins = self._take()
            if ins is None:
                return
            try:
                self._apply(ins)
            except Exception:  # an executor must survive any one instruction
                log.exception("host %d.%d: instruction %d failed", self.island, self.host,
                              ins.sequence)
            finally:
                self.state.activity = IDLE
                self.state.executed = ins.sequence
                self._progress.set()

    def _apply(self, ins: pb.Instruction) -> None:
        handler = _IN_ORDER.get(ins.WhichOneof("op"))
        if handler is not None:
            handler(self, ins)

    def _apply_load(self, ins: pb.Instruction) -> None:
        self._load(ins.load)

    def _apply_execute(self, ins: pb.Instruction) -> None:
        self._execute(ins.sequence, ins.execute, self._arrival.pop(ins.sequence, 0.0))

    def _apply_delete(self, ins: pb.Instruction) -> None:
        doomed = []
        for array_id in ins.delete.array_ids:
            with self._cond:  # a put finishing now stores its array before or not at all
                self.announcements.forget(array_id)
                if not self.store.contains(array_id):
                    continue
                try:  # keep a reference: the reaper thread drops the last one
                    doomed.append(self.store.get(array_id, 0.0))
                except PathwaysError:
                    pass  # pending or failed: nothing to free
                self.store.delete(array_id)
        if doomed:
            self._reap(doomed)

    def _apply_send(self, ins: pb.Instruction) -> None:
        self._transfers.send(ins.send, ins.sequence)

    def _apply_release_slice(self, ins: pb.Instruction) -> None:
        self._release_slice(ins.release_slice.slice_id)

    def _load(self, load: pb.LoadInstruction) -> None:
        donated = tuple(load.donated)
        if load.slice_id in self._foreign:
            self._loaded[load.executable_id] = Loaded(load.name, None, None, (), donated,
                                                       slice_id=load.slice_id, skip=True)
            return
        self.state.activity = ("compiling", load.name, 0, 0, time.monotonic(), load.slice_id)
        try:
            mesh, info = self.mesh(load.slice_id)
            # Slices on the same devices share compilations (clients often ask for alike slices).
            key = (load.fingerprint, tuple(d.id for d in mesh.devices.flat), mesh.axis_names,
                   donated)
            cached = self._compile_cache.get(key)
            if cached is None:
                compiled = (compile_stablehlo(load, mesh) if load.format == pb.STABLEHLO
                            else compile_export(load, mesh))
                cached = self._compile_cache[key] = (compiled, collective_free(compiled))
            compiled, no_collectives = cached
            multi_host = any(d.host != self.host for d in info.devices)
            self._loaded[load.executable_id] = Loaded(
                load.name, compiled, None, tuple(host_nbytes(v, info, self.host)
                                                 for v in load.outputs), donated,
                sum(d.host == self.host for d in info.devices), load.slice_id,
                multi_host=multi_host, overlap=no_collectives and not multi_host, cache_key=key)
        except Exception as exc:  # reported to whoever reads the outputs of a call
            error = exc if isinstance(exc, PathwaysError) else ExecutionError(
                f"loading {load.name!r} failed: {exc}")
            self._loaded[load.executable_id] = Loaded(load.name, None, error, (), donated,
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
            check_runnable(loaded, ex.executable_id, self.hang)
            self.state.activity = ("waiting for inputs of", loaded.name, sequence, ex.session_id,
                              time.monotonic(), loaded.slice_id)
            inputs = wait_all(self.store, ex.inputs, time.monotonic() + self.input_timeout_s)
            self.state.activity = ("running", loaded.name, sequence, ex.session_id, time.monotonic(),
                              loaded.slice_id)
            if not loaded.overlap:
                self._inflight.drain()  # collectives: the only execution in flight
            self._transfers.pins.spare_donated(inputs, loaded.donated)  # earlier sends keep their data
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
            self.fail_outputs(ex, execution_error(exc, loaded, ex.executable_id, sequence,
                                                   f"{self.island}.{self.host}"))
            return
        if self.hang:
            return  # reported hung meanwhile: its outputs already carry the report
        for i, (array_id, value, nbytes) in enumerate(zip(ex.outputs, outputs,
                                                          loaded.out_nbytes)):
            self.store.set(array_id, value, nbytes, ("output {} of {} (executable {}, #{})", i,
                                                     loaded.name, ex.executable_id, sequence))
        for position in loaded.donated:
            self.store.delete(ex.inputs[position])

    def fail_outputs(self, ex: pb.ExecuteInstruction, error: PathwaysError) -> None:
        """The outputs of an execution fail with `error`."""
        for out in ex.outputs:
            self.store.fail(out, error)

    def declare_hang(self, report: str) -> None:
        """The executor is stuck (runtime.worker.hang): fails the outputs of the stuck computation and
        of everything queued behind it with DeadlineExceededError(report), now and on arrival."""
        with self._cond:
            if self.hang:
                return
            self.state.hang = report
            stuck = self.state.instruction
            pending = [ins.execute for ins in self._pending.values() if ins.HasField("execute")]
        log.error("host %d.%d: %s", self.island, self.host, report)
        error = DeadlineExceededError(report)
        if stuck is not None and stuck.HasField("execute"):
            pending.append(stuck.execute)
        for ex in pending:
            if self._executable_slices.get(ex.executable_id) not in self._foreign:
                self.fail_outputs(ex, error)
        self._progress.set()


def check_runnable(loaded, executable_id: int, hang: str) -> None:
    """Raises why an execution cannot run: its executable (`loaded`, compile.Loaded or the
    simulator's) is not loaded (NotFoundError) or failed to load (its error), or the host is hung
    (DeadlineExceededError). Shared by real and simulated hosts (runtime.sim)."""
    if loaded is None:
        raise NotFoundError(f"executable {executable_id} is not loaded on this host")
    if loaded.error is not None:
        raise loaded.error
    if hang:
        raise DeadlineExceededError(hang)


def execution_error(exc: Exception, loaded, executable_id: int, sequence: int,
                    host: str) -> PathwaysError:
    """The error the outputs of execution #`sequence` on `host` fail with, when `exc` stopped it
    (shared by real and simulated hosts)."""
    name = loaded.name if loaded else f"executable {executable_id}"
    where = f"{name} (#{sequence}) on host {host}"
    if isinstance(exc, PathwaysError) and exc.origin != STORE:
        return exc  # an input's producer failed: its error names it; pass it on as is
    if isinstance(exc, PathwaysError):
        return type(exc)(f"{where}: {exc}")
    return ExecutionError(f"{where} failed: {exc}")


#: The executor's handler per kind of instruction it runs in order (`runs_in_order` in
#: proto.instructions.KINDS); the other kinds were done at receipt (runtime.worker.intake).
_IN_ORDER = {"load": Executor._apply_load, "execute": Executor._apply_execute,
             "delete": Executor._apply_delete, "send": Executor._apply_send,
             "release_slice": Executor._apply_release_slice}
