//! Payment admission: refuse a request the tenant cannot pay for before any
//! work starts (the gateway answers 402 with this module's message).
//!
//! A request is admitted when its worst-case cost (the whole prompt plus
//! `max_tokens` completion tokens at the dearest model it may be served by)
//! fits both what the tenant's account has available (prepaid balance, or
//! balance plus credit limit) and what is left of its daily spend cap.
//! Requests in flight are not reserved here; the caller that admits
//! concurrent requests for one tenant owns that bookkeeping.

use crate::core::{AccountState, MicroUsd, ModelId, TokenCount};
use crate::pricing::{round_up, PriceSheet, PricingError, TenantClass};

/// Why a request cannot be paid for. The messages are shown to the customer.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PaymentRequired {
    #[error(
        "insufficient balance: this request may cost up to ${worst_case} but ${available} is \
         available; top up or ask for a higher credit limit"
    )]
    InsufficientBalance {
        worst_case: MicroUsd,
        available: MicroUsd,
    },
    #[error(
        "daily spend cap reached: ${spent_today} of ${cap} spent today and this request may cost \
         up to ${worst_case}; the cap resets at 00:00 utc"
    )]
    DailyCapReached {
        cap: MicroUsd,
        spent_today: MicroUsd,
        worst_case: MicroUsd,
    },
}

/// What the gateway knows about a request before it runs.
#[derive(Debug, Clone)]
pub struct AdmissionRequest<'a> {
    /// Every model the request may be served by (more than one for `auto`,
    /// which may escalate to the cloud); the dearest is assumed.
    pub models: &'a [ModelId],
    pub class: TenantClass,
    pub prompt_tokens: TokenCount,
    pub max_completion_tokens: TokenCount,
}

/// The most the request can cost, rounded up.
pub fn worst_case_cost(
    sheet: &PriceSheet,
    request: &AdmissionRequest<'_>,
) -> Result<MicroUsd, PricingError> {
    let mut worst = MicroUsd::ZERO;
    for model in request.models {
        let price = sheet.rate(model, request.class)?.customer();
        let cost = round_up(price.exact_cost(request.prompt_tokens, request.max_completion_tokens));
        worst = worst.max(cost);
    }
    Ok(worst)
}

/// Admits a request costing at most `worst_case`, given the tenant's account,
/// its optional daily cap and what it has been charged since the UTC day began.
pub fn check(
    worst_case: MicroUsd,
    account: &AccountState,
    daily_cap: Option<MicroUsd>,
    spent_today: MicroUsd,
) -> Result<(), PaymentRequired> {
    if let Some(cap) = daily_cap {
        let after = spent_today.0.saturating_add(worst_case.0);
        if after > cap.0 {
            return Err(PaymentRequired::DailyCapReached {
                cap,
                spent_today,
                worst_case,
            });
        }
    }
    if let Some(available) = account.available() {
        if worst_case > available {
            return Err(PaymentRequired::InsufficientBalance {
                worst_case,
                available: available.max(MicroUsd::ZERO),
            });
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use super::*;
    use crate::core::{AccountId, BasisPoints, TenantId};
    use crate::pricing::Price;

    fn sheet() -> PriceSheet {
        let price = Price {
            prompt_per_million: MicroUsd(100_000),
            completion_per_million: MicroUsd(400_000),
        };
        let mut fleet = BTreeMap::new();
        fleet.insert((ModelId::new("smol").unwrap(), TenantClass::Spot), price);
        let mut upstream = BTreeMap::new();
        upstream.insert(ModelId::new("big").unwrap(), price);
        PriceSheet {
            fleet,
            upstream,
            cloud_margin: BasisPoints(10_000),
            owner_share: BasisPoints(5_000),
        }
    }

    fn account(balance: i64, floor: i64) -> AccountState {
        let mut state = AccountState::opened(&AccountId::Tenant(TenantId::new("t").unwrap()));
        state.credits_posted = MicroUsd(balance.max(0));
        state.debits_posted = MicroUsd((-balance).max(0));
        state.floor = Some(MicroUsd(floor));
        state
    }

    #[test]
    fn the_worst_case_assumes_the_dearest_model_and_all_max_tokens() {
        let models = [ModelId::new("smol").unwrap(), ModelId::new("big").unwrap()];
        let request = AdmissionRequest {
            models: &models,
            class: TenantClass::Spot,
            prompt_tokens: TokenCount(1_000),
            max_completion_tokens: TokenCount(1_000),
        };
        // Fleet: 100 + 400 = 500 µUSD; cloud at 100 % margin: 1,000 µUSD.
        assert_eq!(worst_case_cost(&sheet(), &request), Ok(MicroUsd(1_000)));
    }

    #[test]
    fn a_prepaid_tenant_without_enough_balance_is_refused_with_amounts() {
        let error = check(MicroUsd(1_000), &account(999, 0), None, MicroUsd(0)).unwrap_err();
        assert_eq!(
            error.to_string(),
            "insufficient balance: this request may cost up to $0.001000 but $0.000999 is \
             available; top up or ask for a higher credit limit"
        );
        assert!(check(MicroUsd(999), &account(999, 0), None, MicroUsd(0)).is_ok());
    }

    #[test]
    fn a_credit_limit_counts_as_available() {
        assert!(check(MicroUsd(1_500), &account(-500, -2_000), None, MicroUsd(0)).is_ok());
        assert!(check(MicroUsd(1_501), &account(-500, -2_000), None, MicroUsd(0)).is_err());
    }

    #[test]
    fn the_daily_cap_is_enforced_even_with_money_left() {
        let rich = account(1_000_000, 0);
        let error = check(MicroUsd(300), &rich, Some(MicroUsd(1_000)), MicroUsd(800)).unwrap_err();
        assert!(matches!(error, PaymentRequired::DailyCapReached { .. }));
        assert!(error.to_string().starts_with("daily spend cap reached"));
        assert!(check(MicroUsd(200), &rich, Some(MicroUsd(1_000)), MicroUsd(800)).is_ok());
    }
}
