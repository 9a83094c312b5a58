-- wrk script for the HTTP benchmark: POST /v1/reservations on one hot SKU,
-- a new order_id per request (prefix, thread number, counter), and a count
-- of the answers that were not 201 (refusals or errors would flatter a server).
-- Environment: BENCH_SKU (default HOT), BENCH_PREFIX (default w), BENCH_EXPECT (the
-- status to count as expected, default 201: 409 for the sold-out rows).
local sku = os.getenv("BENCH_SKU") or "HOT"
local prefix = os.getenv("BENCH_PREFIX") or "w"
local expect = tonumber(os.getenv("BENCH_EXPECT") or "201")
local headers = {["Content-Type"] = "application/json"}
local threads = {}
local counter = 0

function setup(thread)
  thread:set("tid", #threads + 1)
  table.insert(threads, thread)
end

function init(args)
  created, other, expected = 0, 0, 0
end

function request()
  counter = counter + 1
  local body = '{"order_id":"' .. prefix .. tid .. "-" .. counter
    .. '","items":[{"sku":"' .. sku .. '","qty":1}]}'
  return wrk.format("POST", "/v1/reservations", headers, body)
end

function response(status, hdrs, body)
  if status == 201 then created = created + 1 else other = other + 1 end
  if status == expect then expected = expected + 1 end
end

function done(summary, latency, requests)
  local c, o, e = 0, 0, 0
  for _, t in ipairs(threads) do
    c = c + t:get("created")
    o = o + t:get("other")
    e = e + t:get("expected")
  end
  io.write(string.format("statuses: created=%d other=%d\n", c, o))
  io.write(string.format("expected: status=%d count=%d\n", expect, e))
end
