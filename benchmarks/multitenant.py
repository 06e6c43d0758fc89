"""`pathways bench multitenant`: the Pathways paper's multi-tenancy figures (9 and 11) on CPU.

One island (a worker subprocess with `--devices` simulated CPU devices, behind a controller in a
`pathways up` subprocess: clients, controller and hosts are separate processes, as in the paper) is
time-shared by 1, 4, 8 and 16 clients (threads of this process). Every client has a slice of all
the island's devices and submits the same small program (calibrated to `--program-ms`, 0.33 ms by
default) as fast as it can, keeping a bounded number in flight. Runs cover the FIFO policy, and
proportional share with weights 1:1:1:1 and 1:2:4:8 (repeated for more clients). From the hosts'
execution timeline the benchmark computes, over a steady-state window, the fraction of time the
devices were busy and each client's share of the device time. Writes DIR/multitenant.json
({"runs": [{"clients", "policy", "weights", "shares", "device_busy", ...}]}) and
DIR/multitenant.png (timelines of which client ran on each device, shares against weights, busy
against clients), and prints a table.

The JSON is rewritten after every run, with the software and machine (versions, commit, CPU,
cores, load average, CPU steal); each run's first `warmup_s` seconds are labelled warm-up and not
measured. The cluster's output (controller, scheduler, worker) goes to DIR/cluster-POLICY.log.
Deadlines scale with the calibrated program time.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import pathlib
import subprocess
import sys
import threading
import time
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np

from benchmarks.environment import Environment, cpu_times, machine_load, recording, write_json

TARGETS = {"device_busy": 0.95, "share_relative_error": 0.10}  # issue targets, >= 4 clients
#: Program calls a client keeps in flight, and how often it checks on them.
IN_FLIGHT = 512
CHECK_EVERY = 64
#: Deadlines: this many times the longest a client's calls in flight should take.
DEADLINE_FACTOR = 20
#: Seconds at the start of each run that are warm-up, not measured.
WARMUP_S = 1.0
#: Matrix size of the program (rows per device = this); its length is calibrated.
PROGRAM_DIM = 128


def weights_for(pattern: Sequence[float], clients: int) -> list[float]:
    """The weight pattern repeated over `clients` clients (1:2:4:8 for 8: 1,2,4,8,1,2,4,8)."""
    return [float(pattern[i % len(pattern)]) for i in range(clients)]


def busy_fraction(intervals: Sequence[tuple[float, float]], start: float, end: float) -> float:
    """Fraction of [start, end] covered by the union of the intervals."""
    covered, last = 0.0, start
    for a, b in sorted(intervals):
        a, b = max(a, last), min(b, end)
        if b > a:
            covered += b - a
            last = b
    return covered / (end - start) if end > start else 0.0


def device_shares(events: Sequence[tuple[int, float, float]], sessions: Sequence[int],
                  start: float, end: float) -> list[float]:
    """Each session's fraction of the device time spent in [start, end], from (session, start,
    end) execution events."""
    time_of = collections.Counter()
    for session, a, b in events:
        time_of[session] += max(0.0, min(b, end) - max(a, start))
    total = sum(time_of[s] for s in sessions)
    return [time_of[s] / total if total else 0.0 for s in sessions]


def _program(length: int):
    """`length` chained matmul+tanh steps on row-sharded x, and a small probe of the result (a
    client waits on a call by fetching its probe, not x). No cross-device communication."""
    import jax.numpy as jnp

    def program(x, w):
        for _ in range(length):
            x = jnp.tanh(x @ w)
        return x, x[:, :1]

    return program


class _Tenant:
    """One benchmark client: a session with a slice of every device and its compiled program."""

    def __init__(self, address: str, index: int, weight: float, length: int, devices: int,
                 n: int = PROGRAM_DIM, timeout_s: float | None = None) -> None:
        from jax.sharding import PartitionSpec as P

        import runtime
        from runtime.client.client import RPC_TIMEOUT_S

        self.client = runtime.Client(address, name=f"client{index}", weight=weight,
                                     timeout_s=timeout_s or RPC_TIMEOUT_S)
        self.slice = self.client.slice({"d": devices})
        rows = np.full((devices * n, n), 0.5, np.float32)
        self.x, self.w = self.client.put((rows, np.eye(n, dtype=np.float32) * 0.9), self.slice,
                                         (P("d"), P()))
        # Lowered once: each call is then only a signature check and a queued command.
        self.fn = self.client.jit(_program(length), self.slice,
                                  in_specs=(P("d"), P()), out_specs=(P("d"), P("d")),
                                  name=f"program{index}").lower(self.x, self.w)
        self.calls = 0
        self.error: BaseException | None = None

    @property
    def session_id(self) -> int:
        return self.client.session_id

    def warm_up(self) -> None:
        self.x, probe = self.fn(self.x, self.w)
        probe.fetch()

    def run_until(self, stop_at: float) -> None:
        """Calls the program as fast as it can, keeping at most IN_FLIGHT calls unfinished."""
        try:
            checks: collections.deque = collections.deque()
            while time.monotonic() < stop_at:
                self.x, probe = self.fn(self.x, self.w)
                self.calls += 1
                if self.calls % CHECK_EVERY == 0:
                    checks.append(probe)
                    if len(checks) > IN_FLIGHT // CHECK_EVERY:
                        checks.popleft().fetch()
            for probe in checks:
                probe.fetch()
        except BaseException as exc:  # reported by the run
            self.error = exc

    def close(self) -> None:
        self.client.close()


def _timeline(address: str, since: float, timeout: float = 30.0) -> list[Any]:
    """Execution events of every host of the cluster since `since`."""
    import runtime
    from proto import pathways_pb2 as pb

    events = []
    with runtime.Client(address, name="timeline") as client:
        for host in client.status().hosts:
            reply = client.worker_stub(host.address).GetTimeline(
                pb.GetTimelineRequest(since=since), timeout=timeout)
            events.extend(reply.events)
    return events


@contextlib.contextmanager
def island(devices: int, policy: str, log: pathlib.Path,
           timeout: float = 300.0) -> Iterator[str]:
    """A `pathways up` subprocess with one island of `devices` CPU devices, logging (INFO and up,
    its workers' too) to `log`; yields its address."""
    from runtime.worker.distributed import free_port

    port = free_port()
    with open(log, "ab") as output:
        up = subprocess.Popen([sys.executable, "-m", "runtime.cli", "-v", "up", "--islands", "1",
                               "--devices-per-island", str(devices), "--policy", policy,
                               "--port", str(port)], stdout=output, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + timeout
        while b"controller listening on" not in log.read_bytes():
            if up.poll() is not None:
                raise RuntimeError(f"pathways up exited with {up.returncode}: see {log}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"pathways up did not start within {timeout:.0f} s: see {log}")
            time.sleep(0.1)
        yield f"127.0.0.1:{port}"
    finally:
        up.terminate()
        try:
            up.wait(timeout=20)
        except subprocess.TimeoutExpired:
            up.kill()
            up.wait()


def calibrate(address: str, devices: int, target_ms: float, progress) -> tuple[int, float]:
    """The program length whose executions take about `target_ms` on the island, and that time."""
    length, measured = 4, 0.0
    for _ in range(4):
        tenant = _Tenant(address, 0, 1.0, length, devices)
        try:
            tenant.warm_up()
            start = time.time()
            tenant.run_until(time.monotonic() + 0.6)
            if tenant.error:
                raise tenant.error
            events = [e for e in _timeline(address, start) if e.session_id == tenant.session_id]
        finally:
            tenant.close()
        measured = float(np.median([e.end - e.start for e in events])) * 1e3
        progress(f"calibration: program of {length} matmuls runs {measured:.3f} ms")
        if abs(measured - target_ms) < 0.1 * target_ms:
            break
        length = max(1, round(length * target_ms / measured))
    return length, measured


def run_once(address: str, policy: str, weights: Sequence[float], length: int, devices: int,
             seconds: float, warmup: float = 1.0, program_ms: float = 1.0) -> dict[str, Any]:
    """One run: len(weights) clients submit the program for `seconds`; returns its record. The
    first `warmup` seconds are not measured; deadlines scale with `program_ms`, the program's
    measured device time."""
    from runtime.client.client import RPC_TIMEOUT_S

    in_flight_s = IN_FLIGHT * len(weights) * program_ms / 1e3  # all clients' calls in flight
    timeout = max(RPC_TIMEOUT_S, DEADLINE_FACTOR * in_flight_s)
    since = cpu_times()
    tenants = [_Tenant(address, i, w, length, devices, timeout_s=timeout)
               for i, w in enumerate(weights)]
    try:
        for tenant in tenants:
            tenant.warm_up()
        started = time.time()
        stop_at = time.monotonic() + seconds
        threads = [threading.Thread(target=t.run_until, args=(stop_at,), daemon=True)
                   for t in tenants]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        for tenant in tenants:
            if tenant.error:
                raise tenant.error
        window = (started + warmup, started + seconds - 0.05)
        sessions = [t.session_id for t in tenants]
        events = [e for e in _timeline(address, started, timeout)
                  if e.session_id in set(sessions)]
        busy = busy_fraction([(e.start, e.end) for e in events], *window)
        shares = device_shares([(e.session_id, e.start, e.end) for e in events], sessions,
                               *window)
        in_window = [e for e in events if window[0] <= e.start and e.end <= window[1]]
        durations = [e.end - e.start for e in in_window]
        expected = [w / sum(weights) for w in weights] if policy == "share" else (
            [1 / len(weights)] * len(weights))
        return {
            "clients": len(weights), "policy": policy, "weights": list(weights),
            "shares": shares, "expected_shares": expected,
            "share_relative_error": max(abs(s - e) / e for s, e in zip(shares, expected)),
            "device_busy": busy, "window_s": window[1] - window[0], "warmup_s": warmup,
            "warmup_calls_per_client": 1, "deadline_s": timeout, "machine": machine_load(since),
            "executions": len(in_window), "calls": [t.calls for t in tenants],
            "program_ms_median": float(np.median(durations)) * 1e3 if durations else None,
            "timeline": [(e.session_id, e.start - window[0], e.end - window[0], e.devices)
                         for e in events if window[0] <= e.start < window[0] + 0.05],
            "sessions": sessions,
        }
    finally:
        for tenant in tenants:
            tenant.close()


def _plan(policies: Sequence[str], counts: Sequence[int]) -> list[tuple[str, list[float]]]:
    """(policy, weights) of every run: FIFO with each client count, proportional share with the
    1:1:1:1 and 1:2:4:8 patterns (once for one client: every pattern is then the same run)."""
    patterns = {"fifo": [(1,)], "share": [(1, 1, 1, 1), (1, 2, 4, 8)]}
    plan = []
    for policy in policies:
        for clients in counts:
            seen = set()
            for pattern in patterns[policy]:
                weights = weights_for(pattern, clients)
                if tuple(weights) not in seen:
                    seen.add(tuple(weights))
                    plan.append((policy, weights))
    return plan


def run(args: argparse.Namespace) -> int:
    import jax
    from tqdm import tqdm

    from benchmarks.multitenant_plot import format_table, plot_multitenant

    jax.config.update("jax_num_cpu_devices", 1)  # the clients need no devices of their own
    out = pathlib.Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    began = time.time()
    policies = args.policies.split(",")
    plan = _plan(policies, [int(c) for c in args.clients.split(",")])
    env = Environment()
    report: dict[str, Any] = {"runs": [], "targets": TARGETS, "devices": args.devices,
                              "program_ms": args.program_ms, "seconds": args.seconds,
                              "warmup_s": WARMUP_S, "environment": env.record, "phase": "runs",
                              "logs": {p: f"cluster-{p}.log" for p in policies}}
    json_path = out / "multitenant.json"
    write_json(json_path, report)
    bar = tqdm(total=len(plan) + len(policies), desc="multitenant", unit="run", file=sys.stdout)

    def progress(message: str) -> None:
        bar.write(f"[{time.time() - began:6.1f} s] {message}")

    try:
        with recording(report, json_path, env):
            _runs(args, policies, plan, report, json_path, bar, progress)
            report["phase"] = "complete"
    finally:
        bar.close()
    plot_multitenant(report, out / "multitenant.png")
    print(format_table(report))
    print(f"wrote {out / 'multitenant.json'}, {out / 'multitenant.png'} and the cluster logs")
    return 0


def _runs(args, policies, plan, report, json_path, bar, progress) -> None:
    """Every run of the plan, policy by policy, each on a fresh island; the report is rewritten
    after each run."""
    out = json_path.parent
    for policy in policies:
        bar.set_postfix_str(f"{policy}: starting the island, calibrating")
        with island(args.devices, policy, out / f"cluster-{policy}.log") as address:
            length, program_ms = calibrate(address, args.devices, args.program_ms, progress)
            bar.update(1)
            for run_policy, weights in plan:
                if run_policy != policy:
                    continue
                bar.set_postfix_str(f"{policy}, {len(weights)} clients")
                record = run_once(address, policy, weights, length, args.devices,
                                  args.seconds, WARMUP_S, program_ms)
                record["program_ms_calibrated"] = program_ms
                report["runs"].append(record)
                write_json(json_path, report)
                bar.update(1)
                progress(f"{policy:>5} {len(weights):>2} clients weights "
                         f"{':'.join(f'{w:g}' for w in weights[:4])}"
                         f"{'...' if len(weights) > 4 else ''}: busy "
                         f"{record['device_busy']:.3f}, share error "
                         f"{record['share_relative_error']:.3f}")


def add_parser(bench: argparse._SubParsersAction) -> None:
    p = bench.add_parser("multitenant", help="multi-tenancy: device busy and shares under FIFO and "
                                             "proportional share (paper Figures 9 and 11)",
                         description=__doc__)
    p.add_argument("--out", required=True,
                   help="directory for multitenant.json and multitenant.png")
    p.add_argument("--devices", type=int, default=4, help="simulated CPU devices of the island")
    p.add_argument("--clients", default="1,4,8,16", help="client counts, comma-separated")
    p.add_argument("--policies", default="fifo,share", help="policies to run, comma-separated")
    p.add_argument("--program-ms", type=float, default=0.33, help="device time of one program")
    p.add_argument("--seconds", type=float, default=4.0,
                   help="seconds each run submits for (its first second is warm-up, not "
                        "measured)")
    p.set_defaults(func=run)


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    add_parser(parser.add_subparsers(required=True))
    sys.exit(run(parser.parse_args(["multitenant"] + sys.argv[1:])))
