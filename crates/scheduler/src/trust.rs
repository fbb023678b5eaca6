//! How far a node is believed. A node's claims (its slots, its speed) come from the node, which
//! is not trusted: a new node gets at most a few slots whatever it claims, and earns more by
//! completing generations; its decode speed, which decides whether a generation can finish
//! before the car leaves, is believed only up to the pace it has delivered (a modest default
//! until it delivered any). A running generation that makes no progress within a bound derived
//! from the pace the node has actually delivered is moved (`StopReason::Stalled`); a stall
//! costs the node what it had earned and halves its slots for good, and repeated stalls take it
//! out of placement.
//!
//! What a node has earned is kept by `NodeId` across reconnections, so that reconnecting does
//! not wipe its stalls; it is bounded by `SchedulerConfig::nodes_max` like the node table.

use crate::types::Millis;

/// The bounds of trust. `SchedulerConfig::trust` is `None` where nodes are the simulator's own
/// and always honest.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TrustConfig {
    /// Slots a node that has completed nothing gets at most, whatever it claims.
    pub unproven_slots_max: u16,
    /// Each this many completed generations earn a node one more slot, up to its claim.
    pub completed_per_slot: u32,
    /// Stalls after which a node gets no slot at all (it keeps its connection, and its running
    /// work moves as it stalls).
    pub stalls_max: u32,
    /// A generation is never declared stalled sooner than this after its last progress. An honest
    /// node's decode may wait behind another prompt's prefill chunk for seconds on a slow CPU.
    pub stall_floor_ms: u64,
    /// Nor later than this; also the bound for a node with no measured pace, and, with its
    /// prefill added, for an attempt's first token.
    pub stall_ceiling_ms: u64,
    /// An attempt's first token may take the ceiling plus its prefill (prompt and committed
    /// tokens) at this pace: a long prompt on a slow node is not a stall. A node that prefills
    /// slower than this is treated as stalled.
    pub stall_prefill_tokens_per_second: u32,
    /// Between tokens, a generation stalls after this many times the node's measured interval
    /// between tokens (then clamped to floor and ceiling).
    pub stall_interval_multiple: u32,
    /// The decode speed (tokens per second, per generation) believed of a node that has not
    /// delivered a measured pace yet, whatever it claims.
    pub unproven_decode_tokens_per_second: u32,
}

impl Default for TrustConfig {
    fn default() -> Self {
        TrustConfig {
            unproven_slots_max: 4,
            completed_per_slot: 1,
            stalls_max: 3,
            stall_floor_ms: 10_000,
            stall_ceiling_ms: 30_000,
            stall_prefill_tokens_per_second: 10,
            stall_interval_multiple: 20,
            unproven_decode_tokens_per_second: 20,
        }
    }
}

/// What a node has shown of itself.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(crate) struct NodeTrust {
    /// Generations it completed since its last stall.
    pub(crate) completed: u32,
    /// Stalls so far.
    pub(crate) stalls: u32,
    /// Measured milliseconds between two tokens of one generation (a moving average); `None`
    /// until it has delivered tokens after a first one.
    pub(crate) token_interval_ms: Option<u64>,
}

impl NodeTrust {
    /// Takes in `tokens` more tokens of one generation delivered `elapsed_ms` after its previous
    /// progress (not counting an attempt's first token, which includes its prefill).
    pub(crate) fn observe_tokens(&mut self, tokens: u32, elapsed_ms: u64) {
        if tokens == 0 {
            return;
        }
        let sample = elapsed_ms / u64::from(tokens);
        self.token_interval_ms = Some(match self.token_interval_ms {
            // Three parts history, one part news: one quick batch does not make a node fast.
            Some(average) => (average * 3 + sample) / 4,
            None => sample,
        });
    }

    pub(crate) fn stalled(&mut self) {
        self.stalls = self.stalls.saturating_add(1);
        self.completed = 0;
    }

    pub(crate) fn completed(&mut self) {
        self.completed = self.completed.saturating_add(1);
    }
}

impl TrustConfig {
    /// The slots a node is given: its claim, capped by what it has earned, halved for every
    /// stall, none at all after `stalls_max`.
    pub(crate) fn slots_allowed(&self, claimed: u16, trust: &NodeTrust) -> u16 {
        if trust.stalls >= self.stalls_max {
            return 0;
        }
        let earned = u64::from(self.unproven_slots_max)
            + u64::from(trust.completed / self.completed_per_slot.max(1));
        let earned = earned.checked_shr(trust.stalls).unwrap_or(0);
        claimed.min(u16::try_from(earned).unwrap_or(u16::MAX))
    }

    /// The decode speed believed of a node that claims `claimed`: at most the pace it has
    /// delivered (one generation's tokens per second, batching included), and at most
    /// `unproven_decode_tokens_per_second` before it delivered any.
    pub(crate) fn decode_believed(&self, claimed: f32, trust: &NodeTrust) -> f32 {
        let shown = match trust.token_interval_ms {
            Some(interval) => 1000.0 / interval.max(1) as f32,
            None => self.unproven_decode_tokens_per_second as f32,
        };
        claimed.min(shown)
    }

    /// How long a generation on a node may go without progress. `first_token` is `Some` with
    /// the tokens its prefill computes (prompt and committed ones) while the current attempt has
    /// delivered none yet.
    pub(crate) fn stall_after_ms(&self, trust: &NodeTrust, first_token: Option<u32>) -> u64 {
        match (first_token, trust.token_interval_ms) {
            (Some(prefill_tokens), _) => self.stall_ceiling_ms.saturating_add(
                u64::from(prefill_tokens).saturating_mul(1000)
                    / u64::from(self.stall_prefill_tokens_per_second.max(1)),
            ),
            (None, Some(interval)) => interval
                .saturating_mul(u64::from(self.stall_interval_multiple))
                .clamp(
                    self.stall_floor_ms,
                    self.stall_ceiling_ms.max(self.stall_floor_ms),
                ),
            (None, None) => self.stall_ceiling_ms,
        }
    }

    /// Whether a generation last progressing at `progress_at` has stalled by `now`.
    pub(crate) fn has_stalled(
        &self,
        now: Millis,
        progress_at: Millis,
        trust: &NodeTrust,
        first_token: Option<u32>,
    ) -> bool {
        now.since(progress_at) > self.stall_after_ms(trust, first_token)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config() -> TrustConfig {
        TrustConfig {
            unproven_slots_max: 2,
            completed_per_slot: 2,
            stalls_max: 2,
            stall_floor_ms: 1_000,
            stall_ceiling_ms: 10_000,
            stall_prefill_tokens_per_second: 100,
            stall_interval_multiple: 10,
            unproven_decode_tokens_per_second: 20,
        }
    }

    #[test]
    fn claimed_slots_are_capped_until_earned() {
        let config = config();
        let mut trust = NodeTrust::default();
        assert_eq!(config.slots_allowed(64, &trust), 2);
        assert_eq!(config.slots_allowed(1, &trust), 1);
        trust.completed();
        assert_eq!(config.slots_allowed(64, &trust), 2);
        trust.completed();
        assert_eq!(config.slots_allowed(64, &trust), 3);
        for _ in 0..1000 {
            trust.completed();
        }
        assert_eq!(config.slots_allowed(64, &trust), 64);
    }

    #[test]
    fn a_stall_costs_the_earned_slots_and_repeated_stalls_all_of_them() {
        let config = TrustConfig {
            stalls_max: 3,
            ..config()
        };
        let mut trust = NodeTrust::default();
        for _ in 0..10 {
            trust.completed();
        }
        assert_eq!(config.slots_allowed(64, &trust), 7);
        trust.stalled();
        assert_eq!(config.slots_allowed(64, &trust), 1, "(2 + 0) / 2");
        for _ in 0..4 {
            trust.completed();
        }
        assert_eq!(config.slots_allowed(64, &trust), 2, "earned back, halved");
        trust.stalled();
        assert_eq!(config.slots_allowed(64, &trust), 0, "2 / 4");
        trust.stalled();
        for _ in 0..100 {
            trust.completed();
        }
        assert_eq!(config.slots_allowed(64, &trust), 0, "out after stalls_max");
    }

    #[test]
    fn the_stall_bound_follows_the_measured_pace_within_floor_and_ceiling() {
        let config = config();
        let mut trust = NodeTrust::default();
        // No history: the conservative bound.
        assert_eq!(config.stall_after_ms(&trust, None), 10_000);
        trust.observe_tokens(10, 500);
        assert_eq!(trust.token_interval_ms, Some(50));
        assert_eq!(config.stall_after_ms(&trust, None), 1_000, "floor");
        trust.observe_tokens(1, 450);
        assert_eq!(trust.token_interval_ms, Some(150));
        assert_eq!(config.stall_after_ms(&trust, None), 1_500);
        // An attempt's first token waits for its prefill: the ceiling, plus its tokens at the
        // prefill pace (100 tokens/s here), whatever pace its decode showed.
        assert_eq!(config.stall_after_ms(&trust, Some(0)), 10_000);
        assert_eq!(config.stall_after_ms(&trust, Some(370)), 13_700);
        assert_eq!(
            config.stall_after_ms(&trust, Some(u32::MAX)),
            42_949_682_950
        );
        for _ in 0..20 {
            trust.observe_tokens(1, 60_000);
        }
        assert_eq!(config.stall_after_ms(&trust, None), 10_000, "ceiling");
    }

    #[test]
    fn stalled_means_strictly_past_the_bound() {
        let config = config();
        let trust = NodeTrust::default();
        let start = Millis(1_000);
        assert!(!config.has_stalled(start.plus(10_000), start, &trust, Some(0)));
        assert!(config.has_stalled(start.plus(10_001), start, &trust, Some(0)));
    }
}
