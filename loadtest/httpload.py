"""A closed-loop HTTP/1.1 load generator that times every answer by its status.

wrk reports one latency distribution for all answers together; the overload row
of ``make bench`` needs the latency of the answered (201) requests apart from
the 503s shed at once, and the count of answers older than a client's timeout.
Each of ``connections`` keep-alive connections sends one ``POST`` and, when its
answer is complete, the next one at once (a 503 too: the harshest client).
Raw asyncio protocols on uvloop: about 10 µs of CPU per request.

    python -m loadtest.httpload --port 8080 --connections 200 --seconds 5 --sku HOT
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import time
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field

import uvloop

Body = Callable[[int], bytes]


@dataclass
class LoadResult:
    """Latencies in seconds by HTTP status, of the answers within the measured window."""

    seconds: float
    latencies: dict[int, list[float]] = field(default_factory=lambda: defaultdict(list))
    errors: int = 0

    def count(self, status: int | None = None) -> int:
        if status is None:
            return sum(len(v) for v in self.latencies.values())
        return len(self.latencies.get(status, []))

    def rate(self, status: int | None = None) -> float:
        return self.count(status) / self.seconds

    def percentile(self, status: int, q: float) -> float:
        """The ``q`` quantile (0..1) of ``status`` answers' latency (nearest rank)."""
        values = sorted(self.latencies.get(status, []))
        if not values:
            return float("nan")
        return values[min(len(values) - 1, max(0, round(q * len(values)) - 1))]

    def older_than(self, seconds: float) -> int:
        return sum(1 for v in self.latencies.values() for x in v if x > seconds)


class _Load:
    def __init__(
        self, host: str, path: str, body: Body, path_of: Callable[[int], str] | None = None
    ) -> None:
        self.host = host
        self.head = (
            f"POST {path} HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\n"
        ).encode()
        self.body = body
        self.path_of = path_of  # a path per request (confirms of distinct orders)
        self.counter = itertools.count()
        self.recording = False
        self.stopped = False
        self.result = LoadResult(0.0)

    def request(self) -> bytes:
        n = next(self.counter)
        body = self.body(n)
        head = self.head
        if self.path_of is not None:
            head = f"POST {self.path_of(n)} HTTP/1.1\r\nHost: {self.host}\r\n".encode()
        return b"%sContent-Length: %d\r\n\r\n%s" % (head, len(body), body)

    def record(self, status: int, latency: float) -> None:
        if self.recording:
            self.result.latencies[status].append(latency)


def _content_length(head: bytes) -> int:
    at = head.find(b"\r\ncontent-length:")
    if at < 0:
        return 0
    stop = head.find(b"\r\n", at + 2)
    return int(head[at + 17 : stop if stop >= 0 else None])


class _Connection(asyncio.Protocol):
    def __init__(self, load: _Load, closed: asyncio.Future[None]) -> None:
        self.load = load
        self.closed = closed
        self.buffer = b""
        self.started = 0.0
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]  # uvloop's is no asyncio.Transport
        self._send()

    def _send(self) -> None:
        assert self.transport is not None
        self.started = time.perf_counter()
        self.transport.write(self.load.request())

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        while True:
            end = self.buffer.find(b"\r\n\r\n")
            if end < 0:
                return
            head = self.buffer[:end].lower()
            length = _content_length(head)
            total = end + 4 + length
            if len(self.buffer) < total:
                return
            self.buffer = self.buffer[total:]
            self.load.record(int(head[9:12]), time.perf_counter() - self.started)
            if self.load.stopped:
                assert self.transport is not None
                self.transport.close()
                return
            self._send()

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.load.stopped:
            self.load.result.errors += 1
        if not self.closed.done():
            self.closed.set_result(None)


async def drive(
    port: int,
    connections: int,
    seconds: float,
    body: Body,
    *,
    warmup: float = 1.0,
    path: str = "/v1/reservations",
    host: str = "127.0.0.1",
    path_of: Callable[[int], str] | None = None,
) -> LoadResult:
    """Run the load for ``warmup`` + ``seconds``; the answers of the last ``seconds`` count."""
    loop = asyncio.get_running_loop()
    load = _Load(host, path, body, path_of)
    closed: list[asyncio.Future[None]] = []
    for _ in range(connections):
        done: asyncio.Future[None] = loop.create_future()
        closed.append(done)
        await loop.create_connection(lambda d=done: _Connection(load, d), host, port)  # type: ignore[misc]
    await asyncio.sleep(warmup)
    load.recording = True
    started = time.perf_counter()
    await asyncio.sleep(seconds)
    load.recording = False
    load.result.seconds = time.perf_counter() - started
    load.stopped = True
    await asyncio.wait(closed, timeout=10)
    return load.result


def reserve_body(sku: str, prefix: str) -> Body:
    """A new order per request: ``{"order_id": "<prefix><n>", "items": [{sku, qty 1}]}``."""
    head = b'{"order_id":"' + prefix.encode()
    tail = b'","items":[{"sku":"' + sku.encode() + b'","qty":1}]}'
    return lambda n: b"%s%d%s" % (head, n, tail)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--connections", "-c", type=int, default=50)
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--sku", default="HOT-1")
    parser.add_argument("--prefix", default="load-")
    args = parser.parse_args()
    body = reserve_body(args.sku, args.prefix)
    result = uvloop.run(drive(args.port, args.connections, args.seconds, body))
    for status in sorted(result.latencies):
        p50, p99 = (result.percentile(status, q) * 1e3 for q in (0.5, 0.99))
        print(f"{status}: {result.rate(status):,.0f}/s p50 {p50:.2f} ms p99 {p99:.2f} ms")
    print(f"connection errors: {result.errors}")


if __name__ == "__main__":
    main()
