//! One verification case: the verdicts on one generation and what they decide.
//!
//! A verifier that is itself a vehicle may lie: fail an honest node's answer (to harm a
//! competitor) or pass an accomplice's. So a vehicle's verdict alone decides only a pass that is
//! not drawn for audit. A failure, or an audited pass, goes to a second verifier, a datacenter
//! node where there is one; a datacenter node's verdict decides; two vehicles that disagree call
//! a third and the majority decides. Every vehicle whose verdict the decision contradicts is
//! named, to be quarantined for a false verdict.

use domain::{NodeId, RequestId};

/// What a verifier found.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Verdict {
    Passed,
    Failed,
}

/// Who verified.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Verifier {
    /// A vehicle of `owner`, which must not be the producer's owner nor an earlier verifier's.
    Vehicle { node: NodeId, owner: u64 },
    /// A node of the platform's own, trusted.
    Datacenter,
}

/// What the case needs next.
#[derive(Clone, Debug, PartialEq)]
pub enum CaseStep {
    /// Another verdict, from a verifier none of [`Case::excluded_owners`] owns; a datacenter
    /// node when `prefer_datacenter` and one is available.
    Ask {
        round: u8,
        prefer_datacenter: bool,
    },
    Decided(Decision),
}

/// The outcome of a case.
#[derive(Clone, Debug, PartialEq)]
pub struct Decision {
    pub verdict: Verdict,
    /// Vehicle verifiers whose verdict the decision contradicts.
    pub contradicted: Vec<NodeId>,
}

/// Vehicle verdicts a case collects at most before the majority decides.
const VEHICLE_ROUNDS_MAX: usize = 3;

/// The verdicts on one generation.
#[derive(Clone, Debug, PartialEq)]
pub struct Case {
    pub producer: NodeId,
    pub producer_owner: u64,
    pub generation: RequestId,
    /// A vehicle's pass is checked again.
    audited: bool,
    verdicts: Vec<(Verifier, Verdict)>,
}

impl Case {
    #[must_use]
    pub fn new(
        producer: NodeId,
        producer_owner: u64,
        generation: RequestId,
        audited: bool,
    ) -> Self {
        Case {
            producer,
            producer_owner,
            generation,
            audited,
            verdicts: Vec::new(),
        }
    }

    /// Owners whose vehicles may not verify this case: the producer's and every earlier
    /// verifier's.
    #[must_use]
    pub fn excluded_owners(&self) -> Vec<u64> {
        let mut owners = vec![self.producer_owner];
        owners.extend(
            self.verdicts
                .iter()
                .filter_map(|(verifier, _)| match verifier {
                    Verifier::Vehicle { owner, .. } => Some(*owner),
                    Verifier::Datacenter => None,
                }),
        );
        owners
    }

    pub fn record(&mut self, verifier: Verifier, verdict: Verdict) {
        self.verdicts.push((verifier, verdict));
    }

    /// Verdicts so far, in order.
    #[must_use]
    pub fn verdicts(&self) -> &[(Verifier, Verdict)] {
        &self.verdicts
    }

    #[must_use]
    pub fn next(&self) -> CaseStep {
        if let Some(&(_, verdict)) = self
            .verdicts
            .iter()
            .find(|(verifier, _)| *verifier == Verifier::Datacenter)
        {
            return CaseStep::Decided(self.decided(verdict));
        }
        let ask = |round: usize| CaseStep::Ask {
            round: u8::try_from(round).unwrap_or(u8::MAX),
            prefer_datacenter: round > 0,
        };
        match self.verdicts.as_slice() {
            [] => ask(0),
            [(_, Verdict::Passed)] if !self.audited => {
                CaseStep::Decided(self.decided(Verdict::Passed))
            }
            [_] => ask(1),
            [(_, first), (_, second)] if first == second => CaseStep::Decided(self.decided(*first)),
            verdicts if verdicts.len() < VEHICLE_ROUNDS_MAX => ask(verdicts.len()),
            verdicts => {
                let failed = verdicts
                    .iter()
                    .filter(|(_, verdict)| *verdict == Verdict::Failed)
                    .count();
                let majority = if failed * 2 > verdicts.len() {
                    Verdict::Failed
                } else {
                    Verdict::Passed
                };
                CaseStep::Decided(self.decided(majority))
            }
        }
    }

    /// What to decide when no further verifier can be found: a pass every verdict agrees on
    /// stands; anything else is left undecided (the generation counts as unverified and no one
    /// is quarantined on one vehicle's word).
    #[must_use]
    pub fn without_more_verifiers(&self) -> Option<Decision> {
        let all_passed = !self.verdicts.is_empty()
            && self
                .verdicts
                .iter()
                .all(|(_, verdict)| *verdict == Verdict::Passed);
        all_passed.then(|| self.decided(Verdict::Passed))
    }

    fn decided(&self, verdict: Verdict) -> Decision {
        let contradicted = self
            .verdicts
            .iter()
            .filter_map(|(verifier, given)| match verifier {
                Verifier::Vehicle { node, .. } if *given != verdict => Some(*node),
                _ => None,
            })
            .collect();
        Decision {
            verdict,
            contradicted,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn vehicle(node: u32) -> Verifier {
        Verifier::Vehicle {
            node: NodeId(node),
            owner: u64::from(node) + 100,
        }
    }

    fn case(audited: bool) -> Case {
        Case::new(NodeId(1), 101, RequestId(7), audited)
    }

    #[test]
    fn an_unaudited_vehicle_pass_decides() {
        let mut case = case(false);
        assert_eq!(
            case.next(),
            CaseStep::Ask {
                round: 0,
                prefer_datacenter: false
            }
        );
        case.record(vehicle(2), Verdict::Passed);
        assert_eq!(
            case.next(),
            CaseStep::Decided(Decision {
                verdict: Verdict::Passed,
                contradicted: vec![]
            })
        );
    }

    #[test]
    fn a_vehicle_failure_needs_confirmation_and_a_false_one_is_named() {
        let mut case = case(false);
        case.record(vehicle(2), Verdict::Failed);
        assert_eq!(
            case.next(),
            CaseStep::Ask {
                round: 1,
                prefer_datacenter: true
            }
        );
        assert_eq!(case.excluded_owners(), vec![101, 102]);
        assert_eq!(case.without_more_verifiers(), None);
        case.record(Verifier::Datacenter, Verdict::Passed);
        assert_eq!(
            case.next(),
            CaseStep::Decided(Decision {
                verdict: Verdict::Passed,
                contradicted: vec![NodeId(2)]
            })
        );
    }

    #[test]
    fn an_audit_finds_an_accomplices_pass() {
        let mut case = case(true);
        case.record(vehicle(3), Verdict::Passed);
        assert!(matches!(case.next(), CaseStep::Ask { round: 1, .. }));
        case.record(Verifier::Datacenter, Verdict::Failed);
        assert_eq!(
            case.next(),
            CaseStep::Decided(Decision {
                verdict: Verdict::Failed,
                contradicted: vec![NodeId(3)]
            })
        );
    }

    #[test]
    fn two_vehicles_that_disagree_call_a_third_and_the_majority_decides() {
        let mut case = case(false);
        case.record(vehicle(2), Verdict::Failed);
        case.record(vehicle(3), Verdict::Passed);
        assert!(matches!(case.next(), CaseStep::Ask { round: 2, .. }));
        case.record(vehicle(4), Verdict::Passed);
        assert_eq!(
            case.next(),
            CaseStep::Decided(Decision {
                verdict: Verdict::Passed,
                contradicted: vec![NodeId(2)]
            })
        );
        let mut agreeing = Case::new(NodeId(1), 101, RequestId(8), false);
        agreeing.record(vehicle(2), Verdict::Failed);
        agreeing.record(vehicle(3), Verdict::Failed);
        assert_eq!(
            agreeing.next(),
            CaseStep::Decided(Decision {
                verdict: Verdict::Failed,
                contradicted: vec![]
            })
        );
    }

    #[test]
    fn a_datacenter_verdict_decides_at_once() {
        let mut case = case(false);
        case.record(Verifier::Datacenter, Verdict::Failed);
        assert_eq!(
            case.next(),
            CaseStep::Decided(Decision {
                verdict: Verdict::Failed,
                contradicted: vec![]
            })
        );
    }
}
