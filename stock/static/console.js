// The stock operator console: plain DOM, no framework, no build step.
// Every action is a call to the service's JSON API with the admin bearer token.
"use strict";

const TOKEN_KEY = "stock-admin-token";
const HEALTH_EVERY_MS = 5000;
const $ = (id) => document.getElementById(id);
let currentSku = null;
let currentOrder = null;
let healthTimer = null;

class ApiError extends Error {
  constructor(status, body) {
    super(body && body.message ? `${body.error}: ${body.message}` : `HTTP ${status}`);
    this.status = status;
    this.body = body;
  }
}

async function api(method, path, body, token) {
  const headers = { Authorization: `Bearer ${token || sessionStorage.getItem(TOKEN_KEY) || ""}` };
  const init = { method, headers };
  if (body !== undefined) {
    headers["Content-Type"] = "application/json";
    init.body = JSON.stringify(body);
  }
  const response = await fetch(path, init);
  let answer = null;
  try {
    answer = await response.json();
  } catch (_) {
    answer = null;
  }
  if (!response.ok) throw new ApiError(response.status, answer);
  return answer;
}

function showError(message) {
  const box = $("error");
  box.textContent = message;
  box.hidden = false;
}

function clearError() {
  $("error").textContent = "";
  $("error").hidden = true;
}

// Run an action; any refusal or failure lands in [data-test=error].
async function act(action) {
  try {
    await action();
    clearError();
  } catch (err) {
    if (err instanceof ApiError && err.status === 401) {
      logout();
      showError("The admin token was refused: log in again.");
    } else {
      showError(err.message || String(err));
    }
  }
}

function cell(row, text) {
  const td = document.createElement("td");
  td.textContent = text === null || text === undefined ? "" : String(text);
  row.appendChild(td);
}

// -- login ------------------------------------------------------------------

async function login(token) {
  let health;
  try {
    health = await api("GET", "/v1/admin/health", undefined, token);
  } catch (err) {
    if (err instanceof ApiError && err.status === 401) {
      throw new Error("Wrong admin token: the service refused it.");
    }
    throw err;
  }
  sessionStorage.setItem(TOKEN_KEY, token);
  $("login-panel").hidden = true;
  $("main").hidden = false;
  $("logout").hidden = false;
  renderHealth(health);
  clearInterval(healthTimer);
  healthTimer = setInterval(() => refreshHealth().catch(() => {}), HEALTH_EVERY_MS);
}

function logout() {
  sessionStorage.removeItem(TOKEN_KEY);
  clearInterval(healthTimer);
  $("main").hidden = true;
  $("logout").hidden = true;
  $("login-panel").hidden = false;
  $("token").value = "";
}

// -- health -----------------------------------------------------------------

function seconds(value) {
  return value === null || value === undefined ? "n/a" : `${Number(value).toFixed(2)} s`;
}

function renderHealth(h) {
  const rows = [
    ["Redis", h.redis],
    ["PostgreSQL", h.postgres],
    ["expiry lag", seconds(h.expiry_lag_s)],
    ["flush lag", seconds(h.flush_lag_s)],
    ["writer buckets held", h.writer
      ? `${h.writer.held} / ${h.writer.buckets}, ${h.writer.writers} writer(s)` : "n/a"],
    ["payment probe", h.payment_probe
      ? Object.entries(h.payment_probe).map(([k, v]) => `${k} ${v}`).join(", ") || "no probes yet"
      : "not configured (STOCK_PAYMENT_STATUS_URL)"],
    ["last reconcile", h.reconcile
      ? `${h.reconcile.at}: ${h.reconcile.checked} checked, ${h.reconcile.drifting} drifting`
      : "never run"],
  ];
  const list = $("health");
  list.replaceChildren();
  for (const [name, value] of rows) {
    const dt = document.createElement("dt");
    dt.textContent = name;
    const dd = document.createElement("dd");
    dd.textContent = value;
    dd.dataset.name = name;
    list.append(dt, dd);
  }
  for (const drift of (h.reconcile && h.reconcile.drifts) || []) {
    const dd = document.createElement("dd");
    dd.className = "drift";
    dd.textContent = drift;
    list.append(dd);
  }
}

async function refreshHealth() {
  renderHealth(await api("GET", "/v1/admin/health"));
}

// -- SKU ----------------------------------------------------------------------

function renderCounters(c) {
  $("sku-name").textContent = c.sku;
  $("sku-available").textContent = c.available;
  $("sku-reserved").textContent = c.reserved;
  $("sku-sold").textContent = c.sold;
}

async function lookupSku(sku) {
  const counters = await api("GET", `/v1/stock/${encodeURIComponent(sku)}`);
  currentSku = counters.sku;
  renderCounters(counters);
  $("adjust-sku").textContent = currentSku;
  $("sku-view").hidden = false;
  renderLocations(counters);
  await Promise.all([loadLimits(currentSku), loadLedger(currentSku), loadTransfers(counters)]);
}

// A SKU with locations (DESIGN §13): its locations, allocation strategy, open transfers.
function renderLocations(c) {
  $("locations-view").hidden = !c.locations;
  if (!c.locations) return;
  const a = c.allocation || {};
  const order = a.strategy === "priority" && a.order && a.order.length ? ` (${a.order.join(", ")})` : "";
  $("allocation").textContent =
    `allocation: ${a.strategy}${order}, split ${a.split ? "on" : "off"}; in transit ${c.in_transit}`;
  const body = $("locations").tBodies[0];
  body.replaceChildren();
  for (const [name, l] of Object.entries(c.locations)) {
    const row = document.createElement("tr");
    for (const v of [name, l.available, l.reserved, l.sold, l.in_transit]) cell(row, v);
    body.appendChild(row);
  }
}

async function loadTransfers(c) {
  const body = $("transfers").tBodies[0];
  body.replaceChildren();
  if (!c.locations) return;
  const answer = await api("GET", `/v1/stock/${encodeURIComponent(c.sku)}/transfers`);
  for (const t of answer.transfers.filter((t) => t.state === "in_transit")) {
    const row = document.createElement("tr");
    for (const v of [t.transfer_id, t.from, t.to, t.qty, t.reason]) cell(row, v);
    body.appendChild(row);
  }
}

async function loadLimits(sku) {
  const box = $("limits");
  try {
    const limits = await api("GET", `/v1/stock/${encodeURIComponent(sku)}/limits`);
    box.textContent = limits.per_customer === null || limits.per_customer === undefined
      ? "no limits" : `at most ${limits.per_customer} per customer`;
  } catch (err) {
    if (!(err instanceof ApiError) || err.status !== 404) throw err;
    box.textContent = "no limits";
  }
}

async function loadLedger(sku) {
  const body = $("ledger").tBodies[0];
  let answer;
  try {
    answer = await api("GET", `/v1/stock/${encodeURIComponent(sku)}/ledger?limit=50`);
  } catch (err) {
    if (!(err instanceof ApiError) || err.status !== 404) throw err;
    body.replaceChildren();
    $("ledger-note").textContent = "no ledger: the service has no PostgreSQL";
    return [];
  }
  $("ledger-note").textContent =
    `newest ${answer.rows.length} row(s) among the newest ${answer.window} of the ledger`;
  body.replaceChildren();
  for (const r of answer.rows) {
    const row = document.createElement("tr");
    row.title = r.at || "";
    for (const v of [shortTime(r.at), r.op, r.order_id, r.qty, r.available, r.reserved, r.sold, r.seq,
      r.reason]) cell(row, v);
    body.appendChild(row);
  }
  return answer.rows;
}

// "2026-12-02T06:18:37.171Z" -> "06:18:37.171" (the full time is the row's tooltip)
function shortTime(iso) {
  return iso ? iso.slice(11, 23) : "";
}

async function adjust() {
  if (!currentSku) throw new Error("Look up a SKU first.");
  const deltaText = $("adjust-delta").value.trim();
  const delta = Number(deltaText);
  const reason = $("adjust-reason").value.trim();
  if (!/^-?\d+$/.test(deltaText) || delta === 0) {
    throw new Error("delta must be a whole number other than 0");
  }
  if (!reason) throw new Error("a reason is required for every adjustment");
  if (reason.length > 200) throw new Error("reason must be at most 200 characters");
  const sku = currentSku;
  const location = $("adjust-location").value.trim();
  const counters = await api("POST", `/v1/stock/${encodeURIComponent(sku)}/adjust`,
    location ? { delta, reason, location } : { delta, reason });
  renderCounters(counters);
  renderLocations(counters);
  $("adjust-delta").value = "";
  $("adjust-reason").value = "";
  // the ledger row appears once the writer has flushed it (tens of ms)
  for (let i = 0; i < 40; i++) {
    const rows = await loadLedger(sku);
    if (!rows.length || rows.some((r) => r.reason === reason && r.available === counters.available)) {
      return;
    }
    await new Promise((done) => setTimeout(done, 250));
  }
}

// -- orders -------------------------------------------------------------------

async function lookupOrder(orderId) {
  const order = await api("GET", `/v1/reservations/${encodeURIComponent(orderId)}`);
  currentOrder = order.order_id;
  $("order-status").textContent = order.status;
  $("order-kind").textContent = `(${order.kind})`;
  const body = $("order-items").tBodies[0];
  body.replaceChildren();
  for (const item of order.items) {
    const row = document.createElement("tr");
    for (const v of [item.sku, item.qty, item.state, item.expires_at]) cell(row, v);
    body.appendChild(row);
  }
  const reserved = order.items.some((i) => i.state === "reserved");
  document.querySelector("[data-test=order-confirm]").disabled = !reserved;
  document.querySelector("[data-test=order-release]").disabled = !reserved;
  document.querySelector("[data-test=order-cancel]").disabled =
    !order.items.some((i) => i.state === "confirmed");
  $("order-view").hidden = false;
}

// The admin order routes: the same operations as the public ones, with the
// operator's reason on the ledger rows.
async function orderAction(op) {
  if (!currentOrder) throw new Error("Look up an order first.");
  const reason = $("order-reason").value.trim();
  if (!reason) throw new Error(`a reason is required to ${op} an order`);
  const path = `/v1/admin/orders/${encodeURIComponent(currentOrder)}/${op}`;
  try {
    await api("POST", path, { reason });
    $("order-reason").value = "";
  } finally {
    await lookupOrder(currentOrder);
    if (currentSku) await lookupSku(currentSku);
  }
}

// -- wiring -------------------------------------------------------------------

function on(id, event, handler) {
  $(id).addEventListener(event, (e) => {
    e.preventDefault();
    act(handler);
  });
}

document.addEventListener("DOMContentLoaded", () => {
  on("login-form", "submit", () => {
    const token = $("token").value.trim();
    if (!token) throw new Error("Type the admin token.");
    return login(token);
  });
  $("logout").addEventListener("click", () => { logout(); clearError(); });
  on("health-refresh", "click", refreshHealth);
  on("sku-form", "submit", () => {
    const sku = $("sku-input").value.trim();
    if (!sku) throw new Error("Type a SKU.");
    return lookupSku(sku);
  });
  on("ledger-refresh", "click", () => loadLedger(currentSku));
  on("adjust-form", "submit", adjust);
  on("order-form", "submit", () => {
    const id = $("order-input").value.trim();
    if (!id) throw new Error("Type an order id.");
    return lookupOrder(id);
  });
  for (const button of document.querySelectorAll("[data-op]")) {
    button.addEventListener("click", () => act(() => orderAction(button.dataset.op)));
  }
  const saved = sessionStorage.getItem(TOKEN_KEY);
  if (saved) act(() => login(saved));
});
