"""The line call layout of ``lua/_lib.lua``: one script call as a value.

``LineCall`` holds what a caller means (its order, lines, mode and purpose);
``line_call`` alone turns it into KEYS and ARGV, so the layout's slots, and the
one slot with three meanings (ARGV[7]: ``OfKind``, ``HoldFor``, ``UndoHolds``),
are known in one place.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Final, Literal

from stock.core import keys
from stock.core.validate import Item

# The line call's mode (ARGV[1] of lua/_lib.lua): which order key comes first.
Mode = Literal["1", "r", "b", "0"]
WITH_RECORD: Final = "1"  # the order record (standalone reserve, deduct)
FROM_RECORD: Final = "r"  # the order record, the lines read from it (standalone transitions)
WITH_COPY: Final = "b"  # the bucket's copy of the order (a cluster group)
NO_ORDER_KEY: Final = "0"  # none (a cluster hold and its undo)


@dataclass(frozen=True, slots=True)
class OfKind:
    """ARGV[7] is the order's kind, ``reserve`` or ``deduct`` (reserve, deduct,
    confirm, release, extend, cancel, and the undo of an attempt's lines)."""

    kind: str


@dataclass(frozen=True, slots=True)
class HoldFor:
    """ARGV[7] is the step a hold prepares (``hold.lua``: ``confirm``, ``release``,
    ``extend``)."""

    step: str


@dataclass(frozen=True, slots=True)
class UndoHolds:
    """ARGV[7] is ``hold``: the undo of a hold's changes (``abort.lua``) instead of
    an attempt's lines."""


# One slot, three meanings (ARGV[7] of lua/_lib.lua); ``None`` only with
# ``FROM_RECORD``, where the record's kind counts.
Purpose = OfKind | HoldFor | UndoHolds


def purpose_arg(purpose: Purpose | None) -> str:
    """ARGV[7] for ``purpose``."""
    match purpose:
        case OfKind(kind):
            return kind
        case HoldFor(step):
            return step
        case UndoHolds():
            return "hold"
        case None:
            return ""
    raise TypeError(f"not a line call's purpose: {purpose!r}")


@dataclass(frozen=True, slots=True)
class LineCall:
    """One line script call (``lua/_lib.lua``'s layout, encoded by ``line_call``).

    ``mode``: which order key comes first (``WITH_RECORD``, ``FROM_RECORD``,
    ``WITH_COPY``, ``NO_ORDER_KEY``). ``purpose``: what ARGV[7] says (``OfKind``,
    ``HoldFor``, ``UndoHolds``; ``None`` with ``FROM_RECORD`` only). ``may_create``:
    new lines may be made (reserve, deduct). ``tag``: the calling attempt's or
    hold's token on a cluster; ``reason``: the events' reason; ``customer``: the
    buyer of new lines (per-customer limits)."""

    order_id: str
    purpose: Purpose | None
    mode: Mode = WITH_COPY
    items: Sequence[Item] = ()
    spec: str = ""
    ttl_ms: int = 0
    may_create: bool = False
    tag: str = ""
    reason: str = ""
    customer: str = ""


def line_call(call: LineCall, *, buckets: int, retention_ms: int) -> tuple[list[str], list[Any]]:
    """KEYS and ARGV of ``call`` in the line call layout of ``lua/_lib.lua``."""
    if (call.purpose is None) != (call.mode == FROM_RECORD):
        raise ValueError(f"purpose {call.purpose!r} does not fit mode {call.mode!r}")
    keys_: list[str] = []
    if call.mode in (WITH_RECORD, FROM_RECORD):
        keys_.append(keys.order_key(call.order_id))
    elif call.mode == WITH_COPY:
        bucket = keys.bucket_of(call.items[0].sku, buckets)
        keys_.append(keys.order_copy_key(bucket, call.order_id))
    args: list[Any] = [call.mode, call.order_id, call.ttl_ms, retention_ms]
    args += ["1" if call.may_create else "0", call.spec]
    args += [purpose_arg(call.purpose), call.tag, call.reason, call.customer]  # ARGV[7..10]
    if call.mode == FROM_RECORD:  # the script finds the lines (standalone only)
        return keys_, [*args, buckets, keys.PREFIX]
    for item in call.items:
        keys_.extend(keys.line_keys(item.sku, call.order_id, buckets))
        # an item pinned to a location travels as 'qty@location' (lua/_lib.lua parse_call)
        args += (item.sku, f"{item.qty}@{item.location}" if item.location else item.qty)
    return keys_, args
