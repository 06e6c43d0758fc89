"""`pathways status`: a cluster's hosts, slices and islands, as text or JSON."""

from __future__ import annotations

import argparse
import json
import sys

from runtime.cli.common import cli_credentials


def cmd_status(args: argparse.Namespace) -> int:
    from proto.errors import PathwaysError
    from runtime.client.client import Client

    credentials = cli_credentials(args, args.address)
    try:
        if credentials.host_token:
            status = _operator_status(args.address, credentials, args.timeout)
        else:
            with Client(args.address, name="status", timeout_s=args.timeout,
                        credentials=credentials) as client:
                status = client.status()
    except PathwaysError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    if args.json:
        from runtime.cli.status_json import message_to_json

        print(json.dumps(message_to_json(status), indent=2))
        return 0
    print(format_status(args.address, status))
    return 0


def _operator_status(address: str, credentials, timeout: float):
    """GetStatus with the host token: the cluster's own view (every client's sessions, queues
    and slices), without opening a session."""
    import grpc

    from proto import pathways_pb2 as pb
    from proto import pathways_pb2_grpc as pb_grpc
    from proto import rpc
    from proto.errors import ControllerUnavailableError, from_rpc_error

    channel = rpc.open_channel(address, credentials)
    try:
        return pb_grpc.ControllerStub(channel).GetStatus(pb.GetStatusRequest(), timeout=timeout)
    except grpc.RpcError as err:
        raise from_rpc_error(err) or ControllerUnavailableError(
            f"no controller answers at {address} — is `pathways up` running there? "
            f"({err.code().name})") from None
    finally:
        channel.close()


def format_latency(latency) -> list[str]:
    """An island's dispatch latency per stage (IslandStatus.latency) as text lines: none when no
    computation was ordered in the window."""
    rows = [row for row in latency if row.count]
    if not rows:
        return []
    stages = ", ".join(f"{row.stage.replace('_to_', ' -> ').replace('_', ' ')} "
                       f"{row.p50_ms:.2f} / {row.p99_ms:.2f}" for row in rows)
    return [f"  dispatch latency, last minute, p50 / p99 ms ({rows[0].count} computations): "
            f"{stages}"]


def format_status(address: str, status) -> str:
    """`pathways status` as text: per island its order, its hosts (what each runs or waits for)
    and the client queues in front of it; then the slices."""
    lease = (f"lease {status.session_lease_s:g} s, {status.sessions_expired} expired"
             if status.session_lease_s else "no lease")
    lines = [f"controller {address}: {status.sessions} sessions ({lease}), {status.arrays} arrays, "
             f"{len(status.slices)} slices"]
    islands = {i.island: i for i in status.islands}
    for island in sorted({h.island for h in status.hosts} | set(islands)):
        order = islands.get(island)
        head = f"island {island}"
        if order is not None:
            head += (f": order at #{order.sequence}, policy {order.policy}, "
                     f"{order.outstanding_s * 1e3:.1f} ms of work ahead of the hosts")
        lines.append(head)
        if order is not None and order.failure:
            lines.append(f"  FAILED: {order.failure}")
        if order is not None:
            lines.extend(format_latency(order.latency))
        lines.append(f"  {'island':>6} {'host':>4}  {'address':<21} {'backend':<7} {'platform':<8} "
                     f"{'devices':>7} {'GiB/dev':>7} {'received':>8} {'executed':>8} "
                     f"{'queued':>6}  state")
        for h in (h for h in status.hosts if h.island == island):
            memory = f"{h.device_memory_bytes / 2**30:.1f}" if h.device_memory_bytes else "-"
            lines.append(f"  {h.island:>6} {h.host:>4}  {h.address:<21} {h.backend:<7} "
                         f"{h.platform:<8} {h.num_devices:>7} {memory:>7} {h.received:>8} "
                         f"{h.executed:>8} {h.queue_depth + h.undelivered:>6}  {h.state}")
            lines.append(f"{'':>15}{h.activity or '-'}")
            if h.ray_node:
                lines.append(f"{'':>15}ray node {h.ray_node}")
            if h.hang:
                lines.append(f"{'':>15}hang: {h.hang}")
        for t in order.tenants if order is not None else ():
            lines.append(f"  client {t.client_name!r} (session {t.session_id}, weight "
                         f"{t.weight:g}): {t.queued} queued, {t.ordered} ordered, "
                         f"{t.device_seconds:.3f} device s")
    for s in status.slices:
        mesh = "x".join(f"{n}{a}" for n, a in zip(s.mesh_shape, s.axis_names))
        hosts = sorted({d.host for d in s.devices})
        lines.append(f"slice {s.slice_id}: island {s.island}, mesh {mesh}, hosts "
                     f"{','.join(map(str, hosts))}")
    return "\n".join(lines)
