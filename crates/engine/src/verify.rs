//! Verification by recomputation: was each token of a reported completion the one the sampler
//! had to pick?
//!
//! Sampling is keyed by `(seed, position)` ([`crate::sampler`]), so given the logits at a
//! position there is exactly one right token, not merely a likely one. A verifier prefills the
//! prompt and the reported completion in one call, and at every completion position checks
//! ([`check_token`]):
//!
//! - the token is the sampler's pick from the verifier's logits, or, where honest hardware could
//!   have picked it, a pick under logits that differ from the verifier's by at most
//!   [`Tolerance::logit`] each: a prefill computes with other kernels than a decode (several
//!   tokens per matrix product, other reduction orders), so logits differ in their last bits,
//!   and a near-tie or a draw near a boundary between two tokens can go either way;
//! - the reported log-probability is within [`Tolerance::logprob`] of the recomputed one.
//!
//! **The tolerant rule.** Write `δ` for [`Tolerance::logit`] and `T` for the temperature. An
//! honest node's logits are the verifier's moved by at most `δ` each, so a difference of two
//! logits moves by at most `2δ` and a ratio of two draw weights `e^(logit/T)` by a factor of at
//! most `e^(2δ/T)`. A token passes when:
//!
//! - greedy: its logit is within `2δ` of the largest;
//! - drawn: every cut (top-k, top-p, min-p) could have kept it, the position's uniform draw lies
//!   inside the widest interval of the cumulative distribution that moved weights could give
//!   it, and moved logits could give it any weight at all (the sampler's weights are 0 below
//!   `e^-87`). Tokens within
//!   `2δ/T` of each other in scaled logit may swap places in the most-likely-first order of the
//!   cut paths; the interval counts them on whichever side widens it.
//!
//! The rule errs on the side of the honest node: it accepts every token that logits within `δ`
//! could give (and some more, where the bounds are not tight). It does not ask how likely the
//! token was: an honest draw does land on a token of probability 1e-8 now and then. A node running another model, another quantization, random or replayed
//! tokens is off by far more than `δ` at most positions; cutting an answer short is caught at
//! its end ([`check_end`]). The calibration of `δ` is in `docs/VERIFICATION.md`;
//! [`Checked::tolerance_used`] is what it reads.

use crate::sampler::{uniform_for_position, Sampler, SamplingParams};
use crate::TokenId;

/// How far an honest engine's numbers may be from the verifier's.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Tolerance {
    /// Largest difference of one logit, in logit units.
    pub logit: f32,
    /// Largest difference between a reported log-probability and the recomputed one.
    pub logprob: f32,
}

/// The calibrated tolerance (`docs/VERIFICATION.md`): about twice the largest difference seen
/// between honest engines that differ in threads, batch composition, parallel sequences and
/// resumption, and the verifier's prefill.
pub const DEFAULT_TOLERANCE: Tolerance = Tolerance {
    logit: 0.25,
    logprob: 0.75,
};

/// The calibrated tolerance where the verifier's attention setting (`FlashAttention`) is not
/// the one the answer was computed with (`docs/VERIFICATION.md`): about twice the largest
/// difference seen between honest engines of different settings, batched and handed over, on
/// prompts long enough for flash attention's batch- and thread-dependent kernels. Flash
/// attention sums a query's cells in another order than the dot product does, so its logits move
/// further from a verifier's without it than [`DEFAULT_TOLERANCE`] allows. Engines of the same
/// setting stay within the default, which catches more: see [`tolerance`].
pub const FLASH_ATTENTION_TOLERANCE: Tolerance = Tolerance {
    logit: 0.4,
    logprob: 1.0,
};

/// The tolerance of a verification by an engine of setting `verifier` of an answer whose
/// producers all ran `producers` (`None`: they ran different settings):
/// [`DEFAULT_TOLERANCE`] when the settings are the same, else [`FLASH_ATTENTION_TOLERANCE`].
pub fn tolerance(
    verifier: crate::FlashAttention,
    producers: Option<crate::FlashAttention>,
) -> Tolerance {
    if producers == Some(verifier) {
        DEFAULT_TOLERANCE
    } else {
        FLASH_ATTENTION_TOLERANCE
    }
}

/// Below this scaled logit (relative to the most likely token) the sampler's weight of a token
/// is 0: it is never drawn.
const WEIGHTLESS_BELOW: f64 = -87.0;

/// Slack on the uniform draw's interval: the sampler's own sums round in f64.
const DRAW_SLACK: f64 = 1e-9;

/// Bisection steps of [`Landscape::least_tolerance`]: within 1/256 of the tolerance.
const TOLERANCE_BISECTIONS: u32 = 8;

/// Mismatches kept in a [`Verification`]; the rest are only counted.
pub const MISMATCHES_KEPT: usize = 8;

/// A reported completion to check: the generation's prompt, sampling and adjustments are the
/// [`crate::Generation`]'s own.
#[derive(Clone, Debug, PartialEq)]
pub struct Verify {
    /// The completion's tokens, end-of-generation token excluded.
    pub completion: Vec<TokenId>,
    /// How many of the completion's first tokens are given, not checked: committed before the
    /// nodes being checked took the answer. They are replayed into penalties and the grammar
    /// like the others.
    pub given: u32,
    /// The log-probability reported with each checked completion token (those after `given`).
    pub logprobs: Vec<f32>,
    /// The node reported that the answer ended with an end-of-generation token after the last
    /// completion token.
    pub ended_by_eos: bool,
    pub tolerance: Tolerance,
}

/// What a position's check found wrong.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Mismatch {
    /// The token is not one the sampler could have picked here; `pick` is the verifier's.
    NotPicked {
        position: u32,
        token: TokenId,
        pick: TokenId,
    },
    /// The reported log-probability is not the token's.
    Logprob {
        position: u32,
        reported: f32,
        recomputed: f32,
    },
    /// The answer ended where no end-of-generation token could have been picked.
    EndedEarly { position: u32, pick: TokenId },
}

impl Mismatch {
    /// The completion position that failed.
    #[must_use]
    pub fn position(&self) -> u32 {
        match *self {
            Mismatch::NotPicked { position, .. }
            | Mismatch::Logprob { position, .. }
            | Mismatch::EndedEarly { position, .. } => position,
        }
    }
}

impl std::fmt::Display for Mismatch {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match *self {
            Mismatch::NotPicked {
                position,
                token,
                pick,
            } => write!(
                f,
                "token {token} at position {position} is not one the sampler could pick (it picks {pick})"
            ),
            Mismatch::Logprob {
                position,
                reported,
                recomputed,
            } => write!(
                f,
                "log-probability {reported} reported at position {position}, recomputed {recomputed}"
            ),
            Mismatch::EndedEarly { position, pick } => write!(
                f,
                "the answer ended at position {position}, where the sampler picks {pick}, not an end"
            ),
        }
    }
}

/// The outcome of checking a whole completion.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Verification {
    /// Positions checked (the end counts as one when the answer ended by end-of-generation).
    pub checked: u32,
    /// Positions whose token was exactly the verifier's own pick.
    pub exact: u32,
    /// Every position that failed.
    pub mismatch_count: u32,
    /// The first [`MISMATCHES_KEPT`] failures, in position order.
    pub mismatches: Vec<Mismatch>,
    /// The largest difference between a reported and a recomputed log-probability.
    pub max_logprob_difference: f32,
    /// The largest [`Checked::tolerance_used`] of a position that passed.
    pub max_tolerance_used: f32,
}

impl Verification {
    /// Whether every position passed.
    #[must_use]
    pub fn passed(&self) -> bool {
        self.mismatch_count == 0
    }

    /// Adds one position's outcome.
    pub fn record(&mut self, outcome: Checked) {
        self.checked += 1;
        if outcome.exact {
            self.exact += 1;
        }
        if let Some(difference) = outcome.logprob_difference {
            self.max_logprob_difference = self.max_logprob_difference.max(difference);
        }
        match outcome.mismatch {
            None => {
                self.max_tolerance_used = self.max_tolerance_used.max(outcome.tolerance_used);
            }
            Some(mismatch) => {
                self.mismatch_count += 1;
                if self.mismatches.len() < MISMATCHES_KEPT {
                    self.mismatches.push(mismatch);
                }
            }
        }
    }
}

/// One position's outcome.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Checked {
    /// The token was the verifier's own pick.
    pub exact: bool,
    /// `|reported − recomputed|`, when a log-probability was reported.
    pub logprob_difference: Option<f32>,
    /// How much of [`Tolerance::logit`] the token needed to pass (to within 1/256): 0 for the
    /// exact pick, at most 1 when it passed, infinite when not even the tolerance let it
    /// through.
    pub tolerance_used: f32,
    pub mismatch: Option<Mismatch>,
}

/// Checks that `token`, reported with log-probability `reported_logprob`, is what the sampler
/// picks at completion `position` from `logits` (the logits as the sampler sees them: after
/// penalties, bias and the end-of-generation mask), within `tolerance`.
pub fn check_token(
    sampler: &mut Sampler,
    logits: &[f32],
    params: &SamplingParams,
    position: u32,
    token: TokenId,
    reported_logprob: f32,
    tolerance: &Tolerance,
) -> Checked {
    let pick = sampler.sample(logits, params, position, 0).token;
    let recomputed = sampler.score(logits, token, 0).logprob;
    let exact = pick == token;
    let tolerance_used = if exact {
        0.0
    } else {
        Landscape::new(logits, params, position).map_or(f32::INFINITY, |landscape| {
            landscape.tolerance_used(token, tolerance.logit)
        })
    };
    let logprob_difference = (reported_logprob - recomputed).abs();
    let mismatch = if tolerance_used > 1.0 {
        Some(Mismatch::NotPicked {
            position,
            token,
            pick,
        })
    } else if !reported_logprob.is_finite()
        || !recomputed.is_finite()
        || logprob_difference.is_nan()
        || logprob_difference > tolerance.logprob
    {
        Some(Mismatch::Logprob {
            position,
            reported: reported_logprob,
            recomputed,
        })
    } else {
        None
    };
    Checked {
        exact,
        logprob_difference: logprob_difference.is_finite().then_some(logprob_difference),
        tolerance_used,
        mismatch,
    }
}

/// Checks that one of `end_of_generation` could be picked at completion `position` from
/// `logits` (an answer the node said ended there).
pub fn check_end(
    sampler: &mut Sampler,
    logits: &[f32],
    params: &SamplingParams,
    position: u32,
    end_of_generation: &[TokenId],
    tolerance: &Tolerance,
) -> Checked {
    let pick = sampler.sample(logits, params, position, 0).token;
    let exact = end_of_generation.contains(&pick);
    let tolerance_used = if exact {
        0.0
    } else {
        Landscape::new(logits, params, position).map_or(f32::INFINITY, |landscape| {
            end_of_generation
                .iter()
                .map(|&token| landscape.tolerance_used(token, tolerance.logit))
                .fold(f32::INFINITY, f32::min)
        })
    };
    Checked {
        exact,
        logprob_difference: None,
        tolerance_used,
        mismatch: (tolerance_used > 1.0).then_some(Mismatch::EndedEarly { position, pick }),
    }
}

/// The verifier's distribution at one position, prepared once for any number of trials of
/// tokens and tolerances.
struct Landscape<'a> {
    logits: &'a [f32],
    params: SamplingParams,
    uniform: f64,
    /// The largest logit; finite.
    max: f32,
    /// The draw's weights; `None` for greedy sampling.
    weights: Option<Weights>,
    /// The weights most likely first, for the cut paths (top-k, top-p).
    sorted: Option<SortedMass>,
}

impl<'a> Landscape<'a> {
    /// `None` when no logit is finite (nothing could be picked).
    fn new(logits: &'a [f32], params: &SamplingParams, position: u32) -> Option<Self> {
        let max = logits
            .iter()
            .copied()
            .filter(|logit| !logit.is_nan())
            .fold(f32::NEG_INFINITY, f32::max);
        if !max.is_finite() {
            return None;
        }
        let (weights, sorted) = if params.is_greedy() {
            (None, None)
        } else {
            let weights = Weights::new(logits, max, f64::from(params.temperature));
            let cut_by_k = params.top_k > 0 && (params.top_k as usize) < logits.len();
            let cut_by_p = params.top_p > 0.0 && params.top_p < 1.0;
            let sorted = (cut_by_k || cut_by_p).then(|| SortedMass::new(&weights));
            (Some(weights), sorted)
        };
        Some(Landscape {
            logits,
            params: *params,
            uniform: uniform_for_position(params.seed, position),
            max,
            weights,
            sorted,
        })
    }

    /// The share of `tolerance` (a logit tolerance) that `token` needs to be pickable, to
    /// within 1/256; infinite when `tolerance` is not enough or the token is no token.
    fn tolerance_used(&self, token: TokenId, tolerance: f32) -> f32 {
        let Some((index, logit)) = usize::try_from(token)
            .ok()
            .and_then(|index| Some((index, *self.logits.get(index)?)))
        else {
            return f32::INFINITY;
        };
        if !self.could_pick(index, logit, tolerance) {
            return f32::INFINITY;
        }
        let (mut low, mut high) = (0.0_f32, tolerance);
        for _ in 0..TOLERANCE_BISECTIONS {
            let middle = (low + high) / 2.0;
            if self.could_pick(index, logit, middle) {
                high = middle;
            } else {
                low = middle;
            }
        }
        if tolerance > 0.0 {
            high / tolerance
        } else {
            0.0
        }
    }

    /// Whether logits within `delta` of the verifier's each could make the sampler pick the
    /// token `index` (in the vocabulary, with logit `logit`).
    fn could_pick(&self, index: usize, logit: f32, delta: f32) -> bool {
        if !logit.is_finite() {
            return false;
        }
        let delta = f64::from(delta.max(0.0));
        let Some(weights) = &self.weights else {
            return f64::from(self.max) - f64::from(logit) <= 2.0 * delta;
        };
        let shift = delta / f64::from(self.params.temperature);
        let interval = match &self.sorted {
            Some(sorted) => sorted_interval(weights, sorted, index, &self.params, shift),
            None => weights.id_order_interval(index, &self.params, shift),
        };
        weights.scaled[index] + 2.0 * shift >= WEIGHTLESS_BELOW
            && interval.is_some_and(|(low, high)| {
                low - DRAW_SLACK <= self.uniform && self.uniform <= high + DRAW_SLACK
            })
    }
}

/// Draw weights relative to the most likely token.
struct Weights {
    /// `(logit − max) / T` per token id; NaN logits count as −inf.
    scaled: Vec<f64>,
    /// `e^scaled` per token id.
    weight: Vec<f64>,
}

impl Weights {
    fn new(logits: &[f32], max: f32, temperature: f64) -> Self {
        let scaled: Vec<f64> = logits
            .iter()
            .map(|&logit| {
                if logit.is_nan() {
                    f64::NEG_INFINITY
                } else {
                    (f64::from(logit) - f64::from(max)) / temperature
                }
            })
            .collect();
        let weight = scaled.iter().map(|&scaled| scaled.exp()).collect();
        Self { scaled, weight }
    }

    /// The widest range of the uniform draw in which the sampler's id-order draw over the whole
    /// vocabulary (no top-k, no top-p) could pick `index`, every weight moved by up to
    /// `e^shift`; `None` when min-p must cut it.
    fn id_order_interval(
        &self,
        index: usize,
        params: &SamplingParams,
        shift: f64,
    ) -> Option<(f64, f64)> {
        if !above_min_p(self.scaled[index], params.min_p, shift).0 {
            return None;
        }
        let mut before = Mass::default();
        let mut after = Mass::default();
        for (other, (&scaled, &weight)) in self.scaled.iter().zip(&self.weight).enumerate() {
            if other == index {
                continue;
            }
            let (possible, certain) = above_min_p(scaled, params.min_p, shift);
            let mass = if other < index {
                &mut before
            } else {
                &mut after
            };
            mass.add(weight, possible, certain);
        }
        Some(interval(self.weight[index], &before, &after, shift))
    }
}

/// Whether a token of scaled logit `scaled` is above the min-p floor under some moved logits,
/// and under all; the floor is relative to the most likely token, whose weight moves too.
fn above_min_p(scaled: f64, min_p: f32, shift: f64) -> (bool, bool) {
    if min_p <= 0.0 || min_p > 1.0 {
        return (true, true);
    }
    let floor = f64::from(min_p).ln();
    (scaled + 2.0 * shift >= floor, scaled - 2.0 * shift >= floor)
}

/// The widest range of the uniform draw in which the sampler's most-likely-first draw (top-k
/// and top-p cuts, then min-p) could pick `index`, every weight moved by up to `e^shift`;
/// `None` when a cut must drop it.
///
/// Every cut keeps a most-likely-first prefix, and whether a value could (or must) be kept
/// falls as the value falls, so what may be kept and what must be are two prefixes of the
/// sorted weights, and each mass below is a difference of two running sums.
fn sorted_interval(
    weights: &Weights,
    sorted: &SortedMass,
    index: usize,
    params: &SamplingParams,
    shift: f64,
) -> Option<(f64, f64)> {
    let wide = 2.0 * shift;
    let grow = shift.exp();
    let top_k = match params.top_k as usize {
        0 => usize::MAX,
        k => k,
    };
    // Top-k: could a token of this scaled logit stay among the k most likely, and must it?
    let in_top_k = |value: f64| {
        let certainly_ahead = sorted.count_above(value + wide);
        let possibly_ahead = sorted.count_at_least(value - wide).saturating_sub(1);
        (certainly_ahead < top_k, possibly_ahead < top_k)
    };
    // The pool top-p cuts from: what top-k may keep (most) and must keep (least).
    let pool_possible = sorted.prefix[sorted.count_of_prefix(|value| in_top_k(value).0)];
    let pool_certain = sorted.prefix[sorted.count_of_prefix(|value| in_top_k(value).1)];
    let top_p = if params.top_p > 0.0 && params.top_p < 1.0 {
        f64::from(params.top_p)
    } else {
        1.0
    };
    // Top-p keeps a token when the mass ahead of it is below top_p of the pool's.
    let in_nucleus = |value: f64| {
        if top_p >= 1.0 {
            return (true, true);
        }
        let own = value.exp();
        let certainly_ahead = sorted.mass_above(value + wide);
        let least_ahead = certainly_ahead / grow;
        let could = least_ahead < top_p * (least_ahead + (pool_possible - certainly_ahead) * grow);
        let possibly_ahead = (sorted.mass_at_least(value - wide) - own).max(0.0);
        let most_ahead = possibly_ahead * grow;
        let least_rest = (pool_certain - possibly_ahead).max(0.0) / grow;
        let must = most_ahead < top_p * (most_ahead + least_rest);
        (could, must)
    };
    let kept = |value: f64| {
        let (k_possible, k_certain) = in_top_k(value);
        let (p_possible, p_certain) = in_nucleus(value);
        let (m_possible, m_certain) = above_min_p(value, params.min_p, shift);
        (
            k_possible && p_possible && m_possible,
            k_certain && p_certain && m_certain,
        )
    };
    let scaled = weights.scaled[index];
    if !kept(scaled).0 {
        return None;
    }
    let own = weights.weight[index];
    let may_keep = sorted.count_of_prefix(|value| kept(value).0);
    let must_keep = sorted.count_of_prefix(|value| kept(value).1);
    // Surely ahead of the token (kept whenever it is); within `wide` of it (either side);
    // surely behind it.
    let ahead = sorted.count_above(scaled + wide);
    let near_end = sorted.count_at_least(scaled - wide);
    let before = Mass {
        certain: sorted.prefix[ahead],
        possible: (sorted.prefix[ahead.max(near_end.min(may_keep))] - own).max(0.0),
    };
    let after = Mass {
        certain: sorted.prefix[near_end.max(must_keep)] - sorted.prefix[near_end],
        possible: (sorted.prefix[ahead.max(may_keep)] - sorted.prefix[ahead] - own).max(0.0),
    };
    Some(interval(own, &before, &after, shift))
}

/// The widest `[low, high]` of the uniform draw for which a draw picks a token of weight `own`
/// with `before` ahead of it and `after` behind, every weight moved by up to `e^shift`.
fn interval(own: f64, before: &Mass, after: &Mass, shift: f64) -> (f64, f64) {
    let grow = shift.exp();
    let share = |part: f64, whole: f64| if whole > 0.0 { part / whole } else { 0.0 };
    let least_before = before.certain / grow;
    let low = share(least_before, least_before + (own + after.possible) * grow);
    let most_before = (before.possible + own) * grow;
    let high = if most_before + after.certain > 0.0 {
        share(most_before, most_before + after.certain / grow)
    } else {
        1.0
    };
    (low, high)
}

/// Weight that may count on one side of a token (`possible`) and that must (`certain`).
#[derive(Debug, Default)]
struct Mass {
    possible: f64,
    certain: f64,
}

impl Mass {
    fn add(&mut self, weight: f64, possible: bool, certain: bool) {
        if possible {
            self.possible += weight;
        }
        if certain {
            self.certain += weight;
        }
    }
}

/// Finite scaled logits, most likely first, with the running mass of their weights.
struct SortedMass {
    scaled: Vec<f64>,
    /// `prefix[i]`: the weight of the first `i`.
    prefix: Vec<f64>,
}

impl SortedMass {
    fn new(weights: &Weights) -> Self {
        let mut pairs: Vec<(f64, f64)> = weights
            .scaled
            .iter()
            .zip(&weights.weight)
            .filter(|(value, _)| value.is_finite())
            .map(|(&value, &weight)| (value, weight))
            .collect();
        pairs.sort_unstable_by(|a, b| b.0.total_cmp(&a.0));
        let mut prefix = Vec::with_capacity(pairs.len() + 1);
        let mut running = 0.0;
        prefix.push(running);
        for &(_, weight) in &pairs {
            running += weight;
            prefix.push(running);
        }
        Self {
            scaled: pairs.into_iter().map(|(value, _)| value).collect(),
            prefix,
        }
    }

    fn count_above(&self, threshold: f64) -> usize {
        self.scaled.partition_point(|&value| value > threshold)
    }

    fn count_at_least(&self, threshold: f64) -> usize {
        self.scaled.partition_point(|&value| value >= threshold)
    }

    fn mass_above(&self, threshold: f64) -> f64 {
        self.prefix[self.count_above(threshold)]
    }

    fn mass_at_least(&self, threshold: f64) -> f64 {
        self.prefix[self.count_at_least(threshold)]
    }

    /// The length of the longest most-likely-first prefix whose every value passes `keeps` (a
    /// test that, once failed, fails for every less likely value).
    fn count_of_prefix(&self, keeps: impl Fn(f64) -> bool) -> usize {
        self.scaled.partition_point(|&value| keeps(value))
    }
}

#[cfg(test)]
#[path = "verify_tests.rs"]
mod tests;
