//! The parameters of verification, with the reasons for their defaults (docs/VERIFICATION.md
//! has the measurements behind them).

/// How often generations are verified and how much a failure takes back.
#[derive(Clone, Debug, PartialEq)]
pub struct VerificationPolicy {
    /// Consecutive passed verifications a new (or released) node needs before it is trusted;
    /// until then every generation is verified. BOINC's adaptive replication uses 10.
    pub probation: u32,
    /// The least share of a trusted node's generations verified, however long its record. A
    /// node that turns to cheating after a long honest record is verified at this rate, so it
    /// is caught within 200 generations with probability `1 − (1 − floor·d)^200`, `d` being
    /// the share of its bad answers one check catches: 0.03 gives 99.8 % at `d` = 1 and 99.2 %
    /// at `d` = 0.8, for a steady-state overhead of 3 % of generations re-checked by prefill.
    pub floor: f64,
    /// Share of passes by a vehicle verifier that a second verifier checks again: what finds a
    /// verifier passing its accomplice's answers.
    pub audit: f64,
    /// Generations back from a failure whose unverified earnings are taken back in any case,
    /// even past the node's last pass: the target for catching a cheater is 200 of its
    /// generations, so at least that many are presumed cheated.
    pub suspect_window: u32,
    /// Most unverified generations a record remembers; older ones are forgotten (at the floor
    /// rate, a node goes unverified this long with probability below 1e-13).
    pub remembered_max: usize,
}

impl Default for VerificationPolicy {
    fn default() -> Self {
        VerificationPolicy {
            probation: 10,
            floor: 0.03,
            audit: 0.1,
            suspect_window: 200,
            remembered_max: 1_000,
        }
    }
}

impl VerificationPolicy {
    /// The share of a node's generations verified after `consecutive_passes` passes in a row.
    #[must_use]
    pub fn rate(&self, consecutive_passes: u32) -> f64 {
        if consecutive_passes < self.probation {
            return 1.0;
        }
        (1.0 / f64::from(consecutive_passes.max(1))).clamp(self.floor.clamp(0.0, 1.0), 1.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn probation_verifies_everything_then_the_rate_falls_to_the_floor() {
        let policy = VerificationPolicy::default();
        for passes in 0..policy.probation {
            assert_eq!(policy.rate(passes), 1.0);
        }
        assert_eq!(policy.rate(10), 0.1);
        assert_eq!(policy.rate(20), 0.05);
        assert_eq!(policy.rate(1_000), policy.floor);
        let mut previous = 1.0;
        for passes in 0..500 {
            let rate = policy.rate(passes);
            assert!(rate <= previous && rate >= policy.floor);
            previous = rate;
        }
    }
}
