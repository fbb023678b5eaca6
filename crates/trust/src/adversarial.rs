//! A fleet with cheaters under the verification policy: who is caught, how soon, what it costs
//! (`fleetgrid bench verification`).
//!
//! Every live node serves one generation per round. Each generation goes through the
//! production [`NodeRecord`] (is it verified?) and [`Case`] (who verifies, what is decided), with
//! verifiers drawn by [`crate::draw`] from trusted vehicles of other owners and, with
//! [`AdversarialConfig::datacenter_share`], datacenter nodes. What the simulation adds is
//! behaviour:
//!
//! - an honest node's answers pass every honest check (`honest_failure` sets a false-failure
//!   rate to see what one would do);
//! - a cheater's bad answer fails an honest check with its kind's detection probability
//!   ([`CheatKind::detection`], measured on the real model where the kind could be measured,
//!   docs/VERIFICATION.md);
//! - a cheater asked to verify passes everything without computing (it saves the compute);
//! - a colluding pair passes each other's answers and fails every other node's, to get honest
//!   competitors quarantined.
//!
//! Inflated `compute_ms` is not a token cheat: billing compares every generation's reported
//! compute with the cell's own share clock, so it is caught on the first report, verified or
//! not.
//!
//! Deterministic: the same configuration and seed give the same report.

use domain::{NodeId, RequestId};
use sha2::{Digest, Sha256};

use crate::case::{Case, CaseStep, Verdict, Verifier};
use crate::draw::{self, Purpose, Secret};
use crate::{NodeRecord, VerificationPolicy};

/// The ways a node can cheat.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum CheatKind {
    SmallerModel,
    CoarserQuantization,
    RandomTokens,
    ReplayedAnswers,
    TruncatedAnswers,
    InflatedComputeMs,
}

impl CheatKind {
    pub const ALL: [CheatKind; 6] = [
        CheatKind::SmallerModel,
        CheatKind::CoarserQuantization,
        CheatKind::RandomTokens,
        CheatKind::ReplayedAnswers,
        CheatKind::TruncatedAnswers,
        CheatKind::InflatedComputeMs,
    ];

    #[must_use]
    pub fn name(self) -> &'static str {
        match self {
            CheatKind::SmallerModel => "smaller model",
            CheatKind::CoarserQuantization => "coarser quantization",
            CheatKind::RandomTokens => "random tokens",
            CheatKind::ReplayedAnswers => "replayed answers",
            CheatKind::TruncatedAnswers => "truncated answers",
            CheatKind::InflatedComputeMs => "inflated compute_ms",
        }
    }
}

/// The probability that one check of a bad answer of each kind fails it.
#[derive(Clone, Debug, PartialEq)]
pub struct Detection {
    pub smaller_model: f64,
    pub coarser_quantization: f64,
    pub random_tokens: f64,
    pub replayed_answers: f64,
    pub truncated_answers: f64,
}

impl Detection {
    #[must_use]
    pub fn of(&self, kind: CheatKind) -> f64 {
        match kind {
            CheatKind::SmallerModel => self.smaller_model,
            CheatKind::CoarserQuantization => self.coarser_quantization,
            CheatKind::RandomTokens => self.random_tokens,
            CheatKind::ReplayedAnswers => self.replayed_answers,
            CheatKind::TruncatedAnswers => self.truncated_answers,
            // Billing compares every report; not a verification outcome.
            CheatKind::InflatedComputeMs => 1.0,
        }
    }
}

impl Default for Detection {
    /// Shares of bad answers the engine's check failed in the real-model measurements
    /// (docs/VERIFICATION.md, "What a check catches").
    fn default() -> Self {
        Detection {
            smaller_model: 1.0,
            coarser_quantization: 1.0,
            random_tokens: 1.0,
            replayed_answers: 1.0,
            truncated_answers: 1.0,
        }
    }
}

/// The simulated fleet.
#[derive(Clone, Debug, PartialEq)]
pub struct AdversarialConfig {
    pub nodes: u32,
    /// Rounds; every live node serves one generation per round.
    pub rounds: u32,
    /// Share of nodes that cheat, spread evenly over the six kinds.
    pub cheater_share: f64,
    /// Of the cheaters, the share that serves honestly for [`AdversarialConfig::honest_prefix`]
    /// generations first, to earn trust and a low verification rate.
    pub late_share: f64,
    pub honest_prefix: u32,
    /// Share of its generations a cheater cheats on.
    pub cheat_rate: f64,
    /// Colluding pairs, on top of the cheaters: both cheat (random kinds among the token cheats),
    /// pass each other's answers and fail everyone else's.
    pub colluding_pairs: u32,
    /// Share of first verifications done by a datacenter node; confirmations and audits go to
    /// one whenever this is above zero.
    pub datacenter_share: f64,
    /// Probability that an honest answer fails an honest check (0: the calibration found none).
    pub honest_failure: f64,
    /// Compute of verifying an answer over the compute of generating it (prefill of prompt and
    /// answer against decoding the answer), measured on the real model.
    pub verification_cost: f64,
    /// Completion tokens per generation, to count tokens.
    pub tokens_per_generation: u32,
    pub detection: Detection,
    pub policy: VerificationPolicy,
}

impl Default for AdversarialConfig {
    fn default() -> Self {
        AdversarialConfig {
            nodes: 1_000,
            rounds: 1_000,
            cheater_share: 0.05,
            late_share: 0.5,
            honest_prefix: 300,
            cheat_rate: 1.0,
            colluding_pairs: 5,
            datacenter_share: 0.1,
            honest_failure: 0.0,
            verification_cost: 0.5,
            tokens_per_generation: 200,
            detection: Detection::default(),
            policy: VerificationPolicy::default(),
        }
    }
}

/// How a node behaves.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Behaviour {
    Honest,
    Cheater {
        kind: CheatKind,
        /// Generations served honestly before cheating starts.
        honest_for: u32,
        /// Its accomplice, for a colluding pair.
        partner: Option<NodeId>,
    },
}

/// One cheating node's fate.
#[derive(Clone, Debug, PartialEq)]
pub struct CheaterOutcome {
    pub kind: CheatKind,
    pub late: bool,
    pub colluding: bool,
    /// Quarantined by the end of the run (for its answers or for a false verdict).
    pub quarantined: bool,
    /// Its generations from the first bad one to its quarantine, both included; `None` when
    /// never caught or caught before it cheated.
    pub generations_to_quarantine: Option<u64>,
    /// The ordinal among its own generations of its first bad one.
    first_bad: Option<u64>,
    /// Bad answers it delivered before its quarantine.
    pub bad_answers: u32,
    /// Of those, answers delivered without being verified.
    pub bad_answers_unverified: u32,
    /// Of those, answers an accomplice or a lazy verifier passed.
    pub bad_answers_wrongly_passed: u32,
    /// Bad answers whose earnings the quarantine took back.
    pub bad_answers_clawed_back: u32,
}

/// One seed's run.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct AdversarialRun {
    pub cheaters: Vec<CheaterOutcome>,
    pub honest_nodes: u32,
    pub honest_quarantined: u32,
    pub generations: u64,
    pub bad_generations: u64,
    /// Verdicts asked for, by whom.
    pub vehicle_verifications: u64,
    pub datacenter_verifications: u64,
    /// Verification compute over generation compute, in the second half of the run.
    pub steady_overhead: f64,
    /// The same over the whole run.
    pub overall_overhead: f64,
}

/// Runs the fleet for `seed`.
#[must_use]
pub fn run(config: &AdversarialConfig, seed: u64) -> AdversarialRun {
    Simulation::new(config, seed).run()
}

struct Simulation<'a> {
    config: &'a AdversarialConfig,
    secret: Secret,
    seed: u64,
    behaviour: Vec<Behaviour>,
    records: Vec<NodeRecord>,
    /// Trusted, live vehicles that may verify; `slot[node]` is a node's index in it.
    verifiers: Vec<NodeId>,
    slot: Vec<Option<usize>>,
    cheaters: Vec<Option<CheaterOutcome>>,
    /// The generations each cheater delivered bad, per node.
    bad: Vec<Vec<(RequestId, BadFate)>>,
    next_generation: u64,
    run: AdversarialRun,
    /// Generation and verification compute (in generations), per half of the run.
    compute: [(f64, f64); 2],
}

impl<'a> Simulation<'a> {
    fn new(config: &'a AdversarialConfig, seed: u64) -> Self {
        let nodes = config.nodes as usize;
        let mut behaviour = vec![Behaviour::Honest; nodes];
        let mut cheaters = vec![None; nodes];
        // Which nodes cheat: a keyed shuffle of the ids, cheaters first, then pairs.
        let mut order: Vec<u32> = (0..config.nodes).collect();
        order.sort_by_key(|&node| unit_hash(seed, b"order", u64::from(node)).to_bits());
        let cheater_count = (f64::from(config.nodes) * config.cheater_share).round() as usize;
        let pairs = config.colluding_pairs as usize;
        let mut chosen = order.into_iter();
        for index in 0..cheater_count.min(nodes) {
            let Some(node) = chosen.next() else { break };
            let kind = CheatKind::ALL[index % CheatKind::ALL.len()];
            let late = unit_hash(seed, b"late", u64::from(node)) < config.late_share;
            behaviour[node as usize] = Behaviour::Cheater {
                kind,
                honest_for: if late { config.honest_prefix } else { 0 },
                partner: None,
            };
            cheaters[node as usize] = Some(CheaterOutcome::new(kind, late, false));
        }
        for pair in 0..pairs {
            let (Some(first), Some(second)) = (chosen.next(), chosen.next()) else {
                break;
            };
            for (node, partner) in [(first, second), (second, first)] {
                // Token cheats only: an accomplice's pass cannot hide a compute report.
                let kind = CheatKind::ALL[(pair * 2 + usize::from(node == second)) % 5];
                let late = unit_hash(seed, b"late", u64::from(node)) < config.late_share;
                behaviour[node as usize] = Behaviour::Cheater {
                    kind,
                    honest_for: if late { config.honest_prefix } else { 0 },
                    partner: Some(NodeId(partner)),
                };
                cheaters[node as usize] = Some(CheaterOutcome::new(kind, late, true));
            }
        }
        let honest_nodes = behaviour
            .iter()
            .filter(|behaviour| **behaviour == Behaviour::Honest)
            .count();
        Simulation {
            config,
            secret: Secret::from_seed(seed),
            seed,
            behaviour,
            records: (0..config.nodes)
                .map(|node| NodeRecord::new(NodeId(node)))
                .collect(),
            verifiers: Vec::new(),
            slot: vec![None; nodes],
            cheaters,
            bad: vec![Vec::new(); nodes],
            next_generation: 0,
            run: AdversarialRun {
                honest_nodes: u32::try_from(honest_nodes).unwrap_or(u32::MAX),
                ..AdversarialRun::default()
            },
            compute: [(0.0, 0.0); 2],
        }
    }

    fn run(mut self) -> AdversarialRun {
        for round in 0..self.config.rounds {
            let half = usize::from(round >= self.config.rounds / 2);
            for node in 0..self.config.nodes {
                if self.records[node as usize].is_quarantined() {
                    continue;
                }
                self.serve(NodeId(node), half);
            }
        }
        let [first, second] = self.compute;
        self.run.steady_overhead = ratio(second.1, second.0);
        self.run.overall_overhead = ratio(first.1 + second.1, first.0 + second.0);
        self.run.cheaters = self.cheaters.into_iter().flatten().collect();
        self.run
    }

    fn serve(&mut self, node: NodeId, half: usize) {
        let index = node.0 as usize;
        let generation = RequestId(self.next_generation);
        self.next_generation += 1;
        self.run.generations += 1;
        self.compute[half].0 += 1.0;
        let served = self.records[index].served();
        let bad = match self.behaviour[index] {
            Behaviour::Cheater {
                honest_for, kind, ..
            } => {
                served >= u64::from(honest_for)
                    && (kind == CheatKind::InflatedComputeMs
                        || self.config.cheat_rate >= 1.0
                        || self.unit(b"cheat", generation.0) < self.config.cheat_rate)
            }
            Behaviour::Honest => false,
        };
        if bad {
            self.run.bad_generations += 1;
            if let Some(outcome) = self.cheaters[index].as_mut() {
                outcome.bad_answers += 1;
                outcome.first_bad.get_or_insert(served);
            }
        }
        let verify = self.records[index].delivered(&self.config.policy, &self.secret, generation);
        if let Behaviour::Cheater {
            kind: CheatKind::InflatedComputeMs,
            ..
        } = self.behaviour[index]
        {
            if bad {
                // Billing flags the report whatever the draw said.
                self.bad[index].push((generation, BadFate::Checked));
                let failed = if verify {
                    self.records[index].failed(&self.config.policy, generation)
                } else {
                    Some(self.records[index].quarantine(
                        &self.config.policy,
                        crate::QuarantineReason::ProtocolViolation,
                    ))
                };
                if let Some(quarantine) = failed {
                    self.quarantined(node, &quarantine.suspects);
                }
                return;
            }
        }
        if !verify {
            if bad {
                self.bad[index].push((generation, BadFate::Unverified));
            }
            self.after_record_change(node);
            return;
        }
        if bad {
            self.bad[index].push((generation, BadFate::Checked));
        }
        let audited = draw::below(
            &self.secret,
            Purpose::Audit,
            node,
            generation,
            self.config.policy.audit,
        );
        let mut case = Case::new(node, u64::from(node.0), generation, audited);
        // One draw per answer: every honest check of it finds the same thing.
        let fails_honest_check = match self.behaviour[index] {
            Behaviour::Cheater { kind, .. } if bad => {
                self.unit(b"caught", generation.0) < self.config.detection.of(kind)
            }
            _ => self.unit(b"false", generation.0) < self.config.honest_failure,
        };
        let decision = loop {
            match case.next() {
                CaseStep::Decided(decision) => break Some(decision),
                CaseStep::Ask {
                    round,
                    prefer_datacenter,
                } => {
                    let Some(verifier) = self.choose(&case, round, prefer_datacenter) else {
                        break case.without_more_verifiers();
                    };
                    let verdict = self.verdict(verifier, node, fails_honest_check);
                    self.compute[half].1 += self.config.verification_cost;
                    match verifier {
                        Verifier::Datacenter => self.run.datacenter_verifications += 1,
                        Verifier::Vehicle { .. } => self.run.vehicle_verifications += 1,
                    }
                    case.record(verifier, verdict);
                }
            }
        };
        match decision {
            Some(decision) => {
                for liar in &decision.contradicted {
                    let quarantine = self.records[liar.0 as usize].quarantine(
                        &self.config.policy,
                        crate::QuarantineReason::FalseVerdict { generation },
                    );
                    self.quarantined(*liar, &quarantine.suspects);
                }
                match decision.verdict {
                    Verdict::Passed => {
                        if bad {
                            // Passed by an accomplice or a lazy verifier.
                            if let Some(entry) = self.bad[index].last_mut() {
                                entry.1 = BadFate::WronglyPassed;
                            }
                        }
                        self.records[index].passed(&self.config.policy, generation);
                        self.after_record_change(node);
                    }
                    Verdict::Failed => {
                        if let Some(quarantine) =
                            self.records[index].failed(&self.config.policy, generation)
                        {
                            self.quarantined(node, &quarantine.suspects);
                        }
                    }
                }
            }
            None => {
                if bad {
                    if let Some(entry) = self.bad[index].last_mut() {
                        entry.1 = BadFate::Unverified;
                    }
                }
                self.records[index].undecided(&self.config.policy, generation);
                self.after_record_change(node);
            }
        }
    }

    /// A verifier for `case`'s `round`: a datacenter node (always when preferred and any
    /// exist, else with the configured share), or a trusted vehicle of an owner not excluded,
    /// or a datacenter node when no vehicle may verify.
    fn choose(&self, case: &Case, round: u8, prefer_datacenter: bool) -> Option<Verifier> {
        let datacenter = self.config.datacenter_share > 0.0;
        if datacenter
            && (prefer_datacenter
                || self.unit(b"datacenter", case.generation.0 ^ (u64::from(round) << 56))
                    < self.config.datacenter_share)
        {
            return Some(Verifier::Datacenter);
        }
        let vehicle = self.choose_vehicle(case, round);
        if vehicle.is_none() && datacenter {
            return Some(Verifier::Datacenter);
        }
        vehicle
    }

    fn choose_vehicle(&self, case: &Case, round: u8) -> Option<Verifier> {
        let excluded = case.excluded_owners();
        // Redraws skip excluded owners; a handful of tries finds one in any real fleet.
        for attempt in 0..8_u8 {
            let round = round.wrapping_mul(8).wrapping_add(attempt);
            let index = draw::pick(
                &self.secret,
                round,
                case.producer,
                case.generation,
                self.verifiers.len(),
            )?;
            let node = self.verifiers[index];
            if !excluded.contains(&u64::from(node.0)) {
                return Some(Verifier::Vehicle {
                    node,
                    owner: u64::from(node.0),
                });
            }
        }
        None
    }

    fn verdict(&self, verifier: Verifier, producer: NodeId, fails_honest_check: bool) -> Verdict {
        let honest = if fails_honest_check {
            Verdict::Failed
        } else {
            Verdict::Passed
        };
        match verifier {
            Verifier::Datacenter => honest,
            Verifier::Vehicle { node, .. } => match self.behaviour[node.0 as usize] {
                Behaviour::Honest => honest,
                Behaviour::Cheater {
                    partner: Some(partner),
                    ..
                } => {
                    if partner == producer {
                        Verdict::Passed
                    } else {
                        Verdict::Failed
                    }
                }
                // A cheater passes without computing.
                Behaviour::Cheater { partner: None, .. } => Verdict::Passed,
            },
        }
    }

    fn quarantined(&mut self, node: NodeId, suspects: &[RequestId]) {
        let index = node.0 as usize;
        self.remove_verifier(node);
        match self.cheaters[index].as_mut() {
            None => self.run.honest_quarantined += 1,
            Some(outcome) => {
                if !outcome.quarantined {
                    outcome.quarantined = true;
                    let served = self.records[index].served();
                    outcome.generations_to_quarantine =
                        outcome.first_bad.map(|first| served - first);
                    let bad = &self.bad[index];
                    outcome.bad_answers_unverified =
                        count(bad.iter().filter(|(_, fate)| *fate == BadFate::Unverified));
                    outcome.bad_answers_wrongly_passed = count(
                        bad.iter()
                            .filter(|(_, fate)| *fate == BadFate::WronglyPassed),
                    );
                    outcome.bad_answers_clawed_back = count(
                        bad.iter()
                            .filter(|(generation, _)| suspects.contains(generation)),
                    );
                }
            }
        }
    }

    /// Keeps the verifier list in step with a node's record.
    fn after_record_change(&mut self, node: NodeId) {
        let index = node.0 as usize;
        let may = self.records[index].may_verify(&self.config.policy);
        match (may, self.slot[index]) {
            (true, None) => {
                self.slot[index] = Some(self.verifiers.len());
                self.verifiers.push(node);
            }
            (false, Some(_)) => self.remove_verifier(node),
            _ => {}
        }
    }

    fn remove_verifier(&mut self, node: NodeId) {
        let index = node.0 as usize;
        if let Some(at) = self.slot[index].take() {
            self.verifiers.swap_remove(at);
            if let Some(&moved) = self.verifiers.get(at) {
                self.slot[moved.0 as usize] = Some(at);
            }
        }
    }

    fn unit(&self, purpose: &[u8], value: u64) -> f64 {
        unit_hash(self.seed, purpose, value)
    }
}

impl CheaterOutcome {
    fn new(kind: CheatKind, late: bool, colluding: bool) -> Self {
        CheaterOutcome {
            kind,
            late,
            colluding,
            quarantined: false,
            generations_to_quarantine: None,
            first_bad: None,
            bad_answers: 0,
            bad_answers_unverified: 0,
            bad_answers_wrongly_passed: 0,
            bad_answers_clawed_back: 0,
        }
    }
}

/// What became of a bad answer.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum BadFate {
    /// Verified and failed (or, for compute reports, flagged).
    Checked,
    Unverified,
    WronglyPassed,
}

/// A uniform number in [0, 1) for the simulation's own draws (behaviour, not policy).
fn unit_hash(seed: u64, purpose: &[u8], value: u64) -> f64 {
    let mut hasher = Sha256::new();
    hasher.update(seed.to_le_bytes());
    hasher.update(purpose);
    hasher.update(value.to_le_bytes());
    draw::unit_of(&hasher.finalize())
}

fn count<T>(items: impl Iterator<Item = T>) -> u32 {
    u32::try_from(items.count()).unwrap_or(u32::MAX)
}

fn ratio(numerator: f64, denominator: f64) -> f64 {
    if denominator > 0.0 {
        numerator / denominator
    } else {
        0.0
    }
}

/// Cheaters of one kind over every seed.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct KindSummary {
    pub cheaters: u32,
    pub quarantined: u32,
    /// Quarantined within [`CATCH_TARGET_GENERATIONS`] of their generations from their first
    /// bad one.
    pub within_target: u32,
    /// Generations from the first bad one to the quarantine, p50 and p99, over those caught.
    pub generations_p50: u64,
    pub generations_p99: u64,
    pub bad_answers: u64,
    pub bad_answers_unverified: u64,
    pub bad_answers_wrongly_passed: u64,
    pub bad_answers_clawed_back: u64,
}

/// The target: cheaters are caught within this many of their generations.
pub const CATCH_TARGET_GENERATIONS: u64 = 200;

/// Every seed's runs, summed up.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct AdversarialSummary {
    pub seeds: u32,
    /// Per kind, in [`CheatKind::ALL`] order; colluding pairs are counted in their kinds and
    /// again in `colluding`.
    pub kinds: Vec<(CheatKind, KindSummary)>,
    pub colluding: KindSummary,
    pub late: KindSummary,
    pub honest_nodes: u64,
    pub honest_quarantined: u64,
    pub generations: u64,
    pub bad_generations: u64,
    pub tokens_per_generation: u32,
    pub vehicle_verifications: u64,
    pub datacenter_verifications: u64,
    /// Mean over seeds of the steady-state and whole-run overheads.
    pub steady_overhead: f64,
    pub overall_overhead: f64,
}

impl KindSummary {
    /// Counts a cheater that cheated or was caught; one whose honest start outlasted the run
    /// was never a cheater to anyone.
    fn add(&mut self, outcome: &CheaterOutcome, catches: &mut Vec<u64>) {
        if outcome.bad_answers == 0 && !outcome.quarantined {
            return;
        }
        self.cheaters += 1;
        if outcome.quarantined {
            self.quarantined += 1;
            let generations = outcome.generations_to_quarantine.unwrap_or(0);
            if generations <= CATCH_TARGET_GENERATIONS {
                self.within_target += 1;
            }
            catches.push(generations);
        }
        self.bad_answers += u64::from(outcome.bad_answers);
        self.bad_answers_unverified += u64::from(outcome.bad_answers_unverified);
        self.bad_answers_wrongly_passed += u64::from(outcome.bad_answers_wrongly_passed);
        self.bad_answers_clawed_back += u64::from(outcome.bad_answers_clawed_back);
    }

    fn set_percentiles(&mut self, mut catches: Vec<u64>) {
        catches.sort_unstable();
        self.generations_p50 = percentile(&catches, 50);
        self.generations_p99 = percentile(&catches, 99);
    }
}

/// Sums up `runs` (one per seed).
#[must_use]
pub fn summarize(config: &AdversarialConfig, runs: &[AdversarialRun]) -> AdversarialSummary {
    let mut summary = AdversarialSummary {
        seeds: u32::try_from(runs.len()).unwrap_or(u32::MAX),
        tokens_per_generation: config.tokens_per_generation,
        ..AdversarialSummary::default()
    };
    let mut kinds: Vec<(CheatKind, KindSummary, Vec<u64>)> = CheatKind::ALL
        .iter()
        .map(|&kind| (kind, KindSummary::default(), Vec::new()))
        .collect();
    let mut colluding = (KindSummary::default(), Vec::new());
    let mut late = (KindSummary::default(), Vec::new());
    for run in runs {
        for outcome in &run.cheaters {
            if let Some((_, summary, catches)) =
                kinds.iter_mut().find(|(kind, _, _)| *kind == outcome.kind)
            {
                summary.add(outcome, catches);
            }
            if outcome.colluding {
                colluding.0.add(outcome, &mut colluding.1);
            }
            if outcome.late {
                late.0.add(outcome, &mut late.1);
            }
        }
        summary.honest_nodes += u64::from(run.honest_nodes);
        summary.honest_quarantined += u64::from(run.honest_quarantined);
        summary.generations += run.generations;
        summary.bad_generations += run.bad_generations;
        summary.vehicle_verifications += run.vehicle_verifications;
        summary.datacenter_verifications += run.datacenter_verifications;
        summary.steady_overhead += run.steady_overhead;
        summary.overall_overhead += run.overall_overhead;
    }
    if !runs.is_empty() {
        summary.steady_overhead /= runs.len() as f64;
        summary.overall_overhead /= runs.len() as f64;
    }
    summary.kinds = kinds
        .into_iter()
        .map(|(kind, mut summary, catches)| {
            summary.set_percentiles(catches);
            (kind, summary)
        })
        .collect();
    colluding.0.set_percentiles(colluding.1);
    late.0.set_percentiles(late.1);
    summary.colluding = colluding.0;
    summary.late = late.0;
    summary
}

impl AdversarialSummary {
    /// The share of every cheater quarantined within the target.
    #[must_use]
    pub fn caught_within_target(&self) -> f64 {
        let (within, all) = self
            .kinds
            .iter()
            .fold((0u64, 0u64), |(within, all), (_, kind)| {
                (
                    within + u64::from(kind.within_target),
                    all + u64::from(kind.cheaters),
                )
            });
        ratio(within as f64, all as f64)
    }
}

impl std::fmt::Display for AdversarialSummary {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        writeln!(
            f,
            "| cheaters | nodes | quarantined | within {CATCH_TARGET_GENERATIONS} generations | generations to quarantine p50 / p99 | bad answers | unverified | wrongly passed | clawed back |"
        )?;
        writeln!(f, "|---|---|---|---|---|---|---|---|---|")?;
        let rows = self
            .kinds
            .iter()
            .map(|(kind, summary)| (kind.name(), summary))
            .chain([
                ("colluding pairs (also above)", &self.colluding),
                ("late: honest first (also above)", &self.late),
            ]);
        for (name, kind) in rows {
            writeln!(
                f,
                "| {name} | {} | {} ({}) | {} ({}) | {} / {} | {} | {} | {} | {} |",
                kind.cheaters,
                kind.quarantined,
                percent(kind.quarantined, kind.cheaters),
                kind.within_target,
                percent(kind.within_target, kind.cheaters),
                kind.generations_p50,
                kind.generations_p99,
                kind.bad_answers,
                kind.bad_answers_unverified,
                kind.bad_answers_wrongly_passed,
                kind.bad_answers_clawed_back,
            )?;
        }
        writeln!(f)?;
        writeln!(
            f,
            "seeds: {}; cheaters caught within {CATCH_TARGET_GENERATIONS} generations: {:.2} %",
            self.seeds,
            100.0 * self.caught_within_target()
        )?;
        writeln!(
            f,
            "honest nodes quarantined: {} of {} (over every seed)",
            self.honest_quarantined, self.honest_nodes
        )?;
        let bad_tokens = self.bad_generations * u64::from(self.tokens_per_generation);
        writeln!(
            f,
            "tokens served by cheaters before quarantine: {bad_tokens} of {} ({:.3} % of all)",
            self.generations * u64::from(self.tokens_per_generation),
            100.0 * ratio(self.bad_generations as f64, self.generations as f64)
        )?;
        writeln!(
            f,
            "verifications: {} by vehicles, {} by datacenter nodes",
            self.vehicle_verifications, self.datacenter_verifications
        )?;
        write!(
            f,
            "verification overhead (share of fleet compute): {:.2} % at steady state (second half), {:.2} % over the whole run",
            100.0 * self.steady_overhead,
            100.0 * self.overall_overhead
        )
    }
}

fn percent(part: u32, whole: u32) -> String {
    format!("{:.1} %", 100.0 * ratio(f64::from(part), f64::from(whole)))
}

fn percentile(sorted: &[u64], pct: usize) -> u64 {
    if sorted.is_empty() {
        return 0;
    }
    let rank = (sorted.len() * pct).div_ceil(100).max(1) - 1;
    sorted[rank.min(sorted.len() - 1)]
}

#[cfg(test)]
#[path = "adversarial_tests.rs"]
mod tests;
