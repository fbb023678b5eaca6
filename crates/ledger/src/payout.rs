//! Payouts: an owner's balance converted into the instrument they chose, at
//! configured rates, never beyond the balance.
//!
//! Each instrument has a price per unit (a cent of cash, a watt-hour of
//! charging credit, a cent of subscription or ride credit). A payout delivers
//! whole units: `units = floor(amount / rate)` and exactly `units × rate` is
//! debited, so the remainder stays in the owner's balance rather than being
//! rounded away. The ledger's floor on owner accounts enforces "never beyond
//! the balance" again at commit, which also protects against two payouts
//! racing each other.

use std::collections::BTreeMap;

use crate::core::{
    AccountId, Instrument, Ledger, LedgerError, MicroUsd, Outcome, OwnerId, RequestId, Segment,
    TimestampMs, Transfer, TransferError, TransferId, TransferKind, TransferSpec,
};

/// Micro-dollars per unit of each instrument.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PayoutRates {
    per_unit: BTreeMap<Instrument, MicroUsd>,
}

impl PayoutRates {
    /// Rates for the given instruments; every rate must be positive.
    pub fn new(
        rates: impl IntoIterator<Item = (Instrument, MicroUsd)>,
    ) -> Result<PayoutRates, PayoutError> {
        let per_unit: BTreeMap<_, _> = rates.into_iter().collect();
        if let Some((instrument, _)) = per_unit.iter().find(|(_, rate)| !rate.is_positive()) {
            return Err(PayoutError::BadRate(*instrument));
        }
        Ok(PayoutRates { per_unit })
    }

    pub fn per_unit(&self, instrument: Instrument) -> Option<MicroUsd> {
        self.per_unit.get(&instrument).copied()
    }
}

/// How much to pay out.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PayoutAmount {
    /// As many whole units as the balance buys.
    All,
    /// At most this much; refused if it exceeds the balance.
    UpTo(MicroUsd),
}

/// An owner's payout request; `payout_id` is the owner's (or app's) id for
/// it, so a retried request is paid once.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PayoutOrder {
    pub payout_id: RequestId,
    pub owner: OwnerId,
    pub instrument: Instrument,
    pub amount: PayoutAmount,
    pub at: TimestampMs,
}

impl PayoutOrder {
    /// The transfer id a payout for this order has (or will have).
    pub fn transfer_id(&self) -> TransferId {
        TransferId::derive(&self.payout_id, Segment(0), TransferKind::Payout)
    }

    /// Whether an existing payout transfer is this order's, already paid.
    pub fn matches(&self, existing: &Transfer) -> bool {
        existing.id() == self.transfer_id()
            && existing.debit() == &AccountId::Owner(self.owner.clone())
            && existing.credit() == &AccountId::Payouts(self.instrument)
    }
}

/// Why a payout was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PayoutError {
    #[error("payout rate for {0} must be positive")]
    BadRate(Instrument),
    #[error("no payout rate is configured for {0}")]
    NoRate(Instrument),
    #[error("payout of {requested} exceeds the balance of {balance}")]
    ExceedsBalance {
        requested: MicroUsd,
        balance: MicroUsd,
    },
    #[error("{amount} does not buy one unit of {instrument} ({rate} per {unit})", unit = instrument.unit())]
    BelowOneUnit {
        amount: MicroUsd,
        instrument: Instrument,
        rate: MicroUsd,
    },
    #[error("payout {0} already exists for another owner or instrument")]
    Conflict(RequestId),
    #[error("owner {0} has no account")]
    UnknownOwner(OwnerId),
    #[error(transparent)]
    Transfer(#[from] TransferError),
    #[error(transparent)]
    Ledger(#[from] LedgerError),
}

/// A payout ready to commit.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PlannedPayout {
    /// Units of the instrument delivered (also the transfer's quantity).
    pub units: u64,
    pub transfer: Transfer,
}

/// Plans a payout against the owner's current balance.
pub fn plan(
    order: &PayoutOrder,
    balance: MicroUsd,
    rates: &PayoutRates,
) -> Result<PlannedPayout, PayoutError> {
    let rate = rates
        .per_unit(order.instrument)
        .ok_or(PayoutError::NoRate(order.instrument))?;
    let wanted = match order.amount {
        PayoutAmount::All => balance.max(MicroUsd::ZERO),
        PayoutAmount::UpTo(amount) if amount > balance => {
            return Err(PayoutError::ExceedsBalance {
                requested: amount,
                balance,
            })
        }
        PayoutAmount::UpTo(amount) => amount,
    };
    // `wanted` is non-negative and `rate` positive, so the quotient is too.
    let units = u64::try_from(wanted.0 / rate.0).unwrap_or(0);
    if units == 0 {
        return Err(PayoutError::BelowOneUnit {
            amount: wanted,
            instrument: order.instrument,
            rate,
        });
    }
    // units × rate ≤ wanted, which is an i64.
    let amount = MicroUsd(wanted.0 - wanted.0 % rate.0);
    let transfer = Transfer::new(TransferSpec {
        kind: TransferKind::Payout,
        debit: AccountId::Owner(order.owner.clone()),
        credit: AccountId::Payouts(order.instrument),
        amount,
        request_id: order.payout_id.clone(),
        segment: Segment(0),
        quantity: units,
        at: order.at,
    })?;
    Ok(PlannedPayout { units, transfer })
}

/// What a payout delivered.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PayoutReceipt {
    pub units: u64,
    pub amount: MicroUsd,
    /// `Exists` when the order had already been paid (a retry).
    pub outcome: Outcome,
}

/// The receipt of an order that was already paid, or a conflict if the id
/// was used for a different owner or instrument.
pub fn receipt_for_existing(
    order: &PayoutOrder,
    existing: &Transfer,
) -> Result<PayoutReceipt, PayoutError> {
    if !order.matches(existing) {
        return Err(PayoutError::Conflict(order.payout_id.clone()));
    }
    Ok(PayoutReceipt {
        units: existing.quantity(),
        amount: existing.amount(),
        outcome: Outcome::Exists,
    })
}

/// Pays an order out of an in-memory ledger. A retried order is recognised
/// by its id before the balance is looked at, so "pay all" is paid once.
pub fn pay(
    ledger: &mut Ledger,
    order: &PayoutOrder,
    rates: &PayoutRates,
) -> Result<PayoutReceipt, PayoutError> {
    if let Some(existing) = ledger.transfer(order.transfer_id()) {
        return receipt_for_existing(order, existing);
    }
    let balance = ledger
        .account(&AccountId::Owner(order.owner.clone()))
        .ok_or_else(|| PayoutError::UnknownOwner(order.owner.clone()))?
        .balance();
    let planned = plan(order, balance, rates)?;
    ledger.commit(std::slice::from_ref(&planned.transfer))?;
    Ok(PayoutReceipt {
        units: planned.units,
        amount: planned.transfer.amount(),
        outcome: Outcome::Created,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rates() -> PayoutRates {
        PayoutRates::new([
            (Instrument::Cash, MicroUsd(10_000)),
            (Instrument::ChargingCredit, MicroUsd(180)),
        ])
        .unwrap()
    }

    fn order(instrument: Instrument, amount: PayoutAmount) -> PayoutOrder {
        PayoutOrder {
            payout_id: RequestId::new("payout-1").unwrap(),
            owner: OwnerId::new("alice").unwrap(),
            instrument,
            amount,
            at: TimestampMs(0),
        }
    }

    #[test]
    fn all_pays_whole_units_and_keeps_the_remainder() {
        let planned = plan(
            &order(Instrument::Cash, PayoutAmount::All),
            MicroUsd(123_456),
            &rates(),
        )
        .unwrap();
        assert_eq!(planned.units, 12);
        assert_eq!(planned.transfer.amount(), MicroUsd(120_000));
        assert_eq!(planned.transfer.quantity(), 12);
    }

    #[test]
    fn charging_credit_converts_at_its_own_rate() {
        // $1 at $0.18 per kWh = 5,555 Wh.
        let planned = plan(
            &order(
                Instrument::ChargingCredit,
                PayoutAmount::UpTo(MicroUsd(1_000_000)),
            ),
            MicroUsd(2_000_000),
            &rates(),
        )
        .unwrap();
        assert_eq!(planned.units, 5_555);
        assert_eq!(planned.transfer.amount(), MicroUsd(999_900));
    }

    #[test]
    fn a_payout_beyond_the_balance_is_refused() {
        let result = plan(
            &order(Instrument::Cash, PayoutAmount::UpTo(MicroUsd(20_001))),
            MicroUsd(20_000),
            &rates(),
        );
        assert!(matches!(result, Err(PayoutError::ExceedsBalance { .. })));
        let dust = plan(
            &order(Instrument::Cash, PayoutAmount::All),
            MicroUsd(9_999),
            &rates(),
        );
        assert!(matches!(dust, Err(PayoutError::BelowOneUnit { .. })));
        let unconfigured = plan(
            &order(Instrument::RideCredit, PayoutAmount::All),
            MicroUsd(1),
            &rates(),
        );
        assert_eq!(
            unconfigured,
            Err(PayoutError::NoRate(Instrument::RideCredit))
        );
    }
}
