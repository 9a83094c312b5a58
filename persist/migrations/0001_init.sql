-- 0001: the persistence schema (DESIGN §5).
-- Times are timestamptz. The ledger keeps the Redis server times as given (ms)
-- and derives its timestamptz columns from them.

-- One row per SKU: its counters after the latest applied event (seq orders them).
CREATE TABLE IF NOT EXISTS stock_levels (
    sku         text PRIMARY KEY,
    available   bigint NOT NULL,
    reserved    bigint NOT NULL,
    sold        bigint NOT NULL,
    seq         bigint NOT NULL,
    updated_at  timestamptz NOT NULL DEFAULT now()
);

-- Append-only: one row per stream event. (stream, stream_id) names the event;
-- the writer records each exactly once (stream_offsets, same transaction), and
-- leaves out a unique index on it to keep COPY cheap.
CREATE TABLE IF NOT EXISTS stock_ledger (
    id          bigserial PRIMARY KEY,
    sku         text NOT NULL,
    order_id    text NOT NULL DEFAULT '',
    op          text NOT NULL,
    qty         bigint NOT NULL,
    at_ms       bigint NOT NULL,
    at          timestamptz NOT NULL GENERATED ALWAYS AS (to_timestamp(at_ms::float8 / 1000)) STORED,
    available   bigint NOT NULL,
    reserved    bigint NOT NULL,
    sold        bigint NOT NULL,
    seq         bigint NOT NULL,
    expires_ms  bigint NOT NULL DEFAULT 0,
    expires_at  timestamptz GENERATED ALWAYS AS
                    (CASE WHEN expires_ms > 0 THEN to_timestamp(expires_ms::float8 / 1000) END) STORED,
    reason      text NOT NULL DEFAULT '',
    stream      text NOT NULL,
    stream_id   text NOT NULL,
    recorded_at timestamptz NOT NULL DEFAULT now()
);

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
) WITH (fillfactor = 85);  -- room for HOT updates: state changes touch no index
CREATE INDEX IF NOT EXISTS reservation_lines_sku ON reservation_lines (sku);

-- The last stream entry applied per bucket stream, written in the same
-- transaction as the events it covers.
CREATE TABLE IF NOT EXISTS stream_offsets (
    stream      text PRIMARY KEY,
    last_ms     bigint NOT NULL DEFAULT 0,
    last_seq    bigint NOT NULL DEFAULT 0,
    updated_at  timestamptz NOT NULL DEFAULT now()
);
