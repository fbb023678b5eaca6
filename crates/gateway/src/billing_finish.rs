//! The end of a billed request: build the ledger's record from the core's
//! counts, keep the response for idempotent replay, settle durably — in that
//! order, before the client sees the end of the response.
//!
//! A routed request (`auto`, `cloud/<model>`) ends through `RoutedBooking`
//! instead: the parts of every tier that worked on it become the segments of
//! one `CompletedRequest`, settled once.
//!
//! A request the client cancels (it disconnected, or dropped its stream)
//! ends through [`CancelCharge`]: the prompt and the tokens committed until
//! then are charged, and the nodes that made them are credited, like a
//! completed request of that length (same transfer ids, so once). Otherwise
//! a tenant could make nodes work for free by hanging up before the end.
//!
//! Keeping the response before settling makes a crash between the two
//! harmless: a retry with the same Idempotency-Key replays the response and
//! settles the stored record again, which the ledger either creates or finds
//! already there. A crash before the response was kept leaves nothing
//! settled, so the retry runs the request afresh.

use std::sync::{Arc, Mutex};

use ledger::core::{DurationMs, MicroUsd, ModelId, Segment, TimestampMs, TokenCount};
use ledger::metering::{Server, UsageSegment};
use ledger::pricing::{round_up, Rate};
use ledger::settlement::{CompletedRequest, SEGMENTS_MAX};
use ledger::store::MeterFlag;
use serde_json::Value;

use crate::billing::{Billing, BillingError, Completion, PendingCharge};
use crate::billing_idempotency::Slot;
use crate::billing_meter::Metering;

/// An admitted request's charge, shared by its `Finisher` and its
/// `CancelCharge`: whichever ends the request takes it, so it is settled by
/// one of them at most.
type SharedCharge = Arc<Mutex<Option<PendingCharge>>>;

fn take_charge(shared: &SharedCharge) -> Option<PendingCharge> {
    // Plain data: whatever a panicking holder left is still usable.
    shared
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
        .take()
}

/// Carries an admitted request's charge (and idempotency slot) to its end.
/// Dropped without `finish`, it releases the slot; the hold goes with the
/// charge, released when the request failed (not charged) or once its
/// `CancelCharge` settled a cancelled one.
pub struct Finisher {
    billing: Arc<Billing>,
    pending: SharedCharge,
    idempotency: Option<Slot>,
    kept: Option<KeptCompletion>,
}

/// A completion the client asked to keep (`store: true`): where, and the
/// record, whose response is the finished body.
pub struct KeptCompletion {
    pub store: store::Store,
    pub record: store::stored_completions::NewStoredCompletion,
}

impl Finisher {
    pub fn new(billing: Arc<Billing>, pending: PendingCharge, idempotency: Option<Slot>) -> Self {
        Finisher {
            billing,
            pending: Arc::new(Mutex::new(Some(pending))),
            idempotency,
            kept: None,
        }
    }

    /// Keeps the finished body as a stored completion too, before settling.
    pub fn keeping(mut self, kept: Option<KeptCompletion>) -> Self {
        self.kept = kept;
        self
    }

    /// What settles the request if the client cancels it before `finish`.
    pub fn cancel_charge(&self) -> CancelCharge {
        CancelCharge {
            billing: Arc::clone(&self.billing),
            pending: Arc::clone(&self.pending),
        }
    }

    /// Whether `finish` needs the response body (to keep it for replay or
    /// retrieval).
    pub fn wants_body(&self) -> bool {
        self.idempotency.is_some() || self.kept.is_some()
    }

    /// Records the finished request; on error the client must get the error
    /// instead of a successful end.
    ///
    /// The work runs in a task of its own: a client that hangs up while its
    /// finished request is being settled (the response future is dropped)
    /// still pays for the answer it was given.
    pub async fn finish(
        &mut self,
        metering: &Metering,
        body: Option<&Value>,
    ) -> Result<(), BillingError> {
        let Some(pending) = take_charge(&self.pending) else {
            return Err(BillingError::internal(
                "finish a request",
                &"a request finished after it was settled as cancelled",
            ));
        };
        let settling = tokio::spawn(finish_settled(
            Arc::clone(&self.billing),
            pending,
            self.idempotency.take(),
            self.kept.take(),
            metering.clone(),
            body.cloned(),
        ));
        settling.await.unwrap_or_else(|error| {
            Err(BillingError::internal("settle a finished request", &error))
        })
    }
}

/// Meters, keeps (for idempotent replay, for retrieval) and settles a
/// finished request. A completion that cannot be kept as asked is not
/// settled: the client gets the error and is not charged.
async fn finish_settled(
    billing: Arc<Billing>,
    pending: PendingCharge,
    idempotency: Option<Slot>,
    kept: Option<KeptCompletion>,
    metering: Metering,
    body: Option<Value>,
) -> Result<(), BillingError> {
    let completion = match billing.complete(&pending, &metering).await {
        Ok(completion) => completion,
        // Its nodes' owners could not be looked up: metered and settled
        // once the store is back (the key, if any, is not kept).
        Err(BillingError::LedgerUnavailable { .. }) => {
            return Err(billing.settle_later(pending, metering));
        }
        Err(error) => return Err(error),
    };
    if let Some(KeptCompletion { store, mut record }) = kept {
        record.response = body.as_ref().unwrap_or(&Value::Null).to_string();
        if let Err(error) = store.keep_completion(&record).await {
            return Err(match error.is_unavailable() {
                true => BillingError::LedgerUnavailable {
                    retry_after_seconds: crate::limits::RETRY_AFTER_DEFAULT_SECONDS,
                },
                false => BillingError::internal("keep a stored completion", &error),
            });
        }
    }
    if let Some(mut slot) = idempotency {
        let body = body.unwrap_or(Value::Null);
        slot.store_done(&body, &completion.request).await?;
    }
    // The hold (in `pending`) ends with the charge's commit.
    billing
        .settle_charge(pending, completion)
        .await
        .map(|_charge| ())
}

/// Settles a request the client cancelled, for what the coordinator
/// counted until the cancel: the prompt (once it reached a node) and every
/// committed token, each node credited for its part, exactly like a
/// completed request with those tokens. A request cancelled while still
/// queued made no node work and is not charged.
pub struct CancelCharge {
    billing: Arc<Billing>,
    pending: SharedCharge,
}

impl CancelCharge {
    /// Settles in a task of its own, since a cancel is noticed where the
    /// response is dropped (no `.await` there). The hold stays until the
    /// charge is posted. A failure is logged: the client is gone.
    pub fn settle_in_background(self, metering: Metering) {
        if metering.segments.is_empty() {
            return;
        }
        let Some(pending) = take_charge(&self.pending) else {
            return;
        };
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            tracing::error!(request_id = %pending.request_id, "no runtime to settle a cancelled request");
            return;
        };
        let billing = self.billing;
        runtime.spawn(async move {
            let request_id = pending.request_id.clone();
            match billing.complete(&pending, &metering).await {
                Ok(completion) => {
                    if let Ok(charge) = billing.settle_charge(pending, completion).await {
                        tracing::info!(request_id = %request_id, %charge, "cancelled request settled");
                    }
                }
                Err(BillingError::LedgerUnavailable { .. }) => {
                    billing.settle_later(pending, metering);
                }
                Err(_) => tracing::error!(request_id = %request_id, "meter a cancelled request"),
            }
        });
    }
}

/// Settles a request kept with an idempotent response again (`kept`: the
/// settlement as read back, or why it could not be).
pub async fn settle_again(
    billing: &Billing,
    kept: Result<CompletedRequest, String>,
) -> Result<(), BillingError> {
    let request =
        kept.map_err(|reason| BillingError::internal("read back a kept settlement", &reason))?;
    let completion = Completion {
        request,
        flags: Vec::new(),
    };
    billing.settle(&completion).await.map(|_charge| ())
}

/// What one cloud segment costs, rounded as settlement rounds: the tenant's
/// part of the charge (the upstream price plus the sheet's margin; the
/// prompt only when the cloud segment comes first) and what the upstream is
/// owed for every token it processed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CloudCharge {
    pub customer: MicroUsd,
    pub upstream: MicroUsd,
}

/// The booking of one routed request: admitted once for every model that
/// may serve it, then each tier's work added as it ends, and settled once as
/// one `CompletedRequest` before the response ends.
///
/// Segments come in the order their text reached the client: the first one's
/// prompt is what the tenant pays for the prompt; a later segment's prompt (a
/// handoff's re-prefill, on a node or upstream) is the platform's cost. Edge
/// attempts whose text was discarded come last, with no completion tokens:
/// their owners are reimbursed the energy, the tenant pays nothing for them.
/// Dropped without `settle`, the booking releases its hold: a request that
/// failed or was abandoned is not charged.
pub struct RoutedBooking {
    billing: Arc<Billing>,
    pending: PendingCharge,
    /// Segments whose work reached the client, numbered in order.
    served: Vec<UsageSegment>,
    /// Edge attempts whose text was discarded, numbered when settled.
    discarded: Vec<UsageSegment>,
    flags: Vec<MeterFlag>,
}

impl RoutedBooking {
    pub fn new(billing: Arc<Billing>, pending: PendingCharge) -> RoutedBooking {
        RoutedBooking {
            billing,
            pending,
            served: Vec::new(),
            discarded: Vec::new(),
            flags: Vec::new(),
        }
    }

    /// Whether no work was booked yet: no segment would be settled.
    pub fn is_empty(&self) -> bool {
        self.served.is_empty() && self.discarded.is_empty()
    }

    /// An edge generation whose text reached the client. With
    /// `released_tokens`, only that many of its tokens did (a handoff dropped
    /// the rest, which were never sent): the attempts are trimmed to them,
    /// first tokens first.
    pub async fn add_edge(
        &mut self,
        model: &str,
        metering: &Metering,
        released_tokens: Option<u32>,
    ) -> Result<(), BillingError> {
        let model = model_id(model)?;
        let first = segment_number(self.served.len());
        let mut segments = self
            .billing
            .node_segments(&self.pending.request_id, &model, metering, first)
            .await?;
        match released_tokens {
            Some(released) => {
                let mut left = u64::from(released);
                for segment in &mut segments {
                    let kept = segment.completion_tokens.0.min(left);
                    segment.completion_tokens = TokenCount(kept);
                    left -= kept;
                }
            }
            None => {
                let flags = self.billing.check_node_report(metering, segments.last());
                self.flags.extend(flags);
            }
        }
        self.served.extend(segments);
        Ok(())
    }

    /// An edge generation whose text was discarded (an escalation).
    pub async fn add_discarded_edge(
        &mut self,
        model: &str,
        metering: &Metering,
    ) -> Result<(), BillingError> {
        let model = model_id(model)?;
        let segments = self
            .billing
            .node_segments(&self.pending.request_id, &model, metering, 0)
            .await?;
        self.discarded
            .extend(segments.into_iter().map(|segment| UsageSegment {
                completion_tokens: TokenCount(0),
                ..segment
            }));
        Ok(())
    }

    /// The cloud's part, with the token counts the upstream reported, and
    /// what it costs.
    pub fn add_cloud(
        &mut self,
        model: &str,
        prompt_tokens: u32,
        completion_tokens: u32,
        started_ms: i64,
        finished_ms: i64,
    ) -> Result<CloudCharge, BillingError> {
        let model = model_id(model)?;
        let rate = self
            .billing
            .rate_at(&model, self.pending.class, self.pending.admitted_at)?;
        let Rate::Cloud { customer, upstream } = rate else {
            return Err(BillingError::internal(
                "price a cloud part",
                &format!("the cloud model {model} is priced as a fleet model"),
            ));
        };
        let prompt = TokenCount(u64::from(prompt_tokens));
        let completion = TokenCount(u64::from(completion_tokens));
        let billed_prompt = if self.served.is_empty() {
            prompt
        } else {
            TokenCount(0)
        };
        let charge = CloudCharge {
            customer: round_up(customer.exact_cost(billed_prompt, completion)),
            upstream: round_up(upstream.exact_cost(prompt, completion)),
        };
        self.served.push(UsageSegment {
            request_id: self.pending.request_id.clone(),
            segment: Segment(segment_number(self.served.len())),
            server: Server::Cloud,
            model,
            prompt_tokens: prompt,
            completion_tokens: completion,
            compute: DurationMs(u64::try_from(finished_ms - started_ms).unwrap_or(0)),
            started_at: TimestampMs(started_ms),
        });
        Ok(charge)
    }

    /// Commits the request durably and returns what the tenant was charged;
    /// on error the client must get the error instead of a successful end.
    pub async fn settle(self, completed_ms: i64) -> Result<MicroUsd, BillingError> {
        let RoutedBooking {
            billing,
            pending,
            mut served,
            discarded,
            flags,
        } = self;
        // Discarded work is reimbursed only while there is room for it; the
        // served segments always fit (a request that migrated more often
        // than the ledger allows is a scheduler bug, refused by settlement).
        let room = SEGMENTS_MAX.saturating_sub(served.len());
        for segment in discarded.into_iter().take(room) {
            let number = segment_number(served.len());
            served.push(UsageSegment {
                segment: Segment(number),
                ..segment
            });
        }
        let completion = Completion {
            request: CompletedRequest {
                request_id: pending.request_id.clone(),
                tenant: pending.tenant.clone(),
                class: pending.class,
                admitted_at: pending.admitted_at,
                completed_at: TimestampMs(completed_ms),
                segments: served,
            },
            flags,
        };
        // The hold (in `pending`) ends with the charge's commit.
        billing.settle_charge(pending, completion).await
    }
}

fn segment_number(position: usize) -> u32 {
    u32::try_from(position).unwrap_or(u32::MAX)
}

fn model_id(model: &str) -> Result<ModelId, BillingError> {
    ModelId::new(model).map_err(|error| BillingError::internal("read a model name", &error))
}
