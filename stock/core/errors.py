"""The errors of the stock service: one base class, ``StockError``, one subclass per
API error code (and a few more specific ones of those), and ``ConfigError``.

A script's reply code becomes one of these in ``stock/redis/scripts.py``; a RedisError
(or a failure inside redis-py) that escapes the engine becomes ``StoreUnavailable``
with the RedisError as its ``__cause__`` (``stock.redis.client.store_boundary``)."""

from __future__ import annotations

from typing import Any


class StockError(Exception):
    """Base class. ``code`` is the API error code, ``status`` its HTTP status."""

    code = "error"
    status = 500

    def __init__(self, message: str, **details: Any) -> None:
        super().__init__(message)
        self.message = message
        self.details = details

    def to_dict(self) -> dict[str, Any]:
        return {"error": self.code, "message": self.message, **self.details}


class InvalidRequest(StockError):
    code, status = "invalid_request", 400


class NotFound(StockError):
    code, status = "not_found", 404


class InsufficientStock(StockError):
    """``details["items"]`` lists ``{"sku", "available"}`` for each short item."""

    code, status = "insufficient_stock", 409


class OrderConflict(StockError):
    code, status = "order_conflict", 409


class InvalidTransition(StockError):
    """``details["state"]`` names the order line's current state."""

    code, status = "invalid_transition", 409


class OrderClosed(InvalidTransition):
    """A TCC tombstone: the order was released or cancelled before it was reserved
    (``details["state"]``); no reserve, deduct, confirm or extend can follow."""


class ReservationExpired(StockError):
    code, status = "reservation_expired", 409


class LimitExceeded(StockError):
    """``details["items"]`` lists ``{"sku", "limit", "held"}`` for each item over its
    per-customer limit (``held``: units the customer holds or bought)."""

    code, status = "limit_exceeded", 409


class StaleStock(StockError):
    code, status = "stale_stock", 409


class Unavailable(StockError):
    """Redis is unreachable or the SKU is fenced by a resync."""

    code, status = "unavailable", 503


class StoreUnavailable(Unavailable):
    """Redis failed or did not answer (the RedisError is ``__cause__``): the outcome
    of the call is unknown, as with any lost reply; the same request may be retried."""

    MESSAGE = "stock store unavailable, retry shortly"

    def __init__(self, message: str = MESSAGE, **details: Any) -> None:
        super().__init__(message, **details)


class UnknownReply(Unavailable):
    """A script answered with a code this version does not know (a script of another
    version, or a bug): nothing is assumed about its outcome."""


class FenceError(Unavailable):
    """A resync's fence on ``sku`` is not its own: that run changed nothing on the SKU."""

    def __init__(self, message: str, sku: str) -> None:
        super().__init__(message, sku=sku)
        self.sku = sku


class FenceBusy(FenceError):
    """Another resync holds a live fence on ``sku``."""


class FenceLost(FenceError):
    """This run's fence on ``sku`` ended (or was taken over) before its write."""


class ConfigError(StockError, ValueError):
    """A setting has a bad value; the message names the environment variable."""

    code = "invalid_config"
