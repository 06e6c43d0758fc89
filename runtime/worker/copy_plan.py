"""Which host of a multi-host source slice sends which shards of an array to which destination host.

An island copy of an array whose shards lie on several hosts needs no gather when every shard the
destination wants is exactly a block some source host holds (the common case: the same sharding
over a mesh of the same shape, as a two-pod gradient exchange has). Then each source host sends
the blocks assigned to it straight to the destination hosts that want them, all hosts' links at
once, and a destination host that gets shards from several source hosts takes them as one put
in that many parts (ArrayChunk.parts, runtime.worker.put_parts). Each source host computes the
same plan from the same instruction, so they agree on the parts without talking.

Otherwise (a destination shard spans several source blocks) the copy gathers the array on the
source slice's first host, which sends it all (runtime.worker.transfers).
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence

from proto import pathways_pb2 as pb
from proto import wire as _wire

#: Per destination host: per source host, the (index, destination mesh positions) shards it sends.
Shares = dict[int, dict[int, list[tuple[_wire.Index, list[int]]]]]


def whole_shares(shape: Sequence[int], info: pb.SliceInfo, sharding: pb.Sharding
                 ) -> list[tuple[int, str, list[tuple[_wire.Index, list[int]]]]]:
    """The shards of an array sent whole (from one host) to the slice `info` under `sharding`:
    per destination host with devices of the slice, (host, address, its (index, mesh positions)
    shards)."""
    groups = _wire.slice_shard_groups(shape, info, sharding)
    shares = []
    for host, address in enumerate(info.host_addresses):
        positions = {p for p, d in enumerate(info.devices) if d.host == host}
        if positions:
            shares.append((host, address, [(index, [p for p in ps if p in positions])
                                           for index, ps in groups
                                           if positions.intersection(ps)]))
    return shares


def direct_shares(shape: Sequence[int], source: pb.Sharding, source_info: pb.SliceInfo,
                  dest: pb.Sharding, dest_info: pb.SliceInfo) -> Shares | None:
    """Who sends what (see the module docstring), or None when some destination shard is not a
    block any source host holds whole. A block several source hosts hold (replicated) is sent by
    the lowest of them."""
    holder: dict[_wire.Index, int] = {}
    for index, positions in _wire.slice_shard_groups(shape, source_info, source):
        holder[index] = min(source_info.devices[p].host for p in positions)
    shares: Shares = {}
    for index, positions in _wire.slice_shard_groups(shape, dest_info, dest):
        sender = holder.get(index)
        if sender is None:
            return None
        for host in sorted({dest_info.devices[p].host for p in positions}):
            mine = [p for p in positions if dest_info.devices[p].host == host]
            shares.setdefault(host, {}).setdefault(sender, []).append((index, mine))
    return shares


def put_id(send: pb.SendInstruction, sequence: int) -> int:
    """The id every source host gives the streams of one copy (ArrayChunk.put): the same on all
    of them, another for any other copy (a copy made again has another place in the order)."""
    digest = hashlib.blake2b(f"{send.array_id}/{send.destination.array_id}/{sequence}".encode(),
                             digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1 or 1
