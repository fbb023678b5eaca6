//! The JSON a settled request is kept in with its idempotent response: the
//! ledger's `CompletedRequest` in a shape of its own, serde-derived, whose
//! field names are those the first rows were written with, so that a row
//! kept before an upgrade still settles again after it.

use ledger::core::{DurationMs, ModelId, RequestId, Segment, TenantId, TimestampMs, TokenCount};
use ledger::metering::{Server, UsageSegment};
use ledger::settlement::CompletedRequest;
use serde::{Deserialize, Serialize};

/// A settled request as kept with its response. Mirrors the ledger's
/// `CompletedRequest`; the names are the stored format's, keep them.
#[derive(Debug, Serialize, Deserialize)]
struct KeptSettlement {
    request_id: String,
    tenant: String,
    /// `fleet`, `reserved` or `spot`.
    class: String,
    admitted_at_ms: i64,
    completed_at_ms: i64,
    segments: Vec<KeptSegment>,
}

/// One segment of a kept settlement: `node` and `owner` are null, and the
/// energy and tariff zero, for the cloud.
#[derive(Debug, Serialize, Deserialize)]
struct KeptSegment {
    segment: u32,
    node: Option<String>,
    owner: Option<String>,
    energy_uwh: u64,
    tariff_per_kwh: i64,
    model: String,
    prompt_tokens: u64,
    completion_tokens: u64,
    compute_ms: u64,
    started_at_ms: i64,
}

impl From<&CompletedRequest> for KeptSettlement {
    fn from(request: &CompletedRequest) -> KeptSettlement {
        let segments = request
            .segments
            .iter()
            .map(|segment| {
                let (node, owner, energy_uwh, tariff_per_kwh) = segment.server.columns();
                KeptSegment {
                    segment: segment.segment.0,
                    node,
                    owner,
                    energy_uwh,
                    tariff_per_kwh,
                    model: segment.model.as_str().to_string(),
                    prompt_tokens: segment.prompt_tokens.0,
                    completion_tokens: segment.completion_tokens.0,
                    compute_ms: segment.compute.0,
                    started_at_ms: segment.started_at.0,
                }
            })
            .collect();
        KeptSettlement {
            request_id: request.request_id.as_str().to_string(),
            tenant: request.tenant.as_str().to_string(),
            class: request.class.as_str().to_string(),
            admitted_at_ms: request.admitted_at.0,
            completed_at_ms: request.completed_at.0,
            segments,
        }
    }
}

impl TryFrom<KeptSettlement> for CompletedRequest {
    type Error = String;

    /// Checks every id as the ledger does; a row that does not pass is
    /// refused, never settled as something else.
    fn try_from(kept: KeptSettlement) -> Result<CompletedRequest, String> {
        let request_id = RequestId::new(kept.request_id).map_err(|error| error.to_string())?;
        let segments = kept
            .segments
            .into_iter()
            .map(|segment| {
                let server = Server::from_columns((
                    segment.node,
                    segment.owner,
                    segment.energy_uwh,
                    segment.tariff_per_kwh,
                ))?;
                Ok(UsageSegment {
                    request_id: request_id.clone(),
                    segment: Segment(segment.segment),
                    server,
                    model: ModelId::new(segment.model).map_err(|error| error.to_string())?,
                    prompt_tokens: TokenCount(segment.prompt_tokens),
                    completion_tokens: TokenCount(segment.completion_tokens),
                    compute: DurationMs(segment.compute_ms),
                    started_at: TimestampMs(segment.started_at_ms),
                })
            })
            .collect::<Result<Vec<UsageSegment>, String>>()?;
        Ok(CompletedRequest {
            request_id,
            tenant: TenantId::new(kept.tenant).map_err(|error| error.to_string())?,
            class: kept
                .class
                .parse()
                .map_err(|_| format!("unknown class {}", kept.class))?,
            admitted_at: TimestampMs(kept.admitted_at_ms),
            completed_at: TimestampMs(kept.completed_at_ms),
            segments,
        })
    }
}

/// The JSON text a settled request is kept as.
pub(super) fn settlement_to_json(request: &CompletedRequest) -> Result<String, serde_json::Error> {
    serde_json::to_string(&KeptSettlement::from(request))
}

/// Reads back what `settlement_to_json` wrote, or says why it cannot.
pub(super) fn settlement_from_json(text: &str) -> Result<CompletedRequest, String> {
    let kept: KeptSettlement = serde_json::from_str(text).map_err(|error| error.to_string())?;
    CompletedRequest::try_from(kept)
}

#[cfg(test)]
pub(super) mod tests {
    use super::*;
    use ledger::core::{MicroUsd, MicroWh, NodeId, OwnerId};
    use ledger::pricing::TenantClass;

    pub(in crate::billing_idempotency) fn request() -> CompletedRequest {
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
        CompletedRequest {
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
        }
    }

    #[test]
    fn a_kept_settlement_reads_back_identically() {
        let request = request();
        let text = settlement_to_json(&request).unwrap();
        assert_eq!(settlement_from_json(&text), Ok(request));
        assert!(settlement_from_json(r#"{"request_id": "x"}"#).is_err());
        assert!(settlement_from_json("null").is_err());
    }

    /// A row kept by the hand-written codec that came before serde.
    #[test]
    fn a_settlement_kept_in_the_first_format_still_reads_back() {
        let first_format = r#"{"admitted_at_ms":1700000000000,"class":"spot",
            "completed_at_ms":1700000000500,"request_id":"chatcmpl-1","segments":[
            {"completion_tokens":7,"compute_ms":345,"energy_uwh":5750,
             "model":"smollm2-135m-instruct","node":"car-1","owner":"alice",
             "prompt_tokens":12,"segment":0,"started_at_ms":1700000000000,
             "tariff_per_kwh":300000},
            {"completion_tokens":7,"compute_ms":345,"energy_uwh":0,
             "model":"smollm2-135m-instruct","node":null,"owner":null,
             "prompt_tokens":12,"segment":1,"started_at_ms":1700000000000,
             "tariff_per_kwh":0}],"tenant":"acme"}"#;
        assert_eq!(settlement_from_json(first_format), Ok(request()));
    }

    #[test]
    fn a_kept_settlement_with_a_bad_id_is_refused() {
        let mut kept = KeptSettlement::from(&request());
        kept.segments[0].owner = None;
        assert!(CompletedRequest::try_from(kept).is_err());
        let mut kept = KeptSettlement::from(&request());
        kept.tenant = String::new();
        assert!(CompletedRequest::try_from(kept).is_err());
    }
}
