"""StableHLO programs with compile options (proto.stablehlo): what the IFRT proxy loads. The
controller checks a load against the module, the hosts compile it for the slice's devices, and a
call runs like any other; slices can be placed on named devices."""

import jax
import numpy as np
import pytest
from jax._src import compiler
from jax._src.interpreters import mlir
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from proto import pathways_pb2 as pb
from runtime import InvalidArgumentError, SliceUnavailableError
from proto import stablehlo as _stablehlo
from proto import wire as _wire
from runtime.client.function import CompiledFunction


def lower(fn, mesh, in_specs, out_specs, *avals, donate=()):
    """A jit lowering of `fn` as the proxy receives it: module bytes and compile options."""
    jitted = jax.jit(fn, in_shardings=tuple(NamedSharding(mesh, s) for s in in_specs),
                     out_shardings=tuple(NamedSharding(mesh, s) for s in out_specs),
                     donate_argnums=donate)
    module = mlir.module_to_bytecode(jitted.lower(*avals).compiler_ir("stablehlo"))
    n = mesh.devices.size
    options = compiler.get_compile_options(num_replicas=1, num_partitions=n,
                                           device_assignment=mesh.devices.reshape(1, n))
    options.executable_build_options.use_spmd_partitioning = True
    options.executable_build_options.use_shardy_partitioner = True
    return module, options.SerializeAsString()


def load(client, vslice, module, options, inputs, outputs, donated=(), name="f"):
    def specs(values):
        return [pb.ValueSpec(dtype=np.dtype(a.dtype).name, shape=a.shape,
                             sharding=_wire.spec_to_proto(vslice.slice_id, s))
                for a, s in values]
    return client.call("LoadExecutable", pb.LoadExecutableRequest(
        session_id=client.session_id, slice_id=vslice.slice_id, serialized=module,
        compile_options=options, format=pb.STABLEHLO, name=name, inputs=specs(inputs),
        outputs=specs(outputs), donated=donated))


def test_signature_names_shapes_dtypes_and_donations():
    mesh = Mesh(np.array(jax.devices()[:2]), ("x",))
    a = jax.ShapeDtypeStruct((4, 2), np.float32)
    b = jax.ShapeDtypeStruct((4,), np.int32)
    module, _ = lower(lambda x, y: (x * 2, y + 1), mesh, [P("x"), P()], [P("x"), P()], a, b,
                      donate=(1,))
    signature = _stablehlo.read_signature(module)
    assert signature.inputs == (((4, 2), np.float32), ((4,), np.int32))
    assert signature.outputs == signature.inputs
    assert signature.donated == (1,)
    assert (signature.num_partitions, signature.num_replicas) == (2, 1)
    with pytest.raises(InvalidArgumentError, match="not a StableHLO module"):
        _stablehlo.read_signature(b"\x00garbage")


def test_placed_slices_take_exactly_the_devices_named(client):
    s = client.slice((2,), ("x",), island=1, devices=[(0, 3), (0, 1)])
    assert [(d.host, d.device) for d in s.info.devices] == [(0, 3), (0, 1)]
    with pytest.raises(InvalidArgumentError, match="distinct"):
        client.slice((2,), ("x",), island=0, devices=[(0, 1), (0, 1)])
    with pytest.raises(SliceUnavailableError, match="cannot form one slice"):
        client.slice((2,), ("x",), island=0, devices=[(0, 1), (0, 9)])
    with pytest.raises(SliceUnavailableError, match="names its island"):
        client.slice((1,), ("x",), devices=[(0, 1)])


def test_a_stablehlo_program_runs_on_a_placed_slice(client):
    vslice = client.slice((2, 2), ("a", "b"), island=0, devices=[(0, 2), (0, 0), (0, 3), (0, 1)])
    mesh = Mesh(np.array(jax.devices()[:4]).reshape(2, 2), ("a", "b"))
    x = jax.ShapeDtypeStruct((8, 4), np.float32)
    fn = lambda a: ((a @ a.T).sum(0), a * 3)  # noqa: E731
    module, options = lower(fn, mesh, [P("a", "b")], [P(), P("b", "a")], x)
    out = [jax.ShapeDtypeStruct((8,), np.float32), x]
    reply = load(client, vslice, module, options, [(x, P("a", "b"))],
                 list(zip(out, [P(), P("b", "a")])))
    f = CompiledFunction(client, vslice, "f", reply.executable_id, jax.tree.structure((0,)),
                         (x,), (P("a", "b"),), jax.tree.structure((0, 0)), tuple(out),
                         (P(), P("b", "a")), (), len(module))
    value = np.arange(32, dtype=np.float32).reshape(8, 4)
    total, tripled = f(client.put(value, vslice, P("a", "b")))
    np.testing.assert_allclose(total.fetch(), (value @ value.T).sum(0))
    np.testing.assert_array_equal(client.fetch(tripled), value * 3)


def test_loads_that_do_not_match_their_module_are_refused(client):
    vslice = client.slice((2,), ("x",), island=0)
    mesh = Mesh(np.array(jax.devices()[:2]), ("x",))
    x = jax.ShapeDtypeStruct((4,), np.float32)
    module, options = lower(lambda a: (a + 1,), mesh, [P("x")], [P("x")], x)
    wrong = jax.ShapeDtypeStruct((6,), np.float32)
    with pytest.raises(InvalidArgumentError, match="input 0 is float32"):
        load(client, vslice, module, options, [(wrong, P("x"))], [(x, P("x"))])
    with pytest.raises(InvalidArgumentError, match="donated inputs"):
        load(client, vslice, module, options, [(x, P("x"))], [(x, P("x"))], donated=[0])
    with pytest.raises(InvalidArgumentError, match="compile options"):
        load(client, vslice, module, b"\xff\xff", [(x, P("x"))], [(x, P("x"))])
    four = client.slice((4,), ("x",), island=0)
    with pytest.raises(InvalidArgumentError, match="partitions"):
        load(client, four, module, options, [(x, P("x"))], [(x, P("x"))])


def test_ready_only_reads_wait_without_data(client):
    vslice = client.slice((2,), ("x",), island=0)
    array = client.put(np.ones(4, np.float32), vslice, P("x"))
    host = vslice.info.host_addresses[0]
    chunks = list(client.worker_stub(host).GetArray(pb.GetArrayRequest(
        array_id=array.id, timeout_s=10, after_sequence=array.sequence, ready_only=True),
        timeout=20))
    assert chunks == []
