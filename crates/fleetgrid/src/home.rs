//! Where fleetgrid keeps its files: `$FLEETGRID_HOME`, else
//! `$XDG_DATA_HOME/fleetgrid`, else `~/.local/share/fleetgrid` — the same
//! root the model store uses for `models/`.

use std::path::PathBuf;

pub fn root() -> PathBuf {
    models::ModelStore::default_root()
        .parent()
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(".fleetgrid"))
}

/// The coordinator's data directory unless one is given.
pub fn coordinator_dir(given: Option<PathBuf>) -> PathBuf {
    given.unwrap_or_else(|| root().join("coordinator"))
}

/// Opens the model store at its default place.
pub fn model_store() -> anyhow::Result<models::ModelStore> {
    use anyhow::Context;
    models::ModelStore::open(models::ModelStore::default_root()).context("open the model store")
}
