"""Prometheus metrics, assembled in the master from the snapshots workers send each second.

Series carry a stable `worker` label: the slot index, not the pid. A worker's counters are cumulative for its own
process; when it exits, its last snapshot is folded into its slot's base, so a slot's counters never go backwards
across crashes and reloads (a worker killed outright loses at most its last second of counts, as prometheus_client's
multiprocess mode keeps the files of dead processes for the same reason). Gauges of a dead worker disappear with it.
This module owns the numbers' exposition; it never runs on a worker's request path, and starts no thread.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric

COUNTERS = {  # snapshot name -> (metric name without _total, help)
    "requests": ("fastcount_http_requests", "HTTP requests completed"),
    "connections_opened": ("fastcount_http_connections_opened", "client connections accepted"),
    "connections_closed": ("fastcount_http_connections_closed", "client connections closed"),
    "bytes_received": ("fastcount_http_received_bytes", "bytes read from clients"),
    "bytes_sent": ("fastcount_http_sent_bytes", "bytes written to clients"),
    "flushes": ("fastcount_flushes", "batches committed to PostgreSQL"),
    "flush_errors": ("fastcount_flush_errors", "flush attempts that failed (the batch is retried)"),
    "flush_retries": ("fastcount_flush_retries", "retries scheduled after a failed flush"),
    "flushed_rows": ("fastcount_flush_rows", "rows written by flushes"),
    "background_job_failures": (
        "fastcount_background_job_failures",
        "failures of features' background jobs and of their steps that raised (window reports, callbacks, the Kafka"
        " outbox's database work, retention), each retried",
    ),
    "dead_letters": (
        "fastcount_dead_letters",
        "units (counts, ids, events) PostgreSQL refused for good, parked in fastcount_dead_letters",
    ),
    "cpu_seconds": ("fastcount_worker_cpu_seconds", "CPU time of the worker process"),
    "accept_pauses": (
        "fastcount_http_accept_pauses",
        "times the worker reached --max-connections and stopped accepting (new connections wait in the backlog)",
    ),
}
# The core's labelled series travel like the features' ones (name{label="value"}); their help texts live here.
LABELLED_HELP = {
    "http_accept_errors": "accept() calls that failed, by errno (EMFILE: raise LimitNOFILE; ENFILE: fs.file-max)",
}
GAUGES = {
    "connections_open": ("fastcount_http_connections_open", "client connections open now"),
    "resident_memory_bytes": ("fastcount_worker_resident_memory_bytes", "resident memory of the worker process"),
    "fd_limit": ("fastcount_worker_fd_limit", "the worker's descriptor limit (soft RLIMIT_NOFILE)"),
    "max_connections": ("fastcount_http_max_connections", "client connections at which the worker stops accepting"),
    "accept_paused": ("fastcount_http_accept_paused", "1 while the worker is not accepting (at the cap, after errors)"),
    "open_fds": (
        "fastcount_worker_open_fds",
        "open file descriptors of the worker process (client connections now, plus the others as last listed)",
    ),
    "loop_lag_max_seconds": (
        "fastcount_event_loop_lag_max_seconds",
        "longest event-loop lag in the worker's last second (how long its loop was held by one piece of work)",
    ),
    "loop_lag_own_max_seconds": (
        "fastcount_event_loop_lag_own_max_seconds",
        "of the longest lag in the last second, the part the worker spent on the CPU (its own work, not preemption)",
    ),
}
HISTOGRAMS = {
    "request_seconds": (
        "fastcount_http_request_duration_seconds",
        "time to parse, route and answer a read of requests (sampled: about one read in 16)",
    ),
    "flush_seconds": (
        "fastcount_flush_duration_seconds",
        "time to commit one batch, retries excluded, by buffer (increment, events, verve)",
    ),
    "flush_keys": ("fastcount_flush_keys", "distinct keys per committed batch"),
    "loop_lag_seconds": (
        "fastcount_event_loop_lag_seconds",
        "how late the worker's 1 ms probe timer ran: the event loop was busy with other work for that long",
    ),
}


def split_key(key: str) -> tuple[str, list[str], list[str]]:
    """'name{a="x",b="y"}' -> ('name', ['a', 'b'], ['x', 'y']): how workers send the features' labelled series."""
    name, brace, rest = key.partition("{")
    if not brace:
        return name, [], []
    pairs = [pair.split("=", 1) for pair in rest.rstrip("}").split(",") if "=" in pair]
    return name, [label for label, _ in pairs], [value.strip('"') for _, value in pairs]


def _feature_families(
    kind: str, values: dict[int, dict[str, float]], known: dict[str, tuple[str, str]], help_texts: dict[str, str]
) -> Iterator[Metric]:
    """The series named by features (not in the core tables), grouped into families by name."""
    families: dict[str, CounterMetricFamily | GaugeMetricFamily] = {}
    for slot in sorted(values):
        for key, value in sorted(values[slot].items()):
            if key in known:
                continue
            name, labels, label_values = split_key(key)
            family = families.get(name)
            if family is None:
                make = CounterMetricFamily if kind == "counter" else GaugeMetricFamily
                family = families[name] = make(
                    f"fastcount_{name}", help_texts.get(name, name.replace("_", " ")), labels=["worker", *labels]
                )
            family.add_metric([str(slot), *label_values], value)
    yield from families.values()


def _empty() -> dict[str, Any]:
    return {"counters": {}, "answers": {}, "histograms": {}}


def _add_into(total: dict[str, Any], snapshot: dict[str, Any]) -> None:
    for name, value in snapshot.get("counters", {}).items():
        total["counters"][name] = total["counters"].get(name, 0) + value
    for route, by_status in snapshot.get("answers", {}).items():
        into = total["answers"].setdefault(route, {})
        for status, count in by_status.items():
            into[status] = into.get(status, 0) + count
    for name, histogram in snapshot.get("histograms", {}).items():
        into = total["histograms"].get(name)
        if into is None:
            total["histograms"][name] = {
                "bounds": list(histogram["bounds"]),
                "counts": list(histogram["counts"]),
                "sum": histogram["sum"],
            }
        else:
            into["counts"] = [a + b for a, b in zip(into["counts"], histogram["counts"], strict=True)]
            into["sum"] += histogram["sum"]


class MetricsBook:
    """The master's view: the latest snapshot of each live worker, plus what dead workers left to their slot."""

    def __init__(self, slots: int) -> None:
        self.slots = slots
        self.live: dict[int, tuple[int, dict[str, Any]]] = {}  # pid -> (slot, latest snapshot)
        self.retired: dict[int, dict[str, Any]] = {slot: _empty() for slot in range(slots)}
        self.worker_restarts = 0
        self.worker_boot_failures = 0
        self.reloads = 0
        self.reloads_aborted = 0
        self.ready_workers = 0
        self.help_texts: dict[str, str] = dict(LABELLED_HELP)
        self.journals_pending = 0  # dead workers' journals the master holds until a recovery process commits them
        self.journal_recovery_failures = 0

    def record(self, pid: int, slot: int, snapshot: dict[str, Any]) -> None:
        self.live[pid] = (slot, snapshot)
        self.help_texts.update(snapshot.get("help", {}))

    def retire(self, pid: int) -> None:
        entry = self.live.pop(pid, None)
        if entry is not None:
            slot, snapshot = entry
            _add_into(self.retired[slot], snapshot)

    def exposition(self) -> bytes:
        registry = CollectorRegistry(auto_describe=False)
        registry.register(self)
        return generate_latest(registry)

    # prometheus_client's collector interface
    def collect(self) -> Iterator[Metric]:
        per_slot: dict[int, dict[str, Any]] = {}
        gauges: dict[int, dict[str, float]] = {}
        for slot in range(self.slots):
            total = _empty()
            _add_into(total, self.retired[slot])
            per_slot[slot] = total
        for slot, snapshot in self.live.values():
            _add_into(per_slot[slot], snapshot)
            into = gauges.setdefault(slot, {})
            for name, value in snapshot.get("gauges", {}).items():
                into[name] = into.get(name, 0) + value

        for key, (name, help_text) in COUNTERS.items():
            family = CounterMetricFamily(name, help_text, labels=["worker"])
            for slot, total in per_slot.items():
                family.add_metric([str(slot)], total["counters"].get(key, 0))
            yield family
        yield from _feature_families(
            "counter", {slot: total["counters"] for slot, total in per_slot.items()}, COUNTERS, self.help_texts
        )
        answers = CounterMetricFamily(
            "fastcount_http_responses", "HTTP responses by route and status code", labels=["worker", "route", "code"]
        )
        for slot, total in per_slot.items():
            for route, by_status in sorted(total["answers"].items()):
                for status, count in sorted(by_status.items()):
                    answers.add_metric([str(slot), route, str(status)], count)
        yield answers
        for key, (name, help_text) in GAUGES.items():
            gauge = GaugeMetricFamily(name, help_text, labels=["worker"])
            for slot in sorted(gauges):
                if key in gauges[slot]:
                    gauge.add_metric([str(slot)], gauges[slot][key])
            yield gauge
        yield from _feature_families("gauge", gauges, GAUGES, self.help_texts)
        for key, (name, help_text) in HISTOGRAMS.items():
            series = [  # (slot, label names, label values, data): "name" or 'name{label="value"}' in the snapshot
                (slot, *split_key(sent)[1:], data)
                for slot, total in per_slot.items()
                for sent, data in sorted(total["histograms"].items())
                if split_key(sent)[0] == key
            ]
            labels = series[0][1] if series else []
            histogram = HistogramMetricFamily(name, help_text, labels=["worker", *labels])
            for slot, _, label_values, data in series:
                cumulative, buckets = 0, []
                for bound, count in zip([*data["bounds"], float("inf")], data["counts"], strict=True):
                    cumulative += count
                    buckets.append(("+Inf" if bound == float("inf") else repr(float(bound)), cumulative))
                histogram.add_metric([str(slot), *label_values], buckets, data["sum"])
            yield histogram
        yield CounterMetricFamily(
            "fastcount_worker_restarts", "workers that died and were replaced", self.worker_restarts
        )
        yield CounterMetricFamily(
            "fastcount_worker_boot_failures",
            "workers that exited before they served (the slot is retried with back-off)",
            self.worker_boot_failures,
        )
        yield CounterMetricFamily("fastcount_reloads", "SIGHUP reloads started", self.reloads)
        yield CounterMetricFamily(
            "fastcount_reloads_aborted", "reloads abandoned because a new worker did not boot", self.reloads_aborted
        )
        yield GaugeMetricFamily(
            "fastcount_journals_pending",
            "crash journals of dead workers not yet committed by a recovery process",
            self.journals_pending,
        )
        yield CounterMetricFamily(
            "fastcount_journal_recovery_failures",
            "recovery processes that exited before committing their journal (retried with back-off)",
            self.journal_recovery_failures,
        )
        yield GaugeMetricFamily("fastcount_workers_ready", "workers serving now", self.ready_workers)
