//! The scenario turned into the numbers the run needs at every event: how
//! fast and how hungry each vehicle class is at each batch size, what a
//! request of each tenant class costs in work, and what electricity costs at
//! each hour.
//!
//! Work is counted in *reference seconds*: the time one generation alone
//! (batch 1) takes on the reference machine. A vehicle of class `h` running
//! `c` generations advances each of them by
//! `speed_vs_reference × gain(c) / c` reference seconds per second, where
//! `gain(c)` is the reference curve's aggregate decode rate at batch `c` over
//! its rate at batch 1 (linear between measured points, flat beyond the last).

use scheduler::sim::SimRng;

use crate::scenario::{ReferenceCurve, Scenario, TariffSpec};

/// A vehicle class's speed and power at every batch size it runs.
#[derive(Debug, Clone)]
pub struct ClassModel {
    pub name: String,
    pub slots: u16,
    /// Reference seconds per second for each of `c` generations, index `c`
    /// (index 0 unused).
    pub per_stream_speed: Vec<f64>,
    /// Draw in W at `c` generations (0 at none: the computer sleeps).
    pub watts: Vec<f64>,
    /// What the scheduler is told: decode and prefill tokens/s of one
    /// generation at full batch.
    pub decode_tokens_per_second: f32,
    pub prefill_tokens_per_second: f32,
}

/// What one request of a tenant class asks for.
#[derive(Debug, Clone)]
pub struct ClassWork {
    pub prompt_tokens: u32,
    pub answer_tokens: u32,
    /// Reference seconds of one request alone: prefill plus decode.
    pub reference_seconds: f64,
    /// Reference seconds a resumed request spends prefilling again: its
    /// prompt and, on average, half its answer.
    pub reprefill_seconds: f64,
}

/// A tariff in micro-dollars per kWh by local hour, with a dynamic tariff's
/// factor for every hour of every simulated day.
#[derive(Debug, Clone)]
pub struct TariffModel {
    pub per_kwh_by_hour: [f64; 24],
    daily_sd: f64,
    /// `(day, hour)` factors of the days drawn so far (1.0 for fixed ones).
    factors: Vec<[f64; 24]>,
}

/// Aggregate decode rate at batch `c` on the reference curve.
pub fn reference_decode(curve: &ReferenceCurve, batch: u16) -> f64 {
    let points = &curve.points;
    let batch = f64::from(batch);
    let mut previous = points[0];
    for point in points {
        let at = f64::from(point.batch);
        if at >= batch {
            if point.batch == previous.batch {
                return point.decode_tokens_per_second;
            }
            let from = f64::from(previous.batch);
            let share = (batch - from) / (at - from);
            return previous.decode_tokens_per_second
                + share * (point.decode_tokens_per_second - previous.decode_tokens_per_second);
        }
        previous = *point;
    }
    previous.decode_tokens_per_second
}

impl ClassModel {
    pub fn new(scenario: &Scenario, index: usize) -> ClassModel {
        let class = &scenario.vehicle_classes[index];
        let curve = &scenario.reference;
        let single = reference_decode(curve, 1);
        let slots = class.max_batch;
        let mut per_stream_speed = vec![0.0];
        let mut watts = vec![0.0];
        for batch in 1..=slots {
            let gain = reference_decode(curve, batch) / single;
            per_stream_speed.push(class.speed_vs_reference * gain / f64::from(batch));
            let busy = if slots == 1 {
                1.0
            } else {
                f64::from(batch - 1) / f64::from(slots - 1)
            };
            watts.push(
                class.watts_one_stream + (class.watts_full_batch - class.watts_one_stream) * busy,
            );
        }
        let full = reference_decode(curve, slots) / f64::from(slots);
        ClassModel {
            name: class.name.clone(),
            slots,
            per_stream_speed,
            watts,
            decode_tokens_per_second: (full * class.speed_vs_reference) as f32,
            prefill_tokens_per_second: (curve.points[0].prefill_tokens_per_second
                * class.speed_vs_reference) as f32,
        }
    }
}

impl ClassWork {
    pub fn new(scenario: &Scenario, prompt: u32, answer: u32) -> ClassWork {
        let point = scenario.reference.points[0];
        let prefill = f64::from(prompt) / point.prefill_tokens_per_second;
        let decode = f64::from(answer) / point.decode_tokens_per_second;
        ClassWork {
            prompt_tokens: prompt,
            answer_tokens: answer,
            reference_seconds: prefill + decode,
            reprefill_seconds: (f64::from(prompt) + f64::from(answer) / 2.0)
                / point.prefill_tokens_per_second,
        }
    }
}

impl TariffModel {
    pub fn new(spec: &TariffSpec) -> TariffModel {
        let mut per_kwh_by_hour = [0.0; 24];
        for (hour, price) in per_kwh_by_hour.iter_mut().enumerate() {
            let given = spec
                .per_kwh_by_hour
                .get(hour)
                .or(spec.per_kwh_by_hour.first());
            *price = given.copied().unwrap_or(0.0);
        }
        TariffModel {
            per_kwh_by_hour,
            daily_sd: spec.daily_sd,
            factors: Vec::new(),
        }
    }

    /// Draws the factors of day `day` (days are drawn in order, from 0).
    pub fn draw_day(&mut self, rng: &mut SimRng) {
        let mut factors = [1.0; 24];
        if self.daily_sd > 0.0 {
            for factor in &mut factors {
                *factor = (1.0 + self.daily_sd * standard_normal(rng)).max(0.0);
            }
        }
        self.factors.push(factors);
    }

    /// Dollars per kWh at hour `hour` of day `day`.
    pub fn price(&self, day: usize, hour: usize) -> f64 {
        let factor = self
            .factors
            .get(day)
            .map_or(1.0, |factors| factors[hour % 24]);
        self.per_kwh_by_hour[hour % 24] * factor
    }

    /// The mean over the day of the fixed prices.
    pub fn mean_price(&self) -> f64 {
        self.per_kwh_by_hour.iter().sum::<f64>() / 24.0
    }
}

/// Uniform in `[0, 1)`.
pub fn unit(rng: &mut SimRng) -> f64 {
    (rng.next_u64() >> 11) as f64 / (1u64 << 53) as f64
}

/// N(0, 1), Box–Muller, truncated to ±3.
pub fn standard_normal(rng: &mut SimRng) -> f64 {
    let u = unit(rng).max(f64::MIN_POSITIVE);
    let v = unit(rng);
    let z = (-2.0 * u.ln()).sqrt() * (std::f64::consts::TAU * v).cos();
    z.clamp(-3.0, 3.0)
}

/// An index drawn by `shares` (not necessarily summing to 1).
pub fn pick(rng: &mut SimRng, shares: impl Iterator<Item = f64> + Clone) -> usize {
    let total: f64 = shares.clone().sum();
    let mut at = unit(rng) * total;
    let mut last = 0;
    for (index, share) in shares.enumerate() {
        if share > 0.0 {
            last = index;
            if at < share {
                return index;
            }
            at -= share;
        }
    }
    last
}

/// A seed for `(seed, what, index)`, so that every vehicle and day draws from
/// its own stream and adding vehicles changes none of the others.
pub fn substream(seed: u64, what: u64, index: u64) -> SimRng {
    let mut mix = SimRng::new(seed ^ what.wrapping_mul(0x9E37_79B9_7F4A_7C15));
    let a = mix.next_u64();
    SimRng::new(a ^ index.wrapping_mul(0xD1B5_4A32_D192_ED03))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn speed_per_stream_falls_with_batch_and_the_aggregate_follows_the_measured_curve() {
        let scenario = Scenario::default_scenario();
        let hw3 = ClassModel::new(&scenario, 0);
        assert_eq!(hw3.slots, 8);
        assert!((hw3.per_stream_speed[1] - 3.8).abs() < 1e-9);
        let aggregate = |c: usize| hw3.per_stream_speed[c] * c as f64;
        for batch in 2..=8 {
            assert!(hw3.per_stream_speed[batch] < hw3.per_stream_speed[batch - 1]);
            // The measured 1.5B gains up to 4 streams and loses some beyond.
            if batch <= 4 {
                assert!(aggregate(batch) > aggregate(batch - 1));
            } else {
                assert!(aggregate(batch) < aggregate(batch - 1));
            }
        }
        let gain = |c: usize| aggregate(c) / aggregate(1);
        assert!((gain(4) - 26.7 / 22.9).abs() < 1e-9);
        assert!((gain(8) - 23.6 / 22.9).abs() < 1e-9);
        // Between measured points the curve is linear: batch 2 is a third of
        // the way from 1 to 4.
        let two = reference_decode(&scenario.reference, 2);
        assert!((two - (22.9 + (26.7 - 22.9) / 3.0)).abs() < 1e-9);
        // Beyond the last point there is no further gain.
        assert_eq!(reference_decode(&scenario.reference, 16), 23.6);
        assert_eq!(hw3.watts[1], 40.0);
        assert_eq!(hw3.watts[8], 72.0);
    }

    #[test]
    fn a_dynamic_tariff_moves_by_day_and_a_fixed_one_does_not() {
        let scenario = Scenario::default_scenario();
        let mut rng = SimRng::new(7);
        let mut fixed = TariffModel::new(&scenario.tariffs[2]);
        let mut dynamic = TariffModel::new(&scenario.tariffs[3]);
        for _ in 0..2 {
            fixed.draw_day(&mut rng);
            dynamic.draw_day(&mut rng);
        }
        assert_eq!(fixed.price(0, 17), 0.60);
        assert_eq!(fixed.price(1, 17), 0.60);
        assert_ne!(dynamic.price(0, 17), dynamic.price(1, 17));
    }
}
