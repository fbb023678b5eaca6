//! Token sampling from raw logits, in plain Rust with no llama.cpp state.
//!
//! **Invariant:** the token chosen at completion position `p` depends only on the logits, the
//! sampling parameters and `(seed, p)`. There is no sequential RNG state, so a generation that is
//! restarted on another node from its first `p` tokens draws exactly what it would have drawn.
//!
//! Order of operations: temperature, then top-k, then top-p (nucleus), then min-p, then one
//! uniform draw. Reported log-probabilities are the log-softmax of the logits given (before
//! temperature, which does not change them, as the OpenAI API reports them).

use crate::TokenId;

/// Most alternatives reported per token; OpenAI's API caps `top_logprobs` at 20 too.
pub const TOP_LOGPROBS_MAX: usize = 20;

/// Largest `top_k` whose candidates are picked in one streaming pass over the vocabulary into a
/// small sorted window; larger ones go through a selection over every candidate.
const STREAMED_TOP_K_MAX: usize = 256;

/// Logits per chunk in the loops over the whole vocabulary. Sums are added chunk by chunk in a
/// fixed order, so results never depend on the vector width the compiler picks for a machine.
const CHUNK: usize = 8;

/// Smallest candidate set the nucleus search sorts first; it doubles until the mass is reached.
/// Most top-p masses sit within the first few hundred tokens, so this avoids sorting the vocabulary.
const NUCLEUS_FIRST_ROUND_CANDIDATES: usize = 256;

/// How a token is chosen from the logits.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct SamplingParams {
    /// 0 (or below) means greedy: the most likely token, ties broken by the lowest token id.
    pub temperature: f32,
    /// Nucleus mass in (0, 1]; 1.0 means no cut.
    pub top_p: f32,
    /// Keep only the k most likely tokens; 0 means no cut.
    pub top_k: u32,
    /// Seed of the per-position draw.
    pub seed: u64,
    /// Keep only tokens at least this share as likely as the most likely one (after temperature,
    /// top-k and top-p, as vLLM orders it); 0 means no cut.
    pub min_p: f32,
}

impl SamplingParams {
    /// Greedy decoding: deterministic, seed irrelevant.
    #[must_use]
    pub fn greedy() -> Self {
        Self {
            temperature: 0.0,
            top_p: 1.0,
            top_k: 0,
            seed: 0,
            min_p: 0.0,
        }
    }

    /// Whether these parameters pick the argmax without drawing.
    #[must_use]
    pub fn is_greedy(&self) -> bool {
        // NaN counts as greedy too, rather than poisoning every probability.
        self.temperature.is_nan() || self.temperature <= 0.0 || self.top_k == 1
    }
}

impl Default for SamplingParams {
    fn default() -> Self {
        Self {
            temperature: 1.0,
            top_p: 1.0,
            top_k: 0,
            seed: 0,
            min_p: 0.0,
        }
    }
}

/// One alternative token with its log-probability.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Candidate {
    pub token: TokenId,
    pub logprob: f32,
}

/// The outcome of sampling one position.
#[derive(Clone, Debug, PartialEq)]
pub struct Sampled {
    pub token: TokenId,
    /// Log-softmax of the raw logits at the chosen token; always <= 0.
    pub logprob: f32,
    /// The most likely tokens by the raw distribution, most likely first (ties: lowest id first).
    pub top: Vec<Candidate>,
}

/// A reusable sampler: owns scratch buffers so that sampling allocates nothing proportional to
/// the vocabulary after the first call.
#[derive(Debug, Default)]
pub struct Sampler {
    /// (scaled logit, token) pairs for the cut stages; reused across calls.
    candidates: Vec<(f32, TokenId)>,
    /// One weight `e^((logit - max) / T)` per vocabulary entry, and their sums per [`CHUNK`].
    terms: ExpTerms,
}

impl Sampler {
    #[must_use]
    pub fn new() -> Self {
        Self::default()
    }

    /// Choose the token for completion position `position` from `logits` (one per vocabulary
    /// entry, indexed by token id), and report `top_logprobs` alternatives (capped at
    /// [`TOP_LOGPROBS_MAX`]).
    ///
    /// # Panics
    ///
    /// If `logits` is empty (a model always has a vocabulary).
    pub fn sample(
        &mut self,
        logits: &[f32],
        params: &SamplingParams,
        position: u32,
        top_logprobs: u32,
    ) -> Sampled {
        assert!(!logits.is_empty(), "sampling needs at least one logit");
        let (max_logit, argmax) = max_and_argmax(logits);
        let log_normalizer = self.log_normalizer(logits, max_logit);
        let token = if params.is_greedy() {
            argmax
        } else {
            self.draw(logits, max_logit, params, position)
                .unwrap_or(argmax)
        };
        described(logits, log_normalizer, token, top_logprobs)
    }

    /// The log-probability of a given `token` under `logits` (one per vocabulary entry), with
    /// `top_logprobs` alternatives: how a prompt token is scored. Nothing is drawn.
    ///
    /// # Panics
    ///
    /// If `logits` is empty (a model always has a vocabulary).
    pub fn score(&mut self, logits: &[f32], token: TokenId, top_logprobs: u32) -> Sampled {
        assert!(!logits.is_empty(), "scoring needs at least one logit");
        let (max_logit, _) = max_and_argmax(logits);
        let log_normalizer = self.log_normalizer(logits, max_logit);
        described(logits, log_normalizer, token, top_logprobs)
    }

    /// `ln Σ e^logit` over `logits`, whose largest is `max_logit`; -inf when every logit is.
    /// Leaves the terms of temperature 1 in `self.terms`.
    fn log_normalizer(&mut self, logits: &[f32], max_logit: f32) -> f32 {
        if max_logit == f32::NEG_INFINITY {
            return f32::NEG_INFINITY;
        }
        // Narrowing: the sum of at most a vocabulary of terms <= 1 fits an f32 easily.
        max_logit + (self.terms.fill(logits, max_logit, 1.0) as f32).ln()
    }

    /// The non-greedy path: temperature, top-k, top-p, then one draw keyed by `(seed, position)`.
    /// `None` when no token has any weight (every logit infinite or NaN).
    fn draw(
        &mut self,
        logits: &[f32],
        max_logit: f32,
        params: &SamplingParams,
        position: u32,
    ) -> Option<TokenId> {
        let inverse_temperature = 1.0 / params.temperature;
        let uniform = uniform_for_position(params.seed, position);
        let vocab_size = logits.len();
        let top_k = params.top_k as usize;
        let cut_by_k = top_k > 0 && top_k < vocab_size;
        let cut_by_p = params.top_p > 0.0 && params.top_p < 1.0;
        // A term is a token's probability relative to the most likely one's.
        let min_p = if params.min_p > 0.0 && params.min_p <= 1.0 {
            params.min_p
        } else {
            0.0
        };
        if !cut_by_k && !cut_by_p {
            // The normaliser left the terms of temperature 1 behind.
            if inverse_temperature != 1.0 || min_p > 0.0 {
                self.terms
                    .fill_above(logits, max_logit, inverse_temperature, min_p);
            }
            return self.terms.draw(uniform);
        }
        if cut_by_k && top_k <= STREAMED_TOP_K_MAX {
            let scale = |logit: f32| (logit - max_logit) * inverse_temperature;
            most_likely_window(&mut self.candidates, logits, scale, top_k);
            let kept = if cut_by_p {
                nucleus_of_sorted(&self.candidates, params.top_p)
            } else {
                self.candidates.len()
            };
            let kept = above_min_p(&self.candidates[..kept], min_p);
            return Some(draw_from_sorted_prefix(&self.candidates[..kept], uniform));
        }
        self.candidates.clear();
        self.candidates.extend(
            logits.iter().enumerate().map(|(index, &logit)| {
                ((logit - max_logit) * inverse_temperature, token_id(index))
            }),
        );
        let limit = if cut_by_k { top_k } else { vocab_size };
        let kept = if cut_by_p {
            nucleus_prefix(&mut self.candidates, limit, params.top_p)
        } else {
            sort_prefix(&mut self.candidates, limit);
            limit
        };
        let kept = above_min_p(&self.candidates[..kept], min_p);
        Some(draw_from_sorted_prefix(&self.candidates[..kept], uniform))
    }
}

/// The weights of a draw over the whole vocabulary, kept for reuse across calls.
#[derive(Debug, Default)]
struct ExpTerms {
    /// `e^((logit - max) · scale)` per token id.
    terms: Vec<f32>,
    /// The sum of each [`CHUNK`] of `terms`, added in order in f64.
    chunk_sums: Vec<f64>,
}

impl ExpTerms {
    /// Computes the terms of `logits` for `scale` (the inverse temperature) and returns their sum:
    /// the chunk sums added in order. NaN and infinite logits weigh nothing.
    fn fill(&mut self, logits: &[f32], max_logit: f32, scale: f32) -> f64 {
        self.fill_above(logits, max_logit, scale, 0.0)
    }

    /// [`ExpTerms::fill`], with every term below `floor` (min-p: the most likely token's term
    /// is 1) counted as 0.
    fn fill_above(&mut self, logits: &[f32], max_logit: f32, scale: f32, floor: f32) -> f64 {
        self.terms.clear();
        self.terms.extend(logits.iter().map(|&logit| {
            let term = exp_f32((logit - max_logit) * scale);
            if term >= floor {
                term
            } else {
                0.0
            }
        }));
        self.chunk_sums.clear();
        self.chunk_sums
            .extend(self.terms.chunks(CHUNK).map(|chunk| {
                chunk
                    .iter()
                    .fold(0.0, |sum: f64, &term| sum + f64::from(term))
            }));
        self.chunk_sums.iter().sum()
    }

    /// The first token (in id order) at which the running sum of the terms passes
    /// `uniform` × their total, the running sum going chunk by chunk and then term by term inside
    /// the chunk that passes. Never a token of zero weight; `None` when every term is zero.
    fn draw(&self, uniform: f64) -> Option<TokenId> {
        let total: f64 = self.chunk_sums.iter().sum();
        if total.is_nan() || total <= 0.0 {
            return None;
        }
        let threshold = uniform * total;
        let mut before = 0.0;
        for (chunk, (terms, &chunk_sum)) in
            self.terms.chunks(CHUNK).zip(&self.chunk_sums).enumerate()
        {
            if before + chunk_sum > threshold {
                let mut cumulative = before;
                let passes = terms.iter().position(|&term| {
                    cumulative += f64::from(term);
                    cumulative > threshold
                });
                // Adding term by term may round differently from the chunk's own sum; the chunk
                // holds weight all the same, so its last weighted term takes the draw then.
                let offset = passes.or_else(|| terms.iter().rposition(|&term| term > 0.0))?;
                return Some(token_id(chunk * CHUNK + offset));
            }
            before += chunk_sum;
        }
        // Rounding left the threshold at the very end: the last token with any weight wins.
        self.terms
            .iter()
            .rposition(|&term| term > 0.0)
            .map(token_id)
    }
}

/// `e^x` in plain f32 arithmetic: Cephes' `expf` polynomial (within a few ulp of `f32::exp`),
/// 0 below -87 and for NaN, capped at `e^88`. No calls and no branches, so the loops over the
/// vocabulary vectorise; no fused operations, so every machine computes the same bits.
#[inline(always)]
fn exp_f32(x: f32) -> f32 {
    /// 1.5 × 2^23: adding it rounds an f32 of magnitude below 2^22 to an integer.
    const ROUND: f32 = 12_582_912.0;
    let in_range = x >= -87.0;
    let x = if !in_range {
        0.0
    } else if x < 88.0 {
        x
    } else {
        88.0
    };
    let shifted = x * std::f32::consts::LOG2_E + ROUND;
    let n = shifted - ROUND;
    // x - n·ln 2, with ln 2 split in two so that the first product is exact.
    let r = x - n * 0.693_359_4 - n * -2.121_944_4e-4;
    let mut p = 1.987_569_1e-4;
    p = p * r + 1.398_199_9e-3;
    p = p * r + 8.333_452e-3;
    p = p * r + 4.166_579_6e-2;
    p = p * r + 0.166_666_65;
    p = p * r + 0.5;
    let mantissa = p * r * r + r + 1.0;
    // The low bits of `shifted` hold n; 2^n is n + 127 in the exponent field (n >= -126 here).
    let n_bits = shifted.to_bits().wrapping_sub(ROUND.to_bits());
    let power = f32::from_bits(n_bits.wrapping_add(127) << 23);
    if in_range {
        mantissa * power
    } else {
        0.0
    }
}

/// The uniform number in [0, 1) used at completion position `position` of a generation seeded
/// with `seed`: a pure function, so any node computes the same draw.
#[must_use]
pub fn uniform_for_position(seed: u64, position: u32) -> f64 {
    let mixed =
        splitmix64(seed ^ splitmix64(u64::from(position).wrapping_add(0xA076_1D64_78BD_642F)));
    // The top 53 bits fill an f64 mantissa exactly; the result is strictly below 1.
    (mixed >> 11) as f64 * (1.0 / (1u64 << 53) as f64)
}

/// SplitMix64's finaliser: a bijective mix with good avalanche, enough for one draw per key.
fn splitmix64(value: u64) -> u64 {
    let mut z = value.wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

fn token_id(index: usize) -> TokenId {
    // Vocabularies are far below i32::MAX entries; llama.cpp itself stores ids as i32.
    TokenId::try_from(index).unwrap_or(TokenId::MAX)
}

fn logit_at(logits: &[f32], token: TokenId) -> f32 {
    usize::try_from(token)
        .ok()
        .and_then(|index| logits.get(index))
        .copied()
        .unwrap_or(f32::NEG_INFINITY)
}

/// The largest logit and the lowest token id holding it. NaN logits never win; with no finite
/// or positive-infinite logit, `(-inf, 0)`.
fn max_and_argmax(logits: &[f32]) -> (f32, TokenId) {
    let mut lanes = [f32::NEG_INFINITY; CHUNK];
    let mut chunks = logits.chunks_exact(CHUNK);
    for chunk in &mut chunks {
        for (lane, &logit) in lanes.iter_mut().zip(chunk) {
            // `max` ignores a NaN operand.
            *lane = lane.max(logit);
        }
    }
    let rest = chunks.remainder();
    let best =
        lanes.iter().chain(rest).fold(
            f32::NEG_INFINITY,
            |best, &logit| if logit > best { logit } else { best },
        );
    if best == f32::NEG_INFINITY {
        return (best, 0);
    }
    // The first chunk holding it, then the place in that chunk: a chunk is tested whole, which
    // vectorises, where a scan stopping at the first match would not.
    let holds_best = |chunk: &[f32]| {
        chunk
            .iter()
            .fold(false, |found, &logit| found | (logit == best))
    };
    let index = logits
        .chunks(CHUNK)
        .position(holds_best)
        .and_then(|chunk| {
            let start = chunk * CHUNK;
            let offset = logits[start..].iter().position(|&logit| logit == best)?;
            Some(start + offset)
        })
        .unwrap_or(0);
    (best, token_id(index))
}

/// Ordering used by every cut: more likely first, then lower token id first.
fn more_likely_first(a: &(f32, TokenId), b: &(f32, TokenId)) -> std::cmp::Ordering {
    b.0.total_cmp(&a.0).then(a.1.cmp(&b.1))
}

/// Sort the `count` most likely candidates to the front (in order); the rest is unordered.
fn sort_prefix(candidates: &mut [(f32, TokenId)], count: usize) {
    let count = count.min(candidates.len());
    if count == 0 {
        return;
    }
    if count < candidates.len() {
        candidates.select_nth_unstable_by(count - 1, more_likely_first);
    }
    candidates[..count].sort_unstable_by(more_likely_first);
}

/// The length (at least 1) of the smallest most-likely-first prefix of the `limit` most likely
/// candidates whose probability mass reaches `top_p` of theirs; that prefix is left sorted at the
/// front.
///
/// Sorting grows in rounds so that a typical nucleus costs a selection, not a vocabulary sort.
/// The result does not depend on the round sizes because the candidate order is total.
fn nucleus_prefix(candidates: &mut [(f32, TokenId)], limit: usize, top_p: f32) -> usize {
    let limit = limit.min(candidates.len());
    if limit == 0 {
        return 0;
    }
    if limit < candidates.len() {
        candidates.select_nth_unstable_by(limit - 1, more_likely_first);
    }
    let pool = &mut candidates[..limit];
    let total: f64 = pool
        .iter()
        .map(|&(scaled, _)| f64::from(scaled.exp()))
        .sum();
    let target = f64::from(top_p) * total;
    let mut round = NUCLEUS_FIRST_ROUND_CANDIDATES.min(limit);
    loop {
        sort_prefix(pool, round);
        let mut cumulative = 0.0;
        for (index, &(scaled, _)) in pool[..round].iter().enumerate() {
            cumulative += f64::from(scaled.exp());
            if cumulative >= target {
                return index + 1;
            }
        }
        if round == limit {
            return limit;
        }
        round = round.saturating_mul(2).min(limit);
    }
}

/// Fills `window` with the `count` most likely (scaled logit, token) pairs, most likely first,
/// in one pass over `logits`: the same set and order as sorting every candidate with
/// [`more_likely_first`], without writing the vocabulary out. NaN logits are never taken.
fn most_likely_window(
    window: &mut Vec<(f32, TokenId)>,
    logits: &[f32],
    scale: impl Fn(f32) -> f32,
    count: usize,
) {
    window.clear();
    if count == 0 {
        return;
    }
    for (index, &logit) in logits.iter().enumerate() {
        let scaled = scale(logit);
        // Ids only grow, so a later token that merely ties the worst kept one stays out.
        let full = window.len() == count;
        if scaled.is_nan() || (full && window.last().is_some_and(|&(worst, _)| scaled <= worst)) {
            continue;
        }
        let entry = (scaled, token_id(index));
        let at = window.partition_point(|kept| more_likely_first(kept, &entry).is_lt());
        if full {
            window.pop();
        }
        window.insert(at, entry);
    }
}

/// The length (at least 1) of the shortest prefix of most-likely-first `sorted` candidates whose
/// probability mass reaches `top_p` of theirs.
fn nucleus_of_sorted(sorted: &[(f32, TokenId)], top_p: f32) -> usize {
    let total: f64 = sorted
        .iter()
        .map(|&(scaled, _)| f64::from(scaled.exp()))
        .sum();
    let target = f64::from(top_p) * total;
    let mut cumulative = 0.0;
    for (index, &(scaled, _)) in sorted.iter().enumerate() {
        cumulative += f64::from(scaled.exp());
        if cumulative >= target {
            return index + 1;
        }
    }
    sorted.len()
}

/// The length (at least 1) of the most-likely-first prefix of `sorted` whose terms `e^scaled`
/// (1 for the most likely token) are at least `min_p`: the same rule as
/// [`ExpTerms::fill_above`].
fn above_min_p(sorted: &[(f32, TokenId)], min_p: f32) -> usize {
    if min_p <= 0.0 {
        return sorted.len();
    }
    let top = sorted.first().map_or(0.0, |&(scaled, _)| scaled);
    sorted
        .partition_point(|&(scaled, _)| exp_f32(scaled - top) >= min_p)
        .max(1)
        .min(sorted.len())
}

/// Draw from a most-likely-first prefix of (scaled logit, token) pairs.
fn draw_from_sorted_prefix(prefix: &[(f32, TokenId)], uniform: f64) -> TokenId {
    let total: f64 = prefix
        .iter()
        .map(|&(scaled, _)| f64::from(scaled.exp()))
        .sum();
    let threshold = uniform * total;
    let mut cumulative = 0.0;
    for &(scaled, token) in prefix {
        cumulative += f64::from(scaled.exp());
        if cumulative > threshold {
            return token;
        }
    }
    prefix.first().map_or(0, |&(_, token)| token)
}

/// `token` with its log-probability under `logits` (whose log-normaliser is `log_normalizer`)
/// and the `top_logprobs` most likely tokens (capped at [`TOP_LOGPROBS_MAX`]).
fn described(logits: &[f32], log_normalizer: f32, token: TokenId, top_logprobs: u32) -> Sampled {
    let top_count = (top_logprobs as usize)
        .min(TOP_LOGPROBS_MAX)
        .min(logits.len());
    // A token a grammar or `ignore_eos` ruled out (logit -inf) is no alternative: it had
    // no chance of being drawn.
    let top = top_tokens(logits, top_count)
        .into_iter()
        .map(|token| Candidate {
            token,
            logprob: logit_at(logits, token) - log_normalizer,
        })
        .filter(|candidate| candidate.logprob.is_finite())
        .collect();
    Sampled {
        token,
        logprob: (logit_at(logits, token) - log_normalizer).min(0.0),
        top,
    }
}

/// The `count` most likely tokens by raw logit, most likely first, ties by lowest id.
/// One pass with a small sorted window: `count` is at most [`TOP_LOGPROBS_MAX`].
fn top_tokens(logits: &[f32], count: usize) -> Vec<TokenId> {
    if count == 0 {
        return Vec::new();
    }
    let mut window: Vec<(f32, TokenId)> = Vec::with_capacity(count + 1);
    for (index, &logit) in logits.iter().enumerate() {
        if logit.is_nan() {
            continue;
        }
        if window.len() == count && window.last().is_some_and(|&(worst, _)| logit <= worst) {
            continue;
        }
        let entry = (logit, token_id(index));
        let at = window.partition_point(|probe| more_likely_first(probe, &entry).is_lt());
        window.insert(at, entry);
        window.truncate(count);
    }
    window.into_iter().map(|(_, token)| token).collect()
}

#[cfg(test)]
#[path = "sampler_tests.rs"]
mod tests;
