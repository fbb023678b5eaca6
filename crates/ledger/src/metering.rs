//! Metering: what each segment of a request used, counted by the coordinator.
//!
//! A request runs as one or more segments (one per node it ran on, or the
//! cloud). For each, the coordinator records prompt tokens prefilled,
//! completion tokens produced, compute time, and for fleet nodes the energy
//! drawn (from the node's power profile) and the owner's electricity tariff at
//! that hour. Nodes are not trusted: a node's own report is only compared with
//! these counts, and a mismatch beyond tolerance is flagged.

use crate::core::{
    BasisPoints, DurationMs, MicroUsd, MicroWh, ModelId, NodeId, OwnerId, RequestId, Segment,
    TimestampMs, TokenCount,
};

/// How much power a node draws.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PowerProfile {
    pub watts_idle: u32,
    pub watts_busy: u32,
}

impl PowerProfile {
    /// Energy of `compute` time of work: the busy draw for that time, rounded
    /// down. `compute` is the segment's share of the node's busy time (the
    /// coordinator divides each moment among the generations running on the
    /// node), so concurrent segments are not charged the same watts twice. The idle
    /// draw is the vehicle's baseline while awake and is not billed per request.
    pub fn segment_energy(&self, compute: DurationMs) -> MicroWh {
        // W × ms = mJ; 1 µWh = 3.6 mJ.
        let millijoules = u128::from(self.watts_busy) * u128::from(compute.0);
        MicroWh(u64::try_from(millijoules * 10 / 36).unwrap_or(u64::MAX))
    }
}

/// An owner's electricity tariff by hour of the owner's local day.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TimeOfUseTariff {
    /// The owner's offset from UTC, so "off-peak from 22:00" means local time.
    pub utc_offset_minutes: i32,
    /// Price per kWh for each local hour, 0 = midnight to 1 am.
    pub per_kwh_by_hour: [MicroUsd; 24],
}

impl TimeOfUseTariff {
    pub fn flat(per_kwh: MicroUsd) -> TimeOfUseTariff {
        TimeOfUseTariff {
            utc_offset_minutes: 0,
            per_kwh_by_hour: [per_kwh; 24],
        }
    }

    /// The price per kWh in force at `at`.
    pub fn per_kwh_at(&self, at: TimestampMs) -> MicroUsd {
        let local =
            at.0.saturating_add(i64::from(self.utc_offset_minutes) * 60_000);
        let hour = local.div_euclid(TimestampMs::PER_HOUR).rem_euclid(24);
        // rem_euclid(24) is in 0..24, so the index is in bounds.
        self.per_kwh_by_hour[hour as usize]
    }

    /// The price per kWh averaged over the day's 24 hours.
    pub fn day_mean_per_kwh(&self) -> MicroUsd {
        let sum: i64 = self.per_kwh_by_hour.iter().map(|price| price.0).sum();
        MicroUsd(sum / 24)
    }
}

/// Where a segment ran.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Server {
    Node {
        node: NodeId,
        owner: OwnerId,
        /// Energy the node used for this segment.
        energy: MicroWh,
        /// The owner's tariff when the segment started.
        tariff_per_kwh: MicroUsd,
    },
    Cloud,
}

/// Node id, owner id, energy in µWh and tariff in µUSD per kWh: a `Server`
/// as the flat fields a stored row or a kept settlement holds (no ids and
/// zeros for the cloud).
pub type ServerColumns = (Option<String>, Option<String>, u64, i64);

impl Server {
    /// The flat fields this server is stored as.
    pub fn columns(&self) -> ServerColumns {
        match self {
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
        }
    }

    /// Reads back what `columns` wrote, checking both ids; a node without
    /// an owner, or the reverse, is refused.
    pub fn from_columns(
        (node, owner, energy_uwh, tariff_per_kwh): ServerColumns,
    ) -> Result<Server, String> {
        match (node, owner) {
            (Some(node), Some(owner)) => Ok(Server::Node {
                node: NodeId::new(node).map_err(|error| format!("node id: {error}"))?,
                owner: OwnerId::new(owner).map_err(|error| format!("owner id: {error}"))?,
                energy: MicroWh(energy_uwh),
                tariff_per_kwh: MicroUsd(tariff_per_kwh),
            }),
            (None, None) => Ok(Server::Cloud),
            _ => Err("a segment with a node but no owner, or the reverse".into()),
        }
    }
}

/// The coordinator's count of one segment of a request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UsageSegment {
    pub request_id: RequestId,
    pub segment: Segment,
    pub server: Server,
    /// The model that served this segment (fleet or upstream).
    pub model: ModelId,
    /// Tokens this segment prefilled: the prompt on segment 0; on a later
    /// segment, the re-prefill of prompt plus tokens generated so far.
    pub prompt_tokens: TokenCount,
    /// Tokens this segment generated and delivered.
    pub completion_tokens: TokenCount,
    pub compute: DurationMs,
    pub started_at: TimestampMs,
}

/// What the coordinator observed of a segment on a fleet node.
#[derive(Debug, Clone)]
pub struct NodeObservation {
    pub request_id: RequestId,
    pub segment: Segment,
    pub node: NodeId,
    pub owner: OwnerId,
    pub model: ModelId,
    pub prompt_tokens: TokenCount,
    pub completion_tokens: TokenCount,
    pub compute: DurationMs,
    pub started_at: TimestampMs,
}

/// Turns an observation into a usage record, pricing energy with the node's
/// power profile and the owner's tariff at the segment's start.
pub fn meter_node_segment(
    observed: NodeObservation,
    power: &PowerProfile,
    tariff: &TimeOfUseTariff,
) -> UsageSegment {
    UsageSegment {
        server: Server::Node {
            node: observed.node,
            owner: observed.owner,
            energy: power.segment_energy(observed.compute),
            tariff_per_kwh: tariff.per_kwh_at(observed.started_at),
        },
        request_id: observed.request_id,
        segment: observed.segment,
        model: observed.model,
        prompt_tokens: observed.prompt_tokens,
        completion_tokens: observed.completion_tokens,
        compute: observed.compute,
        started_at: observed.started_at,
    }
}

/// A node's own account of a segment.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct NodeReport {
    pub prompt_tokens: TokenCount,
    pub completion_tokens: TokenCount,
    pub compute: DurationMs,
}

/// How far a node's report may stray before it is flagged.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MeterTolerance {
    /// Token counts may differ by this many (a token in flight at a cut-over).
    pub tokens: u64,
    /// Compute time may differ by this fraction of the coordinator's count
    /// (clocks on two machines never agree exactly).
    pub compute: BasisPoints,
    /// ...and always by this many milliseconds, so that a segment of a few
    /// milliseconds is not flagged for scheduling jitter.
    pub compute_ms_min: u64,
}

/// A field on which node and coordinator disagree beyond tolerance.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MeterMismatch {
    pub field: &'static str,
    pub coordinator: u64,
    pub node: u64,
}

/// Compares a node's report with the coordinator's count. Settlement always
/// uses the coordinator's count; a non-empty result marks the node for review.
pub fn compare_report(
    counted: &UsageSegment,
    report: &NodeReport,
    tolerance: MeterTolerance,
) -> Vec<MeterMismatch> {
    let compute_slack = (counted.compute.0 * u64::from(tolerance.compute.0)
        / u64::from(BasisPoints::WHOLE))
    .max(tolerance.compute_ms_min);
    let checks = [
        (
            "prompt_tokens",
            counted.prompt_tokens.0,
            report.prompt_tokens.0,
            tolerance.tokens,
        ),
        (
            "completion_tokens",
            counted.completion_tokens.0,
            report.completion_tokens.0,
            tolerance.tokens,
        ),
        (
            "compute_ms",
            counted.compute.0,
            report.compute.0,
            compute_slack,
        ),
    ];
    checks
        .into_iter()
        .filter(|(_, coordinator, node, slack)| coordinator.abs_diff(*node) > *slack)
        .map(|(field, coordinator, node, _)| MeterMismatch {
            field,
            coordinator,
            node,
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn energy_is_busy_power_times_compute_time() {
        let power = PowerProfile {
            watts_idle: 20,
            watts_busy: 72,
        };
        // 72 W for 1 h = 72 Wh.
        assert_eq!(
            power.segment_energy(DurationMs(3_600_000)),
            MicroWh(72_000_000)
        );
        // 30 W for 100 ms = 0.8333 mWh, rounded down to 833 µWh.
        let small = PowerProfile {
            watts_idle: 5,
            watts_busy: 30,
        };
        assert_eq!(small.segment_energy(DurationMs(100)), MicroWh(833));
    }

    #[test]
    fn the_tariff_follows_the_owners_local_hour() {
        let mut per_kwh_by_hour = [MicroUsd(300_000); 24];
        per_kwh_by_hour[1] = MicroUsd(100_000);
        let tariff = TimeOfUseTariff {
            utc_offset_minutes: 120,
            per_kwh_by_hour,
        };
        // 23:30 UTC is 01:30 local at UTC+2.
        let at = TimestampMs(23 * 3_600_000 + 1_800_000);
        assert_eq!(tariff.per_kwh_at(at), MicroUsd(100_000));
        assert_eq!(tariff.per_kwh_at(TimestampMs(0)), MicroUsd(300_000));
    }

    #[test]
    fn a_report_beyond_tolerance_is_flagged_per_field() {
        let counted = UsageSegment {
            request_id: RequestId::new("r").unwrap(),
            segment: Segment(0),
            server: Server::Cloud,
            model: ModelId::new("m").unwrap(),
            prompt_tokens: TokenCount(100),
            completion_tokens: TokenCount(50),
            compute: DurationMs(1_000),
            started_at: TimestampMs(0),
        };
        let tolerance = MeterTolerance {
            tokens: 1,
            compute: BasisPoints(500),
            compute_ms_min: 10,
        };
        let honest = NodeReport {
            prompt_tokens: TokenCount(100),
            completion_tokens: TokenCount(51),
            compute: DurationMs(1_050),
        };
        assert!(compare_report(&counted, &honest, tolerance).is_empty());
        let inflated = NodeReport {
            completion_tokens: TokenCount(60),
            compute: DurationMs(1_051),
            ..honest
        };
        let fields: Vec<_> = compare_report(&counted, &inflated, tolerance)
            .into_iter()
            .map(|mismatch| mismatch.field)
            .collect();
        assert_eq!(fields, ["completion_tokens", "compute_ms"]);
    }
}
