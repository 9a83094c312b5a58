"""Prometheus metrics of one service process (prometheus-client).

Each app gets its own CollectorRegistry, so tests can build many apps. Gauges
that mirror the reaper and writer are read when ``/metrics`` is scraped.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

LATENCY_BUCKETS = (0.0005, 0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter(
            "stock_http_requests", "HTTP requests by route and outcome",
            ["route", "method", "status"], registry=r,
        )  # fmt: skip
        self.latency = Histogram(
            "stock_http_request_seconds", "HTTP request latency by route",
            ["route", "method"], buckets=LATENCY_BUCKETS, registry=r,
        )  # fmt: skip
        self.outcomes = Counter(
            "stock_order_outcomes", "Order operations by operation and outcome (ok, replay, or "
            "the error code)", ["op", "outcome"], registry=r,
        )  # fmt: skip
        self.redis_errors = Counter("stock_redis_errors", "Redis calls that failed", registry=r)
        self.pg_errors = Counter(
            "stock_postgres_errors", "PostgreSQL calls that failed", registry=r
        )
        self.oversell = Gauge(
            "stock_oversell_skus",
            "SKUs seen with a negative counter in any answer; must stay 0",
            registry=r,
        )
        self.expiry_lag = Gauge(
            "stock_expiry_lag_seconds", "Age of the oldest due, unexpired reservation", registry=r
        )
        self.expired = Gauge(
            "stock_reaper_expired", "Reservations this process's reaper expired", registry=r
        )
        self.reaper_batch = Gauge(
            "stock_reaper_last_batch", "Lines expired by the reaper's last pass", registry=r
        )
        self.flush_lag = Gauge(
            "stock_writer_flush_lag_seconds", "Age of the oldest event not yet in PostgreSQL",
            registry=r,
        )  # fmt: skip
        self.writer_batch = Gauge(
            "stock_writer_last_batch", "Events in the writer's last batch", registry=r
        )
        self.writer_events = Gauge(
            "stock_writer_events", "Events this process's writer applied", registry=r
        )
        self._collectors: list[Callable[[], None]] = []
        self._children: dict[tuple[str, ...], tuple[Any, Any]] = {}
        self._outcome_children: dict[tuple[str, str], Any] = {}

    def request_done(self, route: str, method: str, status: int, seconds: float) -> None:
        """Count one HTTP request (label lookups cached: they were ~4% of a request)."""
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

    def on_scrape(self, refresh: Callable[[], None]) -> None:
        """Register a callback that copies live figures into the gauges."""
        self._collectors.append(refresh)

    def render(self) -> bytes:
        for refresh in self._collectors:
            refresh()
        return generate_latest(self.registry)
