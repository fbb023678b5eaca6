//! Every bound the coordinator enforces, in one place.
//!
//! A limit that is not here does not exist: queues, channels, bodies, token
//! counts and retry loops all take their bound from these constants (or from
//! `CoordinatorConfig`, whose defaults come from here).

use std::time::Duration;

/// Largest request body the gateway reads; larger bodies are refused with 400.
pub const REQUEST_BODY_BYTES_MAX: usize = 1024 * 1024;

/// Most messages in one chat request.
pub const CHAT_MESSAGES_MAX: usize = 256;

/// Most stop sequences in one request (OpenAI's limit).
pub const STOP_SEQUENCES_MAX: usize = 4;

/// Longest stop sequence, in bytes.
pub const STOP_SEQUENCE_BYTES_MAX: usize = 256;

/// Largest `max_tokens` a client may ask for.
pub const COMPLETION_TOKENS_MAX: u32 = 4096;

/// `max_tokens` when the client gives none (further capped by the context left).
pub const COMPLETION_TOKENS_DEFAULT: u32 = 512;

/// Most `top_logprobs` alternatives per token (OpenAI's limit).
pub const TOP_LOGPROBS_MAX: u32 = 20;

/// Context window of one sequence on a node, in tokens, unless configured.
pub const CONTEXT_TOKENS_DEFAULT: u32 = 2048;

/// Requests the gateway holds at once (queued or running); beyond it, 429.
pub const INFLIGHT_REQUESTS_MAX: usize = 1024;

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

/// How many times the time its tokens take at its node's declared speed a
/// segment's compute time (and so its owner's energy reimbursement) may
/// be: room for batching, a busy moment and the network, but a node that
/// sits on a generation is paid for its tokens, not for the wait.
pub const PAID_COMPUTE_SLACK: u64 = 2;

/// Slowest prefill speed a segment's compute time is bounded by, tokens/s:
/// a node declaring itself slower is bounded as if this fast, so that it
/// cannot raise its bound by lying (far below any supported vehicle).
pub const PAID_PREFILL_TOKENS_PER_SECOND_MIN: u64 = 50;

/// Slowest decode speed a segment's compute time is bounded by, tokens/s
/// (see `PAID_PREFILL_TOKENS_PER_SECOND_MIN`).
pub const PAID_DECODE_TOKENS_PER_SECOND_MIN: u64 = 5;

/// `Retry-After` sent with 429 and 503 when the scheduler gives none, seconds.
pub const RETRY_AFTER_DEFAULT_SECONDS: u64 = 1;

/// Longest a request may take in total, from admission to its last token,
/// before it fails with a timeout (504, or an error event in a stream) and
/// its generation is cancelled, unless configured. The whole generation is
/// bounded, not the wait between two tokens: a node that sends a token
/// every few minutes cannot hold a request for hours.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(600);

/// Writes waiting for the request-log writer; beyond it, records are counted
/// as dropped in the metrics rather than holding up a response.
pub const REQUEST_LOG_CAPACITY: usize = 4096;

/// How long the cloud upstream may take to answer, and between two chunks
/// of its stream, unless configured.
pub const CLOUD_TIMEOUT_DEFAULT: Duration = Duration::from_secs(30);

/// Cloud upstream calls in flight at once, unless configured.
pub const CLOUD_CONCURRENCY_DEFAULT: usize = 16;

/// Longest line (or event) accepted from the cloud upstream's event stream.
pub const SSE_LINE_BYTES_MAX: usize = 1024 * 1024;

/// Events buffered between a routed request's driver and its response; the
/// driver waits when the client reads slowly.
pub const ROUTED_EVENTS_CAPACITY: usize = 64;

/// Requests one tenant may hold at the gateway at once (queued, running, or
/// a response still being sent), unless its contract says otherwise
/// (`fleetgrid tenants set --max-concurrency N`); beyond it, 429. An eighth
/// of `INFLIGHT_REQUESTS_MAX`, so that one tenant cannot take the gateway.
pub const TENANT_CONCURRENT_REQUESTS_DEFAULT: u32 = (INFLIGHT_REQUESTS_MAX / 8) as u32;

/// How long a client may take to send a request's headers (and how long an
/// idle kept-alive connection waits for the next request) before the
/// connection is closed, unless configured.
pub const HEADER_READ_TIMEOUT_DEFAULT: Duration = Duration::from_secs(10);

/// How long a client may take to send a whole request body, from the end of
/// its headers, before it is answered 408 and the connection closed, unless
/// configured. A 1 MiB body at a modest 100 KB/s takes about 10 s.
pub const BODY_READ_TIMEOUT_DEFAULT: Duration = Duration::from_secs(30);

/// How long the gateway waits to write to a client that reads nothing of
/// its response (a stream it does not consume) before it closes the
/// connection, which cancels the generation and frees its node, unless
/// configured.
pub const CLIENT_STALL_TIMEOUT_DEFAULT: Duration = Duration::from_secs(30);

/// Open HTTP connections from one client address; beyond it, new ones are
/// answered 429 with `Retry-After` and closed, unless configured.
pub const CONNECTIONS_PER_ADDRESS_MAX_DEFAULT: usize = 256;

/// Open HTTP connections that have not yet made an authenticated request
/// (a valid tenant or owner key); beyond it, new connections are answered
/// 503 with `Retry-After` and closed, unless configured.
pub const UNAUTHENTICATED_CONNECTIONS_MAX_DEFAULT: usize = 512;

/// Open HTTP connections in all; beyond it, new ones are answered 503 with
/// `Retry-After` and closed.
pub const CONNECTIONS_MAX: usize = 8192;

/// How long the accept loop pauses after the listener fails to accept
/// (out of file descriptors, for instance) before it tries again.
pub const ACCEPT_ERROR_BACKOFF: Duration = Duration::from_millis(100);

/// The gateway's bounds on connections and request times, as configured.
/// `Default` takes every constant above.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct HttpLimits {
    pub header_read_timeout: Duration,
    pub body_read_timeout: Duration,
    pub client_stall_timeout: Duration,
    pub connections_per_address_max: usize,
    pub unauthenticated_connections_max: usize,
    pub connections_max: usize,
    /// Longest one request may take in all, from admission to its last
    /// token (`REQUEST_TIMEOUT`).
    pub request_timeout: Duration,
}

impl Default for HttpLimits {
    fn default() -> HttpLimits {
        HttpLimits {
            header_read_timeout: HEADER_READ_TIMEOUT_DEFAULT,
            body_read_timeout: BODY_READ_TIMEOUT_DEFAULT,
            client_stall_timeout: CLIENT_STALL_TIMEOUT_DEFAULT,
            connections_per_address_max: CONNECTIONS_PER_ADDRESS_MAX_DEFAULT,
            unauthenticated_connections_max: UNAUTHENTICATED_CONNECTIONS_MAX_DEFAULT,
            connections_max: CONNECTIONS_MAX,
            request_timeout: REQUEST_TIMEOUT,
        }
    }
}

/// Largest first message (the `Hello`) a new agent stream may send, before
/// it has authenticated. A gRPC length prefix above it ends the stream
/// before the message is read (`grpc::HelloLimit`). An honest `Hello` is a
/// few hundred bytes per cached model.
pub const HELLO_BYTES_MAX: usize = 16 * 1024;

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
/// stream before the coordinator reads it, so also what a stream waiting to
/// authenticate can make it hold. Large enough for a KV checkpoint piece to
/// flow at several MB/s over a 50 ms round trip.
pub const AGENT_STREAM_WINDOW_BYTES: u32 = 256 * 1024;

/// Longest generation id a node may send back; ours are `REQUEST.ATTEMPT`,
/// two decimal integers. Longer is a protocol violation.
pub const GENERATION_ID_BYTES_MAX: usize = 48;

/// Bytes of a node's failure message kept (logged and, for a failure no
/// other node would fix, shown to the client); the rest is cut off.
pub const NODE_FAILURE_MESSAGE_BYTES_MAX: usize = 512;

/// How far above zero a node's logprob may lie (float rounding in a
/// log-softmax) before it is a protocol violation.
pub const LOGPROB_ABOVE_ZERO_TOLERANCE: f32 = 1e-3;
