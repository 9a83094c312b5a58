"""What the load test and the benchmarks share: child processes and the machine.

Their servers come from ``stock.app.embedded``, as in ``stock dev`` and the tests.
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
import urllib.request
from pathlib import Path
from typing import Any

from stock.app.embedded import AOF_EVERYSEC


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


# the benchmarks' valkey-server: AOF every second (as in production; ``stock dev`` fsyncs
# every write), no rewrite mid-run
BENCH_AOF = (*AOF_EVERYSEC, "--auto-aof-rewrite-percentage", "0")


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
