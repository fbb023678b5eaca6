//! The one error type of the stack.

use std::path::PathBuf;
use std::time::Duration;

/// Everything that keeps a stack from starting or from becoming ready.
#[derive(Debug, thiserror::Error)]
pub enum StackError {
    /// A log file could not be created or opened.
    #[error("open {}: {source}", path.display())]
    Log {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// A process could not be started.
    #[error("start {name}: {source}")]
    Spawn {
        name: String,
        #[source]
        source: std::io::Error,
    },
    /// A process exited while it was needed; `log_tail` is the end of its log.
    #[error("{name} exited ({exit}); the end of its log:\n{log_tail}")]
    Exited {
        name: String,
        exit: String,
        log_tail: String,
    },
    /// A one-shot command ran and failed.
    #[error("{command} failed ({status}): {stderr}")]
    CommandFailed {
        command: String,
        status: String,
        stderr: String,
    },
    /// A process printed something other than what it announces itself with.
    #[error("{name} printed {line:?}, not its announcement")]
    Announcement { name: String, line: String },
    /// A one-shot command printed nothing where a value was expected.
    #[error("{command} printed nothing")]
    NoOutput { command: String },
    /// Something did not happen within its bound.
    #[error("{what} within {waited:?}")]
    Timeout { what: String, waited: Duration },
    /// The output of a process, or the task waiting for it, was lost.
    #[error("lost the output of {name}")]
    ReaderLost { name: String },
}
