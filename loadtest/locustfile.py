"""Flash-sale load scenarios for locust (``make loadtest`` runs them headless and checks).

Scenarios (one user class each, weighted):

- ``FlashSaleBuyer``: many buyers race for a few units of a hot SKU; reserve then
  pay at once, or buy now (deduct). ``insufficient_stock`` is the expected answer
  once the units are gone.
- ``CheckoutShopper``: reserve, think, then confirm, release, or abandon (reserved
  with a short TTL and never called back: the reaper returns it), or extend and
  still be paying when the test ends. Some confirmed orders are refunded by an
  admin (cancel).
- ``LatePayer``: reserve with a 1 s TTL, the payment callback arrives after the
  expiry: confirm re-acquires the stock (200) or is ``reservation_expired`` (409);
  the callback is delivered twice.
- ``CartShopper``: multi-item carts over several SKUs, all or nothing.
- ``RetryingClient``: the first request times out on the client side and the client
  retries the same ``order_id``: the retry must answer the same order, once.
- ``Restocker``: an admin adds stock now and then (``adjust``), journaled.
- ``LimitedBuyer``: a few customers (scalpers) keep buying a SKU with a
  per-customer limit; ``limit_exceeded`` is the expected answer past it.
- ``LostCallback``: reserve with a 1 s TTL, pay, and the payment callback is
  lost (no confirm): the stock comes back at expiry; ``make loadtest`` then
  runs ``stock reconcile-payments --repair`` with these orders marked paid.

Every user makes fresh order ids. The catalogue comes from ``LOADTEST_CATALOG``
(JSON ``{"flash": [...], "skus": [...]}``), defaulting to ``stock dev``'s demo
SKUs; admin calls use ``STOCK_ADMIN_TOKEN``. With ``LOADTEST_JOURNAL`` set, each
outcome the checks need (confirmed lines, cancels, restocks) is appended there
as one JSON line.

    locust -f loadtest/locustfile.py -H http://127.0.0.1:8080
"""

from __future__ import annotations

import itertools
import json
import os
import random
import threading
import uuid
from typing import Any

import gevent
from locust import FastHttpUser, HttpUser, between, task

DEFAULT_CATALOG = {"flash": ["PHONE-1"], "skus": ["TICKET-A", "TSHIRT-M"]}
CATALOG: dict[str, list[str]] = json.loads(os.environ.get("LOADTEST_CATALOG", "null")) or (
    DEFAULT_CATALOG
)
FLASH = CATALOG["flash"]
SKUS = CATALOG["skus"]
LIMITED = CATALOG.get("limited", [])
CUSTOMERS = 20  # customers per limited SKU
ADMIN = {"Authorization": f"Bearer {os.environ.get('STOCK_ADMIN_TOKEN', '')}"}
JSON = {"Content-Type": "application/json"}

_journal_lock = threading.Lock()
_journal_path = os.environ.get("LOADTEST_JOURNAL")


def journal(kind: str, **fields: Any) -> None:
    """Append one outcome the checks need (confirmed lines, cancels, restocks)."""
    if not _journal_path:
        return
    line = json.dumps({"kind": kind, **fields}) + "\n"
    with _journal_lock, open(_journal_path, "a") as out:
        out.write(line)


def error_code(response: Any) -> str:
    try:
        return str(response.json().get("error", ""))
    except Exception:
        return ""


class Shopper(FastHttpUser):
    """Common helpers: fresh order ids and calls whose expected answers are declared."""

    abstract = True
    wait_time = between(0.05, 0.5)

    def on_start(self) -> None:
        self.prefix = f"lt-{uuid.uuid4().hex[:12]}"
        self.counter = itertools.count()

    def new_order(self) -> str:
        return f"{self.prefix}-{next(self.counter)}"

    def call(
        self,
        method: str,
        path: str,
        name: str,
        body: Any = None,
        expect: dict[int, set[str]] | None = None,
        headers: dict[str, str] | None = None,
    ) -> tuple[int, Any]:
        """One request; ``expect`` maps each acceptable status to its acceptable error
        codes (empty set: any body). Anything else is a locust failure."""
        expect = expect or {200: set()}
        data = json.dumps(body) if body is not None else None
        with self.client.request(
            method,
            path,
            name=name,
            data=data,
            headers={**JSON, **(headers or {})},
            catch_response=True,
        ) as response:
            status = response.status_code
            payload: Any = None
            try:
                payload = response.json()
            except Exception:
                payload = None
            codes = expect.get(status)
            code = payload.get("error", "") if isinstance(payload, dict) else ""
            if codes is None or (codes and code not in codes):
                response.failure(f"{status} {code or (response.text or '')[:120]}")
            else:
                response.success()
            return status, payload

    def reserve(
        self, order_id: str, items: list[dict[str, Any]], ttl_s: int, name: str
    ) -> tuple[int, Any]:
        body = {"order_id": order_id, "items": items, "ttl_s": ttl_s}
        return self.call(
            "POST",
            "/v1/reservations",
            name,
            body,
            {201: set(), 409: {"insufficient_stock"}},
        )

    def confirm(self, order_id: str, items: list[dict[str, Any]], late: bool = False) -> int:
        expect: dict[int, set[str]] = {200: set()}
        if late:
            expect[409] = {"reservation_expired"}
        status, payload = self.call(
            "POST",
            f"/v1/reservations/{order_id}/confirm",
            "/v1/reservations/[id]/confirm" + (" (late)" if late else ""),
            expect=expect,
        )
        if status == 200 and payload and payload.get("status") == "confirmed":
            for item in items:
                journal("confirmed", order=order_id, sku=item["sku"], qty=item["qty"])
        return status

    def release(self, order_id: str) -> int:
        status, _ = self.call(
            "POST", f"/v1/reservations/{order_id}/release", "/v1/reservations/[id]/release"
        )
        return status

    def cancel(self, order_id: str, items: list[dict[str, Any]]) -> None:
        for item in items:  # journaled before the call: a lost answer may still have cancelled
            journal("cancel", order=order_id, sku=item["sku"], qty=item["qty"])
        self.call("POST", f"/v1/orders/{order_id}/cancel", "/v1/orders/[id]/cancel", headers=ADMIN)


class FlashSaleBuyer(Shopper):
    """Many buyers, few units of a hot SKU."""

    weight = 6
    wait_time = between(0.02, 0.2)

    @task(3)
    def reserve_and_pay(self) -> None:
        order = self.new_order()
        items = [{"sku": random.choice(FLASH), "qty": 1}]
        status, _ = self.reserve(order, items, 120, "/v1/reservations (flash)")
        if status == 201:
            self.confirm(order, items)

    @task(1)
    def buy_now(self) -> None:
        order = self.new_order()
        items = [{"sku": random.choice(FLASH), "qty": 1}]
        status, payload = self.call(
            "POST",
            "/v1/deductions",
            "/v1/deductions (flash)",
            {"order_id": order, "items": items},
            {201: set(), 409: {"insufficient_stock"}},
        )
        if status == 201 and payload.get("status") == "confirmed":
            journal("confirmed", order=order, sku=items[0]["sku"], qty=1)


class CheckoutShopper(Shopper):
    """Reserve, think, then confirm (some refunded later), release, or abandon."""

    weight = 4
    wait_time = between(0.1, 0.6)

    @task
    def checkout(self) -> None:
        order = self.new_order()
        items = [{"sku": random.choice(SKUS), "qty": random.randint(1, 3)}]
        outcome = random.choices(["confirm", "release", "abandon", "paying"], [45, 25, 25, 5])[0]
        ttl = 2 if outcome == "abandon" else 600
        status, _ = self.reserve(order, items, ttl, "/v1/reservations (checkout)")
        if status != 201 or outcome == "abandon":
            return  # abandoned: the reaper returns the stock after 2 s
        gevent.sleep(random.uniform(0.05, 0.5))  # paying
        if outcome == "paying":  # still paying when the test ends: held, with a later expiry
            self.call(
                "POST",
                f"/v1/reservations/{order}/extend",
                "/v1/reservations/[id]/extend",
                {"ttl_s": 900},
            )
        elif outcome == "release":
            self.release(order)
        elif self.confirm(order, items) == 200 and random.random() < 0.1:
            self.cancel(order, items)  # refund


class LatePayer(Shopper):
    """The payment callback arrives after the reservation expired, and twice."""

    weight = 2
    wait_time = between(0.2, 1.0)

    @task
    def late_callback(self) -> None:
        order = self.new_order()
        items = [{"sku": random.choice(SKUS + FLASH), "qty": 1}]
        status, _ = self.reserve(order, items, 1, "/v1/reservations (ttl 1 s)")
        if status != 201:
            return
        gevent.sleep(random.uniform(1.2, 2.5))
        if self.confirm(order, items, late=True) == 200:
            self.confirm(order, items)  # the callback delivered again: a replay


class CartShopper(Shopper):
    """Multi-item carts over several SKUs: all or nothing."""

    weight = 3
    wait_time = between(0.1, 0.6)

    @task
    def cart(self) -> None:
        order = self.new_order()
        chosen = random.sample(SKUS, random.randint(2, min(4, len(SKUS))))
        if random.random() < 0.2:
            chosen[0] = random.choice(FLASH)  # a hot item in the cart: often refused whole
        items = [{"sku": sku, "qty": random.randint(1, 2)} for sku in chosen]
        status, payload = self.reserve(order, items, 600, "/v1/reservations (cart)")
        if status != 201:
            return
        if sorted((i["sku"], i["qty"]) for i in payload["items"]) != sorted(
            (i["sku"], i["qty"]) for i in items
        ):
            raise AssertionError(f"cart {order}: answered items {payload['items']}")
        gevent.sleep(random.uniform(0.05, 0.3))
        if random.random() < 0.7:
            self.confirm(order, items)
        else:
            self.release(order)


class RetryingClient(HttpUser):
    """A client whose first request times out retries the same order_id."""

    weight = 2
    wait_time = between(0.1, 0.6)

    def on_start(self) -> None:
        self.prefix = f"lt-r-{uuid.uuid4().hex[:12]}"
        self.counter = itertools.count()

    def send(self, path: str, name: str, body: Any, timeout: float) -> tuple[int, Any]:
        """POST; a client-side timeout (status 0) counts as an expected outcome here."""
        with self.client.post(
            path,
            name=name,
            data=json.dumps(body) if body is not None else None,
            headers=JSON,
            timeout=timeout,
            catch_response=True,
        ) as response:
            status = response.status_code
            payload = None
            if status:
                try:
                    payload = response.json()
                except Exception:
                    payload = None
            code = payload.get("error") if isinstance(payload, dict) else None
            if status in (0, 200, 201) or code == "insufficient_stock":
                response.success()
            else:
                response.failure(f"{status} {code or (response.text or '')[:120]}")
            return status, payload

    @task
    def retry_after_timeout(self) -> None:
        order = f"{self.prefix}-{next(self.counter)}"
        items = [{"sku": random.choice(SKUS), "qty": random.randint(1, 2)}]
        body = {"order_id": order, "items": items, "ttl_s": 600}
        first, _ = self.send("/v1/reservations", "/v1/reservations (timed out)", body, 0.002)
        status, payload = 0, None
        for _attempt in range(5):  # retry the same order until an answer arrives
            status, payload = self.send("/v1/reservations", "/v1/reservations (retry)", body, 10)
            if status:
                break
            gevent.sleep(0.2)
        journal("retry", order=order, first=first, retry=status)
        if status not in (200, 201):
            return
        if not payload or payload.get("order_id") != order or payload.get("status") != "reserved":
            raise AssertionError(f"retry of {order} answered {payload}")
        path = f"/v1/reservations/{order}/confirm"
        self.send(path, "/v1/reservations/[id]/confirm (timed out)", None, 0.002)
        for _attempt in range(5):
            status, payload = self.send(path, "/v1/reservations/[id]/confirm (retry)", None, 10)
            if status:
                break
            gevent.sleep(0.2)
        if status == 200 and payload and payload.get("status") == "confirmed":
            for item in items:
                journal("confirmed", order=order, sku=item["sku"], qty=item["qty"])
        elif status:
            raise AssertionError(f"confirm retry of {order}: {status} {payload}")


class Restocker(Shopper):
    """An admin restocks a SKU now and then; each adjust is journaled with its reason."""

    weight = 1
    fixed_count = 1
    wait_time = between(1.0, 3.0)

    @task
    def restock(self) -> None:
        sku = random.choice(SKUS)
        delta = random.randint(5, 50)
        reason = f"{self.new_order()}-restock"
        journal("adjust", sku=sku, delta=delta, reason=reason, outcome="sent")
        status, _ = self.call(
            "POST",
            f"/v1/stock/{sku}/adjust",
            "/v1/stock/[sku]/adjust",
            {"delta": delta, "reason": reason},
            headers=ADMIN,
        )
        if status == 200:
            journal("adjust", sku=sku, delta=delta, reason=reason, outcome="ok")


class LimitedBuyer(Shopper):
    """Scalpers: a few customers buy a limited SKU again and again."""

    weight = 2
    wait_time = between(0.05, 0.3)

    @task
    def buy_limited(self) -> None:
        if not LIMITED:
            return
        order = self.new_order()
        sku = random.choice(LIMITED)
        customer = f"{sku}-c{random.randrange(CUSTOMERS)}"
        items = [{"sku": sku, "qty": random.randint(1, 2)}]
        status, payload = self.call(
            "POST",
            "/v1/deductions",
            "/v1/deductions (limited)",
            {"order_id": order, "items": items, "customer_id": customer},
            {201: set(), 409: {"limit_exceeded", "insufficient_stock"}},
        )
        if status == 201 and payload.get("status") == "confirmed":
            journal("confirmed", order=order, sku=sku, qty=items[0]["qty"], customer=customer)


class LostCallback(Shopper):
    """Paid, but the payment callback never arrives: the reservation expires."""

    weight = 1
    wait_time = between(0.2, 1.0)

    @task
    def pay_and_lose_the_callback(self) -> None:
        order = self.new_order()
        items = [{"sku": random.choice(SKUS), "qty": 1}]
        status, _ = self.reserve(order, items, 1, "/v1/reservations (lost callback)")
        if status == 201:
            journal("lost_callback", order=order, sku=items[0]["sku"], qty=1)
