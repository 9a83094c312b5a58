"""``make loadtest``: run the locust flash-sale scenarios headless, then check the books.

Starts the embedded default (``stock dev`` on a free port: throwaway valkey-server
and PostgreSQL, the API with its reaper and writer), or uses the service at
``STOCK_URL`` (with ``STOCK_ADMIN_TOKEN``; ``STOCK_DATABASE_URL`` for the
PostgreSQL checks). Loads stock for this run's own SKUs through the admin API,
runs ``loadtest/locustfile.py`` for a bounded time and user count, waits for the
short reservations to expire, then checks for every SKU:

- conservation: available + reserved + sold == loaded + restocks (admin adjusts);
- nothing negative; sold never more than loaded + restocks (flash SKUs: loaded);
- every confirmation a client received is counted in ``sold`` (minus refunds);
- once the writer has drained: PostgreSQL ``stock_levels`` equals Redis (the API),
  the ledger has one row per event (``seq`` 1..n, no gap, no duplicate),
  ``reservation_lines`` adds up to the reserved and sold counters, and no line
  past its expiry is still reserved.

Prints PASS or FAIL with the counts and exits 1 on FAIL.

    python -m loadtest.run_loadtest [--users 200] [--spawn-rate 50] [--run-time 60]
"""

from __future__ import annotations

import argparse
import asyncio
import csv
import json
import os
import re
import secrets
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from loadtest.common import stop_process, wait_http
from stock.embedded import free_port

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
FLASH_UNITS = [20, 50, 100]
REGULAR_UNITS = 2000
REGULAR_COUNT = 12
LIMITED_UNITS = 500
LIMIT = 2  # per customer, on the limited SKU
SHORT_TTL_S = 2  # the longest TTL the scenarios leave to the reaper


@dataclass
class Service:
    """The service under test and what this script started for it."""

    url: str
    token: str
    dsn: str
    redis_url: str = ""
    proc: subprocess.Popen[bytes] | None = None
    log: Path | None = None


@dataclass
class Verdict:
    failures: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def check(self, ok: bool, message: str) -> None:
        if not ok:
            self.failures.append(message)


# -- the service -----------------------------------------------------------------


def start_dev(workdir: Path) -> Service:
    """``stock dev`` on a free port; its banner gives the Redis URL and the DSN."""
    port = free_port()
    token = secrets.token_urlsafe(16)
    log = workdir / "stock-dev.log"
    env = dict(os.environ)
    for name in ("STOCK_REDIS_URL", "STOCK_DATABASE_URL", "STOCK_REDIS_CLUSTER"):
        env.pop(name, None)
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "stock.cli", "dev", "--port", str(port), "--admin-token", token],
            cwd=ROOT,
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    service = Service(f"http://127.0.0.1:{port}", token, "", "", proc, log)
    deadline = time.monotonic() + 120
    while True:
        text = log.read_text(errors="replace")
        redis_url = re.search(r"Redis:\s+(\S+)", text)
        dsn = re.search(r"PostgreSQL:\s+(\S+)", text)
        if redis_url and dsn and "admin token:" in text:
            service.dsn, service.redis_url = dsn.group(1), redis_url.group(1)
            print(f"loadtest: stock dev on {service.url}, Redis {redis_url.group(1)}")
            break
        if proc.poll() is not None or time.monotonic() > deadline:
            stop_process(proc)
            raise SystemExit(f"loadtest: stock dev did not start:\n{text[-3000:]}")
        time.sleep(0.2)
    wait_http(f"{service.url}/healthz", proc, timeout=30)
    return service


def api(service: Service, method: str, path: str, body: Any = None, admin: bool = False) -> Any:
    """One API call (stdlib HTTP); returns the JSON body, raises on an error status."""
    headers = {"Content-Type": "application/json"}
    if admin:
        headers["Authorization"] = f"Bearer {service.token}"
    data = json.dumps(body).encode() if body is not None else None
    request = urllib.request.Request(service.url + path, data, headers, method=method)
    with urllib.request.urlopen(request, timeout=30) as reply:
        return json.loads(reply.read())


# -- the run ---------------------------------------------------------------------


def catalog(run: str) -> tuple[dict[str, int], list[str], list[str], list[str]]:
    """This run's SKUs (unique names, so a shared service's other SKUs are untouched)."""
    flash = [f"LT{run}-FLASH-{i}" for i in range(len(FLASH_UNITS))]
    regular = [f"LT{run}-SKU-{i:02d}" for i in range(REGULAR_COUNT)]
    limited = [f"LT{run}-LIMITED"]
    loaded = dict(zip(flash, FLASH_UNITS, strict=True))
    loaded.update({sku: REGULAR_UNITS for sku in regular})
    loaded.update({sku: LIMITED_UNITS for sku in limited})
    return loaded, flash, regular, limited


def run_locust(
    service: Service,
    args: argparse.Namespace,
    flash: list[str],
    regular: list[str],
    limited: list[str],
    workdir: Path,
) -> tuple[Path, Path]:
    journal = workdir / "journal.jsonl"
    stats = workdir / "locust"
    env = dict(os.environ)
    env.update(
        LOADTEST_CATALOG=json.dumps({"flash": flash, "skus": regular, "limited": limited}),
        LOADTEST_JOURNAL=str(journal),
        STOCK_ADMIN_TOKEN=service.token,
    )
    command = [
        sys.executable,
        "-m",
        "locust",
        "-f",
        str(HERE / "locustfile.py"),
        "--headless",
        "--users",
        str(args.users),
        "--spawn-rate",
        str(args.spawn_rate),
        "--run-time",
        f"{args.run_time}s",
        "--host",
        service.url,
        "--csv",
        str(stats),
        "--only-summary",
        "--stop-timeout",
        "10",
        "--loglevel",
        "WARNING",
    ]
    print(f"loadtest: locust, {args.users} users for {args.run_time} s against {service.url}")
    subprocess.run(command, cwd=ROOT, env=env, check=False, timeout=args.run_time + 120)
    return journal, Path(f"{stats}_stats.csv")


def read_journal(path: Path) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def locust_totals(path: Path) -> tuple[int, int, list[str]]:
    """(requests, failures, the rows with failures) from locust's stats CSV."""
    if not path.exists():
        return 0, 0, ["locust wrote no stats"]
    requests = failures = 0
    failing = []
    with open(path) as handle:
        for row in csv.DictReader(handle):
            if row["Name"] == "Aggregated":
                requests, failures = int(row["Request Count"]), int(row["Failure Count"])
            elif int(row["Failure Count"]):
                failing.append(f"{row['Type']} {row['Name']}: {row['Failure Count']} failures")
    return requests, failures, failing


# -- the checks ------------------------------------------------------------------


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
            got = (
                tuple(pg[sku][k] for k in ("available", "reserved", "sold")) if sku in pg else None
            )
            verdict.failures.append(
                f"{sku}: PostgreSQL {got} != Redis {tuple(redis_side[sku].values())}"
            )
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


def check(
    service: Service,
    loaded: dict[str, int],
    flash: list[str],
    journal: list[dict[str, Any]],
    verdict: Verdict,
    drain_s: float,
) -> dict[str, dict[str, int]]:
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
    command = [sys.executable, "-m", "stock.cli", "reconcile-payments", str(export), "--json"]
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


def report(
    levels: dict[str, dict[str, int]],
    loaded: dict[str, int],
    journal: list[dict[str, Any]],
    totals: tuple[int, int, list[str]],
    verdict: Verdict,
) -> None:
    print()
    print(f"{'sku':<22} {'loaded':>7} {'restock':>7} {'avail':>7} {'resvd':>7} {'sold':>7}")
    added, _ = restocks(journal, None)
    for sku in sorted(loaded):
        lv = levels[sku]
        print(
            f"{sku:<22} {loaded[sku]:>7} {added.get(sku, 0):>7} {lv['available']:>7} "
            f"{lv['reserved']:>7} {lv['sold']:>7}"
        )
    retries = [e for e in journal if e["kind"] == "retry"]
    timed_out = [e for e in retries if e["first"] == 0]
    print(
        f"\nretries: {len(retries)} orders sent twice; first attempt timed out on the client "
        f"{len(timed_out)} times, after which the retry answered 200 (replay: the first "
        f"had gone through) {sum(e['retry'] == 200 for e in timed_out)} times and 201 "
        f"{sum(e['retry'] == 201 for e in timed_out)} times"
    )
    requests, failures, failing = totals
    print(f"\nlocust: {requests} requests, {failures} unexpected answers")
    for line in failing:
        print(f"  {line}")
    for note in verdict.notes:
        print(f"note: {note}")
    for failure in verdict.failures:
        print(f"FAIL: {failure}")


def main() -> int:
    parser = argparse.ArgumentParser(description="flash-sale load test with checks (issue 6)")
    parser.add_argument("--users", type=int, default=200)
    parser.add_argument("--spawn-rate", type=float, default=50)
    parser.add_argument("--run-time", type=int, default=60, help="seconds")
    parser.add_argument("--drain-s", type=float, default=30, help="wait for the writer")
    parser.add_argument(
        "--allow-failures",
        action="store_true",
        help="do not FAIL on unexpected HTTP answers (only on broken stock invariants)",
    )
    args = parser.parse_args()
    workdir = Path(tempfile.mkdtemp(prefix="stock-loadtest-"))
    url = os.environ.get("STOCK_URL")
    if url:
        token = os.environ.get("STOCK_ADMIN_TOKEN", "")
        if not token:
            print("loadtest: STOCK_URL needs STOCK_ADMIN_TOKEN to load stock", file=sys.stderr)
            return 2
        service = Service(url.rstrip("/"), token, os.environ.get("STOCK_DATABASE_URL", ""))
        wait_http(f"{service.url}/healthz", None, timeout=10)
    else:
        service = start_dev(workdir)
    verdict = Verdict()
    summary = "no run"
    try:
        run = secrets.token_hex(3).upper()
        loaded, flash, regular, limited = catalog(run)
        for sku, units in loaded.items():
            api(
                service,
                "PUT",
                f"/v1/stock/{sku}",
                {"available": units, "reason": "loadtest"},
                admin=True,
            )
        for sku in limited:
            api(service, "PUT", f"/v1/stock/{sku}/limits", {"per_customer": LIMIT}, admin=True)
        print(f"loadtest: loaded {sum(loaded.values())} units over {len(loaded)} SKUs (LT{run}-*)")
        journal_path, stats_path = run_locust(service, args, flash, regular, limited, workdir)
        time.sleep(SHORT_TTL_S + 2)  # the last short reservations expire; the reaper runs
        journal = read_journal(journal_path)
        check_limits(journal, verdict)
        journal += reconcile_lost_callbacks(service, journal, workdir, verdict)
        totals = locust_totals(stats_path)
        if not args.allow_failures:
            verdict.check(totals[1] == 0, f"locust saw {totals[1]} unexpected answers")
        verdict.check(totals[0] > 0, "locust made no requests")
        levels = check(service, loaded, flash, journal, verdict, args.drain_s)
        report(levels, loaded, journal, totals, verdict)
        summary = (
            f"{len(loaded)} SKUs, {totals[0]} requests, {totals[1]} unexpected answers, "
            f"sold {sum(lv['sold'] for lv in levels.values())}, "
            f"reserved {sum(lv['reserved'] for lv in levels.values())}, "
            f"available {sum(lv['available'] for lv in levels.values())}"
        )
    except (OSError, urllib.error.URLError) as exc:
        verdict.failures.append(f"error during the run: {exc}")
        print(f"FAIL: {exc}")
    finally:
        if service.proc is not None:
            stop_process(service.proc, 60)
    if not verdict.failures:
        shutil.rmtree(workdir, ignore_errors=True)
        print(f"\nloadtest: PASS ({summary})")
        return 0
    print(f"\nloadtest: logs and the locust journal are kept in {workdir}")
    print(f"loadtest: FAIL, {len(verdict.failures)} failed checks ({summary})")
    return 1


if __name__ == "__main__":
    sys.exit(main())
