-- Checks whose pay was taken back because their verifier was found
-- cheating (`Store::claw_back_checks`): one row per check, written in the
-- transaction that posts the check's reversals. A row is never changed.
-- Portable SQL: the same file runs on SQLite and PostgreSQL.
CREATE TABLE ledger_check_clawbacks (
    check_id TEXT PRIMARY KEY,
    node_id TEXT NOT NULL,
    owner_id TEXT NOT NULL,
    reason TEXT NOT NULL,
    at_ms BIGINT NOT NULL
);

-- A statement lists a node's check clawbacks in a period.
CREATE INDEX ledger_check_clawbacks_node_at ON ledger_check_clawbacks (node_id, at_ms);
