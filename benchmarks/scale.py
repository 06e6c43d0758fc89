"""`pathways bench scale`: how the runtime's dispatch holds up from 4 to 1,024 hosts.

Sweeps host counts x computation durations x program shapes (OpByOp, Chained, Fused: the
Pathways paper's §5.1 dispatch benchmark, Figures 5 and 6) on simulated hosts (runtime.sim): their
devices hold each computation for its duration without using the CPU, so what keeps them idle is
the runtime's own overhead. Each host count is a cluster of its own: the controller in a process of
its own (its CPU, memory and threads read from /proc), islands of at most --hosts-per-island hosts
in a few simulated processes, one chain per island on a slice of all its devices. Writes
DIR/scale.json after every point, plots at the end (benchmarks.scale_plot), and the break-even per
host count and shape: the smallest computation at which the devices are busy >= 95% of the time.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import pathlib
import resource
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from typing import Any

from benchmarks.dispatch_baselines import SHAPES

HOSTS = (4, 16, 64, 256, 1024)
DURATIONS_MS = (0.1, 0.3, 1.0, 3.0, 10.0, 30.0, 100.0)
BREAK_EVEN_BUSY = 0.95
#: Commands the lone probe (one in the whole cluster at a time) sends in all, about: enough for
#: its p99 to be more than the largest of a few (16 islands: 13 rounds, 208 commands).
LONE_COMMANDS = 200


def lone_probe_rounds(commands: int | None, islands: int, rounds: int) -> int:
    """Rounds of the one-command-alone probe (a command per island each): `commands` in all,
    rounded up to whole rounds; or, by default (None), about LONE_COMMANDS but at most the
    other probe's `rounds` (which --probe-s and --probe-rounds bound)."""
    if commands is None:
        return max(1, min(rounds, math.ceil(LONE_COMMANDS / islands)))
    return max(1, math.ceil(commands / islands))


def layout(hosts: int, most_per_island: int) -> tuple[int, int]:
    """(islands, hosts per island) for `hosts` hosts in islands of at most `most_per_island`."""
    islands = math.ceil(hosts / most_per_island)
    if hosts % islands:
        raise ValueError(f"{hosts} hosts do not split into {islands} equal islands of at most "
                         f"{most_per_island}")
    return islands, hosts // islands


class _Watch:
    """Samples a process's threads and memory while a cluster starts (it may fall over)."""

    def __init__(self, cluster) -> None:
        self.cluster, self.samples = cluster, []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True, name="watch-controller")
        self._thread.start()

    def _loop(self) -> None:
        from benchmarks.scale_measure import process_stats

        while not self._stop.wait(0.5):
            proc = self.cluster.controller_proc
            if proc is not None and proc.poll() is None:
                try:
                    self.samples.append(process_stats(proc.pid))
                except (OSError, ValueError, IndexError):
                    pass

    def stop(self) -> dict[str, float]:
        self._stop.set()
        self._thread.join(2)
        if not self.samples:
            return {}
        return {"last": self.samples[-1],
                "most_threads": max(s.get("threads", 0) for s in self.samples),
                "most_rss_bytes": max(s.get("rss_bytes", 0) for s in self.samples)}


def start_cluster(args, hosts: int, out: pathlib.Path, attempt: int = 1) -> tuple[Any, dict]:
    """A simulated cluster of `hosts` hosts with the controller in its own process, and what its
    start-up cost (or, if it fell over, how far it got)."""
    from benchmarks.scale_measure import process_stats
    from runtime.sim import SimCluster

    islands, per_island = layout(hosts, args.hosts_per_island)
    record: dict[str, Any] = {"hosts": hosts, "attempt": attempt, "islands": islands,
                              "hosts_per_island": per_island,
                              "devices_per_host": args.devices_per_host,
                              "load_average_before": os.getloadavg()}
    cluster = SimCluster(islands, per_island, args.devices_per_host,
                         processes=args.sim_processes or None, flops_per_s=args.flops_per_s,
                         execution_deadline_s=args.execution_deadline,
                         controller_process=True, startup_timeout=args.startup_timeout,
                         log_dir=str(out / "logs" / f"hosts-{hosts}-{attempt}"), start=False)
    watch = _Watch(cluster)
    began = time.monotonic()
    try:
        cluster.start()
        record["registration_s"] = cluster.registration_s
        record["sim_processes"] = len(cluster.procs)
        record["pinned"] = pin_cluster(cluster, getattr(args, "cpus", None))
        pid = cluster.controller_pid
        before = process_stats(pid)
        try:  # an idle cluster: what heartbeats and progress streams cost
            code = cluster.controller_proc.wait(timeout=args.idle_s)
            raise RuntimeError(f"the controller exited with {code} while idle after registration")
        except subprocess.TimeoutExpired:  # still running, as it should
            pass
        after = process_stats(pid)
        record["controller_idle"] = {**after, "cpu_fraction": (after["cpu_s"] - before["cpu_s"])
                                     / args.idle_s}
        record["ping_round"] = ping_round(cluster)
    except Exception as exc:
        code = cluster.controller_proc.poll() if cluster.controller_proc is not None else None
        record.update(error=f"{type(exc).__name__}: {exc}", failed_after_s=time.monotonic() - began,
                      controller_during_startup=watch.stop(), controller_exit_code=code)
        cluster.close()
        return None, record
    record["controller_during_startup"] = watch.stop()
    return cluster, record


def pin_cluster(cluster, cpus: tuple[set[int], set[int]] | None) -> dict | None:
    """With --controller-cpus, the controller process on CPUs of its own and the simulated
    processes and this one on the rest (benchmarks.scale_measure.pin_process), as on a cluster
    where the controller has a machine of its own; what was pinned where."""
    from benchmarks.scale_measure import pin_process

    if cpus is None:
        return None
    controller, rest = cpus
    threads = pin_process(cluster.controller_pid, controller)
    others = sum(pin_process(pid, rest) for pid in [p.pid for p in cluster.procs] + [os.getpid()])
    return {"controller_cpus": sorted(controller), "other_cpus": sorted(rest),
            "controller_threads": threads, "other_threads": others}


def ping_round(cluster) -> dict[str, float]:
    """Pings every host one after another, as the controller's heartbeat does, from this process:
    how long the simulated hosts take to answer (if a round takes seconds here, hosts go silent
    for the controller too, for reasons of their own)."""
    from proto import pathways_pb2 as pb
    from proto import pathways_pb2_grpc as pb_grpc
    from proto import rpc as _rpc

    addresses = [h.address for h in _status_hosts(cluster)]
    channels = [_rpc.open_channel(a, cluster.credentials) for a in addresses]
    try:
        stubs = [pb_grpc.WorkerStub(c) for c in channels]
        for stub in stubs:  # connected first: the round times answers, not connections
            stub.Ping(pb.PingRequest(), timeout=10)
        began, worst = time.monotonic(), 0.0
        for stub in stubs:
            one = time.monotonic()
            stub.Ping(pb.PingRequest(), timeout=10)
            worst = max(worst, time.monotonic() - one)
        return {"hosts": len(stubs), "seconds": time.monotonic() - began, "worst_s": worst}
    finally:
        for channel in channels:
            channel.close()


def _status_hosts(cluster) -> list:
    import runtime

    with runtime.Client(cluster.address, name="bench-scale-status",
                        credentials=cluster.credentials) as client:
        return list(client.status().hosts)


def sim_health(log_dir: pathlib.Path) -> dict[str, float]:
    """What the simulated processes' logs say: re-registrations after a silence from the
    controller, and the longest event-loop stall."""
    registrations = stall = 0.0
    for err in log_dir.glob("sim-*.err"):
        text = err.read_text(errors="replace")
        registrations += text.count("registering again")
        for line in text.splitlines():
            if "event loop stalled for" in line:
                stall = max(stall, float(line.split("stalled for ")[1].split()[0]))
    return {"re_registrations": registrations, "longest_loop_stall_s": stall}


def run_point(args, cluster, chains, shape: str, duration_ms: float) -> dict:
    """One point: prepares the shape's functions, drives every island's chain for --point-s
    seconds and measures (benchmarks.scale_measure)."""
    from benchmarks.scale_measure import point_figures, process_stats, read_timelines
    from benchmarks.scale_workload import (drive, matrix_size, outstanding_units, prepare,
                                           probe_latencies)

    n = matrix_size(duration_ms / 1e3, args.flops_per_s)
    record: dict[str, Any] = {"hosts": cluster.islands * cluster.hosts_per_island,
                              "islands": cluster.islands, "shape": shape,
                              "target_ms": duration_ms, "matrix_n": n,
                              "load_average": os.getloadavg()[0]}
    began = time.monotonic()
    deadline = began + args.point_budget_s
    try:
        per_unit, per_execution = prepare(chains, shape, n)
    except Exception as exc:
        record["error"] = f"preparing: {type(exc).__name__}: {exc}"
        record["fatal"] = True
        record["controller_exit_code"] = cluster.controller_proc.poll()
        return record
    record["prepare_s"] = time.monotonic() - began
    pid = cluster.controller_pid
    controller0 = process_stats(pid)
    sims0 = [process_stats(p.pid)["cpu_s"] for p in cluster.procs]
    client0 = resource.getrusage(resource.RUSAGE_SELF)
    wall0 = time.monotonic()
    outstanding = outstanding_units(duration_ms / 1e3, per_unit)
    unit_s = duration_ms / 1e3 * per_unit
    most = max(2, math.ceil(args.point_s / unit_s))  # long units: about --point-s of work
    try:
        submissions, error = drive(chains, args.point_s, outstanding, deadline, most)
    except Exception as exc:
        record["error"] = f"driving: {type(exc).__name__}: {exc}"
        record["fatal"] = True
        record["controller_exit_code"] = cluster.controller_proc.poll()
        return record
    controller1 = process_stats(pid)
    sims1 = [process_stats(p.pid)["cpu_s"] for p in cluster.procs]
    client1 = resource.getrusage(resource.RUSAGE_SELF)
    wall = time.monotonic() - wall0
    if error is not None:
        record["error"] = f"incomplete within the point's budget: {error}"
        record["fatal"] = True  # its backlog would spill into the next point
        record["controller_exit_code"] = cluster.controller_proc.poll()
    record["submitted_units"] = len(submissions)
    addresses = {c.island: c.addresses for c in chains}
    if submissions:
        since = min(s.submitted for s in submissions)
        timelines = read_timelines(addresses, cluster.credentials, since)
        record.update(point_figures(submissions, timelines, per_execution))
    if error is None:  # dispatch latency without the load: one unit per island at a time
        rounds = max(1, min(args.probe_rounds, math.floor(args.probe_s / unit_s)))
        probed, error = probe_latencies(chains, rounds, deadline, cluster.credentials,
                                        unit_s=unit_s)
        if probed is not None:
            record["latency_ms"] = probed
            record["probe_rounds"] = rounds
        if error is None and len(chains) > 1:  # and with one unit in the whole cluster at a time
            lone_rounds = lone_probe_rounds(args.lone_commands, len(chains), rounds)
            alone, error = probe_latencies(chains, lone_rounds, deadline, cluster.credentials,
                                           alone=True, unit_s=unit_s)
            if alone is not None:
                record["lone_latency_ms"] = alone
                record["lone_probe_rounds"] = lone_rounds
        if error is not None:
            record["error"] = f"probe incomplete within the point's budget: {error}"
            record["fatal"] = True
    computations = record.get("computations") or 0
    cpu = controller1["cpu_s"] - controller0["cpu_s"]
    record["controller"] = {
        "cpu_s": cpu, "cpu_s_per_computation": cpu / computations if computations else None,
        "rss_bytes": controller1.get("rss_bytes"), "peak_rss_bytes": controller1.get(
            "peak_rss_bytes"), "threads": controller1.get("threads")}
    record["client_cpu_s"] = (client1.ru_utime + client1.ru_stime
                              - client0.ru_utime - client0.ru_stime)
    # The simulated hosts' own bookkeeping (messages, timers) takes CPU too: a process near a
    # whole core (1.0) limits the point, not the controller.
    record["sim_cpu_fraction"] = [(b - a) / wall for a, b in zip(sims0, sims1)]
    record["controller"]["cpu_fraction"] = cpu / wall
    record["elapsed_s"] = time.monotonic() - began
    return record


def break_evens(points: list[dict]) -> list[dict]:
    """Per host count and shape: where device busy first reaches BREAK_EVEN_BUSY, over the
    point's whole window and in the steady state (benchmarks.scale_measure)."""
    from benchmarks.scale_measure import crossing

    out = []
    for hosts in sorted({p["hosts"] for p in points}):
        for shape in SHAPES:
            curve = [p for p in points if p["hosts"] == hosts and p["shape"] == shape
                     and p.get("busy") is not None]
            if curve:
                durations = [p.get("computation_ms") or p["target_ms"] for p in curve]
                steady = [p.get("busy_steady") for p in curve]
                out.append({"hosts": hosts, "shape": shape,
                            **crossing(durations, [p["busy"] for p in curve], BREAK_EVEN_BUSY),
                            "steady": crossing(durations, steady, BREAK_EVEN_BUSY)})
    return out


def run(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from benchmarks.scale_plot import format_table, plot_scale
    from runtime.sim import raise_file_limit

    out = pathlib.Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    raise_file_limit()  # the controller holds two connections per host; children inherit this
    # A child that crashes (a controller with too many threads, say) leaves its Python stacks in
    # its log.
    os.environ.setdefault("PYTHONFAULTHANDLER", "1")
    hosts_list = [int(h) for h in args.hosts.split(",")]
    durations = [float(d) for d in args.durations.split(",")]
    shapes = [s.strip() for s in args.shapes.split(",")]
    for shape in shapes:
        if shape not in SHAPES:
            print(f"error: unknown shape {shape!r} (choose from {', '.join(SHAPES)})",
                  file=sys.stderr)
            return 2
    from benchmarks.scale_measure import parse_cpus, split_cpus
    try:
        args.cpus = (split_cpus(parse_cpus(args.controller_cpus)) if args.controller_cpus
                     else None)
    except ValueError as exc:
        print(f"error: --controller-cpus {args.controller_cpus}: {exc}", file=sys.stderr)
        return 2
    report: dict[str, Any] = {
        "command": " ".join(["pathways", "bench", "scale", *sys.argv[3:]]) if sys.argv[1:3] == [
            "bench", "scale"] else " ".join(sys.argv),
        "config": {k: v for k, v in vars(args).items() if k not in ("func", "cpus")},
        "machine": {"cpus": os.cpu_count(), "load_average_start": os.getloadavg()},
        "clusters": [], "points": [], "break_even": []}

    def save() -> None:
        report["break_even"] = break_evens(report["points"])
        report["machine"]["load_average_now"] = os.getloadavg()
        with open(out / "scale.json.tmp", "w") as f:
            json.dump(report, f, indent=1)
        os.replace(out / "scale.json.tmp", out / "scale.json")

    bar = tqdm(total=len(hosts_list) * len(shapes) * len(durations), unit="point",
               dynamic_ncols=True)
    try:
        for hosts in hosts_list:
            _sweep(args, hosts, [(shape, duration) for shape in shapes for duration in durations],
                   out, report, save, bar)
    finally:
        bar.close()
        save()
    plot_scale(report, out)
    print(format_table(report))
    print(f"wrote {out / 'scale.json'}, {out / 'scale_busy.png'} and "
          f"{out / 'scale_throughput.png'}")
    return 0


def _sweep(args, hosts: int, todo: list[tuple[str, float]], out: pathlib.Path, report: dict,
           save: Callable[[], None], bar) -> None:
    """The points `todo` (shape, duration in ms) on clusters of `hosts` hosts, into `report`
    (saved after each): a point that leaves its cluster unusable gets the rest a fresh one,
    until --give-up-after such points in a row."""
    import runtime
    from benchmarks.scale_workload import initial_chains

    attempt = failures = 0
    while todo:
        attempt += 1
        bar.set_description(f"{hosts} hosts: starting")
        cluster, record = start_cluster(args, hosts, out, attempt)
        report["clusters"].append(record)
        save()
        if cluster is None:
            record["sim_health"] = sim_health(out / "logs" / f"hosts-{hosts}-{attempt}")
            bar.write(f"{hosts} hosts: the cluster did not come up: {record['error']}")
            bar.update(len(todo))
            return
        bar.write(f"{hosts} hosts: {record['islands']} islands registered in "
                  f"{record['registration_s']:.1f} s; idle controller "
                  f"{record['controller_idle']['threads']} threads, "
                  f"{record['controller_idle']['rss_bytes'] / 2**20:.0f} MiB, "
                  f"{record['controller_idle']['cpu_fraction']:.0%} of a core")
        clients = []
        try:
            # A client (session) per island, as independent jobs would be: one client's Execute
            # is answered once every island has ordered its commands, which would tie the
            # islands' pace together (benchmarks.scale_workload).
            for island in range(cluster.islands):
                clients.append(runtime.Client(cluster.address, name=f"bench-scale-{island}",
                                              credentials=cluster.credentials))
            chains = initial_chains(clients, cluster.hosts_per_island * cluster.devices_per_host)
            while todo:
                shape, duration = todo.pop(0)
                bar.set_description(f"{hosts} hosts {shape} {duration:g} ms")
                point = run_point(args, cluster, chains, shape, duration)
                report["points"].append(point)
                save()
                bar.update(1)
                bar.write(_one_line(point))
                if not point.get("fatal"):
                    failures = 0
                    continue
                record["ended_by"] = f"{shape} {duration:g} ms: {point['error'][:200]}"
                failures += 1
                if failures >= args.give_up_after:
                    record["gave_up"] = (f"{failures} points in a row left the cluster "
                                         f"unusable; skipped the rest")
                    bar.write(f"{hosts} hosts: {record['gave_up']}")
                    bar.update(len(todo))
                    todo = []
                break
        except Exception as exc:  # the cluster is unusable: the rest of its points too
            record["error"] = f"{type(exc).__name__}: {exc}"
            bar.write(f"{hosts} hosts: {record['error']}")
            bar.update(len(todo))
            todo = []
        finally:
            for client in clients:
                client.close()
            cluster.close()
            record["sim_health"] = sim_health(out / "logs" / f"hosts-{hosts}-{attempt}")
            save()


def _one_line(point: dict) -> str:
    if point.get("busy") is None:
        return f"  {point['hosts']} hosts {point['shape']} {point['target_ms']:g} ms: " \
               f"{point.get('error', 'no computations')}"
    cpu = point["controller"]["cpu_s_per_computation"]
    return (f"  {point['hosts']} hosts {point['shape']} {point['target_ms']:g} ms: busy "
            f"{point['busy']:.3f} (steady {point.get('busy_steady') or float('nan'):.3f}, "
            f"start-up {point.get('startup_ms') or float('nan'):.0f} ms), "
            f"{point['computations_per_s']:.0f} computations/s, controller "
            f"{cpu * 1e3 if cpu else float('nan'):.3f} ms CPU per computation"
            + (f" ({point['error']})" if point.get("error") else ""))


def add_parser(bench: argparse._SubParsersAction) -> None:
    from runtime.cli.common import positive_int

    p = bench.add_parser("scale", help="dispatch on 4 to 1,024 simulated hosts (runtime.sim)",
                         description=__doc__)
    p.add_argument("--out", required=True, help="directory for scale.json, the plots and logs")
    p.add_argument("--hosts", default=",".join(map(str, HOSTS)),
                   help="host counts to sweep, comma-separated")
    p.add_argument("--durations", default=",".join(f"{d:g}" for d in DURATIONS_MS),
                   help="computation durations to sweep, in ms, comma-separated")
    p.add_argument("--shapes", default=",".join(SHAPES),
                   help=f"program shapes, comma-separated ({', '.join(SHAPES)})")
    p.add_argument("--hosts-per-island", type=int, default=64,
                   help="most hosts per island (more hosts: more islands, one chain each)")
    p.add_argument("--devices-per-host", type=int, default=4, help="simulated devices per host")
    p.add_argument("--flops-per-s", type=float, default=1e12,
                   help="speed of a simulated device (sets the matrix size of each duration)")
    p.add_argument("--point-s", type=float, default=3.0,
                   help="seconds of submission per point (then the backlog drains)")
    p.add_argument("--point-budget-s", type=float, default=180.0,
                   help="most seconds a point may take, drain included; past it the point is "
                        "recorded as incomplete and the cluster restarted")
    p.add_argument("--probe-s", type=float, default=2.0,
                   help="seconds of device work per point for the latency probe (one unit per "
                        "island at a time)")
    p.add_argument("--probe-rounds", type=int, default=20, help="most rounds of the probe")
    p.add_argument("--lone-commands", type=positive_int, default=None,
                   help=f"commands of the probe that sends one command in the whole cluster "
                        f"at a time, per point (default: about {LONE_COMMANDS}, at most "
                        f"--probe-rounds per island); its p99 is the largest 1%%: 1000 makes "
                        f"that ten commands, not two")
    p.add_argument("--execution-deadline", type=float, default=10.0,
                   help="seconds a computation waits for its slice's other hosts before the "
                        "simulated hosts report it hung")
    p.add_argument("--give-up-after", type=int, default=2,
                   help="skip the rest of a host count after this many failed points in a row "
                        "(each failure restarts its cluster)")
    p.add_argument("--startup-timeout", type=float, default=600.0,
                   help="most seconds for a cluster's hosts to register")
    p.add_argument("--idle-s", type=float, default=3.0,
                   help="seconds an idle cluster is watched after start-up")
    p.add_argument("--sim-processes", type=int, default=0,
                   help="simulated processes per cluster (0: about 256 hosts each)")
    p.add_argument("--controller-cpus", default="",
                   help="CPUs for the controller process alone, e.g. 0 or 0-1 (Linux): the "
                        "simulated hosts and the benchmark get the others, as on a cluster where "
                        "the controller has a machine of its own (default: every process shares "
                        "every CPU)")
    p.set_defaults(func=run)


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    add_parser(parser.add_subparsers(required=True))
    sys.exit(run(parser.parse_args(["scale"] + sys.argv[1:])))
