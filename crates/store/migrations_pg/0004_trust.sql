-- Each vehicle's trust as its cell last recorded it (store/src/trust.rs):
-- probation, trusted or quarantined, with its verification counts.
CREATE TABLE node_trust (
    node_name TEXT PRIMARY KEY,
    state TEXT NOT NULL,
    verified BIGINT NOT NULL,
    passed BIGINT NOT NULL,
    reason TEXT NULL,
    quarantined_ms BIGINT NULL,
    updated_ms BIGINT NOT NULL
);

-- Generations whose earnings a quarantine takes back, until the books have
-- (applied_ms set once the ledger's clawback is committed).
CREATE TABLE node_clawbacks (
    node_name TEXT NOT NULL,
    request_id TEXT NOT NULL,
    reason TEXT NOT NULL,
    at_ms BIGINT NOT NULL,
    applied_ms BIGINT NULL,
    PRIMARY KEY (node_name, request_id)
);

CREATE INDEX node_clawbacks_pending ON node_clawbacks (applied_ms, at_ms);
