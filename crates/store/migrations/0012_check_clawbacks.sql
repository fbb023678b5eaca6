-- When the books took back the pay of a quarantined vehicle's last checks
-- (gateway billing_clawbacks.rs); NULL while they have not, and again once
-- the operator releases it, so that a later quarantine takes back its later
-- checks.
ALTER TABLE node_trust ADD COLUMN checks_clawed_back_ms BIGINT NULL;
