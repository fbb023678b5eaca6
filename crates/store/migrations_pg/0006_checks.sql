-- Checks vehicles carried out on others' answers, as their cell recorded
-- them (store/src/checks.rs), until the books have paid the verifiers'
-- owners for them (paid_ms set once the ledger's transfers are committed).
CREATE TABLE node_checks (
    check_id TEXT PRIMARY KEY,
    node_name TEXT NOT NULL,
    model TEXT NOT NULL,
    tokens BIGINT NOT NULL,
    compute_ms BIGINT NOT NULL,
    started_ms BIGINT NOT NULL,
    at_ms BIGINT NOT NULL,
    paid_ms BIGINT NULL
);

CREATE INDEX node_checks_unpaid ON node_checks (paid_ms, at_ms);
