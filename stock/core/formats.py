"""The value formats and the state tables: the one place in Python that knows them.

``lua/_lib.lua`` mirrors this module (``read_line``, ``line_value``,
``read_record``, ``record_value``, ``read_copy``, ``copy_value``, ``read_spec``);
keep the two in step. ``tests/test_formats.py`` proves they agree by a round trip
through a real script. The event format lives in ``persist/events.py``
(``decode``).

- **line** (``stock:{b<n>}:line:<sku>|<order_id>``): ``state|qty|expires_ms``,
  ``state|qty|expires_ms|tag`` or ``state|qty|expires_ms|tag|customer``; the tag
  may be empty, a customer id may hold ``|`` (so it comes last).
- **order record** (``stock:order:{<order_id>}``): ``kind|phase|owner|items``;
  kind ``reserve`` or ``deduct``; phase ``done``, on a cluster's directory also a
  TCC tombstone (``released``, ``cancelled``: no items) or ``pending`` (a record
  of an earlier version, owner ``token@lease_ms``); owner a set of tokens
  ``token,token`` (a cluster's single-group deduct) or empty.
- **items spec**: ``sku:qty,sku:qty`` sorted, the canonical text of an order's
  items (compared to detect order_conflict). A SKU may hold ``:``, not ``,``.
- **bucket copy** (cluster, ``stock:{b<n>}:order:<order_id>``): ``kind|items``.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import NamedTuple

from stock.core.validate import Item

# -- states -------------------------------------------------------------------------

RESERVED, CONFIRMED, RELEASED, EXPIRED, CANCELLED = "R", "C", "X", "E", "N"
ABORTED = "-"  # never stored: a deleted line (abort.lua's replies, resync's drop)

STATE_NAMES = {
    RESERVED: "reserved",
    CONFIRMED: "confirmed",
    RELEASED: "released",
    EXPIRED: "expired",
    CANCELLED: "cancelled",
    ABORTED: "aborted",
}  # a line's state code -> its name (the API's and PostgreSQL's ``state``)
STATE_CODES = {name: code for code, name in STATE_NAMES.items()}
STORED_STATES = (RESERVED, CONFIRMED, RELEASED, EXPIRED, CANCELLED)  # a line's first field
UNKNOWN = "unknown"  # the state name of a line that is gone

# The state each operation leaves its lines in: its event's op (``persist/events.py``)
# and the status of its answer (the engine's OrderResult).
STATE_AFTER = {
    "reserve": "reserved",
    "deduct": "confirmed",
    "confirm": "confirmed",
    "release": "released",
    "abort": "aborted",
    "cancel": "cancelled",
    "extend": "reserved",
    "expire": "expired",
}
ORDER_KINDS = ("reserve", "deduct")  # an order record's kind: the op that created it
# the reason of a cluster's multi-group deduct's hold events (reserve.lua, DEDUCT_HOLD in
# lua/_lib.lua): the writer records such a line's kind as ``deduct`` although its first
# event is a ``reserve``, so that ``stock resync`` restores the order as a deduct
DEDUCT_HOLD = "deduct-hold"
DONE = "done"  # an order record's phase once its lines are there
TOMBSTONES = ("released", "cancelled")  # a TCC tombstone's phase (no items)


def state_name(code: str) -> str:
    """The name of a line's state code; ``unknown`` for none of them."""
    return STATE_NAMES.get(code, UNKNOWN)


# -- the line string ---------------------------------------------------------------


class Line(NamedTuple):
    state: str  # a code of STORED_STATES
    qty: int
    expires_ms: int
    tag: str = ""
    customer: str = ""


def line_value(line: Line) -> str:
    """The line's string (``line_value`` in ``lua/_lib.lua``)."""
    value = f"{line.state}|{line.qty}|{line.expires_ms}"
    if line.customer:
        return f"{value}|{line.tag}|{line.customer}"
    return f"{value}|{line.tag}" if line.tag else value


def parse_line(raw: str) -> Line:
    """The fields of a line's string (``read_line`` in ``lua/_lib.lua``)."""
    state, qty, expires, *rest = raw.split("|", 4)
    tag = rest[0] if rest else ""
    customer = rest[1] if len(rest) > 1 else ""
    return Line(state, int(qty), int(expires), tag, customer)


# -- the items spec ------------------------------------------------------------------


def items_spec(items: Iterable[Item]) -> str:
    """The canonical text of an order's items, compared to detect order_conflict."""
    ordered = sorted(items)
    if len(ordered) == 1:  # most orders: skip the generator
        return f"{ordered[0].sku}:{ordered[0].qty}"
    return ",".join(f"{i.sku}:{i.qty}" for i in ordered)


def parse_spec(spec: str) -> list[Item]:
    """The items of a spec (none for an empty one: a tombstone's)."""
    if not spec:
        return []
    out = []
    for part in spec.split(","):
        sku, _, qty = part.rpartition(":")
        out.append(Item(sku, int(qty)))
    return out


# -- the order record and the bucket copy ------------------------------------------


class OrderRecord(NamedTuple):
    kind: str
    phase: str
    owner: str
    spec: str


def order_record(kind: str, spec: str, phase: str = DONE, owner: str = "") -> str:
    """The order record's value (``record_value`` in ``lua/_lib.lua``)."""
    return f"{kind}|{phase}|{owner}|{spec}"


def parse_record(raw: str) -> OrderRecord:
    """The fields of an order record (``read_record`` in ``lua/_lib.lua``)."""
    kind, phase, owner, spec = raw.split("|", 3)
    return OrderRecord(kind, phase, owner, spec)


def copy_value(kind: str, spec: str) -> str:
    """A bucket's copy of a cluster order (``copy_value`` in ``lua/_lib.lua``)."""
    return f"{kind}|{spec}"


def parse_copy(raw: str) -> tuple[str, str]:
    """The kind and items spec of a bucket's copy (``read_copy`` in ``lua/_lib.lua``)."""
    kind, _, spec = raw.partition("|")
    return kind, spec
