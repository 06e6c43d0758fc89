"""`pathways bench transfer`'s arithmetic: medians and spreads over rounds, ratios against the
issue's targets, the table and the plot, from a report made up here (no cluster)."""

from __future__ import annotations

import pytest

from benchmarks import transfer
from benchmarks.transfer_plot import format_table, plot_transfer


def _measurement(seconds: float, memcpy_seconds: float, nbytes: int) -> dict:
    return {"seconds": seconds, "memcpy_seconds": memcpy_seconds,
            "fresh_memcpy_seconds": 2 * memcpy_seconds,
            "gib_per_s": nbytes / seconds / (1 << 30),
            "memcpy_gib_per_s": nbytes / memcpy_seconds / (1 << 30),
            "ratio": memcpy_seconds / seconds, "ratio_fresh": 2 * memcpy_seconds / seconds}


def _report() -> dict:
    nbytes = 256 << 20
    rounds = []
    for r, put_s in enumerate((0.5, 0.25, 1.0)):  # ratios 0.2, 0.4, 0.1 against 0.1 s memcpy
        ops = {op: _measurement(put_s, 0.1, nbytes) for op in transfer.OPERATIONS}
        rounds.append({"path": "shm", "round": r,
                       "measurements": {transfer.key_of("shm", "sharded", 256): ops}})
    report = {"rounds": rounds, "first_mib": 256, "targets": transfer.TARGETS,
              "first": {"shm": {"put": 1.25, "fetch": 0.25}}, "environment": {}}
    report["summary"] = transfer.summarize(rounds)
    report["targets_met"] = transfer.targets_met(report)
    report["palm_exchange"] = transfer.palm_exchange(report, 2 << 30, 0.5)
    return report


def test_medians_spreads_and_targets():
    report = _report()
    ratio = report["summary"]["shm/sharded/256MiB"]["put"]["ratio"]
    assert ratio["median"] == pytest.approx(0.2) and ratio["min"] == pytest.approx(0.1)
    assert ratio["max"] == pytest.approx(0.4)
    met = report["targets_met"]
    assert met["shm_put"] == {"ratio": pytest.approx(0.2), "target": 0.4, "met": False}
    assert met["stream_put"]["met"] is None  # not measured: neither met nor missed
    # Warm put: 256 MiB in 0.5 s; the first took 1.25 s: 2.5 times slower.
    assert met["shm_first_put"]["first_over_warm"] == pytest.approx(2.5)
    assert met["shm_first_put"]["met"] is False
    assert met["shm_first_fetch"]["met"] is True
    palm = report["palm_exchange"]["shm"]  # 2 GiB at 0.5 GiB/s: 4 s next to 0.5 s of compute
    assert palm["exchange_s"] == pytest.approx(4.0)
    assert palm["share_of_step"] == pytest.approx(4.0 / 4.5)


@pytest.mark.filterwarnings("ignore:constrained_layout not applied")  # one size: a narrow plot
def test_table_and_plot(tmp_path):
    report = _report()
    table = format_table(report)
    assert "shm/sharded/256MiB" in table and "0.20 (0.10-0.40)" in table
    assert "target stream_put: - (target >= 0.2) not measured" in table
    assert plot_transfer(report, tmp_path / "transfer.png").stat().st_size > 0
