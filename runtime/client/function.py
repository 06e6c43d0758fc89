"""Compiled functions: a JAX function lowered once to StableHLO for a virtual slice, then called.

The client traces and exports the function with `jax.export` against the slice's AbstractMesh (no
devices needed), sends the serialized module to the controller once, and from then on a call is
just ids: input handles in, fresh output handles out, known before anything runs.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

import jax
from jax.sharding import NamedSharding, PartitionSpec

from proto import pathways_pb2 as pb
from proto import wire as _wire
from proto.config import ClientConfig, from_env
from proto.errors import InvalidArgumentError, ResourceExhaustedError
from runtime.client import avals as _avals
from runtime.client.array import RemoteArray

if TYPE_CHECKING:
    from runtime.client.client import Client, VirtualSlice

SpecTree = Any  # a PartitionSpec, None, or a pytree prefix of them

#: Largest serialized program sent: it travels whole in the controller's Dispatch batches to the
#: hosts, which are cut at about 8 MiB and must stay under gRPC's message limit (proto.wire).
MAX_EXECUTABLE_BYTES = from_env(ClientConfig).max_executable_bytes


def same_spec(a: PartitionSpec, b: PartitionSpec) -> bool:
    """Whether two specs shard alike (trailing unsplit entries do not matter)."""
    return a == b or _wire.sharding_dims(_wire.spec_to_proto(0, a)) == _wire.sharding_dims(
        _wire.spec_to_proto(0, b))


def _shape_dtype(leaf) -> tuple[tuple[int, ...], Any]:
    """(shape, canonical dtype) of an argument leaf, cheaply for handles."""
    if isinstance(leaf, RemoteArray):
        return leaf.shape, leaf.dtype
    aval = _avals.abstractify(leaf)
    return tuple(aval.shape), _avals.logical_dtype(aval.dtype)


def _is_spec(x) -> bool:
    return x is None or isinstance(x, PartitionSpec)


def broadcast_specs(specs: SpecTree, tree: Any, what: str) -> list[PartitionSpec | None]:
    """Flat specs, one per leaf of `tree`, from a spec pytree prefix of it.

    As in JAX, `None` in `tree` is an empty subtree (it has no leaves, so it takes no spec), and a
    `None` in `specs` stands for replicated over the whole subtree it covers.
    """
    flat: list[PartitionSpec | None] = []

    def expand(spec, subtree) -> None:
        if not _is_spec(spec):
            raise InvalidArgumentError(f"{what} must be PartitionSpecs (or None), got {spec!r}")
        flat.extend([spec] * len(jax.tree.leaves(subtree)))

    try:
        jax.tree.map(expand, specs, tree, is_leaf=_is_spec)
    except InvalidArgumentError:
        raise
    except (ValueError, TypeError) as exc:
        raise InvalidArgumentError(f"{what} do not match the structure of the values: {exc}") from None
    return flat


def leaf_path(tree: Any, index: int, root: str) -> str:
    """How JAX names leaf `index` of `tree` in its errors, e.g. "args[1]['w']"."""
    path, _ = jax.tree_util.tree_flatten_with_path(tree)[0][index]
    return root + jax.tree_util.keystr(path)


def leaf_avals(leaves: Sequence, tree: Any, root: str, what: str) -> list[jax.ShapeDtypeStruct]:
    """Abstract values of argument leaves as `jax.jit` gives them (runtime.client.avals); a leaf that is
    not an array is a TypeError naming it."""
    avals = []
    for i, leaf in enumerate(leaves):
        if isinstance(leaf, RemoteArray):
            avals.append(leaf.aval)
            continue
        try:
            avals.append(_avals.abstractify(leaf))
        except _avals.NotAnArrayError as exc:
            raise _avals.not_an_array(f"{what}: {leaf_path(tree, i, root)}", leaf, exc) from None
        except OverflowError as exc:
            raise OverflowError(f"{what}: {leaf_path(tree, i, root)}: {exc}") from None
    return avals


def check_spec(mesh: _wire.MeshShape, slice_id: int, aval, spec: PartitionSpec, what: str) -> None:
    """InvalidArgumentError unless `spec` shards a value of `aval` on the slice's mesh: known
    axes, each used once, no more entries than dimensions, even splits."""
    shape, _ = _avals.data_layout(aval.shape, aval.dtype)
    try:
        _wire.shard_groups(shape, mesh, _wire.spec_to_proto(slice_id, spec))
    except InvalidArgumentError as exc:
        raise InvalidArgumentError(f"{what} {spec}: {exc}") from None


@dataclasses.dataclass(frozen=True)
class CompiledFunction:
    """A function lowered for fixed input shapes, dtypes and shardings on one slice.

    Calling it validates the arguments against that signature (InvalidArgumentError on a mismatch,
    ArrayNotFoundError for a deleted handle), enqueues the computation and returns output handles
    at once: the call returns before the computation has run.
    """

    client: Client
    vslice: VirtualSlice
    name: str
    executable_id: int
    in_tree: Any
    in_avals: tuple[jax.ShapeDtypeStruct, ...]
    in_specs: tuple[PartitionSpec, ...]
    out_tree: Any
    out_avals: tuple[jax.ShapeDtypeStruct, ...]
    out_specs: tuple[PartitionSpec, ...]
    donated: tuple[int, ...]
    serialized_size: int

    @property
    def signature(self) -> tuple[tuple[tuple[int, ...], Any], ...]:
        """(shape, dtype) per flat input, for cheap checks on every call."""
        sig = self.__dict__.get("_signature")
        if sig is None:
            sig = tuple((tuple(a.shape), _avals.logical_dtype(a.dtype)) for a in self.in_avals)
            object.__setattr__(self, "_signature", sig)
        return sig

    def __call__(self, *args):
        leaves, tree = jax.tree.flatten(args)
        if tree != self.in_tree:
            raise InvalidArgumentError(f"{self.name}: arguments have structure {tree}, the "
                                       f"function was compiled for {self.in_tree}")
        for i, (leaf, want) in enumerate(zip(leaves, self.signature)):
            try:
                got = _shape_dtype(leaf)
            except (TypeError, OverflowError):
                leaf_avals([leaf], leaf, f"argument leaf {i}", self.name)  # names the leaf
                raise
            if got != want:
                raise InvalidArgumentError(
                    f"{self.name}: argument leaf {i} is {got[1]}{list(got[0])}, the function "
                    f"was compiled for {want[1]}{list(want[0])}")
        to_put = [i for i, leaf in enumerate(leaves) if not isinstance(leaf, RemoteArray)]
        if to_put:
            placed = self.client.put_flat([leaves[i] for i in to_put],
                                           [self.in_specs[i] for i in to_put], self.vslice,
                                           [self.in_avals[i] for i in to_put])
            for i, array in zip(to_put, placed):
                leaves[i] = array
        for i, leaf in enumerate(leaves):
            leaf.check_alive()
            if leaf.slice.slice_id != self.vslice.slice_id or not same_spec(leaf.spec,
                                                                            self.in_specs[i]):
                leaves[i] = self.client.transfer(leaf, self.vslice, self.in_specs[i])
        outputs = [self.client.new_handle(aval.shape, aval.dtype, spec, self.vslice,
                                           weak_type=aval.weak_type)
                   for aval, spec in zip(self.out_avals, self.out_specs)]
        trace = self.client.current_trace()
        if trace is not None:
            trace.record_call(self, leaves, outputs)
        else:
            self.client.commands.submit(pb.Command(call=pb.Call(
                executable_id=self.executable_id, inputs=[a.id for a in leaves],
                outputs=[a.id for a in outputs])), outputs)
        for i in self.donated:
            leaves[i]._mark_consumed()
        return jax.tree.unflatten(self.out_tree, outputs)


class RemoteFunction:
    """A JAX function bound to a virtual slice, compiled per input signature (like `jax.jit`).

    `in_specs`/`out_specs` are PartitionSpecs on the slice's mesh, given as a single spec or a
    pytree prefix of the arguments/outputs. `in_specs=None` takes each RemoteArray argument's own
    sharding (other arguments are replicated); `out_specs=None` replicates the outputs.
    """

    def __init__(self, client: Client, fn: Callable, vslice: VirtualSlice, *,
                 in_specs: SpecTree = None, out_specs: SpecTree = None,
                 donate_argnums: int | Sequence[int] = (), name: str | None = None) -> None:
        self.client, self.fn, self.vslice = client, fn, vslice
        # As jax.jit: a list of per-argument specs is taken as the tuple of them.
        self.in_specs = tuple(in_specs) if isinstance(in_specs, list) else in_specs
        self.out_specs = out_specs
        self.donate_argnums = ((donate_argnums,) if isinstance(donate_argnums, int)
                               else tuple(donate_argnums))
        self.name = name or getattr(fn, "__name__", "function")
        self._cache: dict[Any, CompiledFunction] = {}
        # Calls whose arguments are all handles skip building avals: keyed on the handles' own
        # (shape, dtype, spec), which fix the signature whatever `in_specs` says.
        self._by_handles: dict[Any, CompiledFunction] = {}

    def _flat_in_specs(self, args: tuple) -> list[PartitionSpec]:
        if self.in_specs is None:
            return [leaf.spec if isinstance(leaf, RemoteArray) else PartitionSpec()
                    for leaf in jax.tree.leaves(args)]
        return [s or PartitionSpec() for s in broadcast_specs(self.in_specs, args, "in_specs")]

    def lower(self, *args) -> CompiledFunction:
        """Exports and loads the function for these arguments (handles, arrays or
        jax.ShapeDtypeStructs); returns the CompiledFunction, without running it.

        Raises TypeError naming an argument that is not an array (as `jax.jit` does),
        InvalidArgumentError for specs the slice's mesh cannot hold or a function that cannot run
        on the islands (a host callback)."""
        leaves, in_tree = jax.tree.flatten(args)
        avals = tuple(leaf_avals(leaves, args, "args", self.name))
        in_specs = tuple(self._flat_in_specs(args))
        key = (in_tree, avals, in_specs)
        compiled = self._cache.get(key)
        if compiled is None:
            compiled = self._export(args, in_tree, avals, in_specs)
            self._cache[key] = compiled
        return compiled

    def __call__(self, *args):
        """Calls the function; returns output handles before the computation has run."""
        leaves, in_tree = jax.tree.flatten(args)
        if all(isinstance(leaf, RemoteArray) for leaf in leaves):
            key = (in_tree, tuple((a.shape, a.dtype, a.weak_type, a.spec) for a in leaves))
            compiled = self._by_handles.get(key)
            if compiled is None:
                compiled = self._by_handles[key] = self.lower(*args)
            return compiled(*args)
        return self.lower(*args)(*args)

    def _export(self, args, in_tree, avals, in_specs) -> CompiledFunction:
        mesh, slice_id = self.vslice.mesh, self.vslice.slice_id
        for i, (aval, spec) in enumerate(zip(avals, in_specs)):
            check_spec(self.vslice.mesh_shape, slice_id, aval, spec,
                       f"{self.name}: in_specs of {leaf_path(args, i, 'args')}:")
        out_trees = []

        def flat_fn(*leaves):
            out = self.fn(*jax.tree.unflatten(in_tree, leaves))
            out_leaves, out_tree = jax.tree.flatten(out)
            out_trees.append(out_tree)
            return tuple(out_leaves)

        with jax.sharding.use_abstract_mesh(mesh):  # the slice's mesh is current while tracing
            jaxpr, out_shapes = jax.make_jaxpr(flat_fn, return_shape=True)(*avals)
        _avals.check_no_host_callback(jaxpr, self.name)
        out_tree = out_trees[-1]
        if self.out_specs is None:
            out_specs = tuple(PartitionSpec() for _ in out_shapes)
        else:
            out_specs = tuple(s or PartitionSpec() for s in broadcast_specs(
                self.out_specs, jax.tree.unflatten(out_tree, list(out_shapes)), "out_specs"))
        for i, (aval, spec) in enumerate(zip(out_shapes, out_specs)):
            check_spec(self.vslice.mesh_shape, slice_id, aval, spec,
                       f"{self.name}: out_specs of output leaf {i}:")
        donated = tuple(i for i, path in enumerate(_leaf_arg_positions(args))
                        if path in self.donate_argnums)
        # What travels: typed keys as their key data (runtime.client.avals).
        data_avals = [_avals.physical_aval(a) for a in avals]
        jitted = jax.jit(_avals.physical_function(flat_fn, [a.dtype for a in avals]),
                         in_shardings=tuple(NamedSharding(mesh, s) for s in in_specs),
                         out_shardings=tuple(NamedSharding(mesh, s) for s in out_specs),
                         donate_argnums=donated)
        try:
            with jax.sharding.use_abstract_mesh(mesh):
                exported = jax.export.export(jitted, platforms=(self.vslice.platform,))(*data_avals)
            serialized = bytes(exported.serialize())
        except (ValueError, NotImplementedError, TypeError) as exc:
            raise InvalidArgumentError(f"{self.name}: cannot export for slice {slice_id}: "
                                       f"{exc}") from exc

        if len(serialized) > MAX_EXECUTABLE_BYTES:
            constants = sum(getattr(c, "nbytes", 0) for c in jaxpr.consts)
            raise ResourceExhaustedError(
                f"{self.name}: the exported program is {len(serialized) / 2**20:.1f} MiB "
                f"({constants / 2**20:.1f} MiB of it constants the function closes over); "
                f"programs travel to the hosts in messages of at most "
                f"{MAX_EXECUTABLE_BYTES / 2**20:.0f} MiB: pass large arrays as arguments "
                f"(client.put them once) instead of closing over them")

        def value_specs(vals, specs):
            return [pb.ValueSpec(dtype=_wire.dtype_name(v.dtype), shape=v.shape,
                                 sharding=_wire.spec_to_proto(slice_id, s))
                    for v, s in zip(vals, specs)]

        reply = self.client.call("LoadExecutable", pb.LoadExecutableRequest(
            session_id=self.client.session_id, slice_id=slice_id,
            serialized=serialized, name=self.name, donated=donated,
            inputs=value_specs(data_avals, in_specs),
            outputs=value_specs(exported.out_avals, out_specs)))
        out_avals = tuple(jax.ShapeDtypeStruct(a.shape, a.dtype, weak_type=a.weak_type)
                          for a in out_shapes)
        return CompiledFunction(
            self.client, self.vslice, self.name, reply.executable_id, in_tree, avals, in_specs,
            out_tree, out_avals, out_specs, donated, len(serialized))


def _leaf_arg_positions(args: tuple) -> list[int]:
    """For each flat leaf of `args`, the positional argument it belongs to."""
    return [i for i, arg in enumerate(args) for _ in jax.tree.leaves(arg)]
