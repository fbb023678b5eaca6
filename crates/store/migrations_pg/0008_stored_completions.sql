-- Chat completions kept for later retrieval (`store: true`, store/src/stored_completions.rs).
--
-- `request` is the request as it ran (with the seed the gateway chose), so
-- that an answer clawed back from a cheating vehicle can be run again when
-- the tenant asked for that (on_clawback = 'rerun'). `answered_by` is the
-- request id whose answer `response` holds: the first run's, or the last
-- re-run's. A gateway re-running one claims it until claimed_until_ms.
CREATE TABLE stored_completions (
    id TEXT PRIMARY KEY,
    tenant_id BIGINT NOT NULL,
    model TEXT NOT NULL,
    created_ms BIGINT NOT NULL,
    metadata TEXT NOT NULL,
    request TEXT NOT NULL,
    response TEXT NOT NULL,
    on_clawback TEXT NOT NULL CHECK (on_clawback IN ('refund', 'rerun')),
    answered_by TEXT NOT NULL,
    reruns BIGINT NOT NULL DEFAULT 0,
    rerun_attempts BIGINT NOT NULL DEFAULT 0,
    rerun_reason TEXT NULL,
    claimed_until_ms BIGINT NULL
);

CREATE INDEX stored_completions_tenant ON stored_completions (tenant_id, created_ms, id);
CREATE INDEX stored_completions_answered_by ON stored_completions (answered_by);
CREATE INDEX stored_completions_created ON stored_completions (created_ms);

-- Whether a kept answer was clawed back is looked up by its request id.
CREATE INDEX node_clawbacks_request ON node_clawbacks (request_id);
