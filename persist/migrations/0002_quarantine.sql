-- 0002: events the writer could not apply (a value PostgreSQL refuses, an entry
-- that does not decode) are set aside here, in the transaction that moves the
-- stream offset past them, so that one bad event never stops the others.
-- raw: the entry's fields and values exactly as Redis holds them (bytes).
CREATE TABLE IF NOT EXISTS event_quarantine (
    id              bigserial PRIMARY KEY,
    stream          text NOT NULL,
    stream_id       text NOT NULL,
    raw             bytea[] NOT NULL,
    error           text NOT NULL,
    quarantined_at  timestamptz NOT NULL DEFAULT now(),
    UNIQUE (stream, stream_id)
);
