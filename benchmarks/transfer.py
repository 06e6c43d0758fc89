"""`pathways bench transfer`: how fast array bytes move, as a share of memcpy on the same machine.

Puts, fetches and island-to-island copies of float32 arrays (1 MiB to 1 GiB, sharded over a slice's
devices and replicated) through the client API, against a cluster whose hosts are `pathways worker`
subprocesses (runtime.ProcessCluster, as `pathways up` runs them): once with the paths between
processes of this machine (the default, "shm": by address, proto.cma, or through shared-memory
segments), once with them turned off (PATHWAYS_SHARED_MEMORY=0: every byte goes through the
stream, as between machines). The machine is shared and busy, so every figure is also given as a
ratio to a NumPy copy of the same bytes timed right before it in the same round (interleaved
rounds; medians with their spread). The first put and fetch of each cluster are timed on their
own (cold: nothing compiled, only the memory the processes reserved at start faulted in) and
compared to the warm median.

Writes DIR/transfer.json after every round and DIR/transfer.png at the end
(benchmarks.transfer_plot).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import pathlib
import sys
import time
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np

from benchmarks.environment import Environment, recording, spread, write_json

MIB = 1 << 20
#: Transfer paths measured: name -> PATHWAYS_SHARED_MEMORY for client and hosts.
PATHS = {"shm": "1", "stream": "0"}
OPERATIONS = ("put", "fetch", "copy")
#: Targets of issue 20 (ratios to memcpy at TARGET_MIB, sharded arrays).
TARGET_MIB = 256
TARGETS = {"shm": 0.40, "stream": 0.20, "first_over_warm": 1.5}


@contextlib.contextmanager
def env_setting(name: str, value: str) -> Iterator[None]:
    """Environment variable `name`=value for this process and the workers it starts meanwhile."""
    before = os.environ.get(name)
    os.environ[name] = value
    try:
        yield
    finally:
        if before is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = before


def shared_memory_setting(value: str):
    """PATHWAYS_SHARED_MEMORY=value for this process and the workers it starts meanwhile."""
    return env_setting("PATHWAYS_SHARED_MEMORY", value)


def memcpy_seconds(source: np.ndarray, target: np.ndarray) -> float:
    """Seconds NumPy takes to copy `source` into the (already touched) `target`: the reference
    of every ratio (`ratio_fresh` is against a copy into new memory, `source.copy()`)."""
    began = time.perf_counter()
    np.copyto(target, source)
    return time.perf_counter() - began


def timed(fn: Callable[[], Any]) -> tuple[float, Any]:
    began = time.perf_counter()
    result = fn()
    return time.perf_counter() - began, result


def wait_ready(client, array, timeout: float = 600.0) -> None:
    """Waits until `array` is computed on every host holding it, without fetching its bytes."""
    from proto import pathways_pb2 as pb
    from runtime.client import array as _array

    if array._ticket is not None:
        array._ticket.wait(timeout)
        array._ticket = None
    for host in sorted({d.host for d in array.slice.info.devices}):
        request = pb.GetArrayRequest(array_id=array.id, timeout_s=timeout, ready_only=True,
                                     after_sequence=array.sequence)
        _array._worker_call(client, array.slice, host, lambda stub, r=request: list(
            stub.GetArray(r, timeout=timeout + 5)))


class Bench:
    """One cluster and two slices (one per island) on which the operations are timed."""

    def __init__(self, args: argparse.Namespace, log: pathlib.Path) -> None:
        import runtime
        from jax.sharding import PartitionSpec

        self.cluster = runtime.ProcessCluster(args.islands, args.hosts_per_island,
                                              args.devices_per_host, worker_log=str(log))
        try:
            self.client = runtime.Client(self.cluster.address,
                                         credentials=self.cluster.credentials, timeout_s=600)
            devices = args.hosts_per_island * args.devices_per_host
            self.slices = [self.client.slice({"x": devices}, island=i)
                           for i in range(min(2, args.islands))]
        except BaseException:
            self.cluster.close()
            raise
        self.specs = {"sharded": PartitionSpec("x"), "replicated": PartitionSpec()}

    def put(self, value: np.ndarray, layout: str):
        return self.client.put(value, self.slices[0], self.specs[layout])

    def measure(self, value: np.ndarray, layout: str, scratch: np.ndarray,
                check: bool) -> dict[str, Any]:
        """One round at one size and layout: each operation timed right after a memcpy."""
        record: dict[str, Any] = {}

        def one(name: str, fn: Callable[[], Any]) -> Any:
            copy_s = memcpy_seconds(value, scratch)
            fresh_s, fresh = timed(value.copy)  # into new memory, as a transfer's target is
            del fresh
            seconds, result = timed(fn)
            record[name] = {"seconds": seconds, "memcpy_seconds": copy_s,
                            "fresh_memcpy_seconds": fresh_s,
                            "gib_per_s": value.nbytes / seconds / (1 << 30),
                            "memcpy_gib_per_s": value.nbytes / copy_s / (1 << 30),
                            "ratio": copy_s / seconds, "ratio_fresh": fresh_s / seconds}
            return result

        remote = one("put", lambda: self.put(value, layout))
        fetched = one("fetch", remote.fetch)
        if check and not np.array_equal(fetched, value):
            raise AssertionError(f"fetch returned other bytes than were put ({layout})")
        del fetched
        if len(self.slices) > 1:
            def copy():
                moved = remote.to(self.slices[1])
                wait_ready(self.client, moved)
                return moved
            moved = one("copy", copy)
            if check and not np.array_equal(moved.fetch(), value):
                raise AssertionError(f"island copy holds other bytes than were put ({layout})")
            moved.delete()
        remote.delete()
        return record

    def close(self) -> None:
        self.client.close()
        self.cluster.close()


def summarize(rounds: list[dict[str, Any]]) -> dict[str, Any]:
    """Median and spread per path, layout, size and operation, of GiB/s and ratio to memcpy."""
    summary: dict[str, Any] = {}
    for record in rounds:
        for key, ops in record["measurements"].items():
            for op, m in ops.items():
                entry = summary.setdefault(key, {}).setdefault(op, {
                    "gib_per_s": [], "ratio": [], "ratio_fresh": [], "memcpy_gib_per_s": []})
                for field in entry:
                    entry[field].append(m[field])
    return {key: {op: {field: spread(values) for field, values in fields.items()}
                  for op, fields in ops.items()} for key, ops in summary.items()}


def key_of(path: str, layout: str, mib: float) -> str:
    return f"{path}/{layout}/{mib:g}MiB"


def targets_met(report: dict[str, Any]) -> dict[str, Any]:
    """The issue's targets against this run's medians (None where not measured)."""
    met: dict[str, Any] = {}
    for path, floor in (("shm", TARGETS["shm"]), ("stream", TARGETS["stream"])):
        ops = report["summary"].get(key_of(path, "sharded", TARGET_MIB), {})
        for op in OPERATIONS:
            ratio = ops.get(op, {}).get("ratio", {}).get("median")
            met[f"{path}_{op}"] = {"ratio": ratio, "target": floor,
                                   "met": None if ratio is None else ratio >= floor}
    for path, first in report.get("first", {}).items():
        for op, seconds in first.items():
            warm = report["summary"].get(key_of(path, "sharded", report["first_mib"]), {})
            warm_gib = warm.get(op, {}).get("gib_per_s", {}).get("median")
            if warm_gib:
                first_gib = report["first_mib"] * MIB / seconds / (1 << 30)
                slower = warm_gib / first_gib  # how many times slower than warm
                met[f"{path}_first_{op}"] = {"first_over_warm": slower,
                                             "target": TARGETS["first_over_warm"],
                                             "met": slower <= TARGETS["first_over_warm"]}
    return met


def palm_exchange(report: dict[str, Any], gradient_bytes: float, step_s: float
                  ) -> dict[str, Any]:
    """The two-pod PaLM step's gradient exchange at the measured island-copy rates: its seconds
    and share of a step of `step_s` seconds of computation (an exchange that does not overlap)."""
    out: dict[str, Any] = {"gradient_bytes": gradient_bytes, "compute_step_s": step_s}
    for path in PATHS:
        ops = report["summary"].get(key_of(path, "sharded", TARGET_MIB), {})
        rate = ops.get("copy", {}).get("gib_per_s", {}).get("median")
        if rate:
            exchange = gradient_bytes / (rate * (1 << 30))
            out[path] = {"copy_gib_per_s": rate, "exchange_s": exchange,
                         "share_of_step": exchange / (exchange + step_s)}
    return out


def run(args: argparse.Namespace) -> int:
    from benchmarks.transfer_plot import format_table, plot_transfer

    out = pathlib.Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    env = Environment()
    json_path = out / "transfer.json"
    sizes = [float(s) for s in args.sizes_mib.split(",")]
    layouts = args.layouts.split(",")
    paths = args.paths.split(",")
    report: dict[str, Any] = {
        "sizes_mib": sizes, "layouts": layouts, "paths": paths, "rounds_planned": args.rounds,
        "cluster": {"islands": args.islands, "hosts_per_island": args.hosts_per_island,
                    "devices_per_host": args.devices_per_host},
        "first_mib": args.first_mib, "targets": TARGETS, "target_mib": TARGET_MIB,
        "command": " ".join(["pathways", "bench", "transfer"] + sys.argv[3:]),
        "environment": env.record, "phase": "setup", "rounds": [], "first": {}}
    started = time.time()

    def progress(message: str) -> None:
        print(f"[{time.time() - started:6.1f} s] {message}", flush=True)

    with recording(report, json_path, env):
        values = {mib: np.random.default_rng(int(mib * 8)).standard_normal(
            int(mib * MIB) // 4, dtype=np.float32) for mib in sizes}
        values.setdefault(args.first_mib, np.random.default_rng(1).standard_normal(
            int(args.first_mib * MIB) // 4, dtype=np.float32))
        scratch = {mib: np.empty_like(v) for mib, v in values.items()}
        for s in scratch.values():
            s.fill(0)  # touched: memcpy's target pages exist, as a warm transfer's do
        for path in paths:
            with shared_memory_setting(PATHS[path]):
                progress(f"{path}: starting {args.islands} islands of {args.hosts_per_island} "
                         f"host(s) x {args.devices_per_host} devices")
                bench = Bench(args, out / f"workers-{path}.log")
                try:
                    first = values[args.first_mib]
                    put_s, remote = timed(lambda: bench.put(first, "sharded"))
                    fetch_s, _ = timed(remote.fetch)
                    remote.delete()
                    report["first"][path] = {"put": put_s, "fetch": fetch_s}
                    progress(f"{path}: first put {put_s:.3f} s, first fetch {fetch_s:.3f} s "
                             f"({args.first_mib:g} MiB)")
                    for r in range(args.rounds):
                        record = {"path": path, "round": r, "measurements": {}}
                        for mib in sizes:
                            for layout in layouts:
                                record["measurements"][key_of(path, layout, mib)] = bench.measure(
                                    values[mib], layout, scratch[mib], check=(r == 0))
                        report["rounds"].append(record)
                        report["summary"] = summarize(report["rounds"])
                        write_json(json_path, report)
                        progress(f"{path}: round {r + 1}/{args.rounds} done")
                finally:
                    bench.close()
        if args.exchange_mib > 0:
            report["exchange"] = measure_exchange(args, out, progress)
            write_json(json_path, report)
        report["targets_met"] = targets_met(report)
        report["palm_exchange"] = palm_exchange(report, args.palm_gradient_gib * (1 << 30),
                                                args.palm_step_s)
        report["phase"] = "complete"
    plot_transfer(report, out / "transfer.png")
    print(format_table(report))
    print(f"wrote {json_path}, {out / 'transfer.png'}")
    return 0


def measure_exchange(args: argparse.Namespace, out: pathlib.Path,
                     progress: Callable[[str], None]) -> dict[str, Any]:
    """The two-pod step's exchange (benchmarks.transfer_exchange), measured on two clusters at
    once (shared memory), sends in the island's order and sends started early, interleaved."""
    from benchmarks.transfer_exchange import Exchange, summarize as summarize_exchange

    benches: dict[str, Bench] = {}
    results: dict[str, Any] = {"gradient_mib": args.exchange_mib, "busy_s": args.palm_step_s}
    try:
        with shared_memory_setting("1"):
            for name, value in (("in_order", "0"), ("early", "1")):
                with env_setting("PATHWAYS_EARLY_SENDS", value):
                    benches[name] = Bench(args, out / f"workers-exchange-{name}.log")
        exchanges: dict[str, Exchange] = {}
        for name, b in benches.items():  # the same computation on both
            iterations = next(iter(exchanges.values())).iterations if exchanges else None
            exchanges[name] = Exchange(b, args.exchange_mib, args.palm_step_s, iterations)
        rounds: dict[str, list] = {name: [] for name in exchanges}
        for r in range(args.rounds):
            for name, exchange in exchanges.items():
                rounds[name].append(exchange.round())
            progress(f"exchange: round {r + 1}/{args.rounds} done")
        for name, exchange in exchanges.items():
            results[name] = {"iterations": exchange.iterations, "rounds": rounds[name],
                             "summary": summarize_exchange(rounds[name])}
    finally:
        for b in benches.values():
            b.close()
    return results


def add_parser(bench: argparse._SubParsersAction) -> None:
    p = bench.add_parser("transfer", help="put, fetch and island copy throughput vs memcpy",
                         description=__doc__)
    p.add_argument("--out", required=True, help="directory for transfer.json and transfer.png")
    p.add_argument("--sizes-mib", default="1,16,256",
                   help="comma-separated array sizes in MiB (up to 1024)")
    p.add_argument("--layouts", default="sharded,replicated", help="sharded and/or replicated")
    p.add_argument("--paths", default="shm,stream",
                   help="shm (shared memory on this machine) and/or stream (gRPC only)")
    p.add_argument("--rounds", type=int, default=5, help="interleaved rounds")
    p.add_argument("--islands", type=int, default=2)
    p.add_argument("--hosts-per-island", type=int, default=1)
    p.add_argument("--devices-per-host", type=int, default=2)
    p.add_argument("--first-mib", type=float, default=256,
                   help="size of the cold first put and fetch of each cluster")
    p.add_argument("--palm-gradient-gib", type=float, default=2.0,
                   help="gradient bytes a PaLM step exchanges between pods (default: 1B "
                        "parameters in bfloat16)")
    p.add_argument("--palm-step-s", type=float, default=0.5,
                   help="seconds of computation of that step (without the exchange)")
    p.add_argument("--exchange-mib", type=float, default=256,
                   help="gradient size of the measured two-pod step exchange (0: not measured)")
    p.set_defaults(func=run)


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    add_parser(parser.add_subparsers(required=True))
    sys.exit(run(parser.parse_args(["transfer"] + sys.argv[1:])))
