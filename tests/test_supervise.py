"""The background-loop supervisor: errors back off and go on, a loop that ends is
restarted and counted (pure asyncio; no servers)."""

from __future__ import annotations

import asyncio

from stock.http.metrics import Metrics
from stock.loops.supervise import Backoff, run_loop, supervise


def test_backoff_doubles_to_its_cap_with_jitter_and_resets() -> None:
    backoff = Backoff(0.1, cap_s=1.0)
    delays = [backoff.delay() for _ in range(8)]
    assert 0.05 <= delays[0] <= 0.15
    assert all(d <= 1.0 for d in delays)
    assert delays[-1] >= 0.5  # at the cap, scaled by 0.5..1.5, capped
    backoff.reset()
    assert backoff.delay() <= 0.15


async def test_run_loop_survives_every_kind_of_error() -> None:
    metrics = Metrics()
    stop = asyncio.Event()
    errors = iter([AttributeError("x"), RuntimeError("y"), KeyError("z"), OSError("w")])
    passes = 0

    async def step() -> bool:
        nonlocal passes
        passes += 1
        error = next(errors, None)
        if error is not None:
            raise error
        if passes >= 8:
            stop.set()
        return False

    healthy = await asyncio.wait_for(
        run_loop("probe", step, stop, idle_s=0.01, counters=metrics), 10
    )
    assert healthy and passes == 8
    text = metrics.render().decode()
    assert 'stock_loop_errors_total{loop="probe"} 4.0' in text


async def test_supervise_restarts_a_loop_that_ends_and_counts_it() -> None:
    metrics = Metrics()
    stop = asyncio.Event()
    runs = 0

    async def run() -> None:
        nonlocal runs
        runs += 1
        if runs == 1:
            return  # ended by itself: a bug, or an escaped BaseException
        if runs == 2:
            raise RuntimeError("loop crashed")
        stop.set()

    await asyncio.wait_for(
        supervise("probe", run, stop, counters=metrics, first_backoff_s=0.01), 10
    )
    assert runs == 3
    assert 'stock_loop_restarts_total{loop="probe"} 2.0' in metrics.render().decode()
