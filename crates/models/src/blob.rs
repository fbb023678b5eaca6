//! Writing new blobs: bytes are copied into a temporary file inside the store while being hashed,
//! and the file is renamed to its final, digest-named path only if the digest matches.

use std::io::{Read, Write};
use std::path::Path;

use sha2::{Digest, Sha256};
use tempfile::NamedTempFile;

use crate::limits::COPY_BUFFER_BYTES;
use crate::{ModelError, Sha256Digest};

/// A blob being assembled from one or more sources.
pub(crate) struct BlobWriter {
    file: NamedTempFile,
    hasher: Sha256,
    size_bytes: u64,
}

impl BlobWriter {
    /// Starts a blob in `tmp_dir`, which must be on the same file system as the blob directory so
    /// that the final rename is atomic.
    pub(crate) fn create(tmp_dir: &Path) -> Result<Self, ModelError> {
        let file = NamedTempFile::new_in(tmp_dir)
            .map_err(|e| ModelError::io("create temporary file in", tmp_dir, e))?;
        Ok(BlobWriter {
            file,
            hasher: Sha256::new(),
            size_bytes: 0,
        })
    }

    /// Appends everything `reader` yields; `origin` names the source in errors.
    pub(crate) fn append(
        &mut self,
        reader: &mut impl Read,
        origin: &Path,
    ) -> Result<(), ModelError> {
        let mut buffer = vec![0u8; COPY_BUFFER_BYTES];
        loop {
            let read = match reader.read(&mut buffer) {
                Ok(0) => return Ok(()),
                Ok(read) => read,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(ModelError::io("read", origin, e)),
            };
            let chunk = &buffer[..read];
            self.hasher.update(chunk);
            self.file
                .write_all(chunk)
                .map_err(|e| ModelError::io("write", self.file.path(), e))?;
            self.size_bytes += read as u64;
        }
    }

    /// Checks the digest and, only if it matches, moves the blob to `destination`. On a mismatch
    /// the temporary file is deleted and nothing appears in the store.
    pub(crate) fn finish(
        self,
        expected: &Sha256Digest,
        origin: String,
        destination: &Path,
    ) -> Result<u64, ModelError> {
        let actual = Sha256Digest::from_hasher(self.hasher);
        if &actual != expected {
            return Err(ModelError::ChecksumMismatch {
                origin,
                expected: *expected,
                actual,
            });
        }
        // Flush to disk before the rename so a crash cannot leave a digest-named file with
        // missing content behind.
        self.file
            .as_file()
            .sync_all()
            .map_err(|e| ModelError::io("sync", self.file.path(), e))?;
        self.file
            .persist(destination)
            .map_err(|e| ModelError::io("move blob into place at", destination, e.error))?;
        Ok(self.size_bytes)
    }
}

/// Replaces `path` with `contents` so that readers see the old or the new file, never a mix.
pub(crate) fn write_atomically(
    path: &Path,
    tmp_dir: &Path,
    contents: &[u8],
) -> Result<(), ModelError> {
    let mut file = NamedTempFile::new_in(tmp_dir)
        .map_err(|e| ModelError::io("create temporary file in", tmp_dir, e))?;
    file.write_all(contents)
        .map_err(|e| ModelError::io("write", file.path(), e))?;
    file.persist(path)
        .map_err(|e| ModelError::io("replace", path, e.error))?;
    Ok(())
}
