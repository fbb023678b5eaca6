-- Which one-off re-keyings of accounts a ledger has been through (for
-- example moving accounts from user-chosen names to immutable ids). A row is
-- written in the same transaction as the re-keying it names, so a re-keying
-- is applied once, whoever runs it and however often.
-- Portable SQL: the same file runs on SQLite and PostgreSQL.

CREATE TABLE ledger_rekeys (
    name TEXT PRIMARY KEY,
    accounts BIGINT NOT NULL CHECK (accounts >= 0),
    at_ms BIGINT NOT NULL
);
