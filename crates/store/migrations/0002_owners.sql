-- Vehicle owners, their API keys, each vehicle's owner policy, and tenant
-- contracts (the scheduler's `TenantConfig`).

CREATE TABLE IF NOT EXISTS owners (
    id          INTEGER PRIMARY KEY,
    name        TEXT NOT NULL UNIQUE,
    created_ms  INTEGER NOT NULL
);

-- Owner keys live apart from tenant keys so that neither opens the other's
-- routes. Only a SHA-256 of each key is kept; the key itself is shown once.
CREATE TABLE IF NOT EXISTS owner_keys (
    key_hash    TEXT PRIMARY KEY,
    key_prefix  TEXT NOT NULL,
    owner_id    INTEGER NOT NULL REFERENCES owners (id),
    created_ms  INTEGER NOT NULL,
    revoked_ms  INTEGER
);

-- Nodes enrolled before owners existed named their owner in free text: make
-- each such name an owner and link the node to it.
INSERT OR IGNORE INTO owners (name, created_ms)
    SELECT owner, MIN(created_ms) FROM nodes WHERE owner <> '' GROUP BY owner;
ALTER TABLE nodes ADD COLUMN owner_id INTEGER REFERENCES owners (id);
UPDATE nodes SET owner_id = (SELECT id FROM owners WHERE owners.name = nodes.owner)
    WHERE owner <> '';
CREATE INDEX IF NOT EXISTS nodes_by_owner ON nodes (owner_id);

-- One row per vehicle whose owner changed the default policy. `revision`
-- grows with every write across the table, so a running coordinator picks up
-- changes made by the CLI by asking for revisions above the last it saw.
CREATE TABLE IF NOT EXISTS node_policies (
    node_name                       TEXT PRIMARY KEY REFERENCES nodes (name),
    allow_unplugged                 INTEGER NOT NULL CHECK (allow_unplugged IN (0, 1)),
    unplugged_stop_soc_permille     INTEGER NOT NULL CHECK (unplugged_stop_soc_permille BETWEEN 0 AND 1000),
    unplugged_resume_soc_permille   INTEGER NOT NULL CHECK (unplugged_resume_soc_permille BETWEEN 0 AND 1000),
    allowed_hours_mask              INTEGER NOT NULL CHECK (allowed_hours_mask BETWEEN 0 AND 16777215),
    utc_offset_minutes              INTEGER NOT NULL CHECK (utc_offset_minutes BETWEEN -720 AND 840),
    max_energy_per_day_wh           INTEGER CHECK (max_energy_per_day_wh > 0),
    max_chip_temperature_decicelsius INTEGER NOT NULL,
    stop_before_departure_ms        INTEGER NOT NULL CHECK (stop_before_departure_ms >= 0),
    allowed_classes_mask            INTEGER NOT NULL CHECK (allowed_classes_mask BETWEEN 0 AND 7),
    revision                        INTEGER NOT NULL,
    updated_ms                      INTEGER NOT NULL
);
CREATE INDEX IF NOT EXISTS node_policies_by_revision ON node_policies (revision);

-- Tenant contracts; NULL means the default for the tenant's class.
ALTER TABLE tenants ADD COLUMN weight INTEGER CHECK (weight > 0);
ALTER TABLE tenants ADD COLUMN max_concurrency INTEGER CHECK (max_concurrency > 0);
ALTER TABLE tenants ADD COLUMN tokens_per_minute INTEGER CHECK (tokens_per_minute > 0);
ALTER TABLE tenants ADD COLUMN min_share_permille INTEGER CHECK (min_share_permille BETWEEN 0 AND 1000);
-- Grows with every contract change, like node_policies.revision.
ALTER TABLE tenants ADD COLUMN contract_revision INTEGER NOT NULL DEFAULT 0;
