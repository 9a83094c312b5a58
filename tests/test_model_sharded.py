"""The model-based test (tests/test_model.py) with SKU "A" sharded (DESIGN §12), on
both backends: the answers, counters and order lines of a sharded SKU follow the
same model as an ordinary SKU's.

What differs, on purpose: "A"'s events live in its shards' streams and include the
moves between shards (``adjust``, reason ``move ...``), so A's event counts and
stream replay are not compared (its counters and lines are, after every step).
On a cluster an order that has to pull units in for "A" is tried again, and each
try that fails reserves and undoes its other bucket groups (a ``reserve`` and an
``abort`` event more on those SKUs), so the event counts are compared on
standalone only; every stream still replays to the model's counters. A
compare-and-set adjust (``expected_available``) is refused on a sharded SKU, so
the machine sends none for "A".
"""

from __future__ import annotations

from collections import Counter

from hypothesis import strategies as st
from hypothesis.stateful import invariant, rule

from tests.support.model import Outcome
from tests.test_model import SEEN, SKUS, Harness, StockMachine, harness, run_machine, sku_st

__all__ = ["harness"]  # the fixture, for the tests below

SHARDED = "A"
SHARDS = 4


class ShardedStockMachine(StockMachine):
    """StockMachine with "A" split into SHARDS shards as soon as it exists."""

    def __init__(self, h: Harness) -> None:
        super().__init__(h)
        self.sharded = False

    @rule(sku=sku_st, available=st.integers(0, 12))
    def set_stock(self, sku: str, available: int) -> None:
        super().set_stock(sku, available)
        if sku == SHARDED and not self.sharded:
            assert self.h.run(self.engine.set_shards(SHARDED, SHARDS)) == SHARDS
            self.sharded = True
            SEEN["set_shards"] += 1

    @rule(sku=sku_st, delta=st.integers(-4, 4), cas=st.sampled_from([None, "ok", "stale"]))
    def adjust(self, sku: str, delta: int, cas: str | None) -> None:
        super().adjust(sku, delta, None if sku == SHARDED else cas)

    def check_events(self, outcome: Outcome, refused: bool, settled: bool = False) -> None:
        events = self.h.events()
        counts = Counter({sku: len(evs) for sku, evs in events.items()})
        if not self.h.cluster:
            for sku in SKUS:
                if sku == SHARDED:
                    continue
                gained = counts[sku] - self.event_counts[sku]
                expected = 0 if refused else outcome.events.get(sku, 0)
                assert gained == expected, (sku, gained, expected)
        self.event_counts = counts

    @invariant()
    def events_replay_to_counters(self) -> None:
        for sku, events in self.h.events().items():
            if sku == SHARDED or "#" in sku:
                continue
            assert [int(e["seq"]) for e in events] == list(range(1, len(events) + 1)), sku
            if events:
                last = events[-1]
                want = self.model.counters(sku).as_tuple()
                assert (int(last["available"]), int(last["reserved"]), int(last["sold"])) == want


class ShardedStockMachineWithExpiry(ShardedStockMachine):
    SHORT_TTL = True


def test_engine_follows_model_with_a_sharded_sku(harness: Harness) -> None:
    run_machine(ShardedStockMachine, harness, examples=60, steps=30)


def test_engine_follows_model_with_a_sharded_sku_and_expiry(harness: Harness) -> None:
    run_machine(ShardedStockMachineWithExpiry, harness, examples=4, steps=30, shrink=False)
