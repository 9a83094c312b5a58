-- 0005: locations (DESIGN §13). A SKU's counters per location, the location on
-- every ledger row, each line's allocations; stock_levels keeps the SKU's totals.
-- Nullable columns without a default: no table rewrite.

-- The names of the locations an event touched ('berlin' or 'berlin,paris'), NULL
-- for a SKU without locations.
ALTER TABLE stock_ledger ADD COLUMN IF NOT EXISTS location text;

-- A line's allocations 'location:qty,...' (NULL for a SKU without locations), so
-- that `stock resync` gives each line its units back where they came from.
ALTER TABLE reservation_lines ADD COLUMN IF NOT EXISTS allocations text;

-- One row per SKU and location: its counters after the latest event that touched
-- it (seq: the SKU's event number of that event; in_transit: units sent from it and
-- not yet received).
CREATE TABLE IF NOT EXISTS stock_location_levels (
    sku         text NOT NULL,
    location    text NOT NULL,
    available   bigint NOT NULL,
    reserved    bigint NOT NULL,
    sold        bigint NOT NULL,
    in_transit  bigint NOT NULL,
    seq         bigint NOT NULL,
    updated_at  timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (sku, location)
);

-- A webhook's data.location: the locations of an order event of a SKU with locations.
ALTER TABLE webhook_deliveries ADD COLUMN IF NOT EXISTS location text;
