"""Settings: one dataclass, read from the environment once at start-up."""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass, fields
from typing import Any

from stock.core.errors import ConfigError

DAY_S = 86_400


def _number_in(kind: type[int] | type[float], low: float, high: float) -> Callable[[str, str], Any]:
    """A parser of an int or float setting within [low, high]."""
    noun = "an integer" if kind is int else "a number"

    def parse(name: str, raw: str) -> Any:
        try:
            value = kind(raw)
        except ValueError:
            raise ConfigError(f"{name} must be {noun}, got {raw!r}") from None
        if not low <= value <= high:
            raise ConfigError(f"{name} must be between {low} and {high}, got {value}")
        return value

    return parse


def _int_in(low: int, high: int) -> Callable[[str, str], int]:
    return _number_in(int, low, high)


def _float_in(low: float, high: float) -> Callable[[str, str], float]:
    return _number_in(float, low, high)


def _bool(name: str, raw: str) -> bool:
    lowered = raw.strip().lower()
    if lowered in ("1", "true", "yes", "on"):
        return True
    if lowered in ("0", "false", "no", "off", ""):
        return False
    raise ConfigError(f"{name} must be 0 or 1, got {raw!r}")


def _redis_url(name: str, raw: str) -> str:
    if not raw.startswith(("redis://", "rediss://", "unix://")):
        raise ConfigError(f"{name} must be a redis://, rediss:// or unix:// URL, got {raw!r}")
    return raw


def _text(name: str, raw: str) -> str:
    return raw


def _status_url(name: str, raw: str) -> str:
    if raw and (not raw.startswith(("http://", "https://")) or "{order_id}" not in raw):
        raise ConfigError(f"{name} must be an http(s) URL holding {{order_id}}, got {raw!r}")
    return raw


# field name -> (environment variable, parser)
_ENV: dict[str, tuple[str, Callable[[str, str], Any]]] = {
    "redis_url": ("STOCK_REDIS_URL", _redis_url),
    "redis_cluster": ("STOCK_REDIS_CLUSTER", _bool),
    "database_url": ("STOCK_DATABASE_URL", _text),
    "admin_token": ("STOCK_ADMIN_TOKEN", _text),
    "host": ("STOCK_HOST", _text),
    "port": ("STOCK_PORT", _int_in(1, 65_535)),
    "reservation_ttl_s": ("STOCK_RESERVATION_TTL_S", _int_in(1, DAY_S)),
    "retention_s": ("STOCK_RETENTION_S", _int_in(60, 365 * DAY_S)),
    "buckets": ("STOCK_BUCKETS", _int_in(1, 16_384)),
    "reaper_period_s": ("STOCK_REAPER_PERIOD_S", _float_in(0.01, 60.0)),
    "reaper_batch": ("STOCK_REAPER_BATCH", _int_in(1, 10_000)),
    "redis_max_connections": ("STOCK_REDIS_MAX_CONNECTIONS", _int_in(1, 100_000)),
    "writer_batch": ("STOCK_WRITER_BATCH", _int_in(1, 100_000)),
    "writer_interval_ms": ("STOCK_WRITER_INTERVAL_MS", _int_in(1, 60_000)),
    "payment_status_url": ("STOCK_PAYMENT_STATUS_URL", _status_url),
    "payment_probe_timeout_ms": ("STOCK_PAYMENT_PROBE_TIMEOUT_MS", _int_in(10, 60_000)),
    "payment_grace_s": ("STOCK_PAYMENT_GRACE_S", _int_in(0, 30 * DAY_S)),
    "fence_ttl_s": ("STOCK_FENCE_TTL_S", _float_in(0.1, 3600.0)),
    "webhook_retry_s": ("STOCK_WEBHOOK_RETRY_S", _int_in(1, 30 * DAY_S)),
    "webhook_retry_base_s": ("STOCK_WEBHOOK_RETRY_BASE_S", _float_in(0.01, 300.0)),
    "webhook_timeout_s": ("STOCK_WEBHOOK_TIMEOUT_S", _float_in(0.1, 300.0)),
    "webhook_concurrency": ("STOCK_WEBHOOK_CONCURRENCY", _int_in(1, 10_000)),
    "redis_connect_timeout_s": ("STOCK_REDIS_CONNECT_TIMEOUT_S", _float_in(0.01, 60.0)),
    "redis_timeout_s": ("STOCK_REDIS_TIMEOUT_S", _float_in(0.01, 300.0)),
    "redis_keepalive_s": ("STOCK_REDIS_KEEPALIVE_S", _int_in(0, 7_200)),
    "redis_health_check_s": ("STOCK_REDIS_HEALTH_CHECK_S", _float_in(0.0, 3_600.0)),
    "redis_retries": ("STOCK_REDIS_RETRIES", _int_in(0, 10)),
    "redis_migration_wait_s": ("STOCK_REDIS_MIGRATION_WAIT_S", _float_in(0.0, 60.0)),
    "request_timeout_s": ("STOCK_REQUEST_TIMEOUT_S", _float_in(0.1, 300.0)),
    "max_inflight": ("STOCK_MAX_INFLIGHT", _int_in(0, 1_000_000)),
    "soldout_cache_ms": ("STOCK_SOLDOUT_CACHE_MS", _int_in(0, 60_000)),
}


@dataclass(frozen=True, slots=True)
class Settings:
    """Everything the service reads from its environment (DESIGN §7).

    ``buckets`` is fixed once per deployment: it decides which hash tag, and so
    which Redis Cluster slot, every SKU lives in. Changing it strands stock.
    """

    redis_url: str = "redis://127.0.0.1:6379/0"
    redis_cluster: bool = False
    database_url: str = ""
    admin_token: str = ""
    host: str = "127.0.0.1"
    port: int = 8080
    reservation_ttl_s: int = 900
    retention_s: int = 7 * DAY_S
    buckets: int = 64
    reaper_period_s: float = 0.25
    reaper_batch: int = 500
    redis_max_connections: int = 128
    writer_batch: int = 10_000  # most events the writer applies in one transaction
    writer_interval_ms: int = 50  # how long the writer waits when the streams are idle
    payment_status_url: str = ""  # payment-aware expiry when set (DESIGN §9)
    payment_probe_timeout_ms: int = 1000
    payment_grace_s: int = 600
    fence_ttl_s: float = 10.0  # a resync's fence ends this long after its last renewal
    webhook_retry_s: int = DAY_S  # how long a delivery is retried before it is failed
    webhook_retry_base_s: float = 1.0  # first retry delay, doubling up to 5 minutes
    webhook_timeout_s: float = 10.0  # per request
    webhook_concurrency: int = 32  # requests in flight per dispatcher
    # Deadlines (DESIGN §4): every Redis call is bounded, and the API answers 503
    # `unavailable` to a request it could not finish within request_timeout_s.
    redis_connect_timeout_s: float = 1.0
    redis_timeout_s: float = 2.0  # a reply (and the auto-pipeline's batch) deadline
    redis_keepalive_s: int = 10  # TCP keepalive idle time (0: off)
    redis_health_check_s: float = 15.0  # PING a connection idle this long before use
    redis_retries: int = 1  # redis-py's retries of a standalone call after a timeout
    # Cluster: how long a call answered TRYAGAIN (its slot is being resharded, its
    # keys split between two nodes) is tried again before the request answers 503
    redis_migration_wait_s: float = 5.0
    request_timeout_s: float = 8.0
    # API requests in flight per process before 503 overloaded (0 = no limit); why
    # 256: docs/configuration.md, STOCK_MAX_INFLIGHT (DESIGN §10)
    max_inflight: int = 256
    soldout_cache_ms: int = 0  # sold-out fast path (DESIGN §10); 0 = off

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None, **overrides: Any) -> Settings:
        """Read every ``STOCK_*`` variable; a bad value raises ConfigError naming it."""
        env = os.environ if environ is None else environ
        values: dict[str, Any] = {}
        for field in fields(cls):
            variable, parse = _ENV[field.name]
            raw = env.get(variable)
            if raw is not None:
                values[field.name] = parse(variable, raw)
        values.update({k: v for k, v in overrides.items() if v is not None})
        return cls(**values)

    def environment(self) -> dict[str, str]:
        """Every ``STOCK_*`` variable, so that ``from_env`` of them gives these settings
        back: how a ``stock`` child process is told its settings."""
        env = {}
        for name, (variable, _) in _ENV.items():
            value = getattr(self, name)
            env[variable] = ("1" if value else "0") if isinstance(value, bool) else str(value)
        return env

    @staticmethod
    def variables() -> list[str]:
        """The environment variables the settings know, for docs and checks."""
        return [variable for variable, _ in _ENV.values()]
