//! The end of a billed request: build the ledger's record from the core's
//! counts, keep the response for idempotent replay, settle durably — in that
//! order, before the client sees the end of the response.
//!
//! Keeping the response before settling makes a crash between the two
//! harmless: a retry with the same Idempotency-Key replays the response and
//! settles the stored record again, which the ledger either creates or finds
//! already there. A crash before the response was kept leaves nothing
//! settled, so the retry runs the request afresh.

use std::sync::Arc;

use ledger::core::{
    DurationMs, MicroUsd, MicroWh, ModelId, NodeId, OwnerId, RequestId, Segment, TenantId,
    TimestampMs, TokenCount,
};
use ledger::metering::{Server, UsageSegment};
use ledger::settlement::CompletedRequest;
use serde_json::{json, Value};

use crate::api::ApiError;
use crate::billing::{Billing, Completion, PendingCharge};
use crate::billing_idempotency::Slot;
use crate::billing_meter::Metering;

/// Carries an admitted request's charge (and idempotency slot) to its end.
/// Dropped without `finish`, it releases the hold and the slot: the request
/// failed or was cancelled and is not charged.
pub struct Finisher {
    billing: Arc<Billing>,
    pending: PendingCharge,
    idempotency: Option<Slot>,
}

impl Finisher {
    pub fn new(billing: Arc<Billing>, pending: PendingCharge, idempotency: Option<Slot>) -> Self {
        Finisher {
            billing,
            pending,
            idempotency,
        }
    }

    /// Whether `finish` needs the response body (to keep it for replay).
    pub fn wants_body(&self) -> bool {
        self.idempotency.is_some()
    }

    /// Records the finished request; on error the client must get the error
    /// instead of a successful end.
    pub async fn finish(
        &mut self,
        metering: &Metering,
        body: Option<&Value>,
    ) -> Result<(), ApiError> {
        let completion = self.billing.complete(&self.pending, metering).await?;
        if let Some(slot) = self.idempotency.as_mut() {
            let body = body.cloned().unwrap_or(Value::Null);
            slot.store_done(&body, &completed_to_json(&completion.request))
                .await?;
        }
        self.billing.settle(&completion).await
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
    billing.settle(&completion).await
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
