//! `fleetgrid serve` flags for the gateway's bounds on slow and numerous
//! clients; each defaults to its constant in `coordinator::limits`.

use std::time::Duration;

use coordinator::limits::{self, HttpLimits};

/// A duration in whole milliseconds, as flags take it.
pub(crate) fn millis(duration: Duration) -> u64 {
    u64::try_from(duration.as_millis()).unwrap_or(u64::MAX)
}

#[derive(clap::Args, Clone, Debug)]
pub struct HttpLimitArgs {
    /// How long a client may take to send a request's headers (and an idle connection may wait
    /// for its next request), in milliseconds.
    #[arg(long, default_value_t = millis(limits::HEADER_READ_TIMEOUT_DEFAULT))]
    header_read_timeout_ms: u64,
    /// How long a client may take to send a whole request body, in milliseconds; then 408.
    #[arg(long, default_value_t = millis(limits::BODY_READ_TIMEOUT_DEFAULT))]
    body_read_timeout_ms: u64,
    /// How long the gateway waits on a client that reads nothing of its response before it
    /// closes the connection and cancels the generation, in milliseconds.
    #[arg(long, default_value_t = millis(limits::CLIENT_STALL_TIMEOUT_DEFAULT))]
    client_stall_timeout_ms: u64,
    /// Longest one request may take in all, from admission to its last token, in milliseconds;
    /// then 504 (or an error event in a stream).
    #[arg(long, default_value_t = millis(limits::REQUEST_TIMEOUT))]
    request_timeout_ms: u64,
    /// Open connections from one client address; beyond it, 429.
    #[arg(long, default_value_t = limits::CONNECTIONS_PER_ADDRESS_MAX_DEFAULT)]
    connections_per_address_max: usize,
    /// Open connections that have not yet made an authenticated request; beyond it, 503.
    #[arg(long, default_value_t = limits::UNAUTHENTICATED_CONNECTIONS_MAX_DEFAULT)]
    unauthenticated_connections_max: usize,
}

impl HttpLimitArgs {
    pub fn limits(&self) -> anyhow::Result<HttpLimits> {
        let positive = |value: u64, flag: &str| {
            anyhow::ensure!(value > 0, "--{flag} must be at least 1");
            Ok(Duration::from_millis(value))
        };
        anyhow::ensure!(
            self.connections_per_address_max > 0 && self.unauthenticated_connections_max > 0,
            "connection limits must be at least 1"
        );
        Ok(HttpLimits {
            header_read_timeout: positive(self.header_read_timeout_ms, "header-read-timeout-ms")?,
            body_read_timeout: positive(self.body_read_timeout_ms, "body-read-timeout-ms")?,
            client_stall_timeout: positive(
                self.client_stall_timeout_ms,
                "client-stall-timeout-ms",
            )?,
            request_timeout: positive(self.request_timeout_ms, "request-timeout-ms")?,
            connections_per_address_max: self.connections_per_address_max,
            unauthenticated_connections_max: self.unauthenticated_connections_max,
            ..HttpLimits::default()
        })
    }
}
