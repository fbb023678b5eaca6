-- Clawback orders and payout holds: what the ledger keeps when a node is
-- found returning bad answers (`crate::clawback`).
-- Portable SQL: the same file runs on SQLite and PostgreSQL.

-- One row per (node, request) a clawback order named. Written in the
-- transaction that posts the reversals of the segments already settled; a
-- settlement of a named request posts its reversals in its own transaction,
-- so the order of the two events does not matter. A row is never changed:
-- a repeated order keeps the first reason and time, which the reversals
-- carry.
CREATE TABLE ledger_clawbacks (
    node_id TEXT NOT NULL,
    request_id TEXT NOT NULL,
    reason TEXT NOT NULL,
    at_ms BIGINT NOT NULL,
    PRIMARY KEY (node_id, request_id)
);

-- A settlement looks up the orders of its request.
CREATE INDEX ledger_clawbacks_request ON ledger_clawbacks (request_id);
-- A statement lists a node's clawbacks in a period.
CREATE INDEX ledger_clawbacks_node_at ON ledger_clawbacks (node_id, at_ms);

-- Nodes whose owners may not be paid out (a quarantined node): a payout to
-- any owner the node earned for is refused while the row exists. A new
-- clawback order inserts one; the operator deletes it when the quarantine
-- ends.
CREATE TABLE ledger_payout_holds (
    node_id TEXT PRIMARY KEY,
    reason TEXT NOT NULL,
    at_ms BIGINT NOT NULL
);
