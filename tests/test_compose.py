"""docker-compose.yml brought up for real (docker-compose from Debian, stand-in images).

The file is used as shipped except for what a shared CI machine without a
registry needs: the API's host ports are ephemeral on loopback (8080-8081 may
be taken), the build context is the checkout's absolute path (the file is copied
to a temporary directory), and the monitoring services (prometheus, grafana) are
left out: their images come from a registry and Grafana has no Debian package
to make a stand-in from. Everything the API needs is brought up. ``redis:7.2``
and ``postgres:16`` are Debian stand-ins (tests/support/docker_env.py): Redis 7.0 and
PostgreSQL 15.
"""

from __future__ import annotations

import asyncio
import shutil
import subprocess
import tempfile
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import aiohttp
import pytest
import yaml

from tests.support import docker_env
from tests.test_image import call, wait_for

pytestmark = pytest.mark.docker

ROOT = Path(__file__).resolve().parent.parent
TOKEN = "compose-test-token"  # the file asks for STOCK_ADMIN_TOKEN from the environment
ADMIN = {"Authorization": f"Bearer {TOKEN}"}


class Compose:
    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.project = f"stock{uuid.uuid4().hex[:8]}"

    def __call__(self, *args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            ["docker-compose", "-p", self.project, *args],
            cwd=self.directory,
            capture_output=True,
            text=True,
            timeout=timeout,
            env={**docker_env.ENV, "STOCK_ADMIN_TOKEN": TOKEN},
        )

    def port(self, service: str, index: int) -> int:
        done = self("port", f"--index={index}", service, "8080")
        return int(done.stdout.strip().rsplit(":", 1)[1])


@pytest.fixture(scope="module")
def compose() -> Iterator[Compose]:
    problem = docker_env.daemon_problem()
    if problem:
        pytest.skip(f"Docker cannot run here: {problem}")
    if shutil.which("docker-compose") is None:
        pytest.skip("no docker-compose (make ci-deps as root installs it)")
    spent = docker_env.ensure_python_base() + docker_env.ensure_compose_bases()
    spec = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    spec["services"]["api"]["ports"] = ["127.0.0.1::8080"]
    for monitoring in ("prometheus", "grafana"):
        spec["services"].pop(monitoring, None)
    for name in ("migrate", "api"):
        spec["services"][name]["build"] = str(ROOT)
    directory = Path(tempfile.mkdtemp(prefix="stock-compose-"))
    (directory / "docker-compose.yml").write_text(yaml.safe_dump(spec, sort_keys=False))
    stack = Compose(directory)
    started = time.monotonic()
    try:
        done = stack("up", "-d", timeout=900)
        logs = stack("logs", "--tail=30").stdout[-4000:]
        assert done.returncode == 0, done.stdout + done.stderr + logs
        print(f"\nbase images {spent:.1f} s, docker-compose up {time.monotonic() - started:.1f} s")
        yield stack
    finally:
        stack("down", "-v", "--remove-orphans", "--rmi", "local", timeout=300)
        shutil.rmtree(directory, ignore_errors=True)


async def test_compose_stack_reserves_through_both_replicas(compose: Compose) -> None:
    states = compose("ps").stdout
    assert "redis-cluster-init_1" in states and "migrate_1" in states
    bases = [f"http://127.0.0.1:{compose.port('api', i)}" for i in (1, 2)]
    for base in bases:
        await wait_for(f"{base}/readyz", timeout=90)
    one, two = bases
    async with aiohttp.ClientSession() as http:
        status, _ = await call(
            http, "PUT", f"{one}/v1/stock/COMPOSE", json={"available": 5}, headers=ADMIN
        )
        assert status == 200
        order = {"order_id": "compose-1", "items": [{"sku": "COMPOSE", "qty": 2}]}
        assert (await call(http, "POST", f"{two}/v1/reservations", json=order))[0] == 201
        status, body = await call(http, "POST", f"{one}/v1/reservations/compose-1/confirm")
        assert (status, body["status"]) == (200, "confirmed")
        _, stock = await call(http, "GET", f"{two}/v1/stock/COMPOSE")
        assert stock == {"sku": "COMPOSE", "available": 3, "reserved": 0, "sold": 2, "shards": 1}
    # the cluster the init container made, and the writer's copy in PostgreSQL
    info = compose("exec", "-T", "redis-1", "redis-cli", "cluster", "info").stdout
    assert "cluster_state:ok" in info and "cluster_size:3" in info
    query = "SELECT sold FROM stock_levels WHERE sku = 'COMPOSE'"
    deadline = time.monotonic() + 30
    while True:
        done = compose("exec", "-T", "postgres", "psql", "-U", "stock", "-tAc", query)
        if done.stdout.strip() == "2":
            break
        assert time.monotonic() < deadline, done.stdout + done.stderr
        await asyncio.sleep(0.5)
