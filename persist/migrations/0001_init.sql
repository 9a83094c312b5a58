-- 0001: the persistence schema (DESIGN §5).
-- Times are timestamptz; Redis server times (ms) are converted by the writer.

-- One row per SKU: its counters after the latest applied event (seq orders them).
CREATE TABLE IF NOT EXISTS stock_levels (
    sku         text PRIMARY KEY,
    available   bigint NOT NULL,
    reserved    bigint NOT NULL,
    sold        bigint NOT NULL,
    seq         bigint NOT NULL,
    updated_at  timestamptz NOT NULL DEFAULT now()
);

-- Append-only: one row per stream event. (stream, stream_id) is unique, so an
-- event can never be recorded twice.
CREATE TABLE IF NOT EXISTS stock_ledger (
    id          bigserial PRIMARY KEY,
    sku         text NOT NULL,
    order_id    text NOT NULL DEFAULT '',
    op          text NOT NULL,
    qty         bigint NOT NULL,
    at          timestamptz NOT NULL,
    available   bigint NOT NULL,
    reserved    bigint NOT NULL,
    sold        bigint NOT NULL,
    seq         bigint NOT NULL,
    expires_at  timestamptz,
    reason      text NOT NULL DEFAULT '',
    stream      text NOT NULL,
    stream_id   text NOT NULL,
    recorded_at timestamptz NOT NULL DEFAULT now(),
    UNIQUE (stream, stream_id)
);
CREATE INDEX IF NOT EXISTS stock_ledger_sku_seq ON stock_ledger (sku, seq);
CREATE INDEX IF NOT EXISTS stock_ledger_order ON stock_ledger (order_id) WHERE order_id <> '';

-- The current state of every order line. kind is the order's kind ('reserve'
-- or 'deduct'), seq the SKU event number of the latest change.
CREATE TABLE IF NOT EXISTS reservation_lines (
    order_id    text NOT NULL,
    sku         text NOT NULL,
    qty         bigint NOT NULL,
    state       text NOT NULL,
    kind        text NOT NULL,
    expires_at  timestamptz,
    seq         bigint NOT NULL,
    updated_at  timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (order_id, sku)
);
CREATE INDEX IF NOT EXISTS reservation_lines_active
    ON reservation_lines (sku) WHERE state = 'reserved';

-- The last stream entry applied per bucket stream, written in the same
-- transaction as the events it covers.
CREATE TABLE IF NOT EXISTS stream_offsets (
    stream      text PRIMARY KEY,
    last_ms     bigint NOT NULL DEFAULT 0,
    last_seq    bigint NOT NULL DEFAULT 0,
    updated_at  timestamptz NOT NULL DEFAULT now()
);
