"""Prometheus metrics of one service process (prometheus-client).

Each app gets its own CollectorRegistry, so tests can build many apps. Gauges
that mirror the reaper and writer are read when ``/metrics`` is scraped.

With ``PROMETHEUS_MULTIPROC_DIR`` set (``stock serve --workers N`` sets it for
its workers) prometheus-client keeps every value in a file of that directory
and a scrape of any worker adds up all of them; each gauge says how (its
``multiprocess_mode``), and ``stock_worker_up`` has one series per live worker.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any, Literal

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.multiprocess import MultiProcessCollector

MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"
Mode = Literal[
    "all", "liveall", "min", "livemin", "max", "livemax", "sum", "livesum", "mostrecent",
    "livemostrecent",
]  # fmt: skip
LATENCY_BUCKETS = (0.0005, 0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)


# The series, as data: attribute -> (name, help, label names).
COUNTERS: dict[str, tuple[str, str, tuple[str, ...]]] = {
    "requests": (
        "stock_http_requests", "HTTP requests by route and outcome", ("route", "method", "status")
    ),
    "outcomes": (
        "stock_order_outcomes",
        "Order operations by operation and outcome (ok, replay, or the error code)",
        ("op", "outcome"),
    ),
    "redis_errors": ("stock_redis_errors", "Redis calls that failed", ()),
    "soldout_fast": (
        "stock_soldout_fast_answers",
        "Reserves and deducts answered sold-out from memory (STOCK_SOLDOUT_CACHE_MS)",
        (),
    ),
    "pg_errors": ("stock_postgres_errors", "PostgreSQL calls that failed", ()),
    "loop_errors": (
        "stock_loop_errors",
        "Failed passes of a background loop (it backs off and goes on)",
        ("loop",),
    ),
    "loop_restarts": (
        "stock_loop_restarts", "Background loops that ended and were started again", ("loop",)
    ),
    "quarantined": (
        "stock_writer_quarantined",
        "Events the writer could not apply, set aside in the event_quarantine table",
        (),
    ),
}  # fmt: skip

# attribute -> (name, help, multiprocess mode: how a scrape adds up the workers)
GAUGES: dict[str, tuple[str, str, Mode]] = {
    "oversell": (
        "stock_oversell_skus",
        "SKUs seen with a negative counter in any answer; must stay 0",
        "sum",
    ),
    "expiry_lag": (
        "stock_expiry_lag_seconds", "Age of the oldest due, unexpired reservation", "livemax"
    ),
    "expired": ("stock_reaper_expired", "Reservations this process's reaper expired", "livesum"),
    "reaper_batch": (
        "stock_reaper_last_batch", "Lines expired by the reaper's last pass", "livesum"
    ),
    "flush_lag": (
        "stock_writer_flush_lag_seconds", "Age of the oldest event not yet in PostgreSQL", "livemax"
    ),
    "writer_batch": ("stock_writer_last_batch", "Events in the writer's last batch", "livesum"),
    "writer_events": (
        "stock_writer_events", "Events this process's writer applied", "livesum"
    ),
    "writer_buckets": (
        "stock_writer_buckets_held",
        "Buckets this process's writer holds (its advisory "
        "locks); all writers together should hold stock_buckets",
        "livesum",
    ),
    "buckets": (
        "stock_buckets", "STOCK_BUCKETS, exported by processes that run a writer", "livemax"
    ),
    "reconcile_drifting": (
        "stock_reconcile_drifting_skus", "SKUs the last `stock reconcile` found drifting", "livemax"
    ),
    "reconcile_at": (
        "stock_reconcile_last_run_timestamp_seconds",
        "When the last `stock reconcile` ran",
        "livemax",
    ),
    "worker_up": (
        "stock_worker_up", "1 per live service process (a pid label per worker)", "liveall"
    ),
}  # fmt: skip


class Metrics:
    """The series of ``COUNTERS`` and ``GAUGES`` (each an attribute), the request
    latency histogram, and the scrape hooks."""

    requests: Counter
    outcomes: Counter
    redis_errors: Counter
    soldout_fast: Counter
    pg_errors: Counter
    loop_errors: Counter
    loop_restarts: Counter
    quarantined: Counter
    oversell: Gauge
    expiry_lag: Gauge
    expired: Gauge
    reaper_batch: Gauge
    flush_lag: Gauge
    writer_batch: Gauge
    writer_events: Gauge
    writer_buckets: Gauge
    buckets: Gauge
    reconcile_drifting: Gauge
    reconcile_at: Gauge
    worker_up: Gauge

    def __init__(self) -> None:
        self.registry = r = CollectorRegistry()
        for attr, (name, doc, labels) in COUNTERS.items():
            setattr(self, attr, Counter(name, doc, labels, registry=r))
        for attr, (name, doc, mode) in GAUGES.items():
            setattr(self, attr, Gauge(name, doc, multiprocess_mode=mode, registry=r))
        self.latency = Histogram(
            "stock_http_request_seconds",
            "HTTP request latency by route",
            ["route", "method"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.worker_up.set(1)
        self.multiprocess = bool(os.environ.get(MULTIPROC_ENV))
        self._collectors: list[Callable[[], None]] = []
        self._children: dict[tuple[str, ...], tuple[Any, Any]] = {}
        self._outcome_children: dict[tuple[str, str], Any] = {}

    def request_done(self, route: str, method: str, status: int, seconds: float) -> None:
        """Count one HTTP request (label lookups cached: docs/performance.md, http/bare)."""
        key = (route, method, str(status))
        children = self._children.get(key)
        if children is None:
            children = (self.requests.labels(*key), self.latency.labels(route, method))
            self._children[key] = children
        children[0].inc()
        children[1].observe(seconds)

    def route(self, route: str, method: str) -> RouteMetrics:
        """The request count and latency of one route, its label children bound once."""
        return RouteMetrics(self, route, method)

    def outcome(self, op: str, outcome: str) -> None:
        child = self._outcome_children.get((op, outcome))
        if child is None:
            child = self._outcome_children[(op, outcome)] = self.outcomes.labels(op, outcome)
        child.inc()

    def loop_error(self, loop: str) -> None:
        self.loop_errors.labels(loop).inc()

    def loop_restart(self, loop: str) -> None:
        self.loop_restarts.labels(loop).inc()

    def on_scrape(self, refresh: Callable[[], None]) -> None:
        """Register a callback that copies live figures into the gauges."""
        self._collectors.append(refresh)

    def refresh(self) -> None:
        """Copy the live figures into the gauges (on a scrape; in multiprocess mode
        also every second, as a scrape reaches only one worker)."""
        for refresh in self._collectors:
            refresh()

    def all_processes(self) -> CollectorRegistry:
        """The registry a scrape reads: every worker's values in multiprocess mode."""
        if not self.multiprocess:
            return self.registry
        merged = CollectorRegistry()
        MultiProcessCollector(merged)  # type: ignore[no-untyped-call]
        return merged

    def render(self) -> bytes:
        self.refresh()
        return generate_latest(self.all_processes())


class RouteMetrics:
    """``Metrics.request_done`` for one route and method: children by status, bound on
    the first request of each status (a request of another method, the catch-all's,
    goes through ``request_done``)."""

    def __init__(self, metrics: Metrics, route: str, method: str) -> None:
        self.metrics = metrics
        self.route = route
        self.method = method
        self.latency: Any = None  # bound on the first request: no empty series
        self.counters: dict[int, Any] = {}

    def counter(self, status: int) -> Any:
        child = self.counters.get(status)
        if child is None:
            child = self.metrics.requests.labels(self.route, self.method, str(status))
            self.counters[status] = child
        return child

    def __call__(self, method: str, status: int, seconds: float) -> None:
        if method != self.method:
            self.metrics.request_done(self.route, method, status, seconds)
            return
        child = self.counters.get(status)
        if child is None:
            child = self.counter(status)
        child.inc()
        if self.latency is None:
            self.latency = self.metrics.latency.labels(self.route, self.method)
        self.latency.observe(seconds)
