"""The kinds of instruction in an island's order, as data: one row per `pb.Instruction.op`.

Who reads the table: the gang scheduler (which instructions are device work it estimates and
charges, which arrays each reads, which are kept in the history replayed to a host that joins
later, and what ordering one means for its readiness bookkeeping), and each host (which are
checked and prepared at receipt, which its executor runs in sequence order). A new kind of
instruction is a new row here plus a handler in each host's table (runtime.worker.executor,
runtime.sim); tests/test_instructions.py checks that every kind has both.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

from proto import pathways_pb2 as pb
from proto.errors import InvalidArgumentError


def _no_arrays(ins: pb.Instruction) -> tuple[int, ...]:
    return ()


def _no_slice(ins: pb.Instruction) -> int | None:
    return None


@dataclasses.dataclass(frozen=True)
class InstructionKind:
    """One kind of instruction.

    `executes`: device work (the scheduler estimates its cost and charges its tenant).
    `replayed`: kept in the island's history, which a host joining later receives first.
    `prepared_at_receipt`: a host does order-free work for it on arrival (entries for the arrays
    it makes, meshes, which slice an executable runs on, sends that start once their source
    exists), before its turn.
    `runs_in_order`: the host's executor applies it at its place in the order.
    `reads`: the arrays it reads (it waits until they exist or will).
    `slice_of`: the slice it concerns, for kinds dropped from the history with their slice.
    """

    name: str
    executes: bool = False
    replayed: bool = False
    prepared_at_receipt: bool = False
    runs_in_order: bool = True
    reads: Callable[[pb.Instruction], tuple[int, ...]] = _no_arrays
    slice_of: Callable[[pb.Instruction], int | None] = _no_slice


KINDS: dict[str, InstructionKind] = {kind.name: kind for kind in (
    InstructionKind("define_slice", replayed=True, prepared_at_receipt=True, runs_in_order=False,
                    slice_of=lambda ins: ins.define_slice.slice.slice_id),
    InstructionKind("release_slice"),
    InstructionKind("load", replayed=True, prepared_at_receipt=True,
                    slice_of=lambda ins: ins.load.slice_id),
    InstructionKind("execute", executes=True, prepared_at_receipt=True,
                    reads=lambda ins: tuple(ins.execute.inputs)),
    InstructionKind("delete"),
    InstructionKind("expect", prepared_at_receipt=True, runs_in_order=False),
    InstructionKind("send", prepared_at_receipt=True, reads=lambda ins: (ins.send.array_id,)),
)}


def kind_of(ins: pb.Instruction) -> InstructionKind:
    """The kind of an instruction; InvalidArgumentError for one without an operation (or of a
    kind this build does not know)."""
    name = ins.WhichOneof("op")
    kind = KINDS.get(name) if name is not None else None
    if kind is None:
        raise InvalidArgumentError(f"instruction {ins.sequence} has no operation"
                                   if name is None else
                                   f"instruction {ins.sequence} has an unknown operation {name!r}")
    return kind
