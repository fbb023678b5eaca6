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

use ledger::core::{
    DurationMs, MicroUsd, MicroWh, ModelId, NodeId, OwnerId, RequestId, Segment, TenantId,
    TimestampMs, TokenCount,
};
use ledger::metering::{Server, UsageSegment};
use ledger::pricing::{round_up, Rate};
use ledger::settlement::{CompletedRequest, SEGMENTS_MAX};
use ledger::store::MeterFlag;
use serde_json::{json, Value};

use crate::api::ApiError;
use crate::billing::{Billing, Completion, PendingCharge};
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
}

impl Finisher {
    pub fn new(billing: Arc<Billing>, pending: PendingCharge, idempotency: Option<Slot>) -> Self {
        Finisher {
            billing,
            pending: Arc::new(Mutex::new(Some(pending))),
            idempotency,
        }
    }

    /// What settles the request if the client cancels it before `finish`.
    pub fn cancel_charge(&self) -> CancelCharge {
        CancelCharge {
            billing: Arc::clone(&self.billing),
            pending: Arc::clone(&self.pending),
        }
    }

    /// Whether `finish` needs the response body (to keep it for replay).
    pub fn wants_body(&self) -> bool {
        self.idempotency.is_some()
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
    ) -> Result<(), ApiError> {
        let Some(pending) = take_charge(&self.pending) else {
            tracing::error!("a request finished after it was settled as cancelled");
            return Err(ApiError::internal());
        };
        let settling = tokio::spawn(finish_settled(
            Arc::clone(&self.billing),
            pending,
            self.idempotency.take(),
            metering.clone(),
            body.cloned(),
        ));
        settling.await.unwrap_or_else(|error| {
            tracing::error!(%error, "settling a finished request panicked");
            Err(ApiError::internal())
        })
    }
}

/// Meters, keeps (for idempotent replay) and settles a finished request.
async fn finish_settled(
    billing: Arc<Billing>,
    pending: PendingCharge,
    idempotency: Option<Slot>,
    metering: Metering,
    body: Option<Value>,
) -> Result<(), ApiError> {
    let completion = billing.complete(&pending, &metering).await?;
    if let Some(mut slot) = idempotency {
        let body = body.unwrap_or(Value::Null);
        slot.store_done(&body, &completed_to_json(&completion.request))
            .await?;
    }
    // The hold (in `pending`) is released once the charge is posted.
    let settled = billing.settle(&completion).await.map(|_charge| ());
    drop(pending);
    settled
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
            match billing.complete(&pending, &metering).await {
                Ok(completion) => {
                    if let Ok(charge) = billing.settle(&completion).await {
                        tracing::info!(request_id = %pending.request_id, %charge, "cancelled request settled");
                    }
                }
                Err(_) => tracing::error!(request_id = %pending.request_id, "meter a cancelled request"),
            }
            drop(pending);
        });
    }
}

/// Settles a request kept with an idempotent response again.
pub async fn settle_again(billing: &Billing, stored: &Value) -> Result<(), ApiError> {
    let Some(request) = completed_from_json(stored) else {
        tracing::error!("a stored settlement cannot be read back");
        return Err(ApiError::internal());
    };
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
    ) -> Result<(), ApiError> {
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
    ) -> Result<(), ApiError> {
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
    ) -> Result<CloudCharge, ApiError> {
        let model = model_id(model)?;
        let rate = self
            .billing
            .rate_at(&model, self.pending.class, self.pending.admitted_at)?;
        let Rate::Cloud { customer, upstream } = rate else {
            tracing::error!(%model, "a cloud model is priced as a fleet model");
            return Err(ApiError::internal());
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
    pub async fn settle(self, completed_ms: i64) -> Result<MicroUsd, ApiError> {
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
        // The hold (in `pending`) is released once the charge is posted.
        let charged = billing.settle(&completion).await;
        drop(pending);
        charged
    }
}

fn segment_number(position: usize) -> u32 {
    u32::try_from(position).unwrap_or(u32::MAX)
}

fn model_id(model: &str) -> Result<ModelId, ApiError> {
    ModelId::new(model).map_err(|error| {
        tracing::error!(%error, model, "billing: model name");
        ApiError::internal()
    })
}

/// The JSON a settled request is kept as.
pub fn completed_to_json(request: &CompletedRequest) -> Value {
    let segments: Vec<Value> = request
        .segments
        .iter()
        .map(|segment| {
            let (node, owner, energy, tariff) = match &segment.server {
                Server::Node {
                    node,
                    owner,
                    energy,
                    tariff_per_kwh,
                } => (
                    Some(node.to_string()),
                    Some(owner.to_string()),
                    energy.0,
                    tariff_per_kwh.0,
                ),
                Server::Cloud => (None, None, 0, 0),
            };
            json!({
                "segment": segment.segment.0,
                "node": node,
                "owner": owner,
                "energy_uwh": energy,
                "tariff_per_kwh": tariff,
                "model": segment.model.as_str(),
                "prompt_tokens": segment.prompt_tokens.0,
                "completion_tokens": segment.completion_tokens.0,
                "compute_ms": segment.compute.0,
                "started_at_ms": segment.started_at.0,
            })
        })
        .collect();
    json!({
        "request_id": request.request_id.as_str(),
        "tenant": request.tenant.as_str(),
        "class": request.class.as_str(),
        "admitted_at_ms": request.admitted_at.0,
        "completed_at_ms": request.completed_at.0,
        "segments": segments,
    })
}

/// Reads back what `completed_to_json` wrote.
pub fn completed_from_json(value: &Value) -> Option<CompletedRequest> {
    let text = |value: &Value, name: &str| value.get(name)?.as_str().map(str::to_string);
    let number = |value: &Value, name: &str| value.get(name)?.as_u64();
    let signed = |value: &Value, name: &str| value.get(name)?.as_i64();
    let request_id = RequestId::new(text(value, "request_id")?).ok()?;
    let mut segments = Vec::new();
    for segment in value.get("segments")?.as_array()? {
        let server = match (text(segment, "node"), text(segment, "owner")) {
            (Some(node), Some(owner)) => Server::Node {
                node: NodeId::new(node).ok()?,
                owner: OwnerId::new(owner).ok()?,
                energy: MicroWh(number(segment, "energy_uwh")?),
                tariff_per_kwh: MicroUsd(signed(segment, "tariff_per_kwh")?),
            },
            _ => Server::Cloud,
        };
        segments.push(UsageSegment {
            request_id: request_id.clone(),
            segment: Segment(u32::try_from(number(segment, "segment")?).ok()?),
            server,
            model: ModelId::new(text(segment, "model")?).ok()?,
            prompt_tokens: TokenCount(number(segment, "prompt_tokens")?),
            completion_tokens: TokenCount(number(segment, "completion_tokens")?),
            compute: DurationMs(number(segment, "compute_ms")?),
            started_at: TimestampMs(signed(segment, "started_at_ms")?),
        });
    }
    Some(CompletedRequest {
        request_id,
        tenant: TenantId::new(text(value, "tenant")?).ok()?,
        class: text(value, "class")?.parse().ok()?,
        admitted_at: TimestampMs(signed(value, "admitted_at_ms")?),
        completed_at: TimestampMs(signed(value, "completed_at_ms")?),
        segments,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use ledger::pricing::TenantClass;

    #[test]
    fn a_kept_settlement_reads_back_identically() {
        let request_id = RequestId::new("chatcmpl-1").unwrap();
        let segment = |position: u32, server: Server| UsageSegment {
            request_id: request_id.clone(),
            segment: Segment(position),
            server,
            model: ModelId::new("smollm2-135m-instruct").unwrap(),
            prompt_tokens: TokenCount(12),
            completion_tokens: TokenCount(7),
            compute: DurationMs(345),
            started_at: TimestampMs(1_700_000_000_000),
        };
        let request = CompletedRequest {
            request_id: request_id.clone(),
            tenant: TenantId::new("acme").unwrap(),
            class: TenantClass::Spot,
            admitted_at: TimestampMs(1_700_000_000_000),
            completed_at: TimestampMs(1_700_000_000_500),
            segments: vec![
                segment(
                    0,
                    Server::Node {
                        node: NodeId::new("car-1").unwrap(),
                        owner: OwnerId::new("alice").unwrap(),
                        energy: MicroWh(5_750),
                        tariff_per_kwh: MicroUsd(300_000),
                    },
                ),
                segment(1, Server::Cloud),
            ],
        };
        assert_eq!(
            completed_from_json(&completed_to_json(&request)),
            Some(request)
        );
        assert_eq!(completed_from_json(&json!({"request_id": "x"})), None);
    }
}
