//! Serving the gateway over TCP with every connection bounded.
//!
//! `axum::serve` has no header timeout and no limit on connections, so the
//! gateway has its own accept loop with hyper's HTTP/1 connection builder:
//!
//! - **Headers** must arrive within `header_read_timeout` (hyper's timer);
//!   an idle kept-alive connection waits as long for its next request.
//! - **Bodies** must arrive whole within `body_read_timeout` of the headers
//!   ([`DeadlineBody`]); the generation endpoints answer 408.
//! - **Stalled readers**: a write that makes no progress for
//!   `client_stall_timeout` ([`StallGuardedIo`]) closes the connection, which
//!   drops the response: its generation is cancelled and its node told.
//! - **Counts**: connections in all, per client address, and those that have
//!   not yet made an authenticated request ([`ConnectionBook`]). A connection
//!   over any of them is answered at once, 429 (per address) or 503, with
//!   `Retry-After`, and closed.
//!
//! HTTP/1.1 only: the OpenAI SDKs speak it, and it keeps one request at a
//! time per connection, so the bounds above are the whole story.

use std::collections::HashMap;
use std::future::Future;
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{Context, Poll};
use std::time::Duration;

use axum::body::{Body, Bytes, HttpBody};
use axum::http::{header, HeaderMap, Request};
use axum::Router;
use hyper::body::{Frame, Incoming, SizeHint};
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::time::{Instant, Sleep};
use tokio_util::sync::CancellationToken;
use tower::ServiceExt;

use crate::api::ApiError;
use crate::limits::{self, HttpLimits};
use crate::metrics::Metrics;
use crate::secrets;
use crate::store::Store;
use crate::store_owners::OWNER_KEY_PREFIX;

mod cors;

pub use cors::{Cors, CorsError};

/// Serves `app` on `listener`, answering browsers' cross-origin requests as
/// `cors` allows, until `shutdown`; then lets open connections finish their
/// current response (the caller bounds how long).
pub async fn serve(
    listener: TcpListener,
    app: Router,
    store: Store,
    limits: HttpLimits,
    cors: Cors,
    metrics: Arc<Metrics>,
    shutdown: CancellationToken,
) {
    let app = cors.apply(app);
    let book = Arc::new(ConnectionBook::new(limits, Arc::clone(&metrics)));
    let graceful = hyper_util::server::graceful::GracefulShutdown::new();
    loop {
        let accepted = tokio::select! {
            () = shutdown.cancelled() => break,
            accepted = listener.accept() => accepted,
        };
        let (stream, peer) = match accepted {
            Ok(accepted) => accepted,
            Err(error) => {
                // Out of descriptors, or a connection reset before accept:
                // pause rather than spin.
                tracing::warn!(%error, "accept HTTP connection");
                tokio::time::sleep(limits::ACCEPT_ERROR_BACKOFF).await;
                continue;
            }
        };
        let ticket = match book.admit(peer.ip()) {
            Ok(ticket) => Arc::new(ticket),
            Err(refusal) => {
                refuse(&stream, refusal);
                continue;
            }
        };
        serve_connection(
            stream,
            peer,
            app.clone(),
            store.clone(),
            limits,
            ticket,
            &graceful,
            Arc::clone(&metrics),
        );
    }
    drop(listener);
    graceful.shutdown().await;
}

/// Serves one admitted connection on its own task; its ticket is given
/// back when the connection ends.
#[allow(clippy::too_many_arguments)]
fn serve_connection(
    stream: TcpStream,
    peer: SocketAddr,
    app: Router,
    store: Store,
    limits: HttpLimits,
    ticket: Arc<ConnectionTicket>,
    graceful: &hyper_util::server::graceful::GracefulShutdown,
    metrics: Arc<Metrics>,
) {
    let _ = stream.set_nodelay(true);
    let io = TokioIo::new(StallGuardedIo::new(stream, limits.client_stall_timeout));
    let service_ticket = Arc::clone(&ticket);
    let service = hyper::service::service_fn(move |request: Request<Incoming>| {
        let app = app.clone();
        let store = store.clone();
        let ticket = Arc::clone(&service_ticket);
        async move {
            if !ticket.is_authenticated() && has_valid_key(&store, request.headers()).await {
                ticket.authenticated();
            }
            let mut request = request
                .map(|incoming| Body::new(DeadlineBody::new(incoming, limits.body_read_timeout)));
            request
                .extensions_mut()
                .insert(axum::extract::ConnectInfo(peer));
            app.oneshot(request).await
        }
    });
    let connection = hyper::server::conn::http1::Builder::new()
        .timer(TokioTimer::new())
        .header_read_timeout(limits.header_read_timeout)
        .serve_connection(io, service);
    let connection = graceful.watch(connection);
    tokio::spawn(async move {
        if let Err(error) = connection.await {
            if is_slow_client(&error) {
                metrics
                    .http
                    .connections_closed_slow
                    .fetch_add(1, Ordering::Relaxed);
            }
            tracing::debug!(%error, %peer, "HTTP connection ended");
        }
        drop(ticket);
    });
}

/// Whether a connection ended because its client was too slow: headers not
/// in time, or a response it would not read.
fn is_slow_client(error: &hyper::Error) -> bool {
    if error.is_timeout() {
        return true;
    }
    let mut source = std::error::Error::source(error);
    while let Some(cause) = source {
        if let Some(io_error) = cause.downcast_ref::<io::Error>() {
            if io_error.kind() == io::ErrorKind::TimedOut {
                return true;
            }
        }
        source = cause.source();
    }
    false
}

/// Whether the request carries a tenant or owner key the store knows. Only
/// asked while the connection is unauthenticated, so at most once per
/// request of such a connection. A store that does not answer within
/// `KEY_LOOKUP_TIMEOUT` leaves the connection unauthenticated; the request's
/// own authentication then answers for it.
async fn has_valid_key(store: &Store, headers: &HeaderMap) -> bool {
    tokio::time::timeout(limits::KEY_LOOKUP_TIMEOUT, look_up_key(store, headers))
        .await
        .unwrap_or(false)
}

async fn look_up_key(store: &Store, headers: &HeaderMap) -> bool {
    let Some(key) = headers
        .get(header::AUTHORIZATION)
        .and_then(|value| value.to_str().ok())
        .and_then(|text| text.strip_prefix("Bearer "))
        .map(str::trim)
        .filter(|key| !key.is_empty())
    else {
        return false;
    };
    if key.starts_with(OWNER_KEY_PREFIX) {
        matches!(store.owner_for_key(key).await, Ok(Some(_)))
    } else if key.starts_with(secrets::API_KEY_PREFIX) {
        matches!(store.tenant_for_api_key(key).await, Ok(Some(_)))
    } else {
        false
    }
}

/// Why a new connection was refused.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Refusal {
    TooManyInAll,
    TooManyFromAddress,
    TooManyUnauthenticated,
}

impl Refusal {
    fn error(self) -> ApiError {
        let retry = limits::RETRY_AFTER_DEFAULT_SECONDS;
        match self {
            Refusal::TooManyInAll => ApiError::unavailable(
                "the gateway has as many connections open as it can; retry shortly",
                retry,
            ),
            Refusal::TooManyFromAddress => ApiError::too_many(
                "too many connections from your address; reuse connections or retry shortly",
                retry,
            ),
            Refusal::TooManyUnauthenticated => ApiError::unavailable(
                "the gateway has as many connections without an API key as it can; retry shortly",
                retry,
            ),
        }
    }
}

/// Answers a refused connection and closes it. A fresh socket's send buffer
/// is empty, so the one non-blocking write either goes out whole or the
/// connection is closed without an answer; nothing waits on the client.
fn refuse(stream: &TcpStream, refusal: Refusal) {
    let error = refusal.error();
    let body = error.body_json();
    let reason = error.status.canonical_reason().unwrap_or("Error");
    let retry_after = error
        .retry_after_seconds
        .unwrap_or(limits::RETRY_AFTER_DEFAULT_SECONDS);
    let response = format!(
        "HTTP/1.1 {} {reason}\r\ncontent-type: application/json\r\nretry-after: {retry_after}\r\n\
         connection: close\r\ncontent-length: {}\r\n\r\n{body}",
        error.status.as_u16(),
        body.len(),
    );
    let _ = stream.try_write(response.as_bytes());
    tracing::debug!(?refusal, "refused HTTP connection");
}

/// The open connections, in all, per client address, and unauthenticated.
pub struct ConnectionBook {
    limits: HttpLimits,
    metrics: Arc<Metrics>,
    // A std mutex: nothing awaits while it is held.
    counts: Mutex<ConnectionCounts>,
}

#[derive(Default)]
struct ConnectionCounts {
    open: usize,
    unauthenticated: usize,
    /// Open connections per address; an address with none has no entry.
    per_address: HashMap<IpAddr, usize>,
}

/// One admitted connection; dropping it gives its counts back.
pub struct ConnectionTicket {
    book: Arc<ConnectionBook>,
    address: IpAddr,
    authenticated: AtomicBool,
}

impl ConnectionBook {
    pub fn new(limits: HttpLimits, metrics: Arc<Metrics>) -> ConnectionBook {
        ConnectionBook {
            limits,
            metrics,
            counts: Mutex::new(ConnectionCounts::default()),
        }
    }

    fn lock(&self) -> MutexGuard<'_, ConnectionCounts> {
        // Plain counters: still consistent after a panic elsewhere.
        self.counts
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Counts a new connection from `address` (unauthenticated), or says
    /// which bound it is over.
    pub fn admit(self: &Arc<Self>, address: IpAddr) -> Result<ConnectionTicket, Refusal> {
        let mut counts = self.lock();
        let from_address = counts.per_address.get(&address).copied().unwrap_or(0);
        let refusal = if counts.open >= self.limits.connections_max {
            Some(Refusal::TooManyInAll)
        } else if from_address >= self.limits.connections_per_address_max {
            Some(Refusal::TooManyFromAddress)
        } else if counts.unauthenticated >= self.limits.unauthenticated_connections_max {
            Some(Refusal::TooManyUnauthenticated)
        } else {
            None
        };
        if let Some(refusal) = refusal {
            self.metrics
                .http
                .connections_refused
                .fetch_add(1, Ordering::Relaxed);
            return Err(refusal);
        }
        counts.open += 1;
        counts.unauthenticated += 1;
        *counts.per_address.entry(address).or_insert(0) += 1;
        self.metrics
            .http
            .connections_open
            .fetch_add(1, Ordering::Relaxed);
        Ok(ConnectionTicket {
            book: Arc::clone(self),
            address,
            authenticated: AtomicBool::new(false),
        })
    }
}

impl ConnectionTicket {
    pub fn is_authenticated(&self) -> bool {
        self.authenticated.load(Ordering::Relaxed)
    }

    /// The connection made an authenticated request: it no longer counts
    /// against the unauthenticated bound.
    pub fn authenticated(&self) {
        if !self.authenticated.swap(true, Ordering::Relaxed) {
            let mut counts = self.book.lock();
            counts.unauthenticated = counts.unauthenticated.saturating_sub(1);
        }
    }
}

impl Drop for ConnectionTicket {
    fn drop(&mut self) {
        let mut counts = self.book.lock();
        counts.open = counts.open.saturating_sub(1);
        if !self.authenticated.load(Ordering::Relaxed) {
            counts.unauthenticated = counts.unauthenticated.saturating_sub(1);
        }
        if let Some(count) = counts.per_address.get_mut(&self.address) {
            *count = count.saturating_sub(1);
            if *count == 0 {
                counts.per_address.remove(&self.address);
            }
        }
        self.book
            .metrics
            .http
            .connections_open
            .fetch_sub(1, Ordering::Relaxed);
    }
}

/// A socket whose writes fail with `TimedOut` once one has made no progress
/// for `stall_timeout`: the client stopped reading. Reads are untouched (a
/// client waiting for a long answer sends nothing, rightly).
pub struct StallGuardedIo<T> {
    inner: T,
    stall_timeout: Duration,
    /// Running while a write or flush is blocked on the client.
    stalled_since: Option<Pin<Box<Sleep>>>,
}

impl<T> StallGuardedIo<T> {
    pub fn new(inner: T, stall_timeout: Duration) -> StallGuardedIo<T> {
        StallGuardedIo {
            inner,
            stall_timeout,
            stalled_since: None,
        }
    }

    /// Maps a write's outcome: progress clears the stall timer, `Pending`
    /// starts it (or fails once it ran out).
    fn guard<R>(
        &mut self,
        cx: &mut Context<'_>,
        outcome: Poll<io::Result<R>>,
    ) -> Poll<io::Result<R>> {
        match outcome {
            Poll::Ready(result) => {
                self.stalled_since = None;
                Poll::Ready(result)
            }
            Poll::Pending => {
                let timeout = self.stall_timeout;
                let timer = self
                    .stalled_since
                    .get_or_insert_with(|| Box::pin(tokio::time::sleep(timeout)));
                match timer.as_mut().poll(cx) {
                    Poll::Ready(()) => Poll::Ready(Err(io::Error::new(
                        io::ErrorKind::TimedOut,
                        "the client read nothing of its response within the stall timeout",
                    ))),
                    Poll::Pending => Poll::Pending,
                }
            }
        }
    }
}

impl<T: AsyncRead + Unpin> AsyncRead for StallGuardedIo<T> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for StallGuardedIo<T> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let outcome = Pin::new(&mut self.inner).poll_write(cx, buf);
        self.guard(cx, outcome)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let outcome = Pin::new(&mut self.inner).poll_write_vectored(cx, bufs);
        self.guard(cx, outcome)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let outcome = Pin::new(&mut self.inner).poll_flush(cx);
        self.guard(cx, outcome)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let outcome = Pin::new(&mut self.inner).poll_shutdown(cx);
        self.guard(cx, outcome)
    }
}

/// The error of a request body not received whole by its deadline.
#[derive(Debug, thiserror::Error)]
#[error("the request body was not received within {0:?}")]
pub struct BodyReadTimeout(Duration);

/// A request body that fails with [`BodyReadTimeout`] if it is not whole
/// within its time from the request's headers: a body trickled one byte at
/// a time cannot hold a connection for long.
pub struct DeadlineBody {
    inner: Incoming,
    timeout: Duration,
    deadline: Pin<Box<Sleep>>,
}

impl DeadlineBody {
    pub fn new(inner: Incoming, timeout: Duration) -> DeadlineBody {
        DeadlineBody {
            inner,
            timeout,
            deadline: Box::pin(tokio::time::sleep_until(Instant::now() + timeout)),
        }
    }
}

impl HttpBody for DeadlineBody {
    type Data = Bytes;
    type Error = axum::BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, axum::BoxError>>> {
        if let Poll::Ready(frame) = Pin::new(&mut self.inner).poll_frame(cx) {
            return Poll::Ready(frame.map(|result| result.map_err(Into::into)));
        }
        match self.deadline.as_mut().poll(cx) {
            Poll::Ready(()) => Poll::Ready(Some(Err(Box::new(BodyReadTimeout(self.timeout))))),
            Poll::Pending => Poll::Pending,
        }
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

/// Whether reading a body failed because of its deadline.
pub fn is_body_read_timeout(error: &(dyn std::error::Error + 'static)) -> bool {
    caused_by::<BodyReadTimeout>(error)
}

/// Whether reading a body failed because it was larger than asked.
pub fn is_length_limit(error: &(dyn std::error::Error + 'static)) -> bool {
    caused_by::<http_body_util::LengthLimitError>(error)
}

fn caused_by<E: std::error::Error + 'static>(error: &(dyn std::error::Error + 'static)) -> bool {
    let mut current = Some(error);
    while let Some(cause) = current {
        if cause.is::<E>() {
            return true;
        }
        current = cause.source();
    }
    false
}

#[cfg(test)]
mod tests;
