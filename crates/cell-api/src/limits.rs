//! The bounds both sides of the seam know.

/// Largest `max_tokens` a client may ask for.
pub const COMPLETION_TOKENS_MAX: u32 = 4096;

/// Prompt-head hashes a cell publishes per model (`Capacity::prompt_heads`):
/// the most recently assigned that a vehicle of the cell still holds. 256
/// hashes are 2 KiB as numbers, about 5 KiB of JSON per model in a capacity
/// summary; with heads of up to `domain::PROMPT_HEADS_MAX` blocks each, they
/// name the last 16 to 256 prompts' heads, shared system prompts more often.
pub const PROMPT_HEADS_PUBLISHED_MAX: usize = 256;

/// `Retry-After` sent with 429 and 503 when the scheduler gives none, seconds.
pub const RETRY_AFTER_DEFAULT_SECONDS: u64 = 1;
