"""The fan-out tree of an island: how its order reaches its hosts with a few controller messages
per batch instead of one per host.

With `SchedulerConfig.fanout_roots` = r, `fanout` = k and at least `fanout_min_hosts` hosts, the
island's hosts, in index order, form r k-ary trees: the controller dispatches each batch to the
first r hosts (the roots), and the host at position i forwards it to those at positions
r + k i .. r + k i + k - 1 (runtime.worker.forward). With one root (the default) the controller
sends one message per island per batch, whatever the island's size; the order reaches 64 hosts
in three levels (1, 8, 55). A host replies without waiting for the hosts below it (one forwarded
call in flight per host below, later batches merged behind it), so a slow subtree holds up only
itself; where the hosts below stand comes back with a later reply and in their own progress
reports. Every host still receives the same instructions, in order, and executes them in
sequence order, so the island runs one order as before; only the way there changes.

A host the tree does not reach (its forwarded call failed) is reported lost by the link of its
root, with the reason, and its island fails: never a hang. Each other host's link keeps what was
sent through the tree until the host acknowledges it: what the tree has not brought within
`relay_timeout_s` goes directly, and when the tree changes (a host joins or leaves) nothing is
lost: a host taken out of the tree gets the rest directly.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from proto import pathways_pb2 as pb


def plan(hosts: Sequence[tuple[int, str]], fanout: int, roots: int = 1
         ) -> dict[int, list[pb.ForwardTarget] | None]:
    """Per host (index -> control address, in index order): the subtrees it forwards to if the
    controller dispatches to it (one of the first `roots`; maybe an empty list), or None if it is
    reached through another host. `fanout` < 1 or one host: every host is a root without
    subtrees."""
    if fanout < 1 or len(hosts) <= 1:
        return {host: [] for host, _ in hosts}
    roots = max(1, roots)

    def target(position: int) -> pb.ForwardTarget:
        host, address = hosts[position]
        return pb.ForwardTarget(host=host, address=address,
                                forward=[target(c) for c in children(position)])

    def children(position: int) -> range:
        first = roots + fanout * position
        return range(first, min(first + fanout, len(hosts)))

    routes: dict[int, list[pb.ForwardTarget] | None] = {host: None for host, _ in hosts}
    for position in range(min(roots, len(hosts))):
        routes[hosts[position][0]] = [target(c) for c in children(position)]
    return routes


def apply(links: Mapping[int, object], fanout: int, min_hosts: int, roots: int = 1) -> list:
    """Routes an island's links (scheduler.delivery.HostLink, by host index) by `plan`: a tree
    when at least `min_hosts` of them can join it, else a direct Dispatch to each. A link joins
    only when it is caught up (nothing of its own waits for an acknowledgement: a host that
    just joined first gets the history directly) and has not failed; the others get their own
    Dispatch, as do links without routes (a test's). Returns the links not relayed: those the
    scheduler hands the order to."""
    routable = {host: link for host, link in links.items() if hasattr(link, "route")}
    tree = sorted((host, link.address) for host, link in routable.items()
                  if not link.failed and link.idle())
    routes = plan(tree, fanout if len(tree) >= max(min_hosts, 2) else 0, roots)
    for host, link in routable.items():
        link.route(routes.get(host, []))
    return [link for link in links.values() if not getattr(link, "relayed", False)]
