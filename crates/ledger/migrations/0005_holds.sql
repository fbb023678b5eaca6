-- Money held for admitted requests that have not settled yet, when several
-- gateways share this ledger (PostgreSQL). A gateway inserts a request's
-- worst case in the transaction that admits it, under the lock of the
-- tenant's account row; the request's settlement deletes it in the
-- transaction that posts the charge, so the charge is always counted, in the
-- balance or as a hold.
--
-- A hold counts only until `expires_at_ms` (the database's clock): its
-- gateway renews the leases of the holds it still has in flight, so the
-- holds of a gateway that died stop counting by themselves.
-- Portable SQL: the same file runs on SQLite and PostgreSQL (an embedded
-- SQLite ledger serves one process, which holds in memory; the table stays
-- empty there).

CREATE TABLE ledger_holds (
    -- The id of the request the hold is for.
    hold_id TEXT PRIMARY KEY,
    tenant_id TEXT NOT NULL,
    amount BIGINT NOT NULL CHECK (amount >= 0),
    gateway_id TEXT NOT NULL,
    expires_at_ms BIGINT NOT NULL
);

-- Admission sums a tenant's unexpired holds.
CREATE INDEX ledger_holds_tenant ON ledger_holds (tenant_id, expires_at_ms);
-- Purging finds expired holds.
CREATE INDEX ledger_holds_expiry ON ledger_holds (expires_at_ms);
