"""Input limits of DESIGN §6, checked before anything reaches Redis.

Every failure is an InvalidRequest whose message names the field.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from typing import Any, NamedTuple

from stock.core.errors import InvalidRequest

SKU_RE = re.compile(r"[A-Za-z0-9._:-]{1,64}")
MAX_QTY = 1_000_000
MAX_ITEMS = 100
MAX_TTL_S = 86_400
MAX_ORDER_ID = 128
ORDER_ID_RE = re.compile(rf"[ -~]{{1,{MAX_ORDER_ID}}}")  # printable ASCII


MAX_REASON = 200
CONTROL_RE = re.compile(r"[\x00-\x1f\x7f-\x9f]")  # C0, DEL and C1 control characters


class Item(NamedTuple):
    sku: str
    qty: int
    location: str = ""  # pinned: served from this location or refused (DESIGN §13)


LOCATION_RE = re.compile(r"[A-Za-z0-9._-]{1,64}")


def location(value: Any, field: str = "location") -> str:
    if not isinstance(value, str) or not LOCATION_RE.fullmatch(value):
        raise InvalidRequest(f"{field} must match [A-Za-z0-9._-]{{1,64}}", field=field)
    return value


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def sku(value: Any, field: str = "sku") -> str:
    if not isinstance(value, str) or not SKU_RE.fullmatch(value):
        raise InvalidRequest(f"{field} must match [A-Za-z0-9._:-]{{1,64}}", field=field)
    return value


def order_id(value: Any, field: str = "order_id") -> str:
    if not isinstance(value, str) or ORDER_ID_RE.fullmatch(value) is None:
        raise InvalidRequest(
            f"{field} must be 1 to {MAX_ORDER_ID} printable ASCII characters", field=field
        )
    return value


def customer_id(value: Any, field: str = "customer_id") -> str:
    """Same alphabet and length as an order id: 1 to 128 printable ASCII characters."""
    if not isinstance(value, str) or ORDER_ID_RE.fullmatch(value) is None:
        raise InvalidRequest(
            f"{field} must be 1 to {MAX_ORDER_ID} printable ASCII characters", field=field
        )
    return value


def int_in(value: Any, field: str, low: int, high: int) -> int:
    if not _is_int(value) or not low <= value <= high:
        raise InvalidRequest(f"{field} must be an integer from {low} to {high}", field=field)
    return int(value)


def query_int(raw: str, field: str, low: int, high: int) -> int:
    """An integer query value: ASCII digits only (``"²".isdigit()`` is true and
    ``int("²")`` raises; ``int()`` takes full-width digits, signs and spaces), a few of them."""
    digits = raw.lstrip("0") or "0"  # (int() refuses more than 4300 digits, zeros too)
    if not raw.isascii() or not raw.isdigit() or len(digits) > len(str(high)):
        raise InvalidRequest(f"{field} must be an integer from {low} to {high}", field=field)
    return int_in(int(digits), field, low, high)


def ttl_s(value: Any, field: str = "ttl_s") -> int:
    return int_in(value, field, 1, MAX_TTL_S)


def items(values: Iterable[Any] | Any, field: str = "items") -> list[Item]:
    """A list of 1 to 100 ``{"sku", "qty"}`` (dicts or Item), no SKU twice.

    The common, valid case is checked in one pass; ``_explain`` finds the
    exact field only when something is wrong.
    """
    if not isinstance(values, list | tuple) or not 1 <= len(values) <= MAX_ITEMS:
        raise InvalidRequest(f"{field} must be a list of 1 to {MAX_ITEMS} items", field=field)
    result: list[Item] = []
    for i, raw in enumerate(values):
        try:
            if isinstance(raw, Item):
                sku_, qty, where = raw
            else:
                sku_, qty, where = raw["sku"], raw["qty"], raw.get("location", "")
                if len(raw) != (3 if "location" in raw else 2):
                    raise KeyError("extra")
            valid = (
                (where == "" or (type(where) is str and LOCATION_RE.fullmatch(where) is not None))
                and type(qty) is int
                and 1 <= qty <= MAX_QTY
                and type(sku_) is str
                and SKU_RE.fullmatch(sku_) is not None
            )
        except (KeyError, TypeError, IndexError, AttributeError):
            valid = False
        if not valid:
            _explain(raw._asdict() if isinstance(raw, Item) else raw, f"{field}[{i}]")
        result.append(Item(sku_, qty, where))
    if len({item.sku for item in result}) != len(result):
        seen: set[str] = set()
        for i, item in enumerate(result):
            if item.sku in seen:
                where = f"{field}[{i}].sku"
                raise InvalidRequest(f"{where} {item.sku!r} appears twice", field=where)
            seen.add(item.sku)
    return result


def _explain(raw: Any, where: str) -> None:
    """Raise the InvalidRequest that names what is wrong with one item."""
    if not isinstance(raw, dict):
        raise InvalidRequest(f"{where} must be an object with sku and qty", field=where)
    extra = sorted(set(raw) - {"sku", "qty", "location"})
    if extra:
        raise InvalidRequest(f"{where} has unknown field {extra[0]!r}", field=f"{where}.{extra[0]}")
    sku(raw.get("sku"), f"{where}.sku")
    int_in(raw.get("qty"), f"{where}.qty", 1, MAX_QTY)
    if "location" in raw:
        location(raw["location"], f"{where}.location")
    raise InvalidRequest(f"{where} is not a valid item", field=where)


def reason(value: Any, field: str = "reason") -> str:
    """At most 200 characters, no control characters: a reason travels in the event
    stream and into PostgreSQL (where a NUL is refused) and log lines."""
    if not isinstance(value, str) or len(value) > MAX_REASON:
        raise InvalidRequest(
            f"{field} must be a string of at most {MAX_REASON} characters", field=field
        )
    if CONTROL_RE.search(value):
        raise InvalidRequest(f"{field} must not contain control characters", field=field)
    return value
