-- A running idempotency key is its process's under a lease (epoch
-- milliseconds, by the database's clock) that the process renews; another
-- gateway takes the key over only once the lease has expired (see the
-- gateway's billing_idempotency.rs). Rows written before leases existed
-- have expired ones: they are taken over at the next retry, as before.
ALTER TABLE idempotency_keys ADD COLUMN lease_expires_ms BIGINT NOT NULL DEFAULT 0;

-- The renewal updates every running key of one process in one statement.
CREATE INDEX idempotency_keys_running ON idempotency_keys (boot_id) WHERE state = 'running';
