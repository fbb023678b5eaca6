//! Keyed draws: which generations are verified, audited, and by whom.
//!
//! Each draw is SHA-256 of the platform's secret, a purpose and the ids it concerns, read as a
//! uniform number in [0, 1). Without the secret a node cannot predict any draw, even knowing
//! every id; with it, every decision can be recomputed after the fact.

use domain::{NodeId, RequestId};
use sha2::{Digest, Sha256};

/// The platform's verification secret: 32 bytes it never shares with nodes.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret([u8; 32]);

impl Secret {
    #[must_use]
    pub fn new(bytes: [u8; 32]) -> Self {
        Secret(bytes)
    }

    /// A secret derived from a seed: for simulations and tests only.
    #[must_use]
    pub fn from_seed(seed: u64) -> Self {
        let digest = Sha256::digest(seed.to_le_bytes());
        Secret(digest.into())
    }
}

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Secret(…)")
    }
}

/// What a draw decides; part of the hashed input, so that draws for different purposes over
/// the same ids are independent.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Purpose {
    /// Whether a generation is verified.
    Verify,
    /// Whether a vehicle verifier's pass is checked again.
    Audit,
    /// Which candidate verifies, in the case's `round`.
    Verifier { round: u8 },
}

impl Purpose {
    fn tag(self) -> [u8; 2] {
        match self {
            Purpose::Verify => [1, 0],
            Purpose::Audit => [2, 0],
            Purpose::Verifier { round } => [3, round],
        }
    }
}

/// A uniform number in [0, 1) for `purpose` about `generation` served by `node`.
#[must_use]
pub fn uniform(secret: &Secret, purpose: Purpose, node: NodeId, generation: RequestId) -> f64 {
    let mut hasher = Sha256::new();
    hasher.update(secret.0);
    hasher.update(purpose.tag());
    hasher.update(node.0.to_le_bytes());
    hasher.update(generation.0.to_le_bytes());
    unit_of(&hasher.finalize())
}

/// A SHA-256 digest's first eight bytes as a uniform number in [0, 1).
pub(crate) fn unit_of(digest: &[u8]) -> f64 {
    let mut head = [0u8; 8];
    head.copy_from_slice(&digest[..8]);
    // The top 53 bits fill an f64 mantissa exactly; the result is strictly below 1.
    (u64::from_le_bytes(head) >> 11) as f64 * (1.0 / (1u64 << 53) as f64)
}

/// Whether a draw of `purpose` comes out below `rate`.
#[must_use]
pub fn below(
    secret: &Secret,
    purpose: Purpose,
    node: NodeId,
    generation: RequestId,
    rate: f64,
) -> bool {
    rate >= 1.0 || uniform(secret, purpose, node, generation) < rate
}

/// One of `count` candidates, uniformly, for `generation`'s `round`-th verifier.
#[must_use]
pub fn pick(
    secret: &Secret,
    round: u8,
    node: NodeId,
    generation: RequestId,
    count: usize,
) -> Option<usize> {
    if count == 0 {
        return None;
    }
    let unit = uniform(secret, Purpose::Verifier { round }, node, generation);
    // Truncation: unit < 1, so the index is below count.
    Some(((unit * count as f64) as usize).min(count - 1))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn draws_are_uniform_independent_per_purpose_and_keyed() {
        let secret = Secret::from_seed(1);
        let node = NodeId(3);
        let draws = 20_000_u64;
        let below_tenth = (0..draws)
            .filter(|&g| uniform(&secret, Purpose::Verify, node, RequestId(g)) < 0.1)
            .count();
        assert!((1_700..2_300).contains(&below_tenth), "{below_tenth}");
        let same_for_audit = (0..draws)
            .filter(|&g| {
                let verify = uniform(&secret, Purpose::Verify, node, RequestId(g)) < 0.5;
                let audit = uniform(&secret, Purpose::Audit, node, RequestId(g)) < 0.5;
                verify == audit
            })
            .count();
        assert!(
            (9_000..11_000).contains(&same_for_audit),
            "{same_for_audit}"
        );
        let other = Secret::from_seed(2);
        let differ = (0..100)
            .filter(|&g| {
                uniform(&secret, Purpose::Verify, node, RequestId(g))
                    != uniform(&other, Purpose::Verify, node, RequestId(g))
            })
            .count();
        assert_eq!(differ, 100);
        assert_eq!(
            uniform(&secret, Purpose::Verify, node, RequestId(9)),
            uniform(&Secret::from_seed(1), Purpose::Verify, node, RequestId(9))
        );
    }

    #[test]
    fn a_pick_covers_every_candidate() {
        let secret = Secret::from_seed(5);
        let mut seen = [0u32; 7];
        for g in 0..7_000 {
            seen[pick(&secret, 0, NodeId(1), RequestId(g), 7).unwrap()] += 1;
        }
        assert!(
            seen.iter().all(|&count| (800..1_200).contains(&count)),
            "{seen:?}"
        );
        assert_eq!(pick(&secret, 0, NodeId(1), RequestId(0), 0), None);
    }

    #[test]
    fn the_secret_never_prints() {
        assert_eq!(format!("{:?}", Secret::from_seed(1)), "Secret(…)");
    }
}
