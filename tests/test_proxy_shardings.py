"""IFRT shardings as runtime placements (runtime.proxy._shardings): for the shardings JAX sends,
every device gets the same block from the runtime's slice mesh and spec as JAX gives it."""

import jax
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from proto.ifrt import xla_pb2
from runtime import InvalidArgumentError
from proto import wire as _wire
from runtime.proxy._shardings import Layout, layout_from_op_sharding, place
from runtime.proxy._status import UnimplementedError

DEVICES = jax.devices()
MESHES = {
    "2x2": Mesh(np.array(DEVICES[:4]).reshape(2, 2), ("x", "y")),
    "2x4": Mesh(np.array(DEVICES).reshape(2, 4), ("x", "y")),
    "transposed": Mesh(np.array(DEVICES).reshape(4, 2).T, ("x", "y")),
    "reversed": Mesh(np.array(DEVICES[::-1][:4]).reshape(2, 2), ("x", "y")),
    "2x2x2": Mesh(np.array(DEVICES).reshape(2, 2, 2), ("x", "y", "z")),
}
SPECS = [P(), P("x"), P(None, "y"), P("y", "x"), P(("x", "y")), P(("y", "x")),
         P(None, ("x", "y"))]


def jax_layout(sharding: NamedSharding, ndim: int) -> Layout:
    op = xla_pb2.OpSharding.FromString(
        sharding._to_xla_hlo_sharding(ndim).to_proto().SerializeToString())
    return layout_from_op_sharding(op, [d.id for d in sharding._device_assignment], ndim)


def blocks_by_device(sharding: NamedSharding, shape) -> dict:
    return {d.id: tuple((s.start or 0, n if s.stop is None else s.stop)
                        for s, n in zip(index, shape))
            for d, index in sharding.devices_indices_map(shape).items()}


CASES = [(name, spec) for name in MESHES for spec in SPECS] + [
    ("2x2x2", P(("x", "z"), "y")), ("2x2x2", P("z", ("y", "x")))]


@pytest.mark.parametrize("mesh_name,spec", CASES, ids=lambda v: str(v))
def test_placements_put_every_block_where_jax_does(mesh_name, spec):
    mesh = MESHES[mesh_name]
    shape = (8,) * len(mesh.axis_names)
    sharding = NamedSharding(mesh, spec)
    want = blocks_by_device(sharding, shape)
    layout = jax_layout(sharding, len(shape))
    assert {layout.devices[p]: index for p, index in enumerate(layout.indices(shape))} == want
    placement = place([layout], "test")
    groups = _wire.shard_groups(shape, _wire.MeshShape(placement.mesh_shape,
                                                       placement.axis_names),
                                _wire.spec_to_proto(0, placement.specs[0]))
    got = {placement.devices[p]: index for index, positions in groups for p in positions}
    assert got == want


def test_shardings_of_one_mesh_share_one_slice():
    mesh = MESHES["2x4"]
    layouts = [jax_layout(NamedSharding(mesh, s), 2) for s in SPECS]
    placement = place(layouts, "a computation")
    assert placement.devices == tuple(d.id for d in mesh.devices.flat)
    assert placement.mesh_shape == (2, 2, 2)


def test_a_device_order_no_mesh_gives_gets_a_mesh_of_its_own():
    tiles = np.array([[0, 3], [2, 1]])  # positions in an order no axis order of (2, 2) gives
    layout = Layout((10, 11, 12, 13), tiles, 2)
    placement = place([layout], "the array")
    assert placement.devices == (10, 13, 12, 11) and placement.specs[0] == P("d0", "d1")
    with pytest.raises(UnimplementedError, match="fit no one device mesh"):
        place([layout, Layout.replicated((10, 11, 12, 13), 2)], "f")


def test_malformed_and_unsupported_shardings_are_refused():
    with pytest.raises(InvalidArgumentError, match="each of the 4 devices once"):
        Layout((0, 1, 2, 3), np.array([0, 0, 1, 2]), 1)
    manual = xla_pb2.OpSharding(type=xla_pb2.OpSharding.MANUAL)
    with pytest.raises(UnimplementedError, match="MANUAL"):
        layout_from_op_sharding(manual, [0, 1], 1)
    maximal = xla_pb2.OpSharding(type=xla_pb2.OpSharding.MAXIMAL, tile_assignment_devices=[1])
    with pytest.raises(UnimplementedError, match="MAXIMAL"):
        layout_from_op_sharding(maximal, [0, 1], 1)
