-- What the coordinator needs beyond transfers to answer tenants and operators.
-- Portable SQL: the same file runs on SQLite and PostgreSQL.

-- One row per settled request, written in the same transaction as its
-- transfers, so usage reports and invoices never disagree with the ledger:
-- `charge` is the amount of the request's token-charge transfer (zero when
-- the request cost less than a micro-dollar and produced no transfer).
CREATE TABLE ledger_requests (
    request_id TEXT PRIMARY KEY,
    tenant_id TEXT NOT NULL,
    class TEXT NOT NULL,
    -- The model of the first segment, the one the customer asked for.
    model TEXT NOT NULL,
    prompt_tokens BIGINT NOT NULL CHECK (prompt_tokens >= 0),
    completion_tokens BIGINT NOT NULL CHECK (completion_tokens >= 0),
    charge BIGINT NOT NULL CHECK (charge >= 0),
    segments BIGINT NOT NULL CHECK (segments > 0),
    admitted_at_ms BIGINT NOT NULL,
    completed_at_ms BIGINT NOT NULL
);

CREATE INDEX ledger_requests_tenant_completed ON ledger_requests (tenant_id, completed_at_ms);

-- Per-tenant spending rules that are not an account floor.
CREATE TABLE ledger_tenant_limits (
    tenant_id TEXT PRIMARY KEY,
    -- Most a tenant may be charged per UTC day; NULL for no cap.
    daily_cap BIGINT NULL CHECK (daily_cap >= 0)
);

-- A node's own report that disagreed with the coordinator's count beyond
-- tolerance. Settlement always uses the coordinator's count; these rows mark
-- the node for review.
CREATE TABLE ledger_meter_flags (
    request_id TEXT NOT NULL,
    segment BIGINT NOT NULL CHECK (segment >= 0),
    node_id TEXT NOT NULL,
    field TEXT NOT NULL,
    coordinator_value BIGINT NOT NULL,
    node_value BIGINT NOT NULL,
    at_ms BIGINT NOT NULL,
    PRIMARY KEY (request_id, segment, field)
);

CREATE INDEX ledger_meter_flags_node ON ledger_meter_flags (node_id, at_ms);

-- Top-ups received by a tenant in a period (invoices).
CREATE INDEX ledger_transfers_top_ups ON ledger_transfers (credit_account, at_ms)
    WHERE kind = 'top-up';
