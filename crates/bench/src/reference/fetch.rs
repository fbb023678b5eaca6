//! Getting the llama.cpp source: `pip download` of the pinned `llama-cpp-python` source
//! distribution, a checksum, and extraction of its `vendor/llama.cpp` directory.

use std::fs::File;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::Command;

use sha2::{Digest, Sha256};

use super::{LLAMA_CPP_PYTHON_SDIST_SHA256, LLAMA_CPP_PYTHON_VERSION};
use crate::process::{remove_dir_if_present, run_logged};
use crate::BenchError;

/// The Python interpreter that runs pip; `FLEETGRID_BENCH_PYTHON` overrides it.
const DEFAULT_PYTHON: &str = "python3";
/// Read size while hashing the source distribution.
const HASH_CHUNK_BYTES: usize = 1 << 20;

/// The extracted llama.cpp tree in `cache_dir`, downloading and extracting it if needed.
pub(super) fn ensure_source(cache_dir: &Path) -> Result<PathBuf, BenchError> {
    let top = format!("llama_cpp_python-{LLAMA_CPP_PYTHON_VERSION}");
    let source_dir = cache_dir.join(&top).join("vendor").join("llama.cpp");
    if source_dir.join("CMakeLists.txt").is_file() {
        return Ok(source_dir);
    }
    let sdist = ensure_sdist(cache_dir)?;
    // Extract into a scratch directory and rename, so that an interrupted extraction is never
    // mistaken for a complete tree.
    let scratch = cache_dir.join("extract.partial");
    remove_dir_if_present(&scratch)?;
    std::fs::create_dir_all(&scratch).map_err(|e| BenchError::io("create", &scratch, e))?;
    let mut tar = Command::new("tar");
    tar.arg("-xzf")
        .arg(&sdist)
        .arg("-C")
        .arg(&scratch)
        .arg(format!("{top}/vendor/llama.cpp"));
    run_logged(&mut tar, "tar", &cache_dir.join("extract.log"))?;
    let final_top = cache_dir.join(&top);
    remove_dir_if_present(&final_top)?;
    let extracted_top = scratch.join(&top);
    std::fs::rename(&extracted_top, &final_top)
        .map_err(|e| BenchError::io("move", &extracted_top, e))?;
    remove_dir_if_present(&scratch)?;
    Ok(source_dir)
}

/// The verified source distribution in `cache_dir/download`, fetched with pip when missing.
fn ensure_sdist(cache_dir: &Path) -> Result<PathBuf, BenchError> {
    let download_dir = cache_dir.join("download");
    let sdist = download_dir.join(format!(
        "llama_cpp_python-{LLAMA_CPP_PYTHON_VERSION}.tar.gz"
    ));
    if !sdist.is_file() {
        std::fs::create_dir_all(&download_dir)
            .map_err(|e| BenchError::io("create", &download_dir, e))?;
        let python =
            std::env::var("FLEETGRID_BENCH_PYTHON").unwrap_or_else(|_| DEFAULT_PYTHON.to_owned());
        let mut pip = Command::new(&python);
        pip.args(["-m", "pip", "download", "--no-deps", "--no-binary", ":all:"])
            .arg(format!("llama-cpp-python=={LLAMA_CPP_PYTHON_VERSION}"))
            .arg("-d")
            .arg(&download_dir);
        run_logged(&mut pip, "pip download", &cache_dir.join("download.log"))?;
    }
    let actual = sha256_hex(&sdist)?;
    if actual != LLAMA_CPP_PYTHON_SDIST_SHA256 {
        return Err(BenchError::ChecksumMismatch {
            path: sdist,
            expected: LLAMA_CPP_PYTHON_SDIST_SHA256.to_owned(),
            actual,
        });
    }
    Ok(sdist)
}

pub(crate) fn sha256_hex(path: &Path) -> Result<String, BenchError> {
    let mut file = File::open(path).map_err(|e| BenchError::io("open", path, e))?;
    let mut hasher = Sha256::new();
    let mut buffer = vec![0_u8; HASH_CHUNK_BYTES];
    loop {
        let read = file
            .read(&mut buffer)
            .map_err(|e| BenchError::io("read", path, e))?;
        if read == 0 {
            break;
        }
        hasher.update(&buffer[..read]);
    }
    Ok(hex::encode(hasher.finalize()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sha256_of_a_known_file() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("abc");
        std::fs::write(&path, b"abc").expect("write");
        assert_eq!(
            sha256_hex(&path).expect("hash"),
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
    }

    #[test]
    fn a_tampered_download_is_refused() {
        let cache = tempfile::tempdir().expect("tempdir");
        let download_dir = cache.path().join("download");
        std::fs::create_dir_all(&download_dir).expect("mkdir");
        let sdist = download_dir.join(format!(
            "llama_cpp_python-{LLAMA_CPP_PYTHON_VERSION}.tar.gz"
        ));
        std::fs::write(&sdist, b"not the release").expect("write");
        assert!(matches!(
            ensure_source(cache.path()),
            Err(BenchError::ChecksumMismatch { .. })
        ));
    }
}
