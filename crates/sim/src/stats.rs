//! What a run counts: weighted latency histograms, per-class totals, the
//! time series, and money by account.

use serde::Serialize;

/// Buckets per doubling of a latency histogram (about 4.4 % wide).
const BUCKETS_PER_DOUBLING: f64 = 16.0;
/// Buckets: 1 ms to about 2^32 ms.
const BUCKETS: usize = 32 * 16;

/// A latency histogram of weighted samples in milliseconds: fixed size,
/// deterministic, percentiles within one bucket's width.
#[derive(Debug, Clone)]
pub struct Histogram {
    counts: Vec<u64>,
    total: u64,
}

impl Default for Histogram {
    fn default() -> Self {
        Histogram {
            counts: vec![0; BUCKETS],
            total: 0,
        }
    }
}

impl Histogram {
    pub fn add(&mut self, millis: f64, weight: u64) {
        if weight == 0 {
            return;
        }
        let bucket = if millis <= 1.0 {
            0
        } else {
            ((millis.log2() * BUCKETS_PER_DOUBLING) as usize).min(BUCKETS - 1)
        };
        self.counts[bucket] += weight;
        self.total += weight;
    }

    pub fn total(&self) -> u64 {
        self.total
    }

    /// The `permille`th percentile in seconds (the bucket's upper edge); 0
    /// when empty.
    pub fn percentile_seconds(&self, permille: u64) -> f64 {
        if self.total == 0 {
            return 0.0;
        }
        let rank = (self.total * permille).div_ceil(1000).max(1);
        let mut seen = 0;
        for (bucket, count) in self.counts.iter().enumerate() {
            seen += count;
            if seen >= rank {
                let upper = 2f64.powf((bucket + 1) as f64 / BUCKETS_PER_DOUBLING);
                return round3(upper / 1000.0);
            }
        }
        0.0
    }

    pub fn summary(&self) -> Percentiles {
        Percentiles {
            p50: self.percentile_seconds(500),
            p90: self.percentile_seconds(900),
            p99: self.percentile_seconds(990),
        }
    }
}

/// Percentiles in seconds.
#[derive(Debug, Clone, Copy, Serialize)]
pub struct Percentiles {
    pub p50: f64,
    pub p90: f64,
    pub p99: f64,
}

/// Requests and tokens of one tenant class.
#[derive(Debug, Clone, Default)]
pub struct ClassCounts {
    /// Requests that arrived (escalated ones included).
    pub arrived: u64,
    /// Sent to the cloud model by the router.
    pub escalated: u64,
    /// Served to the end by the fleet.
    pub served: u64,
    /// Refused by the scheduler for another reason than a missed deadline, and not retried in
    /// time, by the scheduler's reason (`reason_name`).
    pub refused_by_reason: std::collections::BTreeMap<&'static str, u64>,
    /// Not started before their deadline.
    pub deadline_missed: u64,
    /// Admitted and not finished when the run ended.
    pub unfinished: u64,
    pub fleet_prompt_tokens: u64,
    pub fleet_completion_tokens: u64,
    pub cloud_prompt_tokens: u64,
    pub cloud_completion_tokens: u64,
    pub latency: Histogram,
    pub queueing: Histogram,
}

/// Migrations by cause.
#[derive(Debug, Clone, Copy, Default, Serialize)]
pub struct Migrations {
    /// The car left (unplugged) with work running.
    pub departed: u64,
    /// The car was about to leave, or its owner's limits closed it.
    pub draining: u64,
    /// A higher class took the slot.
    pub preempted: u64,
    pub node_lost: u64,
    pub stalled: u64,
}

impl Migrations {
    pub fn total(&self) -> u64 {
        self.departed + self.draining + self.preempted + self.node_lost + self.stalled
    }
}

/// Money in micro-dollars, by what it is (the settlement's transfers summed,
/// plus what the simulation adds outside the ledger).
#[derive(Debug, Clone, Copy, Default)]
pub struct Money {
    /// Tenants' token charges, per class.
    pub charged: [i64; 3],
    /// The part of `charged` that escalations earned.
    pub cloud_charged: i64,
    pub revenue_share: i64,
    pub energy_reimbursed: i64,
    pub cloud_cost: i64,
    /// Demand-response payments to owners (from the grid programme, not the
    /// platform).
    pub grid_payments: i64,
}

/// One point of the series per step.
#[derive(Debug, Clone, Copy, Default)]
pub struct StepPoint {
    pub plugged_vehicles: u32,
    /// Slots of the vehicles that take work now (the scheduler's count).
    pub available_slots: u64,
    pub busy_slots: u64,
    /// Requests waiting (parked ones included), all classes.
    pub waiting_requests: u64,
    /// Completion tokens delivered in the step, per class.
    pub tokens: [f64; 3],
    /// Compute energy drawn in the step, Wh.
    pub energy_wh: f64,
    /// Its cost at the owners' tariffs, dollars.
    pub energy_cost: f64,
}

/// Per vehicle: what its owner earned, micro-dollars.
#[derive(Debug, Clone, Copy, Default)]
pub struct Earnings {
    pub revenue_share: i64,
    pub energy_reimbursed: i64,
    pub grid_payments: i64,
    /// What its compute's electricity cost the owner at their tariff.
    pub energy_cost: f64,
}

/// The `permille`th percentile of `values` (sorted in place).
pub fn percentile(values: &mut [f64], permille: usize) -> f64 {
    if values.is_empty() {
        return 0.0;
    }
    values.sort_by(f64::total_cmp);
    let rank = (values.len() * permille).div_ceil(1000).max(1);
    values[rank - 1]
}

/// Rounded to three decimals, so reports do not carry float noise.
pub fn round3(value: f64) -> f64 {
    (value * 1000.0).round() / 1000.0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles_fall_within_a_bucket_of_the_weighted_samples() {
        let mut histogram = Histogram::default();
        histogram.add(1_000.0, 90);
        histogram.add(10_000.0, 9);
        histogram.add(100_000.0, 1);
        let p50 = histogram.percentile_seconds(500);
        let p99 = histogram.percentile_seconds(990);
        let p999 = histogram.percentile_seconds(999);
        assert!((1.0..1.05).contains(&p50), "{p50}");
        assert!((10.0..10.5).contains(&p99), "{p99}");
        assert!((100.0..105.0).contains(&p999), "{p999}");
        assert_eq!(Histogram::default().percentile_seconds(500), 0.0);
    }
}
