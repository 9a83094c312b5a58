-- 0003: webhooks (DESIGN §11): subscriptions and the outbox of deliveries.
-- Independent of 0002 (applied in name order, each once; a file that arrives
-- later with a lower number is still applied).

CREATE TABLE IF NOT EXISTS webhook_subscriptions (
    id          uuid PRIMARY KEY DEFAULT gen_random_uuid(),
    url         text NOT NULL,
    events      text[] NOT NULL,
    secret      text NOT NULL,
    created_at  timestamptz NOT NULL DEFAULT now()
);

-- The outbox: one row per (subscription, event), inserted by the writer in the
-- transaction that applies the event. state: pending (due at next_at), sending
-- (claimed by a dispatcher until next_at, its lease), delivered, failed (retry
-- window over), superseded (a stock.changed whose newer row is pending).
-- event_id is the X-Stock-Event-Id: a coalesced stock.changed gets a new one
-- whenever its counters change.
CREATE TABLE IF NOT EXISTS webhook_deliveries (
    id              bigserial PRIMARY KEY,
    event_id        uuid NOT NULL DEFAULT gen_random_uuid(),
    subscription_id uuid NOT NULL,  -- no foreign key: its check per row doubled the
                                    -- writer's outbox cost; unsubscribe deletes the rows
    type            text NOT NULL,
    sku             text NOT NULL,  -- the body's data: sku, order_id, counters, seq
    order_id        text,           -- NULL where the event has none (and stock.changed)
    available       bigint NOT NULL,
    reserved        bigint NOT NULL,
    sold            bigint NOT NULL,
    seq             bigint NOT NULL,
    created_at      timestamptz NOT NULL,  -- the event's time (Redis server time)
    enqueued_at     timestamptz NOT NULL DEFAULT now(),  -- the retry window starts here
    state           text NOT NULL DEFAULT 'pending',
    attempts        integer NOT NULL DEFAULT 0,
    next_at         timestamptz NOT NULL DEFAULT now(),
    last_status     integer,
    last_error      text,
    delivered_at    timestamptz
);
-- At most one stock.changed waiting per (subscription, SKU): newer events update it.
CREATE UNIQUE INDEX IF NOT EXISTS webhook_deliveries_coalesce
    ON webhook_deliveries (subscription_id, sku)
    WHERE type = 'stock.changed' AND state = 'pending';
CREATE INDEX IF NOT EXISTS webhook_deliveries_due
    ON webhook_deliveries (subscription_id, next_at)
    WHERE state IN ('pending', 'sending');
CREATE INDEX IF NOT EXISTS webhook_deliveries_failed
    ON webhook_deliveries (subscription_id, id)
    WHERE state = 'failed';

-- When the next stock.changed of a (subscription, SKU) may go: one second after
-- the last one was answered (while one is in flight, its lease).
CREATE TABLE IF NOT EXISTS webhook_throttle (
    subscription_id uuid NOT NULL REFERENCES webhook_subscriptions (id) ON DELETE CASCADE,
    sku             text NOT NULL,
    not_before      timestamptz NOT NULL,
    PRIMARY KEY (subscription_id, sku)
);
