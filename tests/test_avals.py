"""Arguments and results at the client's boundary behave as under `jax.jit`: `None` leaves, weak
types, typed PRNG keys, and the errors for what cannot run (runtime.client.avals, runtime.client.function).
On the shared in-process cluster; tests/test_conformance.py runs the same through processes."""

import collections

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.experimental import io_callback
from jax.sharding import PartitionSpec as P

import runtime


@pytest.fixture
def s(client):
    return client.slice({"data": 4}, island=0)


def test_put_gives_no_spec_to_none_leaves(client, s):
    x, y = np.arange(8, dtype=np.float32), np.arange(8, 16, dtype=np.float32)
    a, nothing, b = client.put((x, None, y), s, (P(), None, P("data")))
    assert nothing is None and a.spec == P() and b.spec == P("data")
    np.testing.assert_array_equal(b.fetch(), y)


def test_jit_specs_over_trees_with_none(client, s):
    Pair = collections.namedtuple("Pair", "left right")
    f = client.jit(lambda a, n, p: (a + p.right, None, {"k": p.left * 2, "none": None}), s,
                   in_specs=(P("data"), None, Pair(P(), P("data"))),
                   out_specs=(P("data"), None, {"k": P(), "none": None}))
    x, y = np.arange(8, dtype=np.float32), np.arange(8, 16, dtype=np.float32)
    out = f(x, None, Pair(y, x))
    assert out[1] is None and out[2]["none"] is None
    assert out[0].spec == P("data") and out[2]["k"].spec == P()
    got = client.fetch(out)
    np.testing.assert_array_equal(got[0], x + x)
    np.testing.assert_array_equal(got[2]["k"], y * 2)


def test_specs_that_do_not_match_the_tree_are_invalid_argument(client, s):
    with pytest.raises(runtime.InvalidArgumentError, match="structure"):
        client.put((np.ones(4), np.ones(4)), s, (P(), P(), P()))
    with pytest.raises(runtime.InvalidArgumentError, match="PartitionSpecs"):
        client.put(np.ones(4), s, "data")


@pytest.mark.parametrize("dtype, scalar", [(jnp.bfloat16, 2.0), (jnp.float16, 0.5),
                                           (jnp.int8, 3), (jnp.uint8, 7), (jnp.int16, -2),
                                           (jnp.complex64, 2.0)])
def test_python_scalars_are_weakly_typed(client, s, dtype, scalar):
    x = jnp.arange(4).astype(dtype)
    f = client.jit(lambda a, b: a * b, s)
    want = jax.jit(lambda a, b: a * b)(x, scalar)
    got = f(x, scalar)
    assert (got.dtype, got.weak_type) == (want.dtype, want.weak_type)
    np.testing.assert_array_equal(got.fetch(), np.asarray(want))


def test_weak_types_flow_through_handles_as_through_jax_arrays(client, s):
    two = client.put(2.0, s)
    assert two.weak_type and two.dtype == np.float32
    doubled = client.jit(lambda b: b * 2, s)(two)
    assert doubled.weak_type == jax.jit(lambda b: b * 2)(2.0).weak_type
    out = client.jit(lambda a, b: a + b, s)(jnp.ones(3, jnp.bfloat16), doubled)
    assert out.dtype == jnp.bfloat16 and not out.weak_type
    np.testing.assert_array_equal(out.fetch(), np.full(3, 5, jnp.bfloat16))


@pytest.mark.parametrize("kind, spec", [("in", P("bogus")), ("out", P("bogus")),
                                        ("in", P(("data", "data"))), ("out", P("data", "data"))])
def test_unknown_or_duplicated_axis_in_jit_specs_is_invalid_argument(client, s, kind, spec):
    specs = {f"{kind}_specs": spec}
    f = client.jit(lambda a: a.reshape(2, 4), s, **specs)
    with pytest.raises(runtime.InvalidArgumentError, match=f"{kind}_specs .*(bogus|twice)"):
        f(np.ones(8, np.float32))
    with pytest.raises(runtime.InvalidArgumentError):
        f.lower(jax.ShapeDtypeStruct((8,), jnp.float32))


@pytest.mark.parametrize("bad", ["abcd", object(), np.arange(4, dtype=">i4"), [1, "x"]])
def test_non_array_arguments_are_type_errors_naming_the_argument(client, s, bad):
    f = client.jit(lambda a, b: a, s)
    path = r"args\[1\]\[1\]" if isinstance(bad, list) else r"args\[1\]"
    with pytest.raises(TypeError, match=path):
        f(np.ones(4, np.float32), bad)
    with pytest.raises(TypeError, match=r"tree\['b'\]"):
        client.put({"a": np.ones(2), "b": bad}, s)


def test_big_endian_arrays_are_refused_as_jax_refuses_them(client, s):
    big = np.arange(4, dtype=">f4")
    with pytest.raises(TypeError):
        jax.jit(lambda a: a)(big)
    with pytest.raises(TypeError, match="native byte order"):
        client.put(big, s)


def test_python_int_too_large_is_an_overflow_error(client, s):
    with pytest.raises(OverflowError, match=r"args\[0\]"):
        client.jit(lambda a: a, s)(2 ** 40)


def test_typed_keys_as_inputs_and_outputs(client, s):
    key = jax.random.key(7)
    split = client.jit(lambda k: jax.random.split(k, 4), s, out_specs=P("data"))(key)
    want = jax.random.split(key, 4)
    assert (split.shape, split.dtype) == (want.shape, want.dtype)
    np.testing.assert_array_equal(jax.random.key_data(split.fetch()), jax.random.key_data(want))
    draw = client.jit(lambda ks: jax.vmap(lambda k: jax.random.normal(k, (3,)))(ks), s,
                      in_specs=P("data"), out_specs=P("data"))
    np.testing.assert_array_equal(draw(split).fetch(),
                                  jax.vmap(lambda k: jax.random.normal(k, (3,)))(want))
    moved = split.to(client.slice({"d": 2}, island=1), P())
    assert moved.dtype == want.dtype
    np.testing.assert_array_equal(jax.random.key_data(moved.fetch()), jax.random.key_data(want))


@pytest.mark.parametrize("impl", ["threefry2x32", "rbg"])
def test_put_and_fetch_typed_keys_of_each_impl(client, s, impl):
    keys = jax.random.split(jax.random.key(3, impl=impl), 4)
    remote = client.put(keys, s, P("data"))
    assert remote.dtype == keys.dtype and remote.shape == (4,)
    back = remote.fetch()
    assert back.dtype == keys.dtype
    np.testing.assert_array_equal(jax.random.key_data(back), jax.random.key_data(keys))
    bits = client.jit(lambda k: jax.random.bits(k[0], (2,)), s)(remote)
    np.testing.assert_array_equal(bits.fetch(), jax.random.bits(keys[0], (2,)))


@pytest.mark.parametrize("callback", [
    lambda a: jax.pure_callback(lambda v: v, jax.ShapeDtypeStruct(a.shape, a.dtype), a),
    lambda a: io_callback(lambda v: v, jax.ShapeDtypeStruct(a.shape, a.dtype), a),
    lambda a: (jax.debug.callback(print, a), a)[1],
    lambda a: (jax.debug.print("{}", a), a)[1],
    lambda a: jax.lax.cond(a[0] > 0, lambda v: jax.pure_callback(
        lambda w: w, jax.ShapeDtypeStruct(v.shape, v.dtype), v), lambda v: v, a),
], ids=["pure_callback", "io_callback", "debug.callback", "debug.print", "nested"])
def test_host_callbacks_are_refused_naming_the_cause(client, s, callback):
    f = client.jit(callback, s)
    with pytest.raises(runtime.InvalidArgumentError, match="host callback.*cannot run on the "
                                                           "islands' hosts"):
        f(np.ones(4, np.float32))
