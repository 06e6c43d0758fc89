"""Sharding as data: model code names logical axes, one rule table maps them to mesh axes.

The model never mentions a mesh axis. Every parameter and every constrained activation carries a
tuple of *logical* axis names ('batch', 'embed', 'heads', ...); a rule table (the MaxText
`logical_axis_rules` idea) turns those names into a `PartitionSpec` for whatever mesh is in
context. Changing the parallelism layout (pure data parallel, 2-D data x model, FSDP) is a change of
rule table, not of model code.

Rules may name mesh axes the current mesh lacks (e.g. 'fsdp' on a ('data', 'model') mesh); those are
dropped, so one table serves 1 device, a 2x2 mesh and an 8-device 3-D mesh alike.

Meshes must use `AxisType.Auto` axes (GSPMD propagation between our constraints). `make_mesh` below
builds one; `jax.make_mesh` defaults to Explicit axes in jax >= 0.7, which would demand an explicit
output sharding on every contraction over a sharded dimension.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import jax
from jax.sharding import AbstractMesh, AxisType, Mesh, NamedSharding, PartitionSpec

MeshAxes = str | tuple[str, ...] | None
LogicalAxisRules = tuple[tuple[str, MeshAxes], ...]
LogicalAxes = tuple[str | None, ...]

# Parameters and activations use different names for the model dimension: parameters shard it over
# 'fsdp' (ZeRO-3 style), activations never do, because their batch dimension already uses 'fsdp' and
# a mesh axis may appear only once in a PartitionSpec.
DEFAULT_RULES: LogicalAxisRules = (
    # activations
    ("batch", ("data", "fsdp")),
    ("seq", None),
    ("act_embed", None),
    # shared by parameters and activations
    ("heads", "model"),
    ("kv", None),  # the head dimension of queries, keys and values
    ("mlp", "model"),
    ("vocab", "model"),
    # parameters only
    ("embed", "fsdp"),
    ("layers", None),
)

# Pure data parallelism: every parameter replicated, the batch split over every mesh axis.
DATA_PARALLEL_RULES: LogicalAxisRules = (("batch", ("data", "fsdp", "model")),)


def make_mesh(shape: Sequence[int], axis_names: Sequence[str], devices: Sequence[Any] | None = None) -> Mesh:
    """A device mesh with Auto axes, the kind the model's sharding constraints are written for."""
    return jax.make_mesh(
        tuple(shape), tuple(axis_names), axis_types=(AxisType.Auto,) * len(shape), devices=devices
    )


def current_mesh() -> AbstractMesh | None:
    """The mesh set by `jax.set_mesh` / `jax.sharding.use_abstract_mesh`, or None outside one."""
    mesh = jax.sharding.get_abstract_mesh()
    return None if mesh.empty else mesh


def logical_to_mesh_spec(
    logical_axes: Sequence[str | None],
    rules: LogicalAxisRules,
    mesh: Mesh | AbstractMesh | None = None,
    shape: Sequence[int] | None = None,
) -> PartitionSpec:
    """Translates logical axis names to a PartitionSpec.

    With `mesh`, mesh axes it lacks are dropped; with `shape` as well, a mesh axis whose size does not
    divide its dimension is dropped (replicating that dimension) rather than padding it. A mesh axis
    is used at most once: a later dimension asking for an axis already taken is left unsharded.
    Unknown logical names are replicated.
    """
    table = dict(rules)
    sizes = dict(zip(mesh.axis_names, mesh.axis_sizes)) if mesh is not None else None
    used: set[str] = set()
    entries: list[MeshAxes] = []
    for dim, name in enumerate(logical_axes):
        target = table.get(name) if name is not None else None
        candidates = (target,) if isinstance(target, str) else tuple(target or ())
        chosen: list[str] = []
        extent = 1
        for axis in candidates:
            if axis in used or (sizes is not None and axis not in sizes):
                continue
            size = sizes[axis] if sizes is not None else 1
            if shape is not None and shape[dim] % (extent * size) != 0:
                continue
            chosen.append(axis)
            extent *= size
        used.update(chosen)
        entries.append(None if not chosen else chosen[0] if len(chosen) == 1 else tuple(chosen))
    while entries and entries[-1] is None:
        entries.pop()  # P('a', None) and P('a') mean the same; the short form reads better
    return PartitionSpec(*entries)


def constrain(x: jax.Array, logical_axes: LogicalAxes, rules: LogicalAxisRules) -> jax.Array:
    """`with_sharding_constraint` by logical axes; a no-op when no mesh is in context.

    The no-op matters: the same traced function must run on one device, under `jax.set_mesh`, and
    under an abstract mesh while the runtime exports it.
    """
    mesh = current_mesh()
    if mesh is None:
        return x
    spec = logical_to_mesh_spec(logical_axes, rules, mesh, x.shape)
    return jax.lax.with_sharding_constraint(x, spec)


def tree_partition_specs(
    logical_tree: Any, shapes_tree: Any, rules: LogicalAxisRules, mesh: Mesh | AbstractMesh | None
) -> Any:
    """PartitionSpecs for a pytree of arrays given a matching pytree of logical-axis tuples."""
    return jax.tree.map(
        lambda axes, leaf: logical_to_mesh_spec(axes, rules, mesh, leaf.shape),
        logical_tree,
        shapes_tree,
        is_leaf=lambda node: isinstance(node, tuple),
    )


def tree_shardings(logical_tree: Any, shapes_tree: Any, rules: LogicalAxisRules, mesh: Mesh) -> Any:
    """NamedShardings for a pytree of arrays (for `jax.device_put` or `jit(in_shardings=...)`)."""
    specs = tree_partition_specs(logical_tree, shapes_tree, rules, mesh)
    return jax.tree.map(
        lambda spec: NamedSharding(mesh, spec), specs, is_leaf=lambda node: isinstance(node, PartitionSpec)
    )
