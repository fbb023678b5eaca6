-- Tenants, their API keys, enrolled nodes and the request log.
CREATE TABLE IF NOT EXISTS tenants (
    id          INTEGER PRIMARY KEY,
    name        TEXT NOT NULL UNIQUE,
    class       TEXT NOT NULL CHECK (class IN ('fleet', 'reserved', 'spot')),
    created_ms  INTEGER NOT NULL
);

-- Only a SHA-256 of each key is kept; the key itself is shown once.
CREATE TABLE IF NOT EXISTS api_keys (
    key_hash    TEXT PRIMARY KEY,
    key_prefix  TEXT NOT NULL,
    tenant_id   INTEGER NOT NULL REFERENCES tenants (id),
    created_ms  INTEGER NOT NULL,
    revoked_ms  INTEGER
);

CREATE TABLE IF NOT EXISTS nodes (
    name            TEXT PRIMARY KEY,
    credential_hash TEXT NOT NULL,
    owner           TEXT NOT NULL DEFAULT '',
    created_ms      INTEGER NOT NULL,
    last_seen_ms    INTEGER
);

CREATE TABLE IF NOT EXISTS requests (
    id                TEXT PRIMARY KEY,
    tenant_id         INTEGER NOT NULL,
    model             TEXT NOT NULL,
    status            TEXT NOT NULL,
    prompt_tokens     INTEGER NOT NULL,
    completion_tokens INTEGER NOT NULL,
    nodes             TEXT NOT NULL,
    created_ms        INTEGER NOT NULL,
    finished_ms       INTEGER NOT NULL,
    error             TEXT
);
CREATE INDEX IF NOT EXISTS requests_by_tenant ON requests (tenant_id, created_ms);
