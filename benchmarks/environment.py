"""What every benchmark records besides its figures, so a result can be read on a busy machine:
the software and machine it ran on, how loaded that machine was (load average, CPU steal), logs
kept out of the terminal, results written as each phase ends, and ratios summarised over rounds.
"""

from __future__ import annotations

import contextlib
import datetime
import json
import logging
import os
import pathlib
import platform
import statistics
import subprocess
import sys
from collections.abc import Iterator, Sequence
from importlib import metadata
from typing import Any


def _version(package: str) -> str | None:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return None


def _commit() -> str | None:
    """The checkout's commit ("+dirty" with uncommitted changes), or None outside a checkout."""
    root = pathlib.Path(__file__).resolve().parent.parent
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True,
                                text=True, timeout=10, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"],
                               cwd=root, capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return commit + ("+dirty" if dirty else "")


def cpu_model() -> str:
    """The CPU's model name (/proc/cpuinfo), else what Python knows."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def cpu_times() -> tuple[int, int] | None:
    """(steal, total) jiffies of all CPUs since boot (/proc/stat), or None where unavailable."""
    try:
        with open("/proc/stat", encoding="utf-8") as f:
            fields = [int(v) for v in f.readline().split()[1:]]
    except (OSError, ValueError):
        return None
    # user nice system idle iowait irq softirq steal [guest guest_nice: already in user, nice]
    return (fields[7] if len(fields) > 7 else 0), sum(fields[:8])


def steal_between(start: tuple[int, int] | None, end: tuple[int, int] | None) -> float | None:
    """Fraction of CPU time the hypervisor gave other guests between two `cpu_times()`."""
    if start is None or end is None or end[1] <= start[1]:
        return None
    return (end[0] - start[0]) / (end[1] - start[1])


def machine_load(since: tuple[int, int] | None = None) -> dict[str, Any]:
    """The 1/5/15-minute load averages now, and the CPU steal since `since` (a `cpu_times()`)."""
    load = os.getloadavg() if hasattr(os, "getloadavg") else (None, None, None)
    return {"load_average": list(load), "cpu_steal": steal_between(since, cpu_times())}


class Environment:
    """The run's software and machine, taken at the start; `finish()` adds the end's load."""

    def __init__(self) -> None:
        self._start_times = cpu_times()
        cores = os.cpu_count()
        self.record: dict[str, Any] = {
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "python": sys.version.split()[0],
            "jax": _version("jax"), "jaxlib": _version("jaxlib"),
            "pathways_runtime": _version("pathways-runtime"), "commit": _commit(),
            "platform": platform.platform(), "cpu_model": cpu_model(), "cpu_cores": cores,
            "cpu_cores_usable": (len(os.sched_getaffinity(0))
                                 if hasattr(os, "sched_getaffinity") else cores),
            "load_average_at_start": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
        }

    @property
    def hardware(self) -> str:
        """E.g. "Intel(R) Xeon(R) ..., 2 cores" (for titles)."""
        return f"{self.record['cpu_model']}, {self.record['cpu_cores_usable']} cores"

    def finish(self) -> dict[str, Any]:
        """The record, with the load average at the end and the CPU steal over the run."""
        load = machine_load(self._start_times)
        self.record["load_average_at_end"] = load["load_average"]
        self.record["cpu_steal"] = load["cpu_steal"]
        return self.record


def write_json(path: pathlib.Path, report: dict[str, Any]) -> None:
    """Writes `report` to `path` whole or not at all (a reader never sees half a file)."""
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(report, f, indent=1)
    os.replace(tmp, path)


@contextlib.contextmanager
def recording(report: dict[str, Any], path: pathlib.Path, env: Environment) -> Iterator[None]:
    """Around a benchmark's run: however it ends, the report is written to `path` with the
    environment's end (load, CPU steal); a failure marks it `"phase": "failed"` with its error."""
    try:
        yield
    except BaseException as exc:
        report["phase"], report["error"] = "failed", f"{type(exc).__name__}: {exc}"
        raise
    finally:
        report["environment"] = env.finish()
        write_json(path, report)


def spread(values: Sequence[float | None]) -> dict[str, Any]:
    """{"median", "min", "max", "values"} of the figures of the rounds (None where missing)."""
    present = [v for v in values if v is not None]
    if not present:
        return {"median": None, "min": None, "max": None, "values": list(values)}
    return {"median": statistics.median(present), "min": min(present), "max": max(present),
            "values": list(values)}


@contextlib.contextmanager
def logs_to(path: pathlib.Path) -> Iterator[None]:
    """Sends this process's log records of INFO and above to `path` while the block runs; the
    terminal keeps only warnings and errors (the benchmark's own progress is printed)."""
    root = logging.getLogger()
    handler = logging.FileHandler(path, encoding="utf-8")
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    quieted = [h for h in root.handlers if h.level == logging.NOTSET]
    for h in quieted:
        h.setLevel(logging.WARNING)
    old_level = root.level
    root.setLevel(logging.INFO)
    root.addHandler(handler)
    try:
        yield
    finally:
        root.removeHandler(handler)
        handler.close()
        root.setLevel(old_level)
        for h in quieted:
            h.setLevel(logging.NOTSET)
