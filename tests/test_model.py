"""Model-based tests: hypothesis drives the real engine on real Redis (standalone and
cluster) and a pure-Python model (tests/model.py) side by side.

After every step the counters, every order's lines and the event streams must
agree with the model; every refusal must be exactly the model's error class.
Expiry is real time: ``StockMachineWithExpiry`` reserves some lines with a 1 s
TTL and at most once per example sleeps until they are due, then runs the
reaper; reaper passes without sleeping happen in both machines.
"""

from __future__ import annotations

import asyncio
import random
import time
from collections import Counter
from collections.abc import Awaitable, Iterator
from typing import Any, TypeVar

import pytest
from hypothesis import HealthCheck, Phase
from hypothesis import settings as hsettings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
    run_state_machine_as_test,
)
from redis.asyncio import RedisCluster

from persist.events import named
from stock.core import keys
from stock.core.config import Settings
from stock.core.errors import (
    InsufficientStock,
    InvalidTransition,
    NotFound,
    OrderConflict,
    ReservationExpired,
    StockError,
)
from stock.loops.reaper import Reaper
from stock.orders.engine import StockEngine
from stock.redis.client import connect
from tests.model import EXPIRED, RESERVED, Outcome, StockModel

T = TypeVar("T")

# what the examples of the running test exercised ("reserve: replay" -> count)
SEEN = Counter[str]()

# A and X share a bucket (one script call on a cluster); B and C live in other
# buckets on other cluster nodes (with conftest.BUCKETS = 16).
SKUS = ["A", "X", "B", "C"]
ORDER_IDS = ["o0", "o1", "o2", "o3", "o4"]

sku_st = st.sampled_from(SKUS)
order_st = st.sampled_from(ORDER_IDS)
items_st = st.lists(
    st.tuples(sku_st, st.integers(1, 3)), min_size=1, max_size=3, unique_by=lambda t: t[0]
)


class Harness:
    """One event loop, one client, one engine and one reaper for a whole test."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.cluster = settings.redis_cluster
        self.loop = asyncio.new_event_loop()
        self.client, self.engine, self.reaper = self.run(self._connect())

    async def _connect(self) -> tuple[Any, StockEngine, Reaper]:
        """Made inside the loop, in case they bind to the running loop."""
        client = connect(self.settings)
        engine = StockEngine(client, self.settings)
        return client, engine, Reaper(client, self.settings, engine.scripts)

    def run(self, coro: Awaitable[T]) -> T:
        return self.loop.run_until_complete(coro)

    def flush(self) -> None:
        if isinstance(self.client, RedisCluster):
            self.run(self.client.flushall(target_nodes=RedisCluster.PRIMARIES))
        else:
            self.run(self.client.flushall())

    def server_ms(self) -> int:
        return self.run(self.reaper.server_ms())

    def events(self) -> dict[str, list[dict[str, str]]]:
        """Every delta event of the test SKUs, per SKU, in stream order."""

        async def read() -> dict[str, list[dict[str, str]]]:
            buckets = sorted({keys.bucket_of(s, self.settings.buckets) for s in SKUS})
            out: dict[str, list[dict[str, str]]] = {s: [] for s in SKUS}
            for bucket in buckets:
                for _id, fields in await self.client.xrange(keys.events_key(bucket)):
                    event = named(fields)
                    out.setdefault(event["sku"], []).append(event)
            return out

        return self.run(read())

    def close(self) -> None:
        self.run(self.client.aclose())
        self.loop.close()


@pytest.fixture
def harness(settings: Settings) -> Iterator[Harness]:
    h = Harness(settings)
    yield h
    h.close()


class StockMachine(RuleBasedStateMachine):
    SHORT_TTL = False
    MAX_SLEEPS = 1

    def __init__(self, harness: Harness) -> None:
        super().__init__()
        self.h = harness
        self.engine = harness.engine
        self.h.flush()
        self.model = StockModel()
        self.requests: dict[str, tuple[str, dict[str, int]]] = {}  # last acquire per order
        self.tried: set[str] = set()
        self.sleeps = 0
        self.short: set[tuple[str, str]] = set()  # lines reserved with a 1 s TTL
        self.event_counts = Counter[str]()

    # -- calling and checking ----------------------------------------------

    def call(self, outcome: Outcome, coro: Awaitable[Any]) -> Any:
        name = getattr(coro, "__name__", "call")
        kind = outcome.error.__name__ if outcome.error else ("replay" if outcome.replay else "ok")
        SEEN[f"{name}: {kind}"] += 1
        try:
            result, error = self.h.run(coro), None
        except StockError as exc:
            result, error = None, exc
        if outcome.error is None:
            assert error is None, f"expected success, engine raised {error!r}"
            if hasattr(result, "replay"):
                assert result.replay == outcome.replay, (result, outcome)
            outcome.apply(result)
        elif not (
            # a cluster checks the order's directory after its bucket groups: a reused
            # order id whose request is also short answers insufficient_stock
            # (lua/README.md, "Orders on a Redis Cluster")
            self.h.cluster
            and isinstance(error, InsufficientStock)
            and (
                outcome.error is OrderConflict
                or (outcome.error is InvalidTransition and outcome.short)
            )
        ):
            assert isinstance(error, outcome.error), (
                f"expected {outcome.error.__name__}, got {error!r}"
            )
            if outcome.error is InvalidTransition:
                assert error.details["state"] in outcome.states, error.details
            if outcome.error is InsufficientStock and "items" in error.details:
                assert {i["sku"] for i in error.details["items"]} == outcome.short, error.details
        self.check_events(outcome, refused=error is not None, settled=name == "deduct")
        return result

    def check_events(self, outcome: Outcome, refused: bool, settled: bool = False) -> None:
        """Exactly one delta event per changed counter set, none on a replay or refusal.
        (On a cluster a multi-group deduct holds, then confirms: two per line; a
        conflict found at the commit undoes the groups: two per line.)"""
        events = self.h.events()
        counts = Counter({sku: len(evs) for sku, evs in events.items()})
        for sku in SKUS:
            gained = counts[sku] - self.event_counts[sku]
            expected = 0 if refused else outcome.events.get(sku, 0)
            if self.h.cluster and settled and not refused:
                # (one group: one atomic deduct.lua; several: hold, then confirm)
                assert gained in (expected, 2 * expected), (sku, gained, expected)
            elif (
                refused
                and self.h.cluster
                and (outcome.compensated or outcome.error is OrderConflict)
            ):
                # a group that went through was reserved, then aborted: 2 events
                # (for a confirm: expired lines re-acquired, then expired again)
                assert gained % 2 == 0, (sku, gained)
            elif outcome.held and self.h.cluster:
                # a multi-node confirm/release/extend first holds its lines: an expired
                # line re-acquired or a reserved one extended adds one event
                assert gained in (expected, expected + 1), (sku, gained, expected)
            else:
                assert gained == expected, (sku, gained, expected)
        self.event_counts = counts

    # -- rules: stock levels -------------------------------------------------

    @initialize(stock=st.fixed_dictionaries({s: st.integers(-2, 12) for s in SKUS}), data=st.data())
    def load(self, stock: dict[str, int], data: st.DataObject) -> None:
        """Initial stock; a SKU drawn negative stays unknown (get_stock: NotFound).

        With SHORT_TTL, then reserve a few orders for 1 s, wait until they are
        due and reap them, so that every example starts with EXPIRED lines.
        """
        for sku, available in stock.items():
            if available >= 0:
                self.set_stock(sku, available)
        if self.SHORT_TTL:
            early = data.draw(st.dictionaries(order_st, items_st, min_size=1, max_size=3))
            for order_id, items in early.items():
                self._acquire("reserve", order_id, dict(items), 1)
            if self._short_due():
                self.expire()
            # a sale elsewhere took some of the returned stock: late confirms may fail
            for sku in SKUS:
                if data.draw(st.booleans()):
                    self.set_stock(sku, data.draw(st.integers(0, 3)))

    @rule(sku=sku_st, available=st.integers(0, 12))
    def set_stock(self, sku: str, available: int) -> None:
        self.call(self.model.plan_set(sku, available), self.engine.set_stock(sku, available))

    @rule(sku=sku_st, delta=st.integers(-4, 4), cas=st.sampled_from([None, "ok", "stale"]))
    def adjust(self, sku: str, delta: int, cas: str | None) -> None:
        current = self.model.counters(sku).available
        expected = None if cas is None else current + (cas == "stale")
        outcome = self.model.plan_adjust(sku, delta, expected)
        self.call(outcome, self.engine.adjust(sku, delta, expected_available=expected))

    # -- rules: orders ---------------------------------------------------------

    def _ttl(self, data: int) -> int | None:
        if self.SHORT_TTL:
            return 1 if data else 900
        return [None, 60, 900][data % 3]

    def _acquire(self, kind: str, order_id: str, items: dict[str, int], ttl: int | None) -> None:
        self.requests[order_id] = (kind, items)
        self.tried.add(order_id)
        outcome = self.model.plan_acquire(kind, order_id, items)
        payload = [{"sku": s, "qty": q} for s, q in items.items()]
        random.Random(len(self.tried)).shuffle(payload)  # the spec is canonical anyway
        if kind == "reserve":
            result = self.call(outcome, self.engine.reserve(order_id, payload, ttl_s=ttl))
        else:
            result = self.call(outcome, self.engine.deduct(order_id, payload))
        if result is not None:
            assert {(ln.sku, ln.qty) for ln in result.lines} == set(items.items())
            if ttl == 1 and not result.replay:
                self.short.update((order_id, sku) for sku in items)

    @rule(order_id=order_st, items=items_st, ttl=st.integers(0, 5))
    def reserve(self, order_id: str, items: list[tuple[str, int]], ttl: int) -> None:
        self._acquire("reserve", order_id, dict(items), self._ttl(ttl))

    @rule(order_id=order_st, items=items_st)
    def deduct(self, order_id: str, items: list[tuple[str, int]]) -> None:
        self._acquire("deduct", order_id, dict(items), None)

    @precondition(lambda self: self.requests)
    @rule(data=st.data())
    def retry(self, data: st.DataObject) -> None:
        """The same request again (a client retry after a timeout)."""
        order_id = data.draw(st.sampled_from(sorted(self.requests)))
        kind, items = self.requests[order_id]
        self._acquire(kind, order_id, items, self._ttl(data.draw(st.integers(0, 5))))

    def _pick_order(self, data: st.DataObject) -> str:
        """Mostly an order the model knows, sometimes any id of the pool."""
        known = sorted(self.model.orders)
        if known and data.draw(st.integers(0, 4)):
            return data.draw(st.sampled_from(known))
        return data.draw(order_st)

    @rule(data=st.data())
    def confirm(self, data: st.DataObject) -> None:
        order_id = self._pick_order(data)
        self.call(self.model.plan_transition("confirm", order_id), self.engine.confirm(order_id))

    @rule(data=st.data())
    def release(self, data: st.DataObject) -> None:
        order_id = self._pick_order(data)
        self.call(self.model.plan_transition("release", order_id), self.engine.release(order_id))

    @rule(data=st.data())
    def cancel(self, data: st.DataObject) -> None:
        order_id = self._pick_order(data)
        self.call(self.model.plan_transition("cancel", order_id), self.engine.cancel(order_id))

    @rule(data=st.data(), ttl=st.sampled_from([30, 600]))
    def extend(self, data: st.DataObject, ttl: int) -> None:
        order_id = self._pick_order(data)
        outcome = self.model.plan_transition("extend", order_id)
        if self.call(outcome, self.engine.extend(order_id, ttl)) is not None:
            self.short = {(o, s) for o, s in self.short if o != order_id}

    def _short_due(self) -> list[int]:
        return [ln.expires_ms for o, ln in self.model.reserved_lines() if (o, ln.sku) in self.short]

    # -- rules: expiry ----------------------------------------------------------

    @rule()
    def reap(self) -> None:
        self._reap()

    @precondition(
        lambda self: self.SHORT_TTL and self.sleeps < self.MAX_SLEEPS and self._short_due()
    )
    @rule()
    def expire(self) -> None:
        """Wait until the earliest reservation is due (1 s TTL), then reap."""
        due = min(self._short_due())
        wait = (due - self.h.server_ms()) / 1000 + 0.005
        if wait > 0:
            time.sleep(min(wait, 1.1))
        self.sleeps += 1
        self._reap()

    def _reap(self) -> None:
        before = self.h.server_ms()
        expired = self.h.run(self.h.reaper.reap_once())
        after = self.h.server_ms()
        gone = []
        for order_id, line in self.model.reserved_lines():
            if line.expires_ms <= before:
                gone.append((order_id, line.sku))
            elif line.expires_ms <= after:  # due during the pass: ask the engine
                record = self.h.run(self.engine.get_order(order_id))
                states = {ln.sku: ln.state for ln in record["lines"]}
                if states[line.sku] == EXPIRED:
                    gone.append((order_id, line.sku))
        assert expired == len(gone), (expired, gone)
        SEEN[f"reap: {'expired' if gone else 'nothing'}"] += 1
        for order_id, sku in gone:
            self.model.expire(order_id, sku)
        self.check_events(Outcome(events=Counter(sku for _o, sku in gone)), refused=False)

    # -- invariants -----------------------------------------------------------

    @invariant()
    def counters_match_model(self) -> None:
        for sku in SKUS:
            try:
                got = self.h.run(self.engine.get_stock(sku))
            except NotFound:
                assert sku not in self.model.skus, f"{sku} vanished"
                continue
            want = self.model.counters(sku)
            assert (got.available, got.reserved, got.sold) == want.as_tuple(), sku
            assert min(got.available, got.reserved, got.sold) >= 0, got
            # conservation: only set_stock/adjust move available + reserved + sold
            assert want.total() == self.model.totals.get(sku, 0), sku

    @invariant()
    def orders_match_model(self) -> None:
        for order_id in sorted(self.tried):
            order = self.model.orders.get(order_id)
            if order is None:
                try:
                    record = self.h.run(self.engine.get_order(order_id))
                except NotFound:
                    continue
                tomb = self.model.tombstones.get(order_id)
                if tomb is not None and (record["phase"], record["lines"]) == (tomb, []):
                    continue  # a TCC tombstone: released or cancelled before any try
                raise AssertionError(f"refused order {order_id} left a record {record}")
            record = self.h.run(self.engine.get_order(order_id))
            assert record["kind"] == order.kind
            assert record["phase"] == "done"
            got = {ln.sku: (ln.state, ln.qty) for ln in record["lines"]}
            want = {ln.sku: (ln.state, ln.qty) for ln in order.lines.values()}
            assert got == want, order_id
            for line in record["lines"]:
                if line.state == RESERVED:
                    assert line.expires_ms == order.lines[line.sku].expires_ms

    @invariant()
    def events_replay_to_counters(self) -> None:
        for sku, events in self.h.events().items():
            assert [int(e["seq"]) for e in events] == list(range(1, len(events) + 1)), sku
            if events:
                last = events[-1]
                want = self.model.counters(sku).as_tuple()
                assert (int(last["available"]), int(last["reserved"]), int(last["sold"])) == want
            for e in events:
                assert min(int(e["available"]), int(e["reserved"]), int(e["sold"])) >= 0, e


class StockMachineWithExpiry(StockMachine):
    SHORT_TTL = True


def run_machine(
    machine: type[StockMachine], harness: Harness, examples: int, steps: int, shrink: bool = True
) -> None:
    SEEN.clear()
    run_state_machine_as_test(
        lambda: machine(harness),
        settings=hsettings(
            max_examples=examples,
            stateful_step_count=steps,
            deadline=None,
            suppress_health_check=[HealthCheck.too_slow],
            phases=list(Phase) if shrink else [p for p in Phase if p is not Phase.shrink],
        ),
    )
    print(f"\n{machine.__name__} on {harness.settings.redis_url}:")
    for what, n in sorted(SEEN.items()):
        print(f"  {what:40} {n}")


def test_engine_follows_model(harness: Harness) -> None:
    run_machine(StockMachine, harness, examples=120, steps=40)


def test_engine_follows_model_with_expiry(harness: Harness) -> None:
    # no shrinking: every example sleeps about 1 s, a shrink would take minutes
    run_machine(StockMachineWithExpiry, harness, examples=6, steps=40, shrink=False)


async def test_late_confirm_is_all_or_nothing(engine: StockEngine, settings: Settings) -> None:
    """A late confirm of an order whose lines all EXPIRED, when one SKU has sold out
    meanwhile, must fail reservation_expired and change nothing (both backends).

    A and B live in different buckets (on a cluster: different nodes), so the
    cluster confirms them in two script calls.
    """
    assert keys.bucket_of("A", settings.buckets) != keys.bucket_of("B", settings.buckets)
    reaper = Reaper(engine.redis, settings, engine.scripts)
    await engine.set_stock("A", 2)
    await engine.set_stock("B", 2)
    reserved = await engine.reserve("late", [{"sku": "A", "qty": 2}, {"sku": "B", "qty": 2}], 1)
    await asyncio.sleep(max(0.0, (reserved.expires_ms - await reaper.server_ms()) / 1000) + 0.01)
    assert await reaper.reap_once() == 2
    await engine.deduct("other", [{"sku": "B", "qty": 1}])  # B sold meanwhile: 1 left
    with pytest.raises(ReservationExpired):
        await engine.confirm("late")
    order = await engine.get_order("late")
    assert {ln.sku: ln.state for ln in order["lines"]} == {"A": EXPIRED, "B": EXPIRED}
    a, b = await engine.get_stock("A"), await engine.get_stock("B")
    assert (a.available, a.reserved, a.sold) == (2, 0, 0)
    assert (b.available, b.reserved, b.sold) == (1, 0, 1)
