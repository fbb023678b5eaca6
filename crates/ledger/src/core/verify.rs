//! The ledger's invariant, checked from scratch: total debits equal total
//! credits, every account's posted totals are exactly the sum of its
//! transfers, and no owner balance is negative.
//!
//! The check streams transfers through a `Verifier` so a store can verify a
//! ledger far larger than memory would hold as a list (memory grows with the
//! number of accounts, not transfers).

use std::collections::BTreeMap;
use std::fmt;

use super::ids::{AccountId, TransferId};
use super::ledger::{AccountState, Ledger};
use super::transfer::Transfer;

/// One way the ledger fails its invariant.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Problem {
    /// The sums over all accounts disagree.
    TotalsUnbalanced { debits: i128, credits: i128 },
    /// An account's posted totals are not explained by its transfers.
    AccountMismatch {
        account: AccountId,
        posted_debits: i128,
        posted_credits: i128,
        transfer_debits: i128,
        transfer_credits: i128,
    },
    /// A transfer names an account the ledger does not hold.
    UnknownAccount {
        transfer: TransferId,
        account: AccountId,
    },
    /// An owner's balance is negative: a payout exceeded what was earned.
    NegativeOwnerBalance { account: AccountId, balance: i128 },
    /// A stored transfer cannot be read back, or its id is not the one its
    /// fields derive (it was altered after commit).
    BadTransfer { stored_id: String, reason: String },
}

impl fmt::Display for Problem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Problem::TotalsUnbalanced { debits, credits } => {
                write!(
                    f,
                    "total debits {debits} differ from total credits {credits}"
                )
            }
            Problem::AccountMismatch {
                account,
                posted_debits,
                posted_credits,
                transfer_debits,
                transfer_credits,
            } => write!(
                f,
                "{account} shows debits {posted_debits} and credits {posted_credits}, \
                 its transfers sum to {transfer_debits} and {transfer_credits}"
            ),
            Problem::UnknownAccount { transfer, account } => {
                write!(f, "transfer {transfer} names unknown account {account}")
            }
            Problem::NegativeOwnerBalance { account, balance } => {
                write!(f, "{account} has a negative balance of {balance} micro-usd")
            }
            Problem::BadTransfer { stored_id, reason } => {
                write!(f, "stored transfer {stored_id} is invalid: {reason}")
            }
        }
    }
}

/// What a verification found.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct VerifyReport {
    pub accounts: u64,
    pub transfers: u64,
    /// Sum of all transfer amounts, in micro-dollars.
    pub volume_micro_usd: i128,
    pub problems: Vec<Problem>,
}

impl VerifyReport {
    pub fn is_ok(&self) -> bool {
        self.problems.is_empty()
    }
}

/// What the streamed transfers say about one account.
#[derive(Debug)]
struct TransferSums {
    debits: i128,
    credits: i128,
    /// The first transfer naming the account, to point at if it is unknown.
    first: TransferId,
}

/// Streams transfers, then checks them against the accounts.
#[derive(Debug, Default)]
pub struct Verifier {
    sums: BTreeMap<AccountId, TransferSums>,
    transfers: u64,
    volume: i128,
    problems: Vec<Problem>,
}

impl Verifier {
    pub fn add_transfer(&mut self, transfer: &Transfer) {
        let amount = i128::from(transfer.amount().0);
        self.transfers += 1;
        self.volume += amount;
        let new_sums = || TransferSums {
            debits: 0,
            credits: 0,
            first: transfer.id(),
        };
        self.sums
            .entry(transfer.debit().clone())
            .or_insert_with(new_sums)
            .debits += amount;
        self.sums
            .entry(transfer.credit().clone())
            .or_insert_with(new_sums)
            .credits += amount;
    }

    pub fn add_problem(&mut self, problem: Problem) {
        self.problems.push(problem);
    }

    /// Compares the streamed sums with every account's posted totals.
    pub fn finish<'a>(
        mut self,
        accounts: impl IntoIterator<Item = (&'a AccountId, &'a AccountState)>,
    ) -> VerifyReport {
        let mut total_debits = 0_i128;
        let mut total_credits = 0_i128;
        let mut account_count = 0_u64;
        for (account, state) in accounts {
            account_count += 1;
            let posted_debits = i128::from(state.debits_posted.0);
            let posted_credits = i128::from(state.credits_posted.0);
            total_debits += posted_debits;
            total_credits += posted_credits;
            let (transfer_debits, transfer_credits) = self
                .sums
                .remove(account)
                .map_or((0, 0), |sums| (sums.debits, sums.credits));
            if (posted_debits, posted_credits) != (transfer_debits, transfer_credits) {
                self.problems.push(Problem::AccountMismatch {
                    account: account.clone(),
                    posted_debits,
                    posted_credits,
                    transfer_debits,
                    transfer_credits,
                });
            }
            let balance = posted_credits - posted_debits;
            if matches!(account, AccountId::Owner(_)) && balance < 0 {
                self.problems.push(Problem::NegativeOwnerBalance {
                    account: account.clone(),
                    balance,
                });
            }
        }
        if total_debits != total_credits {
            self.problems.push(Problem::TotalsUnbalanced {
                debits: total_debits,
                credits: total_credits,
            });
        }
        // Whatever is left was named by transfers but has no account row.
        for (account, sums) in self.sums {
            self.problems.push(Problem::UnknownAccount {
                transfer: sums.first,
                account,
            });
        }
        VerifyReport {
            accounts: account_count,
            transfers: self.transfers,
            volume_micro_usd: self.volume,
            problems: self.problems,
        }
    }
}

/// Verifies an in-memory ledger.
pub fn verify_ledger(ledger: &Ledger) -> VerifyReport {
    let mut verifier = Verifier::default();
    for transfer in ledger.transfers() {
        verifier.add_transfer(transfer);
    }
    verifier.finish(ledger.accounts())
}
