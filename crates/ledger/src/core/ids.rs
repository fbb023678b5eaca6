//! Identifiers: who owns an account, which request a transfer belongs to, and
//! the transfer id derived from them.
//!
//! Transfer ids are not random: they are a hash of (request id, segment, kind),
//! so a retried settlement produces the same ids and the ledger can recognise
//! it (TigerBeetle's "client-generated ids, processed at most once").

use std::fmt;
use std::str::FromStr;

use sha2::{Digest, Sha256};

use super::transfer::TransferKind;

/// Longest name accepted for any id; names travel into SQL text columns and
/// CSV files, so they are bounded.
pub const NAME_BYTES_MAX: usize = 128;

/// Why a name was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum IdError {
    #[error("{what} must not be empty")]
    Empty { what: &'static str },
    #[error("{what} is longer than {NAME_BYTES_MAX} bytes")]
    TooLong { what: &'static str },
    #[error("{what} contains {character:?}; allowed are ascii letters, digits and -_.@:/")]
    BadCharacter { what: &'static str, character: char },
    #[error("unknown account {0:?}")]
    UnknownAccount(String),
    #[error("unknown payout instrument {0:?}")]
    UnknownInstrument(String),
}

fn validate_name(what: &'static str, name: &str) -> Result<(), IdError> {
    if name.is_empty() {
        return Err(IdError::Empty { what });
    }
    if name.len() > NAME_BYTES_MAX {
        return Err(IdError::TooLong { what });
    }
    let allowed = |c: char| c.is_ascii_alphanumeric() || "-_.@:/".contains(c);
    match name.chars().find(|c| !allowed(*c)) {
        Some(character) => Err(IdError::BadCharacter { what, character }),
        None => Ok(()),
    }
}

macro_rules! name_type {
    ($(#[$doc:meta])* $name:ident, $what:literal) => {
        $(#[$doc])*
        #[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
        pub struct $name(String);

        impl $name {
            pub fn new(name: impl Into<String>) -> Result<Self, IdError> {
                let name = name.into();
                validate_name($what, &name)?;
                Ok(Self(name))
            }

            pub fn as_str(&self) -> &str {
                &self.0
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(&self.0)
            }
        }

        impl FromStr for $name {
            type Err = IdError;
            fn from_str(s: &str) -> Result<Self, IdError> {
                Self::new(s)
            }
        }
    };
}

name_type!(
    /// An API customer.
    TenantId,
    "tenant id"
);
name_type!(
    /// A vehicle owner; one owner may have several vehicles.
    OwnerId,
    "owner id"
);
name_type!(
    /// One vehicle's computer, the unit that runs generations.
    NodeId,
    "node id"
);
name_type!(
    /// A model as named in the API (`SmolLM2-135M-Instruct`, an upstream model).
    ModelId,
    "model id"
);
name_type!(
    /// What a transfer is about: an API request id, a top-up reference or a
    /// payout id, always chosen by the caller so that retries reuse it.
    RequestId,
    "request id"
);
name_type!(
    /// A gateway process that holds money for the requests it has in flight
    /// (`store::holds`); a fresh one each time a gateway starts.
    GatewayId,
    "gateway id"
);

/// The position of a segment in a request: a generation that migrates runs as
/// segment 0 on the first node, segment 1 on the next, and so on.
/// Request-level transfers (the tenant's charge) use segment 0.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct Segment(pub u32);

impl fmt::Display for Segment {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0)
    }
}

/// A 128-bit transfer id, derived from (request id, segment, kind).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct TransferId(pub u128);

impl TransferId {
    /// The first 16 bytes of SHA-256 over a versioned, length-prefixed
    /// encoding, so that no two distinct triples share an input.
    pub fn derive(request_id: &RequestId, segment: Segment, kind: TransferKind) -> TransferId {
        let mut hasher = Sha256::new();
        hasher.update(b"fleetgrid.ledger.transfer.v1\0");
        hasher.update(kind.as_str().as_bytes());
        hasher.update([0]);
        hasher.update((request_id.as_str().len() as u64).to_be_bytes());
        hasher.update(request_id.as_str().as_bytes());
        hasher.update(segment.0.to_be_bytes());
        let digest = hasher.finalize();
        let mut first = [0_u8; 16];
        first.copy_from_slice(&digest[..16]);
        TransferId(u128::from_be_bytes(first))
    }

    /// 32 lowercase hex digits, the form stored in SQL.
    pub fn to_hex(self) -> String {
        format!("{:032x}", self.0)
    }

    pub fn from_hex(hex: &str) -> Option<TransferId> {
        if hex.len() != 32 {
            return None;
        }
        u128::from_str_radix(hex, 16).ok().map(TransferId)
    }
}

impl fmt::Display for TransferId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.to_hex())
    }
}

/// What an owner can be paid in.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Instrument {
    /// Money, in cents.
    Cash,
    /// Charging credit, in watt-hours.
    ChargingCredit,
    /// Software-subscription credit, in cents of credit.
    SubscriptionCredit,
    /// Ride credit, in cents of credit.
    RideCredit,
}

impl Instrument {
    pub const ALL: [Instrument; 4] = [
        Instrument::Cash,
        Instrument::ChargingCredit,
        Instrument::SubscriptionCredit,
        Instrument::RideCredit,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Instrument::Cash => "cash",
            Instrument::ChargingCredit => "charging-credit",
            Instrument::SubscriptionCredit => "subscription-credit",
            Instrument::RideCredit => "ride-credit",
        }
    }

    /// The unit one payout quantity counts.
    pub fn unit(self) -> &'static str {
        match self {
            Instrument::Cash => "usd-cent",
            Instrument::ChargingCredit => "wh",
            Instrument::SubscriptionCredit | Instrument::RideCredit => "credit-cent",
        }
    }
}

impl FromStr for Instrument {
    type Err = IdError;
    fn from_str(s: &str) -> Result<Self, IdError> {
        Instrument::ALL
            .into_iter()
            .find(|instrument| instrument.as_str() == s)
            .ok_or_else(|| IdError::UnknownInstrument(s.to_owned()))
    }
}

impl fmt::Display for Instrument {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// An account in the ledger. Every balance is `credits - debits`.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum AccountId {
    /// A tenant's prepaid balance (positive) or credit used (negative).
    Tenant(TenantId),
    /// What the platform owes an owner. Negative only after a clawback took
    /// back more than the balance held: then it is what the owner owes,
    /// repaid out of later earnings (see `core::ledger`).
    Owner(OwnerId),
    /// Token revenue from tenants, less the owners' revenue share.
    PlatformRevenue,
    /// Expense account: energy reimbursed to owners (its balance is minus the total).
    EnergyReimbursement,
    /// Expense account: what cloud escalations cost upstream.
    CloudUpstreamCost,
    /// Expense account: what checking vehicles' answers costs the platform,
    /// paid to the verifiers' owners (its balance is minus the total).
    Verification,
    /// Owed to the cloud upstream provider for escalated requests.
    CloudProvider,
    /// Money tenants paid in; the counterpart of every top-up.
    TenantDeposits,
    /// Everything paid out to owners in one instrument.
    Payouts(Instrument),
}

impl AccountId {
    /// The platform's own accounts, created when a store is opened.
    pub fn system_accounts() -> Vec<AccountId> {
        let mut accounts = vec![
            AccountId::PlatformRevenue,
            AccountId::EnergyReimbursement,
            AccountId::CloudUpstreamCost,
            AccountId::Verification,
            AccountId::CloudProvider,
            AccountId::TenantDeposits,
        ];
        accounts.extend(Instrument::ALL.map(AccountId::Payouts));
        accounts
    }
}

impl fmt::Display for AccountId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            AccountId::Tenant(tenant) => write!(f, "tenant:{tenant}"),
            AccountId::Owner(owner) => write!(f, "owner:{owner}"),
            AccountId::PlatformRevenue => f.write_str("platform:revenue"),
            AccountId::EnergyReimbursement => f.write_str("platform:energy-reimbursement"),
            AccountId::CloudUpstreamCost => f.write_str("platform:cloud-upstream-cost"),
            AccountId::Verification => f.write_str("platform:verification"),
            AccountId::CloudProvider => f.write_str("external:cloud-provider"),
            AccountId::TenantDeposits => f.write_str("external:tenant-deposits"),
            AccountId::Payouts(instrument) => write!(f, "payouts:{instrument}"),
        }
    }
}

impl FromStr for AccountId {
    type Err = IdError;
    fn from_str(s: &str) -> Result<Self, IdError> {
        let unknown = || IdError::UnknownAccount(s.to_owned());
        let (prefix, rest) = s.split_once(':').ok_or_else(unknown)?;
        match (prefix, rest) {
            ("tenant", tenant) => Ok(AccountId::Tenant(TenantId::new(tenant)?)),
            ("owner", owner) => Ok(AccountId::Owner(OwnerId::new(owner)?)),
            ("payouts", instrument) => Ok(AccountId::Payouts(instrument.parse()?)),
            ("platform", "revenue") => Ok(AccountId::PlatformRevenue),
            ("platform", "energy-reimbursement") => Ok(AccountId::EnergyReimbursement),
            ("platform", "cloud-upstream-cost") => Ok(AccountId::CloudUpstreamCost),
            ("platform", "verification") => Ok(AccountId::Verification),
            ("external", "cloud-provider") => Ok(AccountId::CloudProvider),
            ("external", "tenant-deposits") => Ok(AccountId::TenantDeposits),
            _ => Err(unknown()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_reject_what_would_break_sql_or_csv() {
        assert!(TenantId::new("acme-ai").is_ok());
        assert_eq!(TenantId::new(""), Err(IdError::Empty { what: "tenant id" }));
        assert!(matches!(
            OwnerId::new("bob,smith"),
            Err(IdError::BadCharacter { character: ',', .. })
        ));
        assert!(RequestId::new("x".repeat(NAME_BYTES_MAX + 1)).is_err());
    }

    #[test]
    fn account_ids_round_trip_through_text() {
        let mut accounts = AccountId::system_accounts();
        accounts.push(AccountId::Tenant(TenantId::new("acme").unwrap()));
        accounts.push(AccountId::Owner(OwnerId::new("o:1").unwrap()));
        for account in accounts {
            assert_eq!(account.to_string().parse::<AccountId>(), Ok(account));
        }
        assert!("platform:nothing".parse::<AccountId>().is_err());
    }

    #[test]
    fn transfer_ids_depend_on_every_part_of_the_key() {
        let request = RequestId::new("chatcmpl-1").unwrap();
        let other = RequestId::new("chatcmpl-2").unwrap();
        let base = TransferId::derive(&request, Segment(0), TransferKind::TokenCharge);
        assert_eq!(
            base,
            TransferId::derive(&request, Segment(0), TransferKind::TokenCharge)
        );
        assert_ne!(
            base,
            TransferId::derive(&other, Segment(0), TransferKind::TokenCharge)
        );
        assert_ne!(
            base,
            TransferId::derive(&request, Segment(1), TransferKind::TokenCharge)
        );
        assert_ne!(
            base,
            TransferId::derive(&request, Segment(0), TransferKind::RevenueShare)
        );
        assert_eq!(TransferId::from_hex(&base.to_hex()), Some(base));
    }
}
