//! A node's trust record: probation, trusted with a falling verification rate, or quarantined
//! with the generations whose earnings are suspect.

use std::collections::VecDeque;

use domain::{NodeId, RequestId};

use crate::draw::{self, Purpose, Secret};
use crate::VerificationPolicy;

/// Where a node stands, as the owner API shows it.
#[derive(Clone, Debug, PartialEq)]
pub enum TrustState {
    /// New or released: every generation is verified until `of` pass in a row.
    Probation { passed: u32, of: u32 },
    /// A share `rate` of its generations is verified.
    Trusted { consecutive_passes: u32, rate: f64 },
    /// No new work; unpaid earnings held; the suspect generations' earnings taken back.
    Quarantined { reason: QuarantineReason },
}

/// Why a node was quarantined.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum QuarantineReason {
    /// One of its answers failed verification (confirmed where a vehicle found it).
    FailedVerification { generation: RequestId },
    /// As a verifier, its verdict on another node's answer was contradicted.
    FalseVerdict { generation: RequestId },
    /// It sent a message outside the protocol's bounds.
    ProtocolViolation,
}

impl std::fmt::Display for QuarantineReason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            QuarantineReason::FailedVerification { generation } => {
                write!(f, "generation {} failed verification", generation.0)
            }
            QuarantineReason::FalseVerdict { generation } => write!(
                f,
                "its verdict on generation {} was contradicted",
                generation.0
            ),
            QuarantineReason::ProtocolViolation => f.write_str("it broke the agent protocol"),
        }
    }
}

/// What a quarantine takes back.
#[derive(Clone, Debug, PartialEq)]
pub struct Quarantine {
    pub reason: QuarantineReason,
    /// Generations whose earnings are reversed: the failed one and every unverified one in the
    /// suspect window, oldest first.
    pub suspects: Vec<RequestId>,
}

/// One node's record.
#[derive(Clone, Debug, PartialEq)]
pub struct NodeRecord {
    node: NodeId,
    consecutive_passes: u32,
    quarantined: Option<QuarantineReason>,
    /// Generations served so far; each gets the next ordinal.
    served: u64,
    /// The ordinal of the generation whose verification passed last (0: none).
    last_pass: u64,
    /// Unverified generations, oldest first, with their ordinals.
    unverified: VecDeque<(u64, RequestId)>,
    /// Generations sent for verification and not decided yet, with their ordinals.
    pending: Vec<(u64, RequestId)>,
    /// Totals, for reports.
    pub verified: u64,
    pub passed: u64,
}

impl NodeRecord {
    #[must_use]
    pub fn new(node: NodeId) -> Self {
        NodeRecord {
            node,
            consecutive_passes: 0,
            quarantined: None,
            served: 0,
            last_pass: 0,
            unverified: VecDeque::new(),
            pending: Vec::new(),
            verified: 0,
            passed: 0,
        }
    }

    #[must_use]
    pub fn node(&self) -> NodeId {
        self.node
    }

    #[must_use]
    pub fn state(&self, policy: &VerificationPolicy) -> TrustState {
        if let Some(reason) = self.quarantined {
            return TrustState::Quarantined { reason };
        }
        if self.consecutive_passes < policy.probation {
            return TrustState::Probation {
                passed: self.consecutive_passes,
                of: policy.probation,
            };
        }
        TrustState::Trusted {
            consecutive_passes: self.consecutive_passes,
            rate: policy.rate(self.consecutive_passes),
        }
    }

    #[must_use]
    pub fn is_quarantined(&self) -> bool {
        self.quarantined.is_some()
    }

    /// Whether it may verify other nodes' answers: trusted and not quarantined.
    #[must_use]
    pub fn may_verify(&self, policy: &VerificationPolicy) -> bool {
        self.quarantined.is_none() && self.consecutive_passes >= policy.probation
    }

    #[must_use]
    pub fn served(&self) -> u64 {
        self.served
    }

    /// Records that the node delivered `generation` and decides, by a draw the node cannot
    /// predict, whether it is verified. A verified generation waits for [`NodeRecord::passed`]
    /// or [`NodeRecord::failed`].
    pub fn delivered(
        &mut self,
        policy: &VerificationPolicy,
        secret: &Secret,
        generation: RequestId,
    ) -> bool {
        self.served += 1;
        let ordinal = self.served;
        let rate = policy.rate(self.consecutive_passes);
        let verify = draw::below(secret, Purpose::Verify, self.node, generation, rate);
        if verify {
            self.pending.push((ordinal, generation));
        } else {
            self.unverified.push_back((ordinal, generation));
        }
        self.forget(policy);
        verify
    }

    /// `generation`'s verification passed.
    pub fn passed(&mut self, policy: &VerificationPolicy, generation: RequestId) {
        let Some(ordinal) = self.take_pending(generation) else {
            return;
        };
        self.verified += 1;
        self.passed += 1;
        if self.quarantined.is_none() {
            self.consecutive_passes = self.consecutive_passes.saturating_add(1);
        }
        self.last_pass = self.last_pass.max(ordinal);
        self.forget(policy);
    }

    /// `generation`'s verification could not be decided (no verifier was available): it counts
    /// as unverified.
    pub fn undecided(&mut self, policy: &VerificationPolicy, generation: RequestId) {
        let Some(ordinal) = self.take_pending(generation) else {
            return;
        };
        let at = self
            .unverified
            .partition_point(|&(earlier, _)| earlier < ordinal);
        self.unverified.insert(at, (ordinal, generation));
        self.forget(policy);
    }

    /// `generation`'s verification failed: the node is quarantined, and the failed generation
    /// and every unverified one in the suspect window are named for clawback. `None` when the
    /// generation was not waiting for a verdict (decided already, or never drawn).
    pub fn failed(
        &mut self,
        policy: &VerificationPolicy,
        generation: RequestId,
    ) -> Option<Quarantine> {
        let ordinal = self.take_pending(generation)?;
        self.verified += 1;
        let reason = QuarantineReason::FailedVerification { generation };
        Some(self.quarantine_with(policy, reason, Some((ordinal, generation))))
    }

    /// Quarantines the node for `reason` (a false verdict as a verifier, a protocol violation),
    /// naming the unverified generations of the suspect window.
    pub fn quarantine(
        &mut self,
        policy: &VerificationPolicy,
        reason: QuarantineReason,
    ) -> Quarantine {
        self.quarantine_with(policy, reason, None)
    }

    /// Quarantines the node; the suspects are the unverified generations of the window and
    /// `failed`, in the order they were served.
    fn quarantine_with(
        &mut self,
        policy: &VerificationPolicy,
        reason: QuarantineReason,
        failed: Option<(u64, RequestId)>,
    ) -> Quarantine {
        self.quarantined = Some(reason);
        self.consecutive_passes = 0;
        let since = self.suspect_since(policy);
        let mut suspects: Vec<(u64, RequestId)> = self
            .unverified
            .drain(..)
            .filter(|&(ordinal, _)| ordinal > since)
            .chain(failed)
            .collect();
        suspects.sort_unstable();
        Quarantine {
            reason,
            suspects: suspects
                .into_iter()
                .map(|(_, generation)| generation)
                .collect(),
        }
    }

    /// Unverified generations served after this ordinal are suspect.
    fn suspect_since(&self, policy: &VerificationPolicy) -> u64 {
        self.last_pass
            .min(self.served.saturating_sub(u64::from(policy.suspect_window)))
    }

    /// The operator lifts the quarantine: the node starts probation again.
    pub fn release(&mut self) {
        self.quarantined = None;
        self.consecutive_passes = 0;
    }

    fn take_pending(&mut self, generation: RequestId) -> Option<u64> {
        let index = self
            .pending
            .iter()
            .position(|&(_, pending)| pending == generation)?;
        Some(self.pending.swap_remove(index).0)
    }

    /// Drops unverified generations no quarantine could name any more, and the oldest beyond
    /// [`VerificationPolicy::remembered_max`]; a verification never decided is given up as
    /// unverified once that many are waiting.
    fn forget(&mut self, policy: &VerificationPolicy) {
        if self.pending.len() > policy.remembered_max {
            let oldest = (0..self.pending.len()).min_by_key(|&index| self.pending[index].0);
            if let Some(index) = oldest {
                let given_up = self.pending.swap_remove(index);
                let at = self
                    .unverified
                    .partition_point(|&(ordinal, _)| ordinal < given_up.0);
                self.unverified.insert(at, given_up);
            }
        }
        let since = self.suspect_since(policy);
        while self
            .unverified
            .front()
            .is_some_and(|&(ordinal, _)| ordinal <= since)
            || self.unverified.len() > policy.remembered_max
        {
            self.unverified.pop_front();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy() -> VerificationPolicy {
        VerificationPolicy::default()
    }

    /// Delivers generations `from..to`, passing every verified one; returns the unverified.
    fn honest_run(record: &mut NodeRecord, secret: &Secret, from: u64, to: u64) -> Vec<RequestId> {
        let mut unverified = Vec::new();
        for id in from..to {
            let generation = RequestId(id);
            if record.delivered(&policy(), secret, generation) {
                record.passed(&policy(), generation);
            } else {
                unverified.push(generation);
            }
        }
        unverified
    }

    #[test]
    fn a_new_node_is_verified_until_its_probation_ends_then_less_and_less() {
        let secret = Secret::from_seed(1);
        let mut record = NodeRecord::new(NodeId(1));
        assert_eq!(
            record.state(&policy()),
            TrustState::Probation { passed: 0, of: 10 }
        );
        let unverified = honest_run(&mut record, &secret, 0, 10);
        assert!(unverified.is_empty());
        assert!(matches!(
            record.state(&policy()),
            TrustState::Trusted {
                consecutive_passes: 10,
                ..
            }
        ));
        assert!(record.may_verify(&policy()));
        let unverified = honest_run(&mut record, &secret, 10, 20_010);
        let verified = 20_000 - unverified.len();
        // Rates 1/10 falling to 3 %: a few percent of 20,000 over the floor.
        assert!((600..1_200).contains(&verified), "{verified}");
    }

    #[test]
    fn a_failure_quarantines_and_names_the_unverified_generations_since_the_last_pass() {
        let secret = Secret::from_seed(2);
        let mut record = NodeRecord::new(NodeId(4));
        honest_run(&mut record, &secret, 0, 5_000);
        // It turns to cheating: everything from now on is suspect.
        let mut cheated = Vec::new();
        let caught = loop {
            let generation = RequestId(5_000 + cheated.len() as u64);
            let verified = record.delivered(&policy(), &secret, generation);
            cheated.push(generation);
            if verified {
                break record.failed(&policy(), generation).expect("pending");
            }
        };
        assert_eq!(
            caught.reason,
            QuarantineReason::FailedVerification {
                generation: *cheated.last().unwrap()
            }
        );
        // Every cheated generation is named; so are the unverified ones of the last 200 served.
        for generation in &cheated {
            assert!(caught.suspects.contains(generation), "{generation:?}");
        }
        assert!(caught.suspects.len() >= cheated.len());
        assert!(caught.suspects.len() <= 200 + cheated.len());
        assert!(caught.suspects.windows(2).all(|pair| pair[0].0 < pair[1].0));
        assert!(record.is_quarantined());
        assert!(!record.may_verify(&policy()));
        assert!(matches!(
            record.state(&policy()),
            TrustState::Quarantined { .. }
        ));
        // A verdict on a generation that was never pending changes nothing.
        assert_eq!(record.failed(&policy(), RequestId(1)), None);
    }

    #[test]
    fn a_cheater_from_the_start_is_caught_on_its_first_generation() {
        let secret = Secret::from_seed(3);
        let mut record = NodeRecord::new(NodeId(9));
        assert!(record.delivered(&policy(), &secret, RequestId(0)));
        let caught = record.failed(&policy(), RequestId(0)).unwrap();
        assert_eq!(caught.suspects, vec![RequestId(0)]);
    }

    #[test]
    fn a_released_node_starts_probation_again() {
        let secret = Secret::from_seed(4);
        let mut record = NodeRecord::new(NodeId(2));
        honest_run(&mut record, &secret, 0, 100);
        record.quarantine(&policy(), QuarantineReason::ProtocolViolation);
        assert!(!record.may_verify(&policy()));
        record.release();
        assert_eq!(
            record.state(&policy()),
            TrustState::Probation { passed: 0, of: 10 }
        );
        assert!(record.delivered(&policy(), &secret, RequestId(1_000)));
    }

    #[test]
    fn memory_stays_bounded() {
        let secret = Secret::from_seed(6);
        let mut record = NodeRecord::new(NodeId(2));
        honest_run(&mut record, &secret, 0, 10);
        // Verifications never decided, and long unverified runs.
        for id in 10..100_000 {
            record.delivered(&policy(), &secret, RequestId(id));
        }
        assert!(record.pending.len() <= policy().remembered_max);
        assert!(record.unverified.len() <= policy().remembered_max);
    }
}
