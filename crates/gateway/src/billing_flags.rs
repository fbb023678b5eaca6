//! The check of a finishing node's own counts against the coordinator's:
//! settlement always uses the coordinator's counts, and a node whose report
//! strays beyond `METER_TOLERANCE` is flagged for that request.

use ledger::core::{DurationMs, TimestampMs, TokenCount};
use ledger::metering::{compare_report, UsageSegment};
use ledger::store::MeterFlag;

use crate::billing::METER_TOLERANCE;
use crate::billing_meter::Metering;

/// Where the finishing node's own report (`GenerationDone`) strays from the
/// coordinator's count beyond `METER_TOLERANCE`. The node counts the prompt
/// it was sent and every committed token (those it was given on resumption
/// plus its own), so the comparison uses the same totals.
pub fn node_report_flags(metering: &Metering, last: Option<&UsageSegment>) -> Vec<MeterFlag> {
    let (Some(report), Some(last)) = (metering.node_report, last) else {
        return Vec::new();
    };
    let ledger::metering::Server::Node { node, .. } = &last.server else {
        return Vec::new();
    };
    let total_completion: u64 = metering
        .segments
        .iter()
        .map(|segment| u64::from(segment.completion_tokens))
        .sum();
    let counted = UsageSegment {
        prompt_tokens: TokenCount(u64::from(metering.prompt_tokens)),
        completion_tokens: TokenCount(total_completion),
        ..last.clone()
    };
    let node_report = ledger::metering::NodeReport {
        prompt_tokens: TokenCount(u64::from(report.prompt_tokens)),
        completion_tokens: TokenCount(u64::from(report.completion_tokens)),
        compute: DurationMs(report.compute_ms),
    };
    compare_report(&counted, &node_report, METER_TOLERANCE)
        .into_iter()
        .map(|mismatch| MeterFlag {
            request_id: last.request_id.clone(),
            segment: last.segment,
            node: node.clone(),
            field: mismatch.field.to_string(),
            coordinator: mismatch.coordinator,
            node_value: mismatch.node,
            at: TimestampMs(metering.finished_ms),
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use ledger::core::{MicroUsd, ModelId, NodeId, OwnerId, RequestId, Segment};
    use ledger::metering::{meter_node_segment, NodeObservation};

    use super::*;
    use crate::billing_meter::{NodeReport, SegmentTrack};

    /// A generation that ran 4 tokens on car-1, then 6 more on car-2 after
    /// migrating, for a 10-token prompt; car-2 took 2 s.
    fn migrated(report: NodeReport) -> (Metering, UsageSegment) {
        let segment = |node: &str, prefilled, tokens, started| SegmentTrack {
            node: node.to_string(),
            prefilled_tokens: prefilled,
            completion_tokens: tokens,
            started_ms: started,
            last_active_ms: started + 2_000,
            share_started_us: 0,
            share_last_active_us: 2_000_000,
            speed: crate::billing_meter::PaidSpeed::declared(1_000.0, 100.0),
        };
        let metering = Metering {
            prompt_tokens: 10,
            segments: vec![segment("car-1", 10, 4, 0), segment("car-2", 14, 6, 5_000)],
            node_report: Some(report),
            finished_ms: 7_000,
        };
        let last = meter_node_segment(
            NodeObservation {
                request_id: RequestId::new("chatcmpl-1").unwrap(),
                segment: Segment(1),
                node: NodeId::new("car-2").unwrap(),
                owner: OwnerId::new("bob").unwrap(),
                model: ModelId::new("smollm2-135m-instruct").unwrap(),
                prompt_tokens: TokenCount(14),
                completion_tokens: TokenCount(6),
                compute: DurationMs(2_000),
                started_at: TimestampMs(5_000),
            },
            &ledger::metering::PowerProfile {
                watts_idle: 15,
                watts_busy: 60,
            },
            &ledger::metering::TimeOfUseTariff::flat(MicroUsd(300_000)),
        );
        (metering, last)
    }

    #[test]
    fn an_honest_node_report_raises_no_flag() {
        // The resumed node counts the prompt and all ten committed tokens,
        // and its engine was busy for less than our wall time.
        let honest = NodeReport {
            prompt_tokens: 10,
            completion_tokens: 10,
            compute_ms: 1_600,
        };
        let (metering, last) = migrated(honest);
        assert!(node_report_flags(&metering, Some(&last)).is_empty());
    }

    #[test]
    fn an_inflated_node_report_is_flagged_per_field_against_that_node() {
        let inflated = NodeReport {
            prompt_tokens: 10,
            completion_tokens: 12,
            compute_ms: 9_000,
        };
        let (metering, last) = migrated(inflated);
        let flags = node_report_flags(&metering, Some(&last));
        let fields: Vec<(&str, u64, u64)> = flags
            .iter()
            .map(|flag| (flag.field.as_str(), flag.coordinator, flag.node_value))
            .collect();
        assert_eq!(
            fields,
            [("completion_tokens", 10, 12), ("compute_ms", 2_000, 9_000)]
        );
        assert!(flags.iter().all(|flag| flag.node.as_str() == "car-2"));
        assert!(flags.iter().all(|flag| flag.segment == Segment(1)));
    }
}
