"""Programs that arrive as a StableHLO module plus XLA compile options, not as a jax.export module.

This is what a JAX program's own `jax.jit` lowering looks like (what the IFRT proxy receives,
runtime.proxy): a module whose `main` takes and returns the global arrays, annotated with their
shardings, and the PjRt compile options JAX chose (partition count, device assignment, Shardy).
The controller reads the module's signature to check a load against it; a host compiles the
module itself for the slice's devices, with the client's options but the slice's device
assignment, and runs it on the arrays it holds (`StableHLOExecutable`).
"""

from __future__ import annotations

import dataclasses
import hashlib
from collections.abc import Sequence

import jax
import numpy as np
from jax._src.interpreters import mlir as jax_mlir
from jax._src.lib import xla_client as xc
from jaxlib.mlir import ir
from jaxlib.mlir.dialects import stablehlo

from proto import wire as _wire
from proto.errors import InvalidArgumentError
from proto.ifrt import xla_pb2

_ELEMENT_TYPES = {
    "i1": "bool", "i8": "int8", "i16": "int16", "i32": "int32", "i64": "int64",
    "ui8": "uint8", "ui16": "uint16", "ui32": "uint32", "ui64": "uint64",
    "f16": "float16", "bf16": "bfloat16", "f32": "float32", "f64": "float64",
    "complex<f32>": "complex64", "complex<f64>": "complex128",
}
#: Argument attributes that let XLA reuse an input's buffer for an output.
_DONATION_ATTRIBUTES = ("tf.aliasing_output", "jax.buffer_donor")


def fingerprint(module: bytes, options: bytes) -> str:
    """sha256 of a module and its compile options, hex: equal loads share it."""
    digest = hashlib.sha256(module)
    digest.update(b"\0options\0")
    digest.update(options)
    return digest.hexdigest()


@dataclasses.dataclass(frozen=True)
class Signature:
    """What a module's `main` takes and returns (global shapes), and what it may consume."""

    name: str
    inputs: tuple[tuple[tuple[int, ...], np.dtype], ...]
    outputs: tuple[tuple[tuple[int, ...], np.dtype], ...]
    donated: tuple[int, ...]
    num_partitions: int
    num_replicas: int


def read_signature(module: bytes) -> Signature:
    """The signature of a StableHLO module (a portable artifact, MLIR bytecode or text).

    InvalidArgumentError when the bytes are not such a module, have no public `main`, or use
    types the runtime's wire does not carry."""
    context = jax_mlir.make_ir_context()
    with context:
        try:
            parsed = stablehlo.deserialize_portable_artifact(context, module)
        except Exception:
            try:
                parsed = ir.Module.parse(module)
            except Exception as exc:
                raise InvalidArgumentError(f"not a StableHLO module: {exc}") from None
        attributes = parsed.operation.attributes
        name = ir.StringAttr(attributes["sym_name"]).value if "sym_name" in attributes else ""
        partitions = _int_attribute(attributes, "mhlo.num_partitions")
        replicas = _int_attribute(attributes, "mhlo.num_replicas")
        main = next((op for op in parsed.body.operations if op.operation.name == "func.func"
                     and ir.StringAttr(op.operation.attributes["sym_name"]).value == "main"),
                    None)
        if main is None:
            raise InvalidArgumentError("the StableHLO module has no main function")
        kind = ir.FunctionType(ir.TypeAttr(main.operation.attributes["function_type"]).value)
        inputs = tuple(_tensor(t, f"input {i}") for i, t in enumerate(kind.inputs))
        outputs = tuple(_tensor(t, f"output {i}") for i, t in enumerate(kind.results))
        donated = []
        if "arg_attrs" in main.operation.attributes:
            for i, attrs in enumerate(ir.ArrayAttr(main.operation.attributes["arg_attrs"])):
                names = {a.name for a in ir.DictAttr(attrs)}
                if names.intersection(_DONATION_ATTRIBUTES):
                    donated.append(i)
    return Signature(name, inputs, outputs, tuple(donated), partitions, replicas)


def _int_attribute(attributes, key: str) -> int:
    return ir.IntegerAttr(attributes[key]).value if key in attributes else 1


def _tensor(kind, what: str) -> tuple[tuple[int, ...], np.dtype]:
    try:
        tensor = ir.RankedTensorType(kind)
    except ValueError:
        raise InvalidArgumentError(f"{what} of main is {kind}, not a ranked tensor") from None
    element = str(tensor.element_type)
    if element not in _ELEMENT_TYPES or not tensor.has_static_shape:
        raise InvalidArgumentError(f"{what} of main is {kind}: the runtime holds static arrays "
                                   f"of {', '.join(sorted(set(_ELEMENT_TYPES.values())))}")
    return tuple(tensor.shape), _wire.dtype_from_name(_ELEMENT_TYPES[element])


def check_load(name: str, module: bytes, options: bytes, inputs: Sequence, outputs: Sequence,
               donated: Sequence[int], devices: int) -> Signature:
    """InvalidArgumentError unless a load's claimed specs (dtype, shape of each input and output)
    match the module, its donations are the module's, and it partitions over `devices`."""
    signature = read_signature(module)
    parse_options(options)
    for what, specs, values in (("input", inputs, signature.inputs),
                                ("output", outputs, signature.outputs)):
        if len(specs) != len(values):
            raise InvalidArgumentError(f"{name!r}: {len(specs)} {what} specs for a module with "
                                       f"{len(values)} {what}s")
        for i, (spec, (shape, dtype)) in enumerate(zip(specs, values)):
            if (_wire.dtype_from_name(spec.dtype), tuple(spec.shape)) != (dtype, shape):
                raise InvalidArgumentError(f"{name!r}: {what} {i} is {dtype}{list(shape)} in the "
                                           f"module, {spec.dtype}{list(spec.shape)} in the request")
    if tuple(sorted(donated)) != signature.donated:
        raise InvalidArgumentError(f"{name!r}: donated inputs {sorted(donated)}, the module "
                                   f"donates {list(signature.donated)}")
    if signature.num_replicas != 1 or signature.num_partitions != devices:
        raise InvalidArgumentError(f"{name!r} is for {signature.num_replicas} replicas x "
                                   f"{signature.num_partitions} partitions; its slice has "
                                   f"{devices} devices (one replica)")
    return signature


def parse_options(options: bytes) -> xla_pb2.CompileOptionsProto:
    """Serialized xla.CompileOptionsProto; InvalidArgumentError if it does not parse."""
    try:
        return xla_pb2.CompileOptionsProto.FromString(options)
    except Exception as exc:  # protobuf DecodeError
        raise InvalidArgumentError(f"compile options do not parse: {exc}") from None


def compile_options(options: bytes, device_ids: Sequence[int], *, process_index: int = 0,
                    process_count: int = 1) -> xc.CompileOptions:
    """The client's compile options with the device assignment of `device_ids` (one replica,
    one partition per device, in order) and this process's place among the hosts."""
    proto = parse_options(options)
    build = proto.executable_build_options
    build.num_replicas, build.num_partitions = 1, len(device_ids)
    build.process_index, build.process_count = process_index, process_count
    build.device_assignment.CopyFrom(xla_pb2.DeviceAssignmentProto(
        replica_count=1, computation_count=len(device_ids),
        computation_devices=[xla_pb2.DeviceAssignmentProto.ComputationDevice(
            replica_device_ids=[d]) for d in device_ids]))
    return xc.CompileOptions.ParseFromString(proto.SerializeToString())


def compile_module(module: bytes, options: bytes, devices: Sequence[jax.Device]):
    """Compiles a module for `devices` (one partition each, in order): a jaxlib LoadedExecutable."""
    if not devices:
        raise InvalidArgumentError("a program needs at least one device")
    client = devices[0].client
    return client.compile_and_load(
        module, xc.DeviceList(tuple(devices)),
        compile_options(options, [d.id for d in devices], process_index=jax.process_index(),
                        process_count=jax.process_count()))


def check_shardings(executable, name: str, in_shardings: Sequence[jax.sharding.Sharding],
                    out_shardings: Sequence[jax.sharding.Sharding],
                    in_ranks: Sequence[int], out_ranks: Sequence[int]) -> None:
    """InvalidArgumentError unless the compiled executable takes and returns its arrays laid out
    as the load says (the arrays a host passes it are laid out so; its outputs are labelled so)."""
    from jax._src.sharding_impls import GSPMDSharding

    for what, expected, compiled, ranks in (
            ("input", in_shardings, executable.get_parameter_shardings(), in_ranks),
            ("output", out_shardings, executable.get_output_shardings(), out_ranks)):
        if compiled is None:
            continue
        for i, (want, got, rank) in enumerate(zip(expected, compiled, ranks)):
            actual = GSPMDSharding(list(want._device_assignment), got)
            if not want.is_equivalent_to(actual, rank):
                raise InvalidArgumentError(f"{name}: {what} {i} compiles to sharding {actual}, "
                                           f"the load says {want}")


class StableHLOExecutable:
    """A compiled module as a host runs it: called with the input jax.Arrays (laid out as the
    module's parameter shardings), returns the outputs as jax.Arrays with `out_shardings`."""

    def __init__(self, executable, out_shardings: Sequence[jax.sharding.Sharding],
                 out_shapes: Sequence[tuple[tuple[int, ...], np.dtype]]) -> None:
        self.executable = executable
        self._handlers = [
            xc.array_result_handler(jax.core.ShapedArray(shape, dtype), sharding, committed=True,
                                    _skip_checks=True)
            for (shape, dtype), sharding in zip(out_shapes, out_shardings)]

    def __call__(self, *args: jax.Array) -> list[jax.Array]:
        results = self.executable.execute_sharded(list(args))
        return results.consume_with_handlers(self._handlers)

    def as_text(self) -> str:
        return "\n".join(m.to_string() for m in self.executable.hlo_modules())
