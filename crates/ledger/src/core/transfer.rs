//! Transfers: the only way money moves, immutable once committed.
//!
//! A transfer debits one account and credits another by the same positive
//! amount, so every committed transfer keeps total debits equal to total
//! credits. Each kind has exactly one shape (which kinds of account it may
//! debit and credit), checked when the transfer is built, so a settlement bug
//! cannot, say, pay an owner out of a tenant's balance.

use std::fmt;
use std::str::FromStr;

use super::ids::{AccountId, RequestId, Segment, TransferId};
use super::units::{MicroUsd, TimestampMs};

/// Why money moved.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum TransferKind {
    /// Tenant deposits → tenant: a prepaid top-up.
    TopUp,
    /// Tenant → platform revenue: what a request costs the customer.
    TokenCharge,
    /// Platform revenue → owner: the owner's share of the tokens a node produced.
    RevenueShare,
    /// Energy-reimbursement expense → owner: the kWh a node used, at the owner's tariff.
    EnergyReimbursement,
    /// Cloud upstream cost → cloud provider: what an escalation cost upstream.
    CloudCost,
    /// Owner → payouts: balance converted into an instrument.
    Payout,
    /// Owner → platform revenue: a revenue share taken back because the node
    /// that earned it was found returning bad answers (`crate::clawback`).
    /// Reverses the `RevenueShare` of the same request and segment.
    RevenueClawback,
    /// Owner → energy-reimbursement expense: the energy of a segment whose
    /// answer was bad, taken back. Reverses the `EnergyReimbursement` of the
    /// same request and segment.
    EnergyClawback,
    /// Platform revenue → tenant: the part of a request's token charge that a
    /// segment with a bad answer earned, given back. Reverses part of the
    /// request's `TokenCharge`; its segment is the segment refunded.
    Refund,
    /// Verification → owner: what checking another vehicle's answer earned
    /// the verifier's owner, for the tokens it prefilled
    /// (`crate::verification`). Its request id names the check.
    VerificationPay,
    /// Verification → owner: the kWh a verifier used for a check, at the
    /// owner's tariff.
    VerificationEnergy,
    /// Owner → verification: a check's pay taken back because the verifier
    /// was found cheating (`Store::claw_back_checks`). Reverses the
    /// `VerificationPay` of the same check.
    VerificationPayClawback,
    /// Owner → verification: a check's energy taken back with its pay.
    /// Reverses the `VerificationEnergy` of the same check.
    VerificationEnergyClawback,
}

impl TransferKind {
    pub const ALL: [TransferKind; 13] = [
        TransferKind::TopUp,
        TransferKind::TokenCharge,
        TransferKind::RevenueShare,
        TransferKind::EnergyReimbursement,
        TransferKind::CloudCost,
        TransferKind::Payout,
        TransferKind::RevenueClawback,
        TransferKind::EnergyClawback,
        TransferKind::Refund,
        TransferKind::VerificationPay,
        TransferKind::VerificationEnergy,
        TransferKind::VerificationPayClawback,
        TransferKind::VerificationEnergyClawback,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            TransferKind::TopUp => "top-up",
            TransferKind::TokenCharge => "token-charge",
            TransferKind::RevenueShare => "revenue-share",
            TransferKind::EnergyReimbursement => "energy-reimbursement",
            TransferKind::CloudCost => "cloud-cost",
            TransferKind::Payout => "payout",
            TransferKind::RevenueClawback => "revenue-clawback",
            TransferKind::EnergyClawback => "energy-clawback",
            TransferKind::Refund => "refund",
            TransferKind::VerificationPay => "verification-pay",
            TransferKind::VerificationEnergy => "verification-energy",
            TransferKind::VerificationPayClawback => "verification-pay-clawback",
            TransferKind::VerificationEnergyClawback => "verification-energy-clawback",
        }
    }

    /// The kind this kind reverses, for the reversals a clawback posts;
    /// `None` for every other kind. A reversal moves money back along the
    /// original's accounts, so its shape is the original's, swapped.
    pub fn reverses(self) -> Option<TransferKind> {
        match self {
            TransferKind::RevenueClawback => Some(TransferKind::RevenueShare),
            TransferKind::EnergyClawback => Some(TransferKind::EnergyReimbursement),
            TransferKind::Refund => Some(TransferKind::TokenCharge),
            TransferKind::VerificationPayClawback => Some(TransferKind::VerificationPay),
            TransferKind::VerificationEnergyClawback => Some(TransferKind::VerificationEnergy),
            TransferKind::TopUp
            | TransferKind::TokenCharge
            | TransferKind::RevenueShare
            | TransferKind::EnergyReimbursement
            | TransferKind::CloudCost
            | TransferKind::Payout
            | TransferKind::VerificationPay
            | TransferKind::VerificationEnergy => None,
        }
    }

    /// Whether this kind takes back from an owner what a node found cheating
    /// was paid. Only these may take a debited account below its floor (see
    /// `core::ledger`): a clawback is not a spend the owner chose, and the
    /// money may already have been paid out.
    pub fn is_clawback(self) -> bool {
        matches!(
            self,
            TransferKind::RevenueClawback
                | TransferKind::EnergyClawback
                | TransferKind::VerificationPayClawback
                | TransferKind::VerificationEnergyClawback
        )
    }

    /// Whether `debit → credit` is the one shape this kind allows.
    fn allows(self, debit: &AccountId, credit: &AccountId) -> bool {
        use AccountId as A;
        match self {
            TransferKind::TopUp => matches!((debit, credit), (A::TenantDeposits, A::Tenant(_))),
            TransferKind::TokenCharge => {
                matches!((debit, credit), (A::Tenant(_), A::PlatformRevenue))
            }
            TransferKind::RevenueShare => {
                matches!((debit, credit), (A::PlatformRevenue, A::Owner(_)))
            }
            TransferKind::EnergyReimbursement => {
                matches!((debit, credit), (A::EnergyReimbursement, A::Owner(_)))
            }
            TransferKind::CloudCost => {
                matches!((debit, credit), (A::CloudUpstreamCost, A::CloudProvider))
            }
            TransferKind::Payout => matches!((debit, credit), (A::Owner(_), A::Payouts(_))),
            TransferKind::RevenueClawback => {
                matches!((debit, credit), (A::Owner(_), A::PlatformRevenue))
            }
            TransferKind::EnergyClawback => {
                matches!((debit, credit), (A::Owner(_), A::EnergyReimbursement))
            }
            TransferKind::Refund => matches!((debit, credit), (A::PlatformRevenue, A::Tenant(_))),
            TransferKind::VerificationPay | TransferKind::VerificationEnergy => {
                matches!((debit, credit), (A::Verification, A::Owner(_)))
            }
            TransferKind::VerificationPayClawback | TransferKind::VerificationEnergyClawback => {
                matches!((debit, credit), (A::Owner(_), A::Verification))
            }
        }
    }
}

impl fmt::Display for TransferKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for TransferKind {
    type Err = TransferError;
    fn from_str(s: &str) -> Result<Self, TransferError> {
        TransferKind::ALL
            .into_iter()
            .find(|kind| kind.as_str() == s)
            .ok_or_else(|| TransferError::UnknownKind(s.to_owned()))
    }
}

/// Why a transfer could not be built.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TransferError {
    #[error("transfer amount must be positive, got {0}")]
    NonPositiveAmount(MicroUsd),
    #[error("a {kind} transfer cannot debit {debit} and credit {credit}")]
    WrongAccounts {
        kind: TransferKind,
        debit: AccountId,
        credit: AccountId,
    },
    #[error("unknown transfer kind {0:?}")]
    UnknownKind(String),
}

/// Everything a transfer says, except its id, which is derived from it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TransferSpec {
    pub kind: TransferKind,
    pub debit: AccountId,
    pub credit: AccountId,
    pub amount: MicroUsd,
    pub request_id: RequestId,
    pub segment: Segment,
    /// What the amount paid for, in the kind's own unit: tokens for charges,
    /// revenue share and cloud cost; µWh for energy; instrument units for
    /// payouts; zero for top-ups. Kept so an audit can recompute amounts.
    pub quantity: u64,
    /// When the priced event happened (the request's completion, the payout's
    /// request); a retry carries the same time because it settles the same event.
    pub at: TimestampMs,
}

/// A validated transfer. Fields are read-only so the id always matches them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Transfer {
    id: TransferId,
    spec: TransferSpec,
}

impl Transfer {
    pub fn new(spec: TransferSpec) -> Result<Transfer, TransferError> {
        if !spec.amount.is_positive() {
            return Err(TransferError::NonPositiveAmount(spec.amount));
        }
        if !spec.kind.allows(&spec.debit, &spec.credit) {
            return Err(TransferError::WrongAccounts {
                kind: spec.kind,
                debit: spec.debit,
                credit: spec.credit,
            });
        }
        let id = TransferId::derive(&spec.request_id, spec.segment, spec.kind);
        Ok(Transfer { id, spec })
    }

    pub fn id(&self) -> TransferId {
        self.id
    }
    pub fn kind(&self) -> TransferKind {
        self.spec.kind
    }
    pub fn debit(&self) -> &AccountId {
        &self.spec.debit
    }
    pub fn credit(&self) -> &AccountId {
        &self.spec.credit
    }
    pub fn amount(&self) -> MicroUsd {
        self.spec.amount
    }
    pub fn request_id(&self) -> &RequestId {
        &self.spec.request_id
    }
    pub fn segment(&self) -> Segment {
        self.spec.segment
    }
    pub fn quantity(&self) -> u64 {
        self.spec.quantity
    }
    pub fn at(&self) -> TimestampMs {
        self.spec.at
    }
    pub fn spec(&self) -> &TransferSpec {
        &self.spec
    }

    /// The id of the transfer this one reverses, if it is a reversal (see
    /// [`TransferKind::reverses`]): the same request and segment for a
    /// clawback; for a refund, the request's token charge, which is posted
    /// on segment 0 (the refund's own segment names the segment refunded).
    pub fn reversed_id(&self) -> Option<TransferId> {
        let original = self.kind().reverses()?;
        let segment = match original {
            TransferKind::TokenCharge => Segment(0),
            _ => self.segment(),
        };
        Some(TransferId::derive(self.request_id(), segment, original))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::core::ids::{OwnerId, TenantId};

    fn spec(kind: TransferKind, debit: AccountId, credit: AccountId) -> TransferSpec {
        TransferSpec {
            kind,
            debit,
            credit,
            amount: MicroUsd(10),
            request_id: RequestId::new("r1").unwrap(),
            segment: Segment(0),
            quantity: 0,
            at: TimestampMs(0),
        }
    }

    #[test]
    fn each_kind_accepts_only_its_own_shape() {
        let tenant = AccountId::Tenant(TenantId::new("t").unwrap());
        let owner = AccountId::Owner(OwnerId::new("o").unwrap());
        let charge = spec(
            TransferKind::TokenCharge,
            tenant.clone(),
            AccountId::PlatformRevenue,
        );
        assert!(Transfer::new(charge).is_ok());
        let tenant_pays_owner = spec(TransferKind::RevenueShare, tenant, owner);
        assert!(matches!(
            Transfer::new(tenant_pays_owner),
            Err(TransferError::WrongAccounts { .. })
        ));
    }

    #[test]
    fn zero_and_negative_amounts_are_refused() {
        let tenant = AccountId::Tenant(TenantId::new("t").unwrap());
        let mut zero = spec(TransferKind::TopUp, AccountId::TenantDeposits, tenant);
        zero.amount = MicroUsd(0);
        assert_eq!(
            Transfer::new(zero.clone()),
            Err(TransferError::NonPositiveAmount(MicroUsd(0)))
        );
        zero.amount = MicroUsd(-3);
        assert!(Transfer::new(zero).is_err());
    }

    #[test]
    fn a_reversal_has_the_shape_of_its_original_swapped() {
        let tenant = AccountId::Tenant(TenantId::new("t").unwrap());
        let owner = AccountId::Owner(OwnerId::new("o").unwrap());
        let originals = [
            (
                TransferKind::TokenCharge,
                tenant,
                AccountId::PlatformRevenue,
            ),
            (
                TransferKind::RevenueShare,
                AccountId::PlatformRevenue,
                owner.clone(),
            ),
            (
                TransferKind::EnergyReimbursement,
                AccountId::EnergyReimbursement,
                owner.clone(),
            ),
            (
                TransferKind::VerificationPay,
                AccountId::Verification,
                owner.clone(),
            ),
            (
                TransferKind::VerificationEnergy,
                AccountId::Verification,
                owner,
            ),
        ];
        let reversals: Vec<TransferKind> = TransferKind::ALL
            .into_iter()
            .filter(|kind| kind.reverses().is_some())
            .collect();
        assert_eq!(reversals.len(), originals.len());
        for reversal in reversals {
            let (original, debit, credit) = originals
                .iter()
                .find(|(kind, ..)| Some(*kind) == reversal.reverses())
                .unwrap();
            assert!(Transfer::new(spec(*original, debit.clone(), credit.clone())).is_ok());
            let swapped = spec(reversal, credit.clone(), debit.clone());
            assert!(Transfer::new(swapped).is_ok(), "{reversal}");
            let unswapped = spec(reversal, debit.clone(), credit.clone());
            assert!(Transfer::new(unswapped).is_err(), "{reversal}");
        }
    }

    #[test]
    fn kinds_round_trip_through_text() {
        for kind in TransferKind::ALL {
            assert_eq!(kind.as_str().parse::<TransferKind>(), Ok(kind));
        }
    }
}
