//! The store itself: opening it, resolving names to verified blobs, listing, verifying and
//! importing local files. Fetching from pip lives in `pip.rs`, HTTP downloads in `pull.rs`.

use std::collections::BTreeMap;
use std::fs::File;
use std::path::{Path, PathBuf};
use std::time::SystemTime;

use crate::blob::{self, BlobWriter};
use crate::stamp::{self, FileIdentity, Stamp};
use crate::{ModelError, Sha256Digest};

/// Environment variable naming the Python interpreter whose pip downloads wheels
/// (default `python3`). Pointing it at a virtual environment guarantees pip is present.
pub const PYTHON_ENV: &str = "FLEETGRID_PYTHON";

/// The longest model name accepted; names become file names.
const NAME_BYTES_MAX: usize = 128;

/// A content-addressed store of model files on local disk.
#[derive(Debug, Clone)]
pub struct ModelStore {
    root: PathBuf,
    python: PathBuf,
}

/// A model file whose digest has been checked.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VerifiedModel {
    /// The name it was asked for by (or the hex digest when asked for by digest).
    pub name: String,
    pub digest: Sha256Digest,
    pub path: PathBuf,
    pub size_bytes: u64,
}

/// A blob in the store and the names that point at it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredModel {
    pub names: Vec<String>,
    pub digest: Sha256Digest,
    pub size_bytes: u64,
    /// Whether the file hashed correctly at its last check and has not visibly changed since
    /// (same size, times and inode). Cheap; [`ModelStore::verify_all`] re-hashes for certain.
    pub verified: bool,
}

impl ModelStore {
    /// `$FLEETGRID_HOME/models`, else `$XDG_DATA_HOME/fleetgrid/models`, else
    /// `~/.local/share/fleetgrid/models`, else `.fleetgrid/models` when there is no home directory.
    pub fn default_root() -> PathBuf {
        let from_env = |key: &str| std::env::var_os(key).filter(|value| !value.is_empty());
        if let Some(home) = from_env("FLEETGRID_HOME") {
            return PathBuf::from(home).join("models");
        }
        if let Some(data) = from_env("XDG_DATA_HOME") {
            return PathBuf::from(data).join("fleetgrid").join("models");
        }
        match from_env("HOME") {
            Some(home) => PathBuf::from(home).join(".local/share/fleetgrid/models"),
            None => PathBuf::from(".fleetgrid").join("models"),
        }
    }

    /// Opens (creating if needed) the store at `root`.
    pub fn open(root: impl Into<PathBuf>) -> Result<ModelStore, ModelError> {
        let python = std::env::var_os(PYTHON_ENV)
            .filter(|value| !value.is_empty())
            .map_or_else(|| PathBuf::from("python3"), PathBuf::from);
        let store = ModelStore {
            root: root.into(),
            python,
        };
        for dir in [
            store.root.join("blobs").join("sha256"),
            store.names_dir(),
            store.stamps_dir(),
            store.partial_dir(),
            store.tmp_dir(),
        ] {
            std::fs::create_dir_all(&dir).map_err(|e| ModelError::io("create", dir, e))?;
        }
        Ok(store)
    }

    /// Uses `python` (instead of `$FLEETGRID_PYTHON` or `python3`) to run pip in [`Self::fetch`].
    pub fn with_python(mut self, python: impl Into<PathBuf>) -> Self {
        self.python = python.into();
        self
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    pub(crate) fn python(&self) -> &Path {
        &self.python
    }

    /// Where the blob with this digest lives (whether or not it is present).
    pub fn blob_path(&self, digest: &Sha256Digest) -> PathBuf {
        self.root
            .join("blobs")
            .join("sha256")
            .join(digest.to_string())
    }

    fn names_dir(&self) -> PathBuf {
        self.root.join("names")
    }

    fn stamps_dir(&self) -> PathBuf {
        self.root.join("verified")
    }

    fn stamp_path(&self, digest: &Sha256Digest) -> PathBuf {
        self.stamps_dir().join(format!("{digest}.json"))
    }

    pub(crate) fn partial_dir(&self) -> PathBuf {
        self.root.join("partial")
    }

    pub(crate) fn tmp_dir(&self) -> PathBuf {
        self.root.join("tmp")
    }

    pub(crate) fn pip_cache_dir(&self) -> PathBuf {
        self.root.join("pip-cache")
    }

    /// Name or hex digest -> a verified local file. A blob that no longer matches its digest is
    /// refused with [`ModelError::Corrupt`].
    pub fn resolve(&self, name_or_digest: &str) -> Result<VerifiedModel, ModelError> {
        let digest = match name_or_digest.parse::<Sha256Digest>() {
            Ok(digest) => digest,
            Err(_) => self
                .name_target(name_or_digest)?
                .ok_or_else(|| ModelError::NotFound(name_or_digest.to_owned()))?,
        };
        let size_bytes = self
            .verify_blob(&digest, false)
            .map_err(|error| match error {
                ModelError::NotFound(_) => ModelError::NotFound(name_or_digest.to_owned()),
                other => other,
            })?;
        Ok(VerifiedModel {
            name: name_or_digest.to_owned(),
            digest,
            path: self.blob_path(&digest),
            size_bytes,
        })
    }

    /// Every blob in the store with the names pointing at it, sorted by first name then digest.
    /// Cheap: nothing is hashed.
    pub fn list(&self) -> Result<Vec<StoredModel>, ModelError> {
        let mut names_by_digest = self.names_by_digest()?;
        let blobs_dir = self.root.join("blobs").join("sha256");
        let entries =
            std::fs::read_dir(&blobs_dir).map_err(|e| ModelError::io("list", &blobs_dir, e))?;
        let mut models = Vec::new();
        for entry in entries {
            let entry = entry.map_err(|e| ModelError::io("list", &blobs_dir, e))?;
            let Some(digest) = entry
                .file_name()
                .to_str()
                .and_then(|file_name| file_name.parse::<Sha256Digest>().ok())
            else {
                continue;
            };
            let metadata = entry
                .metadata()
                .map_err(|e| ModelError::io("inspect", entry.path(), e))?;
            if !metadata.is_file() {
                continue;
            }
            let identity = FileIdentity::of(&metadata);
            let verified = stamp::read(&self.stamp_path(&digest))
                .is_some_and(|stamp| stamp.describes(&digest, &identity));
            models.push(StoredModel {
                names: names_by_digest.remove(&digest).unwrap_or_default(),
                digest,
                size_bytes: identity.size_bytes(),
                verified,
            });
        }
        models.sort_by(|a, b| (&a.names, a.digest).cmp(&(&b.names, b.digest)));
        Ok(models)
    }

    /// Re-hashes every blob in full, ignoring the verification cache.
    #[allow(clippy::type_complexity)] // The pair is the natural shape of a report.
    pub fn verify_all(&self) -> Result<Vec<(StoredModel, Result<(), ModelError>)>, ModelError> {
        let models = self.list()?;
        Ok(models
            .into_iter()
            .map(|mut model| {
                let outcome = self.verify_blob(&model.digest, true).map(|_| ());
                model.verified = outcome.is_ok();
                (model, outcome)
            })
            .collect())
    }

    /// Copies (concatenating, in order) `parts` into the store under `name`. The blob appears only
    /// if the bytes hash to `expected`; otherwise nothing is left behind.
    pub fn import(
        &self,
        name: &str,
        parts: &[PathBuf],
        expected: &Sha256Digest,
    ) -> Result<VerifiedModel, ModelError> {
        validate_name(name)?;
        if let Some(model) = self.existing(name, expected)? {
            return Ok(model);
        }
        let mut writer = BlobWriter::create(&self.tmp_dir())?;
        for part in parts {
            let mut file = File::open(part).map_err(|e| ModelError::io("open", part, e))?;
            writer.append(&mut file, part)?;
        }
        let origin = parts
            .iter()
            .map(|part| part.display().to_string())
            .collect::<Vec<_>>()
            .join(" + ");
        writer.finish(expected, origin, &self.blob_path(expected))?;
        self.adopt(name, expected)
    }

    /// The model already in the store under `expected`, now also known as `name`; `None` when the
    /// blob is missing or corrupt (a corrupt one is then replaced by the caller's fresh copy).
    pub(crate) fn existing(
        &self,
        name: &str,
        expected: &Sha256Digest,
    ) -> Result<Option<VerifiedModel>, ModelError> {
        match self.verify_blob(expected, false) {
            Ok(_) => self.adopt(name, expected).map(Some),
            Err(ModelError::NotFound(_)) => Ok(None),
            Err(error @ ModelError::Corrupt { .. }) => {
                tracing::warn!(model = name, %error, "replacing corrupt model file");
                Ok(None)
            }
            Err(other) => Err(other),
        }
    }

    /// Points `name` at the blob `digest`, which the caller has just verified or written.
    pub(crate) fn adopt(
        &self,
        name: &str,
        digest: &Sha256Digest,
    ) -> Result<VerifiedModel, ModelError> {
        validate_name(name)?;
        let path = self.blob_path(digest);
        let size_bytes = self.record_verified(digest, &path)?;
        if self.name_target(name)? != Some(*digest) {
            let name_path = self.names_dir().join(name);
            blob::write_atomically(&name_path, &self.tmp_dir(), digest.to_string().as_bytes())?;
        }
        Ok(VerifiedModel {
            name: name.to_owned(),
            digest: *digest,
            path,
            size_bytes,
        })
    }

    /// The digest `name` points at, if the name exists.
    fn name_target(&self, name: &str) -> Result<Option<Sha256Digest>, ModelError> {
        validate_name(name)?;
        let path = self.names_dir().join(name);
        match std::fs::read_to_string(&path) {
            Ok(text) => text.trim().parse().map(Some),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(ModelError::io("read", path, e)),
        }
    }

    fn names_by_digest(&self) -> Result<BTreeMap<Sha256Digest, Vec<String>>, ModelError> {
        let dir = self.names_dir();
        let entries = std::fs::read_dir(&dir).map_err(|e| ModelError::io("list", &dir, e))?;
        let mut names_by_digest: BTreeMap<Sha256Digest, Vec<String>> = BTreeMap::new();
        for entry in entries {
            let entry = entry.map_err(|e| ModelError::io("list", &dir, e))?;
            let Ok(name) = entry.file_name().into_string() else {
                continue;
            };
            // A name file that is not ours (an editor backup, say) is skipped, not fatal.
            if let Ok(Some(digest)) = self.name_target(&name) {
                names_by_digest.entry(digest).or_default().push(name);
            }
        }
        for names in names_by_digest.values_mut() {
            names.sort();
        }
        Ok(names_by_digest)
    }

    /// Checks the blob against its digest, trusting the verification cache unless `rehash`.
    /// Returns the blob's size.
    fn verify_blob(&self, digest: &Sha256Digest, rehash: bool) -> Result<u64, ModelError> {
        let path = self.blob_path(digest);
        let metadata = match std::fs::metadata(&path) {
            Ok(metadata) => metadata,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                return Err(ModelError::NotFound(digest.to_string()))
            }
            Err(e) => return Err(ModelError::io("inspect", path, e)),
        };
        let identity = FileIdentity::of(&metadata);
        let stamp_path = self.stamp_path(digest);
        if !rehash
            && stamp::read(&stamp_path).is_some_and(|stamp| stamp.vouches_for(digest, &identity))
        {
            return Ok(identity.size_bytes());
        }
        // The identity was read before hashing, so a write during the hash invalidates the stamp.
        let taken = SystemTime::now();
        let actual = Sha256Digest::of_file(&path)?;
        if &actual != digest {
            let _ = std::fs::remove_file(&stamp_path);
            return Err(ModelError::Corrupt {
                expected: *digest,
                actual,
                path,
            });
        }
        self.save_stamp(&Stamp::new(digest, identity.clone(), taken), digest);
        Ok(identity.size_bytes())
    }

    /// Stamps a blob whose content was hashed as it was written.
    fn record_verified(&self, digest: &Sha256Digest, path: &Path) -> Result<u64, ModelError> {
        let taken = SystemTime::now();
        let metadata = std::fs::metadata(path).map_err(|e| ModelError::io("inspect", path, e))?;
        let identity = FileIdentity::of(&metadata);
        let size_bytes = identity.size_bytes();
        self.save_stamp(&Stamp::new(digest, identity, taken), digest);
        Ok(size_bytes)
    }

    fn save_stamp(&self, stamp: &Stamp, digest: &Sha256Digest) {
        // The stamp only saves time later; failing to write it must not fail a good model.
        if let Err(error) = stamp::write(&self.stamp_path(digest), &self.tmp_dir(), stamp) {
            tracing::warn!(%digest, %error, "could not cache model verification");
        }
    }
}

/// Names become file names under `names/`, so they are restricted to a portable, unambiguous set.
fn validate_name(name: &str) -> Result<(), ModelError> {
    let invalid = |reason| {
        Err(ModelError::InvalidName {
            name: name.to_owned(),
            reason,
        })
    };
    if name.is_empty() || name.len() > NAME_BYTES_MAX {
        return invalid("must be 1 to 128 bytes long");
    }
    if name.starts_with('.') {
        return invalid("must not start with a dot");
    }
    if !name
        .chars()
        .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '-' | '_'))
    {
        return invalid("may contain only ascii letters, digits, '.', '-' and '_'");
    }
    if name.parse::<Sha256Digest>().is_ok() {
        return invalid("must not look like a sha256 digest");
    }
    Ok(())
}
