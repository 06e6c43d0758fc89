"""The table of instruction kinds (proto.instructions) covers the protocol, and every host runs
each kind it must by table."""

import pytest

from proto import instructions
from proto import pathways_pb2 as pb
from proto.errors import InvalidArgumentError


def test_every_kind_of_the_protocol_has_one_row():
    oneof = pb.Instruction.DESCRIPTOR.oneofs_by_name["op"]
    assert set(instructions.KINDS) == {field.name for field in oneof.fields}


def test_every_host_runs_each_in_order_kind_by_its_table():
    from runtime.sim._host import _IN_ORDER as sim_handlers
    from runtime.worker.executor import _IN_ORDER as worker_handlers
    from runtime.worker.intake import _AT_RECEIPT

    in_order = {k.name for k in instructions.KINDS.values() if k.runs_in_order}
    prepared = {k.name for k in instructions.KINDS.values() if k.prepared_at_receipt}
    assert set(worker_handlers) == in_order
    assert set(sim_handlers) == set(worker_handlers)
    assert set(_AT_RECEIPT) == prepared


def test_reads_and_slices_come_from_the_instruction():
    execute = pb.Instruction(execute=pb.ExecuteInstruction(executable_id=1, inputs=[5, 6]))
    send = pb.Instruction(send=pb.SendInstruction(array_id=9))
    load = pb.Instruction(load=pb.LoadInstruction(executable_id=1, slice_id=3))
    assert instructions.kind_of(execute).reads(execute) == (5, 6)
    assert instructions.kind_of(execute).executes
    assert instructions.kind_of(send).reads(send) == (9,)
    assert instructions.kind_of(load).replayed and instructions.kind_of(load).slice_of(load) == 3
    assert instructions.kind_of(send).slice_of(send) is None


def test_an_instruction_without_an_operation_is_refused():
    with pytest.raises(InvalidArgumentError, match="instruction 7 has no operation"):
        instructions.kind_of(pb.Instruction(sequence=7))
