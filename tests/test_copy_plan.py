"""Which host of a multi-host source slice sends which shards of a copy (runtime.worker.copy_plan):
every destination shard from the one host holding it as a block, or a gather when none does."""

from proto import pathways_pb2 as pb
from runtime.worker.copy_plan import direct_shares, put_id


def _slice(hosts, axes=("x",), shape=None):
    """A slice whose mesh position p lies on host hosts[p]."""
    return pb.SliceInfo(mesh_shape=shape or [len(hosts)], axis_names=list(axes),
                        devices=[pb.SliceDevice(host=h) for h in hosts])


def _split(*axes):
    return pb.Sharding(dims=[pb.DimSharding(axes=[a] if a else []) for a in axes])


def test_the_same_sharding_goes_host_to_host_without_a_gather():
    source = _slice([0, 0, 1, 1])
    shares = direct_shares([8], _split("x"), source, _split("x"), _slice([0, 0, 1, 1]))
    assert shares == {0: {0: [(((0, 2),), [0]), (((2, 4),), [1])]},
                      1: {1: [(((4, 6),), [2]), (((6, 8),), [3])]}}


def test_a_destination_host_fed_by_two_source_hosts_takes_two_parts():
    shares = direct_shares([8], _split("x"), _slice([0, 0, 1, 1]), _split("x"),
                           _slice([0, 1, 0, 1]))  # interleaved over the hosts
    assert shares == {0: {0: [(((0, 2),), [0])], 1: [(((4, 6),), [2])]},
                      1: {0: [(((2, 4),), [1])], 1: [(((6, 8),), [3])]}}


def test_a_replicated_block_is_sent_by_its_lowest_host_to_every_position():
    # Mesh (r, x) = (2, 2), split over x, replicated over r: each block lies on hosts 0 and 1.
    source = _slice([1, 0, 0, 1], axes=("r", "x"), shape=[2, 2])
    shares = direct_shares([4], _split("x"), source, _split(None), _slice([2, 2]))
    assert shares is None  # the destination wants the whole; no host holds it as a block
    shares = direct_shares([4], _split("x"), source, _split("x"), _slice([3, 3]))
    assert shares == {3: {0: [(((0, 2),), [0]), (((2, 4),), [1])]}}


def test_a_destination_shard_spanning_source_blocks_needs_a_gather():
    assert direct_shares([8], _split("x"), _slice([0, 0, 1, 1]), _split("x"),
                         _slice([0, 0])) is None  # halves from quarters
    assert direct_shares([8, 4], _split("x"), _slice([0, 1]), _split(None, "x"),
                         _slice([0, 1])) is None  # rows to columns


def test_every_source_host_names_a_copy_alike_and_other_copies_otherwise():
    send = pb.SendInstruction(array_id=3, destination=pb.ArraySpec(array_id=9))
    assert put_id(send, 17) == put_id(pb.SendInstruction(
        array_id=3, destination=pb.ArraySpec(array_id=9)), 17)
    assert len({put_id(send, 17), put_id(send, 18), put_id(pb.SendInstruction(
        array_id=3, destination=pb.ArraySpec(array_id=10)), 17)}) == 3
    assert 0 < put_id(send, 17) < 1 << 63
