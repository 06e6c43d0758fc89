"""Test set-up: 8 simulated CPU devices, so sharding tests run on any machine."""

import os

os.environ.setdefault("GRPC_VERBOSITY", "ERROR")

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
