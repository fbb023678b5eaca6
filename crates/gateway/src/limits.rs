//! Every bound the gateway enforces, in one place.
//!
//! A limit that is not here does not exist: queues, channels, bodies, token
//! counts and retry loops all take their bound from these constants (or from
//! `HttpLimits` and `CoordinatorConfig`, whose defaults come from here).

use std::time::Duration;

// The bounds both sides of the seam know.
pub use cell_api::limits::*;

/// The most a request waits for the store to look up its API key; a store
/// that does not answer in time (a database restarting, unreachable) gets
/// the client a 503 with `Retry-After` instead of a hung request.
pub const KEY_LOOKUP_TIMEOUT: Duration = Duration::from_secs(2);

/// Largest request body the gateway reads; larger bodies are refused with 400.
pub const REQUEST_BODY_BYTES_MAX: usize = 1024 * 1024;

/// Most messages in one chat request.
pub const CHAT_MESSAGES_MAX: usize = 256;

/// Most stop sequences in one request (OpenAI's limit).
pub const STOP_SEQUENCES_MAX: usize = 4;

/// Longest stop sequence, in bytes.
pub const STOP_SEQUENCE_BYTES_MAX: usize = 256;

/// `max_tokens` when the client gives none (further capped by the context left).
pub const COMPLETION_TOKENS_DEFAULT: u32 = 512;

/// Largest `repetition_penalty` accepted; 1 is none, and llama.cpp's and vLLM's usual values
/// lie between 1 and 1.5.
pub const REPETITION_PENALTY_MAX: f64 = 10.0;

/// Most `top_logprobs` alternatives per token (OpenAI's limit).
pub const TOP_LOGPROBS_MAX: u32 = 20;

/// Most choices (`n`) or generations (`best_of`) one request may ask for.
pub const CHOICES_MAX: u32 = 16;

/// Context window of one sequence on a node, in tokens, unless configured.
pub const CONTEXT_TOKENS_DEFAULT: u32 = 2048;

/// Requests the gateway holds at once (queued or running); beyond it, 429.
pub const INFLIGHT_REQUESTS_MAX: usize = 1024;

// What bounds a segment's paid compute time is the cell's metering.
pub use cell_api::metering::{
    PAID_COMPUTE_SLACK, PAID_DECODE_TOKENS_PER_SECOND_MIN, PAID_PREFILL_TOKENS_PER_SECOND_MIN,
};

/// Longest a request may take in total, from admission to its last token,
/// before it fails with a timeout (504, or an error event in a stream) and
/// its generation is cancelled, unless configured. The whole generation is
/// bounded, not the wait between two tokens: a node that sends a token
/// every few minutes cannot hold a request for hours.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(600);

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

/// Requests one tenant may hold at the gateway at once, unless its contract
/// says otherwise (the default is the store's, where contracts live).
pub use store::contracts::TENANT_CONCURRENT_REQUESTS_DEFAULT;
const _: () = assert!(TENANT_CONCURRENT_REQUESTS_DEFAULT as usize == INFLIGHT_REQUESTS_MAX / 8);

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

/// How long a browser may keep the answer to a CORS preflight before it asks
/// again (when CORS is on).
pub const CORS_PREFLIGHT_MAX_AGE: Duration = Duration::from_secs(600);

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
