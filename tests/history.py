"""Record a history of concurrent operations against the live HTTP API, while `stock
serve` processes are SIGKILLed and restarted, for tests/linearizability.py to check.

Two API processes stand behind the client (each request goes to either, as a load
balancer would send it). Buyers run checkout sessions (reserve or deduct one SKU,
then confirm, release, extend, cancel, sometimes twice or concurrently; or two
attempts of one order id at once, often with other items or kinds; or a try and its
TCC cancel at once), readers
read the counters, an admin adjusts stock, and a killer SIGKILLs each process once
mid-run and starts it again. Every call is an :class:`Op` with its invoke and return
times; a timeout, a reset or refused connection, or a 5xx is an unknown outcome, and
the client retries the same request (same order id) a few times, as a real one would.
"""

from __future__ import annotations

import asyncio
import random
import signal
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import aiohttp

from stock.app.embedded import free_port
from stock.core.config import Settings
from tests import servers
from tests.linearizability import Op, Result

TOKEN = "history-token"
ADMIN = {"Authorization": f"Bearer {TOKEN}"}
TTL_S = 600  # no reservation expires during a run: the reaper stays out of the history


class Api:
    """The ``stock serve`` processes behind the client (no PostgreSQL: no writer)."""

    def __init__(self, settings: Settings, count: int = 2) -> None:
        self.settings = settings
        self.ports = [free_port() for _ in range(count)]
        self.procs: list[subprocess.Popen[bytes] | None] = [None] * count
        self.kills = 0

    @property
    def bases(self) -> list[str]:
        return [f"http://127.0.0.1:{port}" for port in self.ports]

    def start(self, i: int) -> None:
        env = servers.stock_env(self.settings, self.ports[i], "", TOKEN)
        command = [sys.executable, "-m", "stock.app.cli", "serve", "--no-writer"]
        self.procs[i] = subprocess.Popen(command, env=env, stderr=subprocess.DEVNULL)

    async def ready(self, i: int, timeout: float = 30) -> None:
        deadline = time.monotonic() + timeout
        async with aiohttp.ClientSession() as http:
            while True:
                proc = self.procs[i]
                assert proc is not None and proc.poll() is None, "stock serve exited"
                try:
                    async with http.get(f"{self.bases[i]}/readyz") as response:
                        if response.status == 200:
                            return
                except aiohttp.ClientError:
                    pass
                assert time.monotonic() < deadline, "stock serve never became ready"
                await asyncio.sleep(0.05)

    def kill(self, i: int) -> None:
        proc = self.procs[i]
        assert proc is not None and proc.poll() is None, "killing a process that is not up"
        proc.send_signal(signal.SIGKILL)
        proc.wait(10)
        self.kills += 1

    def stop(self) -> None:
        for proc in self.procs:
            if proc is not None and proc.poll() is None:
                proc.kill()
                proc.wait(10)


def request_of(kind: str, sku: str, order: str, qty: int) -> tuple[str, str, Any, bool]:
    """(method, path, JSON body, admin) of one operation."""
    items = [{"sku": sku, "qty": qty}]
    if kind == "read":
        return "GET", f"/v1/stock/{sku}", None, False
    if kind == "adjust":
        return "POST", f"/v1/stock/{sku}/adjust", {"delta": qty, "reason": "history"}, True
    if kind == "reserve":
        return (
            "POST",
            "/v1/reservations",
            {"order_id": order, "items": items, "ttl_s": TTL_S},
            False,
        )
    if kind == "deduct":
        return "POST", "/v1/deductions", {"order_id": order, "items": items}, False
    if kind == "cancel":
        return "POST", f"/v1/orders/{order}/cancel", None, True
    body = {"ttl_s": TTL_S} if kind == "extend" else None
    return "POST", f"/v1/reservations/{order}/{kind}", body, False


def normalize(kind: str, status: int, body: Any) -> Result | None:
    """The answer as tests/linearizability.py compares it; None when unknown (5xx)."""
    if status >= 500:
        return None
    if status in (200, 201):
        if kind in ("read", "adjust"):
            return ("ok", body["available"], body["reserved"], body["sold"])
        if kind in ("reserve", "deduct"):
            return ("created",) if status == 201 else ("replay",)
        return ("ok",)
    code = body.get("error") if isinstance(body, dict) else None
    if code == "insufficient_stock":
        return (code, body["items"][0]["available"])
    if code == "invalid_transition":
        return (code, body["state"])
    if code in ("order_conflict", "not_found", "reservation_expired"):
        return (code,)
    raise AssertionError(f"{kind}: unexpected answer {status} {body}")  # a workload bug


@dataclass
class Recorder:
    http: aiohttp.ClientSession
    bases: list[str]
    rng: random.Random
    ops: list[Op] = field(default_factory=list)
    interleave: float = 1.0  # share of racing attempts and try/cancel races (0: none)
    timeout: aiohttp.ClientTimeout = field(default_factory=lambda: aiohttp.ClientTimeout(total=3))

    async def call(self, kind: str, sku: str, order: str = "", qty: int = 0) -> Result | None:
        method, path, body, admin = request_of(kind, sku, order, qty)
        base = self.rng.choice(self.bases)
        invoke = time.monotonic()
        result: Result | None
        note = ""
        try:
            async with self.http.request(
                method,
                base + path,
                json=body,
                headers=ADMIN if admin else None,
                timeout=self.timeout,
            ) as response:
                result = normalize(kind, response.status, await response.json())
                note = "" if result else f"{response.status}"
        except aiohttp.ClientConnectorError:
            return None  # no connection, so no request: it did not happen, nothing to record
        except (aiohttp.ClientError, TimeoutError, ValueError) as exc:
            result, note = None, type(exc).__name__
        self.ops.append(Op(kind, sku, invoke, time.monotonic(), result, order, qty, note))
        return result

    async def retrying(self, kind: str, sku: str, order: str = "", qty: int = 0) -> Result | None:
        """Call until the outcome is known, up to 5 times (each try is its own op)."""
        for _ in range(5):
            result = await self.call(kind, sku, order, qty)
            if result is not None:
                return result
            await asyncio.sleep(self.rng.uniform(0.05, 0.3))
        return None


PLANS = {  # what a session does after its order went through
    "reserve": [["confirm"], ["release"], ["confirm", "cancel"], ["extend", "confirm"],
                ["confirm", "confirm"], ["release", "confirm"], ["double-confirm"], []],
    "deduct": [[], ["cancel"], ["cancel", "cancel"], ["confirm"]],
}  # fmt: skip


@dataclass
class Workload:
    skus: list[str]
    stock: int = 10
    duration_s: float = 5.0
    buyers: int = 8
    readers: int = 2
    cap: int = 300  # operations per SKU (the checker's search grows with the history)
    seed: int = 1
    kills: bool = True  # SIGKILL and restart each API process once
    interleave: float = 1.0  # sessions racing attempts of one order id or try and cancel


async def _race(rec: Recorder, sku: str, order: str) -> None:
    """Two attempts of one order id at once (a double submit, two tabs), often with other
    items or of the other kind: exactly one order may exist, a loser's 409 names it."""
    first = (rec.rng.choice(("reserve", "deduct")), rec.rng.choice((1, 2)))
    second = rec.rng.choice([first, (first[0], 3 - first[1]), ("deduct", first[1])])
    if second == first == ("deduct", first[1]):
        second = ("reserve", first[1])
    await asyncio.gather(*(rec.retrying(kind, sku, order, qty) for kind, qty in (first, second)))


async def _try_and_cancel(rec: Recorder, sku: str, order: str) -> None:
    """TCC: a try and its cancel at once (the coordinator timed the try out): an empty
    rollback leaves a tombstone and the hanging try is refused, never a hold."""
    kind = rec.rng.choice(("reserve", "deduct"))
    undo = "release" if kind == "reserve" else "cancel"

    async def late_try() -> None:
        await asyncio.sleep(rec.rng.uniform(0.0, 0.01))
        await rec.retrying(kind, sku, order, rec.rng.choice((1, 2)))

    await asyncio.gather(late_try(), rec.retrying(undo, sku, order))


async def _session(rec: Recorder, sku: str, order: str) -> None:
    odd = rec.rng.random()
    if odd < 0.3 * rec.interleave:
        await (_race if odd < 0.15 * rec.interleave else _try_and_cancel)(rec, sku, order)
        return
    kind = "deduct" if rec.rng.random() < 0.25 else "reserve"
    qty = rec.rng.choice((1, 1, 2, 3))
    result = await rec.retrying(kind, sku, order, qty)
    if result not in (("created",), ("replay",)):
        return
    for step in rec.rng.choice(PLANS[kind]):
        await asyncio.sleep(rec.rng.uniform(0.01, 0.08))
        if step == "double-confirm":  # two tabs of the same checkout
            await asyncio.gather(*(rec.retrying("confirm", sku, order) for _ in range(2)))
        else:
            await rec.retrying(step, sku, order)


async def _loop(
    rec: Recorder,
    w: Workload,
    until: float,
    pause: tuple[float, float],
    body: Callable[[str], Awaitable[None]],
) -> None:
    """Run ``body(sku)`` until ``until`` on SKUs whose history is not full yet."""
    while time.monotonic() < until:
        counts = {sku: 0 for sku in w.skus}
        for op in rec.ops:
            counts[op.sku] += 1
        open_skus = [sku for sku in w.skus if counts[sku] < w.cap]
        if not open_skus:
            return
        await body(rec.rng.choice(open_skus))
        await asyncio.sleep(rec.rng.uniform(*pause))


async def _killer(api: Api, started: float, w: Workload) -> None:
    """SIGKILL each API process once mid-run, and start it again."""
    for i in range(len(api.ports)):
        await asyncio.sleep(max(0.0, started + w.duration_s * (i + 1) / 4 - time.monotonic()))
        api.kill(i)
        await asyncio.sleep(0.3)
        api.start(i)
        await api.ready(i)


async def record(settings: Settings, w: Workload) -> tuple[list[Op], Api]:
    """Run the workload against two fresh ``stock serve`` processes; return the history."""
    api = Api(settings)
    for i in range(len(api.ports)):
        api.start(i)
    try:
        for i in range(len(api.ports)):
            await api.ready(i)
        connector = aiohttp.TCPConnector(limit=100)
        async with aiohttp.ClientSession(connector=connector) as http:
            rec = Recorder(http, api.bases, random.Random(w.seed), interleave=w.interleave)
            for sku in w.skus:
                answer = await rec.call("adjust", sku, qty=w.stock)  # a new SKU: 0 + stock
                assert answer == ("ok", w.stock, 0, 0), answer
            rec.ops.clear()
            started = time.monotonic()
            until = started + w.duration_s
            counter = iter(range(10**9))

            async def buy(sku: str) -> None:
                await _session(rec, sku, f"{sku}-{w.seed}-{next(counter)}")

            async def read(sku: str) -> None:
                await rec.call("read", sku)

            async def adjust(sku: str) -> None:
                await rec.call("adjust", sku, qty=rec.rng.choice((3, 2, -1, -2)))

            await asyncio.gather(
                *(_loop(rec, w, until, (0.01, 0.05), buy) for _ in range(w.buyers)),
                *(_loop(rec, w, until, (0.002, 0.02), read) for _ in range(w.readers)),
                _loop(rec, w, until, (0.05, 0.15), adjust),
                *([_killer(api, started, w)] if w.kills else []),
            )
            for sku in w.skus:  # a last read of each, after everything
                await rec.retrying("read", sku)
            return rec.ops, api
    finally:
        api.stop()
