"""Metrics of the runtime's state, read when Prometheus scrapes (the event metrics are in
runtime.metrics).

Controllers and workers register themselves here while they run (`track`, `untrack`); one
collector in prometheus_client's default registry reads every live one at each scrape, through
their public views (`Controller.status(ping_hosts=False)`, `Worker.info()`, the array store's
totals), and adds up what several of them report under the same labels (tests run several
clusters in one process).
"""

from __future__ import annotations

import collections
import threading
import weakref
from typing import Any

from prometheus_client import REGISTRY
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

_tracked: weakref.WeakKeyDictionary[Any, str] = weakref.WeakKeyDictionary()
_lock = threading.Lock()

#: name -> (kind, help, label names)
_FAMILIES: dict[str, tuple[str, str, tuple[str, ...]]] = {
    "pathways_sessions": ("gauge", "Open client sessions.", ()),
    "pathways_arrays": ("gauge", "Live logical arrays.", ()),
    "pathways_slices": ("gauge", "Live virtual slices.", ()),
    "pathways_session_lease_seconds": ("gauge", "How long a silent client keeps its session "
                                                "(0: forever).", ()),
    "pathways_sessions_expired": ("counter", "Sessions ended because their lease ran out.", ()),
    "pathways_hosts": ("gauge", "Registered hosts by state (alive, lost, leaving).", ("state",)),
    "pathways_instructions_ordered": (
        "counter", "Instructions given a place in an island's order (the count starts again when "
                   "the island restarts).", ("island",)),
    "pathways_queue_depth": (
        "gauge", "Instructions waiting, by stage: clients (in the client queues at the "
                 "controller, not yet ordered), undelivered (ordered, not yet sent to the host), "
                 "host (received by the host, not yet executed).", ("island", "host", "stage")),
    "pathways_dispatch_window_seconds": (
        "gauge", "Estimated device seconds ordered but not yet executed by every host.",
        ("island",)),
    "pathways_client_device_seconds": (
        "counter", "Device seconds of each client session's executions on an island, as its "
                   "hosts measured them.", ("island", "session", "client")),
    "pathways_devices": ("gauge", "Devices a host owns.", ("island", "host")),
    "pathways_device_memory_used_bytes": ("gauge", "Bytes of the arrays a host holds on its "
                                                   "devices.", ("island", "host")),
    "pathways_device_memory_capacity_bytes": ("gauge", "Memory of a host's devices together.",
                                              ("island", "host")),
    "pathways_stored_arrays": ("gauge", "Arrays (and pending outputs) a host holds.",
                               ("island", "host")),
    "pathways_device_busy_ratio": (
        "gauge", "Fraction of the last 10 s a host's devices spent computing (executions count "
                 "once they end).", ("island", "host")),
}


def track(component: Any, kind: str) -> None:
    """Reports a component at every scrape until `untrack` (or until it is gone). `kind` says
    what it is, "controller" or "worker" (this module imports neither, see docs/architecture.md),
    and so which of its figures are read."""
    if kind not in _READERS:
        raise ValueError(f"unknown component kind {kind!r}; expected one of {sorted(_READERS)}")
    _install()
    with _lock:
        _tracked[component] = kind


def untrack(component: Any) -> None:
    with _lock:
        _tracked.pop(component, None)


class _StateCollector:
    """Reads the tracked controllers and workers at each scrape."""

    def describe(self) -> list:
        return []  # names vary with what is tracked; nothing to check at registration

    def collect(self):
        values: dict[str, dict[tuple[str, ...], float]] = collections.defaultdict(
            lambda: collections.defaultdict(float))
        with _lock:
            components = list(_tracked.items())
        for component, kind in components:
            _READERS[kind](component, values)
        for name, (kind, help_text, labels) in _FAMILIES.items():
            family_type = CounterMetricFamily if kind == "counter" else GaugeMetricFamily
            family = family_type(name, help_text, labels=labels)
            samples = values.get(name, {})
            if not labels and not samples:
                continue  # an unlabelled value nobody here reports
            for label_values, value in sorted(samples.items()):
                family.add_metric(list(label_values), value)
            yield family


def _controller_values(controller, values) -> None:
    status = controller.status_report.status(ping_hosts=False)
    values["pathways_sessions"][()] += status.sessions
    values["pathways_arrays"][()] += status.arrays
    values["pathways_slices"][()] += len(status.slices)
    values["pathways_session_lease_seconds"][()] = status.session_lease_s
    values["pathways_sessions_expired"][()] += status.sessions_expired
    for host in status.hosts:
        values["pathways_hosts"][(host.state,)] += 1
        values["pathways_queue_depth"][(str(host.island), str(host.host), "undelivered")] += (
            host.undelivered)
    for island in status.islands:
        name = str(island.island)
        values["pathways_instructions_ordered"][(name,)] += island.sequence
        values["pathways_dispatch_window_seconds"][(name,)] += island.outstanding_s
        values["pathways_queue_depth"][(name, "", "clients")] += sum(
            t.queued for t in island.tenants)
        for tenant in island.tenants:
            values["pathways_client_device_seconds"][
                (name, str(tenant.session_id), tenant.client_name)] += tenant.device_seconds


def _worker_values(worker, values) -> None:
    info = worker.info()
    key = (str(info.island), str(info.host))
    stored, nbytes = worker.store.stats()
    values["pathways_devices"][key] += info.num_devices
    values["pathways_device_memory_used_bytes"][key] += nbytes
    values["pathways_device_memory_capacity_bytes"][key] += (info.device_memory_bytes
                                                             * info.num_devices)
    values["pathways_stored_arrays"][key] += stored
    values["pathways_queue_depth"][(*key, "host")] += info.queue_depth
    values["pathways_device_busy_ratio"][key] = worker.metrics.busy_ratio()


_READERS = {"controller": _controller_values, "worker": _worker_values}
_installed = False


def _install() -> None:
    global _installed
    with _lock:
        if not _installed:
            REGISTRY.register(_StateCollector())
            _installed = True
