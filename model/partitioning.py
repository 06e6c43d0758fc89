"""A pod's mesh and what the sharding rules make of it: shard shapes, bytes per device, and every
dimension that stays whole although its rule asks for a split.

PaLM trained each pod as a 2-D mesh: 12-way model (tensor) parallelism times 256-way fully sharded
data parallelism, parameters and optimizer state sharded over both (Chowdhery et al. 2022, Section
4). Here a pod's mesh has named axes among `data` (replicas), `fsdp` (batch *and* parameters split,
ZeRO-3 style) and `model` (tensor parallel), written `fsdp=256,model=12`; the rule table of
model.sharding decides which parameter dimension goes over which axis.

A rule cannot split a dimension its mesh axis does not divide (256,000 vocabulary rows over 12
model shards): JAX demands divisible argument shardings, so that dimension stays replicated. That
costs memory on every device, silently unless someone reports it: `layout` lists each such
dimension with the bytes per device it costs, and `check_layout` warns (or, strict, refuses).
"""

from __future__ import annotations

import dataclasses
import math
import warnings
from typing import Any

import jax
import numpy as np
from jax.sharding import PartitionSpec

from model.config import PalmConfig
from model.palm import abstract_params, param_logical_axes, param_partition_specs
from model.sharding import MeshAxes, make_mesh

#: Mesh axes a pod may have, outermost first: the order devices are laid out in.
MESH_AXES: tuple[str, ...] = ("data", "fsdp", "model")
#: Bytes per parameter of the optimizer state: Adafactor's two float32 moments (model.optimizer).
OPTIMIZER_BYTES_PER_PARAM = 8


@dataclasses.dataclass(frozen=True)
class PodMesh:
    """The named axes of one pod's mesh, outermost first (`fsdp=2,model=2` -> fsdp 2, model 2)."""

    axes: tuple[tuple[str, int], ...]

    def __post_init__(self) -> None:
        names = [name for name, _ in self.axes]
        unknown = sorted(set(names) - set(MESH_AXES))
        if unknown:
            raise ValueError(f"unknown mesh axis {', '.join(unknown)}; a pod's axes are "
                             f"{', '.join(MESH_AXES)}")
        if len(set(names)) != len(names):
            raise ValueError(f"a mesh axis appears twice in {self}")
        if not self.axes:
            raise ValueError("a mesh needs at least one axis")
        if any(size < 1 for _, size in self.axes):
            raise ValueError(f"mesh axis sizes must be positive, got {self}")
        if names != sorted(names, key=MESH_AXES.index):
            raise ValueError(f"mesh axes must be ordered {', '.join(MESH_AXES)}, got {self}")

    @classmethod
    def parse(cls, text: str) -> PodMesh:
        """`"fsdp=2,model=2"` (any order; axes left out have size 1 and are omitted)."""
        sizes: dict[str, int] = {}
        for part in text.replace(" ", "").split(","):
            name, sep, value = part.partition("=")
            if not sep or not value.isdigit():
                raise ValueError(f"mesh must look like fsdp=2,model=2 (axes {', '.join(MESH_AXES)}), "
                                 f"got {text!r}")
            if name in sizes:
                raise ValueError(f"mesh axis {name!r} given twice in {text!r}")
            sizes[name] = int(value)
        unknown = sorted(set(sizes) - set(MESH_AXES))
        if unknown:
            raise ValueError(f"unknown mesh axis {', '.join(map(repr, unknown))} in {text!r}; a pod's "
                             f"axes are {', '.join(MESH_AXES)}")
        return cls(tuple((name, sizes[name]) for name in MESH_AXES if name in sizes))

    @classmethod
    def of(cls, shape: tuple[int, ...], names: tuple[str, ...]) -> PodMesh:
        return cls(tuple(zip(names, shape)))

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(size for _, size in self.axes)

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(name for name, _ in self.axes)

    @property
    def size(self) -> int:
        return math.prod(self.shape)

    def axis_size(self, name: str) -> int:
        """The size of axis `name`, 1 when the mesh lacks it."""
        return dict(self.axes).get(name, 1)

    @property
    def batch_ways(self) -> int:
        """How many ways a pod splits its batch (data x fsdp)."""
        return self.axis_size("data") * self.axis_size("fsdp")

    def abstract(self) -> jax.sharding.AbstractMesh:
        return jax.sharding.AbstractMesh(self.shape, self.names,
                                         axis_types=(jax.sharding.AxisType.Auto,) * len(self.axes))

    def concrete(self, devices: Any = None) -> jax.sharding.Mesh:
        """A mesh of real devices of this shape (the first `size` devices by default)."""
        devices = jax.devices()[: self.size] if devices is None else devices
        return make_mesh(self.shape, self.names, devices)

    def __str__(self) -> str:
        return ",".join(f"{name}={size}" for name, size in self.axes)


@dataclasses.dataclass(frozen=True)
class Unsplit:
    """A parameter dimension its rule asks to split over `axes` that stays whole instead."""

    parameter: str
    dim: int
    size: int
    logical: str
    axes: tuple[str, ...]
    ways: int  # how many ways the rule asked to split it
    param_bytes: int  # bytes per device it costs in the parameter
    optimizer_bytes: int  # ... and in the optimizer state

    @property
    def bytes(self) -> int:
        return self.param_bytes + self.optimizer_bytes

    def message(self) -> str:
        over = "x".join(self.axes)
        return (f"{self.parameter}: dimension {self.dim} ({self.logical}, {self.size:,}) does not "
                f"divide {over}={self.ways}; it stays replicated, costing {_bytes(self.bytes)} per "
                f"device ({_bytes(self.param_bytes)} parameter, {_bytes(self.optimizer_bytes)} "
                f"optimizer state)")


@dataclasses.dataclass(frozen=True)
class Layout:
    """Where the parameters of a config go on a pod's mesh, and what that costs per device."""

    mesh: PodMesh
    specs: Any  # a pytree of PartitionSpecs like the parameters
    param_bytes_per_device: int
    optimizer_bytes_per_device: int
    unsplit: tuple[Unsplit, ...]

    def as_json(self) -> dict[str, Any]:
        return {
            "mesh": dict(self.mesh.axes),
            "devices": self.mesh.size,
            "param_bytes_per_device": self.param_bytes_per_device,
            "optimizer_bytes_per_device": self.optimizer_bytes_per_device,
            "state_bytes_per_device": self.param_bytes_per_device + self.optimizer_bytes_per_device,
            "replicated_dimensions": [
                {"parameter": u.parameter, "dim": u.dim, "size": u.size, "logical_axis": u.logical,
                 "mesh_axes": list(u.axes), "ways": u.ways, "bytes_per_device": u.bytes}
                for u in self.unsplit],
        }


def _bytes(n: float) -> str:
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= scale:
            return f"{n / scale:.2f} {unit}"
    return f"{n:.0f} B"


def _axes_of(target: MeshAxes) -> tuple[str, ...]:
    return (target,) if isinstance(target, str) else tuple(target or ())


def layout(config: PalmConfig, mesh: PodMesh) -> Layout:
    """The parameter layout of `config` on `mesh` under the config's rules (abstract: nothing is
    allocated, so this answers for palm-540b on a 256 x 12 pod)."""
    shapes = abstract_params(config)
    specs = param_partition_specs(config, mesh.abstract())
    rules = dict(config.logical_axis_rules)
    flat_shapes = jax.tree_util.tree_leaves_with_path(shapes)
    flat_axes = jax.tree.leaves(param_logical_axes(config), is_leaf=lambda n: isinstance(n, tuple))
    flat_specs = jax.tree.leaves(specs, is_leaf=lambda n: isinstance(n, PartitionSpec))
    param_total = optimizer_total = 0
    unsplit: list[Unsplit] = []
    for (path, leaf), logical, spec in zip(flat_shapes, flat_axes, flat_specs, strict=True):
        entries = tuple(spec) + (None,) * (len(leaf.shape) - len(spec))
        local = [dim // math.prod(mesh.axis_size(a) for a in _axes_of(entry))
                 for dim, entry in zip(leaf.shape, entries)]
        count = math.prod(local)
        itemsize = np.dtype(leaf.dtype).itemsize
        param_total += count * itemsize
        optimizer_total += count * OPTIMIZER_BYTES_PER_PARAM
        used = {a for entry in entries for a in _axes_of(entry)}
        for dim, name in enumerate(logical):
            # Axes the rule asks for that split nothing: neither this dimension (it does not
            # divide) nor another one (which would have taken the axis first).
            wanted = tuple(a for a in _axes_of(rules.get(name)) if mesh.axis_size(a) > 1
                           and a not in used)
            if not wanted:
                continue
            ways = math.prod(mesh.axis_size(a) for a in wanted)
            saved = count - count // ways  # what a split would have saved (padding aside)
            unsplit.append(Unsplit(jax.tree_util.keystr(path, simple=True, separator="/"), dim,
                                   leaf.shape[dim], name, wanted, ways, saved * itemsize,
                                   saved * OPTIMIZER_BYTES_PER_PARAM))
    return Layout(mesh, specs, param_total, optimizer_total, tuple(unsplit))


class LayoutError(ValueError):
    """A dimension stays replicated and the caller asked for strict sharding."""


def check_layout(config: PalmConfig, mesh: PodMesh, *, strict: bool = False) -> Layout:
    """`layout`, with a warning per dimension that stays replicated (LayoutError if `strict`)."""
    result = layout(config, mesh)
    if strict and result.unsplit:
        raise LayoutError(f"{config.name} on {mesh}: " + "; ".join(u.message() for u in result.unsplit))
    for u in result.unsplit:
        warnings.warn(f"{config.name} on {mesh}: {u.message()}", UnsplitWarning, stacklevel=2)
    return result


class UnsplitWarning(UserWarning):
    """A parameter dimension stays whole on every device of its mesh axes."""
