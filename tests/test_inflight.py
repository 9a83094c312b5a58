"""The cluster's in-flight bound (``stock.orders.core.InFlight``): its quick uncontended
path keeps the semaphore's meaning: never more than its size inside, first come
first served, a cancelled waiter gives nothing away."""

from __future__ import annotations

import asyncio

from stock.orders.core import InFlight


async def test_never_more_inside_than_the_bound_and_every_slot_comes_back() -> None:
    bound, inside, most = InFlight(3), 0, 0

    async def one() -> None:
        nonlocal inside, most
        async with bound:
            inside += 1
            most = max(most, inside)
            await asyncio.sleep(0.001)
            inside -= 1

    await asyncio.gather(*(one() for _ in range(20)))
    assert most == 3
    assert bound._value == 3 and not bound._waiters


async def test_waiters_go_in_turn_and_a_cancelled_one_takes_no_slot() -> None:
    bound, order = InFlight(1), []

    async def one(name: str) -> None:
        async with bound:
            order.append(name)
            await asyncio.sleep(0.001)

    await bound.acquire()  # held: everyone below waits
    tasks = [asyncio.create_task(one(name)) for name in "abc"]
    await asyncio.sleep(0)
    tasks[1].cancel()
    bound.release()
    await asyncio.gather(*tasks, return_exceptions=True)
    assert order == ["a", "c"]
    assert bound._value == 1 and not bound._waiters
