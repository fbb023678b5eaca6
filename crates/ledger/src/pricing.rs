//! Prices: per model and tenant class, per million prompt and completion
//! tokens, plus cloud escalations at upstream cost plus a margin.
//!
//! Prices change over time, so they live in a [`PriceBook`] of sheets with
//! effective times; a request is always priced by the sheet in force when it
//! was admitted. A retried settlement therefore computes the same amounts even
//! after a price change, and keeps its transfer ids idempotent.
//!
//! Rounding rules (all arithmetic is integer, in `i128` where products could
//! overflow `i64`):
//! 1. `tokens × price per million` is kept exact, in units of 10⁻⁶ µUSD.
//! 2. A customer's charge for a request rounds **up** to the micro-dollar, once
//!    per request, so it is at most 1 µUSD above the exact price.
//! 3. What the platform pays (owner revenue share, energy reimbursement) rounds
//!    **down**, so it never pays out a fraction it did not compute.
//! 4. A cloud model's customer price per million is the upstream price times
//!    `(10,000 + margin bps) / 10,000`, rounded **up**; the upstream cost of a
//!    segment rounds **up** too, so the platform never books less than it owes.
//! 5. Payouts deliver whole instrument units; the micro-dollars that do not
//!    buy a whole unit stay in the owner's balance (see `crate::payout`).

use std::collections::BTreeMap;

use crate::core::{BasisPoints, MicroUsd, ModelId, TimestampMs, TokenCount};

/// The tenant class prices are kept per; the one definition is in `domain`.
pub use domain::TenantClass;

/// A price per million tokens.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Price {
    pub prompt_per_million: MicroUsd,
    pub completion_per_million: MicroUsd,
}

/// Units of 10⁻⁶ µUSD per µUSD: a price is per million tokens.
const SCALE: i128 = 1_000_000;

impl Price {
    /// The exact cost of the given tokens, in 10⁻⁶ µUSD (rule 1).
    pub fn exact_cost(&self, prompt: TokenCount, completion: TokenCount) -> i128 {
        i128::from(prompt.0) * i128::from(self.prompt_per_million.0)
            + i128::from(completion.0) * i128::from(self.completion_per_million.0)
    }

    fn marked_up(&self, margin: BasisPoints) -> Price {
        let factor = i128::from(BasisPoints::WHOLE) + i128::from(margin.0);
        let up = |per_million: MicroUsd| {
            let raw = i128::from(per_million.0) * factor;
            MicroUsd(saturate(ceil_div(raw, i128::from(BasisPoints::WHOLE))))
        };
        Price {
            prompt_per_million: up(self.prompt_per_million),
            completion_per_million: up(self.completion_per_million),
        }
    }

    fn is_valid(&self) -> bool {
        self.prompt_per_million.0 >= 0 && self.completion_per_million.0 >= 0
    }
}

/// Exact cost rounded up to the micro-dollar (rule 2 and 4).
pub fn round_up(exact: i128) -> MicroUsd {
    MicroUsd(saturate(ceil_div(exact, SCALE)))
}

/// Exact cost rounded down to the micro-dollar (rule 3).
pub fn round_down(exact: i128) -> MicroUsd {
    MicroUsd(saturate(exact.div_euclid(SCALE)))
}

/// `bps` of an exact cost, rounded down to the micro-dollar (rule 3).
pub fn share_of(exact: i128, share: BasisPoints) -> MicroUsd {
    round_down(exact * i128::from(share.0) / i128::from(BasisPoints::WHOLE))
}

fn ceil_div(numerator: i128, denominator: i128) -> i128 {
    -((-numerator).div_euclid(denominator))
}

fn saturate(value: i128) -> i64 {
    i64::try_from(value).unwrap_or(if value < 0 { i64::MIN } else { i64::MAX })
}

/// Why a price sheet or a lookup was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PricingError {
    #[error("model {model} has no price for class {class}")]
    NoPrice { model: ModelId, class: TenantClass },
    #[error("model {model}: spot must be the cheapest class, but costs more than reserved")]
    SpotNotCheapest { model: ModelId },
    #[error("model {model} has a negative price")]
    NegativePrice { model: ModelId },
    #[error("owner share of {0} bps exceeds 10000")]
    ShareTooLarge(u32),
    #[error("price sheets must take effect in order: {new} is not after {last}")]
    OutOfOrder { new: i64, last: i64 },
}

/// All prices in force for one period.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PriceSheet {
    /// Fleet (system-1) models, per tenant class.
    pub fleet: BTreeMap<(ModelId, TenantClass), Price>,
    /// Cloud (system-2) models at what the upstream charges us.
    pub upstream: BTreeMap<ModelId, Price>,
    /// Margin on top of upstream cost for escalations.
    pub cloud_margin: BasisPoints,
    /// Owners' share of the token revenue their vehicles earn.
    pub owner_share: BasisPoints,
}

/// How a segment's model is priced.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Rate {
    /// Served by the fleet at the class price.
    Fleet(Price),
    /// Served upstream: the customer pays `customer`, the platform owes `upstream`.
    Cloud { customer: Price, upstream: Price },
}

impl Rate {
    pub fn customer(&self) -> Price {
        match self {
            Rate::Fleet(price) => *price,
            Rate::Cloud { customer, .. } => *customer,
        }
    }
}

impl PriceSheet {
    pub fn validate(&self) -> Result<(), PricingError> {
        if self.owner_share.0 > BasisPoints::WHOLE {
            return Err(PricingError::ShareTooLarge(self.owner_share.0));
        }
        let prices = self.fleet.iter().map(|((model, _), price)| (model, price));
        for (model, price) in prices.chain(self.upstream.iter()) {
            if !price.is_valid() {
                return Err(PricingError::NegativePrice {
                    model: model.clone(),
                });
            }
        }
        for ((model, class), spot) in &self.fleet {
            if *class != TenantClass::Spot {
                continue;
            }
            if let Some(reserved) = self.fleet.get(&(model.clone(), TenantClass::Reserved)) {
                let dearer = spot.prompt_per_million > reserved.prompt_per_million
                    || spot.completion_per_million > reserved.completion_per_million;
                if dearer {
                    return Err(PricingError::SpotNotCheapest {
                        model: model.clone(),
                    });
                }
            }
        }
        Ok(())
    }

    /// The rate for a model served to a class: a fleet price if the model is a
    /// fleet model, otherwise the upstream price plus margin.
    pub fn rate(&self, model: &ModelId, class: TenantClass) -> Result<Rate, PricingError> {
        if let Some(price) = self.fleet.get(&(model.clone(), class)) {
            return Ok(Rate::Fleet(*price));
        }
        match self.upstream.get(model) {
            Some(upstream) => Ok(Rate::Cloud {
                customer: upstream.marked_up(self.cloud_margin),
                upstream: *upstream,
            }),
            None => Err(PricingError::NoPrice {
                model: model.clone(),
                class,
            }),
        }
    }
}

/// Price sheets over time; append-only.
#[derive(Debug, Clone)]
pub struct PriceBook {
    /// `(effective from, sheet)`, strictly increasing in time.
    sheets: Vec<(TimestampMs, PriceSheet)>,
}

impl PriceBook {
    /// A book whose first sheet applies to all time before any later one.
    pub fn new(first: PriceSheet) -> Result<PriceBook, PricingError> {
        first.validate()?;
        Ok(PriceBook {
            sheets: vec![(TimestampMs(i64::MIN), first)],
        })
    }

    /// Adds a sheet taking effect at `from`. Publish only for the future: a
    /// request admitted before `from` keeps its old price.
    pub fn publish(&mut self, from: TimestampMs, sheet: PriceSheet) -> Result<(), PricingError> {
        sheet.validate()?;
        let last = self
            .sheets
            .last()
            .map_or(TimestampMs(i64::MIN), |(at, _)| *at);
        if from <= last {
            return Err(PricingError::OutOfOrder {
                new: from.0,
                last: last.0,
            });
        }
        self.sheets.push((from, sheet));
        Ok(())
    }

    /// The sheet in force at `at`.
    pub fn sheet_at(&self, at: TimestampMs) -> &PriceSheet {
        let later = self.sheets.partition_point(|(from, _)| *from <= at);
        // The first sheet starts at i64::MIN, so `later` is at least 1.
        &self.sheets[later.saturating_sub(1)].1
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn model(name: &str) -> ModelId {
        ModelId::new(name).unwrap()
    }

    fn price(prompt: i64, completion: i64) -> Price {
        Price {
            prompt_per_million: MicroUsd(prompt),
            completion_per_million: MicroUsd(completion),
        }
    }

    fn sheet(spot_prompt: i64) -> PriceSheet {
        let mut fleet = BTreeMap::new();
        fleet.insert(
            (model("smol"), TenantClass::Spot),
            price(spot_prompt, 200_000),
        );
        fleet.insert(
            (model("smol"), TenantClass::Reserved),
            price(150_000, 300_000),
        );
        let mut upstream = BTreeMap::new();
        upstream.insert(model("big"), price(1_000_001, 2_000_000));
        PriceSheet {
            fleet,
            upstream,
            cloud_margin: BasisPoints(2_000),
            owner_share: BasisPoints(7_000),
        }
    }

    #[test]
    fn charges_round_up_and_payments_round_down() {
        // 3 prompt tokens at $0.10 per million = 0.3 µUSD exact.
        let exact = price(100_000, 0).exact_cost(TokenCount(3), TokenCount(0));
        assert_eq!(round_up(exact), MicroUsd(1));
        assert_eq!(round_down(exact), MicroUsd(0));
        assert_eq!(share_of(10 * SCALE, BasisPoints(7_000)), MicroUsd(7));
        assert_eq!(share_of(9 * SCALE, BasisPoints(5_000)), MicroUsd(4));
    }

    #[test]
    fn cloud_models_cost_upstream_plus_margin_rounded_up() {
        let rate = sheet(100_000)
            .rate(&model("big"), TenantClass::Spot)
            .unwrap();
        let Rate::Cloud { customer, upstream } = rate else {
            panic!("big is an upstream model");
        };
        assert_eq!(upstream, price(1_000_001, 2_000_000));
        // 1,000,001 × 1.2 = 1,200,001.2 → 1,200,002.
        assert_eq!(customer, price(1_200_002, 2_400_000));
    }

    #[test]
    fn spot_must_be_the_cheapest_class() {
        assert!(sheet(100_000).validate().is_ok());
        assert_eq!(
            sheet(150_001).validate(),
            Err(PricingError::SpotNotCheapest {
                model: model("smol")
            })
        );
    }

    #[test]
    fn a_request_is_priced_by_the_sheet_in_force_at_admission() {
        let mut book = PriceBook::new(sheet(100_000)).unwrap();
        book.publish(TimestampMs(1_000), sheet(50_000)).unwrap();
        let spot = |at| {
            book.sheet_at(TimestampMs(at))
                .rate(&model("smol"), TenantClass::Spot)
                .unwrap()
                .customer()
        };
        assert_eq!(spot(999).prompt_per_million, MicroUsd(100_000));
        assert_eq!(spot(1_000).prompt_per_million, MicroUsd(50_000));
        assert!(book.publish(TimestampMs(1_000), sheet(1)).is_err());
    }

    #[test]
    fn an_unpriced_model_is_an_error_not_free() {
        let error = sheet(1)
            .rate(&model("unknown"), TenantClass::Fleet)
            .unwrap_err();
        assert_eq!(
            error.to_string(),
            "model unknown has no price for class fleet"
        );
    }
}
