-- The ledger's tables. Portable SQL: the same file runs on SQLite and PostgreSQL.
--
-- Transfers are immutable: the code never updates or deletes them. Account rows
-- hold posted totals, a derived table updated in the same transaction as the
-- transfers that change it; `verify` recomputes them from the transfers.
--
-- Transfers carry no foreign keys to accounts: every commit already locks and
-- checks the accounts it names, accounts are never deleted, and `verify`
-- reports a transfer naming an unknown account. The per-row triggers of a
-- foreign key would cost as much as the insert itself. For the same reason
-- the only secondary index is the one daily spend caps need; statements find
-- transfers by their derived ids.

CREATE TABLE ledger_accounts (
    id TEXT PRIMARY KEY,
    -- Lowest balance a debit may leave; NULL for accounts without a floor.
    balance_floor BIGINT NULL,
    debits_posted BIGINT NOT NULL DEFAULT 0 CHECK (debits_posted >= 0),
    credits_posted BIGINT NOT NULL DEFAULT 0 CHECK (credits_posted >= 0)
);

CREATE TABLE ledger_transfers (
    -- 32 hex digits, derived from (request_id, segment, kind).
    id TEXT PRIMARY KEY,
    debit_account TEXT NOT NULL,
    credit_account TEXT NOT NULL,
    amount BIGINT NOT NULL CHECK (amount > 0),
    kind TEXT NOT NULL,
    request_id TEXT NOT NULL,
    segment BIGINT NOT NULL CHECK (segment >= 0),
    quantity BIGINT NOT NULL CHECK (quantity >= 0),
    at_ms BIGINT NOT NULL,
    CHECK (debit_account <> credit_account)
);

-- Daily spend of a tenant: token charges debit the tenant's account.
CREATE INDEX ledger_transfers_charges ON ledger_transfers (debit_account, at_ms)
    WHERE kind = 'token-charge';

CREATE TABLE ledger_usage (
    request_id TEXT NOT NULL,
    segment BIGINT NOT NULL CHECK (segment >= 0),
    -- NULL for segments served by the cloud upstream.
    node_id TEXT NULL,
    owner_id TEXT NULL,
    model TEXT NOT NULL,
    prompt_tokens BIGINT NOT NULL CHECK (prompt_tokens >= 0),
    completion_tokens BIGINT NOT NULL CHECK (completion_tokens >= 0),
    compute_ms BIGINT NOT NULL CHECK (compute_ms >= 0),
    energy_uwh BIGINT NOT NULL CHECK (energy_uwh >= 0),
    tariff_per_kwh BIGINT NOT NULL CHECK (tariff_per_kwh >= 0),
    started_at_ms BIGINT NOT NULL,
    PRIMARY KEY (request_id, segment)
);

CREATE INDEX ledger_usage_node_started ON ledger_usage (node_id, started_at_ms);
