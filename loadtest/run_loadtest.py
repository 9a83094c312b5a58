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

The driving lives in ``loadtest/locust_driver.py``, the checks in
``loadtest/invariants.py``.

    python -m loadtest.run_loadtest [--users 200] [--spawn-rate 50] [--run-time 60]
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
import urllib.error
from pathlib import Path
from typing import Any

from loadtest.common import stop_process
from loadtest.invariants import (
    Verdict,
    check,
    check_limits,
    reconcile_lost_callbacks,
    restocks,
)
from loadtest.locust_driver import (
    SHORT_TTL_S,
    Service,
    load_catalog,
    locust_totals,
    open_service,
    read_journal,
    run_locust,
)


def parse_args() -> argparse.Namespace:
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
    return parser.parse_args()


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


def run_and_check(
    service: Service, args: argparse.Namespace, workdir: Path, verdict: Verdict
) -> str:
    """Load the stock, run locust, check the books and print them; the summary's counts."""
    loaded, flash, regular, limited = load_catalog(service)
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
    return (
        f"{len(loaded)} SKUs, {totals[0]} requests, {totals[1]} unexpected answers, "
        f"sold {sum(lv['sold'] for lv in levels.values())}, "
        f"reserved {sum(lv['reserved'] for lv in levels.values())}, "
        f"available {sum(lv['available'] for lv in levels.values())}"
    )


def main() -> int:
    args = parse_args()
    workdir = Path(tempfile.mkdtemp(prefix="stock-loadtest-"))
    service = open_service(workdir)
    if service is None:
        return 2
    verdict = Verdict()
    summary = "no run"
    try:
        summary = run_and_check(service, args, workdir, verdict)
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
