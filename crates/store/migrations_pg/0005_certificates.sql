-- The authority that signs the agents' mTLS certificates (store/src/certificates.rs):
-- one per deployment, made by whichever process needed it first.
CREATE TABLE node_authority (
    id INTEGER PRIMARY KEY CHECK (id = 1),
    cert_pem TEXT NOT NULL,
    key_pem TEXT NOT NULL,
    created_ms BIGINT NOT NULL
);

-- Every certificate issued to a node, and its revocation.
CREATE TABLE node_certificates (
    serial TEXT PRIMARY KEY,
    node_name TEXT NOT NULL,
    issued_ms BIGINT NOT NULL,
    not_after_ms BIGINT NOT NULL,
    revoked_ms BIGINT NULL,
    revoked_reason TEXT NULL
);

CREATE INDEX node_certificates_node ON node_certificates (node_name);
CREATE INDEX node_certificates_revoked ON node_certificates (revoked_ms, not_after_ms);
