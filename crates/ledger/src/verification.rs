//! Paying for verification: what a vehicle that checked another's answer
//! earns, paid by the platform.
//!
//! A check is a prefill of the prompt and the answer on the verifier
//! (`engine::verify`). It serves no tenant, so no tenant pays for it: the
//! platform does, from its own expense account, [`AccountId::Verification`],
//! whose balance is what verification has cost in all. A check earns the
//! verifier's owner two transfers, each rounded down as everything the
//! platform pays (`crate::pricing`, rule 3):
//!
//! - verification pay, for the tokens prefilled: the owners' share of what
//!   the spot class pays for that many prompt tokens of the model, the
//!   cheapest price a tenant could have bought that prefill at;
//! - verification energy, the energy the check used at the owner's tariff,
//!   as a generation's energy is reimbursed.
//!
//! Both carry the check's own name as their request id, so booking a check
//! again finds them existing: a check is paid once.

use crate::core::{
    AccountId, DurationMs, MicroUsd, MicroWh, ModelId, NodeId, OwnerId, RequestId, Segment,
    TimestampMs, TokenCount, Transfer, TransferError, TransferKind, TransferSpec,
};
use crate::pricing::{share_of, PriceBook, PricingError, Rate, TenantClass};
use crate::settlement::energy_cost;

/// The class whose price pays for a check's prefill.
pub const PAID_AT_CLASS: TenantClass = TenantClass::Spot;

/// One check a vehicle carried out, as the books pay for it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CheckWork {
    /// The check's name (`check:{answer}:{round}`), unique in the
    /// deployment; its transfers' request id.
    pub check: RequestId,
    pub node: NodeId,
    pub owner: OwnerId,
    /// The model whose logits the check recomputed.
    pub model: ModelId,
    /// Tokens the verifier prefilled: the prompt and the answer.
    pub tokens: TokenCount,
    /// The verifier's compute time for the check, as the cell bounded it.
    pub compute: DurationMs,
    /// Energy the check used, from the node's power profile.
    pub energy: MicroWh,
    /// The owner's tariff when the check ran.
    pub tariff_per_kwh: MicroUsd,
    /// When the verifier answered; its transfers carry this time, and it
    /// chooses the price sheet.
    pub at: TimestampMs,
}

/// Why a check could not be paid.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum VerificationPayError {
    #[error("model {0} runs in the cloud; vehicles verify fleet models only")]
    NotAFleetModel(ModelId),
    #[error(transparent)]
    Pricing(#[from] PricingError),
    #[error(transparent)]
    Transfer(#[from] TransferError),
}

/// What a check earns its verifier's owner, and the transfers that pay it
/// (none for amounts that round to zero).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CheckPay {
    pub pay: MicroUsd,
    pub energy: MicroUsd,
    pub transfers: Vec<Transfer>,
}

/// The transfers that pay for one check, a pure function of the check and
/// the price book.
pub fn pay(work: &CheckWork, book: &PriceBook) -> Result<CheckPay, VerificationPayError> {
    let sheet = book.sheet_at(work.at);
    let Rate::Fleet(price) = sheet.rate(&work.model, PAID_AT_CLASS)? else {
        return Err(VerificationPayError::NotAFleetModel(work.model.clone()));
    };
    let pay = share_of(
        price.exact_cost(work.tokens, TokenCount(0)),
        sheet.owner_share,
    );
    let energy = energy_cost(work.energy, work.tariff_per_kwh);
    let mut transfers = Vec::with_capacity(2);
    for (kind, amount, quantity) in [
        (TransferKind::VerificationPay, pay, work.tokens.0),
        (TransferKind::VerificationEnergy, energy, work.energy.0),
    ] {
        if amount.is_positive() {
            transfers.push(Transfer::new(TransferSpec {
                kind,
                debit: AccountId::Verification,
                credit: AccountId::Owner(work.owner.clone()),
                amount,
                request_id: work.check.clone(),
                segment: Segment(0),
                quantity,
                at: work.at,
            })?);
        }
    }
    Ok(CheckPay {
        pay,
        energy,
        transfers,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::core::BasisPoints;
    use crate::pricing::{Price, PriceSheet};
    use std::collections::BTreeMap;

    fn book() -> PriceBook {
        let model = ModelId::new("car-model").unwrap();
        let price = |prompt| Price {
            prompt_per_million: MicroUsd(prompt),
            completion_per_million: MicroUsd(prompt * 2),
        };
        let fleet = BTreeMap::from([
            ((model.clone(), TenantClass::Fleet), price(400_000)),
            ((model.clone(), TenantClass::Reserved), price(300_000)),
            ((model, TenantClass::Spot), price(160_000)),
        ]);
        let upstream = BTreeMap::from([(ModelId::new("cloud-model").unwrap(), price(150_000))]);
        PriceBook::new(PriceSheet {
            fleet,
            upstream,
            cloud_margin: BasisPoints(2_000),
            owner_share: BasisPoints(7_000),
        })
        .unwrap()
    }

    fn work() -> CheckWork {
        CheckWork {
            check: RequestId::new("check:chatcmpl-7:1").unwrap(),
            node: NodeId::new("car-2").unwrap(),
            owner: OwnerId::new("bob").unwrap(),
            model: ModelId::new("car-model").unwrap(),
            tokens: TokenCount(1_000),
            compute: DurationMs(2_000),
            energy: MicroWh(55_555),
            tariff_per_kwh: MicroUsd(300_000),
            at: TimestampMs(1_000),
        }
    }

    #[test]
    fn a_check_earns_the_owners_share_of_the_spot_prefill_and_its_energy() {
        let paid = pay(&work(), &book()).unwrap();
        // 1,000 tokens × $0.16 per million = 160 µUSD; 70 % of it.
        assert_eq!(paid.pay, MicroUsd(112));
        // 55,555 µWh at $0.30 per kWh = 16.67 µUSD, rounded down.
        assert_eq!(paid.energy, MicroUsd(16));
        let kinds: Vec<_> = paid.transfers.iter().map(Transfer::kind).collect();
        assert_eq!(
            kinds,
            [
                TransferKind::VerificationPay,
                TransferKind::VerificationEnergy
            ]
        );
        for transfer in &paid.transfers {
            assert_eq!(transfer.debit(), &AccountId::Verification);
            assert_eq!(
                transfer.credit(),
                &AccountId::Owner(OwnerId::new("bob").unwrap())
            );
            assert_eq!(transfer.request_id().as_str(), "check:chatcmpl-7:1");
        }
        // The same check pays the same transfers, so a retry finds them.
        assert_eq!(pay(&work(), &book()).unwrap(), paid);
    }

    #[test]
    fn amounts_that_round_to_nothing_post_nothing() {
        let mut tiny = work();
        tiny.tokens = TokenCount(1);
        tiny.energy = MicroWh(0);
        let paid = pay(&tiny, &book()).unwrap();
        assert!(paid.transfers.is_empty());
    }

    #[test]
    fn a_cloud_model_is_not_paid_as_a_check() {
        let mut cloud = work();
        cloud.model = ModelId::new("cloud-model").unwrap();
        assert_eq!(
            pay(&cloud, &book()),
            Err(VerificationPayError::NotAFleetModel(cloud.model.clone()))
        );
        let mut unknown = work();
        unknown.model = ModelId::new("nothing").unwrap();
        assert!(matches!(
            pay(&unknown, &book()),
            Err(VerificationPayError::Pricing(PricingError::NoPrice { .. }))
        ));
    }
}
