//! Verifying what vehicles answered: after an answer is delivered, a share of
//! them is recomputed by another owner's vehicle (`proto::Assign::verify`,
//! `engine::verify`), and a node whose answer fails is quarantined.
//!
//! The decisions are the `trust` crate's: each node has a [`NodeRecord`]
//! (probation, then a falling rate, drawn from a keyed hash the node cannot
//! predict), each verified answer a [`Case`] (a vehicle's failure is
//! confirmed by a second verifier, a share of its passes audited, a verifier
//! whose verdict is contradicted quarantined itself). This module carries
//! them out: it keeps the answer until its case is decided, picks verifiers
//! among the connected nodes, sends them the check, reads their `Verified`,
//! and quarantines.
//!
//! A quarantined node is disconnected and refused when it comes back
//! ([`Core::is_quarantined`]); the quarantine, with the public ids of its
//! suspect generations, goes to [`Core::take_quarantines`] for the books
//! (clawback) and the store.
//!
//! **Invariant:** verification never delays an answer: it starts once the
//! answer is delivered, and what it decides reaches only the node's record
//! and the owner's earnings.
//!
//! A grammar-constrained answer is verified with its grammar replayed. Of an
//! answer resumed from tokens committed on another cell, the tokens produced
//! here are verified; the earlier ones are given to the verifier as context
//! (their producer is unknown here).

use std::collections::{BTreeMap, BTreeSet, HashMap, VecDeque};
use std::ops::Range;
use std::sync::Arc;
use std::time::{Duration, Instant};

use scheduler::{Millis, NodeId, RequestId, TenantClass};
use trust::{
    Case, CaseStep, Decision, NodeRecord, Quarantine, QuarantineReason, Secret, TrustState,
    Verdict, VerificationPolicy, Verifier,
};

use super::{Core, CoreState, ORDER};
use crate::nodes::NodeSession;
use cell_api::served::ServedModel;

/// Prefix of a check's generation id (`v{check}.{dispatch}`); a generation's
/// is `{request}.{attempt}`, so the two never collide.
const CHECK_ID_PREFIX: char = 'v';

/// How long a verifier may take before its check is given to another.
pub const CHECK_ANSWER_TIMEOUT: Duration = Duration::from_secs(300);

/// How long a check may wait for a verifier before it is decided on what it
/// has (`Case::without_more_verifiers`).
pub const CHECK_WAIT_MAX: Duration = Duration::from_secs(600);

/// Most checks open at once; past it a new draw is counted unverified.
pub const CHECKS_OPEN_MAX: usize = 4096;

/// Most waiting checks offered to a verifier per tick.
pub const CHECKS_DISPATCHED_PER_TICK: usize = 64;

/// Most answered checks kept for the books while the store is away; past
/// it the oldest is dropped (logged), its verifier unpaid.
pub const CHECKS_UNRECORDED_MAX: usize = 1 << 16;

/// Most generations whose public id is kept for a clawback (the suspect
/// windows of every node together); the oldest are forgotten first.
pub const PUBLIC_IDS_KEPT: usize = 1 << 18;

/// A node's trust as the owner and the operator see it.
#[derive(Clone, Debug, PartialEq)]
pub struct NodeTrust {
    pub node: String,
    pub state: TrustState,
    /// Generations of its that were verified, and how many passed.
    pub verified: u64,
    pub passed: u64,
}

/// A quarantine, for the books: whose earnings to take back and why.
#[derive(Clone, Debug, PartialEq)]
pub struct QuarantineNotice {
    pub node: String,
    pub owner: String,
    pub reason: String,
    /// Public ids of the generations whose earnings are suspect, oldest
    /// first; those whose id was forgotten are counted in `forgotten`.
    pub suspects: Vec<String>,
    pub forgotten: usize,
    pub at_ms: i64,
}

/// The verification state of a cell.
pub(super) struct Verifications {
    policy: VerificationPolicy,
    secret: Secret,
    records: HashMap<NodeId, NodeRecord>,
    /// Owner names interned as the numbers `trust::Case` compares.
    owner_numbers: HashMap<String, u64>,
    /// Each node's name and owner, by node.
    names: HashMap<NodeId, String>,
    owners: HashMap<NodeId, (String, u64)>,
    /// Nodes enrolled without an owner: the operator's own (datacenter
    /// nodes, test vehicles). Nobody is paid for their answers, which are
    /// not verified, and their verdicts decide as a datacenter node's.
    platform: BTreeSet<NodeId>,
    /// The attention setting each node last registered with: a verifier of
    /// another setting than an answer's takes the wider tolerance.
    attention: HashMap<NodeId, proto::Attention>,
    /// The numerics (`nodes::Numerics`: engine version, CPU kernels and attention setting) each
    /// node last registered with: the default tolerance is calibrated between engines of one.
    numerics: HashMap<NodeId, u32>,
    checks: HashMap<u64, Check>,
    next_check: u64,
    /// Public ids of delivered generations, by the id their draws used.
    public_ids: BTreeMap<u64, String>,
    /// Decided quarantines the books have not taken yet.
    notices: VecDeque<QuarantineNotice>,
    /// Checks vehicles answered, for the books to pay (`take_checks`).
    answered: VecDeque<store::checks::CheckRecord>,
    /// Nodes whose record changed since the store last took them.
    changed: BTreeSet<NodeId>,
    /// Quarantined nodes whose quarantine the store has not recorded yet.
    unrecorded: BTreeSet<NodeId>,
    /// Quarantined nodes counted and announced (until released).
    noticed: BTreeSet<NodeId>,
}

/// One answer under verification.
struct Check {
    case: Case,
    generation: RequestId,
    /// The answer's public id, which names the check in the books.
    public_id: String,
    model: Arc<ServedModel>,
    prompt: Arc<Vec<i32>>,
    sampling: proto::Sampling,
    max_tokens: u32,
    answer: proto::VerifyAnswer,
    /// Who produced which completion positions, in order.
    producers: Vec<Producer>,
    /// The verifier the check is with now, and until when it may answer.
    with: Option<(NodeSession, Verifier, Instant)>,
    dispatches: u32,
    /// The first failed position any verifier reported, and what failed.
    first_failure: Option<(u32, String)>,
    /// The vehicles that answered the check, with what each is paid once the
    /// case is decided: only a verifier the decision does not contradict,
    /// and that is not quarantined by then.
    answered: Vec<(NodeId, store::checks::CheckRecord)>,
    waiting_since: Instant,
}

#[derive(Clone, Debug)]
struct Producer {
    node: NodeId,
    owner: u64,
    positions: Range<u32>,
    /// Its record drew this generation for verification.
    drawn: bool,
    /// The platform's own node: not verified, no record.
    platform: bool,
}

/// What the core hands over about a delivered answer.
pub(super) struct Delivered {
    pub generation: RequestId,
    /// Leading completion tokens committed on another cell: context for the
    /// verifier, not checked, produced by nobody here.
    pub given: u32,
    pub public_id: String,
    pub model: Arc<ServedModel>,
    pub prompt: Arc<Vec<i32>>,
    pub sampling: proto::Sampling,
    pub max_tokens: u32,
    pub completion: Vec<i32>,
    /// The log-probability of each completion token after the given ones.
    pub logprobs: Vec<f32>,
    pub ended_by_eos: bool,
    /// Each attempt's node and its completion tokens, in order, after the
    /// given ones.
    pub segments: Vec<(NodeId, u32)>,
}

impl Verifications {
    pub(super) fn new(policy: VerificationPolicy, secret: Secret) -> Self {
        Verifications {
            policy,
            secret,
            records: HashMap::new(),
            owner_numbers: HashMap::new(),
            names: HashMap::new(),
            owners: HashMap::new(),
            platform: BTreeSet::new(),
            attention: HashMap::new(),
            numerics: HashMap::new(),
            checks: HashMap::new(),
            next_check: 1,
            public_ids: BTreeMap::new(),
            notices: VecDeque::new(),
            answered: VecDeque::new(),
            changed: BTreeSet::new(),
            unrecorded: BTreeSet::new(),
            noticed: BTreeSet::new(),
        }
    }

    /// Node `name` connected under `owner` ("" for none: the platform's own),
    /// running `attention`, computing with `numerics`.
    pub(super) fn connected(
        &mut self,
        node: NodeId,
        name: &str,
        owner: &str,
        (attention, numerics): (proto::Attention, u32),
    ) {
        self.names.entry(node).or_insert_with(|| name.to_owned());
        self.attention.insert(node, attention);
        self.numerics.insert(node, numerics);
        if owner.is_empty() {
            self.platform.insert(node);
            self.owners.remove(&node);
            return;
        }
        self.platform.remove(&node);
        let next = u64::try_from(self.owner_numbers.len()).unwrap_or(u64::MAX);
        let number = *self.owner_numbers.entry(owner.to_owned()).or_insert(next);
        self.owners.insert(node, (owner.to_owned(), number));
        self.records
            .entry(node)
            .or_insert_with(|| NodeRecord::new(node));
    }

    /// Once a check's case is decided, keeps for the books the checks its
    /// verifiers answered, but for those of a verifier the decision
    /// `contradicted` or one quarantined by then: a verifier caught lying is
    /// not paid for its lie, nor for any check still open when it was caught.
    fn pay_verifiers(
        &mut self,
        answered: Vec<(NodeId, store::checks::CheckRecord)>,
        contradicted: &[NodeId],
    ) {
        for (node, record) in answered {
            if contradicted.contains(&node) || self.is_quarantined(node) {
                tracing::warn!(check = %record.check, "a check of a contradicted or quarantined verifier goes unpaid");
                continue;
            }
            self.answered_by(node, record);
        }
    }

    /// Keeps a check `node` answered for the books, named by the node's
    /// name; past [`CHECKS_UNRECORDED_MAX`] the oldest goes unpaid.
    fn answered_by(&mut self, node: NodeId, mut record: store::checks::CheckRecord) {
        let Some(name) = self.names.get(&node) else {
            return;
        };
        record.node = name.clone();
        self.answered.push_back(record);
        self.forget_oldest_answered();
    }

    /// Drops the oldest answered checks past [`CHECKS_UNRECORDED_MAX`].
    fn forget_oldest_answered(&mut self) {
        while self.answered.len() > CHECKS_UNRECORDED_MAX {
            if let Some(dropped) = self.answered.pop_front() {
                tracing::error!(check = %dropped.check, "too many checks unrecorded: one goes unpaid");
            }
        }
    }

    pub(super) fn is_quarantined(&self, node: NodeId) -> bool {
        self.records
            .get(&node)
            .is_some_and(NodeRecord::is_quarantined)
    }

    fn owner_of(&self, node: NodeId) -> u64 {
        self.owners
            .get(&node)
            .map_or(u64::MAX, |(_, number)| *number)
    }

    fn remember_public_id(&mut self, generation: RequestId, public_id: String) {
        self.public_ids.insert(generation.0, public_id);
        while self.public_ids.len() > PUBLIC_IDS_KEPT {
            self.public_ids.pop_first();
        }
    }

    /// Records the delivery with every node that produced part of it and
    /// opens a check when any of their draws asks for one. Returns the
    /// check's id.
    pub(super) fn delivered(&mut self, delivered: Delivered, now: Instant) -> Option<u64> {
        let mut producers: Vec<Producer> = Vec::new();
        let mut position = delivered.given;
        for &(node, tokens) in &delivered.segments {
            let positions = position..position.saturating_add(tokens);
            position = positions.end;
            if tokens == 0 {
                continue;
            }
            producers.push(Producer {
                node,
                owner: self.owner_of(node),
                positions,
                drawn: false,
                platform: self.platform.contains(&node),
            });
        }
        if producers.is_empty() {
            return None;
        }
        let public_id = delivered.public_id.clone();
        self.remember_public_id(delivered.generation, delivered.public_id);
        let mut seen: Vec<NodeId> = Vec::new();
        for producer in &mut producers {
            if producer.platform || seen.contains(&producer.node) {
                continue;
            }
            seen.push(producer.node);
            let record = self
                .records
                .entry(producer.node)
                .or_insert_with(|| NodeRecord::new(producer.node));
            producer.drawn = record.delivered(&self.policy, &self.secret, delivered.generation);
        }
        let drawn: Vec<NodeId> = producers
            .iter()
            .filter(|producer| producer.drawn)
            .map(|producer| producer.node)
            .collect();
        if drawn.is_empty() {
            return None;
        }
        if self.checks.len() >= CHECKS_OPEN_MAX {
            for node in drawn {
                if let Some(record) = self.records.get_mut(&node) {
                    record.undecided(&self.policy, delivered.generation);
                }
            }
            return None;
        }
        let first = producers.iter().find(|producer| producer.drawn)?;
        let attention = self.attention_of(&producers);
        let audited = trust::draw::below(
            &self.secret,
            trust::draw::Purpose::Audit,
            first.node,
            delivered.generation,
            self.policy.audit,
        );
        let case = Case::new(first.node, first.owner, delivered.generation, audited);
        let id = self.next_check;
        self.next_check += 1;
        self.checks.insert(
            id,
            Check {
                case,
                generation: delivered.generation,
                public_id,
                model: delivered.model,
                prompt: delivered.prompt,
                sampling: delivered.sampling,
                max_tokens: delivered.max_tokens,
                answer: proto::VerifyAnswer {
                    completion_tokens: delivered.completion,
                    logprobs: delivered.logprobs,
                    ended_by_eos: delivered.ended_by_eos,
                    given_tokens: delivered.given,
                    attention: attention as i32,
                },
                producers,
                with: None,
                dispatches: 0,
                first_failure: None,
                answered: Vec::new(),
                waiting_since: now,
            },
        );
        Some(id)
    }

    /// The attention setting an answer's producers share, as they last
    /// registered (a node that changed it has reconnected since, its work
    /// moved); `Mixed` when they differ.
    fn attention_of(&self, producers: &[Producer]) -> proto::Attention {
        let mut settings = producers.iter().map(|producer| {
            self.attention
                .get(&producer.node)
                .copied()
                .unwrap_or(proto::Attention::Off)
        });
        let first = settings.next().unwrap_or(proto::Attention::Off);
        if settings.all(|setting| setting == first) {
            first
        } else {
            proto::Attention::Mixed
        }
    }

    /// The setting `verifier` is told an answer was computed with: its producers' shared one
    /// when every producer computed with the verifier's own numerics, else `Mixed`, which takes
    /// the wider tolerance. Other CPU kernels (SSE4.2 against AVX-512, ARM's) or another engine
    /// version move logits past the default tolerance now and then (docs/VERIFICATION.md,
    /// "Across CPU kernels"), as another attention setting does (`nodes::numerics_alike`).
    fn attention_for(&self, producers: &[Producer], verifier: NodeId) -> proto::Attention {
        let own = self.numerics.get(&verifier).copied();
        let alike = own.is_some()
            && producers.iter().all(|producer| {
                crate::nodes::numerics_alike(self.numerics.get(&producer.node).copied(), own)
            });
        if alike {
            self.attention_of(producers)
        } else {
            proto::Attention::Mixed
        }
    }

    /// Owners none of whose vehicles may verify the check now.
    fn excluded_owners(check: &Check) -> Vec<u64> {
        let mut owners = check.case.excluded_owners();
        owners.extend(
            check
                .producers
                .iter()
                .filter(|producer| !producer.platform)
                .map(|producer| producer.owner),
        );
        owners
    }

    pub(super) fn trust_of(&self, node: NodeId) -> Option<(TrustState, u64, u64)> {
        let record = self.records.get(&node)?;
        Some((record.state(&self.policy), record.verified, record.passed))
    }
}

impl Core {
    /// How many of a new vehicle's answers are verified before its rate
    /// starts to fall; records kept so far keep their counts.
    pub fn set_verification_probation(&self, probation: u32) {
        self.lock().verifications.policy.probation = probation;
    }

    /// Whether the node of this name is quarantined here: it is refused when
    /// it connects.
    pub fn is_quarantined(&self, name: &str) -> bool {
        let state = self.lock();
        state
            .node_ids_by_name
            .get(name)
            .is_some_and(|node| state.verifications.is_quarantined(*node))
    }

    /// Whether a node that connects must be refused for a quarantine, given
    /// whether the store records one (any cell's). A quarantine of this
    /// cell's that the store recorded and no longer does was lifted by the
    /// operator (`fleetgrid nodes release`): the node starts probation again.
    pub fn quarantine_holds(&self, name: &str, in_store: bool) -> bool {
        let mut state = self.lock();
        let Some(&node) = state.node_ids_by_name.get(name) else {
            return in_store;
        };
        let verifications = &mut state.verifications;
        if in_store || verifications.unrecorded.contains(&node) {
            return true;
        }
        if let Some(record) = verifications.records.get_mut(&node) {
            if record.is_quarantined() {
                tracing::info!(node_id = %name, "quarantine lifted; probation again");
                record.release();
                verifications.noticed.remove(&node);
                verifications.changed.insert(node);
            }
        }
        false
    }

    /// The store recorded the quarantine of the node of this name.
    pub fn quarantine_recorded(&self, name: &str) {
        let mut state = self.lock();
        if let Some(&node) = state.node_ids_by_name.get(name) {
            state.verifications.unrecorded.remove(&node);
        }
    }

    /// Every node's trust, by name, sorted.
    pub fn trust(&self) -> Vec<NodeTrust> {
        let state = self.lock();
        let mut trust: Vec<NodeTrust> = state
            .node_ids_by_name
            .iter()
            .filter_map(|(name, node)| {
                let (state, verified, passed) = state.verifications.trust_of(*node)?;
                Some(NodeTrust {
                    node: name.clone(),
                    state,
                    verified,
                    passed,
                })
            })
            .collect();
        trust.sort_by(|a, b| a.node.cmp(&b.node));
        trust
    }

    /// The quarantines decided since the last call, oldest first, for the
    /// books and the store.
    pub fn take_quarantines(&self) -> Vec<QuarantineNotice> {
        self.lock().verifications.notices.drain(..).collect()
    }

    /// Checks vehicles answered since the last call, for the books to pay
    /// their owners.
    pub fn take_checks(&self) -> Vec<store::checks::CheckRecord> {
        self.lock().verifications.answered.drain(..).collect()
    }

    /// Checks the store could not record yet, back at the front.
    pub fn requeue_checks(&self, checks: Vec<store::checks::CheckRecord>) {
        let mut state = self.lock();
        let verifications = &mut state.verifications;
        for check in checks.into_iter().rev() {
            verifications.answered.push_front(check);
        }
        verifications.forget_oldest_answered();
    }

    /// A quarantine the store could not record yet, back at the front.
    pub fn requeue_quarantine(&self, notice: QuarantineNotice) {
        self.lock().verifications.notices.push_front(notice);
    }

    /// The trust of every node whose record changed since the last call.
    pub fn take_trust_changes(&self) -> Vec<NodeTrust> {
        let mut state = self.lock();
        let verifications = &mut state.verifications;
        let changed = std::mem::take(&mut verifications.changed);
        changed
            .into_iter()
            .filter_map(|node| {
                let (trust, verified, passed) = verifications.trust_of(node)?;
                Some(NodeTrust {
                    node: verifications.names.get(&node)?.clone(),
                    state: trust,
                    verified,
                    passed,
                })
            })
            .collect()
    }

    /// A delivered answer: recorded with its producers, and checked when
    /// their draws say so.
    pub(super) fn verify_delivered(
        &self,
        state: &mut CoreState,
        now: Millis,
        delivered: Delivered,
    ) {
        let opened = state
            .verifications
            .delivered(delivered, self.clock.instant());
        if let Some(check) = opened {
            self.metrics.verifications_opened.fetch_add(1, ORDER);
            self.dispatch_check(state, now, check);
        }
    }

    /// Gives the check to its next verifier, or decides it. A check no
    /// verifier can take now waits (`tick_checks`).
    fn dispatch_check(&self, state: &mut CoreState, now: Millis, id: u64) {
        let Some(check) = state.verifications.checks.get(&id) else {
            return;
        };
        let (round, prefer_datacenter) = match check.case.next() {
            CaseStep::Decided(decision) => return self.decide(state, now, id, &decision),
            CaseStep::Ask {
                round,
                prefer_datacenter,
            } => (round, prefer_datacenter),
        };
        let picked = self.pick_verifier(state, now, id, round, prefer_datacenter);
        let Some((verifier, as_verifier)) = picked else {
            return;
        };
        let verifications = &mut state.verifications;
        let Some(check) = verifications.checks.get(&id) else {
            return;
        };
        let mut answer = check.answer.clone();
        answer.attention = verifications.attention_for(&check.producers, verifier) as i32;
        let Some(check) = verifications.checks.get_mut(&id) else {
            return;
        };
        check.dispatches += 1;
        let message = proto::CoordinatorMessage {
            kind: Some(proto::coordinator_message::Kind::Assign(proto::Assign {
                generation_id: format!("{CHECK_ID_PREFIX}{id}.{}", check.dispatches),
                model_sha256: check.model.digest.clone(),
                prompt_tokens: check.prompt.as_ref().clone(),
                sampling: Some(check.sampling.clone()),
                max_tokens: check.max_tokens,
                verify: Some(answer),
                ..proto::Assign::default()
            })),
        };
        let Some(node) = state.nodes.get(&verifier) else {
            return;
        };
        if node.outbound.try_send(message).is_err() {
            // A verifier not draining its stream is someone else's problem
            // (the heartbeat reaper); the check waits for another.
            return;
        }
        let session = NodeSession {
            node: verifier,
            session: node.session,
        };
        let deadline = self.clock.instant() + CHECK_ANSWER_TIMEOUT;
        check.with = Some((session, as_verifier, deadline));
        self.metrics.verifications_sent.fetch_add(1, ORDER);
        tracing::info!(check = id, node_id = %node.name, round, "answer sent for verification");
        // The check takes one of the verifier's slots until it is answered:
        // the scheduler places no tenant's work in it meanwhile.
        self.handle(
            state,
            now,
            scheduler::Event::NodeSlotHeld { node: verifier },
        );
    }

    /// The check `with` had is back (answered, refused or timed out): its
    /// slot is free again, unless the session it went to has ended (a node
    /// that connects again starts with every slot free).
    fn release_verifier(&self, state: &mut CoreState, now: Millis, with: NodeSession) {
        let same_session = state
            .nodes
            .get(&with.node)
            .is_some_and(|node| node.session == with.session);
        if same_session {
            self.handle(
                state,
                now,
                scheduler::Event::NodeSlotReleased { node: with.node },
            );
        }
    }

    /// A connected node that may verify the check in `round`: it serves the
    /// model, is not quarantined, has a free slot its owner lets it use now
    /// (the owner first: a car that is driving or outside its owner's limits
    /// verifies nothing), and it is the platform's own or a
    /// vehicle no excluded owner owns. Vehicles verify first, trusted ones
    /// before those in probation (a new fleet has no trusted vehicle; a
    /// vehicle's failure is confirmed by another before anyone is
    /// quarantined); a confirmation or an audit goes to a platform node where
    /// there is one, whose verdict decides. Drawn among the candidates by the
    /// platform's secret, so that no node picks its verifier.
    fn pick_verifier(
        &self,
        state: &CoreState,
        now: Millis,
        id: u64,
        round: u8,
        prefer_datacenter: bool,
    ) -> Option<(NodeId, Verifier)> {
        let verifications = &state.verifications;
        let check = verifications.checks.get(&id)?;
        let excluded = Verifications::excluded_owners(check);
        // Candidates with their rank: 0 is chosen before 1 before 2.
        let mut eligible: Vec<(NodeId, u8)> = state
            .nodes
            .iter()
            .filter(|(node, _)| !verifications.is_quarantined(**node))
            .filter(|(node, _)| {
                TenantClass::ALL
                    .into_iter()
                    .any(|class| state.scheduler.is_eligible(now, **node, class))
            })
            .filter(|(_, connected)| {
                connected
                    .served(&self.models)
                    .any(|model| model.id == check.model.id)
            })
            .filter_map(|(node, _)| {
                if verifications.platform.contains(node) {
                    return Some((*node, if prefer_datacenter { 0 } else { 2 }));
                }
                if excluded.contains(&verifications.owner_of(*node)) {
                    return None;
                }
                let trusted = verifications
                    .records
                    .get(node)
                    .is_some_and(|record| record.may_verify(&verifications.policy));
                Some((*node, if trusted { 0 } else { 1 }))
            })
            .collect();
        let best = eligible.iter().map(|(_, rank)| *rank).min()?;
        eligible.retain(|(_, rank)| *rank == best);
        eligible.sort_unstable_by_key(|(node, _)| node.0);
        let index = trust::draw::pick(
            &verifications.secret,
            round,
            check.case.producer,
            check.generation,
            eligible.len(),
        )?;
        let node = eligible[index].0;
        let verifier = if verifications.platform.contains(&node) {
            Verifier::Datacenter
        } else {
            Verifier::Vehicle {
                node,
                owner: verifications.owner_of(node),
            }
        };
        Some((node, verifier))
    }

    /// A verifier's outcome. Only the verifier the check is with may answer
    /// it; anything else is stale and dropped.
    pub fn node_verified(&self, session: NodeSession, verified: &proto::Verified) {
        let now = self.clock.now();
        let mut state = self.lock();
        self.heard_from(&mut state, session);
        let Some(id) = parse_check_id(&verified.generation_id) else {
            return;
        };
        let Some(check) = state.verifications.checks.get_mut(&id) else {
            return;
        };
        let Some((with, verifier, deadline)) = check.with else {
            return;
        };
        if with != session {
            return;
        }
        check.with = None;
        // What the node says it spent, but never more than the check was
        // out with it: a verifier cannot inflate its pay.
        let sent = deadline
            .checked_sub(CHECK_ANSWER_TIMEOUT)
            .unwrap_or(deadline);
        let out_with_it = self.clock.instant().saturating_duration_since(sent);
        let compute_ms = verified
            .compute_ms
            .min(u64::try_from(out_with_it.as_millis()).unwrap_or(u64::MAX));
        self.metrics
            .verification_compute_ms
            .fetch_add(compute_ms, ORDER);
        // A vehicle's check is paid by the books; a platform node's is not.
        let answered = match verifier {
            Verifier::Vehicle { node, .. } => Some((
                node,
                store::checks::CheckRecord {
                    check: format!("check:{}:{}", check.public_id, check.dispatches),
                    node: String::new(),
                    model: check.model.name.clone(),
                    tokens: i64::try_from(
                        check.prompt.len() + check.answer.completion_tokens.len(),
                    )
                    .unwrap_or(i64::MAX),
                    compute_ms: i64::try_from(compute_ms).unwrap_or(i64::MAX),
                    started_ms: now
                        .0
                        .saturating_sub(i64::try_from(out_with_it.as_millis()).unwrap_or(0)),
                    at_ms: now.0,
                },
            )),
            Verifier::Datacenter => None,
        };
        let verdict = if verified.mismatches == 0 && verified.checked > 0 {
            self.metrics.verifications_passed.fetch_add(1, ORDER);
            Verdict::Passed
        } else {
            self.metrics.verifications_failed.fetch_add(1, ORDER);
            let position = verified.first_mismatch_position;
            let what = crate::node_input::bounded_node_text(verified.first_mismatch.clone());
            if check
                .first_failure
                .as_ref()
                .is_none_or(|(earlier, _)| position < *earlier)
            {
                check.first_failure = Some((position, what));
            }
            Verdict::Failed
        };
        tracing::info!(check = id, verdict = ?verdict, checked = verified.checked, mismatches = verified.mismatches, "verifier answered");
        check.case.record(verifier, verdict);
        check.waiting_since = self.clock.instant();
        check.answered.extend(answered);
        self.release_verifier(&mut state, now, session);
        self.dispatch_check(&mut state, now, id);
    }

    /// A verifier could not take a check (busy, or it does not hold the
    /// model after all): the check waits for another dispatch.
    pub(super) fn check_refused(&self, state: &mut CoreState, session: NodeSession, id: u64) {
        let Some(check) = state.verifications.checks.get_mut(&id) else {
            return;
        };
        if check.with.is_some_and(|(with, _, _)| with == session) {
            check.with = None;
            let now = self.clock.now();
            self.release_verifier(state, now, session);
        }
    }

    /// Checks with a verifier that is gone wait for another.
    pub(super) fn verifier_lost(&self, state: &mut CoreState, node: NodeId) {
        for check in state.verifications.checks.values_mut() {
            if check.with.is_some_and(|(with, _, _)| with.node == node) {
                check.with = None;
            }
        }
    }

    /// Gives checks whose verifier did not answer in time to another, sends
    /// waiting checks to a verifier, and decides those that waited too long
    /// on what they have.
    pub(super) fn tick_checks(&self, state: &mut CoreState, now: Millis) {
        let instant = self.clock.instant();
        let mut waiting: Vec<u64> = Vec::new();
        let mut given_up: Vec<u64> = Vec::new();
        let mut timed_out: Vec<NodeSession> = Vec::new();
        for (id, check) in &mut state.verifications.checks {
            if let Some((with, _, deadline)) = check.with {
                if instant > deadline {
                    check.with = None;
                    timed_out.push(with);
                }
            }
            if check.with.is_none() {
                if instant.saturating_duration_since(check.waiting_since) > CHECK_WAIT_MAX {
                    given_up.push(*id);
                } else {
                    waiting.push(*id);
                }
            }
        }
        for with in timed_out {
            self.release_verifier(state, now, with);
        }
        // Oldest first, and a bounded number per tick: each looks through
        // the connected nodes under the core's lock.
        waiting.sort_unstable();
        waiting.truncate(CHECKS_DISPATCHED_PER_TICK);
        for id in waiting {
            self.dispatch_check(state, now, id);
        }
        for id in given_up {
            self.give_up_check(state, now, id);
        }
    }

    /// No verifier could be found in time: a pass every verdict agrees on
    /// stands, anything else counts as unverified.
    fn give_up_check(&self, state: &mut CoreState, now: Millis, id: u64) {
        let Some(check) = state.verifications.checks.get(&id) else {
            return;
        };
        match check.case.without_more_verifiers() {
            Some(decision) => self.decide(state, now, id, &decision),
            None => {
                let Some(check) = state.verifications.checks.remove(&id) else {
                    return;
                };
                self.metrics.verifications_undecided.fetch_add(1, ORDER);
                let verifications = &mut state.verifications;
                for producer in &check.producers {
                    verifications.changed.insert(producer.node);
                    if let Some(record) = verifications.records.get_mut(&producer.node) {
                        record.undecided(&verifications.policy, check.generation);
                    }
                }
                // Nothing was decided against its verifiers: they are paid.
                verifications.pay_verifiers(check.answered, &[]);
            }
        }
    }

    /// Carries out a case's decision: the producers' records learn it, a
    /// failed answer quarantines the node that produced its first failed
    /// position, and verifiers whose verdict was contradicted are
    /// quarantined for it.
    fn decide(&self, state: &mut CoreState, now: Millis, id: u64, decision: &Decision) {
        let Some(check) = state.verifications.checks.remove(&id) else {
            return;
        };
        let generation = check.generation;
        tracing::info!(check = id, verdict = ?decision.verdict, "check decided");
        let mut quarantines: Vec<(NodeId, Quarantine)> = Vec::new();
        let verifications = &mut state.verifications;
        let policy = verifications.policy.clone();
        let failure = match decision.verdict {
            Verdict::Passed => None,
            // A failed verdict names a position; the producer of that
            // position cheated, those before it passed, those after it are
            // left unverified.
            Verdict::Failed => Some(check.first_failure.clone().unwrap_or_default()),
        };
        let culprit = failure.as_ref().map(|(position, _)| {
            check
                .producers
                .iter()
                .find(|producer| producer.positions.contains(position))
                .or(check.producers.last())
                .map(|producer| producer.node)
        });
        for producer in &check.producers {
            verifications.changed.insert(producer.node);
            let Some(record) = verifications.records.get_mut(&producer.node) else {
                continue;
            };
            match &failure {
                None => record.passed(&policy, generation),
                Some(_) if culprit == Some(Some(producer.node)) => {
                    let quarantine = record.failed(&policy, generation).unwrap_or_else(|| {
                        let reason = QuarantineReason::FailedVerification { generation };
                        record.quarantine(&policy, reason)
                    });
                    quarantines.push((producer.node, quarantine));
                }
                Some((position, _)) if producer.positions.end <= *position => {
                    record.passed(&policy, generation);
                }
                Some(_) => record.undecided(&policy, generation),
            }
        }
        for verifier in &decision.contradicted {
            verifications.changed.insert(*verifier);
            if let Some(record) = verifications.records.get_mut(verifier) {
                if !record.is_quarantined() {
                    let reason = QuarantineReason::FalseVerdict { generation };
                    quarantines.push((*verifier, record.quarantine(&policy, reason)));
                }
            }
        }
        let what = failure.map(|(_, what)| what);
        for (node, quarantine) in quarantines {
            self.quarantine(state, now, node, &quarantine, what.as_deref());
        }
        state
            .verifications
            .pay_verifiers(check.answered, &decision.contradicted);
    }

    /// An owned node broke the rules: it sent what the protocol forbids, or
    /// misreported what it is paid for (its compute time). No honest agent
    /// does either, so it is quarantined, with `generation` (the one it lied
    /// about, if any) among its suspects. Returns whether it was (the
    /// platform's own nodes have no record and are only disconnected by the
    /// caller).
    pub(super) fn broke_the_rules(
        &self,
        state: &mut CoreState,
        now: Millis,
        node: NodeId,
        generation: Option<RequestId>,
        what: &str,
    ) -> bool {
        let verifications = &mut state.verifications;
        let Some(record) = verifications.records.get_mut(&node) else {
            return false;
        };
        if record.is_quarantined() {
            return false;
        }
        let mut quarantine =
            record.quarantine(&verifications.policy, QuarantineReason::ProtocolViolation);
        if let Some(generation) = generation {
            if !quarantine.suspects.contains(&generation) {
                quarantine.suspects.push(generation);
            }
        }
        verifications.changed.insert(node);
        self.quarantine(state, now, node, &quarantine, Some(what));
        true
    }

    /// Quarantines a node: it is disconnected (its generations continue
    /// elsewhere from their committed tokens), refused when it comes back,
    /// and its suspect generations go to the books.
    fn quarantine(
        &self,
        state: &mut CoreState,
        now: Millis,
        node: NodeId,
        quarantine: &Quarantine,
        what: Option<&str>,
    ) {
        let verifications = &mut state.verifications;
        let name = verifications.names.get(&node).cloned().unwrap_or_default();
        let owner = verifications
            .owners
            .get(&node)
            .map(|(owner, _)| owner.clone())
            .unwrap_or_default();
        // Its answers still waiting for a verdict are as suspect as those
        // never drawn.
        let mut generations = quarantine.suspects.clone();
        generations.extend(
            verifications
                .checks
                .values()
                .filter(|check| check.producers.iter().any(|producer| producer.node == node))
                .map(|check| check.generation),
        );
        generations.sort_unstable();
        generations.dedup();
        let mut suspects = Vec::with_capacity(generations.len());
        let mut forgotten = 0;
        for generation in &generations {
            match verifications.public_ids.get(&generation.0) {
                Some(public_id) => suspects.push(public_id.clone()),
                None => forgotten += 1,
            }
        }
        let reason = match what {
            Some(what) if !what.is_empty() => format!("{}: {what}", quarantine.reason),
            _ => quarantine.reason.to_string(),
        };
        if verifications.noticed.insert(node) {
            self.metrics.nodes_quarantined.fetch_add(1, ORDER);
            tracing::warn!(node_id = %name, %reason, suspects = suspects.len(), "node quarantined");
        } else {
            // A later verdict on one of its answers: more to take back.
            tracing::info!(node_id = %name, %reason, suspects = suspects.len(), "quarantined node failed again");
        }
        verifications.unrecorded.insert(node);
        verifications.notices.push_back(QuarantineNotice {
            node: name,
            owner,
            reason,
            suspects,
            forgotten,
            at_ms: now.0,
        });
        self.drop_node(state, now, node);
    }
}

/// The check a generation id names, if it names one.
pub(super) fn parse_check_id(text: &str) -> Option<u64> {
    let (check, _dispatch) = text.strip_prefix(CHECK_ID_PREFIX)?.split_once('.')?;
    check.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn check_ids_are_not_generation_ids() {
        assert_eq!(parse_check_id("v12.3"), Some(12));
        assert_eq!(parse_check_id("12.3"), None);
        assert_eq!(parse_check_id("v12"), None);
    }

    /// Producers of one position each, none drawn for a check.
    fn producers(nodes: &[NodeId]) -> Vec<Producer> {
        nodes
            .iter()
            .map(|&node| Producer {
                node,
                owner: 0,
                positions: 0..1,
                drawn: false,
                platform: false,
            })
            .collect()
    }

    /// An answer's setting is its producers' when they share one, `Mixed`
    /// when a handover crossed settings, and `Off` for a node that never
    /// said (an older agent); a node's latest registration counts.
    #[test]
    fn an_answer_takes_the_attention_setting_its_producers_share() {
        let mut verifications =
            Verifications::new(VerificationPolicy::default(), Secret::from_seed(7));
        let (fast, off, silent) = (NodeId(1), NodeId(2), NodeId(3));
        verifications.connected(fast, "car-1", "owner-1", (proto::Attention::Exact, 0));
        verifications.connected(fast, "car-1", "owner-1", (proto::Attention::Fast, 1));
        verifications.connected(off, "car-2", "owner-2", (proto::Attention::Off, 2));
        let of = |nodes: &[NodeId]| verifications.attention_of(&producers(nodes));
        assert_eq!(of(&[fast]), proto::Attention::Fast);
        assert_eq!(of(&[fast, fast]), proto::Attention::Fast);
        assert_eq!(of(&[fast, off]), proto::Attention::Mixed);
        assert_eq!(of(&[off, silent]), proto::Attention::Off);
        assert_eq!(of(&[silent, fast]), proto::Attention::Mixed);
    }

    /// A verifier is told the producers' setting only when every producer computed with its own
    /// numerics (engine version, CPU kernels, setting); otherwise `Mixed`, the wider tolerance.
    #[test]
    fn a_verifier_of_other_numerics_takes_the_answer_as_mixed() {
        let mut verifications =
            Verifications::new(VerificationPolicy::default(), Secret::from_seed(7));
        let (avx2, avx2_too, avx512, sse42) = (NodeId(1), NodeId(2), NodeId(3), NodeId(4));
        verifications.connected(avx2, "car-1", "owner-1", (proto::Attention::Off, 0));
        verifications.connected(avx2_too, "car-2", "owner-2", (proto::Attention::Off, 0));
        verifications.connected(avx512, "dc-1", "", (proto::Attention::Off, 1));
        verifications.connected(sse42, "car-3", "owner-3", (proto::Attention::Off, 2));
        let told =
            |nodes: &[NodeId], verifier| verifications.attention_for(&producers(nodes), verifier);
        assert_eq!(told(&[avx2], avx2_too), proto::Attention::Off);
        assert_eq!(told(&[avx2, avx2_too], avx2), proto::Attention::Off);
        assert_eq!(told(&[avx2], avx512), proto::Attention::Mixed);
        assert_eq!(told(&[sse42], avx512), proto::Attention::Mixed);
        assert_eq!(told(&[avx2, sse42], avx2_too), proto::Attention::Mixed);
        assert_eq!(
            told(&[avx2], NodeId(9)),
            proto::Attention::Mixed,
            "unknown verifier"
        );
    }

    /// Nodes registered after the cell ran out of distinct numerics share one id, which says
    /// nothing about what they compute: such an answer is always taken as mixed.
    #[test]
    fn nodes_past_the_cells_distinct_numerics_are_alike_to_none() {
        let mut verifications =
            Verifications::new(VerificationPolicy::default(), Secret::from_seed(7));
        let other = crate::nodes::NUMERICS_OTHER;
        let (late, late_too, known) = (NodeId(1), NodeId(2), NodeId(3));
        verifications.connected(late, "car-1", "owner-1", (proto::Attention::Off, other));
        verifications.connected(late_too, "car-2", "owner-2", (proto::Attention::Off, other));
        verifications.connected(known, "car-3", "owner-3", (proto::Attention::Off, 0));
        let told =
            |nodes: &[NodeId], verifier| verifications.attention_for(&producers(nodes), verifier);
        assert_eq!(told(&[late], late_too), proto::Attention::Mixed);
        assert_eq!(told(&[late], known), proto::Attention::Mixed);
        assert_eq!(told(&[known], late), proto::Attention::Mixed);
    }
}
