"""The Redis key layout: the only module that knows key names and hash tags.

Every SKU belongs to one logical *bucket*, ``crc32(sku) % buckets``. All keys
of a bucket carry the hash tag ``{b<n>}``, so one Lua script can touch a SKU's
counters, its order lines, the bucket's expiry index and the bucket's event
stream in one atomic step on one Redis Cluster node.

==============================================  ======  ==========================
key                                             type    holds
==============================================  ======  ==========================
``stock:{b<n>}:sku:<sku>``                      hash    available, reserved, sold,
                                                        seq (per-SKU event number),
                                                        fenced (token@until_ms),
                                                        limit, c:<customer> (units
                                                        held or bought), locs (the
                                                        SKU has locations:
                                                        strategy;split;home;cands,
                                                        or 1 if written before)
``stock:{b<n>}:line:<sku>|<order_id>``          string  ``state|qty|expires_ms|``
                                                        ``tag|customer``
``stock:{b<n>}:due``                            zset    ``<sku>|<order_id>`` scored
                                                        by expiry (ms, server time)
``stock:{b<n>}:events``                         stream  one delta event per change
``stock:order:{<order_id>}``                    string  ``kind|phase|owner|items``:
                                                        the order's items, so
                                                        confirm/release need
                                                        only the order id (on a
                                                        cluster: its directory)
``stock:{b<n>}:order:<order_id>``               string  cluster: the bucket's
                                                        copy ``kind|items``
``stock:{b<n>}:loc:<sku>``                      hash    the SKU's locations:
                                                        ``@<location>`` = ``a,r,s,t``,
                                                        strategy, order, split,
                                                        home, transit
``stock:{b<n>}:alloc:<sku>|<order_id>``         string  a line's allocations
                                                        ``pin|location:qty,...``
``stock:{b<n>}:xfer:<sku>``                     hash    transfer_id ->
                                                        ``from|to|qty|T or D|reason``
``stock:reconcile:last``                        string  JSON outcome of the last
                                                        ``stock reconcile``
==============================================  ======  ==========================

A line's tag (a cluster's attempt tokens) and customer may be empty, and empty
ones at the end are left out (``stock/core/formats.py`` builds and reads the values).
A SKU never contains ``|`` (DESIGN §6), so ``<sku>|<order_id>`` splits at the
first ``|``. ``lua/README.md`` documents the same layout for script readers.
One script-side copy: ``line_item`` and ``bucket_of`` in ``lua/_lib.lua`` build a
line's keys for the standalone transitions (one round trip); keep them in step
with ``bucket_of`` and ``line_keys`` here (``tests/test_scripts.py`` compares them).
"""

from __future__ import annotations

import zlib
from typing import NamedTuple

PREFIX = "stock"


class LineKeys(NamedTuple):
    """The four keys a script needs for one order line, in KEYS order."""

    sku: str
    line: str
    due: str
    events: str


def bucket_of(sku: str, buckets: int) -> int:
    """The SKU's bucket: stable across processes and releases (CRC-32, not ``hash``)."""
    return zlib.crc32(sku.encode()) % buckets


def bucket_tag(bucket: int) -> str:
    return f"{PREFIX}:{{b{bucket}}}"


def sku_key(sku: str, buckets: int) -> str:
    return sku_key_in(bucket_of(sku, buckets), sku)


def sku_key_in(bucket: int, sku: str) -> str:
    """``sku_key`` of a SKU whose bucket the caller already knows."""
    return f"{bucket_tag(bucket)}:sku:{sku}"


def line_key_prefix(bucket: int) -> str:
    """A line's key is this prefix + its member (``line_member``)."""
    return f"{bucket_tag(bucket)}:line:"


def line_member(sku: str, order_id: str) -> str:
    """The expiry index member (and line key suffix) of one order line."""
    return f"{sku}|{order_id}"


def split_member(member: str) -> tuple[str, str]:
    sku, _, order_id = member.partition("|")
    return sku, order_id


def due_key(bucket: int) -> str:
    return f"{bucket_tag(bucket)}:due"


def events_key(bucket: int) -> str:
    return f"{bucket_tag(bucket)}:events"


def line_keys(sku: str, order_id: str, buckets: int) -> LineKeys:
    tag = bucket_tag(bucket_of(sku, buckets))
    return LineKeys(
        sku=f"{tag}:sku:{sku}",
        line=f"{tag}:line:{line_member(sku, order_id)}",
        due=f"{tag}:due",
        events=f"{tag}:events",
    )


def locations_key(sku: str, buckets: int) -> str:
    """A SKU's locations (``lua/_loc.lua``): beside its counters, in its bucket."""
    return f"{bucket_tag(bucket_of(sku, buckets))}:loc:{sku}"


def alloc_key(sku: str, order_id: str, buckets: int) -> str:
    """A line's allocations on a SKU with locations (``lua/_loc.lua``), beside the line."""
    return f"{bucket_tag(bucket_of(sku, buckets))}:alloc:{line_member(sku, order_id)}"


def transfers_key(sku: str, buckets: int) -> str:
    """A SKU's transfers between its locations (``lua/locations.lua``)."""
    return f"{bucket_tag(bucket_of(sku, buckets))}:xfer:{sku}"


def order_key(order_id: str) -> str:
    return f"{PREFIX}:order:{{{order_id}}}"


def order_copy_key(bucket: int, order_id: str) -> str:
    """On a cluster: the bucket's copy of an order (``kind|items``) beside its lines."""
    return f"{bucket_tag(bucket)}:order:{order_id}"


def order_lock_key(order_id: str) -> str:
    """A multi-node transition's lock, in the order record's slot."""
    return f"{PREFIX}:order:{{{order_id}}}:lock"


def all_events_keys(buckets: int) -> list[str]:
    return [events_key(b) for b in range(buckets)]


def sku_key_pattern() -> str:
    """A SCAN MATCH pattern for every SKU counters hash (all buckets)."""
    return f"{PREFIX}:{{b*}}:sku:*"


def sku_of_key(key: str) -> str:
    """The SKU of a counters hash key (inverse of ``sku_key``)."""
    return key.partition(":sku:")[2]


def reconcile_key() -> str:
    """The outcome of the last ``stock reconcile`` (JSON), read by the health route."""
    return f"{PREFIX}:reconcile:last"


# -- sharded SKUs (lua/README.md "Sharded SKUs") ------------------------------------
# Shard 0 of SKU ``s`` is ``s`` itself; shard i > 0 is the SKU name ``s#i`` (a SKU
# never contains ``#``, DESIGN §6), an ordinary SKU of its own bucket.
SHARD_SEP = "#"


def shard_sku(sku: str, index: int) -> str:
    return sku if index == 0 else f"{sku}{SHARD_SEP}{index}"


def base_sku(name: str) -> tuple[str, int]:
    """The SKU and shard index of a shard's SKU name (``s`` -> (s, 0))."""
    sku, sep, index = name.partition(SHARD_SEP)
    return sku, int(index) if sep else 0


def shards_key() -> str:
    """The registry of sharded SKUs: hash sku -> ``shards|span|lmod|limited``."""
    return f"{PREFIX}:shards"


def moves_key(sku: str, index: int, buckets: int) -> str:
    """A shard's moves in flight out of it: hash move id -> ``dest|qty|ms``."""
    name = shard_sku(sku, index)
    return f"{bucket_tag(bucket_of(name, buckets))}:moves:{name}"


def move_marker_key(sku: str, index: int, buckets: int, move_id: str) -> str:
    """The destination's proof that a move was credited (idempotent by move id)."""
    name = shard_sku(sku, index)
    return f"{bucket_tag(bucket_of(name, buckets))}:movein:{move_id}"


def with_shards(skus: list[str], known: list[str]) -> list[str]:
    """``skus`` and the shards (``s#i``) of each among the names ``known``."""
    wanted = set(skus)
    return sorted(wanted | {n for n in known if base_sku(n)[0] in wanted})
