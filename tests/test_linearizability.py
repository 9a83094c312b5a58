"""The history checker (tests/linearizability.py) on hand-made histories: it accepts
the good ones and rejects an oversell, a double confirm, a stale read, an operation
that un-happens, and a refusal that names the wrong stock."""

from __future__ import annotations

import random
import time

from tests.linearizability import Op, State, answer, check

CREATED, REPLAY, OK = ("created",), ("replay",), ("ok",)


def op(kind: str, t0: float, t1: float, result: object, order: str = "", qty: int = 0) -> Op:
    """An operation on SKU "A" invoked at t0 and answered at t1 (result None: unknown)."""
    return Op(kind, "A", t0, t1, result, order, qty)  # type: ignore[arg-type]


def read(t0: float, t1: float, a: int, r: int = 0, s: int = 0) -> Op:
    return op("read", t0, t1, ("ok", a, r, s))


def test_sequential_checkout_is_accepted() -> None:
    history = [
        op("reserve", 0, 1, CREATED, "o1", 2),
        read(2, 3, 3, 2, 0),
        op("reserve", 4, 5, REPLAY, "o1", 2),  # a retry replays
        op("confirm", 6, 7, OK, "o1"),
        op("confirm", 8, 9, OK, "o1"),  # and so does a second confirm
        op("cancel", 10, 11, OK, "o1"),
        op("release", 12, 13, ("invalid_transition", "cancelled"), "o1"),
        op("deduct", 14, 15, ("insufficient_stock", 5), "o2", 6),
        op("adjust", 16, 17, ("ok", 8, 0, 0), qty=3),
        op("deduct", 18, 19, CREATED, "o2", 6),
        op("reserve", 20, 21, ("order_conflict",), "o2", 6),
        read(22, 23, 2, 0, 6),
    ]
    verdict = check(history, available=5)
    assert verdict.ok, verdict.explain()


def test_concurrent_operations_may_take_effect_in_another_order() -> None:
    """Two buyers race for the last unit; the later-invoked one wins. A read concurrent
    with both may see either side of either."""
    history = [
        op("reserve", 0, 10, ("insufficient_stock", 0), "o1", 1),
        op("reserve", 1, 5, CREATED, "o2", 1),
        read(2, 3, 1, 0, 0),  # before o2 took effect
        read(6, 7, 0, 1, 0),
    ]
    assert check(history, available=1).ok


def test_oversell_is_rejected() -> None:
    history = [
        op("reserve", 0, 2, CREATED, "o1", 1),
        op("reserve", 1, 3, CREATED, "o2", 1),  # only one unit
    ]
    verdict = check(history, available=1)
    assert not verdict.ok
    assert "model: ('insufficient_stock', 0)" in verdict.explain()


def test_double_confirm_is_rejected() -> None:
    """Both confirms answer 200 (a replay is 200 too), but sold counts the unit twice."""
    history = [
        op("reserve", 0, 1, CREATED, "o1", 1),
        op("confirm", 2, 4, OK, "o1"),
        op("confirm", 3, 5, OK, "o1"),
        read(6, 7, 4, -1, 2),
    ]
    assert not check(history, available=5).ok
    history[-1] = read(6, 7, 4, 0, 1)
    assert check(history, available=5).ok


def test_order_created_twice_is_rejected() -> None:
    history = [
        op("deduct", 0, 1, CREATED, "o1", 1),
        op("deduct", 2, 3, CREATED, "o1", 1),  # must be a replay
    ]
    assert not check(history, available=5).ok


def test_stale_read_after_a_completed_write_is_rejected() -> None:
    write = op("adjust", 0, 1, ("ok", 15, 0, 0), qty=5)
    assert not check([write, read(2, 3, 10)], available=10).ok  # invoked after it returned
    assert check([write, read(0.5, 3, 10)], available=10).ok  # concurrent: either value


def test_wrong_available_in_a_refusal_is_rejected() -> None:
    history = [
        op("reserve", 0, 1, CREATED, "o1", 2),
        op("reserve", 2, 3, ("insufficient_stock", 3), "o2", 9),
    ]
    assert not check(history, available=3).ok
    history[1] = op("reserve", 2, 3, ("insufficient_stock", 1), "o2", 9)
    assert check(history, available=3).ok


def test_unknown_outcome_may_or_may_not_have_happened_but_not_both() -> None:
    lost = op("reserve", 0, 1, None, "o1", 2)  # e.g. the API process was killed
    assert check([lost, read(2, 3, 5)], available=5).ok  # never happened
    assert check([lost, read(2, 3, 3, 2)], available=5).ok  # happened
    assert check([lost, read(2, 3, 5), read(4, 5, 3, 2)], available=5).ok  # happened late
    # once seen, it cannot un-happen
    assert not check([lost, read(2, 3, 3, 2), read(4, 5, 5)], available=5).ok
    retry = op("reserve", 6, 7, REPLAY, "o1", 2)  # a retry replays: it had happened
    assert check([lost, read(2, 3, 5), retry], available=5).ok
    assert not check([lost, read(4, 5, 5), retry, read(8, 9, 5)], available=5).ok


def test_unknown_reads_are_ignored() -> None:
    assert check([op("read", 0, 1, None), read(2, 3, 5)], available=5).ok


def test_a_few_hundred_concurrent_operations_check_quickly() -> None:
    """A random valid history: 400 operations on one SKU, each taking effect at a point
    inside its own interval (intervals overlapping up to ~8 deep), 3% of them with an
    unknown outcome; checked well within the time a test may take."""
    rng = random.Random(7)
    history = []
    state = State(50, 0, 0, (None,) * 100)
    at = 0.0
    for _ in range(400):
        at += rng.random()  # the effect points, in order
        order = rng.randrange(100)
        kind = rng.choice(["read", "reserve", "confirm", "release", "deduct", "cancel", "adjust"])
        qty = (rng.randint(-2, 3) or 1) if kind == "adjust" else rng.randint(1, 3)
        name = "" if kind in ("read", "adjust") else f"o{order}"
        result, state = answer(state, Op(kind, "A", 0, 0, None, name, qty), order)
        known = None if kind != "read" and rng.random() < 0.03 else result
        spread = rng.random() * 4
        invoke, ret = at - rng.random() * spread, at + rng.random() * spread
        history.append(Op(kind, "A", invoke, ret, known, name, qty))
    started = time.perf_counter()
    verdict = check(history, available=50)
    elapsed = time.perf_counter() - started
    print(f"{len(history)} operations checked in {elapsed:.3f} s, {verdict.explored} states")
    assert verdict.ok, verdict.explain()
    assert elapsed < 5.0


def test_tcc_tombstone_refuses_the_hanging_try() -> None:
    """A cancel that overtook its try leaves a tombstone: the try is refused; a try that
    held stock although it was refused (its hold seen by a read) is not linearizable."""
    good = [
        op("release", 0, 1, OK, "t1"),
        op("reserve", 2, 3, ("invalid_transition", "released"), "t1", 1),
        op("cancel", 4, 5, ("invalid_transition", "released"), "t1"),
        op("release", 6, 7, OK, "t1"),
        read(8, 9, 5),
    ]
    assert check(good, available=5).ok
    held = [
        op("release", 0, 1, OK, "t1"),
        op("reserve", 2, 6, ("invalid_transition", "released"), "t1", 1),
        read(3, 4, 4, 1, 0),  # the refused try's hold, seen
    ]
    assert not check(held, available=5).ok
    raced = [  # try and cancel at once: either order, each answer fits one
        op("deduct", 0, 5, CREATED, "t2", 1),
        op("cancel", 1, 4, OK, "t2"),
        read(6, 7, 5, 0, 0),
    ]
    assert check(raced, available=5).ok


def test_racing_attempts_of_one_order_id_both_refused_is_rejected() -> None:
    """A reserve and a deduct of one order id at once: one wins; both order_conflict is a
    conflict with an order that never existed."""
    both = [
        op("reserve", 0, 5, ("order_conflict",), "o1", 1),
        op("deduct", 1, 4, ("order_conflict",), "o1", 1),
    ]
    assert not check(both, available=5).ok
    one = [
        op("reserve", 0, 5, ("order_conflict",), "o1", 1),
        op("deduct", 1, 4, CREATED, "o1", 1),
    ]
    assert check(one, available=5).ok
