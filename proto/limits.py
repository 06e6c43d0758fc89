"""What one request may ask of the runtime: bounds on every field, checked at the door.

Every request a server accepts must still fit everything derived from it: the instructions the
controller forwards to the hosts (one gRPC message each, under the 16 MiB limit), the replies it
gives (GetStatus lists every slice and session), and the work it causes under the controller's
lock. So names, axis names, ranks, counts and repeated fields are bounded here, before a handler
runs, and numbers must be finite and non-negative wherever they arrive (a NaN timeout once passed a
min/max clamp and span a thread forever).

`Limits` holds the bounds (defaults below, the README's security section states them); the servers
take one, tests shrink it. `check_request` applies it to a parsed request message: a malformed
field gets InvalidArgumentError, a count or size over its bound ResourceExhaustedError, both naming
the field, its value and the bound.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Iterable

from proto import pathways_pb2 as pb
from proto import wire as _wire
from proto.errors import InvalidArgumentError, ResourceExhaustedError


@dataclasses.dataclass(frozen=True)
class Limits:
    """Bounds on requests and on what one session may hold. Frozen: servers share one."""

    #: Longest client, executable and program name (characters).
    name_chars: int = 256
    #: Longest mesh axis name (characters).
    axis_name_chars: int = 64
    #: Most mesh axes (a slice's mesh) and most array dimensions.
    mesh_rank: int = 8
    array_rank: int = _wire.MAX_RANK
    #: Longest host address, platform or device kind a host registers with.
    host_field_chars: int = 256
    #: Most arrays one RegisterArrays declares; most commands one Execute carries.
    arrays_per_request: int = 8192
    commands_per_request: int = 8192
    #: Most array ids one request names, all its fields together (inputs, outputs, deletes).
    ids_per_request: int = 1 << 18
    #: Most instructions one Execute may expand into (program runs expand to their nodes).
    instructions_per_request: int = 1 << 20
    #: Most inputs plus outputs of one executable, and most nodes of one program.
    specs_per_executable: int = 16384
    program_nodes: int = 4096
    #: Most shards one GetArray names, and most mesh positions one shard header lists.
    shards_per_read: int = 1 << 16
    positions_per_shard: int = 1 << 16
    #: Longest error text a sender may attach to an array stream (characters).
    error_chars: int = 4096
    #: Largest LoadExecutable request: the load instruction forwarded to every host of the slice
    #: must fit one message with room for the dispatch envelope.
    executable_request_bytes: int = _wire.MAX_MESSAGE_BYTES - (1 << 20)
    #: Open sessions, and what one session may hold at once.
    sessions: int = 1024
    slices_per_session: int = 64
    arrays_per_session: int = 1 << 18
    executables_per_session: int = 4096
    #: Serialized executable bytes one session may have loaded (the controller keeps them to
    #: replay to hosts that join an island).
    executable_bytes_per_session: int = 1 << 30
    programs_per_session: int = 4096
    #: Concurrent calls one session may have on the controller, and streams (PutArray, GetArray)
    #: on one host; calls over the limit fail at once with RESOURCE_EXHAUSTED.
    calls_per_session: int = 16
    streams_per_session: int = 16
    #: Most concurrent client calls a server serves at once, all sessions together (the rest of
    #: its threads stay free for its own cluster: dispatch, peer transfers, registration).
    client_calls: int = 48
    #: A stream that waits this long for its client (the next chunk of a put, the client reading
    #: a fetch) is cancelled.
    stream_idle_s: float = 30.0
    #: Bytes of slice descriptions GetStatus lists at most (the rest are counted, not listed).
    status_slice_bytes: int = 8 << 20


DEFAULT = Limits()


def check_seconds(value: float, what: str, most: float = math.inf) -> float:
    """A duration from the wire: finite, non-negative, at most `most` (clamped)."""
    if not math.isfinite(value) or value < 0:
        raise InvalidArgumentError(f"{what} must be a finite number of seconds >= 0, got {value}")
    return min(value, most)


def report_intervals(request) -> tuple[float, float]:
    """A WatchProgressRequest's (least, most) seconds between two progress reports: at most 1 s
    and 10 s, an idle interval of 0 meaning 1 s, and none under 50 ms."""
    least = check_seconds(request.min_interval_s, "min_interval_s", 1.0)
    idle = check_seconds(request.idle_interval_s, "idle_interval_s", 10.0) or 1.0
    return least, max(idle, 0.05, least)


# -- field checks ---------------------------------------------------------------------------------


def _count(what: str, n: int, most: int) -> None:
    if n > most:
        raise ResourceExhaustedError(f"{what}: {n} entries, more than the limit of {most}")


def _text(what: str, value: str, most: int) -> None:
    if len(value) > most:
        raise InvalidArgumentError(f"{what} is {len(value)} characters long, more than the "
                                   f"limit of {most}")


def _numbers(message) -> None:
    """Every top-level floating-point field of a request: finite and non-negative (timeouts,
    weights, intervals, times: none of them has a meaning below zero)."""
    for field in message.DESCRIPTOR.fields:
        if field.type in (field.TYPE_DOUBLE, field.TYPE_FLOAT) and not field.is_repeated:
            value = getattr(message, field.name)
            if not math.isfinite(value) or value < 0:
                raise InvalidArgumentError(f"{field.name} must be finite and >= 0, got {value}")


def _sharding(limits: Limits, what: str, sharding: pb.Sharding, rank: int) -> None:
    _count(f"{what}: sharding entries", len(sharding.dims), rank)
    for dim in sharding.dims:
        _count(f"{what}: mesh axes of one sharding entry", len(dim.axes), limits.mesh_rank)
        for axis in dim.axes:
            _text(f"{what}: mesh axis name", axis, limits.axis_name_chars)


def _spec(limits: Limits, what: str, spec: pb.ArraySpec | pb.ValueSpec) -> None:
    _text(f"{what}: dtype", spec.dtype, 32)
    _count(f"{what}: dimensions", len(spec.shape), limits.array_rank)
    if any(d < 0 for d in spec.shape):
        raise InvalidArgumentError(f"{what}: negative dimension in shape {list(spec.shape)}")
    _sharding(limits, what, spec.sharding, limits.array_rank)


def _ids(limits: Limits, what: str, counts: Iterable[int]) -> None:
    total = 0
    for n in counts:
        total += n
        if total > limits.ids_per_request:
            break
    _count(f"{what}: array ids", total, limits.ids_per_request)


def _host(limits: Limits, info: pb.HostInfo) -> None:
    for name in ("address", "platform", "device_kind", "backend", "control_address"):
        _text(f"host {name}", getattr(info, name), limits.host_field_chars)
    if info.device_memory_bytes < 0 or info.distributed_hosts < 0:
        raise InvalidArgumentError("host device memory and distributed host count must be >= 0")


def _connect(limits: Limits, r: pb.ConnectRequest) -> None:
    _text("client name", r.client_name, limits.name_chars)


def _create_slice(limits: Limits, r: pb.CreateSliceRequest) -> None:
    _count("mesh shape", len(r.mesh_shape), limits.mesh_rank)
    _count("axis names", len(r.axis_names), limits.mesh_rank)
    for name in r.axis_names:
        _text("mesh axis name", name, limits.axis_name_chars)
    if r.island < -1:
        raise InvalidArgumentError(f"island {r.island} is not an island (-1: any)")


def _load_executable(limits: Limits, r: pb.LoadExecutableRequest) -> None:
    _text("executable name", r.name, limits.name_chars)
    size = r.ByteSize()
    if size > limits.executable_request_bytes:
        raise ResourceExhaustedError(
            f"executable {r.name[:64]!r}: a request of {size} bytes is over the limit of "
            f"{limits.executable_request_bytes} (its load instruction must fit one message to "
            f"each host)")
    _count("executable inputs and outputs", len(r.inputs) + len(r.outputs),
           limits.specs_per_executable)
    for i, spec in enumerate(r.inputs):
        _spec(limits, f"input {i}", spec)
    for i, spec in enumerate(r.outputs):
        _spec(limits, f"output {i}", spec)
    _count("donated inputs", len(r.donated), len(r.inputs))


def _register_arrays(limits: Limits, r: pb.RegisterArraysRequest) -> None:
    _count("arrays", len(r.arrays), limits.arrays_per_request)
    for i, spec in enumerate(r.arrays):
        _spec(limits, f"array {i}", spec)


def _command_ids(command: pb.Command) -> int:
    kind = command.WhichOneof("op")
    if kind == "call":
        return len(command.call.inputs) + len(command.call.outputs)
    if kind == "run":
        return len(command.run.inputs) + len(command.run.outputs)
    if kind == "delete":
        return len(command.delete.array_ids)
    return 2


def _execute(limits: Limits, r: pb.ExecuteRequest) -> None:
    _count("commands", len(r.commands), limits.commands_per_request)
    _ids(limits, "commands", (_command_ids(c) for c in r.commands))
    for n, command in enumerate(r.commands):
        if command.HasField("transfer"):
            _sharding(limits, f"command {n}", command.transfer.sharding, limits.array_rank)


def _register_program(limits: Limits, r: pb.RegisterProgramRequest) -> None:
    _text("program name", r.name, limits.name_chars)
    _count("program inputs", len(r.inputs), limits.specs_per_executable)
    _count("program nodes", len(r.nodes), limits.program_nodes)
    _ids(limits, "program", [len(r.outputs), *(len(n.call.inputs) for n in r.nodes)])
    for i, spec in enumerate(r.inputs):
        _spec(limits, f"program input {i}", spec)
    for n, node in enumerate(r.nodes):
        if node.HasField("transfer"):
            _sharding(limits, f"program node {n}", node.transfer.sharding, limits.array_rank)
        if any(v < 0 for v in node.call.inputs) or node.transfer.input < 0:
            raise InvalidArgumentError(f"program node {n} names a negative value number")
    if any(v < 0 for v in r.outputs):
        raise InvalidArgumentError("a program output names a negative value number")


def _delete_arrays(limits: Limits, r: pb.DeleteArraysRequest) -> None:
    _ids(limits, "delete", [len(r.array_ids)])


def _array_chunk(limits: Limits, r: pb.ArrayChunk) -> None:
    if r.HasField("spec"):
        _spec(limits, "array", r.spec)
    if r.HasField("shard"):
        index = r.shard.index
        _count("shard index", max(len(index.start), len(index.stop)), limits.array_rank)
        _count("mesh positions of a shard", len(r.shard.mesh_positions),
               limits.positions_per_shard)
        _text("shared shard file name", r.shard.shared_file, 64)
    _text("array stream error", r.error, limits.error_chars)


def _get_array(limits: Limits, r: pb.GetArrayRequest) -> None:
    _count("shards", len(r.shards), limits.shards_per_read)
    for index in r.shards:
        _count("shard index", max(len(index.start), len(index.stop)), limits.array_rank)


_CHECKS: dict[str, Callable] = {
    "Connect": _connect,
    "RegisterHost": lambda limits, r: _host(limits, r.host),
    "UnregisterHost": lambda limits, r: _text("host address", r.address,
                                              limits.host_field_chars),
    "CreateSlice": _create_slice,
    "LoadExecutable": _load_executable,
    "RegisterArrays": _register_arrays,
    "Execute": _execute,
    "RegisterProgram": _register_program,
    "DeleteArrays": _delete_arrays,
    "PutArray": _array_chunk,
    "GetArray": _get_array,
}


def check_request(limits: Limits, method: str, request) -> None:
    """InvalidArgumentError or ResourceExhaustedError, naming the field, when a parsed request
    of `method` exceeds `limits` or holds a negative or non-finite number where none belongs.
    Linear in the request's size; for streamed requests, call it on every message."""
    _numbers(request)
    check = _CHECKS.get(method)
    if check is not None:
        check(limits, request)
