"""Exclusive ports: every server of the runtime owns its port alone.

gRPC turns SO_REUSEPORT on by default, so a second `pathways up --port P` used to bind P beside the
first: the kernel then split new connections between the two, the second cluster's workers reached
the first controller, and the second process deleted the first one's token on its way out. Servers
are now built with `SERVER_OPTIONS` (SO_REUSEPORT off), and a busy port is found before anything
else starts, with a message that says what is going on.
"""

from __future__ import annotations

import errno
import socket

from proto.errors import FailedPreconditionError

#: gRPC server options that make a listening port exclusive (added to every runtime server's).
SERVER_OPTIONS = (("grpc.so_reuseport", 0),)


class PortInUseError(FailedPreconditionError):
    """A server's port is taken by another process."""

    def __init__(self, port: int | str) -> None:
        super().__init__(f"port {port} is already in use (another pathways up?)")
        self.port = port


def split_address(address: str) -> tuple[str, int]:
    """("host", port) of "host:port" or "[v6]:port" (brackets removed)."""
    host, _, port = address.rpartition(":")
    return host.strip("[]"), int(port)


def ensure_port_free(address: str) -> None:
    """Raises PortInUseError when something already listens on `address`'s port (port 0, which
    picks a free one, always passes). A bind of a throwaway socket, with SO_REUSEADDR as gRPC sets
    it: it fails only for a port another socket holds, not for connections in TIME_WAIT. The port
    can still be taken between this check and the real bind; the server's own bind reports that
    with the same error (`bind_failed`)."""
    host, port = split_address(address)
    if port == 0:
        return
    try:
        infos = socket.getaddrinfo(host or None, port, type=socket.SOCK_STREAM,
                                   flags=socket.AI_PASSIVE)
    except socket.gaierror:
        return  # an unresolvable name: the server's bind reports it
    for family, kind, proto, _, sockaddr in infos:
        with socket.socket(family, kind, proto) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                probe.bind(sockaddr)
            except OSError as exc:
                if exc.errno == errno.EADDRINUSE:
                    raise PortInUseError(port) from None
                # Another failure (e.g. an address not on this machine): the server reports it.


def bind_failed(what: str, address: str) -> FailedPreconditionError:
    """The error for a server whose bind to `address` failed: PortInUseError when the port is
    taken, else a plain FailedPreconditionError naming the server and the address."""
    try:
        ensure_port_free(address)
    except PortInUseError as exc:
        return exc
    return FailedPreconditionError(f"cannot bind {what} server to {address}")
