//! Every bound the model store works under, in one place.

use std::time::Duration;

/// How many HTTP requests one `pull` may make before it gives up. Each interrupted transfer costs
/// one attempt; the partial file is kept, so a later `pull` resumes where this one stopped.
pub const PULL_ATTEMPTS_MAX: u32 = 10;

/// The largest file `pull` will write. The biggest model the fleet could run is far smaller; this
/// stops a misbehaving server from filling the disk with an endless body.
pub const PULL_BYTES_MAX: u64 = 64 * 1024 * 1024 * 1024;

/// How long to wait for a TCP/TLS connection to the download server.
pub const PULL_CONNECT_TIMEOUT: Duration = Duration::from_secs(30);

/// How long a download may stall without receiving a byte before the attempt is abandoned.
pub const PULL_READ_TIMEOUT: Duration = Duration::from_secs(60);

/// The pause before retry `n` is `n` times this, so a flapping server is not hammered.
pub const PULL_RETRY_DELAY: Duration = Duration::from_millis(500);

/// Copy buffer for hashing and concatenating files. Large enough that sha256, not syscalls,
/// dominates the time spent.
pub(crate) const COPY_BUFFER_BYTES: usize = 1024 * 1024;

/// How many bytes of pip's stderr are kept in an error, so that a failure is explained without
/// pasting an unbounded log into it.
pub(crate) const PIP_STDERR_TAIL_BYTES: usize = 4 * 1024;
