"""Model-based test of locations (DESIGN §13): hypothesis drives the real engine (standalone
and cluster) and a small model of one SKU's locations side by side: allocation by
strategy and pin, every transition on exactly the recorded allocations, adjust per
location, transfers. After every step each location's counters, the SKU's totals and
conservation (the sum over locations of available + reserved + sold, plus in transit,
moves only by adjust) must agree with the model."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from hypothesis import HealthCheck
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

from stock.core.errors import InsufficientStock, InvalidTransition, NotFound, OrderConflict
from stock.orders.locations import Locations
from tests.test_model import Harness, harness

__all__ = ["harness"]  # the fixture

SKU = "W"
PLACES = ["a", "b", "c"]
ORDERS = ["o0", "o1", "o2", "o3", "o4", "o5"]
TRANSFERS = ["t0", "t1", "t2"]
place_st = st.sampled_from(PLACES)
pin_st = st.one_of(st.just(""), place_st)


@dataclass
class Order:
    kind: str
    qty: int
    pin: str
    state: str
    allocs: list[tuple[str, int]] = field(default_factory=list)


class LocationModel:
    def __init__(self) -> None:
        self.at: dict[str, list[int]] = {}  # location -> [available, reserved, sold, in transit]
        self.strategy, self.order, self.split = "priority", list[str](), False
        self.orders: dict[str, Order] = {}
        self.transfers: dict[str, tuple[str, str, int, str]] = {}
        self.loaded = 0  # units brought in by adjust

    def candidates(self) -> list[str]:
        names = sorted(self.at)
        if self.strategy == "most_available":
            return sorted(names, key=lambda n: (-self.at[n][0], n))
        first = [n for n in dict.fromkeys(self.order) if n in self.at]
        return first + [n for n in names if n not in first]

    def allocate(self, qty: int, pin: str) -> list[tuple[str, int]] | None:
        if pin:
            return [(pin, qty)] if self.at.get(pin, [0])[0] >= qty else None
        if not self.split:
            for name in self.candidates():
                if self.at[name][0] >= qty:
                    return [(name, qty)]
            return None
        out, left = [], qty
        for name in self.candidates():
            take = min(self.at[name][0], left)
            if take > 0:
                out.append((name, take))
                left -= take
            if left == 0:
                return out
        return None

    def move(self, allocs: list[tuple[str, int]], da: int, dr: int, ds: int) -> None:
        for name, q in allocs:
            c = self.at.setdefault(name, [0, 0, 0, 0])
            c[0], c[1], c[2] = c[0] + da * q, c[1] + dr * q, c[2] + ds * q


def text(allocs: list[tuple[str, int]]) -> str:
    return ",".join(f"{n}:{q}" for n, q in allocs)


class LocationMachine(RuleBasedStateMachine):
    def __init__(self, harness: Harness) -> None:
        super().__init__()
        self.h, self.engine = harness, harness.engine
        self.locs = Locations(self.engine)
        self.h.flush()
        self.m = LocationModel()

    def expect(self, error: type[Exception] | None, coro: Any) -> Any:
        try:
            result = self.h.run(coro)
        except Exception as exc:
            assert error is not None and isinstance(exc, error), f"{exc!r}, wanted {error}"
            return None
        assert error is None, f"answered {result!r}, wanted {error}"
        return result

    @initialize(units=st.lists(st.integers(0, 6), min_size=3, max_size=3))
    def load(self, units: list[int]) -> None:
        for name, n in zip(PLACES, units, strict=True):
            self.h.run(self.locs.set(SKU, name, n))
            self.m.at[name] = [n, 0, 0, 0]
            self.m.loaded += n

    @rule(
        strategy=st.sampled_from(["priority", "most_available"]),
        order=st.permutations(PLACES),
        split=st.booleans(),
    )
    def allocation(self, strategy: str, order: list[str], split: bool) -> None:
        self.h.run(self.locs.set_allocation(SKU, strategy, order, split))
        self.m.strategy, self.m.order, self.m.split = strategy, list(order), split

    @rule(
        order_id=st.sampled_from(ORDERS),
        kind=st.sampled_from(["reserve", "deduct"]),
        qty=st.integers(1, 4),
        pin=pin_st,
    )
    def acquire(self, order_id: str, kind: str, qty: int, pin: str) -> None:
        item = {"sku": SKU, "qty": qty, **({"location": pin} if pin else {})}
        call = (
            self.engine.reserve(order_id, [item], 600)
            if kind == "reserve"
            else self.engine.deduct(order_id, [item])
        )
        known = self.m.orders.get(order_id)
        if known is not None:
            done = "R" if kind == "reserve" else "C"
            if known.kind != kind or known.qty != qty:
                self.expect(OrderConflict, call)
            elif known.state != done:
                self.expect(InvalidTransition, call)
            elif pin and pin != known.pin:
                self.expect(OrderConflict, call)
            else:
                result = self.expect(None, call)
                assert result.replay and result.lines[0].allocations == text(known.allocs)
            return
        allocs = self.m.allocate(qty, pin)
        if allocs is None:
            self.expect(InsufficientStock, call)
            return
        result = self.expect(None, call)
        assert result.lines[0].allocations == text(allocs)
        state = "R" if kind == "reserve" else "C"
        self.m.move(allocs, -1, 1 if state == "R" else 0, 1 if state == "C" else 0)
        self.m.orders[order_id] = Order(kind, qty, pin, state, allocs)

    @precondition(lambda self: self.m.orders)
    @rule(data=st.data(), op=st.sampled_from(["confirm", "release", "cancel"]))
    def transition(self, data: st.DataObject, op: str) -> None:
        order_id = data.draw(st.sampled_from(sorted(self.m.orders)))
        o = self.m.orders[order_id]
        call = getattr(self.engine, op)(order_id)
        moves = {  # (from state, kind) -> (to state, da, dr, ds)
            ("confirm", "R"): ("C", 0, -1, 1),
            ("release", "R"): ("X", 1, -1, 0),
            ("cancel", "C"): ("N", 1, 0, -1),
        }
        after = {"confirm": "C", "release": "X", "cancel": "N"}[op]
        if o.state == after:
            result = self.expect(None, call)
            assert result.replay and result.lines[0].allocations == text(o.allocs)
        elif (op, o.state) in moves and not (op == "release" and o.kind == "deduct"):
            result = self.expect(None, call)
            assert result.lines[0].allocations == text(o.allocs)
            o.state, da, dr, ds = moves[(op, o.state)]
            self.m.move(o.allocs, da, dr, ds)
        else:
            self.expect(InvalidTransition, call)

    @rule(where=place_st, delta=st.integers(-3, 4).filter(bool))
    def adjust(self, where: str, delta: int) -> None:
        c = self.m.at.setdefault(where, [0, 0, 0, 0])
        if c[0] + delta < 0:
            self.expect(InsufficientStock, self.locs.adjust(SKU, where, delta))
            return
        self.expect(None, self.locs.adjust(SKU, where, delta))
        c[0] += delta
        self.m.loaded += delta

    @rule(
        transfer_id=st.sampled_from(TRANSFERS),
        origin=place_st,
        to=place_st,
        qty=st.integers(1, 3),
    )
    def send(self, transfer_id: str, origin: str, to: str, qty: int) -> None:
        if origin == to:
            return
        call = self.locs.send(SKU, transfer_id, origin, to, qty)
        known = self.m.transfers.get(transfer_id)
        if known is not None:
            if known[:3] != (origin, to, qty):
                self.expect(OrderConflict, call)
            else:
                assert self.expect(None, call)["replay"]
            return
        if self.m.at[origin][0] < qty:
            self.expect(InsufficientStock, call)
            return
        self.expect(None, call)
        self.m.at[origin][0] -= qty
        self.m.at[origin][3] += qty
        self.m.transfers[transfer_id] = (origin, to, qty, "T")

    @rule(transfer_id=st.sampled_from(TRANSFERS))
    def receive(self, transfer_id: str) -> None:
        known = self.m.transfers.get(transfer_id)
        call = self.locs.receive(SKU, transfer_id)
        if known is None:
            self.expect(NotFound, call)
            return
        answer = self.expect(None, call)
        assert answer["replay"] == (known[3] == "D")
        if known[3] == "T":
            origin, to, qty, _ = known
            self.m.at[origin][3] -= qty
            self.m.at.setdefault(to, [0, 0, 0, 0])[0] += qty
            self.m.transfers[transfer_id] = (origin, to, qty, "D")

    @invariant()
    def agrees(self) -> None:
        view = self.h.run(self.locs.read(SKU))
        if not self.m.at:
            return
        got = {
            n: [c["available"], c["reserved"], c["sold"], c["in_transit"]]
            for n, c in view["locations"].items()
        }
        assert got == self.m.at
        transit = sum(c[3] for c in self.m.at.values())
        assert view["in_transit"] == transit
        totals = self.h.run(self.engine.get_stock(SKU))
        sums = [sum(c[i] for c in self.m.at.values()) for i in range(3)]
        assert [totals.available, totals.reserved, totals.sold] == sums
        assert sum(sums) + transit == self.m.loaded  # conservation


def test_locations_follow_model(harness: Harness) -> None:
    run_state_machine_as_test(
        lambda: LocationMachine(harness),
        settings=hsettings(
            max_examples=60,
            stateful_step_count=30,
            deadline=None,
            suppress_health_check=[HealthCheck.too_slow],
        ),
    )
