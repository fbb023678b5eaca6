-- The cloud (system-2) spend of each settled request that had a cloud
-- segment: what the tenant was charged for its cloud part. Written in the
-- same transaction as the request's transfers, so a settled cloud part is
-- never without its spend. The gateway keeps per-tenant cloud budgets in
-- another database: it counts a row there, then sets `counted_at_ms`; rows
-- still uncounted (a failed write, a crash) are counted at its next start.
-- Portable SQL: the same file runs on SQLite and PostgreSQL.

CREATE TABLE ledger_cloud_spend (
    request_id TEXT PRIMARY KEY,
    tenant_id TEXT NOT NULL,
    amount BIGINT NOT NULL CHECK (amount >= 0),
    completed_at_ms BIGINT NOT NULL,
    -- NULL until the gateway's cloud budget holds this spend.
    counted_at_ms BIGINT NULL
);

CREATE INDEX ledger_cloud_spend_uncounted ON ledger_cloud_spend (completed_at_ms)
    WHERE counted_at_ms IS NULL;
