"""Auto-pipelining: script calls share one connection and travel in batches.

Under a stampede thousands of coroutines each send one short script call. Sent
one by one through redis-py, each pays a connection checkout, a socket write, a
read wake-up and several layers of per-reply bookkeeping. Here the calls share
one connection, borrowed from the client's pool for as long as it works,
pipelined: each call is packed by hiredis and queued; the queue is written at
the end of the event-loop tick, or as soon as it holds ``max_batch`` calls, and
the callers are resolved in order as their replies arrive, parsed by one
hiredis reader right in the transport's ``data_received`` (``_Link``, which
takes the connection over as its protocol). No MULTI: each script stays atomic
on its own and the calls are independent.

Writing a full batch at once, rather than at the end of the tick, lets Redis
work on it while this process is still waking the callers of the replies
before it: client and server overlap instead of taking turns (docs/performance.md, "What the
profiles and CPU counters say", has the figures).

redis-py opens and authenticates the connection (and gives it back to the pool
when it breaks, or takes it when the client closes); this module only writes
packed commands to its transport and reads replies from it (the end of the
connection is handed on to redis-py's stream protocol). On a cluster, one
such pipeline per node borrows a connection of that node
(``stock.redis.cluster_pipeline``), since redis-py 8.1 refuses EVALSHA in its cluster
pipeline (redis/redis-py#2914).

The streams are redis-py's private ``Connection._reader`` and ``_writer``
(``streams``, the one place that reads them; the reader's buffer, empty after
the handshake, is taken over too). Its public seams, ``send_packed_command``
and ``read_response``, are a coroutine per write (which waits for the socket
to drain) and a parse and a timeout context per reply: the costs this module
exists to remove (and so are a reader task woken per read and Python 3.11's
``asyncio.get_running_loop()``, a ``getpid`` system call each time). So
``pyproject.toml`` names the redis-py versions checked (8.1), and
``tests/test_pipeline.py`` pins what this module and
``stock.redis.cluster_pipeline`` rely on, failing loudly on another version.
"""

from __future__ import annotations

import asyncio
import builtins
import logging
from collections import deque
from collections.abc import Callable
from typing import Any

import hiredis
from redis.exceptions import ConnectionError, NoScriptError, ResponseError, TimeoutError

# Small batches keep Redis busy while this process handles the replies of the last
# one: 8 served HTTP best (docs/performance.md, "What the profiles and CPU counters say").
MAX_BATCH = 8
DEFAULT_TIMEOUT_S = 10.0  # when the client has no socket_timeout

log = logging.getLogger(__name__)


def _reply_error(message: str) -> ResponseError:
    if message.startswith("NOSCRIPT"):
        return NoScriptError(message)
    return ResponseError(message)


def streams(conn: Any) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """The asyncio streams of an open redis-py connection (private in redis-py 8.1,
    pinned by tests/test_pipeline.py)."""
    return conn._reader, conn._writer


class _Link(asyncio.Protocol):
    """One borrowed connection: the callers waiting on it, in order, and when each
    write went out (for the deadline).

    The link takes the connection's transport over as its protocol
    (``transport.set_protocol``): each chunk read goes straight to the hiredis
    reader and the callers it completes are resolved right there, instead of
    through redis-py's stream reader, a reader task woken per read and a copy of
    the buffer. What the link does not handle (flow control, the end of the
    connection) it hands on to the stream protocol it replaced, so that redis-py
    still sees the connection close."""

    def __init__(self, conn: Any, reply_error: Callable[[str], Exception]) -> None:
        self.conn = conn
        reader, writer = streams(conn)
        self.transport: Any = writer.transport
        self.stream_protocol: Any = self.transport.get_protocol()
        self.parser = hiredis.Reader(encoding="utf-8", replyError=reply_error)
        self.waiting: deque[asyncio.Future[Any]] = deque()
        self.writes: deque[tuple[float, int]] = deque()  # (loop time, calls written by then)
        self.written = 0
        self.replied = 0
        self.task: asyncio.Task[None] | None = None
        self.broken = False
        self.loop = asyncio.get_running_loop()  # the transport's
        self.closed: asyncio.Future[None] = self.loop.create_future()
        buffered: bytearray = reader._buffer  # type: ignore[attr-defined]
        leftover = bytes(buffered)  # (nothing after redis-py's handshake)
        buffered.clear()
        self.transport.set_protocol(self)
        if leftover:
            self.data_received(leftover)

    def send(self, packed: bytes, futures: list[asyncio.Future[Any]], now: float) -> None:
        self.waiting.extend(futures)
        self.written += len(futures)
        self.writes.append((now, self.written))
        self.transport.write(packed)

    def data_received(self, data: bytes) -> None:
        """Resolve the waiting callers in order as their replies arrive."""
        parser, waiting = self.parser, self.waiting
        try:
            parser.feed(data)
            while (reply := parser.gets()) is not False:
                future = waiting.popleft()
                self.replied += 1
                if future.done():  # its caller gave up (cancelled)
                    continue
                if isinstance(reply, Exception):
                    future.set_exception(reply)
                else:
                    future.set_result(reply)
        except Exception as exc:  # a reply nobody waits for, or one hiredis cannot read
            self.fail(ConnectionError(f"connection to Redis lost: {exc!r}"))
            self.transport.close()
            return
        writes = self.writes
        while writes and writes[0][1] <= self.replied:
            writes.popleft()

    def eof_received(self) -> bool:
        self.fail(ConnectionError("Redis closed the connection"))
        return False  # the transport closes itself: connection_lost follows

    def connection_lost(self, exc: Exception | None) -> None:
        self.fail(ConnectionError(f"connection to Redis lost: {exc!r}"))
        self.stream_protocol.connection_lost(exc)  # redis-py's streams see the end too

    def pause_writing(self) -> None:
        self.stream_protocol.pause_writing()

    def resume_writing(self) -> None:
        self.stream_protocol.resume_writing()

    def fail(self, error: BaseException) -> None:
        self.broken = True
        if not self.closed.done():
            self.closed.set_result(None)
        while self.waiting:
            future = self.waiting.popleft()
            if not future.done():
                future.set_exception(error)


class AutoPipeline:
    # how an error reply becomes an exception (the cluster's pipelines use redis-py's own)
    reply_error: Callable[[str], Exception] = staticmethod(_reply_error)

    def __init__(self, client: Any, max_batch: int = MAX_BATCH) -> None:
        """``client``: a standalone redis-py asyncio client, whose pool lends the
        pipeline one connection at a time."""
        self.client = client
        self.max_batch = max_batch
        # The deadlines are the client's (stock.redis.client.deadlines: STOCK_REDIS_TIMEOUT_S,
        # STOCK_REDIS_CONNECT_TIMEOUT_S): a batch's replies, and opening a connection.
        pool = getattr(client, "connection_pool", None)  # (a cluster client has none)
        options = pool.connection_kwargs if pool is not None else client.connection_kwargs
        self.timeout_s = float(options.get("socket_timeout") or DEFAULT_TIMEOUT_S)
        self.open_timeout_s = float(options.get("socket_connect_timeout") or 0) + self.timeout_s
        self._link: _Link | None = None
        self._opening: asyncio.Future[_Link] | None = None
        self._packed: list[bytes] = []
        self._futures: list[asyncio.Future[Any]] = []
        self._flush_handle: asyncio.Handle | None = None
        self._watchdog: asyncio.TimerHandle | None = None
        self.batches = 0
        self.commands = 0

    def execute(self, *args: Any) -> asyncio.Future[Any]:
        """Queue one command (``"EVALSHA", sha, n, *keys, *argv`` or any other; the
        reply is raw RESP, without redis-py's per-command response callbacks); the
        future resolves to its reply or fails with its error."""
        # The open connection's loop: Python 3.11's get_running_loop() makes a getpid
        # system call each time (to notice a fork), once per command otherwise.
        link = self._link
        loop = link.loop if link is not None else asyncio.get_running_loop()
        future = loop.create_future()
        self._packed.append(hiredis.pack_command(args))
        self._futures.append(future)
        if len(self._futures) >= self.max_batch:
            self._flush()
        elif self._flush_handle is None:
            self._flush_handle = loop.call_soon(self._flush)
        return future

    # -- writing --------------------------------------------------------------

    def _flush(self) -> None:
        if self._flush_handle is not None:
            self._flush_handle.cancel()
            self._flush_handle = None
        if not self._futures:
            return
        packed, futures = b"".join(self._packed), self._futures
        self._packed, self._futures = [], []
        link = self._link
        if link is not None and not link.broken and not link.transport.is_closing():
            self._send(link, packed, futures)
            return
        if self._opening is None:
            self._opening = asyncio.ensure_future(self._open())
        self._opening.add_done_callback(
            lambda opened: self._send_when_open(opened, packed, futures)
        )

    def _send(self, link: _Link, packed: bytes, futures: list[asyncio.Future[Any]]) -> None:
        self.batches += 1
        self.commands += len(futures)
        try:
            link.send(packed, futures, link.loop.time())
        except Exception as exc:  # the transport closed under us (the client closed)
            link.fail(ConnectionError(f"connection to Redis lost: {exc!r}"))
            return
        if self._watchdog is None:
            self._arm_watchdog(self._timeout(link))

    def _send_when_open(
        self, opened: asyncio.Future[_Link], packed: bytes, futures: list[asyncio.Future[Any]]
    ) -> None:
        if self._opening is opened:
            self._opening = None
        error = None if opened.cancelled() else opened.exception()
        if opened.cancelled() or error is not None:
            failure = error if isinstance(error, Exception) else ConnectionError("cancelled")
            for future in futures:
                if not future.done():
                    future.set_exception(failure)
            return
        link = opened.result()
        if link.broken:  # broke between opening and this callback
            for future in futures:
                if not future.done():
                    future.set_exception(ConnectionError("connection to Redis lost"))
            return
        self._send(link, packed, futures)

    async def _borrow(self) -> Any:
        """An open connection of the client's pool (a subclass may lend another's)."""
        return await self.client.connection_pool.get_connection()

    async def _return(self, conn: Any) -> None:
        await self.client.connection_pool.release(conn)

    async def _open(self) -> _Link:
        """Borrow a connection within the open deadline: waiting for the pool, the TCP
        connect and redis-py's handshake (which a silent server never answers)."""
        try:
            conn = await asyncio.wait_for(self._borrow(), self.open_timeout_s)
        except builtins.TimeoutError:
            raise TimeoutError(f"no connection to Redis within {self.open_timeout_s:g} s") from None
        try:
            link = _Link(conn, self.reply_error)
        except BaseException:
            await self._return(conn)
            raise
        link.task = asyncio.create_task(self._run(link))
        self._link = link
        return link

    async def _run(self, link: _Link) -> None:
        """Wait until the connection breaks (its callers failed by then); return it."""
        try:
            await link.closed
        except asyncio.CancelledError:
            link.fail(ConnectionError("the pipeline's connection was closed"))
            raise
        finally:
            if self._link is link:
                self._link = None
            await self._give_back(link)

    async def _give_back(self, link: _Link) -> None:
        try:
            await link.conn.disconnect()
        except Exception as exc:  # closing a broken socket; nothing else to do
            log.debug("auto-pipeline: disconnect failed: %r", exc)
        await self._return(link.conn)

    async def aclose(self) -> None:
        """Close the borrowed connection (the client's ``aclose`` also does)."""
        link, self._link = self._link, None
        if link is not None and link.task is not None:
            link.task.cancel()
            await asyncio.gather(link.task, return_exceptions=True)

    # -- the deadline -----------------------------------------------------------

    def _timeout(self, link: _Link) -> float:
        return self.timeout_s

    def _arm_watchdog(self, delay: float) -> None:
        self._watchdog = asyncio.get_running_loop().call_later(delay, self._check_deadline)

    def _check_deadline(self) -> None:
        """A write has waited longer than the timeout for its replies: the
        connection's state is unknown, so drop it (its callers hear TimeoutError)."""
        self._watchdog = None
        link = self._link
        if link is None or not link.writes:
            return
        timeout = self._timeout(link)
        waited = asyncio.get_running_loop().time() - link.writes[0][0]
        if waited < timeout:
            self._arm_watchdog(timeout - waited)
            return
        link.fail(TimeoutError(f"no reply from Redis within {timeout:g} s"))
        if link.task is not None:
            link.task.cancel()


async def evalsha(
    pipeline: AutoPipeline, sha: str, source: str, keys: list[str], args: list[Any]
) -> Any:
    """EVALSHA through the auto-pipeline; on NOSCRIPT (a restart, a failover, a
    SCRIPT FLUSH) load the script and call again once."""
    try:
        return await pipeline.execute("EVALSHA", sha, len(keys), *keys, *args)
    except NoScriptError:
        await pipeline.client.script_load(source)
        return await pipeline.execute("EVALSHA", sha, len(keys), *keys, *args)
