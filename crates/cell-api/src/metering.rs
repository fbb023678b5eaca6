//! What a cell counts of a generation for billing: one segment per node
//! attempt, with the tokens that attempt prefilled and produced and its share
//! of the node's time, plus the finishing node's own report. The core fills
//! these in under its lock (plain data, no I/O, time passed in); the gateway
//! turns them into the ledger's `CompletedRequest` once the generation is
//! done.
//!
//! A node decodes several generations in one batch, so a segment's compute
//! time is not its wall time: each node has a [`ShareClock`] that divides
//! every stretch of the node's time equally among the generations running on
//! it then. A segment reads the clock when it is assigned and at its last
//! activity; the difference is its share. With one generation the share is
//! the wall time; with k generations running together for T, each gets T/k,
//! so the owner is paid for the node's busy time once, not k times.
//!
//! A share is also bounded by the work the segment delivered: the tokens it
//! prefilled and produced at the speeds its node declared when it connected
//! (never below the floors here), times `PAID_COMPUTE_SLACK`
//! (see [`PaidSpeed`]). A node that holds a generation without producing is
//! not paid energy for waiting.

use std::collections::HashMap;

use domain::{NodeId, RequestId};
use serde::{Deserialize, Serialize};

/// How many times its tokens' time at its node's declared speeds a
/// segment's compute time (and so its owner's energy reimbursement) may
/// be: room for batching, a busy moment and the network, but a node that
/// sits on a generation is paid for its tokens, not for the wait.
pub const PAID_COMPUTE_SLACK: u64 = 2;

/// Slowest prefill speed a segment's compute time is bounded by, tokens/s:
/// a node declaring itself slower is bounded as if this fast, so that it
/// cannot raise its bound by lying (far below any supported vehicle).
pub const PAID_PREFILL_TOKENS_PER_SECOND_MIN: u64 = 50;

/// Slowest decode speed a segment's compute time is bounded by, tokens/s
/// (see `PAID_PREFILL_TOKENS_PER_SECOND_MIN`).
pub const PAID_DECODE_TOKENS_PER_SECOND_MIN: u64 = 5;

/// Microseconds in a millisecond: share clocks count in microseconds so that
/// dividing a millisecond among a batch loses next to nothing.
const MICROS_PER_MS: u64 = 1_000;

/// One node's share clock: the integral over time of 1 / (generations
/// running on the node), in microseconds.
///
/// **Invariant:** between two readings, the clock advances by at most the
/// wall time between them, and the generations running together over a
/// stretch of time are credited at most that stretch in total. Division
/// remainders are carried within a stretch of constant `running` and
/// dropped when it changes, so rounding never pays more than the wall time.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ShareClock {
    /// Generations running on the node now.
    running: u32,
    /// The clock's reading as of `updated_ms`.
    shared_us: u64,
    /// Microseconds of the current stretch not yet divided (fewer than
    /// `running`).
    undivided_us: u64,
    /// When the clock was last advanced (ms since the Unix epoch).
    updated_ms: i64,
}

impl ShareClock {
    /// A clock for a node with no generation running yet.
    pub fn new(now_ms: i64) -> ShareClock {
        ShareClock {
            updated_ms: now_ms,
            ..ShareClock::default()
        }
    }

    /// The reading at `now_ms`.
    pub fn read(&mut self, now_ms: i64) -> u64 {
        self.advance(now_ms);
        self.shared_us
    }

    /// A generation starts running on the node at `now_ms`; returns the
    /// reading it starts from.
    pub fn join(&mut self, now_ms: i64) -> u64 {
        self.advance(now_ms);
        self.running += 1;
        self.undivided_us = 0;
        self.shared_us
    }

    /// A generation stops running on the node at `now_ms` (it finished,
    /// failed, was cancelled, stopped or moved away, or the node was lost).
    pub fn leave(&mut self, now_ms: i64) {
        self.advance(now_ms);
        debug_assert!(self.running > 0, "a generation left an idle node");
        self.running = self.running.saturating_sub(1);
        self.undivided_us = 0;
    }

    /// Generations running on the node now.
    pub fn running(&self) -> u32 {
        self.running
    }

    /// Divides the time since the last advance among the running
    /// generations. A wall clock that steps back passes no time until it
    /// is past the last reading again.
    fn advance(&mut self, now_ms: i64) {
        if now_ms <= self.updated_ms {
            return;
        }
        let elapsed_ms = u64::try_from(now_ms - self.updated_ms).unwrap_or(0);
        self.updated_ms = now_ms;
        if self.running == 0 {
            return;
        }
        let running = u64::from(self.running);
        let divisible_us = elapsed_ms
            .saturating_mul(MICROS_PER_MS)
            .saturating_add(self.undivided_us);
        self.shared_us = self.shared_us.saturating_add(divisible_us / running);
        self.undivided_us = divisible_us % running;
    }
}

/// Every node's share clock, and which node each request's current attempt
/// runs on. The core keeps one under its lock and tells it whenever an
/// attempt starts or stops running on a node; a clock exists only while its
/// node runs something, so both maps are bounded by the in-flight requests.
#[derive(Debug, Default)]
pub struct NodeShares {
    clocks: HashMap<NodeId, ShareClock>,
    running_on: HashMap<RequestId, NodeId>,
}

impl NodeShares {
    /// The request's attempt starts running on `node` at `now_ms` (after
    /// leaving the node of its previous attempt, if it still ran there).
    /// Returns the reading its segment starts from.
    pub fn start(&mut self, request: RequestId, node: NodeId, now_ms: i64) -> u64 {
        self.stop(request, now_ms);
        self.running_on.insert(request, node);
        self.clocks
            .entry(node)
            .or_insert_with(|| ShareClock::new(now_ms))
            .join(now_ms)
    }

    /// The reading of the clock of the node the request's attempt runs on,
    /// or `None` if it runs nowhere.
    pub fn read(&mut self, request: RequestId, now_ms: i64) -> Option<u64> {
        let node = self.running_on.get(&request)?;
        Some(self.clocks.get_mut(node)?.read(now_ms))
    }

    /// The request's attempt stops running on its node at `now_ms`: it
    /// finished, failed, was cancelled, stopped or moved, or the node was
    /// lost. Does nothing if it ran nowhere, so every path that ends an
    /// attempt may call it.
    pub fn stop(&mut self, request: RequestId, now_ms: i64) {
        let Some(node) = self.running_on.remove(&request) else {
            return;
        };
        let Some(clock) = self.clocks.get_mut(&node) else {
            debug_assert!(false, "a running attempt's node has no share clock");
            return;
        };
        clock.leave(now_ms);
        if clock.running() == 0 {
            self.clocks.remove(&node);
        }
    }

    /// Generations running on `node`.
    pub fn running(&self, node: NodeId) -> u32 {
        self.clocks.get(&node).map_or(0, ShareClock::running)
    }
}

/// The speeds a segment's compute time is bounded by: those its node
/// declared in its `Hello`, raised to `PAID_*_TOKENS_PER_SECOND_MIN`,
/// so that declaring itself slow cannot raise a node's bound.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PaidSpeed {
    pub prefill_tokens_per_second: u64,
    pub decode_tokens_per_second: u64,
}

impl PaidSpeed {
    /// From the speeds a node declared (floats on the wire: a NaN, a
    /// negative or a tiny value becomes the floor; a huge one saturates).
    pub fn declared(prefill_tokens_per_second: f64, decode_tokens_per_second: f64) -> PaidSpeed {
        // A float-to-integer cast saturates, and NaN becomes 0.
        PaidSpeed {
            prefill_tokens_per_second: (prefill_tokens_per_second as u64)
                .max(PAID_PREFILL_TOKENS_PER_SECOND_MIN),
            decode_tokens_per_second: (decode_tokens_per_second as u64)
                .max(PAID_DECODE_TOKENS_PER_SECOND_MIN),
        }
    }

    /// The most compute time a segment that prefilled `prefilled_tokens`
    /// and produced `completion_tokens` is paid for, in ms: each phase
    /// rounded up, times the slack.
    pub fn compute_ms_max(&self, prefilled_tokens: u32, completion_tokens: u32) -> u64 {
        let phase_ms =
            |tokens: u32, per_second: u64| (u64::from(tokens) * 1_000).div_ceil(per_second.max(1));
        let expected_ms = phase_ms(prefilled_tokens, self.prefill_tokens_per_second)
            + phase_ms(completion_tokens, self.decode_tokens_per_second);
        expected_ms.saturating_mul(PAID_COMPUTE_SLACK)
    }
}

/// One attempt of a generation on one node.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SegmentTrack {
    /// The node's enrolled name.
    pub node: String,
    /// Tokens the node prefilled: the prompt, plus on a resumed attempt the
    /// tokens committed before it (a re-prefill, never billed to the tenant).
    pub prefilled_tokens: u32,
    /// Tokens this attempt produced and the cell committed.
    pub completion_tokens: u32,
    /// When the attempt was assigned (ms since the Unix epoch).
    pub started_ms: i64,
    /// When the attempt last produced a token or finished.
    pub last_active_ms: i64,
    /// The node's share clock when the attempt was assigned (µs).
    pub share_started_us: u64,
    /// The node's share clock when the attempt last produced a token or
    /// finished (µs).
    pub share_last_active_us: u64,
    /// What bounds the attempt's compute time by its tokens.
    pub speed: PaidSpeed,
}

impl SegmentTrack {
    /// An attempt assigned at `now_ms`, when its node's share clock read
    /// `share_us` (the reading `ShareClock::join` returned).
    pub fn started(
        node: String,
        prefilled_tokens: u32,
        now_ms: i64,
        share_us: u64,
        speed: PaidSpeed,
    ) -> SegmentTrack {
        SegmentTrack {
            node,
            prefilled_tokens,
            completion_tokens: 0,
            started_ms: now_ms,
            last_active_ms: now_ms,
            share_started_us: share_us,
            share_last_active_us: share_us,
            speed,
        }
    }

    /// The attempt produced a token or finished at `now_ms`, when its node's
    /// share clock read `share_us`.
    pub fn active(&mut self, now_ms: i64, share_us: u64) {
        self.last_active_ms = self.last_active_ms.max(now_ms);
        self.share_last_active_us = self.share_last_active_us.max(share_us);
    }

    /// Wall time from assignment to the last token.
    pub fn wall_ms(&self) -> u64 {
        u64::try_from(self.last_active_ms - self.started_ms).unwrap_or(0)
    }

    /// The node's time this attempt is paid for: its share of the node from
    /// assignment to its last token, where every moment is divided equally
    /// among the generations running on the node then. Never more than the
    /// wall time, nor than its tokens take at its node's paid speed.
    pub fn compute_ms(&self) -> u64 {
        let shared_us = self
            .share_last_active_us
            .saturating_sub(self.share_started_us);
        (shared_us / MICROS_PER_MS)
            .min(self.wall_ms())
            .min(self.compute_ms_max())
    }

    /// What this attempt's tokens take at its node's paid speed.
    pub fn compute_ms_max(&self) -> u64 {
        self.speed
            .compute_ms_max(self.prefilled_tokens, self.completion_tokens)
    }
}

/// The finishing node's own account of its attempt (from `GenerationDone`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeReport {
    /// The prompt as the node received it.
    pub prompt_tokens: u32,
    /// Committed tokens it was given plus those it produced.
    pub completion_tokens: u32,
    pub compute_ms: u64,
}

/// Everything billing needs of a finished generation.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Metering {
    /// The prompt, as the gateway tokenized it.
    pub prompt_tokens: u32,
    /// Every attempt, in order; the last one finished the generation.
    pub segments: Vec<SegmentTrack>,
    pub node_report: Option<NodeReport>,
    pub finished_ms: i64,
}

#[cfg(test)]
mod tests {
    use super::*;

    /// So slow that the token bound never binds in the timelines below,
    /// which are about shares.
    const UNBINDING: PaidSpeed = PaidSpeed {
        prefill_tokens_per_second: 1,
        decode_tokens_per_second: 1,
    };

    /// What happens to an attempt at a moment, as the core reports it.
    #[derive(Clone, Copy, Debug)]
    enum Step {
        /// Assigned to a node.
        Start(u64, u32),
        /// Produced a token.
        Token(u64),
        /// Finished: a last activity, then it stops running.
        Finish(u64),
        /// Stopped or moved away without a last token.
        Stop(u64),
    }

    /// Every segment (request, node, compute ms, wall ms) in start order,
    /// and each node's busy wall time (ms with at least one generation).
    struct Outcome {
        segments: Vec<(u64, u32, u64, u64)>,
        busy_ms: HashMap<u32, u64>,
    }

    /// Drives `NodeShares` and `SegmentTrack` the way the core does, through
    /// a timeline of (ms, step) in time order.
    fn run(timeline: &[(i64, Step)]) -> Outcome {
        let mut shares = NodeShares::default();
        let mut tracks: Vec<(u64, u32, SegmentTrack)> = Vec::new();
        let mut busy_ms: HashMap<u32, u64> = HashMap::new();
        let mut last_ms = timeline.first().map_or(0, |(at, _)| *at);
        let mut nodes: Vec<u32> = Vec::new();
        for &(at, step) in timeline {
            for &node in &nodes {
                if shares.running(NodeId(node)) > 0 {
                    *busy_ms.entry(node).or_default() += u64::try_from(at - last_ms).unwrap();
                }
            }
            last_ms = at;
            let last_of = |tracks: &mut Vec<(u64, u32, SegmentTrack)>, request| {
                let position = tracks.iter().rposition(|(id, _, _)| *id == request);
                position.expect("a started request")
            };
            match step {
                Step::Start(request, node) => {
                    if !nodes.contains(&node) {
                        nodes.push(node);
                    }
                    let share_us = shares.start(RequestId(request), NodeId(node), at);
                    let track =
                        SegmentTrack::started(format!("car-{node}"), 10, at, share_us, UNBINDING);
                    tracks.push((request, node, track));
                }
                Step::Token(request) | Step::Finish(request) => {
                    let share_us = shares.read(RequestId(request), at).expect("running");
                    let position = last_of(&mut tracks, request);
                    tracks[position].2.active(at, share_us);
                    if matches!(step, Step::Finish(_)) {
                        shares.stop(RequestId(request), at);
                    }
                }
                Step::Stop(request) => shares.stop(RequestId(request), at),
            }
        }
        assert!(
            nodes.iter().all(|node| shares.running(NodeId(*node)) == 0),
            "every attempt of a timeline ends"
        );
        assert!(shares.clocks.is_empty() && shares.running_on.is_empty());
        let segments = tracks
            .iter()
            .map(|(request, node, track)| (*request, *node, track.compute_ms(), track.wall_ms()))
            .collect();
        Outcome { segments, busy_ms }
    }

    fn compute_of(outcome: &Outcome) -> Vec<(u64, u32, u64)> {
        outcome
            .segments
            .iter()
            .map(|(request, node, compute, _)| (*request, *node, *compute))
            .collect()
    }

    #[test]
    fn a_lone_generation_is_paid_its_wall_time() {
        let outcome = run(&[
            (1_000, Step::Start(1, 0)),
            (1_500, Step::Token(1)),
            (3_400, Step::Finish(1)),
        ]);
        assert_eq!(outcome.segments, [(1, 0, 2_400, 2_400)]);
        assert_eq!(outcome.busy_ms[&0], 2_400);
    }

    #[test]
    fn generations_batched_together_split_the_nodes_time_between_them() {
        let mut timeline: Vec<(i64, Step)> = (1..=4).map(|id| (0, Step::Start(id, 0))).collect();
        timeline.extend((1..=4).map(|id| (4_000, Step::Finish(id))));
        let outcome = run(&timeline);
        assert_eq!(
            compute_of(&outcome),
            [(1, 0, 1_000), (2, 0, 1_000), (3, 0, 1_000), (4, 0, 1_000)]
        );

        // Overlapping for part of the time: 0–1 s one generation, 1–2 s
        // three, 2–3 s two.
        let outcome = run(&[
            (0, Step::Start(1, 0)),
            (1_000, Step::Start(2, 0)),
            (1_000, Step::Start(3, 0)),
            (2_000, Step::Finish(3)),
            (3_000, Step::Finish(2)),
            (3_000, Step::Finish(1)),
        ]);
        assert_eq!(
            compute_of(&outcome),
            [(1, 0, 1_833), (2, 0, 833), (3, 0, 333)]
        );
        let paid: u64 = outcome.segments.iter().map(|segment| segment.2).sum();
        // A third of a millisecond is lost to rounding down, never gained.
        assert_eq!((paid, outcome.busy_ms[&0]), (2_999, 3_000));
    }

    #[test]
    fn a_migrated_generation_is_paid_each_nodes_share_separately() {
        // Request 1 shares car-0 with request 2, produces its last token
        // there at 1.5 s, is stopped at 2 s and resumes alone on car-1.
        let outcome = run(&[
            (0, Step::Start(1, 0)),
            (0, Step::Start(2, 0)),
            (1_500, Step::Token(1)),
            (2_000, Step::Stop(1)),
            (2_500, Step::Start(1, 1)),
            (3_000, Step::Finish(2)),
            (3_500, Step::Finish(1)),
        ]);
        assert_eq!(
            compute_of(&outcome),
            [(1, 0, 750), (2, 0, 2_000), (1, 1, 1_000)]
        );
        assert_eq!(outcome.busy_ms[&0], 3_000);
        assert_eq!(outcome.busy_ms[&1], 1_000);
    }

    #[test]
    fn a_new_assignment_leaves_the_previous_node_even_without_a_stop() {
        let mut shares = NodeShares::default();
        shares.start(RequestId(1), NodeId(0), 0);
        shares.start(RequestId(1), NodeId(1), 100);
        assert_eq!(
            (shares.running(NodeId(0)), shares.running(NodeId(1))),
            (0, 1)
        );
        shares.stop(RequestId(1), 200);
        shares.stop(RequestId(1), 300);
        assert_eq!(shares.running(NodeId(1)), 0);
        assert_eq!(shares.read(RequestId(1), 400), None);
    }

    #[test]
    fn a_wall_clock_stepping_back_credits_no_time() {
        let mut clock = ShareClock::new(5_000);
        let started = clock.join(5_000);
        assert_eq!(clock.read(4_000), started);
        assert_eq!(clock.read(5_000), started);
        assert_eq!(clock.read(5_010) - started, 10_000);
        let mut track = SegmentTrack::started("car-0".into(), 1, 5_000, started, UNBINDING);
        track.active(4_000, started);
        assert_eq!((track.wall_ms(), track.compute_ms()), (0, 0));
    }

    /// A small deterministic generator, so that the timeline replays.
    fn next(state: &mut u64) -> u64 {
        *state ^= *state << 13;
        *state ^= *state >> 7;
        *state ^= *state << 17;
        *state
    }

    #[test]
    fn no_segment_is_paid_more_than_its_wall_time_nor_a_node_more_than_its_busy_time() {
        let mut seed = 0x9e37_79b9_7f4a_7c15_u64;
        let mut timeline = Vec::new();
        let mut running: Vec<u64> = Vec::new();
        let mut at = 0_i64;
        for request in 1..=400_u64 {
            // Odd gaps of 0–6 ms between events make remainders everywhere.
            at += i64::try_from(next(&mut seed) % 7).unwrap();
            timeline.push((at, Step::Start(request, (next(&mut seed) % 3) as u32)));
            running.push(request);
            while running.len() > 5 || (running.len() > 1 && next(&mut seed).is_multiple_of(2)) {
                let chosen = running.remove((next(&mut seed) % running.len() as u64) as usize);
                at += i64::try_from(next(&mut seed) % 5).unwrap();
                timeline.push((at, Step::Token(chosen)));
                at += i64::try_from(next(&mut seed) % 3).unwrap();
                let end = if next(&mut seed).is_multiple_of(4) {
                    Step::Stop(chosen)
                } else {
                    Step::Finish(chosen)
                };
                timeline.push((at, end));
            }
        }
        at += 1;
        timeline.extend(running.iter().map(|&request| (at, Step::Finish(request))));
        let outcome = run(&timeline);
        for &(request, _, compute, wall) in &outcome.segments {
            assert!(compute <= wall, "request {request}: {compute} > {wall}");
        }
        for (node, busy) in &outcome.busy_ms {
            let paid: u64 = outcome
                .segments
                .iter()
                .filter(|segment| segment.1 == *node)
                .map(|segment| segment.2)
                .sum();
            assert!(paid <= *busy, "car-{node}: paid {paid} of {busy} busy ms");
            // Rounding and stops before the last activity lose some time,
            // but the shares still account for most of the node's time.
            assert!(paid * 10 >= *busy * 5, "car-{node}: paid {paid} of {busy}");
        }
    }

    #[test]
    fn a_segment_is_paid_no_more_than_its_tokens_take_at_the_declared_speed() {
        // A node that declared 40 tokens/s decode and 200 prefill holds a
        // 30-token prompt for 25 s before its only token.
        let speed = PaidSpeed::declared(200.0, 40.0);
        let mut track = SegmentTrack::started("car-0".into(), 30, 0, 0, speed);
        track.completion_tokens = 1;
        track.active(25_000, 25_000_000);
        // (150 ms + 25 ms) times the slack.
        let bound = 175 * PAID_COMPUTE_SLACK;
        assert_eq!(track.compute_ms_max(), bound);
        assert_eq!(track.compute_ms(), bound);
        assert_eq!(track.wall_ms(), 25_000);
    }

    #[test]
    fn declaring_itself_slow_does_not_raise_a_nodes_bound() {
        let floors = PaidSpeed {
            prefill_tokens_per_second: PAID_PREFILL_TOKENS_PER_SECOND_MIN,
            decode_tokens_per_second: PAID_DECODE_TOKENS_PER_SECOND_MIN,
        };
        for (prefill, decode) in [(0.0, 0.0), (0.001, 0.001), (-5.0, f64::NAN)] {
            assert_eq!(PaidSpeed::declared(prefill, decode), floors);
        }
        assert_eq!(
            PaidSpeed::declared(f64::INFINITY, 1e300).compute_ms_max(1_000, 1_000),
            2 * PAID_COMPUTE_SLACK,
            "an infinitely fast node is bounded to the rounding of each phase"
        );
        // An honest node's time within the bound is paid in full.
        let mut track = SegmentTrack::started("car-0".into(), 100, 0, 0, floors);
        track.completion_tokens = 20;
        track.active(1_500, 1_500_000);
        assert_eq!(track.compute_ms(), 1_500);
    }
}
