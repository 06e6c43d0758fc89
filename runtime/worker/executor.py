"""The ordered executor of a host: applies the island's instructions strictly in sequence order
on one thread. A part of Worker (runtime.worker.worker), whose state it uses; what it is doing is
in the worker's ExecutorState (runtime.worker.state)."""

from __future__ import annotations

import logging
import time

from proto import pathways_pb2 as pb
from proto.errors import STORE, DeadlineExceededError, ExecutionError, NotFoundError, PathwaysError
from runtime.worker.compile import Loaded, compile_export, compile_stablehlo, host_nbytes
from runtime.worker.inflight import collective_free
from runtime.worker.state import IDLE
from runtime.worker.store import wait_all

log = logging.getLogger(__name__)


class Executor:
    """The executor thread's work for a Worker (a mixin: the state is the worker's)."""

    def _run(self) -> None:
        while True:
            with self._cond:
                while self._next not in self._pending and not self._stopped:
                    self._cond.wait(1.0)
                if self._stopped:
                    return
                ins = self._pending.pop(self._next)
                self._next += 1
                self.state.instruction = ins
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
            if loaded is None:
                raise NotFoundError(f"executable {ex.executable_id} is not loaded on this host")
            if loaded.error is not None:
                raise loaded.error
            if self.hang:
                raise DeadlineExceededError(self.hang)
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
            name = loaded.name if loaded else f"executable {ex.executable_id}"
            where = f"{name} (#{sequence}) on host {self.island}.{self.host}"
            if isinstance(exc, PathwaysError) and exc.origin != STORE:
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
            self.state.hang = report
            stuck = self.state.instruction
            pending = [ins.execute for ins in self._pending.values() if ins.HasField("execute")]
        log.error("host %d.%d: %s", self.island, self.host, report)
        error = DeadlineExceededError(report)
        if stuck is not None and stuck.HasField("execute"):
            pending.append(stuck.execute)
        for ex in pending:
            if self._executable_slices.get(ex.executable_id) not in self._foreign:
                self._fail_outputs(ex, error)
        self._progress.set()


#: The executor's handler per kind of instruction it runs in order (`runs_in_order` in
#: proto.instructions.KINDS); the other kinds were done at receipt (runtime.worker.intake).
_IN_ORDER = {"load": Executor._apply_load, "execute": Executor._apply_execute,
             "delete": Executor._apply_delete, "send": Executor._apply_send,
             "release_slice": Executor._apply_release_slice}
