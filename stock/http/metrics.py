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
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.multiprocess import MultiProcessCollector

MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"
LATENCY_BUCKETS = (0.0005, 0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter(
            "stock_http_requests",
            "HTTP requests by route and outcome",
            ["route", "method", "status"],
            registry=r,
        )
        self.latency = Histogram(
            "stock_http_request_seconds",
            "HTTP request latency by route",
            ["route", "method"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.outcomes = Counter(
            "stock_order_outcomes",
            "Order operations by operation and outcome (ok, replay, or the error code)",
            ["op", "outcome"],
            registry=r,
        )
        self.redis_errors = Counter("stock_redis_errors", "Redis calls that failed", registry=r)
        self.soldout_fast = Counter(
            "stock_soldout_fast_answers",
            "Reserves and deducts answered sold-out from memory (STOCK_SOLDOUT_CACHE_MS)",
            registry=r,
        )
        self.pg_errors = Counter(
            "stock_postgres_errors", "PostgreSQL calls that failed", registry=r
        )
        self.oversell = Gauge(
            "stock_oversell_skus",
            "SKUs seen with a negative counter in any answer; must stay 0",
            multiprocess_mode="sum",
            registry=r,
        )
        self.expiry_lag = Gauge(
            "stock_expiry_lag_seconds",
            "Age of the oldest due, unexpired reservation",
            multiprocess_mode="livemax",
            registry=r,
        )
        self.expired = Gauge(
            "stock_reaper_expired",
            "Reservations this process's reaper expired",
            multiprocess_mode="livesum",
            registry=r,
        )
        self.reaper_batch = Gauge(
            "stock_reaper_last_batch",
            "Lines expired by the reaper's last pass",
            multiprocess_mode="livesum",
            registry=r,
        )
        self.flush_lag = Gauge(
            "stock_writer_flush_lag_seconds",
            "Age of the oldest event not yet in PostgreSQL",
            multiprocess_mode="livemax",
            registry=r,
        )
        self.writer_batch = Gauge(
            "stock_writer_last_batch",
            "Events in the writer's last batch",
            multiprocess_mode="livesum",
            registry=r,
        )
        self.writer_events = Gauge(
            "stock_writer_events",
            "Events this process's writer applied",
            multiprocess_mode="livesum",
            registry=r,
        )
        self.writer_buckets = Gauge(
            "stock_writer_buckets_held",
            "Buckets this process's writer holds (its advisory "
            "locks); all writers together should hold stock_buckets",
            multiprocess_mode="livesum",
            registry=r,
        )
        self.buckets = Gauge(
            "stock_buckets",
            "STOCK_BUCKETS, exported by processes that run a writer",
            multiprocess_mode="livemax",
            registry=r,
        )
        self.reconcile_drifting = Gauge(
            "stock_reconcile_drifting_skus",
            "SKUs the last `stock reconcile` found drifting",
            multiprocess_mode="livemax",
            registry=r,
        )
        self.reconcile_at = Gauge(
            "stock_reconcile_last_run_timestamp_seconds",
            "When the last `stock reconcile` ran",
            multiprocess_mode="livemax",
            registry=r,
        )
        self.worker_up = Gauge(
            "stock_worker_up",
            "1 per live service process (a pid label per worker)",
            multiprocess_mode="liveall",
            registry=r,
        )
        self.worker_up.set(1)
        self.multiprocess = bool(os.environ.get(MULTIPROC_ENV))
        self.loop_errors = Counter(
            "stock_loop_errors",
            "Failed passes of a background loop (it backs off and goes on)",
            ["loop"],
            registry=r,
        )
        self.loop_restarts = Counter(
            "stock_loop_restarts",
            "Background loops that ended and were started again",
            ["loop"],
            registry=r,
        )
        self.quarantined = Counter(
            "stock_writer_quarantined",
            "Events the writer could not apply, set aside in the event_quarantine table",
            registry=r,
        )
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
