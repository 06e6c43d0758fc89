"""`cluster.client()` of every launcher: sessions with the cluster's controller that carry the
cluster's credentials and the client part of its ClusterConfig, closed with the cluster."""

from __future__ import annotations

from proto import auth as _auth
from proto.config import ClusterConfig
from runtime.client.client import Client


class OpensClients:
    """A launcher's `client()` (a mixin: the launcher sets `address`, `credentials` and `config`
    and calls `close_clients()` when it closes)."""

    address: str
    credentials: _auth.Credentials
    config: ClusterConfig

    def client(self, name: str = "client", weight: float = 1.0) -> Client:
        """A new session with this cluster's controller, with the cluster's client settings
        (`config.client`, whole), closed with the cluster."""
        client = Client(self.address, name=name, weight=weight, credentials=self.credentials,
                        config=self.config.client)
        self.__dict__.setdefault("_opened_clients", []).append(client)
        return client

    def close_clients(self) -> None:
        """Closes every session `client()` opened (before the cluster stops its controller)."""
        for client in self.__dict__.pop("_opened_clients", []):
            client.close()
