//! The bounds both sides of the seam know.

/// Largest `max_tokens` a client may ask for.
pub const COMPLETION_TOKENS_MAX: u32 = 4096;

/// `Retry-After` sent with 429 and 503 when the scheduler gives none, seconds.
pub const RETRY_AFTER_DEFAULT_SECONDS: u64 = 1;
