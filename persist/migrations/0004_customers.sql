-- 0004: per-customer purchase limits (DESIGN §9) reach PostgreSQL, so that
-- `stock resync` can restore them.
-- customer_id: the buyer of the line (the events' field "customer"); NULL when
-- the order named none. Nullable columns without a default: no table rewrite.
ALTER TABLE stock_ledger ADD COLUMN IF NOT EXISTS customer_id text;
ALTER TABLE reservation_lines ADD COLUMN IF NOT EXISTS customer_id text;

-- The SKU's per-customer limit (NULL: none), from its latest `limit` event
-- (lua/limits.lua; a resync that changes it emits one too), and that event's
-- seq: the writer takes a batch's latest limit event, and a batch without one
-- leaves the limit as it is.
ALTER TABLE stock_levels ADD COLUMN IF NOT EXISTS limit_per_customer bigint;
ALTER TABLE stock_levels ADD COLUMN IF NOT EXISTS limit_seq bigint;
