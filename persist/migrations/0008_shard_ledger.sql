-- 0008: a sharded SKU's ledger and webhooks name the SKU (DESIGN §12). The ledger's
-- sku is the SKU (`s`, never `s#3`) and `shard` the shard's index (0 for an ordinary
-- SKU), for audit.
ALTER TABLE stock_ledger ADD COLUMN IF NOT EXISTS shard int NOT NULL DEFAULT 0;
UPDATE stock_ledger SET shard = shard_of(sku), sku = split_part(sku, '#', 1)
WHERE position('#' IN sku) > 0;
