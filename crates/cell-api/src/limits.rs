//! The bounds both sides of the seam know.

/// Largest `max_tokens` a client may ask for.
pub const COMPLETION_TOKENS_MAX: u32 = 4096;

/// Prompt-head hashes a cell publishes per model (`Capacity::prompt_heads`):
/// the most recently assigned that a vehicle of the cell still holds. 256
/// hashes are 2 KiB as numbers, about 5 KiB of JSON per model in a capacity
/// summary; with heads of up to `domain::PROMPT_HEADS_MAX` blocks each, they
/// name the last 16 to 256 prompts' heads, shared system prompts more often.
pub const PROMPT_HEADS_PUBLISHED_MAX: usize = 256;

/// Vehicles a cell lists by name in a capacity summary sent over a broker
/// (`Capacity::nodes`); the rest are counted in `Capacity::unlisted`. A
/// listed vehicle is about 80 bytes of JSON, so 1,000 of them are about
/// 80 KiB: a cell of any size publishes well under NATS's 1 MiB message
/// limit, and each gateway reads at most that every few hundred
/// milliseconds per cell. Placement needs only the per-model totals, which
/// count every vehicle.
pub const NODES_PUBLISHED_MAX: usize = 1_000;

/// `Retry-After` sent with 429 and 503 when the scheduler gives none, seconds.
pub const RETRY_AFTER_DEFAULT_SECONDS: u64 = 1;
