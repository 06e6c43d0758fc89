"""Programs a JAX client compiles through the proxy: analysed here, loaded on an island, called.

JAX sends its `jax.jit` lowering as is: a StableHLO module plus compile options whose device
assignment names the client's device ids. What JAX then needs to know at once (how XLA shards
each output it left unsharded, layouts, donations) only a compilation says, so the proxy compiles
the module on local CPU devices (`Analyzer`) with the same options, partition for partition; the
island's hosts compile it again for their own devices when the controller orders the load, and
check that they arrive at the same shardings (proto.stablehlo). A call is a runtime call of
that executable on the slice its shardings share (runtime.client.function.CompiledFunction).
"""

from __future__ import annotations

import collections
import dataclasses
import threading
from collections.abc import Sequence

import jax
import numpy as np
from jax._src.lib import xla_client as xc
from jax.sharding import PartitionSpec

from proto import pathways_pb2 as pb
from proto import stablehlo as _stablehlo
from proto import wire as _wire
from proto.config import ProxyConfig, from_env
from proto.errors import FailedPreconditionError, InvalidArgumentError
from proto.ifrt import types_pb2, xla_pb2
from runtime.client.function import CompiledFunction
from runtime.proxy._arrays import slice_for
from runtime.proxy._shardings import Layout, layout_from_op_sharding, place
from runtime.proxy._status import UnimplementedError

XLA_PROGRAM = "xla::ifrt::XlaProgram"
XLA_COMPILE_OPTIONS = "xla::ifrt::XlaCompileOptions"
#: Analyses kept for programs compiled again (by this or another session).
ANALYSIS_CACHE = from_env(ProxyConfig).proxy_analysis_cache


@dataclasses.dataclass(frozen=True)
class Analysis:
    """What compiling a program tells: its signature, shardings (XLA OpShardings over device
    positions), layouts, and the executable (for cost analysis and program text)."""

    signature: _stablehlo.Signature
    parameter_shardings: tuple[xla_pb2.OpSharding, ...]
    output_shardings: tuple[xla_pb2.OpSharding, ...]
    parameter_layouts: tuple[xla_pb2.LayoutProto, ...]
    output_layouts: tuple[xla_pb2.LayoutProto, ...]
    executable: object  # jaxlib LoadedExecutable on the analysis devices
    fingerprint: bytes


class Analyzer:
    """Compiles programs on local devices (default: this process's CPU devices) for their
    metadata. Thread-safe; remembers recent programs by fingerprint."""

    def __init__(self, devices: Sequence[jax.Device] | None = None) -> None:
        self._devices = list(devices) if devices is not None else None
        self._cache: collections.OrderedDict[str, Analysis] = collections.OrderedDict()
        self._lock = threading.Lock()

    def analyze(self, module: bytes, options: bytes, partitions: int) -> Analysis:
        key = _stablehlo.fingerprint(module, options)
        with self._lock:
            if key in self._cache:
                self._cache.move_to_end(key)
                return self._cache[key]
        devices = self._devices if self._devices is not None else jax.devices("cpu")
        if len(devices) < partitions:
            raise FailedPreconditionError(
                f"the proxy compiles programs on {len(devices)} local devices to learn their "
                f"shardings; this one has {partitions} partitions (start the proxy with more "
                f"analysis devices)")
        signature = _stablehlo.read_signature(module)
        try:
            executable = _stablehlo.compile_module(module, options, devices[:partitions])
        except Exception as exc:  # XLA's compile errors: the program is at fault
            raise InvalidArgumentError(f"compiling {signature.name or 'the program'} failed: "
                                       f"{exc}") from None
        # A one-partition program reports no shardings: everything is on its one device.
        replicated = xla_pb2.OpSharding(type=xla_pb2.OpSharding.REPLICATED)
        parameters = executable.get_parameter_shardings()
        outputs = executable.get_output_shardings()
        analysis = Analysis(
            signature,
            tuple(_op_sharding(s) for s in parameters) if parameters is not None
            else (replicated,) * len(signature.inputs),
            tuple(_op_sharding(s) for s in outputs) if outputs is not None
            else (replicated,) * len(signature.outputs),
            tuple(_layout(x) for x in executable.get_parameter_layouts()),
            tuple(_layout(x) for x in executable.get_output_layouts()),
            executable, str(executable.fingerprint).encode())
        with self._lock:
            self._cache[key] = analysis
            while len(self._cache) > ANALYSIS_CACHE:
                self._cache.popitem(last=False)
        return analysis


def _op_sharding(sharding) -> xla_pb2.OpSharding:
    """An XLA OpSharding in tile-assignment form (not over named mesh axes)."""
    tiled = xc.HloSharding.v3_to_v2_sharding(xc.HloSharding.from_proto(sharding))
    return xla_pb2.OpSharding.FromString(tiled.to_proto().SerializeToString())


def _layout(layout) -> xla_pb2.LayoutProto:
    return xla_pb2.LayoutProto(minor_to_major=list(layout._xla_layout().minor_to_major()))


@dataclasses.dataclass(frozen=True)
class Executable:
    """A program loaded for one session: its analysis, device list, the layouts of its inputs and
    outputs, and the runtime function that calls it."""

    name: str
    devices: tuple[int, ...]
    analysis: Analysis
    in_layouts: tuple[Layout, ...]
    out_layouts: tuple[Layout, ...]
    function: CompiledFunction

    @property
    def out_avals(self):
        return self.function.out_avals


def compile_program(session, program: types_pb2.Serialized, options: types_pb2.Serialized,
                    host_callbacks: Sequence[bytes]) -> Executable:
    """Analyses a program and loads it on the island of its devices (for this session)."""
    if program.type_name != XLA_PROGRAM:
        raise UnimplementedError(f"programs of type {program.type_name or '(none)'} are not "
                                 f"supported by the proxy (only {XLA_PROGRAM})")
    if options.type_name != XLA_COMPILE_OPTIONS:
        raise UnimplementedError(f"compile options of type {options.type_name or '(none)'} are "
                                 f"not supported by the proxy (only {XLA_COMPILE_OPTIONS})")
    if host_callbacks:
        raise UnimplementedError("programs with host callbacks (jax.debug.print, "
                                 "jax.pure_callback, io_callback) are not supported by the proxy")
    try:
        xla_options = types_pb2.XlaCompileOptionsProto.FromString(options.data).compile_options
    except Exception as exc:  # protobuf DecodeError
        raise InvalidArgumentError(f"compile options do not parse: {exc}") from None
    assignment = xla_options.executable_build_options.device_assignment
    if assignment.replica_count > 1:
        raise UnimplementedError("programs with several replicas (pmap-style) are not supported "
                                 "by the proxy; use jax.jit with shardings")
    devices = tuple(int(c.replica_device_ids[0]) for c in assignment.computation_devices
                    if c.replica_device_ids)
    if not devices:
        raise UnimplementedError("programs without a device assignment are not supported by "
                                 "the proxy")
    session.devices.island_of(devices, "the computation")
    module, serialized_options = program.data, xla_options.SerializeToString()
    analysis = session.analyzer.analyze(module, serialized_options, len(devices))
    signature = analysis.signature
    if (len(analysis.parameter_shardings), len(analysis.output_shardings)) != (
            len(signature.inputs), len(signature.outputs)):
        raise UnimplementedError(f"{signature.name}: tuple-shaped parameters or outputs are not "
                                 f"supported by the proxy")
    in_layouts = tuple(layout_from_op_sharding(op, devices, len(shape))
                       for op, (shape, _) in zip(analysis.parameter_shardings, signature.inputs))
    out_layouts = tuple(layout_from_op_sharding(op, devices, len(shape))
                        for op, (shape, _) in zip(analysis.output_shardings, signature.outputs))
    name = signature.name or "program"
    placement = place(in_layouts + out_layouts, name)
    vslice = slice_for(session, placement)
    specs = placement.specs
    in_specs, out_specs = specs[:len(in_layouts)], specs[len(in_layouts):]
    reply = session.client.call("LoadExecutable", pb.LoadExecutableRequest(
        session_id=session.client.session_id, slice_id=vslice.slice_id, serialized=module,
        format=pb.STABLEHLO, compile_options=serialized_options, name=name,
        inputs=_value_specs(signature.inputs, in_specs, vslice.slice_id),
        outputs=_value_specs(signature.outputs, out_specs, vslice.slice_id),
        donated=signature.donated), timeout=max(session.client.timeout_s, 300.0))
    avals = lambda values: tuple(jax.ShapeDtypeStruct(s, d) for s, d in values)  # noqa: E731
    function = CompiledFunction(
        session.client, vslice, name, reply.executable_id,
        jax.tree.structure(tuple(range(len(signature.inputs)))), avals(signature.inputs),
        tuple(in_specs), jax.tree.structure(tuple(range(len(signature.outputs)))),
        avals(signature.outputs), tuple(out_specs), signature.donated, len(module))
    return Executable(name, devices, analysis, in_layouts, out_layouts, function)


def _value_specs(values, specs: Sequence[PartitionSpec], slice_id: int) -> list[pb.ValueSpec]:
    return [pb.ValueSpec(dtype=_wire.dtype_name(dtype), shape=shape,
                         sharding=_wire.spec_to_proto(slice_id, spec))
            for (shape, dtype), spec in zip(values, specs)]


def check_devices(executable: Executable, device_ids: Sequence[int]) -> None:
    """An execution names the executable's devices, or none."""
    if device_ids and tuple(device_ids) != executable.devices:
        raise UnimplementedError(f"{executable.name} was compiled for devices "
                                 f"{list(executable.devices)}; running it on {list(device_ids)} "
                                 f"is not supported by the proxy")


def cost_attributes(executable: Executable) -> types_pb2.AttributeMapProto:
    """XLA's cost analysis of the program (from the analysis compile)."""
    costs = types_pb2.AttributeMapProto()
    for key, value in (executable.analysis.executable.cost_analysis() or {}).items():
        if isinstance(value, (bool, np.bool_)):
            costs.attributes[key].bool_value = bool(value)
        elif isinstance(value, (int, np.integer)):
            costs.attributes[key].int64_value = int(value)
        elif isinstance(value, (float, np.floating)):
            costs.attributes[key].float_value = float(value)
        elif isinstance(value, str):
            costs.attributes[key].string_value = value.encode()
    return costs
