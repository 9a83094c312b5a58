"""The load test's driving side: the service under test (``stock dev`` started here, or
one at ``STOCK_URL``), its API, this run's catalog of SKUs, and locust run headless
over ``loadtest/locustfile.py`` with what it leaves behind (the journal, the stats)."""

from __future__ import annotations

import argparse
import csv
import json
import os
import re
import secrets
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from loadtest.common import stop_process, wait_http
from stock.app.embedded import free_port

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
            [
                sys.executable,
                "-m",
                "stock.app.cli",
                "dev",
                "--port",
                str(port),
                "--admin-token",
                token,
            ],
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


def open_service(workdir: Path) -> Service | None:
    """The service at ``STOCK_URL`` when it is set (None when ``STOCK_ADMIN_TOKEN`` is
    missing), else ``stock dev`` started in ``workdir``."""
    url = os.environ.get("STOCK_URL")
    if not url:
        return start_dev(workdir)
    token = os.environ.get("STOCK_ADMIN_TOKEN", "")
    if not token:
        print("loadtest: STOCK_URL needs STOCK_ADMIN_TOKEN to load stock", file=sys.stderr)
        return None
    service = Service(url.rstrip("/"), token, os.environ.get("STOCK_DATABASE_URL", ""))
    wait_http(f"{service.url}/healthz", None, timeout=10)
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


def load_catalog(service: Service) -> tuple[dict[str, int], list[str], list[str], list[str]]:
    """A new run's catalog, its stock and the limited SKU's limit set through the admin API."""
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
