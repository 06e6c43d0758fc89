"""Programs: a block of calls, on one or several islands, traced once into one dataflow graph.

The first run for an input signature runs the Python function with placeholder handles: compiled
function calls and transfers are recorded as graph nodes instead of being sent. The graph is
registered with the controller once; every run after that, with new inputs, is a single command
holding only array ids, so a 128-call program costs the client one queued command, not 128.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

import jax
from jax.sharding import PartitionSpec

from proto import pathways_pb2 as pb
from proto import wire as _wire
from proto.errors import InvalidArgumentError
from runtime.client.array import RemoteArray

if TYPE_CHECKING:
    from runtime.client.client import Client, VirtualSlice
    from runtime.client.function import CompiledFunction


class Trace:
    """The graph being recorded: placeholders (negative ids) numbered as program values."""

    def __init__(self) -> None:
        self._ids = itertools.count(1)
        self.value_of: dict[int, int] = {}  # placeholder id -> value number
        self.handles: list[RemoteArray] = []  # by value number (kept alive while tracing)
        self.nodes: list[pb.ProgramNode] = []

    def new_id(self) -> int:
        return -next(self._ids)

    def add_value(self, handle: RemoteArray) -> None:
        self.value_of[handle.id] = len(self.handles)
        self.handles.append(handle)

    def _value(self, handle: RemoteArray) -> int:
        value = self.value_of.get(handle.id)
        if value is None:
            raise InvalidArgumentError(
                f"a program uses {handle!r}, which is not one of its arguments or computed in it: "
                f"pass it as an argument")
        return value

    def record_call(self, fn: CompiledFunction, inputs: Sequence[RemoteArray],
                    outputs: Sequence[RemoteArray]) -> None:
        node = pb.ProgramNode(call=pb.ProgramCall(executable_id=fn.executable_id,
                                                  inputs=[self._value(h) for h in inputs]))
        self.nodes.append(node)
        for out in outputs:
            self.add_value(out)

    def record_transfer(self, source: RemoteArray, copy: RemoteArray) -> None:
        self.nodes.append(pb.ProgramNode(transfer=pb.ProgramTransfer(
            input=self._value(source), sharding=_wire.spec_to_proto(copy.slice.slice_id, copy.spec))))
        self.add_value(copy)


class _Traced:
    """A registered program for one input signature."""

    def __init__(self, program_id: int, out_tree, outputs: Sequence[RemoteArray],
                 donated: Sequence[int]) -> None:
        self.program_id = program_id
        self.out_tree = out_tree
        self.outputs = [(o.shape, o.dtype, o.spec, o.slice, o.weak_type) for o in outputs]
        self.donated = tuple(donated)


class Program:
    """A function of RemoteArrays whose compiled-function calls and transfers run as one graph.

    Calling it returns output handles at once (before anything runs). The first call per input
    signature (tree structure, shapes, dtypes, slices and shardings) traces and registers the
    graph; later calls with new inputs neither re-trace nor re-send executables.
    """

    def __init__(self, client: Client, fn: Callable, name: str | None = None) -> None:
        self.client, self.fn = client, fn
        self.name = name or getattr(fn, "__name__", "program")
        self._cache: dict[Any, _Traced] = {}
        self.traces = 0

    def __call__(self, *args):
        leaves, in_tree = jax.tree.flatten(args)
        for i, leaf in enumerate(leaves):
            if not isinstance(leaf, RemoteArray):
                raise InvalidArgumentError(f"program {self.name}: argument leaf {i} is "
                                           f"{type(leaf).__name__}; put it on a slice first")
            leaf.check_alive()
        key = (in_tree, tuple((a.shape, a.dtype, a.weak_type, a.slice.slice_id,
                               _wire.sharding_dims(_wire.spec_to_proto(0, a.spec)))
                              for a in leaves))
        traced = self._cache.get(key)
        if traced is None:
            traced = self._trace(in_tree, leaves)
            self._cache[key] = traced
        outputs = [self.client.new_handle(shape, dtype, spec, vslice, weak_type=weak)
                   for shape, dtype, spec, vslice, weak in traced.outputs]
        self.client.commands.submit(pb.Command(run=pb.RunProgramCommand(
            program_id=traced.program_id, inputs=[a.id for a in leaves],
            outputs=[o.id for o in outputs])), outputs)
        for i in traced.donated:
            leaves[i]._mark_consumed()
        return jax.tree.unflatten(traced.out_tree, outputs)

    def _trace(self, in_tree, leaves: Sequence[RemoteArray]) -> _Traced:
        trace = Trace()
        placeholders = []
        for leaf in leaves:
            handle = RemoteArray(self.client, trace.new_id(), leaf.shape, leaf.dtype, leaf.spec,
                                 leaf.slice, weak_type=leaf.weak_type)
            trace.add_value(handle)
            placeholders.append(handle)
        with self.client.tracing(trace):
            out = self.fn(*jax.tree.unflatten(in_tree, placeholders))
        self.traces += 1
        out_leaves, out_tree = jax.tree.flatten(out)
        num_inputs = len(leaves)
        outputs = []
        for i, leaf in enumerate(out_leaves):
            if not isinstance(leaf, RemoteArray) or trace.value_of.get(leaf.id, -1) < num_inputs:
                raise InvalidArgumentError(
                    f"program {self.name}: output leaf {i} must be an array computed inside the "
                    f"program, got {leaf!r}")
            outputs.append(leaf)
        donated = [i for i, handle in enumerate(placeholders) if handle.is_deleted()]
        reply = self.client.call("RegisterProgram", pb.RegisterProgramRequest(
            session_id=self.client.session_id, name=self.name, nodes=trace.nodes,
            outputs=[trace.value_of[o.id] for o in outputs],
            inputs=[pb.ValueSpec(dtype=_wire.dtype_name(a.data_dtype), shape=a.data_shape,
                                 sharding=_wire.spec_to_proto(a.slice.slice_id, a.spec))
                    for a in leaves]))
        return _Traced(reply.program_id, out_tree, outputs, donated)


def transfer_handle(client: Client, source: RemoteArray, vslice: VirtualSlice,
                    spec: PartitionSpec) -> RemoteArray:
    """Queues (or, while tracing, records) a copy of `source` onto `vslice` with `spec`."""
    source.check_alive()
    sharding = _wire.spec_to_proto(vslice.slice_id, spec)
    _wire.shard_groups(source.data_shape, vslice.mesh_shape, sharding)  # validate before queueing
    copy = client.new_handle(source.shape, source.dtype, spec, vslice, weak_type=source.weak_type)
    trace = client.current_trace()
    if trace is not None:
        trace.record_transfer(source, copy)
    else:
        client.commands.submit(pb.Command(transfer=pb.TransferCommand(
            source=source.id, destination=copy.id, sharding=sharding)), [copy])
    return copy
