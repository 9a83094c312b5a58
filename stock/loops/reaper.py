"""The reaper: returns the stock of reservations whose TTL ran out.

Each pass reads the server's clock, asks every bucket's expiry index for its
due lines (one pipelined round of ZRANGE BYSCORE), and hands each bucket's
candidates to ``expire.lua``, which re-checks them atomically. Several reapers
may run at once: the script expires each line exactly once.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

from stock.core import keys
from stock.core.config import Settings
from stock.loops.payment_probe import FIRST_RETRY_MS, MAX_RETRY_MS, PaymentProbe
from stock.loops.supervise import LoopCounters, dependency, run_loop
from stock.redis.scripts import Scripts

log = logging.getLogger("stock.loops.reaper")

HOT_CALLS = 4  # script calls (of up to reaper_batch lines) per pass for a bucket with a backlog


@dataclass
class ReaperStats:
    expired_total: int = 0
    last_batch: int = 0
    expiry_lag_s: float = 0.0  # age of the oldest due, unexpired line at the last pass
    errors: int = 0


class Reaper:
    def __init__(
        self,
        client: Any,
        settings: Settings,
        scripts: Scripts | None = None,
        probe: PaymentProbe | None = None,
    ) -> None:
        self.redis = client
        self.settings = settings
        self.scripts = scripts or Scripts(client)
        self.probe = probe  # payment-aware expiry: due lines are asked about first
        self.stats = ReaperStats()
        self._hot: set[int] = set()  # buckets that had a full batch due at the last pass
        # told the SKUs of each batch that expired lines (the sold-out fast path)
        self.on_return: Callable[[Iterable[str]], None] | None = None

    async def server_ms(self) -> int:
        seconds, micros = await self.redis.time()
        return int(seconds) * 1000 + int(micros) // 1000

    async def reap_once(self) -> int:
        """One pass over every bucket; returns how many lines it expired.

        A bucket that had a full batch due at the last pass (a backlog, or a flash
        sale's one hot SKU) is read for up to ``HOT_CALLS`` batches, run as that
        many concurrent script calls, so that Redis runs one while the next is built.
        """
        now = await self.server_ms()
        batch = self.settings.reaper_batch
        buckets = list(range(self.settings.buckets))
        # Through the scripts' (per-node) auto-pipeline, one batch per node: an ASK
        # during a slot migration is followed there on one connection (redis-py's own
        # pipeline sends ASKING apart and could end in "TTL exhausted").
        read, reads = self.scripts.pipeline.execute, []
        for bucket in buckets:
            limit = batch * HOT_CALLS if bucket in self._hot else batch
            due_key = keys.due_key(bucket)
            reads.append(read("ZRANGE", due_key, 0, 0, "WITHSCORES"))  # the oldest, for the lag
            reads.append(read("ZRANGEBYSCORE", due_key, "-inf", now, "LIMIT", 0, limit))
        replies = await asyncio.gather(*reads)
        heads, due_lists = replies[0::2], [[str(m) for m in due] for due in replies[1::2]]
        oldest = min((_score(head) for head in heads if head), default=now)
        self.stats.expiry_lag_s = max(0.0, (now - oldest) / 1000)
        self._hot = {b for b, due in zip(buckets, due_lists, strict=True) if len(due) >= batch}
        step = self._expire if self.probe is None else self._claim
        counts = await asyncio.gather(
            *(
                step(b, due[start : start + batch])
                for b, due in zip(buckets, due_lists, strict=True)
                for start in range(0, len(due), batch)
            )
        )
        expired = sum(counts)
        self.stats.last_batch = expired
        self.stats.expired_total += expired
        return expired

    async def _expire(self, bucket: int, members: list[str], reason: str = "") -> int:
        """One ``expire.lua`` call for ``members`` of ``bucket``'s expiry index."""
        keys_ = [keys.due_key(bucket), keys.events_key(bucket)]
        line_prefix = keys.line_key_prefix(bucket)
        sku_keys: dict[str, str] = {}  # a flash sale's due lines are mostly one SKU
        for member in members:
            sku = keys.split_member(member)[0]
            sku_key = sku_keys.get(sku)
            if sku_key is None:
                sku_key = sku_keys[sku] = keys.sku_key_in(bucket, sku)
            keys_ += (sku_key, line_prefix + member)
        expired, _dropped = await self.scripts(
            "expire", keys_, [self.settings.retention_s * 1000, reason, *members]
        )
        if expired and self.on_return is not None:
            self.on_return(sku_keys)
        return int(expired)

    async def _claim(self, bucket: int, members: list[str]) -> int:
        """Payment-aware expiry: claim the due lines for a probe (``defer.lua``) and
        let the probe decide; returns the lines expired now (grace exhausted)."""
        assert self.probe is not None
        line_prefix = keys.line_key_prefix(bucket)
        keys_ = [keys.due_key(bucket), *(line_prefix + m for m in members)]
        reply = await self.scripts(
            "defer", keys_, [FIRST_RETRY_MS, MAX_RETRY_MS, self.probe.grace_ms, *members]
        )
        now = int(reply[0])
        claimed = [(str(reply[i]), int(reply[i + 1])) for i in range(1, len(reply), 2)]
        return await self.probe.handle_due(bucket, now, claimed, self._expire)

    async def run(self, stop: asyncio.Event, counters: LoopCounters | None = None) -> None:
        """Reap every period until ``stop`` is set. Any error of a pass (Redis down,
        redis-py's cluster client failing mid-failover, a bug) is logged and counted,
        and the reaper backs off and goes on (``stock.loops.supervise.run_loop``)."""
        await run_loop(
            "reaper",
            self._pass,
            stop,
            idle_s=self.settings.reaper_period_s,
            recover=self._failed,
            counters=counters,
        )

    async def _pass(self) -> bool:
        """One pass; True when more lines are due (go again at once)."""
        return await self.reap_once() >= self.settings.reaper_batch

    async def _failed(self, exc: BaseException) -> str:
        self.stats.errors += 1
        self._hot.clear()
        return dependency(exc)


def _score(head: list[Any]) -> float:
    """The score of a raw ZRANGE ... WITHSCORES reply of one member: RESP2
    ``[member, score]``, RESP3 ``[[member, score]]``."""
    first = head[0]
    return float(first[1] if isinstance(first, list) else head[1])


async def expiry_lag_s(client: Any, buckets: int) -> float:
    """Age of the oldest due, unexpired line, read from Redis now: the head of every
    bucket's expiry index (one pipelined round) against the server's TIME. The
    reaper's own figure stops when the reaper does; this one does not."""
    pipe = client.pipeline(transaction=False)
    for bucket in range(buckets):
        pipe.zrange(keys.due_key(bucket), 0, 0, withscores=True)
    heads = await pipe.execute()
    seconds, micros = await client.time()  # (a cluster pipeline takes no keyless command)
    now = int(seconds) * 1000 + int(micros) // 1000
    oldest = min((head[0][1] for head in heads if head), default=now)
    return max(0.0, (now - oldest) / 1000)
