//! Every bound a cell enforces, in one place: its channels, the agents'
//! handshake and streams, KV checkpoints, and what a node's messages may
//! hold. A limit that is not here (or in `cell_api::limits`) does not exist.

use std::time::Duration;

pub use cell_api::limits::{COMPLETION_TOKENS_MAX, RETRY_AFTER_DEFAULT_SECONDS};

/// Updates buffered between the core and one client's handler. A generation
/// never produces more tokens than `COMPLETION_TOKENS_MAX`, so the core's
/// `try_send` only fails for a client that went away.
pub const CLIENT_UPDATES_CAPACITY: usize = COMPLETION_TOKENS_MAX as usize + 16;

/// Messages buffered towards one node; a node that does not drain them is
/// treated as lost.
pub const NODE_OUTBOUND_CAPACITY: usize = 256;

/// How long a new agent stream may take to send its `Hello`.
pub const HELLO_TIMEOUT: Duration = Duration::from_secs(10);

/// How often agents heartbeat, unless configured.
pub const HEARTBEAT_INTERVAL_DEFAULT: Duration = Duration::from_secs(1);

/// A node silent for this long is marked gone, unless configured.
pub const HEARTBEAT_TIMEOUT_DEFAULT: Duration = Duration::from_secs(5);

/// How often the scheduler gets a `Tick` (deadlines, drains, reaping).
pub const TICK_INTERVAL: Duration = Duration::from_millis(250);

/// Prompts at least this long have their KV cache kept at the coordinator
/// (sent once by the node that prefilled them), so that a handover loads it
/// instead of prefilling again; shorter ones are cheap to re-prefill.
pub const KV_CHECKPOINT_PROMPT_TOKENS_MIN: usize = 256;

/// Bytes of KV checkpoints kept (and being received) at once, over all
/// in-flight generations. Beyond it a generation is handed over by
/// re-prefilling, as without checkpoints. At about 23 KB per token for the
/// smallest fleet model, 1 GiB keeps some forty 1,000-token prompts.
pub const KV_CHECKPOINT_BYTES_BUDGET: usize = 1 << 30;

/// Largest KV checkpoint a node may send, per prompt token: the f16 keys and
/// values of one token of a Llama-3-8B-class model (32 layers × 8 KV heads ×
/// 128 × 2 × 2 bytes = 128 KiB), with room for llama.cpp's per-cell metadata.
/// The smallest fleet model needs about 23 KB.
pub const KV_CHECKPOINT_BYTES_PER_TOKEN_MAX: usize = 144 * 1024;

/// Bytes of a KV checkpoint beyond its per-token part: llama.cpp's stream and
/// per-layer headers (a few hundred bytes for the fleet's models).
pub const KV_CHECKPOINT_HEADER_BYTES_MAX: usize = 64 * 1024;

/// Largest `total_bytes` a KV checkpoint of a `prompt_tokens`-token prompt may
/// announce: the per-token bound, and never more than the engine ever exports
/// (`engine::CHECKPOINT_BYTES_MAX`). A larger one is a protocol violation.
pub fn kv_checkpoint_bytes_max(prompt_tokens: usize) -> usize {
    prompt_tokens
        .saturating_mul(KV_CHECKPOINT_BYTES_PER_TOKEN_MAX)
        .saturating_add(KV_CHECKPOINT_HEADER_BYTES_MAX)
        .min(engine::CHECKPOINT_BYTES_MAX)
}

/// Attempts (first run plus re-assignments) one request may take before it
/// fails with an error instead of being tried again.
pub const ATTEMPTS_PER_REQUEST_MAX: u32 = 16;

/// Writes waiting for the request-log writer; beyond it, records are counted
/// as dropped in the metrics rather than holding up a response.
pub const REQUEST_LOG_CAPACITY: usize = 4096;

/// Largest first message (the `Hello`) a new agent stream may send, before
/// it has authenticated. A gRPC length prefix above it ends the stream
/// before the message is read (`grpc::HelloLimit`). An honest `Hello` is a
/// few hundred bytes per cached model.
pub const HELLO_BYTES_MAX: usize = 16 * 1024;

/// Largest `Enrol` or `Renew` call: a node's certificate request is well
/// under a kilobyte.
pub const ENROLMENT_MESSAGE_BYTES_MAX: usize = 16 * 1024;

/// `Enrol` and `Renew` calls a cell serves at once (each reads the store and
/// signs); more are refused with `RESOURCE_EXHAUSTED`, so that a flood of
/// them cannot crowd out the store.
pub const ENROLMENTS_AT_ONCE_MAX: usize = 64;

/// Agent streams that have not yet passed the handshake, at once; more are
/// refused with `RESOURCE_EXHAUSTED` before anything of theirs is read.
pub const UNAUTHENTICATED_SESSIONS_MAX: usize = 64;

/// Of those, streams from one client address. Cars behind one carrier NAT
/// share an address, but a handshake lasts a round trip (at most
/// `HELLO_TIMEOUT`) and a refused agent retries with back-off.
pub const UNAUTHENTICATED_SESSIONS_PER_ADDRESS_MAX: usize = 16;

/// HTTP/2 streams one agent connection may open at once (an agent uses one).
pub const AGENT_STREAMS_PER_CONNECTION_MAX: u32 = 4;

/// HTTP/2 flow-control window of one agent stream: what HTTP/2 buffers for a
/// stream before the cell reads it, so also what a stream waiting to
/// authenticate can make it hold. One whole message (a KV checkpoint piece)
/// fits, so that a piece flows without waiting for the cell to read part of
/// it: with a quarter of that, a 23 MB checkpoint took 3 s on loopback, and
/// the generation's tokens, queued behind it, reached the client only then.
pub const AGENT_STREAM_WINDOW_BYTES: u32 = proto::AGENT_MESSAGE_BYTES_MAX as u32;

/// Longest generation id a node may send back; ours are `REQUEST.ATTEMPT`,
/// two decimal integers. Longer is a protocol violation.
pub const GENERATION_ID_BYTES_MAX: usize = 48;

/// Bytes of a node's failure message kept (logged and, for a failure no
/// other node would fix, shown to the client); the rest is cut off.
pub const NODE_FAILURE_MESSAGE_BYTES_MAX: usize = 512;

/// How far above zero a node's logprob may lie (float rounding in a
/// log-softmax) before it is a protocol violation.
pub const LOGPROB_ABOVE_ZERO_TOLERANCE: f32 = 1e-3;

/// How often a cell records its nodes' changed trust and new quarantines in
/// the store.
pub const TRUST_WRITE_INTERVAL: Duration = Duration::from_secs(1);

/// Most compute a node may report for an attempt that ran `wall_ms` from its
/// assignment to its end: the wall time, half as much again and two seconds
/// for clocks and transport. More is a lie about what it is paid for, and
/// quarantines it (`Core::misreported`).
pub fn compute_report_max_ms(wall_ms: u64) -> u64 {
    wall_ms.saturating_add(wall_ms / 2).saturating_add(2_000)
}
