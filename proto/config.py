"""Every tunable of the runtime in one place: a frozen dataclass per process, with its defaults,
bundled by `ClusterConfig`.

Where a value comes from, lowest first: the defaults below; the environment (`from_env`: the
variable PATHWAYS_<FIELD>, e.g. PATHWAYS_EXECUTION_DEADLINE_S=60); what a launcher or a command
line sets explicitly. The launchers (LocalCluster, ProcessCluster, RayCluster, SimCluster) take a
whole `ClusterConfig` and hand each process its part: in-process objects get the dataclass,
subprocesses get it as environment variables (`to_env`), which their `from_env` reads back; so
every option works with every launcher. Two processes outside a cluster's launchers have their
own dataclass, read the same way: the IFRT proxy server (`ProxyConfig`) and the simulated hosts
(`SimConfig`, with `pathways worker --platform sim`'s flags on top). The modules' own constants
(runtime.worker.defaults, runtime.controller.defaults, scheduler.defaults, ...) are read from
here too, with the environment's overrides (`from_env`, once at import), so a setting a launcher
hands a subprocess reaches every module of it. tests/test_config.py checks that no module keeps a
setting as a number of its own.
"""

from __future__ import annotations

import dataclasses
import os
import types
import typing
from collections.abc import Mapping

#: The prefix of the environment variables that override a field.
ENV_PREFIX = "PATHWAYS_"


@dataclasses.dataclass(frozen=True)
class ControllerConfig:
    """The controller's settings."""

    policy: str = "fifo"  # how each island orders clients' work: "fifo" or "share"
    session_quota_bytes: int | None = None  # device memory per session (None: unbounded)
    session_lease_s: float = 10.0  # how long a silent client keeps its session (0: forever)
    heartbeat_interval_s: float = 0.5  # liveness probes of the hosts
    heartbeat_misses: int = 2  # misses before a host is declared lost
    busy_host_timeout_s: float = 30.0
    slice_flush_timeout_s: float = 10.0  # for hosts to receive a slice before CreateSlice returns
    max_backlog: int = 4096  # instructions an island may run ahead of its slowest host
    backlog_timeout_s: float = 120.0  # how long commands wait for it to catch up
    order_deadline_margin_s: float = 2.0  # ordered at once this long before a client's deadline
    max_incoming: int = 4096  # cross-island transfers remembered per source island
    max_dropped_remembered: int = 4096  # slices/executables an island restart dropped, told why
    # Python's thread switch interval in a controller process (`pathways controller`): a
    # command's thread waits for the link loop's thread (progress reports, dispatches) at most
    # this long per hand-over of the interpreter, not the default 5 ms (at 1,024 simulated
    # hosts one command's submit -> last host received p99 10 ms instead of 17 ms).
    controller_switch_interval_s: float = 0.0005
    status_ping_timeout_s: float = 1.0


@dataclasses.dataclass(frozen=True)
class WorkerConfig:
    """Each worker host's settings."""

    input_timeout_s: float = 600.0  # an execution's wait for its inputs
    execution_deadline_s: float = 30.0  # a multi-host computation's wait for its peers (0: none)
    slice_timeout_s: float = 30.0  # a put's wait for its slice's definition
    announce_timeout_s: float = 10.0  # a put's wait for the controller's announcement
    max_failed_early: int = 4096  # failures of incoming arrays kept until announced
    arrivals_kept: int = 1 << 16  # arrivals kept for the progress stream
    transfer_timeout_s: float = 300.0  # streaming one array to another host
    early_sends: int = 1  # 1: a send starts once its source is stored; 0: at its turn in the order
    max_get_timeout_s: float = 3600.0  # the longest wait a GetArray may ask for
    caller_check_s: float = 0.5  # how often a waiting read checks its caller is there
    hang_watch_interval_s: float = 0.2  # how often the hang watchdog looks at the executor
    peer_ping_timeout_s: float = 2.0  # the watchdog's pings to the slice's other hosts
    pipeline_depth: int = 2  # executions without collectives in flight at once
    timeline_length: int = 100_000  # executions a host remembers (GetTimeline)
    distributed_init_timeout_s: int = 120  # joining the island's jax.distributed system (whole s)
    registration_silence_s: float = 3.0  # silence from every controller before registering again
    registration_attempt_timeout_s: float = 5.0  # one registration attempt
    registration_retry_s: float = 0.2  # pause between registration attempts
    control_threads: int = 8  # the control server's threads (progress streams, dispatch, pings)
    busy_window_s: float = 10.0  # the window of the pathways_device_busy_ratio gauge
    switch_interval_s: float = 0.0002  # Python's thread switch interval in a worker process
    new_controller_wait_s: float = 2.0  # an unknown session key: wait for a new controller
    forward_merge_bytes: int = 8 << 20  # most bytes a fan-out relay merges into one call
    early_send_threads: int = 8  # threads waiting for the sources of early sends
    copy_parallel_hosts: int = 8  # destination hosts one copy streams to at once


@dataclasses.dataclass(frozen=True)
class SchedulerConfig:
    """Each island's gang scheduler and its links to the hosts (in the controller process)."""

    window_s: float = 0.05  # estimated device seconds ordered ahead of the slowest host
    refill_below: float = 0.5  # the fraction of the window below which it is refilled
    # The window covers at least this many trips of the order to the island's last host (ordered
    # -> received), up to max_window_s: it is refilled at half (refill_below), and the slowest
    # host's place is known only from its reports, which lag by their interval and own trip.
    window_trips: float = 4.0
    max_window_s: float = 0.5
    window_trip_samples: int = 32  # the trip: the median of this many latest
    max_outstanding: int = 4096  # executions ordered ahead, whatever their estimates
    min_outstanding: int = 2
    default_cost_s: float = 1e-3  # estimate of an executable not measured yet
    min_cost_s: float = 1e-5
    cost_smoothing: float = 0.2  # weight of a new measurement in the running estimate
    stall_s: float = 0.5  # no progress for this long: one more execution past the window
    max_unmeasured: int = 16384
    input_wait_s: float = 120.0  # an instruction's wait at its queue's head for its inputs
    dispatch_timeout_s: float = 10.0  # one Dispatch RPC
    max_batch: int = 1024  # instructions per Dispatch RPC
    max_batch_bytes: int = 8 << 20
    # The fan-out tree (scheduler.fanout): the controller sends an island's batch to
    # `fanout_roots` hosts, and each host forwards it to `fanout` more. One root: one controller
    # message per island per batch, as Pathways sends one per sharded computation; at 64 hosts
    # in 16 islands, 8 roots made the last host's receipt 3-5 ms later (benchmarks/RESULTS.md).
    fanout_roots: int = 1
    fanout: int = 8
    fanout_min_hosts: int = 16  # smaller islands get a Dispatch per host (scheduler.fanout)
    relay_timeout_s: float = 2.0  # not acknowledged through the tree this long: sent directly
    progress_interval_s: float = 0.005  # least time between two progress reports of a host
    progress_idle_s: float = 1.0  # most time between two (idle hosts: one report, no Ping)
    # The same for the hosts of an island whose order goes through a fan-out tree: the
    # heartbeat reaches them all with one empty Dispatch to each root, passed down the tree
    # (scheduler.delivery's keep_alive). An island's hosts report together after each command,
    # so their idle reports came in bursts, one a second per island, that held up commands
    # arriving meanwhile: at 1,024 hosts, 16 bursts a second were most of the p99 (RESULTS.md)
    progress_idle_tree_s: float = 10.0
    # Most reports/s of an island's hosts together: a big island's hosts each report less often
    # than progress_interval_s (64 hosts: every 160 ms; 16: 40 ms). Every report costs the
    # controller about the same, and it needs only the slowest host's place: at 3200, 512
    # simulated hosts' reports took 0.74 of a core of the controller's two (RESULTS.md)
    progress_island_rate: float = 400.0
    latency_window_s: float = 60.0  # dispatch latency percentiles of `pathways status` cover this
    watch_retry_s: float = 0.2  # pause before re-opening a broken progress stream
    idle_grace_s: float = 0.1  # a tenant idle for less keeps its place in the share policy


@dataclasses.dataclass(frozen=True)
class ClientConfig:
    """A client's settings (in the user's process)."""

    rpc_timeout_s: float = 30.0  # default deadline of a call to the controller
    connect_timeout_s: float = 3.0
    transfer_floor_s: float = 30.0  # least deadline of a put or fetch
    transfer_bytes_per_s: float = 50e6  # the slowest transfer rate a deadline allows for
    stream_batch: int = 4096  # commands per Execute RPC of the command stream
    stream_pending: int = 16384  # commands queued before a caller waits
    stream_poll_s: float = 0.5  # how often the sender looks for arrays garbage collection dropped
    renewals_per_lease: int = 4  # session lease renewals per lease
    max_executable_bytes: int = 6 << 20  # largest serialized program (it travels in Dispatch)


@dataclasses.dataclass(frozen=True)
class TransferConfig:
    """How array bytes move (proto.wire, proto.shm, proto.transfer): the same in clients and hosts,
    which are both ends of puts, fetches and copies."""

    chunk_bytes: int = 2 << 20  # array data per stream message (well under gRPC's 4 MiB default)
    max_put_streams: int = 8  # streams of one host's shards of a put or copy, at most
    parallel_stream_bytes: int = 4 << 20  # least bytes of a host's shards streamed in parallel
    stream_threads: int = 8  # threads streaming the second and later shards of a fetch
    parallel_copy_bytes: int = 8 << 20  # least bytes of a copy split over threads
    host_buffer_pool_bytes: int = 1 << 30  # idle memory of freed device buffers kept for reuse
    peer_segment_cache_bytes: int = 1 << 30  # peers' shared-memory segments kept mapped
    peer_segment_check_s: float = 1.0  # how often those a peer no longer holds are unmapped
    # Memory faulted in as a process starts (proto.shm.reserve_memory), for the buffers of its
    # first transfers, which would otherwise fault fresh pages in on their way: a client's as it
    # connects (fetch results), a host's as it starts (the device buffers of puts and copies)
    client_reserve_bytes: int = 256 << 20
    host_reserve_bytes: int = 256 << 20
    reserve_wait_s: float = 10.0  # a transfer's wait for a reserve still being made
    # Puts, fetches and copies between processes of this machine: the receiver reads the shards
    # straight from the sender's memory, or a host writes them straight into the caller's
    # (proto.cma); 0: through shared-memory segments, one copy more
    process_memory_reads: int = 1
    # Freed memory malloc keeps for the next stream message (proto.heap; 0: malloc's default)
    malloc_trim_threshold_bytes: int = 512 << 20
    malloc_mmap_threshold_bytes: int = 32 << 20  # larger blocks are fresh mappings
    # The bulk channel (proto.bulk: array bytes over plain TCP, gRPC carrying only the control)
    bulk_channel: int = 1  # 0: hosts open none, and every transfer streams over gRPC
    bulk_min_bytes: int = 1 << 20  # smaller transfers (per host) stream over gRPC
    # SO_SNDBUF/SO_RCVBUF of its connections (the kernel doubles it): the window of a 10 GB/s
    # link with 100 us round trips. Larger ones moved loopback bytes at half the rate (they spill
    # out of the caches): 1.5-2 GiB/s at 2-8 MiB against 3-4 GiB/s at 128-512 KiB, 2 connections
    bulk_socket_buffer_bytes: int = 512 << 10
    bulk_ticket_s: float = 30.0  # a ticket's lifetime: its connection must present it by then
    bulk_header_s: float = 5.0  # a connection's time to present a ticket its host then knows
    bulk_max_connections: int = 256  # connections a host serves at once (more are closed)


@dataclasses.dataclass(frozen=True)
class ClusterConfig:
    """The settings of every process of a cluster."""

    controller: ControllerConfig = ControllerConfig()
    worker: WorkerConfig = WorkerConfig()
    scheduler: SchedulerConfig = SchedulerConfig()
    client: ClientConfig = ClientConfig()
    transfer: TransferConfig = TransferConfig()
    startup_timeout_s: float = 120.0  # a launcher's wait for its hosts (or a proxy) to serve
    stop_grace_s: float = 30.0  # after SIGINT/SIGTERM, a server's time to stop in order
    gc_young_threshold: int = 20_000  # allocations between young collections (servers)
    placement_timeout_s: float = 120.0  # reserving a Ray island's placement group
    supervise_interval_s: float = 0.2  # how often the Ray supervisor looks for dead actors
    max_host_restarts: int = 3  # restarts of a Ray island that lost a host

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> ClusterConfig:
        """The defaults, overridden by PATHWAYS_<FIELD> variables of `environ` (os.environ)."""
        environ = os.environ if environ is None else environ
        parts = {f.name: from_env(type(getattr(cls(), f.name)), environ)
                 for f in dataclasses.fields(cls) if dataclasses.is_dataclass(f.default)}
        return _override(cls(**parts), environ)

    def to_env(self) -> dict[str, str]:
        """Every field that differs from its default, as the variables `from_env` reads."""
        env: dict[str, str] = {}
        for part in (self, self.controller, self.worker, self.scheduler, self.client,
                     self.transfer):
            default = type(part)()
            for f in dataclasses.fields(part):
                value = getattr(part, f.name)
                if not dataclasses.is_dataclass(value) and value != getattr(default, f.name):
                    env[ENV_PREFIX + f.name.upper()] = "" if value is None else str(value)
        return env

    def replace(self, **changes: object) -> ClusterConfig:
        """A copy with fields of any part changed by name (e.g. execution_deadline_s=5); a name
        no part has raises TypeError. None leaves a field as it is."""
        parts = {name: getattr(self, name) for name in _PARTS}
        own: dict[str, object] = {}
        for name, value in changes.items():
            if value is None:
                continue
            owner = _OWNER.get(name)
            if owner is None:
                if name not in {f.name for f in dataclasses.fields(self)}:
                    raise TypeError(f"no setting is called {name!r}")
                own[name] = value
            else:
                parts[owner] = dataclasses.replace(parts[owner], **{name: value})
        return dataclasses.replace(self, **parts, **own)


@dataclasses.dataclass(frozen=True)
class ProxyConfig:
    """The IFRT proxy server's settings (`pathways proxy`, runtime.proxy)."""

    proxy_connect_timeout_s: float = 30.0  # a JAX client's wait to connect to the proxy
    proxy_later_threads: int = 16  # threads finishing asynchronous requests, per session
    proxy_max_futures: int = 100_000  # futures a session remembers
    proxy_analysis_cache: int = 64  # programs whose analysis is kept
    proxy_analysis_devices: int = 8  # devices to compile on when the controller cannot say
    proxy_read_timeout_s: float = 3600.0  # a read of an array's data
    proxy_max_message_bytes: int = 256 << 20  # gRPC message limit of the proxy's server
    host_buffer_lookup_timeout_s: float = 600.0  # a wait for a host buffer to be stored
    host_buffer_chunk_bytes: int = 1 << 20  # bytes per message of a host buffer lookup
    max_host_buffer_bytes: int = 1 << 36  # one host buffer
    max_session_host_buffer_bytes: int = 1 << 37  # a session's host buffers together
    max_failed_host_buffers: int = 1024  # failed host buffers remembered
    max_mesh_candidates: int = 64  # device meshes tried when matching a sharding


@dataclasses.dataclass(frozen=True)
class SimConfig:
    """How the simulated hosts of one process behave (runtime.sim).

    A computation holds its devices for `fixed_seconds` when set, else for its per-device FLOPs
    (XLA's cost analysis of the executable, runtime.sim._cost) divided by `flops_per_s`.
    `data_limit_bytes` bounds the data an array may keep on a host (larger arrays are shapes only).
    `execution_deadline_s` bounds how long a computation on a slice spanning hosts waits for the
    slice's other hosts before it is reported hung (0: forever); `input_timeout_s` how long an
    execution waits for its inputs (both as the worker's). Each host remembers its last
    `timeline_length` executions (fewer than a real host: a process holds hundreds of hosts).
    """

    devices_per_host: int = 4
    flops_per_s: float = 100e12  # one simulated device: about one accelerator chip of its era
    fixed_seconds: float | None = None
    data_limit_bytes: int = 64 << 10
    device_memory_bytes: int = 16 << 30  # what a device reports; nothing is allocated
    execution_deadline_s: float = 30.0
    input_timeout_s: float = 600.0
    timeline_length: int = 20_000  # executions a host remembers (GetTimeline), per host
    hosts_per_process: int = 256  # hosts one simulated process serves by default
    registration_threads: int = 8  # registrations in flight at once
    leave_threads: int = 32  # departures in flight at once

    def __post_init__(self) -> None:
        if self.devices_per_host <= 0:
            raise ValueError("a simulated host needs at least one device")
        if self.flops_per_s <= 0:
            raise ValueError("flops_per_s must be positive")
        if self.fixed_seconds is not None and self.fixed_seconds < 0:
            raise ValueError("fixed_seconds cannot be negative")

    @property
    def device_kind(self) -> str:
        """What `pathways status` shows as the devices' kind."""
        if self.fixed_seconds is not None:
            return f"sim ({self.fixed_seconds * 1e3:g} ms per computation)"
        return f"sim ({self.flops_per_s:.3g} FLOP/s)"


_PARTS = ("controller", "worker", "scheduler", "client", "transfer")
_OWNER = {f.name: part for part, cls in zip(_PARTS, (ControllerConfig, WorkerConfig,
                                                    SchedulerConfig, ClientConfig, TransferConfig))
          for f in dataclasses.fields(cls)}

T = typing.TypeVar("T")


def from_env(cls: type[T], environ: Mapping[str, str] | None = None) -> T:
    """`cls()` with its fields overridden by PATHWAYS_<FIELD> variables of `environ`."""
    return _override(cls(), os.environ if environ is None else environ)


def _override(value: T, environ: Mapping[str, str]) -> T:
    hints = typing.get_type_hints(type(value))
    changes = {}
    for f in dataclasses.fields(value):
        raw = environ.get(ENV_PREFIX + f.name.upper())
        if raw is not None and not dataclasses.is_dataclass(getattr(value, f.name)):
            changes[f.name] = _parse(raw, hints[f.name], ENV_PREFIX + f.name.upper())
    return dataclasses.replace(value, **changes) if changes else value


def _parse(raw: str, hint: object, name: str) -> object:
    """`raw` as the field's type: int, float, str, or one of them or None ("" or "None")."""
    options = typing.get_args(hint) if isinstance(hint, types.UnionType) else (hint,)
    if type(None) in options and raw.strip() in ("", "None"):
        return None
    for option in options:
        if option in (int, float, str):
            try:
                return option(raw) if option is not int else int(raw, 0)
            except ValueError:
                continue
    raise ValueError(f"{name}={raw!r} is not a valid {hint}")
