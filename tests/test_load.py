"""Load: many clients running many small programs at once all finish with correct results, and the
hosts' and the controller's memory goes back to where it was."""

from __future__ import annotations

import gc
import resource
import threading
import time

import numpy as np

import runtime


def _stored(cluster) -> tuple[int, int]:
    """(arrays, bytes) held by every host of the cluster, and the controller's array records."""
    arrays = sum(w.store.stats()[0] for w in cluster.workers)
    nbytes = sum(w.store.stats()[1] for w in cluster.workers)
    return arrays + len(cluster.controller.planner.arrays), nbytes


def _rss_mib() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize() / 2**20


def _run_clients(cluster, clients: int, programs: int) -> None:
    errors: list[BaseException] = []

    def one(index: int) -> None:
        try:
            with cluster.client(f"load-{index}") as client:
                s = client.slice({"d": 1}, island=index % 2)
                inc = client.jit(lambda v: v + 1, s)
                dbl = client.jit(lambda v: v * 2, s)

                @client.program
                def step(v):
                    return dbl(inc(v))

                x = client.put(np.full(16, index, np.int32), s)
                expected = np.full(16, index, np.int64)
                for i in range(programs):
                    x = step(x)
                    expected = (expected + 1) * 2
                    if i % 250 == 249:  # keep the numbers in int32 and check as we go
                        np.testing.assert_array_equal(x.fetch(timeout=120), expected)
                        x = client.put(np.full(16, index, np.int32), s)
                        expected = np.full(16, index, np.int64)
                np.testing.assert_array_equal(x.fetch(timeout=120), expected)
        except BaseException as exc:  # noqa: BLE001 - reported by the main thread
            errors.append(exc)

    threads = [threading.Thread(target=one, args=(i,)) for i in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=600)
    assert not any(t.is_alive() for t in threads), "a client hung"
    if errors:
        raise errors[0]


def _drained(cluster, timeout: float = 30.0) -> tuple[int, int]:
    """Waits until no array is left on the hosts or in the controller (deletes reach the hosts
    asynchronously, after the work ordered before them); returns what is left."""
    deadline = time.monotonic() + timeout
    while _stored(cluster) != (0, 0) and time.monotonic() < deadline:
        time.sleep(0.05)
    return _stored(cluster)


def _check_load(clients: int, programs: int) -> None:
    with runtime.LocalCluster(islands=2, devices_per_island=1) as cluster:
        _run_clients(cluster, 2, 10)  # warm: compiles, thread pools, channels
        gc.collect()
        assert _drained(cluster) == (0, 0)
        rss_before = _rss_mib()
        start = time.monotonic()
        _run_clients(cluster, clients, programs)
        took = time.monotonic() - start
        gc.collect()
        assert _drained(cluster) == (0, 0)
        grown = _rss_mib() - rss_before
        assert grown < 256, f"process memory grew by {grown:.0f} MiB"
        assert cluster.controller.status_report.status().sessions == 0
        print(f"{clients} clients x {programs} programs: {took:.1f} s, "
              f"{clients * programs / took:.0f} programs/s, memory {grown:+.0f} MiB")


def test_load_16_clients_1000_programs():
    _check_load(clients=16, programs=1000)
