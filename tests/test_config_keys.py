"""Pure-Python units: settings from the environment, the key layout, the spec codec, the
line call layout."""

from __future__ import annotations

from typing import Any

import pytest
from redis.crc import key_slot

from stock.core import keys
from stock.core.config import Settings
from stock.core.errors import ConfigError, StockError
from stock.core.formats import items_spec, parse_spec
from stock.core.validate import Item
from stock.redis.scripts import NO_ORDER_KEY, WITH_COPY, line_call


def test_defaults_match_design() -> None:
    s = Settings.from_env({})
    assert (s.redis_url, s.redis_cluster, s.port) == ("redis://127.0.0.1:6379/0", False, 8080)
    assert (s.reservation_ttl_s, s.retention_s, s.reaper_period_s) == (900, 7 * 86_400, 0.25)


def test_environment_is_read() -> None:
    s = Settings.from_env(
        {
            "STOCK_REDIS_URL": "redis://h:1/2",
            "STOCK_REDIS_CLUSTER": "1",
            "STOCK_PORT": "9000",
            "STOCK_BUCKETS": "128",
            "STOCK_REAPER_PERIOD_S": "0.5",
        }
    )
    assert (s.redis_url, s.redis_cluster, s.port, s.buckets) == ("redis://h:1/2", True, 9000, 128)
    assert s.reaper_period_s == 0.5


def test_environment_of_settings_reads_back_as_the_same_settings() -> None:
    """A child process started with ``Settings.environment`` runs with these settings,
    whatever the parent's own STOCK_* variables say."""
    s = Settings(
        redis_url="redis://h:1/2",
        redis_cluster=True,
        database_url="postgresql://x/y",
        admin_token="t",
        port=9001,
        reaper_period_s=0.1,
        buckets=16,
        fence_ttl_s=2.5,
        payment_status_url="http://pay/{order_id}",
    )
    env = s.environment()
    assert sorted(env) == sorted(Settings.variables())
    assert Settings.from_env(env) == s
    assert Settings.from_env(Settings().environment()) == Settings()


def test_overrides_beat_environment() -> None:
    s = Settings.from_env({"STOCK_PORT": "9000"}, port=9100, host=None)
    assert (s.port, s.host) == (9100, "127.0.0.1")


@pytest.mark.parametrize(
    ("variable", "value"),
    [
        ("STOCK_PORT", "eighty"),
        ("STOCK_PORT", "70000"),
        ("STOCK_REDIS_CLUSTER", "maybe"),
        ("STOCK_REDIS_URL", "http://x"),
        ("STOCK_RESERVATION_TTL_S", "0"),
        ("STOCK_BUCKETS", "0"),
        ("STOCK_REAPER_PERIOD_S", "fast"),
    ],
)
def test_bad_value_names_the_variable(variable: str, value: str) -> None:
    with pytest.raises(ConfigError, match=variable) as caught:
        Settings.from_env({variable: value})
    assert isinstance(caught.value, StockError)  # the one hierarchy
    assert isinstance(caught.value, ValueError)  # what a caller of a parser expects


def test_bucket_is_stable_and_bounded() -> None:
    assert keys.bucket_of("SKU-1", 64) == keys.bucket_of("SKU-1", 64)
    assert keys.bucket_of("SKU-1", 64) == 3_993_447_348 % 64  # crc32("SKU-1"), not hash()
    assert {keys.bucket_of(f"S{i}", 16) for i in range(1000)} == set(range(16))


def test_a_lines_keys_share_one_slot() -> None:
    line = keys.line_keys("SKU-1", "order{with}braces|and|bars", 64)
    assert len({key_slot(k.encode()) for k in line}) == 1
    assert keys.sku_key("SKU-1", 64) == line.sku
    bucket, member = (
        keys.bucket_of("SKU-1", 64),
        keys.line_member("SKU-1", "order{with}braces|and|bars"),
    )
    assert keys.sku_key_in(bucket, "SKU-1") == line.sku  # the reaper's way, bucket known
    assert keys.line_key_prefix(bucket) + member == line.line
    assert key_slot(keys.order_key("o-1").encode()) == key_slot(b"o-1")


def test_member_splits_at_first_bar() -> None:
    member = keys.line_member("SKU-1", "order|with|bars")
    assert keys.split_member(member) == ("SKU-1", "order|with|bars")


def test_items_spec_is_canonical() -> None:
    a = items_spec([Item("B", 1), Item("A", 2)])
    assert a == items_spec([Item("A", 2), Item("B", 1)]) == "A:2,B:1"
    assert parse_spec(a) == [Item("A", 2), Item("B", 1)]
    assert parse_spec("a:b:c:3") == [Item("a:b:c", 3)]
    assert parse_spec("") == []  # a TCC tombstone's


def test_every_setting_is_documented() -> None:
    from pathlib import Path

    page = (Path(__file__).resolve().parent.parent / "docs" / "configuration.md").read_text()
    assert [v for v in Settings.variables() if f"`{v}`" not in page] == []


@pytest.mark.parametrize(
    ("meaning", "slot"),
    [
        ({"order_kind": "deduct"}, "deduct"),
        ({"hold_for": "confirm"}, "confirm"),
        ({"undo_holds": True}, "hold"),
    ],
)
def test_the_kind_slot_carries_the_meaning_named(meaning: dict[str, Any], slot: str) -> None:
    """ARGV[7] of a line call (lua/_lib.lua) is the order's kind, the step a hold
    prepares, or the undo of a hold's changes: each has its own name in Python."""
    _keys, args = line_call(
        buckets=16,
        retention_ms=1,
        mode=NO_ORDER_KEY,
        order_id="o",
        items=[Item("A", 1)],
        spec="A:1",
        **meaning,
    )
    assert args[6] == slot


@pytest.mark.parametrize(
    "meanings",
    [{}, {"order_kind": "reserve", "hold_for": "confirm"}, {"order_kind": "x", "undo_holds": True}],
)
def test_a_line_call_names_one_meaning_of_its_kind_slot(meanings: dict[str, Any]) -> None:
    """None or two of them: refused before anything is sent."""
    with pytest.raises(ValueError, match="one of order_kind, hold_for, undo_holds"):
        line_call(
            buckets=16,
            retention_ms=1,
            mode=WITH_COPY,
            order_id="o",
            items=[Item("A", 1)],
            spec="A:1",
            **meanings,
        )
