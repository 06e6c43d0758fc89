"""The program planner: per-array bookkeeping, and clients' commands turned into island instructions.

A client's commands (calls, transfers, program runs, deletes) arrive in order. Each is checked on
its own against the bookkeeping of logical arrays (one record per array, not per shard); an
accepted command updates the bookkeeping at once, so the next command may read its outputs, and
becomes instructions on the islands it touches. A rejected command is reported and the rest go on.
A transfer becomes a Send on the source island and an Expect on the destination: the hosts move
the data between themselves, never through the controller.

The instructions of one request go into the session's queue on each island they touch (in the
request's order, behind the session's earlier work); the island's gang scheduler gives them their
places in its total order when its policy says so. Planning happens under the controller's lock,
a bounded piece at a time (the controller releases the lock between pieces of a long request),
waiting for the places outside it (`Ordering.wait`); shard geometry and device memory are checked
before taking the lock where the request allows it (runtime.controller.placement).
"""

from __future__ import annotations

import dataclasses
import itertools
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

from proto import pathways_pb2 as pb
from proto import wire as _wire
from proto.errors import (ArrayNotFoundError, InvalidArgumentError, NotFoundError, PathwaysError,
                          ResourceExhaustedError)
from runtime.controller.ordering import INSTRUCTIONS_PER_PIECE, Emitter, command_result
from runtime.controller.placement import Placement, Placer

if TYPE_CHECKING:
    from runtime.controller.catalog import CatalogView
    from runtime.controller.sessions import Session, SessionUsage
    from scheduler.readiness import Readiness


@dataclasses.dataclass(frozen=True)
class ArrayRecord:
    """A live logical array: its spec (sharding.slice_id says where), island and owner."""

    spec: pb.ArraySpec
    island: int
    session_id: int
    nbytes: int = 0  # device memory, replicas counted (what the session quota counts)


@dataclasses.dataclass(frozen=True)
class _Value:
    """A value of a program: static spec and where it lives."""

    dtype: str
    shape: tuple[int, ...]
    sharding: pb.Sharding
    island: int
    nbytes: int = 0  # device memory, replicas counted


@dataclasses.dataclass(frozen=True)
class _Program:
    program_id: int
    session_id: int
    name: str
    values: tuple[_Value, ...]  # inputs first, then node outputs in order
    num_inputs: int
    nodes: tuple[pb.ProgramNode, ...]
    outputs: tuple[int, ...]
    donated_inputs: frozenset[int]


def describe(dtype: str, shape: Sequence[int], sharding: pb.Sharding) -> str:
    return (f"{dtype}[{','.join(map(str, shape))}] {_wire.spec_from_proto(sharding)} on slice "
            f"{sharding.slice_id}")


def check_matches(what: str, got: _Value | pb.ArraySpec, want: pb.ValueSpec) -> None:
    """InvalidArgumentError unless a value has the dtype, shape and sharding a consumer needs."""
    if (got.dtype, tuple(got.shape), got.sharding.slice_id, _wire.sharding_dims(got.sharding)) != (
            want.dtype, tuple(want.shape), want.sharding.slice_id,
            _wire.sharding_dims(want.sharding)):
        raise InvalidArgumentError(f"{what}: expected {describe(want.dtype, want.shape, want.sharding)}"
                                   f", got {describe(got.dtype, got.shape, got.sharding)}")


#: Most array ids in one delete instruction (a session's end may delete a million arrays).
IDS_PER_DELETE = 1 << 16


class Planner:
    """Arrays and programs of all sessions; called with the controller's lock held. Reads the
    session records it is given; what a session holds changes through `sessions` alone.
    `readiness` registers the arrays not produced yet (shared with the islands' schedulers);
    `note_transfer(source_island, island, spec)` tells the controller's health which arrays an
    island expects from another (runtime.controller.health: failed if their source is lost)."""

    def __init__(self, catalog: CatalogView, sessions: SessionUsage, readiness: Readiness,
                 note_transfer: Callable[[int, int, pb.ArraySpec], None]) -> None:
        self.catalog = catalog
        self.sessions = sessions
        self.readiness = readiness
        self.note_transfer = note_transfer
        self.limits = catalog.limits
        self.arrays: dict[int, ArrayRecord] = {}
        self._by_slice: dict[int, set[int]] = {}  # slice id -> its live arrays
        self.programs: dict[int, _Program] = {}
        self._program_ids = itertools.count(1)
        self._temp_ids = itertools.count(1)  # program temporaries: ids below every session's range

    # -- arrays -----------------------------------------------------------------------------------

    @property
    def array_count(self) -> int:
        """Live logical arrays of all sessions."""
        return len(self.arrays)

    def array(self, session: Session, array_id: int, what: str) -> ArrayRecord:
        record = self.arrays.get(array_id)
        if record is None or record.session_id != session.session_id:
            raise ArrayNotFoundError(f"array {array_id} ({what}) is unknown or was deleted")
        return record

    def check_new_id(self, session: Session, array_id: int) -> None:
        if not session.owns_id(array_id):
            raise InvalidArgumentError(f"array id {array_id} is outside this session's id range")
        if array_id in self.arrays:
            raise InvalidArgumentError(f"array id {array_id} is already in use")

    def add(self, session: Session, spec: pb.ArraySpec, island: int, nbytes: int) -> None:
        """Records a new array of `nbytes` device bytes (check_room first)."""
        self.arrays[spec.array_id] = ArrayRecord(spec, island, session.session_id, nbytes)
        self._by_slice.setdefault(spec.sharding.slice_id, set()).add(spec.array_id)
        self.sessions.record_array(session, spec.array_id, nbytes)

    def forget(self, session: Session, array_id: int) -> ArrayRecord | None:
        record = self.arrays.pop(array_id, None)
        self.sessions.forget_array(session, array_id, 0 if record is None else record.nbytes)
        if record is not None:
            on_slice = self._by_slice.get(record.spec.sharding.slice_id)
            if on_slice is not None:
                on_slice.discard(array_id)
                if not on_slice:
                    del self._by_slice[record.spec.sharding.slice_id]
        return record

    def slice_arrays(self, slice_id: int) -> set[int]:
        """The live arrays on a slice (a copy)."""
        return set(self._by_slice.get(slice_id, ()))

    def forget_slice(self, session: Session, slice_id: int) -> None:
        """Deletes the session's arrays on a slice that goes away (released, or its island
        restarted), after the work already ordered."""
        self.delete(session, sorted(self.slice_arrays(slice_id)), strict=False)

    # -- what a session may hold ------------------------------------------------------------------

    def check_room(self, session: Session, adding: int, nbytes: int,
                   freed: Sequence[int] = ()) -> None:
        """ResourceExhaustedError if `adding` more arrays would take the session past its array
        limit, or adding `nbytes` device bytes and dropping the arrays `freed` past its quota.
        Other sessions are unaffected: both count only this session's arrays."""
        freeing = sum(self.arrays[a].nbytes for a in freed if a in self.arrays)
        self.sessions.check_room(session, adding, nbytes, freeing)

    @staticmethod
    def place_arrays(placer: Placer, specs: Sequence[pb.ArraySpec]) -> list[Placement]:
        """Checks the arrays a client declares (ids given twice, shard geometry, device memory)
        without the controller's state: callers run it outside the lock. Linear in `specs`."""
        seen: set[int] = set()
        for spec in specs:
            if spec.array_id in seen:
                raise InvalidArgumentError(f"array id {spec.array_id} is declared twice")
            seen.add(spec.array_id)
        return [placer.place(spec.dtype, spec.shape, spec.sharding, f"array {spec.array_id}")
                for spec in specs]

    def register_arrays(self, session: Session, specs: Sequence[pb.ArraySpec],
                        placements: Sequence[Placement]) -> Callable[[float | None], list[int]]:
        """Declares arrays a client will stream to their hosts, placed by `place_arrays`; returns
        a function that waits (up to a timeout) for each one's sequence number, raising the
        island's failure."""
        for spec, placement in zip(specs, placements):
            self.check_new_id(session, spec.array_id)
            if placement.slice_id not in session.slices:  # released since it was placed
                raise NotFoundError(f"slice {placement.slice_id} is unknown or was released")
        for island in {p.island for p in placements}:
            self.catalog.check_island(island)
        self.check_room(session, len(specs), sum(p.total_bytes for p in placements))
        emit = Emitter()
        handles = []
        readiness = self.readiness
        for spec, placement in zip(specs, placements):
            self.add(session, spec, placement.island, placement.total_bytes)
            # Until its hosts have it, what reads it waits in the session's queue.
            readiness.expect_put(spec.array_id, placement.island, placement.hosts)
            handles.append(emit.add(placement.island, pb.Instruction(
                expect=pb.ExpectArrayInstruction(spec=spec))))
        ordering = emit.submit(self.catalog.orderer(session))

        def sequences(timeout: float | None) -> list[int]:
            sequence, errors, _ = ordering.wait(timeout)  # declarations wait for nothing
            if errors:
                raise next(iter(errors.values()))
            return [sequence[h] for h in handles]

        return sequences

    def delete(self, session: Session, array_ids: Sequence[int], *, strict: bool) -> None:
        """Drops arrays after the work already ordered; unknown ids fail only when `strict`."""
        if strict:
            for array_id in array_ids:
                self.array(session, array_id, "to delete")
        emit = Emitter()
        self._delete(session, array_ids, emit)
        emit.submit(self.catalog.orderer(session))

    def _delete(self, session: Session, array_ids: Sequence[int], emit: Emitter) -> None:
        by_island: dict[int, list[int]] = {}
        for array_id in array_ids:
            if array_id in session.arrays:
                record = self.forget(session, array_id)
                by_island.setdefault(record.island, []).append(array_id)
        for island, ids in by_island.items():
            if not self.catalog.resources.lost_host(island):
                for first in range(0, len(ids), IDS_PER_DELETE):
                    emit.add(island, pb.Instruction(delete=pb.DeleteInstruction(
                        array_ids=ids[first:first + IDS_PER_DELETE])))

    def _check_placement(self, session: Session, dtype: str, shape: Sequence[int],
                         sharding: pb.Sharding, what: str = "value",
                         placer: Placer | None = None) -> Placement:
        """Validates a value's dtype, shape and sharding on an owned slice, and that it fits its
        devices; returns its placement."""
        placer = placer or Placer(self.catalog.resources, session.session_id)
        placement = placer.place(dtype, shape, sharding, what)
        self.catalog.check_island(placement.island)
        return placement

    # -- commands ---------------------------------------------------------------------------------

    def execute(self, session: Session, commands: Sequence[pb.Command], start: int = 0,
                emitted: int = 0) -> tuple[Callable[[float | None], list[pb.CommandResult]], int,
                                           int]:
        """Checks commands from `start` on and queues the accepted ones for ordering, stopping
        once about INSTRUCTIONS_PER_PIECE instructions are queued (the caller releases the
        controller's lock, then goes on from where this stopped). `emitted` is how many
        instructions the request's earlier pieces gave: commands past the request's limit fail.

        Returns (a function that waits, up to a timeout, until the planned commands are ordered
        and gives one result per command; the index to go on from; instructions emitted so far).
        """
        emit = Emitter()
        outcomes: list[list[tuple[int, int]] | PathwaysError] = []
        n = start
        while n < len(commands) and emit.count < INSTRUCTIONS_PER_PIECE:
            command = commands[n]
            kind = command.WhichOneof("op")
            emit.owner = None if kind == "delete" else len(outcomes)
            try:
                if emitted + emit.count >= self.limits.instructions_per_request:
                    raise ResourceExhaustedError(
                        f"command {n}: the request already expands into "
                        f"{emitted + emit.count} instructions, the limit; send fewer commands "
                        f"per request")
                if kind == "call":
                    outcomes.append(self._call(session, command.call, emit))
                elif kind == "transfer":
                    outcomes.append(self._transfer(session, command.transfer, emit))
                elif kind == "run":
                    outcomes.append(self._run(session, command.run, emit))
                elif kind == "delete":
                    self._delete(session, command.delete.array_ids, emit)
                    outcomes.append([])
                else:
                    raise InvalidArgumentError(f"command {n} has no operation")
            except PathwaysError as exc:
                outcomes.append(exc)
            n += 1
        ordering = emit.submit(self.catalog.orderer(session))

        def results(timeout: float | None) -> list[pb.CommandResult]:
            sequence, errors, failed = ordering.wait(timeout)
            blamed: dict[int, PathwaysError] = {}  # a command fails with any of its instructions
            for handle, owner in emit.owners.items():
                error = failed.get(handle) or errors.get(handle[0])
                if error is not None:
                    blamed.setdefault(owner, error)
            for i, o in enumerate(outcomes):
                if not isinstance(o, PathwaysError) and i in blamed:
                    outcomes[i] = blamed[i]
            return [command_result(o) if isinstance(o, PathwaysError) else
                    pb.CommandResult(sequence=[sequence[h] for h in o]) for o in outcomes]

        return results, n, emitted + emit.count

    def _call(self, session: Session, call: pb.Call, emit: Emitter) -> list[tuple[int, int]]:
        exe = self.catalog.executable(session, call.executable_id)
        # The island first: a call on a failed island reports the failure, even when its inputs
        # came from calls the failure already rejected.
        island = self.catalog.resources.get_slice(exe.slice_id).island
        self.catalog.check_island(island)
        if len(call.inputs) != len(exe.inputs) or len(call.outputs) != len(exe.outputs):
            raise InvalidArgumentError(
                f"{exe.name} takes {len(exe.inputs)} inputs and gives {len(exe.outputs)} outputs; "
                f"got {len(call.inputs)} and {len(call.outputs)}")
        for i, (array_id, want) in enumerate(zip(call.inputs, exe.inputs)):
            got = self.array(session, array_id, f"input {i} of {exe.name}").spec
            check_matches(f"input {i} of {exe.name}", got, want)
        donated = [call.inputs[i] for i in exe.donated]
        kept = [a for i, a in enumerate(call.inputs) if i not in exe.donated]
        if len(set(donated)) != len(donated) or set(donated) & set(kept):
            raise InvalidArgumentError(f"a donated input of {exe.name} is also passed as another "
                                       f"input")
        self._check_new_ids(session, call.outputs)
        self.check_room(session, len(call.outputs) - len(donated), sum(exe.output_bytes), donated)
        for spec, array_id, nbytes in zip(exe.outputs, call.outputs, exe.output_bytes):
            self.add(session, pb.ArraySpec(array_id=array_id, dtype=spec.dtype, shape=spec.shape,
                                           sharding=spec.sharding), island, nbytes)
        for array_id in donated:
            self.forget(session, array_id)
        handle = emit.add(island, pb.Instruction(execute=pb.ExecuteInstruction(
            executable_id=exe.executable_id, inputs=call.inputs, outputs=call.outputs)))
        return [handle] * len(call.outputs)

    def _check_new_ids(self, session: Session, ids: Sequence[int]) -> None:
        for array_id in ids:
            self.check_new_id(session, array_id)
        if len(set(ids)) != len(ids):
            raise InvalidArgumentError("an output id is used twice")

    def _emit_transfer(self, emit: Emitter, source_id: int, source_island: int,
                       source_slice: int, destination: pb.ArraySpec, island: int
                       ) -> tuple[int, int]:
        """Expect on the destination island, Send on the source's; returns the Expect's handle."""
        info = self.catalog.slice_info(
            self.catalog.resources.get_slice(destination.sharding.slice_id))
        handle = emit.add(island, pb.Instruction(expect=pb.ExpectArrayInstruction(spec=destination)))
        # What reads the copy waits in its session's queue until the send is ordered.
        self.readiness.expect_send(destination.array_id, island)
        if island != source_island:
            self.note_transfer(source_island, island, destination)
        emit.add(source_island, pb.Instruction(send=pb.SendInstruction(
            array_id=source_id, destination=destination, destination_slice=info,
            source_slice_id=source_slice)))
        return handle

    def _transfer(self, session: Session, t: pb.TransferCommand, emit: Emitter
                  ) -> list[tuple[int, int]]:
        source = self.array(session, t.source, "transfer source")
        self.check_new_id(session, t.destination)
        placement = self._check_placement(session, source.spec.dtype, source.spec.shape,
                                          t.sharding, f"copy {t.destination} of {t.source}")
        island = placement.island
        self.catalog.check_island(source.island)
        self.check_room(session, 1, placement.total_bytes)
        destination = pb.ArraySpec(array_id=t.destination, dtype=source.spec.dtype,
                                   shape=source.spec.shape, sharding=t.sharding)
        self.add(session, destination, island, placement.total_bytes)
        return [self._emit_transfer(emit, t.source, source.island,
                                    source.spec.sharding.slice_id, destination, island)]

    # -- programs ---------------------------------------------------------------------------------

    def plan_program(self, session: Session, request: pb.RegisterProgramRequest) -> _Program:
        """Checks a traced dataflow graph once, so that each run is only ids. Reads only records
        that do not change (slices, executables), so callers run it outside the controller's
        lock; `add_program` registers the result. Linear in the graph's size."""
        placer = Placer(self.catalog.resources, session.session_id)
        values: list[_Value] = []
        for i, spec in enumerate(request.inputs):
            placement = self._check_placement(session, spec.dtype, spec.shape, spec.sharding,
                                              f"program input {i}", placer)
            values.append(_Value(spec.dtype, tuple(spec.shape), spec.sharding, placement.island,
                                 placement.total_bytes))
        num_inputs = len(values)
        consumed: dict[int, int] = {}  # donated value -> node that consumed it

        def use(v: int, node: int) -> _Value:
            if not 0 <= v < len(values):
                raise InvalidArgumentError(f"program node {node} reads undefined value {v}")
            if v in consumed:
                raise InvalidArgumentError(f"program node {node} reads value {v}, donated to "
                                           f"node {consumed[v]}")
            return values[v]

        for n, node in enumerate(request.nodes):
            kind = node.WhichOneof("op")
            if kind == "call":
                exe = self.catalog.executable(session, node.call.executable_id)
                if len(node.call.inputs) != len(exe.inputs):
                    raise InvalidArgumentError(f"program node {n}: {exe.name} takes "
                                               f"{len(exe.inputs)} inputs")
                for i, (v, want) in enumerate(zip(node.call.inputs, exe.inputs)):
                    check_matches(f"program node {n} input {i}", use(v, n), want)
                for i in exe.donated:
                    consumed[node.call.inputs[i]] = n
                island = self.catalog.resources.get_slice(exe.slice_id).island
                values.extend(_Value(o.dtype, tuple(o.shape), o.sharding, island, nbytes)
                              for o, nbytes in zip(exe.outputs, exe.output_bytes))
            elif kind == "transfer":
                source = use(node.transfer.input, n)
                placement = self._check_placement(session, source.dtype, source.shape,
                                                  node.transfer.sharding, f"program node {n}",
                                                  placer)
                values.append(_Value(source.dtype, source.shape, node.transfer.sharding,
                                     placement.island, placement.total_bytes))
            else:
                raise InvalidArgumentError(f"program node {n} has no operation")
        outputs = tuple(request.outputs)
        for v in outputs:
            if not num_inputs <= v < len(values) or v in consumed:
                raise InvalidArgumentError(f"program output value {v} is not a live computed value")
        if len(set(outputs)) != len(outputs):
            raise InvalidArgumentError("a program value is returned twice")
        return _Program(0, session.session_id, request.name, tuple(values), num_inputs,
                        tuple(request.nodes), outputs,
                        frozenset(v for v in consumed if v < num_inputs))

    def add_program(self, session: Session, program: _Program) -> int:
        """Registers a planned program (under the controller's lock); returns its id."""
        if len(session.programs) >= self.limits.programs_per_session:
            raise ResourceExhaustedError(f"session {session.session_id} holds "
                                         f"{len(session.programs)} programs, its limit")
        program = dataclasses.replace(program, program_id=next(self._program_ids))
        self.programs[program.program_id] = program
        self.sessions.record_program(session, program.program_id)
        return program.program_id

    def _run(self, session: Session, run: pb.RunProgramCommand, emit: Emitter
             ) -> list[tuple[int, int]]:
        program = self.programs.get(run.program_id)
        if program is None or program.session_id != session.session_id:
            raise NotFoundError(f"program {run.program_id} is unknown")
        if len(run.inputs) != program.num_inputs or len(run.outputs) != len(program.outputs):
            raise InvalidArgumentError(
                f"program {program.name} takes {program.num_inputs} inputs and gives "
                f"{len(program.outputs)} outputs; got {len(run.inputs)} and {len(run.outputs)}")
        for i, array_id in enumerate(run.inputs):
            got = self.array(session, array_id, f"input {i} of program {program.name}").spec
            want = program.values[i]
            check_matches(f"input {i} of program {program.name}", got, pb.ValueSpec(
                dtype=want.dtype, shape=want.shape, sharding=want.sharding))
        if len(set(run.inputs)) != len(run.inputs) and program.donated_inputs:
            raise InvalidArgumentError(f"program {program.name} donates an input passed twice")
        self._check_new_ids(session, run.outputs)
        for island in {v.island for v in program.values}:
            self.catalog.check_island(island)
        outputs = [program.values[v] for v in program.outputs]
        self.check_room(session, len(outputs) - len(program.donated_inputs),
                        sum(v.nbytes for v in outputs),
                        [run.inputs[v] for v in program.donated_inputs])

        ids = list(run.inputs)
        out_ids = dict(zip(program.outputs, run.outputs))
        made: dict[int, tuple[int, int]] = {}
        temps: dict[int, list[int]] = {}

        def fresh(v: int) -> int:
            if v in out_ids:
                return out_ids[v]
            temp = next(self._temp_ids)
            temps.setdefault(program.values[v].island, []).append(temp)
            return temp

        for node in program.nodes:
            first = len(ids)
            if node.WhichOneof("op") == "call":
                exe = self.catalog.executable(session, node.call.executable_id)
                outs = [fresh(first + i) for i in range(len(exe.outputs))]
                handle = emit.add(program.values[first].island, pb.Instruction(
                    execute=pb.ExecuteInstruction(executable_id=exe.executable_id,
                                                  inputs=[ids[v] for v in node.call.inputs],
                                                  outputs=outs)))
                ids.extend(outs)
                made.update({first + i: handle for i in range(len(outs))})
            else:
                source, value = node.transfer.input, program.values[first]
                dest = pb.ArraySpec(array_id=fresh(first), dtype=value.dtype, shape=value.shape,
                                    sharding=value.sharding)
                made[first] = self._emit_transfer(emit, ids[source],
                                                  program.values[source].island,
                                                  program.values[source].sharding.slice_id, dest,
                                                  value.island)
                ids.append(dest.array_id)
        for island, temp_ids in temps.items():
            emit.add(island, pb.Instruction(delete=pb.DeleteInstruction(array_ids=temp_ids)))
        for v in program.donated_inputs:
            self.forget(session, ids[v])
        for v, array_id in out_ids.items():
            value = program.values[v]
            self.add(session, pb.ArraySpec(array_id=array_id, dtype=value.dtype, shape=value.shape,
                                           sharding=value.sharding), value.island, value.nbytes)
        return [made[v] for v in program.outputs]

    def drop_session(self, session: Session) -> None:
        """Forgets a closing session's programs and deletes its arrays."""
        self.delete(session, sorted(session.arrays), strict=False)
        for program_id in self.sessions.forget_programs(session):
            self.programs.pop(program_id, None)
