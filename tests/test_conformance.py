"""Conformance: JAX programs through a real multi-process cluster give in-process JAX's answer, or a
clear error.

One ProcessCluster (2 islands x 4 CPU devices, each host its own process) serves the module. The
programs of tests/conformance_cases.py are submitted together (the hosts compile while the client
traces the next), then each test compares one with `jax.jit` on a mesh of the same shape made of
this process's devices: tree structure, shape, dtype, weak type and sharding spec of every handle,
and the values, bit for bit. The scenarios below the table cover what is not one call: donation
mixed with copies, transfers, programs and deletes; long chains; transfers and programs across
islands; two clients; an x64 client; large round trips; and each error a program can meet.
"""

import math
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conformance_cases import CASES, MESHES, Case, r
from jax.experimental import io_callback
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

import runtime


@pytest.fixture(scope="module")
def processes():
    with runtime.ProcessCluster(islands=2, devices_per_host=4) as cluster:
        yield cluster


@pytest.fixture(scope="module")
def remote(processes):
    client = runtime.Client(processes.address, credentials=processes.credentials)
    yield client
    client.close()


@pytest.fixture(scope="module")
def slices(remote):
    made = {}

    def get(mesh: str, island: int = 0):
        if (mesh, island) not in made:
            shape, names = MESHES[mesh]
            made[mesh, island] = remote.slice(dict(zip(names, shape)), island=island)
        return made[mesh, island]

    return get


@pytest.fixture(scope="module")
def runs(remote, slices):
    """Every case submitted at once, then fetched: name -> (handles, values) or the exception."""
    submitted = {}
    for c in CASES:
        try:
            s = slices(c.mesh, c.island)
            f = remote.jit(c.function(s.mesh), s, in_specs=c.in_specs, out_specs=c.out_specs,
                           donate_argnums=c.donate, name=c.name)
            submitted[c.name] = f(*c.args)
        except Exception as exc:  # re-raised by the case's test, with its traceback
            submitted[c.name] = exc
    results = {}
    for name, out in submitted.items():
        try:
            results[name] = out if isinstance(out, Exception) else (out, remote.fetch(out, 120))
        except Exception as exc:
            results[name] = exc
    return results


def local_mesh(name: str) -> Mesh:
    shape, names = MESHES[name]
    return Mesh(np.array(jax.devices()[:math.prod(shape)]).reshape(shape), names)


def _is_spec(x) -> bool:
    return x is None or isinstance(x, P)


def in_process(c: Case):
    """The case run by jax.jit on a mesh of this process's devices (None specs: replicated)."""
    mesh = local_mesh(c.mesh)

    def shardings(specs):
        return jax.tree.map(lambda p: NamedSharding(mesh, p or P()),
                            P() if specs is None else specs, is_leaf=_is_spec)

    f = jax.jit(c.function(mesh), in_shardings=shardings(c.in_specs),
                out_shardings=shardings(c.out_specs), donate_argnums=c.donate)
    return f(*c.args)


def normal_spec(spec: P) -> tuple:
    """A spec as per-dimension axis tuples without trailing unsplit dimensions."""
    dims = [() if e is None else (e,) if isinstance(e, str) else tuple(e) for e in spec]
    while dims and not dims[-1]:
        dims.pop()
    return tuple(dims)


def is_key(x) -> bool:
    return jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key)


def assert_conforms(handles, got, want) -> None:
    """Handles and fetched values of the cluster against in-process JAX's outputs."""
    assert jax.tree.structure(handles) == jax.tree.structure(want)
    for i, (h, g, w) in enumerate(zip(jax.tree.leaves(handles), jax.tree.leaves(got),
                                      jax.tree.leaves(want))):
        assert (h.shape, h.dtype, h.weak_type) == (w.shape, w.dtype,
                                                    getattr(w, "weak_type", False)), f"leaf {i}"
        assert normal_spec(h.spec) == normal_spec(w.sharding.spec), f"leaf {i}"
        if is_key(w):
            assert g.dtype == w.dtype, f"leaf {i}"
            g, w = jax.random.key_data(g), jax.random.key_data(w)
        g, w = np.asarray(g), np.asarray(w)
        assert (g.shape, g.dtype) == (w.shape, w.dtype), f"leaf {i}"
        if g.tobytes() != w.tobytes():  # equal bits; the comparison below says where not
            np.testing.assert_array_equal(g, w, err_msg=f"leaf {i}")
            raise AssertionError(f"leaf {i}: equal values, different bits (signed zeros, NaNs)")


@pytest.mark.parametrize("c", CASES, ids=[c.name for c in CASES])
def test_program_matches_in_process_jax(runs, c):
    outcome = runs[c.name]
    if isinstance(outcome, Exception):
        raise outcome
    handles, got = outcome
    assert_conforms(handles, got, in_process(c))


def test_the_table_is_broad():
    assert len(CASES) >= 120
    assert len({c.name for c in CASES}) == len(CASES)
    assert {c.mesh for c in CASES} == set(MESHES)


# -- scenarios ------------------------------------------------------------------------------------

def test_donation_with_copies_transfers_programs_and_deletes(remote, slices):
    s, other = slices("x4"), slices("xy", 1)
    bump = remote.jit(lambda v: v + 1, s, in_specs=P("x"), out_specs=P("x"), donate_argnums=0)
    scale = remote.jit(lambda v: v * 3, other, in_specs=P("x"), out_specs=P("x"),
                       donate_argnums=0)
    x0 = r(8)
    x = remote.put(x0, s, P("x"))
    same = x.to(s)                       # a copy on the same devices
    away = x.to(other, P("x"))           # a transfer to the other island
    bumped = bump(same)                  # donating the copy leaves x alone
    held = x.to(other, P())              # ordered before the donation below
    last = bump(x)                       # donates x itself
    scaled = scale(away)

    @remote.program
    def round_trip(v):
        return scale(bump(v).to(other, P("x")))

    y = remote.put(x0, s, P("x"))
    z = round_trip(y)                    # the program donates y and its temporaries
    spare = remote.put(x0, s, P("x"))
    spare_copy = spare.to(other, P("x"))
    spare.delete()
    assert x.is_deleted() and y.is_deleted()
    step = jax.jit(lambda v: v + 1)
    want = [step(x0), x0, step(x0), x0 * 3, (x0 + 1) * 3, x0]
    got = remote.fetch([bumped, held, last, scaled, z, spare_copy])
    for g, w in zip(got, want):
        np.testing.assert_array_equal(g, np.asarray(w))


def test_copies_on_the_same_devices_survive_donating_them(remote, slices):
    s = slices("x4")
    twin = remote.slice({"x": 4}, island=0)  # another slice over the same devices
    bump = remote.jit(lambda v: v + 1, twin, in_specs=P(), out_specs=P(), donate_argnums=0)
    x0 = r(8)
    x = remote.put(x0, s, P("x"))
    outs = [bump(x.to(twin, P())), bump(x)]  # an explicit copy, then the implicit reshard
    assert not x.is_deleted()
    want = np.asarray(jax.jit(lambda v: v + 1)(x0))
    for got in remote.fetch(outs):
        np.testing.assert_array_equal(got, want)
    np.testing.assert_array_equal(x.fetch(), x0)


def test_transfer_queued_behind_busy_senders_sends_the_value_before_a_donation(remote, slices):
    s0, s1 = slices("x4", 0), slices("x4", 1)
    slow = remote.jit(lambda v: jax.lax.fori_loop(0, 30, lambda i, a: jnp.tanh(a @ a) + 0.5, v),
                      s0)
    bump = remote.jit(lambda v: v + 1, s0, donate_argnums=0)
    x0 = r(256, 256) * 0.01
    busy = [remote.put(np.full(4 << 20, i, np.float32), s0, P("x")) for i in range(8)]
    y = slow(remote.put(x0, s0))
    copies = [b.to(s1) for b in busy] + [y.to(s1)]  # 8 x 16 MiB ahead of y's send
    z = bump(y)
    want = jax.jit(lambda v: jax.lax.fori_loop(0, 30, lambda i, a: jnp.tanh(a @ a) + 0.5, v))(x0)
    np.testing.assert_array_equal(copies[-1].fetch(timeout=60), np.asarray(want))
    np.testing.assert_array_equal(z.fetch(), np.asarray(want + 1))
    assert [int(c.fetch()[-1]) for c in copies[:-1]] == list(range(8))


def test_chain_of_a_thousand_calls(remote, slices):
    s = slices("x4")
    step = remote.jit(lambda v: v * 1.0001 + 0.5, s, in_specs=P("x"), out_specs=P("x"),
                      donate_argnums=0)
    local = jax.jit(lambda v: v * 1.0001 + 0.5)
    x0 = r(64)
    x, want = remote.put(x0, s, P("x")), x0
    for _ in range(1000):
        x, want = step(x), local(want)
    np.testing.assert_array_equal(x.fetch(), np.asarray(want))


@pytest.mark.parametrize("source, target", [
    (("x4", 0, P("x")), ("x4", 1, P("x"))),
    (("x4", 0, P("x")), ("xy", 1, P("y", "x"))),
    (("xy", 0, P(("x", "y"))), ("x2", 1, P(None, "x"))),
    (("abc", 1, P("b", "c")), ("x4", 0, P())),
    (("x4", 0, P()), ("x1", 1, P("x"))),
    (("xy", 1, P("x", "y")), ("xy", 1, P("y", "x"))),
], ids=["same_shape", "to_2d", "flat_to_minor", "3d_to_replicated", "to_one", "within_island"])
def test_transfers_and_resharding(remote, slices, source, target):
    value = r(8, 4, dtype=np.int32, low=-100, high=100)
    src = remote.put(value, slices(source[0], source[1]), source[2])
    moved = src.to(slices(target[0], target[1]), target[2])
    doubled = remote.jit(lambda v: v * 2, slices(target[0], target[1]), in_specs=target[2],
                         out_specs=target[2])(moved)
    assert normal_spec(moved.spec) == normal_spec(target[2])
    got = remote.fetch([moved, doubled, src])
    for g, w in zip(got, [value, value * 2, value]):
        np.testing.assert_array_equal(g, w)


def test_program_over_two_islands(remote, slices):
    left, right = slices("x4", 0), slices("xy", 1)
    encode = remote.jit(lambda w, x: jnp.tanh(x @ w), left, in_specs=(P(), P("x")),
                        out_specs=P("x"))
    decode = remote.jit(lambda h, k: (h.sum(1) * jax.random.uniform(k, (8,)), k), right,
                        in_specs=(P("x"), P()), out_specs=(P("x"), P()))

    @remote.program
    def two_islands(w, x, key):
        hidden = encode(w, x).to(right, P("x"))
        return decode(hidden, key.to(right, P()))

    w, x, key = r(4, 4), r(8, 4), jax.random.key(9)
    args = (remote.put(w, left), remote.put(x, left, P("x")), remote.put(key, left))
    out = two_islands(*args)
    again = two_islands(*args)
    assert two_islands.traces == 1
    # The same two programs in-process, on meshes of the same shapes: equal bits.
    m0, m1 = local_mesh("x4"), local_mesh("xy")
    hidden = jax.jit(lambda w, x: jnp.tanh(x @ w),
                     in_shardings=(NamedSharding(m0, P()), NamedSharding(m0, P("x"))),
                     out_shardings=NamedSharding(m0, P("x")))(w, x)
    want = jax.jit(lambda h, k: (h.sum(1) * jax.random.uniform(k, (8,)), k),
                   in_shardings=(NamedSharding(m1, P("x")), NamedSharding(m1, P())),
                   out_shardings=(NamedSharding(m1, P("x")), NamedSharding(m1, P())))(
        jax.device_put(hidden, NamedSharding(m1, P("x"))), key)
    assert_conforms(out, remote.fetch(out), want)
    assert_conforms(again, remote.fetch(again), want)


def test_two_clients_interleaved(processes, remote, slices):
    other = runtime.Client(processes.address, credentials=processes.credentials, name="other")
    try:
        mine, theirs = slices("x4"), other.slice({"x": 4}, island=0)
        f = remote.jit(lambda v: v * 2 + 1, mine, in_specs=P("x"), out_specs=P("x"))
        g = other.jit(lambda v: v * 3 - 1, theirs, in_specs=P("x"), out_specs=P("x"))
        a, b = remote.put(r(16), mine, P("x")), other.put(r(16), theirs, P("x"))
        a0, b0 = a.fetch(), b.fetch()
        for _ in range(50):
            a, b = f(a), g(b)
        local_f, local_g = jax.jit(lambda v: v * 2 + 1), jax.jit(lambda v: v * 3 - 1)
        want_a, want_b = a0, b0
        for _ in range(50):
            want_a, want_b = local_f(want_a), local_g(want_b)
        np.testing.assert_array_equal(a.fetch(), np.asarray(want_a))
        np.testing.assert_array_equal(b.fetch(), np.asarray(want_b))
        with pytest.raises((runtime.PermissionDeniedError, runtime.ArrayNotFoundError)):
            other.fetch(runtime.RemoteArray(other, a.id, a.shape, a.dtype, a.spec, theirs))
    finally:
        other.close()


def test_x64_enabled_client_keeps_64_bit_types(remote, slices):
    """With jax_enable_x64 on in the client, 64-bit values keep their types on the hosts."""
    s = slices("x4", 1)
    args = (np.arange(8) * 3 ** 30, np.arange(8.0) / 3, np.arange(8, dtype=np.uint64) << 40)
    fn = lambda a, b, c: (a * 7, jnp.sin(b), c >> 3, b.astype(jnp.complex128) * 1j, a + 1.5)
    with jax.enable_x64(True):
        out = remote.jit(fn, s, in_specs=P("x"), out_specs=P("x"))(*args)
        mesh = local_mesh("x4")
        want = jax.jit(fn, in_shardings=NamedSharding(mesh, P("x")),
                       out_shardings=NamedSharding(mesh, P("x")))(*args)
        assert [o.dtype for o in want] == [np.int64, np.float64, np.uint64, np.complex128,
                                           np.float64]
        assert_conforms(out, remote.fetch(out), want)


def test_128_mib_round_trip(remote, slices):
    value = np.random.default_rng(1).integers(0, 1 << 31, 32 << 20, dtype=np.int32)
    s = slices("x4", 1)
    x = remote.put(value, s, P("x"))
    back = x.fetch(timeout=120)
    assert back.tobytes() == value.tobytes()
    total = remote.jit(lambda v: (v % 1000).sum(), s, in_specs=P("x"))(x)
    assert int(total.fetch()) == int(jax.jit(lambda v: (v % 1000).sum())(value))


# -- errors: a runtime error type, at once, naming the cause --------------------------------------

def _callback(a):
    return jax.pure_callback(lambda v: v, jax.ShapeDtypeStruct(a.shape, a.dtype), a)


_BIG_CONSTANT = np.random.default_rng(2).random(4 << 20, np.float32)  # 16 MiB, not a splat


@pytest.mark.parametrize("call, error, message", [
    (lambda c, s: c.jit(lambda a: a, s, in_specs=P("nope"))(r(8)),
     runtime.InvalidArgumentError, "in_specs .*axis 'nope'"),
    (lambda c, s: c.jit(lambda a: a, s, out_specs=P(("x", "x")))(r(8)),
     runtime.InvalidArgumentError, "out_specs .*twice"),
    (lambda c, s: c.jit(lambda a: a, s, in_specs=P("x"))(r(6)),
     runtime.InvalidArgumentError, "does not split"),
    (lambda c, s: c.jit(lambda a: a[:6], s, out_specs=P("x"))(r(8)),
     runtime.InvalidArgumentError, "does not split"),
    (lambda c, s: c.jit(lambda a, b: a, s)(r(4), "text"), TypeError, r"args\[1\]"),
    (lambda c, s: c.jit(lambda a: a, s)(np.arange(4, dtype=">i4")), TypeError, "byte order"),
    (lambda c, s: c.jit(lambda a: a, s)(2 ** 40), OverflowError, "too large"),
    (lambda c, s: c.jit(_callback, s)(r(4)), runtime.InvalidArgumentError, "host callback"),
    (lambda c, s: c.jit(lambda a: io_callback(lambda v: v, jax.ShapeDtypeStruct((4,), jnp.float32),
                                              a), s)(r(4)),
     runtime.InvalidArgumentError, "host callback"),
    (lambda c, s: c.jit(lambda a: (jax.debug.callback(print, a), a)[1], s)(r(4)),
     runtime.InvalidArgumentError, "host callback"),
    (lambda c, s: c.jit(lambda a: a + _BIG_CONSTANT, s)(np.float32(1)),
     runtime.ResourceExhaustedError, "closes over"),
    (lambda c, s: c.put((r(4), None, r(4)), s, (P(), P())),
     runtime.InvalidArgumentError, "structure"),
    (lambda c, s: c.jit(lambda a: a + 1, s)(np.ones(4, jnp.int4)),
     runtime.InvalidArgumentError, "sub-byte dtype int4"),
    (lambda c, s: c.jit(lambda a: a.astype(jnp.uint4), s)(r(4)),
     runtime.InvalidArgumentError, "sub-byte dtype uint4"),
], ids=["unknown_axis", "duplicate_axis", "uneven_input", "uneven_output", "string_argument",
        "big_endian", "int_overflow", "pure_callback", "io_callback", "debug_callback",
        "oversized_closure", "spec_tree_mismatch", "int4_argument", "uint4_result"])
def test_errors_are_typed_and_immediate(remote, slices, call, error, message):
    s = slices("x4")
    start = time.monotonic()
    with pytest.raises(error, match=message):
        call(remote, s)
    assert time.monotonic() - start < 30  # raised at once, not at a deadline
    ok = remote.jit(lambda a: a + 1, s)(np.float32(1))
    assert ok.fetch() == 2  # the session goes on
