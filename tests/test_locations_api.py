"""The location routes and fields of DESIGN §13 through aiohttp's test client, on
both backends."""

from __future__ import annotations

from typing import Any

from aiohttp.test_utils import TestClient

from tests.test_api import ADMIN, api, put_stock, reserve

__all__ = ["api"]  # the fixture

Client = TestClient[Any, Any]


async def put_location(api: Client, sku: str, where: str, available: int) -> Any:
    response = await api.put(
        f"/v1/stock/{sku}/locations/{where}", json={"available": available}, headers=ADMIN
    )
    assert response.status == 200, await response.text()
    return await response.json()


async def test_locations_are_set_read_and_adjusted(api: Client) -> None:
    unauthorized = await api.put("/v1/stock/S/locations/berlin", json={"available": 3})
    assert unauthorized.status == 401
    bad = await api.put("/v1/stock/S/locations/ber%20lin", json={"available": 3}, headers=ADMIN)
    assert bad.status == 400 and (await bad.json())["field"] == "location"
    await put_location(api, "S", "berlin", 3)
    body = await put_location(api, "S", "paris", 4)
    assert (body["available"], body["in_transit"]) == (7, 0)
    read = await (await api.get("/v1/stock/S")).json()
    assert read["locations"] == {
        "berlin": {"available": 3, "reserved": 0, "sold": 0, "in_transit": 0},
        "paris": {"available": 4, "reserved": 0, "sold": 0, "in_transit": 0},
    }
    url = "/v1/stock/S/adjust"
    plain = await api.post(url, json={"delta": 1}, headers=ADMIN)
    assert plain.status == 400 and (await plain.json())["field"] == "location"
    whole = await api.put("/v1/stock/S", json={"available": 9}, headers=ADMIN)
    assert whole.status == 400 and (await whole.json())["field"] == "location"
    at = await api.post(url, json={"delta": -2, "location": "paris"}, headers=ADMIN)
    body = await at.json()
    assert at.status == 200 and body["available"] == 5
    assert body["locations"]["paris"]["available"] == 2
    short = await api.post(url, json={"delta": -3, "location": "paris"}, headers=ADMIN)
    assert short.status == 409 and (await short.json())["error"] == "insufficient_stock"


async def test_allocation_strategy_and_pinned_items(api: Client) -> None:
    await put_location(api, "S", "berlin", 1)
    await put_location(api, "S", "paris", 5)
    url = "/v1/stock/S/allocation"
    for body, field in (
        ({"strategy": "nearest"}, "strategy"),
        ({"strategy": "priority", "order": "berlin"}, "order"),
        ({"strategy": "priority", "order": None}, "order"),
        ({"strategy": "most_available", "split": "yes"}, "split"),
    ):
        refused = await api.put(url, json=body, headers=ADMIN)
        assert refused.status == 400 and (await refused.json())["field"] == field
    done = await api.put(
        url,
        json={"strategy": "priority", "order": ["berlin", "paris"], "split": True},
        headers=ADMIN,
    )
    assert done.status == 200
    split = await reserve(api, "o1", [{"sku": "S", "qty": 3}])
    assert split.status == 201
    assert (await split.json())["items"] == [
        {
            "sku": "S",
            "qty": 3,
            "allocations": [{"location": "berlin", "qty": 1}, {"location": "paris", "qty": 2}],
        }
    ]
    pinned = await reserve(api, "o2", [{"sku": "S", "qty": 4, "location": "paris"}])
    body = await pinned.json()
    assert pinned.status == 409 and body["error"] == "insufficient_stock"
    assert body["items"] == [{"sku": "S", "available": 3, "location": "paris"}]
    bad = await reserve(api, "o3", [{"sku": "S", "qty": 1, "location": "a b"}])
    assert bad.status == 400 and (await bad.json())["field"] == "items[0].location"
    read = await (await api.get("/v1/reservations/o1")).json()
    assert read["items"][0]["allocations"] == [
        {"location": "berlin", "qty": 1},
        {"location": "paris", "qty": 2},
    ]
    confirmed = await api.post("/v1/reservations/o1/confirm")
    assert (await confirmed.json())["items"][0]["allocations"] == [
        {"location": "berlin", "qty": 1},
        {"location": "paris", "qty": 2},
    ]
    await put_stock(api, "PLAIN", 2)
    plain = await reserve(api, "o4", [{"sku": "PLAIN", "qty": 1, "location": "paris"}])
    assert plain.status == 400 and (await plain.json())["field"] == "location"


async def test_transfers(api: Client) -> None:
    await put_location(api, "S", "berlin", 5)
    url = "/v1/stock/S/transfers"
    move = {"transfer_id": "t1", "from": "berlin", "to": "paris", "qty": 2, "reason": "rebalance"}
    first = await api.post(url, json=move, headers=ADMIN)
    assert first.status == 201 and (await first.json())["state"] == "in_transit"
    again = await api.post(url, json=move, headers=ADMIN)
    assert again.status == 200
    other = await api.post(url, json={**move, "qty": 1}, headers=ADMIN)
    assert other.status == 409 and (await other.json())["error"] == "order_conflict"
    much = await api.post(url, json={**move, "transfer_id": "t2", "qty": 9}, headers=ADMIN)
    body = await much.json()
    assert much.status == 409 and body["error"] == "insufficient_stock"
    assert body["items"] == [{"sku": "S", "available": 3, "location": "berlin"}]
    read = await (await api.get("/v1/stock/S")).json()
    assert (read["available"], read["in_transit"]) == (3, 2)
    assert read["locations"]["berlin"]["in_transit"] == 2
    received = await api.post(f"{url}/t1/receive", headers=ADMIN)
    assert received.status == 200 and (await received.json())["state"] == "received"
    assert (await api.post(f"{url}/t1/receive", headers=ADMIN)).status == 200
    assert (await api.post(f"{url}/nope/receive", headers=ADMIN)).status == 404
    read = await (await api.get("/v1/stock/S")).json()
    assert (read["available"], read["in_transit"]) == (5, 0)
    assert read["locations"]["paris"]["available"] == 2
    listed = await (await api.get(url, headers=ADMIN)).json()
    assert [t["state"] for t in listed["transfers"]] == ["received"]


async def test_shards_and_locations_are_refused_together(api: Client) -> None:
    """DESIGN §13: the two do not compose yet; the second PUT says so (400)."""
    await put_location(api, "LOC", "berlin", 3)
    sharded = await api.put("/v1/stock/LOC", json={"shards": 4}, headers=ADMIN)
    assert sharded.status == 400, await sharded.text()
    assert (await sharded.json())["field"] == "shards"
    await put_stock(api, "HOTL", 8)
    assert (await api.put("/v1/stock/HOTL", json={"shards": 4}, headers=ADMIN)).status == 200
    located = await api.put("/v1/stock/HOTL/locations/berlin", json={"available": 3}, headers=ADMIN)
    assert located.status == 400, await located.text()
    body = await located.json()
    assert body["field"] == "location" and "sharded" in body["message"]
    # shards back to 1 on a SKU with locations is no combination
    assert (await api.put("/v1/stock/LOC", json={"shards": 1}, headers=ADMIN)).status == 200
