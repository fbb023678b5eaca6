-- A gateway paying checks claims them until claimed_until_ms, so that
-- gateways paying at once share the work (store/src/checks.rs).
ALTER TABLE node_checks ADD COLUMN claimed_until_ms BIGINT NULL;
