//! The in-memory ledger and the batch rules every backend shares.
//!
//! A batch is applied all or nothing, in order: each transfer is either new
//! (`Created`), or repeats an already committed transfer field for field
//! (`Exists`, nothing happens), or is refused, and then the whole batch is.
//! A transfer is refused when its id exists with different fields (a conflict:
//! two different events hashed to one key, or a retry that is not a retry),
//! when an account is missing, or when it would take the debited account below
//! its floor. `plan_batch` holds these rules once; `Ledger` and the SQL stores
//! both call it, so they cannot disagree.
//!
//! The one exception to floors is a clawback ([`TransferKind::is_clawback`]):
//! it takes back what a node found cheating was paid, which its owner may have
//! paid out already, so it is never refused for the owner's floor. The owner's
//! balance goes below zero by what could not be taken (the plan's
//! `shortfall`); later earnings repay it, and no payout is possible until they
//! have, because a payout is held to the floor like any other debit.
//!
//! [`TransferKind::is_clawback`]: super::transfer::TransferKind::is_clawback

use std::collections::{BTreeMap, HashMap};

use super::ids::{AccountId, TenantId, TransferId};
use super::transfer::{Transfer, TransferSpec};
use super::units::MicroUsd;

/// The most transfers one batch may hold, so one commit has bounded size and
/// a bounded number of SQL parameters.
pub const BATCH_TRANSFERS_MAX: usize = 8_192;

/// An account's posted totals and the lowest balance a debit may leave.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AccountState {
    pub debits_posted: MicroUsd,
    pub credits_posted: MicroUsd,
    /// `None` for accounts that may go arbitrarily negative (expense and
    /// external accounts); `Some(0)` for owners and prepaid tenants;
    /// `Some(-limit)` for tenants with a credit limit.
    pub floor: Option<MicroUsd>,
}

impl AccountState {
    /// A fresh account with the floor its kind starts with.
    pub fn opened(id: &AccountId) -> AccountState {
        let floor = match id {
            AccountId::Tenant(_) | AccountId::Owner(_) => Some(MicroUsd::ZERO),
            _ => None,
        };
        AccountState {
            debits_posted: MicroUsd::ZERO,
            credits_posted: MicroUsd::ZERO,
            floor,
        }
    }

    /// `credits - debits`. Posted totals are non-negative and bounded by
    /// `i64`, so the difference cannot overflow.
    pub fn balance(&self) -> MicroUsd {
        MicroUsd(self.credits_posted.0 - self.debits_posted.0)
    }

    /// How much more may be debited before the floor; `None` if unbounded.
    pub fn available(&self) -> Option<MicroUsd> {
        self.floor
            .map(|floor| MicroUsd(self.balance().0.saturating_sub(floor.0)))
    }

    /// How far the balance is below the floor; zero when it is not, or when
    /// the account has none. Only a clawback takes an account there (or a
    /// floor raised above the balance, such as a lowered credit limit).
    pub fn below_floor(&self) -> MicroUsd {
        match self.floor {
            Some(floor) => MicroUsd(floor.0.saturating_sub(self.balance().0).max(0)),
            None => MicroUsd::ZERO,
        }
    }
}

/// What happened to one transfer of a committed batch.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    Created,
    /// Already committed with identical fields; nothing was changed.
    Exists,
}

/// Why a batch was refused. Nothing of a refused batch is applied.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum LedgerError {
    #[error("batch of {len} transfers exceeds the limit of {BATCH_TRANSFERS_MAX}")]
    BatchTooLarge { len: usize },
    #[error("transfer {index} of the batch names account {account}, which does not exist")]
    AccountNotFound { index: usize, account: AccountId },
    #[error("transfer {id} already exists with different fields (batch index {index})")]
    Conflict {
        index: usize,
        id: TransferId,
        existing: Box<TransferSpec>,
        attempted: Box<TransferSpec>,
    },
    #[error(
        "transfer {id} would take {account} to {balance_after}, below its floor of {floor} (batch index {index})"
    )]
    InsufficientFunds {
        index: usize,
        id: TransferId,
        account: AccountId,
        balance_after: MicroUsd,
        floor: MicroUsd,
    },
    #[error("posted totals of {account} would overflow")]
    Overflow { account: AccountId },
}

/// The result of planning a batch: what to insert and what accounts become.
#[derive(Debug, Default)]
pub struct BatchPlan {
    pub outcomes: Vec<Outcome>,
    /// Indices into the batch of the transfers to insert, in batch order.
    pub created: Vec<usize>,
    /// New states of every account a created transfer touches.
    pub accounts: BTreeMap<AccountId, AccountState>,
    /// How far the batch's clawbacks took debited accounts below their
    /// floors, beyond where they already were: what the owners owe now that
    /// they did not owe before. Zero for a batch without clawbacks.
    pub shortfall: MicroUsd,
}

/// Decides a batch against committed transfers and current account states.
///
/// `existing` needs to hold only committed transfers whose ids appear in the
/// batch, and `accounts` only the accounts the batch names.
pub fn plan_batch(
    batch: &[Transfer],
    existing: &HashMap<TransferId, Transfer>,
    accounts: &BTreeMap<AccountId, AccountState>,
) -> Result<BatchPlan, LedgerError> {
    if batch.len() > BATCH_TRANSFERS_MAX {
        return Err(LedgerError::BatchTooLarge { len: batch.len() });
    }
    let mut plan = BatchPlan::default();
    let mut created_in_batch: HashMap<TransferId, usize> = HashMap::new();
    for (index, transfer) in batch.iter().enumerate() {
        let earlier = existing
            .get(&transfer.id())
            .or_else(|| created_in_batch.get(&transfer.id()).map(|i| &batch[*i]));
        if let Some(earlier) = earlier {
            if earlier.spec() != transfer.spec() {
                return Err(LedgerError::Conflict {
                    index,
                    id: transfer.id(),
                    existing: Box::new(earlier.spec().clone()),
                    attempted: Box::new(transfer.spec().clone()),
                });
            }
            plan.outcomes.push(Outcome::Exists);
            continue;
        }
        let shortfall = post(&mut plan.accounts, accounts, index, transfer)?;
        plan.shortfall =
            plan.shortfall
                .checked_add(shortfall)
                .ok_or_else(|| LedgerError::Overflow {
                    account: transfer.debit().clone(),
                })?;
        created_in_batch.insert(transfer.id(), index);
        plan.created.push(index);
        plan.outcomes.push(Outcome::Created);
    }
    Ok(plan)
}

/// Applies one transfer to the planned account states, checking the floor of
/// the debited account. Credits are never refused: an account under its floor
/// (a tenant whose credit limit was lowered) may still be paid into. A
/// clawback is not refused either; returns how far it took its account below
/// the floor beyond where the account already was (zero for other kinds).
fn post(
    planned: &mut BTreeMap<AccountId, AccountState>,
    current: &BTreeMap<AccountId, AccountState>,
    index: usize,
    transfer: &Transfer,
) -> Result<MicroUsd, LedgerError> {
    let state_of = |planned: &BTreeMap<AccountId, AccountState>, account: &AccountId| {
        planned
            .get(account)
            .or_else(|| current.get(account))
            .copied()
            .ok_or_else(|| LedgerError::AccountNotFound {
                index,
                account: account.clone(),
            })
    };
    let mut debit = state_of(planned, transfer.debit())?;
    let mut credit = state_of(planned, transfer.credit())?;
    let below_floor_before = debit.below_floor();
    let overflow = |account: &AccountId| LedgerError::Overflow {
        account: account.clone(),
    };
    debit.debits_posted = debit
        .debits_posted
        .checked_add(transfer.amount())
        .ok_or_else(|| overflow(transfer.debit()))?;
    credit.credits_posted = credit
        .credits_posted
        .checked_add(transfer.amount())
        .ok_or_else(|| overflow(transfer.credit()))?;
    let shortfall = MicroUsd(debit.below_floor().0 - below_floor_before.0);
    match debit.floor {
        Some(floor) if shortfall.is_positive() && !transfer.kind().is_clawback() => {
            return Err(LedgerError::InsufficientFunds {
                index,
                id: transfer.id(),
                account: transfer.debit().clone(),
                balance_after: debit.balance(),
                floor,
            });
        }
        _ => {}
    }
    planned.insert(transfer.debit().clone(), debit);
    planned.insert(transfer.credit().clone(), credit);
    Ok(shortfall.max(MicroUsd::ZERO))
}

/// A complete ledger in memory: the reference model the SQL stores are
/// tested against, and the engine of the property tests.
#[derive(Debug, Clone, Default)]
pub struct Ledger {
    accounts: BTreeMap<AccountId, AccountState>,
    transfers: HashMap<TransferId, Transfer>,
    /// Commit order, so that `transfers()` replays deterministically.
    order: Vec<TransferId>,
}

impl Ledger {
    /// A ledger holding the platform's system accounts.
    pub fn new() -> Ledger {
        let mut ledger = Ledger::default();
        for account in AccountId::system_accounts() {
            ledger.open_account(account);
        }
        ledger
    }

    /// Opens an account with its kind's default floor; opening an existing
    /// account changes nothing.
    pub fn open_account(&mut self, account: AccountId) {
        let state = AccountState::opened(&account);
        self.accounts.entry(account).or_insert(state);
    }

    /// Lets a tenant's balance go down to `-limit` (zero makes it prepaid).
    /// Returns false if the tenant has no account.
    pub fn set_credit_limit(&mut self, tenant: &TenantId, limit: MicroUsd) -> bool {
        match self.accounts.get_mut(&AccountId::Tenant(tenant.clone())) {
            Some(state) => {
                state.floor = Some(MicroUsd(-limit.0.abs()));
                true
            }
            None => false,
        }
    }

    pub fn commit(&mut self, batch: &[Transfer]) -> Result<Vec<Outcome>, LedgerError> {
        let plan = plan_batch(batch, &self.transfers, &self.accounts)?;
        for index in &plan.created {
            let transfer = &batch[*index];
            self.order.push(transfer.id());
            self.transfers.insert(transfer.id(), transfer.clone());
        }
        self.accounts.extend(plan.accounts);
        Ok(plan.outcomes)
    }

    pub fn account(&self, account: &AccountId) -> Option<AccountState> {
        self.accounts.get(account).copied()
    }

    pub fn accounts(&self) -> impl Iterator<Item = (&AccountId, &AccountState)> {
        self.accounts.iter()
    }

    pub fn transfer(&self, id: TransferId) -> Option<&Transfer> {
        self.transfers.get(&id)
    }

    /// Every transfer in commit order.
    pub fn transfers(&self) -> impl Iterator<Item = &Transfer> {
        self.order.iter().filter_map(|id| self.transfers.get(id))
    }
}
