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

/// Fetches model `name` from the catalog unless the store already holds it;
/// `command` names who fetches, on stderr.
pub async fn ensure_model(name: &str, command: &str) -> anyhow::Result<()> {
    use anyhow::Context;
    let store = model_store()?;
    if store.resolve(name).is_ok() {
        return Ok(());
    }
    let entry =
        models::find(name).with_context(|| format!("model {name:?} is not in the catalog"))?;
    eprintln!("{command}: fetching {name}");
    tokio::task::spawn_blocking(move || store.fetch(entry))
        .await
        .context("fetch task")?
        .with_context(|| format!("fetch {name}"))?;
    Ok(())
}
