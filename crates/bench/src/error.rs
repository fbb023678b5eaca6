//! The one error type of the benchmarks.

use std::path::PathBuf;

/// Everything that can stop a benchmark before it has a figure to report.
#[derive(Debug, thiserror::Error)]
pub enum BenchError {
    /// A file or directory could not be read, written or created.
    #[error("{action} {}: {source}", path.display())]
    Io {
        action: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// An external program (pip, tar, cmake, llama-bench, fleetgrid, ...) could not be started.
    #[error("start {program}: {source}")]
    Spawn {
        program: String,
        #[source]
        source: std::io::Error,
    },
    /// An external program ran and failed; `output_tail` holds the end of what it printed.
    #[error("{program} failed ({status}): {output_tail}")]
    CommandFailed {
        program: String,
        status: String,
        output_tail: String,
    },
    /// The downloaded source distribution is not the one this benchmark is pinned to.
    #[error("{} has sha256 {actual}, expected {expected}", path.display())]
    ChecksumMismatch {
        path: PathBuf,
        expected: String,
        actual: String,
    },
    /// A reference tool printed something that is not what this version of it prints.
    #[error("parse {what}: {reason}")]
    Parse { what: &'static str, reason: String },
    /// Our engine failed to start or to measure itself.
    #[error("engine: {0}")]
    Engine(#[from] engine::EngineError),
    /// The model could not be put into the scratch model store of the serving benchmark.
    #[error("model store: {0}")]
    ModelStore(#[from] models::ModelError),
    /// A server (llama-server, our stack) did not start or become ready.
    #[error("{0}")]
    Stack(#[from] stack::StackError),
    /// A load-generation request failed.
    #[error("request to {target} failed: {reason}")]
    Request { target: String, reason: String },
    /// A benchmark thread panicked; the panic message went to stderr.
    #[error("{0} panicked")]
    Panicked(&'static str),
    /// The benchmark was asked for something it cannot measure.
    #[error("invalid benchmark setting: {0}")]
    InvalidSetting(String),
}

impl BenchError {
    pub(crate) fn io(
        action: &'static str,
        path: impl Into<PathBuf>,
        source: std::io::Error,
    ) -> Self {
        BenchError::Io {
            action,
            path: path.into(),
            source,
        }
    }
}
