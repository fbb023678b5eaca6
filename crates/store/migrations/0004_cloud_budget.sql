-- Per-tenant caps on cloud (system-2) spend, and the spend so far, in
-- micro-dollars at the tenant's price (upstream cost plus margin).
-- A tenant without a row, or with a NULL cap, has no cap.
CREATE TABLE IF NOT EXISTS cloud_budgets (
    tenant_id        INTEGER PRIMARY KEY REFERENCES tenants (id),
    cap_micro_usd    INTEGER CHECK (cap_micro_usd IS NULL OR cap_micro_usd >= 0),
    spent_micro_usd  INTEGER NOT NULL DEFAULT 0 CHECK (spent_micro_usd >= 0),
    updated_ms       INTEGER NOT NULL
);
