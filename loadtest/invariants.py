"""The load test's checks once locust has stopped: the stock invariants per SKU from
the API, what clients were told against the counters, the per-customer limit, the
lost payment callbacks reconciled, and PostgreSQL against Redis once the writer has
drained."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import time
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from loadtest.locust_driver import LIMIT, ROOT, Service, api


@dataclass
class Verdict:
    """Failed checks (the run FAILs when there is one) and notes, printed at the end."""

    failures: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def check(self, ok: bool, message: str) -> None:
        if not ok:
            self.failures.append(message)


def restocks(
    entries: list[dict[str, Any]], ledger_reasons: set[str] | None
) -> tuple[dict[str, int], int]:
    """Restocked units per SKU; an adjust whose answer was lost counts if the ledger has it.
    Returns (units per SKU, adjusts whose outcome stays unknown)."""
    sent = {e["reason"]: e for e in entries if e["kind"] == "adjust" and e["outcome"] == "sent"}
    ok = {e["reason"] for e in entries if e["kind"] == "adjust" and e["outcome"] == "ok"}
    added: dict[str, int] = defaultdict(int)
    unknown = 0
    for reason, entry in sent.items():
        if reason in ok or (ledger_reasons is not None and reason in ledger_reasons):
            added[entry["sku"]] += entry["delta"]
        elif ledger_reasons is None:
            unknown += 1
    return added, unknown


Levels = dict[str, Any]  # sku -> its stock_levels row


async def pg_checks(
    dsn: str,
    skus: list[str],
    redis_side: dict[str, dict[str, int]],
    verdict: Verdict,
    wait_s: float,
) -> set[str]:
    """PostgreSQL against Redis, once the writer has drained; returns the ledger's
    adjust reasons of this run."""
    import asyncpg

    conn = await asyncpg.connect(dsn)
    try:
        pg = await _levels_equal(conn, skus, redis_side, verdict, wait_s)
        await _ledger_without_gaps(conn, skus, pg, verdict)
        await _lines_add_up(conn, skus, pg, verdict)
        overdue = await conn.fetchval(
            "SELECT count(*) FROM reservation_lines WHERE sku = any($1::text[])"
            " AND state = 'reserved' AND expires_at < now() - interval '5 seconds'",
            skus,
        )
        verdict.check(overdue == 0, f"{overdue} reserved lines are more than 5 s past expiry")
        reasons = await conn.fetch(
            "SELECT reason FROM stock_ledger WHERE sku = any($1::text[]) AND op = 'adjust'",
            skus,
        )
        return {r["reason"] for r in reasons}
    finally:
        await conn.close()


async def _levels_equal(
    conn: Any,
    skus: list[str],
    redis_side: dict[str, dict[str, int]],
    verdict: Verdict,
    wait_s: float,
) -> Levels:
    """Wait up to ``wait_s`` for ``stock_levels`` to equal Redis; returns its rows."""
    deadline = time.monotonic() + wait_s
    while True:
        rows = await conn.fetch(
            "SELECT sku, available, reserved, sold, seq FROM stock_levels"
            " WHERE sku = any($1::text[])",
            skus,
        )
        pg = {r["sku"]: r for r in rows}
        differ = [
            s
            for s in skus
            if s not in pg
            or (pg[s]["available"], pg[s]["reserved"], pg[s]["sold"])
            != (redis_side[s]["available"], redis_side[s]["reserved"], redis_side[s]["sold"])
        ]
        if not differ or time.monotonic() > deadline:
            break
        await asyncio.sleep(0.25)
    drained = time.monotonic() - (deadline - wait_s)
    verdict.notes.append(
        f"PostgreSQL stock_levels == Redis for {len(skus) - len(differ)} of {len(skus)} "
        f"SKUs, {drained:.1f} s after the checks began"
    )
    for sku in differ:
        got = tuple(pg[sku][k] for k in ("available", "reserved", "sold")) if sku in pg else None
        verdict.failures.append(
            f"{sku}: PostgreSQL {got} != Redis {tuple(redis_side[sku].values())}"
        )
    return pg


async def _ledger_without_gaps(conn: Any, skus: list[str], pg: Levels, verdict: Verdict) -> None:
    """One ledger row per event: ``seq`` 1..n, no gap, no duplicate, and the last one
    is the level's."""
    ledger = await conn.fetch(
        "SELECT sku, count(*) AS n, count(DISTINCT seq) AS d, min(seq) AS lo, max(seq) AS hi"
        " FROM stock_ledger WHERE sku = any($1::text[]) GROUP BY sku",
        skus,
    )
    rows_total = 0
    for r in ledger:
        rows_total += r["n"]
        level = pg.get(r["sku"])
        verdict.check(
            r["n"] == r["d"] == r["hi"]
            and r["lo"] == 1
            and level is not None
            and level["seq"] == r["hi"],
            f"{r['sku']}: ledger has {r['n']} rows, seq {r['lo']}..{r['hi']} "
            f"({r['d']} distinct), stock_levels seq {level['seq'] if level else None}",
        )
    verdict.notes.append(f"ledger: {rows_total} rows, one per event, seq without gaps")


async def _lines_add_up(conn: Any, skus: list[str], pg: Levels, verdict: Verdict) -> None:
    """``reservation_lines`` adds up to the levels' reserved and sold counters."""
    lines = await conn.fetch(
        "SELECT sku, state, sum(qty) AS q, count(*) AS n FROM reservation_lines"
        " WHERE sku = any($1::text[]) GROUP BY sku, state",
        skus,
    )
    by_state: dict[str, dict[str, int]] = defaultdict(lambda: defaultdict(int))
    counts: dict[str, int] = defaultdict(int)
    for r in lines:
        by_state[r["sku"]][r["state"]] = int(r["q"])
        counts[r["state"]] += int(r["n"])
    for sku in skus:
        if sku not in pg:
            continue
        verdict.check(
            by_state[sku]["reserved"] == pg[sku]["reserved"]
            and by_state[sku]["confirmed"] == pg[sku]["sold"],
            f"{sku}: reservation_lines reserved {by_state[sku]['reserved']} / confirmed "
            f"{by_state[sku]['confirmed']}, stock_levels reserved {pg[sku]['reserved']} "
            f"/ sold {pg[sku]['sold']}",
        )
    verdict.notes.append(
        "reservation_lines: " + ", ".join(f"{k} {v}" for k, v in sorted(counts.items()))
    )


def check(
    service: Service,
    loaded: dict[str, int],
    flash: list[str],
    journal: list[dict[str, Any]],
    verdict: Verdict,
    drain_s: float,
) -> dict[str, dict[str, int]]:
    """The invariants of every SKU from the API's counters (and PostgreSQL's, when there
    is a DSN); returns the counters."""
    skus = sorted(loaded)
    levels = {}
    for sku in skus:
        body = api(service, "GET", f"/v1/stock/{sku}")
        levels[sku] = {k: int(body[k]) for k in ("available", "reserved", "sold")}
    reasons: set[str] | None = None
    if service.dsn:
        reasons = asyncio.run(pg_checks(service.dsn, skus, levels, verdict, drain_s))
    else:
        verdict.notes.append("PostgreSQL checks SKIPPED: no STOCK_DATABASE_URL")
    added, unknown = restocks(journal, reasons)
    verdict.check(unknown == 0, f"{unknown} restocks with an unknown outcome (no ledger)")
    confirmed: dict[str, int] = defaultdict(int)
    for e in {(e["order"], e["sku"], e["qty"]) for e in journal if e["kind"] == "confirmed"}:
        confirmed[e[1]] += e[2]
    refunded: dict[str, int] = defaultdict(int)
    for e in {(e["order"], e["sku"], e["qty"]) for e in journal if e["kind"] == "cancel"}:
        refunded[e[1]] += e[2]
    for sku in skus:
        lv = levels[sku]
        total = loaded[sku] + added[sku]
        verdict.check(min(lv.values()) >= 0, f"{sku}: a negative counter {lv}")
        verdict.check(
            sum(lv.values()) == total,
            f"{sku}: available+reserved+sold = {sum(lv.values())}, loaded+restocked = {total}",
        )
        cap = loaded[sku] if sku in flash else total
        verdict.check(lv["sold"] <= cap, f"{sku}: sold {lv['sold']} > {cap} it had")
        verdict.check(
            confirmed[sku] - refunded[sku] <= lv["sold"],
            f"{sku}: clients were told {confirmed[sku]} units confirmed "
            f"(at most {refunded[sku]} refunded) but sold is {lv['sold']}",
        )
    return levels


def check_limits(journal: list[dict[str, Any]], verdict: Verdict) -> None:
    """No customer bought more of a limited SKU than its limit (nothing is refunded
    there, so held + bought is what was confirmed)."""
    bought: dict[str, int] = defaultdict(int)
    for e in journal:
        if e["kind"] == "confirmed" and "customer" in e:
            bought[e["customer"]] += e["qty"]
    over = {c: n for c, n in bought.items() if n > LIMIT}
    verdict.check(not over, f"customers past the per-customer limit {LIMIT}: {over}")
    verdict.notes.append(
        f"limited SKU: {len(bought)} customers bought {sum(bought.values())} units, "
        f"at most {max(bought.values(), default=0)} each (limit {LIMIT})"
    )


def reconcile_lost_callbacks(
    service: Service, journal: list[dict[str, Any]], workdir: Path, verdict: Verdict
) -> list[dict[str, Any]]:
    """The lost callbacks' orders, marked paid in a payment export, through
    ``stock reconcile-payments --repair``: each must end confirmed or refund_needed,
    and a second run must change nothing. Returns journal entries of the confirmed."""
    lost = {e["order"]: e for e in journal if e["kind"] == "lost_callback"}
    if not lost or not service.dsn or not service.redis_url:
        verdict.notes.append("reconcile-payments SKIPPED: no lost callbacks, DSN or Redis URL")
        return []
    export = workdir / "payments.csv"
    export.write_text("order_id,status\n" + "".join(f"{o},paid\n" for o in lost))
    env = dict(os.environ, STOCK_REDIS_URL=service.redis_url, STOCK_DATABASE_URL=service.dsn)
    command = [sys.executable, "-m", "stock.app.cli", "reconcile-payments", str(export), "--json"]
    runs = [
        subprocess.run(
            [*command, "--repair"],
            cwd=ROOT,
            env=env,
            capture_output=True,
            text=True,
            timeout=300,
            check=False,
        )
        for _ in range(2)
    ]
    first, second = ([json.loads(line) for line in r.stdout.splitlines()] for r in runs)
    actions: dict[str, int] = defaultdict(int)
    for finding in first:
        actions[f"{finding['outcome']}/{finding['action']}"] += 1
    verdict.check(
        set(actions)
        <= {
            "ok/none",
            "paid_not_sold/confirmed",
            "paid_still_reserved/confirmed",
            "paid_not_sold/refund_needed",
        },
        f"reconcile-payments: unexpected findings {dict(actions)} ({runs[0].stderr[-300:]})",
    )
    again = {f["action"] for f in second}
    verdict.check(again <= {"none", "refund_needed"}, f"reconcile-payments repaired again: {again}")
    verdict.notes.append(f"lost callbacks: {len(lost)} paid orders reconciled: {dict(actions)}")
    return [
        {
            "kind": "confirmed",
            "order": f["order_id"],
            "sku": lost[f["order_id"]]["sku"],
            "qty": lost[f["order_id"]]["qty"],
        }
        for f in first
        if f["action"] == "confirmed"
    ]
