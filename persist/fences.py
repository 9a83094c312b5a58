"""Resync fences: one resync run's hold on the SKUs it rewrites (``lua/fence.lua``).

A fence is the field ``fenced = token@until_ms`` of a SKU's counters hash. While
it holds (server time before ``until_ms``) every script refuses the SKU with
``unavailable`` and the reaper passes its lines by, so nothing changes it between
the resync's read of PostgreSQL and its write. The token names the run that owns
it: another run cannot take it, renew it or lift it. The run renews its fences
every third of their time to live while it works; a run that dies (SIGKILL, lost
host) leaves fences that simply end, after ``STOCK_FENCE_TTL_S``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
from collections import defaultdict
from collections.abc import AsyncIterator, Iterable
from typing import Any

from redis.exceptions import RedisError

from stock.core import keys
from stock.core.config import Settings
from stock.core.errors import FenceLost, UnknownReply
from stock.redis.scripts import Scripts, parse_fence

log = logging.getLogger("persist.fences")


class Fences:
    """The fences of one resync run."""

    def __init__(self, scripts: Scripts, settings: Settings) -> None:
        self.scripts = scripts
        self.settings = settings
        self.token = secrets.token_hex(8)
        self.ttl_ms = max(100, int(settings.fence_ttl_s * 1000))
        self.held: list[str] = []
        self.lost: FenceLost | None = None  # set by the renewer

    async def _call(self, mode: str, skus: Iterable[str]) -> None:
        """One fence.lua call per bucket (its keys share a slot), concurrently; then the
        first failure is raised (FenceBusy, FenceLost: ``stock.core.errors``)."""
        groups: dict[int, list[str]] = defaultdict(list)
        for sku in skus:
            groups[keys.bucket_of(sku, self.settings.buckets)].append(sku)
        calls = [
            self.scripts(
                "fence",
                [keys.sku_key_in(bucket, sku) for sku in names],
                [mode, self.token, self.ttl_ms, *names],
            )
            for bucket, names in groups.items()
        ]
        replies: list[Any] = await asyncio.gather(*calls, return_exceptions=True)
        for reply in replies:  # every call has finished: now raise the first failure
            if isinstance(reply, BaseException):
                raise reply
        for reply in replies:
            parse_fence(reply)

    async def take(self, skus: list[str]) -> None:
        """Fence ``skus``, all or none: FenceBusy when another run holds one of them."""
        try:
            await self._call("take", skus)
        except BaseException:
            await self._lift_quietly(skus)
            raise
        self.held = list(skus)

    async def renew(self) -> None:
        """Push every held fence's end out again; FenceLost if one is no longer ours."""
        if self.held:
            await self._call("renew", self.held)

    async def lift(self, skus: list[str] | None = None) -> None:
        """Remove this run's fences (never another run's)."""
        names = self.held if skus is None else skus
        if names:
            await self._call("lift", names)
        gone = set(names)
        self.held = [s for s in self.held if s not in gone]

    async def _lift_quietly(self, skus: list[str]) -> None:
        try:
            await self.lift(skus)
        except (RedisError, OSError) as exc:  # they end by themselves
            log.warning("resync: could not lift fences (they end by themselves): %s", exc)

    async def _renew_loop(self) -> None:
        while True:
            await asyncio.sleep(self.ttl_ms / 3000)
            try:
                await self.renew()
            except FenceLost as exc:
                self.lost = exc
                log.error("resync: %s", exc)
                return
            except (RedisError, OSError, UnknownReply) as exc:
                log.warning("resync: fence renewal failed, trying again: %s", exc)

    @contextlib.asynccontextmanager
    async def holding(self, skus: list[str]) -> AsyncIterator[Fences]:
        """Fence ``skus`` for the body, renewed while it runs, lifted after it."""
        await self.take(skus)
        renewer = asyncio.create_task(self._renew_loop(), name="resync-fences")
        try:
            yield self
        finally:
            renewer.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await renewer
            await self._lift_quietly(list(self.held))
