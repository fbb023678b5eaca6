//! The gateway side of the bus: [`Cells`], a `Cell` made of every cell
//! that publishes its capacity on the bus.
//!
//! Each submission goes to a cell whose vehicles hold its prompt's head if
//! one has a free slot, else is placed by the power of two choices
//! (`placement`),
//! and a task per admitted generation (`drive`) receives its batches,
//! forwards each position once, and moves it to another cell when its cell
//! goes quiet, disappears or a batch is lost. `cancel` answers from what
//! the task last recorded here (`metering`), so it never waits on the bus.

mod drive;
mod metering;
mod placement;

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant, SystemTime};

use async_nats::{Client, Subscriber};
use cell_api::metering::{Metering, SegmentTrack};
use cell_api::{Admitted, Capacity, Cell, NewGeneration, Rejection};
use domain::{PromptHeads, RequestId, TimestampMs};
use futures::future::BoxFuture;
use futures::StreamExt;
use rand::rngs::StdRng;
use rand::SeedableRng;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::limits;
use crate::subjects::{self, CellId};
use crate::wire::{
    self, CancelMessage, CapacitySummary, PolicyMessage, SubmitReply, SubmitRequest,
};
use crate::BusError;

/// How a gateway's `Cells` waits, retries and bounds; `Default` is the
/// `limits`.
#[derive(Clone, Debug)]
pub struct CellsConfig {
    pub submit_timeout: Duration,
    pub silence_timeout: Duration,
    pub capacity_stale_after: Duration,
    pub moves_max: u32,
    pub move_retry_delay: Duration,
    pub generations_max: usize,
    /// Seeds placement's random choices (for tests); `None` seeds from the
    /// operating system.
    pub seed: Option<u64>,
    /// Send a prompt to a cell whose vehicles hold its head (see
    /// `placement`); off, every choice is the power of two choices.
    pub prefix_affinity: bool,
}

impl Default for CellsConfig {
    fn default() -> Self {
        CellsConfig {
            submit_timeout: limits::SUBMIT_TIMEOUT,
            silence_timeout: limits::SILENCE_TIMEOUT,
            capacity_stale_after: limits::CAPACITY_STALE_AFTER,
            moves_max: limits::MOVES_MAX,
            move_retry_delay: limits::MOVE_RETRY_DELAY,
            generations_max: limits::GATEWAY_GENERATIONS_MAX,
            seed: None,
            prefix_affinity: true,
        }
    }
}

/// Every cell on the bus, as one `Cell`. Stateless across restarts: what
/// it holds is the cells' latest summaries and its own generations in
/// flight.
///
/// Buffering: the NATS client's `subscription_capacity` bounds the batches
/// buffered per generation; a batch the client drops for a slow consumer
/// is a gap, and the generation moves.
pub struct Cells {
    shared: Arc<Shared>,
    stop: CancellationToken,
}

impl Cells {
    /// Starts listening for the cells' capacity summaries on `nats`. No
    /// cell is known until its first summary arrives (within one
    /// `CAPACITY_INTERVAL`).
    pub async fn connect(nats: Client, config: CellsConfig) -> Result<Cells, BusError> {
        let summaries = nats
            .subscribe(subjects::CAPACITY_ALL)
            .await
            .map_err(|source| BusError::Subscribe {
                subject: subjects::CAPACITY_ALL.to_string(),
                source,
            })?;
        nats.flush().await?;
        let rng = match config.seed {
            Some(seed) => StdRng::seed_from_u64(seed),
            None => StdRng::from_entropy(),
        };
        let (outbox, outgoing) = mpsc::channel(limits::OUTBOX_CAPACITY);
        let shared = Arc::new(Shared {
            nats,
            config,
            directory: Mutex::new(HashMap::new()),
            generations: Mutex::new(HashMap::new()),
            rng: Mutex::new(rng),
            next_request: AtomicU64::new(1),
            outbox,
        });
        let stop = CancellationToken::new();
        tokio::spawn(Arc::clone(&shared).listen(summaries, stop.clone()));
        tokio::spawn(Arc::clone(&shared).send_outbox(outgoing, stop.clone()));
        Ok(Cells { shared, stop })
    }

    /// The cells heard from recently, sorted.
    pub fn cells(&self) -> Vec<String> {
        let directory = lock(&self.shared.directory);
        let mut cells: Vec<String> = directory
            .iter()
            .filter(|(_, heard)| self.shared.fresh(heard))
            .map(|(cell, _)| cell.to_string())
            .collect();
        cells.sort();
        cells
    }

    /// The cell that runs a generation now, if it runs on one.
    pub fn cell_of(&self, request: RequestId) -> Option<String> {
        let generations = lock(&self.shared.generations);
        let current = generations.get(&request.0)?.current.as_ref()?;
        Some(current.cell.to_string())
    }

    /// Generations in flight.
    pub fn in_flight(&self) -> usize {
        lock(&self.shared.generations).len()
    }
}

impl Drop for Cells {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

impl Cell for Cells {
    fn submit(&self, generation: NewGeneration) -> BoxFuture<'_, Result<Admitted, Rejection>> {
        Box::pin(Arc::clone(&self.shared).submit(generation))
    }

    /// Answers from the metering the generation's cell last sent, clamped
    /// to the tokens forwarded, plus every earlier cell's attempt: a
    /// cancelled generation is charged for what the client was sent. The
    /// cancel reaches the cell best effort, after this returns.
    fn cancel(&self, request: RequestId) -> Option<Metering> {
        let running = lock(&self.shared.generations).remove(&request.0)?;
        running.stop.cancel();
        if let Some(current) = &running.current {
            self.shared.queue(Outgoing::Cancel {
                cell: current.cell.clone(),
                request: current.remote,
            });
        }
        Some(running.metering_so_far(now_ms()))
    }

    /// The vehicles of every cell heard from recently, as each lists them.
    fn capacity(&self) -> Capacity {
        let directory = lock(&self.shared.directory);
        let mut capacity = Capacity::default();
        for heard in directory.values().filter(|heard| self.shared.fresh(heard)) {
            let summary = &heard.summary.capacity;
            capacity.nodes.extend(summary.nodes.iter().cloned());
            capacity.unlisted = capacity.unlisted.saturating_add(summary.unlisted);
        }
        capacity
    }

    /// Published to every cell; a cell that does not hold `node` ignores it.
    fn owner_policy_changed(&self, node: &str, policy: scheduler::OwnerPolicy) {
        self.shared.queue(Outgoing::Policy(PolicyMessage {
            node: node.to_string(),
            policy: (&policy).into(),
        }));
    }
}

/// A cell's latest summary and when it arrived.
struct Heard {
    summary: CapacitySummary,
    at: Instant,
}

/// What `cancel` and `owner_policy_changed` hand to the outbox task.
enum Outgoing {
    Cancel { cell: CellId, request: u64 },
    Policy(PolicyMessage),
}

/// One generation in flight, as the driver last recorded it.
struct Running {
    prompt_tokens: u32,
    /// The segments of attempts on cells it moved away from, each clamped
    /// to the tokens forwarded from it.
    earlier: Vec<SegmentTrack>,
    /// The attempt running now; `None` while it moves.
    current: Option<Current>,
    stop: CancellationToken,
}

/// The attempt a generation runs as now.
struct Current {
    cell: CellId,
    /// The cell's request id.
    remote: u64,
    /// What the cell last said it metered.
    metering: Option<Metering>,
    /// Tokens forwarded from this attempt.
    forwarded: u32,
}

impl Running {
    /// What cancelling now would be charged: every attempt's segments,
    /// each clamped to the tokens forwarded from it.
    fn metering_so_far(&self, now_ms: i64) -> Metering {
        let mut segments = self.earlier.clone();
        if let Some(current) = &self.current {
            if let Some(metering) = &current.metering {
                segments.extend(metering::clamped(metering, current.forwarded));
            }
        }
        Metering {
            prompt_tokens: self.prompt_tokens,
            segments,
            node_report: None,
            finished_ms: now_ms,
        }
    }
}

/// An attempt of a generation on a cell, as the driver holds it.
struct Attempt {
    cell: CellId,
    remote: u64,
    batches: Subscriber,
}

/// What `Cells` and its tasks share.
struct Shared {
    nats: Client,
    config: CellsConfig,
    directory: Mutex<HashMap<CellId, Heard>>,
    generations: Mutex<HashMap<u64, Running>>,
    rng: Mutex<StdRng>,
    next_request: AtomicU64,
    outbox: mpsc::Sender<Outgoing>,
}

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

fn now_ms() -> i64 {
    TimestampMs::from_system_time(SystemTime::now()).0
}

/// The refusal when no cell could be asked.
fn no_cell() -> Rejection {
    Rejection::NoEligibleNode {
        retry_after_seconds: cell_api::limits::RETRY_AFTER_DEFAULT_SECONDS,
    }
}

/// Forgets a reserved generation whose submission did not get through
/// (refused, or the caller stopped waiting).
struct Reservation<'a> {
    shared: &'a Shared,
    request: u64,
    armed: bool,
}

impl Drop for Reservation<'_> {
    fn drop(&mut self) {
        if self.armed {
            lock(&self.shared.generations).remove(&self.request);
        }
    }
}

impl Shared {
    fn fresh(&self, heard: &Heard) -> bool {
        heard.at.elapsed() < self.config.capacity_stale_after
    }

    fn is_fresh(&self, cell: &CellId) -> bool {
        lock(&self.directory)
            .get(cell)
            .is_some_and(|heard| self.fresh(heard))
    }

    fn queue(&self, outgoing: Outgoing) {
        if self.outbox.try_send(outgoing).is_err() {
            tracing::warn!("bus outbox full: a cancel or policy change was dropped");
        }
    }

    async fn submit(self: Arc<Self>, generation: NewGeneration) -> Result<Admitted, Rejection> {
        if generation.max_tokens > cell_api::limits::COMPLETION_TOKENS_MAX {
            return Err(Rejection::Other {
                message: format!(
                    "max_tokens {} is over the bound of {}",
                    generation.max_tokens,
                    cell_api::limits::COMPLETION_TOKENS_MAX
                ),
            });
        }
        let request = self.next_request.fetch_add(1, Ordering::Relaxed);
        let stop = CancellationToken::new();
        {
            let mut generations = lock(&self.generations);
            if generations.len() >= self.config.generations_max {
                return Err(Rejection::QueueFull {
                    retry_after_seconds: cell_api::limits::RETRY_AFTER_DEFAULT_SECONDS,
                });
            }
            generations.insert(
                request,
                Running {
                    prompt_tokens: u32::try_from(generation.prompt.len()).unwrap_or(u32::MAX),
                    earlier: Vec::new(),
                    current: None,
                    stop: stop.clone(),
                },
            );
        }
        let mut reservation = Reservation {
            shared: &self,
            request,
            armed: true,
        };
        let attempt = self.place(&generation, None).await?;
        reservation.armed = false;
        drop(reservation);
        if !self.record_attempt(request, &attempt) {
            // Only a cancel removes a reserved generation, and nobody could
            // cancel one not yet admitted; kept for completeness.
            self.publish_cancel(&attempt.cell, attempt.remote).await;
            return Err(no_cell());
        }
        let (sender, updates) = mpsc::channel(limits::UPDATES_CAPACITY);
        tokio::spawn(Arc::clone(&self).drive(request, generation, attempt, sender, stop));
        Ok(Admitted {
            request: RequestId(request),
            updates,
        })
    }

    /// Submits `generation` to the cells placement picks, in turn, until
    /// one admits it; `avoid` is asked only if no other cell is left.
    async fn place(
        &self,
        generation: &NewGeneration,
        avoid: Option<&CellId>,
    ) -> Result<Attempt, Rejection> {
        let mut tried: Vec<CellId> = Vec::new();
        let mut refusal = None;
        let heads = if self.config.prefix_affinity {
            PromptHeads::of(&generation.prompt)
        } else {
            PromptHeads::default()
        };
        for _ in 0..limits::PLACEMENT_TRIES_MAX {
            let Some(cell) = self.choose(&generation.model, &heads, &tried, avoid) else {
                break;
            };
            tried.push(cell.clone());
            match self.ask(&cell, generation).await {
                Ok(attempt) => return Ok(attempt),
                Err(rejection) => refusal = Some(rejection),
            }
        }
        Err(refusal.unwrap_or_else(no_cell))
    }

    /// The cell for the next try: among the fresh cells that serve `model`
    /// and were not tried, one holding the longest of `heads` with a free
    /// slot, else the freer of two random ones.
    fn choose(
        &self,
        model: &str,
        heads: &PromptHeads,
        tried: &[CellId],
        avoid: Option<&CellId>,
    ) -> Option<CellId> {
        let directory = lock(&self.directory);
        let serving = |cell: &CellId| !tried.contains(cell);
        let mut candidates: Vec<placement::Candidate<CellId>> = directory
            .iter()
            .filter(|(cell, heard)| self.fresh(heard) && serving(cell))
            .filter_map(|(cell, heard)| {
                let capacity = heard.summary.model(model)?;
                // Sorted when heard.
                let held = |hash| capacity.prompt_heads.binary_search(&hash).is_ok();
                Some(placement::Candidate {
                    cell: cell.clone(),
                    free_slots: capacity.free_slots,
                    queued: capacity.queued,
                    head_levels: heads.deepest_held(held),
                })
            })
            .collect();
        // A map's order is arbitrary; sorted, a seeded choice replays.
        candidates.sort();
        let others: Vec<placement::Candidate<CellId>> = candidates
            .iter()
            .filter(|candidate| Some(&candidate.cell) != avoid)
            .cloned()
            .collect();
        let pool = if others.is_empty() {
            candidates
        } else {
            others
        };
        placement::choose(&pool, &mut *lock(&self.rng)).cloned()
    }

    /// Asks `cell` to admit `generation`, its batches to a new inbox.
    async fn ask(&self, cell: &CellId, generation: &NewGeneration) -> Result<Attempt, Rejection> {
        let inbox = self.nats.new_inbox();
        let batches = self.nats.subscribe(inbox.clone()).await.map_err(|error| {
            tracing::warn!(%error, "subscribe a generation's inbox");
            no_cell()
        })?;
        let body = wire::encode(&SubmitRequest {
            generation: generation.into(),
            batches_to: inbox,
        })
        .map_err(|error| Rejection::Other {
            message: error.to_string(),
        })?;
        let request = async_nats::Request::new()
            .payload(body)
            .timeout(Some(self.config.submit_timeout));
        let reply = self
            .nats
            .send_request(subjects::submit(cell), request)
            .await
            .map_err(|error| {
                tracing::warn!(cell = %cell, %error, "submit over the bus");
                no_cell()
            })?;
        match wire::decode::<SubmitReply>(&reply.payload) {
            Ok(SubmitReply::Admitted { request }) => Ok(Attempt {
                cell: cell.clone(),
                remote: request,
                batches,
            }),
            Ok(SubmitReply::Rejected(rejection)) => Err(rejection),
            Err(error) => {
                tracing::warn!(cell = %cell, %error, "unreadable submission reply");
                Err(no_cell())
            }
        }
    }

    /// Records that `request` runs as `attempt` now; `false` if it was
    /// cancelled meanwhile.
    fn record_attempt(&self, request: u64, attempt: &Attempt) -> bool {
        let mut generations = lock(&self.generations);
        let Some(running) = generations.get_mut(&request) else {
            return false;
        };
        running.current = Some(Current {
            cell: attempt.cell.clone(),
            remote: attempt.remote,
            metering: None,
            forwarded: 0,
        });
        true
    }

    /// Keeps every cell's latest summary.
    async fn listen(self: Arc<Self>, mut summaries: Subscriber, stop: CancellationToken) {
        loop {
            let message = tokio::select! {
                _ = stop.cancelled() => return,
                message = summaries.next() => message,
            };
            let Some(message) = message else {
                return;
            };
            match wire::decode::<CapacitySummary>(&message.payload) {
                Ok(summary) => self.heard(summary),
                Err(error) => tracing::warn!(%error, "bad capacity summary dropped"),
            }
        }
    }

    fn heard(&self, mut summary: CapacitySummary) {
        for model in &mut summary.models {
            // Looked up by `choose`; the order of recency is not needed here.
            model.prompt_heads.sort_unstable();
        }
        let Ok(cell) = CellId::new(summary.cell.clone()) else {
            tracing::warn!(cell = %summary.cell, "capacity summary from an unusable cell id");
            return;
        };
        let mut directory = lock(&self.directory);
        if !directory.contains_key(&cell) && directory.len() >= limits::CELLS_MAX {
            let stale_after = self.config.capacity_stale_after;
            directory.retain(|_, heard| heard.at.elapsed() < stale_after);
            if directory.len() >= limits::CELLS_MAX {
                tracing::warn!(cell = %cell, "too many cells: summary ignored");
                return;
            }
        }
        let at = Instant::now();
        directory.insert(cell, Heard { summary, at });
    }

    /// Sends what `cancel` and `owner_policy_changed` queued.
    async fn send_outbox(
        self: Arc<Self>,
        mut outgoing: mpsc::Receiver<Outgoing>,
        stop: CancellationToken,
    ) {
        loop {
            let item = tokio::select! {
                _ = stop.cancelled() => return,
                item = outgoing.recv() => item,
            };
            match item {
                None => return,
                Some(Outgoing::Cancel { cell, request }) => {
                    self.publish_cancel(&cell, request).await;
                }
                Some(Outgoing::Policy(change)) => {
                    let sent = match wire::encode(&change) {
                        Ok(body) => self.nats.publish(subjects::POLICY, body).await.is_ok(),
                        Err(_) => false,
                    };
                    if !sent {
                        tracing::warn!(node_id = %change.node, "policy change not published");
                    }
                }
            }
        }
    }

    /// Tells `cell` to stop `request`, best effort.
    async fn publish_cancel(&self, cell: &CellId, request: u64) {
        let sent = match wire::encode(&CancelMessage { request }) {
            Ok(body) => self
                .nats
                .publish(subjects::cancel(cell), body)
                .await
                .is_ok(),
            Err(_) => false,
        };
        if !sent {
            tracing::warn!(cell = %cell, request, "cancel not published");
        }
    }
}
