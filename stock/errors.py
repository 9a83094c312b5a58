"""The errors of the stock service: one base class, one subclass per API error code."""

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


class ConfigError(ValueError):
    """A setting has a bad value; the message names the environment variable."""
