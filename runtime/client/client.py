"""The client API: a session with the controller, virtual slices, puts, compiled functions, fetches."""

from __future__ import annotations

import atexit
import contextlib
import itertools
import threading
import weakref
from collections.abc import Callable, Iterator, Sequence
from concurrent import futures
from typing import Any

import grpc
import jax
from jax.sharding import AbstractMesh, PartitionSpec

from proto import auth as _auth
from proto import pathways_pb2 as pb
from proto import pathways_pb2_grpc as pb_grpc
from proto import heap as _heap
from proto import rpc as _rpc
from proto import shm as _shm
from proto import wire as _wire
from proto.chunk_codec import FramedWorkerStub
from proto.config import ClientConfig, TransferConfig, from_env
from proto.errors import (ControllerUnavailableError, InvalidArgumentError, PathwaysError,
                          translate_rpc_error)
from proto.leases import KeepAlive
from runtime.client import avals as _avals
from runtime.client.array import RemoteArray, fetch_arrays, put_arrays
from runtime.client.function import RemoteFunction, SpecTree, broadcast_specs, leaf_avals
from runtime.client.program import Program, Trace, transfer_handle
from runtime.client.stream import CommandStream

#: Deadline of controller RPCs; loading an executable may take longer than the rest.
RPC_TIMEOUT_S = from_env(ClientConfig).rpc_timeout_s
#: How long a new client waits for a connection to its controller. Connecting needs no work of
#: the controller's Python threads (gRPC's core answers), so a live controller, however busy,
#: answers well within this; a refused connection fails at once.
CONNECT_TIMEOUT_S = from_env(ClientConfig).connect_timeout_s


def _connect(channel: grpc.Channel, timeout: float) -> bool:
    """Whether `channel` connects within `timeout` s. A refused connection (nothing listens there)
    ends the wait at once rather than at the timeout: gRPC would only retry it after a backoff."""
    outcome = threading.Event()
    state: list[grpc.ChannelConnectivity] = []

    def watch(connectivity: grpc.ChannelConnectivity) -> None:
        if connectivity in (grpc.ChannelConnectivity.READY,
                            grpc.ChannelConnectivity.TRANSIENT_FAILURE):
            state.append(connectivity)
            outcome.set()

    channel.subscribe(watch, try_to_connect=True)
    try:
        outcome.wait(timeout)
    finally:
        channel.unsubscribe(watch)
    return bool(state) and state[0] == grpc.ChannelConnectivity.READY


class VirtualSlice:
    """A mesh-shaped set of devices on one island, granted by the controller.

    `mesh` is a `jax.sharding.AbstractMesh` with the slice's shape and axis names: use it in
    shardings and `shard_map` inside functions compiled for the slice.
    """

    def __init__(self, client: Client, info: pb.SliceInfo) -> None:
        self.client, self.info = client, info
        self.slice_id, self.island = info.slice_id, info.island
        self.platform = info.platform
        self.mesh_shape = _wire.MeshShape(tuple(info.mesh_shape), tuple(info.axis_names))
        self.mesh = AbstractMesh(self.mesh_shape.shape, self.mesh_shape.axis_names)

    @property
    def shape(self) -> dict[str, int]:
        return dict(zip(self.mesh_shape.axis_names, self.mesh_shape.shape))

    @property
    def size(self) -> int:
        return self.mesh_shape.size

    def release(self) -> None:
        """Gives the slice back; its arrays are freed and its handles become unusable."""
        self.client.call("ReleaseSlice", pb.ReleaseSliceRequest(
            session_id=self.client.session_id, slice_id=self.slice_id))

    def __repr__(self) -> str:
        return f"VirtualSlice(id={self.slice_id}, island={self.island}, mesh={self.shape})"


#: Clients not closed yet: closed at interpreter exit, so their sessions end with them.
_OPEN_CLIENTS: weakref.WeakSet[Client] = weakref.WeakSet()


@atexit.register
def _close_open_clients() -> None:
    for client in list(_OPEN_CLIENTS):
        client.close()


class Client:
    """A session with a controller. Use as a context manager (`with runtime.Client(address) as
    client:`), or call `close()`; a client still open at interpreter exit closes itself.

    The session holds a lease (proto.leases): the client renews it from a thread of its own,
    and a controller that stops hearing from the client (its process was killed) ends the session
    after the lease, freeing its arrays and slices.

    `weight` is the session's proportional share of device time on a controller whose policy is
    "share" (twice the weight, twice the device time of a backlogged peer); FIFO ignores it.
    `credentials` (proto.auth) hold the cluster's token and TLS settings; by default they come
    from $PATHWAYS_TOKEN, the file named by $PATHWAYS_TOKEN_FILE, or the file `pathways up` wrote
    for `address`.
    `config` is every setting of the client, whole (proto.config.ClientConfig: deadlines, the
    command stream's batches, lease renewals; default: as this process's environment sets it);
    `timeout_s` and `connect_timeout_s`, when given, override its `rpc_timeout_s` and
    `connect_timeout_s`.
    Raises ControllerUnavailableError if no controller answers at `address` (the connection is
    refused, or not made within `connect_timeout_s`), UnauthenticatedError without the right token.
    """

    def __init__(self, address: str, *, name: str = "client", timeout_s: float | None = None,
                 weight: float = 1.0, credentials: _auth.Credentials | None = None,
                 connect_timeout_s: float | None = None,
                 config: ClientConfig | None = None) -> None:
        self.config = from_env(ClientConfig) if config is None else config
        timeout_s = self.config.rpc_timeout_s if timeout_s is None else timeout_s
        if connect_timeout_s is None:
            connect_timeout_s = self.config.connect_timeout_s
        self.address, self.timeout_s = address, timeout_s
        self.credentials = (credentials or _auth.Credentials.resolve(address=address)).for_clients()
        self._session_key = ""
        self._channel = _rpc.open_channel(address, self.credentials, self._call_metadata)
        self.controller_stub = pb_grpc.ControllerStub(self._channel)
        if not _connect(self._channel, min(timeout_s, connect_timeout_s)):
            self._channel.close()
            raise ControllerUnavailableError(f"no controller answers at {address} — is "
                                             f"`pathways up` running there?")
        try:
            reply = self.call("Connect", pb.ConnectRequest(client_name=name, weight=weight))
        except PathwaysError as exc:
            self._channel.close()
            if getattr(exc, "code", None) == grpc.StatusCode.UNIMPLEMENTED:
                raise ControllerUnavailableError(f"{address} answers, but it is not a pathways "
                                                 f"controller (a worker's address?)") from None
            raise
        self.session_id, self._session_key = reply.session_id, reply.session_key
        # Memory for this process's first fetches, faulted in now rather than on their way.
        _shm.reserve_memory(from_env(TransferConfig).client_reserve_bytes)
        self.lease_s = reply.lease_s  # 0: the controller keeps sessions without renewals
        self._ids = itertools.count(reply.id_base + 1)
        self._id_lock = threading.Lock()
        self._workers: dict[str, pb_grpc.WorkerStub] = {}
        self._worker_channels: list[grpc.Channel] = []
        self.transfer_pool = futures.ThreadPoolExecutor(max_workers=16,
                                                        thread_name_prefix="transfer")
        _heap.keep_freed_memory_as_configured()  # streamed fetches reuse freed memory
        self._tracing_state = threading.local()
        self.commands = CommandStream(self)
        self._keepalive = (KeepAlive(self.controller_stub, self.session_id, self.lease_s, address,
                                     renewals_per_lease=self.config.renewals_per_lease)
                           if self.lease_s > 0 else None)
        self._closed = False
        _OPEN_CLIENTS.add(self)

    # -- plumbing ---------------------------------------------------------------------------------

    def _call_metadata(self) -> list[tuple[str, str]]:
        """What every call of this session carries besides the token: its session key."""
        return [(_auth.SESSION_KEY, self._session_key)] if self._session_key else []

    # -- for the client's own modules (runtime.client.core.ClientCore) ---------------------------

    def call(self, method: str, request, timeout: float | None = None):
        """A controller RPC; failures come back as runtime exceptions (proto.errors)."""
        try:
            return getattr(self.controller_stub, method)(request, timeout=timeout or self.timeout_s)
        except grpc.RpcError as err:
            raise translate_rpc_error(err, f"controller {self.address}", method,
                                      ControllerUnavailableError) from None

    def worker_stub(self, address: str) -> pb_grpc.WorkerStub:
        with self._id_lock:
            stub = self._workers.get(address)
            if stub is None:
                channel = _rpc.open_channel(address, self.credentials, self._call_metadata)
                self._worker_channels.append(channel)
                # Array bytes travel without protobuf copying them (proto.chunk_codec).
                stub = self._workers[address] = FramedWorkerStub(channel)
            return stub

    def _new_id(self) -> int:
        with self._id_lock:
            return next(self._ids)

    def new_handle(self, shape, dtype, spec: PartitionSpec, vslice: VirtualSlice, *,
                    weak_type: bool = False) -> RemoteArray:
        """A handle for an array about to be created (a placeholder while tracing a program)."""
        trace = self.current_trace()
        array_id = trace.new_id() if trace is not None else self._new_id()
        return RemoteArray(self, array_id, shape, dtype, spec, vslice, weak_type=weak_type)

    def current_trace(self) -> Trace | None:
        return getattr(self._tracing_state, "trace", None)

    @contextlib.contextmanager
    def tracing(self, trace: Trace) -> Iterator[None]:
        if self.current_trace() is not None:
            raise InvalidArgumentError("programs cannot be traced inside programs")
        self._tracing_state.trace = trace
        try:
            yield
        finally:
            self._tracing_state.trace = None

    # -- public API -------------------------------------------------------------------------------

    def slice(self, mesh_shape: Sequence[int] | dict[str, int], axis_names: Sequence[str] = (),
              *, island: int | None = None,
              devices: Sequence[tuple[int, int]] = ()) -> VirtualSlice:
        """Asks for a virtual slice: `slice((2, 2), ("data", "model"))` or `slice({"x": 4})`.

        `devices` places it explicitly: (host, local device) of `island` per mesh position, in
        row-major order. Returns once the slice's hosts know it. Raises SliceUnavailableError
        when no island (or not `island`, or not those devices) can hold it, InvalidArgumentError
        for a malformed mesh.
        """
        if isinstance(mesh_shape, dict):
            mesh_shape, axis_names = tuple(mesh_shape.values()), tuple(mesh_shape)
        reply = self.call("CreateSlice", pb.CreateSliceRequest(
            session_id=self.session_id, mesh_shape=mesh_shape, axis_names=axis_names,
            island=-1 if island is None else island,
            devices=[pb.SliceDevice(host=h, device=d) for h, d in devices]))
        return VirtualSlice(self, reply.slice)

    def put(self, tree: Any, vslice: VirtualSlice, specs: SpecTree = None) -> Any:
        """Copies arrays (NumPy, JAX, scalars, typed PRNG keys; any pytree) onto a slice; returns
        RemoteArrays.

        `specs` is a PartitionSpec or pytree prefix of them (None: replicated). Returns after the
        data has reached the hosts. Values get the abstract values `jax.device_put` gives them:
        JAX's canonical dtypes (float64 becomes float32 unless jax_enable_x64 is set), Python
        scalars weakly typed. A leaf that is not an array is a TypeError naming it.
        """
        leaves, tree_def = jax.tree.flatten(tree)
        flat_specs = broadcast_specs(specs, tree, "specs")
        leaves = [leaf.fetch() if isinstance(leaf, RemoteArray) else leaf for leaf in leaves]
        avals = leaf_avals(leaves, tree, "tree", "put")
        arrays = self.put_flat(leaves, [s or PartitionSpec() for s in flat_specs], vslice, avals)
        return jax.tree.unflatten(tree_def, arrays)

    def put_flat(self, leaves: Sequence, specs: Sequence[PartitionSpec], vslice: VirtualSlice,
                  avals: Sequence[jax.ShapeDtypeStruct]) -> list[RemoteArray]:
        if self.current_trace() is not None:
            raise InvalidArgumentError("a program cannot put data while it is traced; pass the "
                                       "arrays as arguments")
        values = [_avals.host_value(leaf, aval) for leaf, aval in zip(leaves, avals)]
        array_specs = []
        for value, spec in zip(values, specs):
            sharding = _wire.spec_to_proto(vslice.slice_id, spec)
            _wire.shard_groups(value.shape, vslice.mesh_shape, sharding)  # validate before sending
            array_specs.append(pb.ArraySpec(array_id=self._new_id(), dtype=_wire.dtype_name(
                value.dtype), shape=value.shape, sharding=sharding))
        reply = self.call("RegisterArrays", pb.RegisterArraysRequest(session_id=self.session_id,
                                                                     arrays=array_specs))
        handles = [RemoteArray(self, s.array_id, a.shape, a.dtype, spec, vslice, seq,
                               weak_type=a.weak_type)
                   for s, a, spec, seq in zip(array_specs, avals, specs, reply.sequence)]
        put_arrays(self, values, array_specs, [vslice] * len(values))
        return handles

    def jit(self, fn: Callable, vslice: VirtualSlice, *, in_specs: SpecTree = None,
            out_specs: SpecTree = None, donate_argnums: int | Sequence[int] = (),
            name: str | None = None) -> RemoteFunction:
        """Binds `fn` to a slice. Each new input signature is lowered once with `jax.export`
        (never pickled) and loaded on the slice's hosts; calls return output handles before the
        computation runs. See RemoteFunction for the spec conventions."""
        return RemoteFunction(self, fn, vslice, in_specs=in_specs, out_specs=out_specs,
                              donate_argnums=donate_argnums, name=name)

    def program(self, fn: Callable, *, name: str | None = None) -> Program:
        """Turns a function of RemoteArrays that calls compiled functions (on any slices) into a
        Program: traced once per input signature, then each run is one command. Usable as a
        decorator: `@client.program`."""
        return Program(self, fn, name)

    def transfer(self, tree: Any, vslice: VirtualSlice, specs: SpecTree = None) -> Any:
        """Copies RemoteArrays (any pytree) onto another slice, on any island, resharding to
        `specs` (None: keep each array's spec). Returns new handles at once; the hosts move the
        data directly, after the arrays' producers have run."""
        leaves, tree_def = jax.tree.flatten(tree)
        flat_specs = broadcast_specs(specs, tree, "specs")
        copies = [transfer_handle(self, leaf, vslice, leaf.spec if spec is None else spec)
                  for leaf, spec in zip(leaves, flat_specs)]
        return jax.tree.unflatten(tree_def, copies)

    def sync(self, timeout: float | None = None) -> None:
        """Waits until the controller has ordered every command submitted so far (not until they
        have run); raises the first command rejection since the last sync."""
        self.commands.sync(self.timeout_s if timeout is None else timeout)

    def fetch(self, tree: Any, timeout: float | None = None) -> Any:
        """Copies every RemoteArray in a pytree to NumPy (in parallel); other leaves pass through."""
        leaves, tree_def = jax.tree.flatten(tree)
        remote = [i for i, leaf in enumerate(leaves) if isinstance(leaf, RemoteArray)]
        values = fetch_arrays(self, [leaves[i] for i in remote], timeout)
        for i, value in zip(remote, values):
            leaves[i] = value
        return jax.tree.unflatten(tree_def, leaves)

    def status(self) -> pb.GetStatusReply:
        """The controller's view of islands, hosts and slices."""
        return self.call("GetStatus", pb.GetStatusRequest())

    def close(self) -> None:
        """Ends the session: the controller frees its arrays and slices. Idempotent."""
        if self._closed:
            return
        self._closed = True
        _OPEN_CLIENTS.discard(self)
        if self._keepalive is not None:
            self._keepalive.stop()
        self.commands.close()
        try:
            self.call("Disconnect", pb.DisconnectRequest(session_id=self.session_id), timeout=5.0)
        except Exception:  # closing must not fail because the controller already went away
            pass
        self.transfer_pool.shutdown(wait=False)
        for channel in self._worker_channels:
            channel.close()
        self._channel.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
