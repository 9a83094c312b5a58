"""The answer to an order operation, shared by the engine and both backends."""

from __future__ import annotations

from dataclasses import dataclass, field

from stock.core.formats import STATE_AFTER
from stock.redis.scripts import LineResult, LinesReply


@dataclass(frozen=True, slots=True)
class OrderResult:
    """The answer to an order operation; ``replay`` when it changed nothing."""

    order_id: str
    status: str
    replay: bool
    expires_ms: int
    lines: list[LineResult] = field(default_factory=list)


def order_result(order_id: str, op: str, reply: LinesReply) -> OrderResult:
    """``op``'s answer from the merged reply of its script calls."""
    return OrderResult(order_id, STATE_AFTER[op], reply.replay, reply.expires_ms, reply.lines)
