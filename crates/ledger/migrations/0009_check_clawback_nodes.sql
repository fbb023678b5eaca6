-- Nodes whose checks were taken back (`Store::claw_back_checks`), with the
-- latest time their checks were taken back at: a check of such a node made
-- by then and booked only later is not paid (`Store::pay_check`), so that
-- no check escapes its clawback by being paid after it.
-- Portable SQL: the same file runs on SQLite and PostgreSQL.
CREATE TABLE ledger_check_clawback_nodes (
    node_id TEXT PRIMARY KEY,
    reason TEXT NOT NULL,
    at_ms BIGINT NOT NULL
);
