"""Plain JAX through the proxy as a dispatch-benchmark system (benchmarks.dispatch_proxy): it
computes the same chain as the baselines, and its figures derive from the report."""

import pytest

from benchmarks.dispatch_baselines import check_system, expected_state
from benchmarks.dispatch_proxy import ProxySystem, proxy_figures


@pytest.mark.slow
def test_proxy_system_advances_the_chain_exactly():
    system = ProxySystem(2)
    try:
        check_system(system, length=4)
        before = system.state()
        system.fused(2, length=8)
        assert (system.state() == expected_state(before, 16)).all()
    finally:
        system.close()


def test_proxy_figures_compare_with_the_client_api():
    report = {
        "results": [{"system": s, "shape": p, "computations_per_s": rate}
                    for s, rates in (("runtime", (100, 200, 400)), ("proxy", (50, 50, 400)))
                    for p, rate in zip(("opbyop", "chained", "fused"), rates)],
        "sweep": [{"system": s, "k": k, "ms": ms, "computations_per_s": rate}
                  for k, ms, rates in ((0, 0.1, {"jax": 1000, "proxy": 100}),
                                       (4, 1.0, {"jax": 100, "proxy": 100}))
                  for s, rate in rates.items()],
    }
    figures = proxy_figures(report)
    assert figures["proxy_vs_runtime"] == {"opbyop": 0.5, "chained": 0.25, "fused": 1.0}
    assert 0.1 < figures["proxy_break_even_ms"] <= 1.0
