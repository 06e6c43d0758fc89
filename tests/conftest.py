"""Test set-up: 8 simulated CPU devices, so sharding tests run on any machine."""

import os

os.environ.setdefault("GRPC_VERBOSITY", "ERROR")
# No transfer reserve (proto.shm.reserve_memory): every test cluster's host processes would fault
# in 256 MiB each as they start. tests/test_cma.py turns it on where it is what is tested.
os.environ.setdefault("PATHWAYS_CLIENT_RESERVE_BYTES", "0")
os.environ.setdefault("PATHWAYS_HOST_RESERVE_BYTES", "0")

import jax  # noqa: E402
import pytest  # noqa: E402

jax.config.update("jax_num_cpu_devices", 8)


@pytest.fixture(scope="session")
def cluster():
    """A 2-island x 4-device in-process cluster shared by the tests that only use it."""
    import runtime

    with runtime.LocalCluster(islands=2, devices_per_island=4) as c:
        yield c


@pytest.fixture
def client(cluster):
    """A fresh session on the shared cluster, closed after the test."""
    c = cluster.client()
    yield c
    c.close()


@pytest.fixture(scope="session")
def proxy(cluster):
    """An IFRT proxy server (runtime.proxy) for the shared cluster."""
    from runtime.proxy import start_proxy

    running = start_proxy(cluster.address, credentials=cluster.credentials)
    yield running
    running.stop()


@pytest.fixture
def wire(proxy, cluster):
    """A bare IFRT proxy session (tests/proxy_wire.py) on the shared proxy, initialized."""
    from proxy_wire import WireSession

    session = WireSession(proxy.address, cluster.credentials.token)
    session.init()
    yield session
    session.close()
class Bystander:
    """A client minding its own business on a cluster under attack: `check()` asserts its stored
    arrays are intact, new work on them is correct, and the cluster's status (in process and over
    the wire) still answers with every host alive."""

    def __init__(self, cluster, island: int = 0) -> None:
        import numpy as np
        from jax.sharding import PartitionSpec as P

        self.cluster = cluster
        self.client = cluster.client("bystander")
        self.slice = self.client.slice({"d": 2}, island=island)
        self.data = np.arange(16, dtype=np.float32)
        self.x = self.client.put(self.data, self.slice, P("d"))
        self.f = self.client.jit(lambda v: v + 1, self.slice, in_specs=P("d"), out_specs=P("d"))
        self.y = self.f(self.x)
        np.testing.assert_array_equal(self.y.fetch(), self.data + 1)

    def check(self) -> None:
        import numpy as np

        np.testing.assert_array_equal(self.x.fetch(timeout=30), self.data)
        np.testing.assert_array_equal(self.y.fetch(timeout=30), self.data + 1)
        np.testing.assert_array_equal(self.f(self.x).fetch(timeout=30), self.data + 1)
        fresh = self.client.put(self.data * 3, self.slice)
        np.testing.assert_array_equal(fresh.fetch(timeout=30), self.data * 3)
        for status in (self.cluster.controller.status_report.status(), self.client.status()):
            assert status.hosts and all(h.state == "alive" for h in status.hosts), status.hosts
            assert all(not i.failure for i in status.islands), status.islands

    def close(self) -> None:
        self.client.close()


@pytest.fixture
def bystander(cluster):
    """A Bystander on the shared cluster's island 0, closed after the test."""
    b = Bystander(cluster)
    yield b
    b.close()
