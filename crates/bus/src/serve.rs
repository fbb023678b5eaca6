//! The cell side of the bus: one task that answers a cell's submissions,
//! cancels and policy changes, streams each admitted generation's tokens
//! in batches, and publishes the cell's capacity.
//!
//! Every generation's stream is a task in one `JoinSet` owned by the
//! serving task: aborting the serving task (or cancelling its shutdown
//! token) stops every stream with it, so a cell that stops serving falls
//! silent at once and gateways move its generations.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use async_nats::{Client, Message, Subscriber};
use bytes::Bytes;
use cell_api::{Cell, NewGeneration, Rejection, Update};
use domain::RequestId;
use futures::StreamExt;
use tokio::sync::mpsc;
use tokio::task::{JoinHandle, JoinSet};
use tokio_util::sync::CancellationToken;

use crate::limits;
use crate::subjects::{self, CellId};
use crate::wire::{
    self, Batch, CancelMessage, CapacitySummary, End, PolicyMessage, SubmitReply, SubmitRequest,
};
use crate::BusError;

/// How a served cell paces itself; `Default` is the `limits`.
#[derive(Clone, Debug)]
pub struct ServeConfig {
    pub capacity_interval: Duration,
    pub keepalive_interval: Duration,
    pub listener_probe_interval: Duration,
    pub generations_max: usize,
}

impl Default for ServeConfig {
    fn default() -> Self {
        ServeConfig {
            capacity_interval: limits::CAPACITY_INTERVAL,
            keepalive_interval: limits::KEEPALIVE_INTERVAL,
            listener_probe_interval: limits::LISTENER_PROBE_INTERVAL,
            generations_max: limits::SERVED_GENERATIONS_MAX,
        }
    }
}

/// Serves `cell` on the bus as `cell_id` until `shutdown` is cancelled (or
/// the returned task is aborted). Subscriptions are in place at the server
/// when this returns, so a gateway may submit at once.
///
/// On shutdown every generation it still streams is cancelled on the cell;
/// gateways notice the silence and move them.
pub async fn serve_cell(
    nats: Client,
    cell_id: CellId,
    cell: Arc<dyn Cell>,
    config: ServeConfig,
    shutdown: CancellationToken,
) -> Result<JoinHandle<()>, BusError> {
    let submits = subscribe(&nats, subjects::submit(&cell_id)).await?;
    let cancels = subscribe(&nats, subjects::cancel(&cell_id)).await?;
    let policies = subscribe(&nats, subjects::POLICY.to_string()).await?;
    nats.flush().await?;
    let server = Server {
        nats,
        cell_id,
        cell,
        config,
        streams: Arc::new(Mutex::new(HashMap::new())),
    };
    Ok(tokio::spawn(
        server.run(submits, cancels, policies, shutdown),
    ))
}

async fn subscribe(nats: &Client, subject: String) -> Result<Subscriber, BusError> {
    nats.subscribe(subject.clone())
        .await
        .map_err(|source| BusError::Subscribe { subject, source })
}

/// The generations a served cell streams now, each with the token that
/// stops its stream.
type Streams = Arc<Mutex<HashMap<u64, CancellationToken>>>;

struct Server {
    nats: Client,
    cell_id: CellId,
    cell: Arc<dyn Cell>,
    config: ServeConfig,
    streams: Streams,
}

impl Server {
    async fn run(
        self,
        mut submits: Subscriber,
        mut cancels: Subscriber,
        mut policies: Subscriber,
        shutdown: CancellationToken,
    ) {
        let mut tasks = JoinSet::new();
        let mut capacity = tokio::time::interval(self.config.capacity_interval);
        capacity.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        // A subscription ends only when the connection is closed for good.
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => break,
                message = submits.next() => match message {
                    Some(message) => self.submitted(message, &mut tasks),
                    None => break,
                },
                message = cancels.next() => match message {
                    Some(message) => self.cancelled(&message),
                    None => break,
                },
                message = policies.next() => match message {
                    Some(message) => self.policy_changed(&message),
                    None => break,
                },
                _ = capacity.tick() => self.publish_capacity().await,
                Some(_) = tasks.join_next(), if !tasks.is_empty() => {}
            }
        }
        self.stop_all();
        tasks.shutdown().await;
    }

    fn lock_streams(&self) -> MutexGuard<'_, HashMap<u64, CancellationToken>> {
        lock(&self.streams)
    }

    /// Admits a submission on its own task, so that a slow `Cell::submit`
    /// holds up nothing else, and streams it from there.
    fn submitted(&self, message: Message, tasks: &mut JoinSet<()>) {
        let Some(reply) = message.reply.clone() else {
            tracing::warn!(cell = %self.cell_id, "submission without a reply subject dropped");
            return;
        };
        let stream = Stream {
            nats: self.nats.clone(),
            cell: Arc::clone(&self.cell),
            streams: Arc::clone(&self.streams),
            keepalive: self.config.keepalive_interval,
            probe_interval: self.config.listener_probe_interval,
        };
        let full = self.lock_streams().len() >= self.config.generations_max;
        tasks.spawn(async move {
            let answer = if full {
                Err(Rejection::QueueFull {
                    retry_after_seconds: cell_api::limits::RETRY_AFTER_DEFAULT_SECONDS,
                })
            } else {
                stream.admit(&message.payload).await
            };
            let (reply_body, admitted) = match answer {
                Ok((request, batches_to, first_position, updates)) => (
                    SubmitReply::Admitted { request },
                    Some((request, batches_to, first_position, updates)),
                ),
                Err(rejection) => (SubmitReply::Rejected(rejection), None),
            };
            let sent = match wire::encode(&reply_body) {
                Ok(body) => stream.nats.publish(reply, body).await.is_ok(),
                Err(error) => {
                    tracing::error!(%error, "encode a submission's reply");
                    false
                }
            };
            let Some((request, batches_to, first_position, updates)) = admitted else {
                return;
            };
            if !sent {
                // The gateway never learns the id: nobody could cancel it.
                stream.stop(request);
                return;
            }
            stream
                .run(request, batches_to, first_position, updates)
                .await;
        });
    }

    fn cancelled(&self, message: &Message) {
        let cancel: CancelMessage = match wire::decode(&message.payload) {
            Ok(cancel) => cancel,
            Err(error) => {
                tracing::warn!(cell = %self.cell_id, %error, "bad cancel dropped");
                return;
            }
        };
        if let Some(token) = self.lock_streams().remove(&cancel.request) {
            token.cancel();
        }
        self.cell.cancel(RequestId(cancel.request));
    }

    fn policy_changed(&self, message: &Message) {
        let change: PolicyMessage = match wire::decode(&message.payload) {
            Ok(change) => change,
            Err(error) => {
                tracing::warn!(cell = %self.cell_id, %error, "bad policy change dropped");
                return;
            }
        };
        match scheduler::OwnerPolicy::try_from(change.policy) {
            Ok(policy) => self.cell.owner_policy_changed(&change.node, policy),
            Err(error) => tracing::warn!(node_id = %change.node, %error, "bad policy dropped"),
        }
    }

    async fn publish_capacity(&self) {
        let streaming = u32::try_from(self.lock_streams().len()).unwrap_or(u32::MAX);
        let listing = self
            .cell
            .capacity_listing(cell_api::limits::NODES_PUBLISHED_MAX);
        let summary = CapacitySummary::of(self.cell_id.as_str(), listing, streaming);
        let body = match wire::encode(&summary) {
            Ok(body) => body,
            Err(error) => {
                tracing::error!(cell = %self.cell_id, %error, "encode the capacity summary");
                return;
            }
        };
        if let Err(error) = self
            .nats
            .publish(subjects::capacity(&self.cell_id), body)
            .await
        {
            tracing::warn!(cell = %self.cell_id, %error, "publish the capacity summary");
        }
    }

    /// Stops every stream and cancels its generation on the cell.
    fn stop_all(&self) {
        let streams: Vec<(u64, CancellationToken)> = self.lock_streams().drain().collect();
        for (request, token) in streams {
            token.cancel();
            self.cell.cancel(RequestId(request));
        }
    }
}

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// An admitted generation: the cell's id, where its batches go, the
/// position of its first new token and its updates.
type Admission = (u64, String, u32, mpsc::Receiver<Update>);

/// What one generation's stream needs.
struct Stream {
    nats: Client,
    cell: Arc<dyn Cell>,
    streams: Streams,
    keepalive: Duration,
    probe_interval: Duration,
}

impl Stream {
    async fn admit(&self, payload: &[u8]) -> Result<Admission, Rejection> {
        let request: SubmitRequest = wire::decode(payload).map_err(|error| Rejection::Other {
            message: format!("unreadable submission: {error}"),
        })?;
        let generation =
            NewGeneration::try_from(request.generation).map_err(|error| Rejection::Other {
                message: error.to_string(),
            })?;
        let first_position = u32::try_from(generation.committed.len()).unwrap_or(u32::MAX);
        let admitted = self.cell.submit(generation).await?;
        let id = admitted.request.0;
        lock(&self.streams).insert(id, CancellationToken::new());
        Ok((id, request.batches_to, first_position, admitted.updates))
    }

    /// Stops streaming `request` and cancels it on the cell.
    fn stop(&self, request: u64) {
        lock(&self.streams).remove(&request);
        self.cell.cancel(RequestId(request));
    }

    /// Sends the generation's updates to `batches_to` until it ends or is
    /// cancelled: the tokens ready at once in one batch, an empty batch
    /// after `keepalive` without any.
    async fn run(
        &self,
        request: u64,
        batches_to: String,
        mut position: u32,
        mut updates: mpsc::Receiver<Update>,
    ) {
        let Some(stop) = lock(&self.streams).get(&request).cloned() else {
            return;
        };
        let watching = CancellationToken::new();
        let _stop_watching = watching.clone().drop_guard();
        tokio::spawn(self.watch_listener(request, batches_to.clone(), stop.clone(), watching));
        // The numbers last named to the gateway (`Batch::numerics`), and the metered segments
        // when they were asked for: a node taking the generation opens a segment, so they are
        // asked again only then (or every batch from a cell that meters nothing).
        let mut numerics_sent = None;
        let mut segments_asked = None;
        loop {
            let first = tokio::select! {
                _ = stop.cancelled() => return,
                first = tokio::time::timeout(self.keepalive, updates.recv()) => first,
            };
            let mut batch = match first {
                Err(_quiet) => self.batch(request, position, Vec::new(), None),
                Ok(None) => {
                    // The cell dropped the generation without an end (it
                    // was cancelled there, or the cell stopped).
                    let error = cell_api::GenerationError::Failed(
                        "the cell ended the generation without a result".to_string(),
                    );
                    self.batch(request, position, Vec::new(), Some(End::Failed(error)))
                }
                Ok(Some(Update::PromptLogprobs(scores))) => {
                    if !self
                        .publish_prompt_scores(request, &batches_to, position, scores)
                        .await
                    {
                        self.stop(request);
                        return;
                    }
                    continue;
                }
                Ok(Some(update)) => self.coalesce(request, position, update, &mut updates),
            };
            let segments = batch
                .metering
                .as_ref()
                .map(|metering| metering.segments.len());
            if segments.is_none() || segments != segments_asked {
                segments_asked = segments;
                let numerics = self.cell.numerics(RequestId(request));
                if numerics.is_some() && numerics != numerics_sent {
                    batch.numerics.clone_from(&numerics);
                    numerics_sent = numerics;
                }
            }
            let ended = batch.end.is_some();
            position = position.saturating_add(u32::try_from(batch.tokens.len()).unwrap_or(0));
            if !self.publish(&batches_to, &batch).await {
                // Nobody can hear the rest of it.
                self.stop(request);
                return;
            }
            if ended {
                lock(&self.streams).remove(&request);
                return;
            }
        }
    }

    /// Until `watching` is cancelled, asks every `probe_interval` whether
    /// anyone still subscribes to `batches_to`, and stops the generation
    /// after `LISTENER_PROBE_MISSES_MAX` "no responders" in a row: a
    /// gateway killed mid-answer, or one whose cancel was lost, would
    /// otherwise leave its vehicle generating to `max_tokens` for nobody.
    /// A probe that times out (a slow gateway) counts as heard.
    fn watch_listener(
        &self,
        request: u64,
        batches_to: String,
        stop: CancellationToken,
        watching: CancellationToken,
    ) -> impl std::future::Future<Output = ()> + Send + 'static {
        let nats = self.nats.clone();
        let cell = Arc::clone(&self.cell);
        let streams = Arc::clone(&self.streams);
        let interval = self.probe_interval;
        async move {
            let mut misses = 0;
            loop {
                tokio::select! {
                    _ = watching.cancelled() => return,
                    _ = stop.cancelled() => return,
                    _ = tokio::time::sleep(interval) => {}
                }
                let probe = async_nats::Request::new()
                    .payload(Bytes::new())
                    .timeout(Some(interval));
                let unheard = matches!(
                    nats.send_request(batches_to.clone(), probe).await,
                    Err(error) if error.kind() == async_nats::RequestErrorKind::NoResponders
                );
                misses = if unheard { misses + 1 } else { 0 };
                if misses >= limits::LISTENER_PROBE_MISSES_MAX {
                    tracing::info!(
                        request,
                        "nobody listens to the generation any more: stopped"
                    );
                    stop.cancel();
                    lock(&streams).remove(&request);
                    cell.cancel(RequestId(request));
                    return;
                }
            }
        }
    }

    /// Publishes a prompt's scores in pieces; false when one did not go out.
    async fn publish_prompt_scores(
        &self,
        request: u64,
        batches_to: &str,
        position: u32,
        scores: Vec<cell_api::CommittedToken>,
    ) -> bool {
        let total = u32::try_from(scores.len()).unwrap_or(u32::MAX);
        let mut first_index = 1_u32;
        let mut scores = scores.into_iter().peekable();
        loop {
            let tokens: Vec<_> = scores
                .by_ref()
                .take(limits::PROMPT_SCORES_PER_BATCH)
                .collect();
            let count = u32::try_from(tokens.len()).unwrap_or(u32::MAX);
            let mut batch = self.batch(request, position, Vec::new(), None);
            batch.prompt_scores = Some(wire::PromptScoresPiece {
                first_index,
                total,
                tokens,
            });
            if !self.publish(batches_to, &batch).await {
                return false;
            }
            first_index = first_index.saturating_add(count);
            if scores.peek().is_none() {
                return true;
            }
        }
    }

    /// `first` and every update ready after it, up to a batch's bound.
    fn coalesce(
        &self,
        request: u64,
        position: u32,
        first: Update,
        updates: &mut mpsc::Receiver<Update>,
    ) -> Batch {
        let mut tokens = Vec::new();
        let mut end = None;
        let mut next = Some(first);
        while let Some(update) = next.take() {
            match update {
                Update::Token(token) => tokens.push(token),
                // They come before any token, and the caller takes them.
                Update::PromptLogprobs(_) => {}
                Update::Finished {
                    reason,
                    usage,
                    metering,
                } => {
                    end = Some(End::Finished {
                        reason,
                        usage,
                        metering,
                    })
                }
                Update::Failed(error) => end = Some(End::Failed(error)),
            }
            if end.is_none() && tokens.len() < limits::BATCH_TOKENS_MAX {
                next = updates.try_recv().ok();
            }
        }
        self.batch(request, position, tokens, end)
    }

    fn batch(
        &self,
        request: u64,
        first_position: u32,
        tokens: Vec<cell_api::CommittedToken>,
        end: Option<End>,
    ) -> Batch {
        let metering = match end {
            Some(_) => None,
            None => self.cell.metered(RequestId(request)),
        };
        Batch {
            request,
            first_position,
            prompt_scores: None,
            tokens,
            metering,
            end,
            numerics: None,
        }
    }

    /// Whether `batch` went out (a closed connection ends the stream).
    async fn publish(&self, batches_to: &str, batch: &Batch) -> bool {
        let body = match wire::encode(batch) {
            Ok(body) => body,
            Err(error) => {
                tracing::error!(request = batch.request, %error, "encode a token batch");
                return false;
            }
        };
        match self.nats.publish(batches_to.to_string(), body).await {
            Ok(()) => true,
            Err(error) => {
                tracing::warn!(request = batch.request, %error, "publish a token batch");
                false
            }
        }
    }
}
