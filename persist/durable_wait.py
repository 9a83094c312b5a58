"""What the writer's reads of one node wait for, and when that is decided again.

The decision (``persist.durable_read``, ``DurableReads._decide``): ``WAITAOF``
where the node can confirm an fsync, ``WAIT`` where it has a replica (also with
AOF off: a failover promotes the replica, and what it lacks is lost), both, or
nothing. It is made at a node's first read and made again:

- when the node's round trip failed or its wait timed out (a replica lost: the
  ``WAIT 1`` that nobody acknowledges fails the round);
- when a replica attached after it. Every round trip ends its reads with ``ROLE``
  (before the waits), and a master that lists a replica its decision does not
  wait for (after a failover the old master comes back as the new one's replica)
  has that round's reads dropped: not applied, read again next round from their
  pending lists, with ``WAIT``. A replica that attaches after the ``ROLE`` gets
  the round's writes by its own sync, so no round is applied that it may lack.

Before this, the decision was never revisited: a second failover left PostgreSQL
ahead of Redis, and a master with AOF off and a replica got no wait at all.
"""

from __future__ import annotations

from typing import Any

from redis.exceptions import RedisError

WAITAOF, WAIT, NO_WAIT = "WAITAOF", "WAIT", ""  # or both: "WAITAOF+WAIT"


def online_replicas(role: Any) -> int:
    """How many replicas a master's ROLE reply lists; 0 for a replica's ROLE or an
    error reply (ROLE refused: then no replica attached later is noticed)."""
    if isinstance(role, Exception) or not role or str(role[0]) != "master":
        return 0
    return len(role[2])


def check_synced(wait: str, synced: Any) -> None:
    """Raise unless the wait's reply says the reads are fsynced (WAITAOF: [local,
    replicas]) or on a replica (WAIT: replicas)."""
    if not isinstance(synced, Exception):
        done = synced if wait == WAIT else synced[0]
        if int(done) >= 1:
            return
    where = "fsynced by Redis" if wait == WAITAOF else "on a replica"
    raise RedisError(f"events not yet {where} ({wait}: {synced!r})")


def config_pairs(reply: Any) -> dict[str, Any]:
    """A raw CONFIG GET reply: RESP3 map or RESP2 flat list."""
    if isinstance(reply, dict):
        return {str(k): v for k, v in reply.items()}
    return {str(k): v for k, v in zip(reply[::2], reply[1::2], strict=True)}
