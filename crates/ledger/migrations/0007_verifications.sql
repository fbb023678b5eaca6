-- Checks vehicles carried out on other vehicles' answers, as the books paid
-- them (`crate::verification`): written in the transaction that posts the
-- check's pay, so a check on a statement is a check paid.
-- Portable SQL: the same file runs on SQLite and PostgreSQL.
CREATE TABLE ledger_verifications (
    -- The check's name, its transfers' request id.
    check_id TEXT PRIMARY KEY,
    node_id TEXT NOT NULL,
    owner_id TEXT NOT NULL,
    model TEXT NOT NULL,
    tokens BIGINT NOT NULL CHECK (tokens >= 0),
    compute_ms BIGINT NOT NULL CHECK (compute_ms >= 0),
    energy_uwh BIGINT NOT NULL CHECK (energy_uwh >= 0),
    tariff_per_kwh BIGINT NOT NULL CHECK (tariff_per_kwh >= 0),
    at_ms BIGINT NOT NULL
);

-- A statement lists a node's checks in a period.
CREATE INDEX ledger_verifications_node_at ON ledger_verifications (node_id, at_ms);
