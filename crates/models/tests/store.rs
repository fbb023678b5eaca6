//! The store on local files: import, resolve, list and verify, including refusing damaged blobs.

use std::fs::OpenOptions;
use std::io::{Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};

use models::{ModelError, ModelStore, Sha256Digest};

/// Deterministic, non-repeating bytes so that truncation or a flipped byte changes the digest.
fn model_bytes(len: usize) -> Vec<u8> {
    let mut state: u32 = 0x2545_f491;
    (0..len)
        .map(|_| {
            state ^= state << 13;
            state ^= state >> 17;
            state ^= state << 5;
            state as u8
        })
        .collect()
}

fn write_part(dir: &Path, file_name: &str, bytes: &[u8]) -> PathBuf {
    let path = dir.join(file_name);
    std::fs::write(&path, bytes).expect("write part");
    path
}

fn files_in(dir: &Path) -> Vec<String> {
    std::fs::read_dir(dir)
        .expect("read dir")
        .map(|entry| {
            entry
                .expect("entry")
                .file_name()
                .to_string_lossy()
                .into_owned()
        })
        .collect()
}

#[test]
fn import_refuses_a_wrong_digest_and_leaves_no_blob() {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = ModelStore::open(dir.path().join("store")).expect("open");
    let part = write_part(dir.path(), "model.gguf", &model_bytes(10_000));
    let wrong = Sha256Digest::of_bytes(b"something else");

    let error = store
        .import("tiny", &[part], &wrong)
        .expect_err("must refuse");

    match error {
        ModelError::ChecksumMismatch {
            expected, actual, ..
        } => {
            assert_eq!(expected, wrong);
            assert_eq!(actual, Sha256Digest::of_bytes(&model_bytes(10_000)));
        }
        other => panic!("expected a checksum mismatch, got {other}"),
    }
    assert!(!store.blob_path(&wrong).exists());
    assert!(files_in(&store.root().join("blobs/sha256")).is_empty());
    assert!(files_in(&store.root().join("tmp")).is_empty());
    assert!(matches!(
        store.resolve("tiny"),
        Err(ModelError::NotFound(_))
    ));
    assert!(store.list().expect("list").is_empty());
}

#[test]
fn import_concatenates_parts_in_order_and_is_idempotent() {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = ModelStore::open(dir.path().join("store")).expect("open");
    let bytes = model_bytes(30_000);
    let parts = vec![
        write_part(dir.path(), "part01.bin", &bytes[..10_000]),
        write_part(dir.path(), "part02.bin", &bytes[10_000..]),
    ];
    let digest = Sha256Digest::of_bytes(&bytes);

    let imported = store.import("tiny", &parts, &digest).expect("import");
    let again = store.import("tiny", &parts, &digest).expect("import again");
    let by_name = store.resolve("tiny").expect("resolve by name");
    let by_digest = store
        .resolve(&digest.to_string())
        .expect("resolve by digest");

    assert_eq!(std::fs::read(&imported.path).expect("read blob"), bytes);
    assert_eq!(imported.size_bytes, 30_000);
    assert_eq!(again, imported);
    assert_eq!(by_name, imported);
    assert_eq!(by_digest.path, imported.path);
    assert_eq!(imported.path, store.blob_path(&digest));
    let listed = store.list().expect("list");
    assert_eq!(listed.len(), 1);
    assert_eq!(listed[0].names, vec!["tiny".to_owned()]);
    assert_eq!(listed[0].digest, digest);
    assert!(listed[0].verified);
    // Swapping the parts gives other bytes, which must not pass for the same model.
    let swapped = [parts[1].clone(), parts[0].clone()];
    assert!(matches!(
        ModelStore::open(dir.path().join("fresh"))
            .expect("open")
            .import("other", &swapped, &digest),
        Err(ModelError::ChecksumMismatch { .. })
    ));
}

#[test]
fn resolve_refuses_a_truncated_blob() {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = ModelStore::open(dir.path().join("store")).expect("open");
    let bytes = model_bytes(20_000);
    let part = write_part(dir.path(), "model.gguf", &bytes);
    let digest = Sha256Digest::of_bytes(&bytes);
    let model = store.import("tiny", &[part], &digest).expect("import");

    let file = OpenOptions::new()
        .write(true)
        .open(&model.path)
        .expect("open blob");
    file.set_len(7_000).expect("truncate");
    drop(file);

    match store.resolve("tiny") {
        Err(ModelError::Corrupt {
            expected,
            actual,
            path,
        }) => {
            assert_eq!(expected, digest);
            assert_eq!(actual, Sha256Digest::of_bytes(&bytes[..7_000]));
            assert_eq!(path, model.path);
        }
        other => panic!("expected a corrupt-model error, got {other:?}"),
    }
    assert!(!store.list().expect("list")[0].verified);
}

#[test]
fn resolve_refuses_a_corrupted_blob_by_name_and_by_digest() {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = ModelStore::open(dir.path().join("store")).expect("open");
    // A blob whose content is not what its name (the digest) says, as after a disk error.
    let claimed = Sha256Digest::of_bytes(&model_bytes(5_000));
    let mut damaged = model_bytes(5_000);
    damaged[2_500] ^= 0xff;
    std::fs::write(store.blob_path(&claimed), &damaged).expect("write fake blob");
    std::fs::write(store.root().join("names/fake"), claimed.to_string()).expect("write name");

    for query in ["fake".to_owned(), claimed.to_string()] {
        match store.resolve(&query) {
            Err(ModelError::Corrupt {
                expected, actual, ..
            }) => {
                assert_eq!(expected, claimed);
                assert_eq!(actual, Sha256Digest::of_bytes(&damaged));
            }
            other => panic!("resolving {query}: expected a corrupt-model error, got {other:?}"),
        }
    }
}

#[test]
fn a_verified_model_damaged_later_is_still_refused() {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = ModelStore::open(dir.path().join("store")).expect("open");
    let bytes = model_bytes(50_000);
    let part = write_part(dir.path(), "model.gguf", &bytes);
    let digest = Sha256Digest::of_bytes(&bytes);
    let model = store.import("tiny", &[part], &digest).expect("import");
    // Let the file's timestamps age past file-system granularity so that this resolve leaves a
    // verification stamp that later starts are allowed to trust without re-hashing.
    std::thread::sleep(std::time::Duration::from_millis(2_500));
    store.resolve("tiny").expect("verified");

    // Same size, one byte flipped in place: only the cache's change detection can notice.
    let mut file = OpenOptions::new()
        .write(true)
        .open(&model.path)
        .expect("open blob");
    file.seek(SeekFrom::Start(25_000)).expect("seek");
    file.write_all(&[bytes[25_000] ^ 0x01]).expect("write");
    drop(file);

    assert!(matches!(
        store.resolve("tiny"),
        Err(ModelError::Corrupt { .. })
    ));
}

#[test]
fn verify_all_reports_each_blob() {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = ModelStore::open(dir.path().join("store")).expect("open");
    let good = model_bytes(4_000);
    let good_digest = Sha256Digest::of_bytes(&good);
    let part = write_part(dir.path(), "good.gguf", &good);
    store.import("good", &[part], &good_digest).expect("import");
    let bad_digest = Sha256Digest::of_bytes(b"original");
    std::fs::write(store.blob_path(&bad_digest), b"damaged").expect("write fake blob");

    let report = store.verify_all().expect("verify all");

    assert_eq!(report.len(), 2);
    for (model, outcome) in &report {
        if model.digest == good_digest {
            assert_eq!(model.names, vec!["good".to_owned()]);
            assert!(outcome.is_ok() && model.verified);
        } else {
            assert_eq!(model.digest, bad_digest);
            assert!(model.names.is_empty());
            assert!(matches!(outcome, Err(ModelError::Corrupt { .. })));
            assert!(!model.verified);
        }
    }
}

#[test]
fn names_that_could_escape_the_store_are_refused() {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = ModelStore::open(dir.path().join("store")).expect("open");
    let part = write_part(dir.path(), "m.gguf", b"weights");
    let digest = Sha256Digest::of_bytes(b"weights");
    for name in ["../escape", "a/b", "", ".hidden"] {
        assert!(
            matches!(
                store.import(name, std::slice::from_ref(&part), &digest),
                Err(ModelError::InvalidName { .. })
            ),
            "{name:?} accepted"
        );
    }
    assert!(!dir.path().join("escape").exists());
}

#[test]
fn default_root_prefers_fleetgrid_home() {
    // Only this test in this binary touches the environment.
    std::env::set_var("FLEETGRID_HOME", "fleet-home");
    assert_eq!(
        ModelStore::default_root(),
        PathBuf::from("fleet-home").join("models")
    );
    std::env::remove_var("FLEETGRID_HOME");
    std::env::set_var("XDG_DATA_HOME", "xdg-data");
    assert_eq!(
        ModelStore::default_root(),
        PathBuf::from("xdg-data/fleetgrid/models")
    );
    std::env::remove_var("XDG_DATA_HOME");
}
