"""Auto-pipelining: the calls made during one event-loop tick travel together.

Under a stampede thousands of coroutines each send one short script call. Sent
one by one, each pays a connection checkout, a socket write, a read wake-up
and redis-py's per-call bookkeeping. Here every call made in the same tick is
queued, and at the end of the tick the queue goes out as one write on one
pooled redis-py connection, packed by hiredis (redis-py's asyncio pipeline
packs in pure Python, which was the top of the profile). No MULTI: each
script stays atomic on its own and the calls are independent. Replies come
back in order; each caller gets its own reply or its own error.

Standalone Redis only: redis-py refuses EVALSHA in a cluster pipeline
(redis/redis-py#2914), so a cluster client runs calls concurrently instead.
"""

from __future__ import annotations

import asyncio
import math
from typing import Any

import hiredis
from redis.exceptions import NoScriptError, ResponseError

MAX_BATCH = 512
BATCH_TIMEOUT_S = 10.0  # when the client has no socket_timeout


class AutoPipeline:
    def __init__(self, client: Any, max_batch: int = MAX_BATCH) -> None:
        self.client = client
        self.max_batch = max_batch
        self._queue: list[tuple[tuple[Any, ...], asyncio.Future[Any]]] = []
        self._tasks: set[asyncio.Task[None]] = set()
        self.batches = 0
        self.commands = 0

    def execute(self, *args: Any) -> asyncio.Future[Any]:
        """Queue one command (``"EVALSHA", sha, n, *keys, *argv`` or any other; the
        reply is raw RESP, without redis-py's per-command response callbacks);
        the future resolves to its reply after this tick's pipeline returns."""
        loop = asyncio.get_running_loop()
        future = loop.create_future()
        if not self._queue:
            loop.call_soon(self._flush)
        self._queue.append((args, future))
        if len(self._queue) >= self.max_batch:
            self._flush()
        return future

    def _flush(self) -> None:
        batch, self._queue = self._queue, []
        if batch:
            task = asyncio.create_task(self._send(batch))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def _send(self, batch: list[tuple[tuple[Any, ...], asyncio.Future[Any]]]) -> None:
        self.batches += 1
        self.commands += len(batch)
        pool = self.client.connection_pool
        conn = None
        try:
            conn = await pool.get_connection()
            await conn.send_packed_command(b"".join(hiredis.pack_command(a) for a, _ in batch))
            # One deadline for the whole batch instead of one per reply (a per-reply
            # timeout context was a tenth of the HTTP profile).
            async with asyncio.timeout(conn.socket_timeout or BATCH_TIMEOUT_S):
                for _args, future in batch:
                    try:
                        reply = await conn.read_response(timeout=math.inf)
                    except ResponseError as exc:
                        reply = exc
                    if future.done():
                        continue
                    if isinstance(reply, Exception):
                        future.set_exception(reply)
                    else:
                        future.set_result(reply)
        except BaseException as exc:
            # No connection, or it broke mid-batch (its state is unknown, so drop
            # it): every caller still waiting hears the error.
            if conn is not None:
                await conn.disconnect()
            for _args, future in batch:
                if not future.done():
                    future.set_exception(exc)
            if not isinstance(exc, Exception):
                raise
        finally:
            if conn is not None:
                await pool.release(conn)


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
