"""The history check, live: concurrent clients against two ``stock serve`` processes,
each SIGKILLed and restarted mid-run, on standalone Redis and on the cluster; every
SKU's history must be linearizable against the stock model (tests/linearizability.py).
"""

from __future__ import annotations

import time
from collections import Counter
from dataclasses import replace
from typing import Any

import pytest

from stock.config import Settings
from tests.history import Workload, record
from tests.linearizability import by_sku, check


@pytest.mark.faults
async def test_history_with_api_processes_killed_is_linearizable(
    settings: Settings, redis: Any
) -> None:
    workload = Workload(skus=["H1", "H2"], stock=10, duration_s=5.0, buyers=12)
    started = time.monotonic()
    history, api = await record(settings, workload)
    recorded = time.monotonic() - started
    assert api.kills == 2
    per_sku = by_sku(history)
    assert sorted(per_sku) == workload.skus
    unknown = Counter(op.note for op in history if op.result is None)
    kinds = Counter(op.kind for op in history)
    checked = time.monotonic()
    for sku, ops in per_sku.items():
        verdict = check(ops, workload.stock)
        assert verdict.ok, f"{sku}: {verdict.explain()}"
        assert len(ops) >= 50, f"{sku}: only {len(ops)} operations"
    print(
        f"{len(history)} operations ({dict(kinds)}; unknown: {dict(unknown)}) recorded in "
        f"{recorded:.1f} s, checked in {time.monotonic() - checked:.2f} s"
    )
    # the run did reach the interesting outcomes
    results = Counter(op.result[0] for op in history if op.result)
    assert results["created"] and results["insufficient_stock"] and results["ok"]
    # and the history binds: one refusal turned into a sale (an oversell) is caught
    refused = next(op for op in history if op.result and op.result[0] == "insufficient_stock")
    oversold = [replace(op, result=("created",)) if op is refused else op for op in history]
    assert not check(by_sku(oversold)[refused.sku], workload.stock).ok
