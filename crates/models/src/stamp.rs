//! The verification cache: a small sidecar per blob recording the file's identity (size, times,
//! inode) when it last hashed correctly, so a 469 MiB model is not re-hashed on every start.
//!
//! A stamp is trusted only when the file's modification time is clearly older than the moment the
//! stamp was taken. File systems keep times at a coarse granularity, so a write landing in the same
//! tick as the stamp would leave every field unchanged; like git's "racy clean" check, such a
//! stamp forces one more full hash, after which a fresh stamp is trusted.

use std::fs::Metadata;
use std::path::Path;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};

use crate::{ModelError, Sha256Digest};

/// Coarser than the timestamp granularity of every file system the store is expected to live on
/// (ext4 and friends tick every few milliseconds; FAT every two seconds).
const TIMESTAMP_GRANULARITY: Duration = Duration::from_secs(2);

/// What a file looked like when it was verified.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct FileIdentity {
    size_bytes: u64,
    modified_ns: u64,
    /// The inode change time; unlike the modification time it cannot be set back by a program.
    changed_ns: u64,
    inode: u64,
}

/// A sidecar: the digest that was checked, the file identity and when the identity was read.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct Stamp {
    digest: String,
    identity: FileIdentity,
    taken_ns: u64,
}

impl FileIdentity {
    pub(crate) fn of(metadata: &Metadata) -> Self {
        #[cfg(unix)]
        {
            use std::os::unix::fs::MetadataExt;
            FileIdentity {
                size_bytes: metadata.len(),
                modified_ns: unix_ns(metadata.mtime(), metadata.mtime_nsec()),
                changed_ns: unix_ns(metadata.ctime(), metadata.ctime_nsec()),
                inode: metadata.ino(),
            }
        }
        #[cfg(not(unix))]
        {
            let modified_ns = metadata.modified().map(system_time_ns).unwrap_or(0);
            FileIdentity {
                size_bytes: metadata.len(),
                modified_ns,
                changed_ns: modified_ns,
                inode: 0,
            }
        }
    }

    pub(crate) fn size_bytes(&self) -> u64 {
        self.size_bytes
    }
}

impl Stamp {
    /// A stamp for a file whose identity was read just before it was hashed.
    pub(crate) fn new(digest: &Sha256Digest, identity: FileIdentity, taken: SystemTime) -> Self {
        Stamp {
            digest: digest.to_string(),
            identity,
            taken_ns: system_time_ns(taken),
        }
    }

    /// Whether this stamp records a good hash of `digest` for a file that, as far as its size,
    /// times and inode tell, has not changed since.
    pub(crate) fn describes(&self, digest: &Sha256Digest, identity: &FileIdentity) -> bool {
        self.digest == digest.to_string() && &self.identity == identity
    }

    /// Whether this stamp proves, well enough to skip hashing, that a file with `identity` still
    /// hashes to `digest`: it [`Self::describes`] the file and the file had settled before the
    /// stamp was taken.
    pub(crate) fn vouches_for(&self, digest: &Sha256Digest, identity: &FileIdentity) -> bool {
        let granularity_ns = TIMESTAMP_GRANULARITY.as_nanos() as u64;
        let settled_before_stamp = identity.modified_ns.saturating_add(granularity_ns)
            < self.taken_ns
            && identity.changed_ns.saturating_add(granularity_ns) < self.taken_ns;
        self.describes(digest, identity) && settled_before_stamp
    }
}

/// Reads a sidecar; a missing or unreadable one just means "not verified yet".
pub(crate) fn read(path: &Path) -> Option<Stamp> {
    let text = std::fs::read(path).ok()?;
    serde_json::from_slice(&text).ok()
}

/// Writes a sidecar atomically (temporary file in `tmp_dir`, then rename).
pub(crate) fn write(path: &Path, tmp_dir: &Path, stamp: &Stamp) -> Result<(), ModelError> {
    let json = serde_json::to_vec(stamp)
        .map_err(|e| ModelError::io("encode verification stamp", path, std::io::Error::other(e)))?;
    crate::blob::write_atomically(path, tmp_dir, &json)
}

fn system_time_ns(time: SystemTime) -> u64 {
    // A clock before 1970 is not worth a failure here: it only makes stamps untrusted.
    time.duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(0)
}

#[cfg(unix)]
fn unix_ns(seconds: i64, nanoseconds: i64) -> u64 {
    (seconds.max(0) as u64)
        .saturating_mul(1_000_000_000)
        .saturating_add(nanoseconds.max(0) as u64)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn identity(modified_ns: u64) -> FileIdentity {
        FileIdentity {
            size_bytes: 10,
            modified_ns,
            changed_ns: modified_ns,
            inode: 7,
        }
    }

    #[test]
    fn trusts_only_an_old_unchanged_file_with_the_same_digest() {
        let digest = Sha256Digest::of_bytes(b"model");
        let other = Sha256Digest::of_bytes(b"other");
        let taken = UNIX_EPOCH + Duration::from_secs(1_000);
        let old = identity(Duration::from_secs(900).as_nanos() as u64);
        let stamp = Stamp::new(&digest, old.clone(), taken);
        assert!(stamp.vouches_for(&digest, &old));
        assert!(!stamp.vouches_for(&other, &old));
        let truncated = FileIdentity {
            size_bytes: 5,
            ..old.clone()
        };
        assert!(!stamp.vouches_for(&digest, &truncated));
    }

    #[test]
    fn distrusts_a_file_modified_within_timestamp_granularity_of_the_stamp() {
        let digest = Sha256Digest::of_bytes(b"model");
        let taken = UNIX_EPOCH + Duration::from_secs(1_000);
        let racy = identity(Duration::from_millis(999_999).as_nanos() as u64);
        let stamp = Stamp::new(&digest, racy.clone(), taken);
        assert!(stamp.describes(&digest, &racy));
        assert!(!stamp.vouches_for(&digest, &racy));
    }
}
