-- 0007: a line's pin (DESIGN §13): the location its item named ('location'), NULL
-- for none, so that `stock resync` restores it and a replay of the pinned reserve
-- after a Redis loss is still a replay. Nullable, no default: no table rewrite.
ALTER TABLE reservation_lines ADD COLUMN IF NOT EXISTS pin text;
