-- The cells of a cluster: each `fleetgrid cell` records itself here when it
-- starts, with the gRPC address its agents dial, and renews last_seen_ms
-- while it runs (store/src/cells.rs). `nodes add` gives a new vehicle a home
-- cell among the live ones, recorded on the node, and the others to fail
-- over to. The single-process `fleetgrid serve` records no cell.
CREATE TABLE cells (
    id TEXT PRIMARY KEY,
    grpc_url TEXT NOT NULL,
    last_seen_ms BIGINT NOT NULL
);

ALTER TABLE nodes ADD COLUMN home_cell TEXT NULL;

CREATE INDEX nodes_by_home_cell ON nodes (home_cell);
