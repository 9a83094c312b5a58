-- 0009: stock_levels keeps ONE row of counters per SKU (DESIGN §12): a sharded SKU's
-- row holds its totals (the sum of its shards, exact after the writer drains; seq = the
-- sum of the shards' seqs). Each shard's own counters (`s` for shard 0, `s#1`, ...) are
-- a row of shard_levels, which resync and reconcile read (levels_by_shard: a shard's row
-- for a sharded SKU, stock_levels' row for an ordinary one). persist/events.py writes both.
CREATE TABLE IF NOT EXISTS shard_levels (
    sku                 text PRIMARY KEY,
    available           bigint NOT NULL,
    reserved            bigint NOT NULL,
    sold                bigint NOT NULL,
    seq                 bigint NOT NULL,
    limit_per_customer  bigint,
    limit_seq           bigint,
    updated_at          timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX IF NOT EXISTS shard_levels_base ON shard_levels (split_part(sku, '#', 1));

-- the shard rows 0005 left in stock_levels move to shard_levels; the SKU's row takes the sums
INSERT INTO shard_levels (sku, available, reserved, sold, seq, limit_per_customer, limit_seq,
    updated_at)
SELECT sku, available, reserved, sold, seq, limit_per_customer, limit_seq, updated_at
FROM stock_levels WHERE split_part(sku, '#', 1) IN (
    SELECT split_part(sku, '#', 1) FROM stock_levels WHERE position('#' IN sku) > 0)
ON CONFLICT (sku) DO NOTHING;
DELETE FROM stock_levels WHERE position('#' IN sku) > 0;
INSERT INTO stock_levels AS l (sku, available, reserved, sold, seq, limit_per_customer,
    limit_seq, updated_at)
SELECT split_part(sku, '#', 1), sum(available), sum(reserved), sum(sold), sum(seq),
    max(limit_per_customer), max(limit_seq), max(updated_at)
FROM shard_levels GROUP BY 1
ON CONFLICT (sku) DO UPDATE SET available = excluded.available, reserved = excluded.reserved,
    sold = excluded.sold, seq = excluded.seq, updated_at = excluded.updated_at;

CREATE OR REPLACE VIEW levels_by_shard AS
SELECT sku, available, reserved, sold, seq, limit_per_customer FROM shard_levels
UNION ALL
SELECT sku, available, reserved, sold, seq, limit_per_customer FROM stock_levels l
WHERE NOT EXISTS (SELECT 1 FROM shard_levels h WHERE h.sku = l.sku);

DROP VIEW IF EXISTS stock_totals;
CREATE VIEW stock_totals AS
SELECT l.sku, l.available, l.reserved, l.sold,
    greatest(1, (SELECT count(*) FROM shard_levels h
        WHERE split_part(h.sku, '#', 1) = l.sku))::int AS shards, l.updated_at
FROM stock_levels l;
