-- 0005: sharded SKUs (DESIGN §12). Each shard of SKU `s` is a SKU of its own in
-- Redis and so a row of stock_levels: `s` (shard 0) and `s#1`, `s#2`, ... (a SKU
-- never contains '#'). stock_totals is the SKU's one row of counters: the sum of
-- its shards' rows (exact after the writer drains), with the number of shard rows.
-- The ledger's sku names the shard; shard_of() gives its index (0 for `s`).
CREATE OR REPLACE FUNCTION shard_of(sku text) RETURNS int
    LANGUAGE sql IMMUTABLE PARALLEL SAFE
    AS $$ SELECT CASE WHEN position('#' IN sku) > 0
        THEN split_part(sku, '#', 2)::int ELSE 0 END $$;

CREATE OR REPLACE VIEW stock_totals AS
SELECT split_part(sku, '#', 1) AS sku, sum(available)::bigint AS available,
    sum(reserved)::bigint AS reserved, sum(sold)::bigint AS sold, count(*)::int AS shards,
    max(updated_at) AS updated_at
FROM stock_levels
GROUP BY split_part(sku, '#', 1);
