//! What a generation costs on each tier, in integer micro-dollars.
//!
//! These are the router's *estimates* for choosing between tiers and for the
//! evaluation report; the ledger books the real charges with its own price
//! book. Money is never a float here either.

use serde::{Deserialize, Serialize};

pub use domain::MicroUsd;

/// A price per million tokens, prompt and completion separately.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Price {
    pub prompt_per_million: MicroUsd,
    pub completion_per_million: MicroUsd,
}

impl Price {
    /// The cost of one generation, rounded up to the micro-dollar so that an
    /// estimate is never below the exact price.
    pub fn cost(&self, prompt_tokens: u32, completion_tokens: u32) -> MicroUsd {
        // A price is never negative; one that is counts as free.
        let per_million = |price: MicroUsd| u128::try_from(price.0).unwrap_or(0);
        let exact = u128::from(prompt_tokens) * per_million(self.prompt_per_million)
            + u128::from(completion_tokens) * per_million(self.completion_per_million);
        let rounded_up = exact.div_ceil(1_000_000);
        MicroUsd(i64::try_from(rounded_up).unwrap_or(i64::MAX))
    }
}

/// The prices of both tiers.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Prices {
    pub edge: Price,
    pub cloud: Price,
}

impl Default for Prices {
    /// The shipped price sheet's figures for a `fleet` tenant: the edge is
    /// SmolLM2-135M at $0.08 / $0.16 per million prompt / completion tokens;
    /// the cloud is the upstream gpt-4o-mini at $0.15 / $0.60 plus the
    /// sheet's 20% cloud margin, $0.18 / $0.72.
    fn default() -> Prices {
        Prices {
            edge: Price {
                prompt_per_million: MicroUsd(80_000),
                completion_per_million: MicroUsd(160_000),
            },
            cloud: Price {
                prompt_per_million: MicroUsd(180_000),
                completion_per_million: MicroUsd(720_000),
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cost_rounds_up_to_the_micro_dollar() {
        let price = Price {
            prompt_per_million: MicroUsd(150_000),
            completion_per_million: MicroUsd(600_000),
        };
        // 100 × 0.15 + 10 × 0.6 = 21 µUSD exactly.
        assert_eq!(price.cost(100, 10), MicroUsd(21));
        // 1 × 0.15 = 0.15 µUSD, rounded up to 1.
        assert_eq!(price.cost(1, 0), MicroUsd(1));
        assert_eq!(price.cost(0, 0), MicroUsd::ZERO);
    }

    #[test]
    fn cost_of_huge_counts_does_not_overflow() {
        let price = Price {
            prompt_per_million: MicroUsd(i64::MAX),
            completion_per_million: MicroUsd(i64::MAX),
        };
        assert_eq!(price.cost(u32::MAX, u32::MAX), MicroUsd(i64::MAX));
    }
}
