"""Receipt of the island's order: which instructions of a Dispatch batch are new, and the
order-free work done for them at once (shared by real and simulated hosts, runtime.sim)."""

from __future__ import annotations

from collections.abc import Container, Sequence

from proto import pathways_pb2 as pb
from proto.errors import DeadlineExceededError, InvalidArgumentError


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
