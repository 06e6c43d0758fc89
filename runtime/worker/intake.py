"""Receipt of the island's order: which instructions of a Dispatch batch are new, and the
order-free work done for them at once (shared by real and simulated hosts, runtime.sim)."""

from __future__ import annotations

from collections.abc import Container, Sequence

from proto import pathways_pb2 as pb
from proto.errors import DeadlineExceededError, InvalidArgumentError
from proto.instructions import kind_of


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
        fresh.append((kind_of(ins).name, ins))
    return fresh


def receive_order_free(host, fresh: Sequence[tuple[str, pb.Instruction]],
                       now: float) -> list[pb.ArraySpec]:
    """The order-free part of receiving instructions (`fresh_instructions`), done at once: pending
    entries for the outputs of executions and for expected arrays (so reads and puts can start),
    slice definitions, which slice each executable runs on, and arrival times. Shared by real and
    simulated hosts (runtime.sim); `host` has the attributes used here. Returns the specs of the
    arrays announced to this host (Expect instructions), which it will accept puts of."""
    announced: list[pb.ArraySpec] = []
    for kind, ins in fresh:
        prepare = _AT_RECEIPT.get(kind)
        if prepare is not None:
            prepare(host, ins, now, announced)
    return announced


def _receive_execute(host, ins: pb.Instruction, now: float, announced: list) -> None:
    if host._executable_slices.get(ins.execute.executable_id) not in host._foreign:
        host._arrival[ins.sequence] = now
        for out in ins.execute.outputs:
            host.store.expect(out)
        if host.hang:  # the executor is stuck: this will never run
            host._fail_outputs(ins.execute, DeadlineExceededError(host.hang))


def _receive_define_slice(host, ins: pb.Instruction, now: float, announced: list) -> None:
    host._define_slice(ins.define_slice.slice)


def _receive_load(host, ins: pb.Instruction, now: float, announced: list) -> None:
    host._executable_slices[ins.load.executable_id] = ins.load.slice_id


def _receive_expect(host, ins: pb.Instruction, now: float, announced: list) -> None:
    if ins.expect.spec.sharding.slice_id not in host._foreign:
        host.store.expect(ins.expect.spec.array_id)
        announced.append(ins.expect.spec)


def _receive_send(host, ins: pb.Instruction, now: float, announced: list) -> None:
    transfers = getattr(host, "_transfers", None)  # simulated hosts send in order
    if transfers is not None:
        transfers.early.start(ins.send, ins.sequence)


#: The order-free work at receipt, per kind of instruction (those `prepared_at_receipt` in
#: proto.instructions.KINDS).
_AT_RECEIPT = {"execute": _receive_execute, "define_slice": _receive_define_slice,
               "load": _receive_load, "expect": _receive_expect, "send": _receive_send}
