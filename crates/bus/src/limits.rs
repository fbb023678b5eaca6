//! Every bound of the bus, in one place. Each side's config starts from
//! these; tests shorten the times.

use std::time::Duration;

/// How often a served cell publishes its capacity summary.
pub const CAPACITY_INTERVAL: Duration = Duration::from_millis(300);

/// A gateway forgets a cell whose last summary is older than this (a few
/// intervals, so that one lost summary does not move generations).
pub const CAPACITY_STALE_AFTER: Duration = Duration::from_millis(4 * 300);

/// A served generation that has nothing to send for this long sends an
/// empty batch, so that a gateway can tell a queued generation from a
/// lost cell.
pub const KEEPALIVE_INTERVAL: Duration = Duration::from_millis(500);

/// How often a served cell asks whether a generation's batches still have
/// a listener (an empty request to its gateway's inbox). A gateway that
/// died, or that dropped the generation without its cancel arriving, has
/// no subscription there: NATS answers "no responders" at once.
pub const LISTENER_PROBE_INTERVAL: Duration = Duration::from_secs(2);

/// "No responders" answers in a row after which a served cell stops a
/// generation: one can be a gateway reconnecting to another NATS server,
/// which subscribes its inboxes again.
pub const LISTENER_PROBE_MISSES_MAX: u32 = 2;

/// A gateway moves a running generation whose cell sent nothing for this
/// long (several keepalives).
pub const SILENCE_TIMEOUT: Duration = Duration::from_secs(3);

/// How long a gateway waits for a cell to answer a submission.
pub const SUBMIT_TIMEOUT: Duration = Duration::from_secs(5);

/// Cells a gateway asks, in turn, before it gives a submission up.
pub const PLACEMENT_TRIES_MAX: usize = 8;

/// Times one generation may move to another cell after its admission.
pub const MOVES_MAX: u32 = 4;

/// Pause before a move that found no cell tries again (grows with each
/// try), so that a gateway reconnecting to the bus is not out of tries at
/// once.
pub const MOVE_RETRY_DELAY: Duration = Duration::from_millis(250);

/// Generations one gateway's `Cells` runs at once; beyond it, submissions
/// are refused with `QueueFull`.
pub const GATEWAY_GENERATIONS_MAX: usize = 4_096;

/// Generations one served cell streams at once; beyond it, submissions are
/// refused with `QueueFull`.
pub const SERVED_GENERATIONS_MAX: usize = 4_096;

/// Most tokens in one batch: tokens ready at once are coalesced up to this.
pub const BATCH_TOKENS_MAX: usize = 64;

/// Most prompt tokens' scores in one batch: with 20 alternatives each, a
/// batch stays far below `MESSAGE_BYTES_MAX`.
pub const PROMPT_SCORES_PER_BATCH: usize = 256;

/// Largest bus message either side sends or decodes (NATS's default
/// `max_payload`).
pub const MESSAGE_BYTES_MAX: usize = 1024 * 1024;

/// Cells a gateway keeps summaries of; summaries from further cells are
/// ignored until some are forgotten.
pub const CELLS_MAX: usize = 1_024;

/// Cancels and policy changes a gateway queues for sending; `cancel` and
/// `owner_policy_changed` are synchronous, so they are handed to a task.
pub const OUTBOX_CAPACITY: usize = 1_024;

/// Updates buffered between `Cells` and one generation's consumer: a
/// generation never has more tokens than `COMPLETION_TOKENS_MAX`, plus its
/// end.
pub const UPDATES_CAPACITY: usize = cell_api::limits::COMPLETION_TOKENS_MAX as usize + 16;
