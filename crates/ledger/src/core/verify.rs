//! The ledger's invariant, checked from scratch: total debits equal total
//! credits, every account's posted totals are exactly the sum of its
//! transfers, no owner balance is negative except by what clawbacks took
//! (that part is reported as owed, not as a problem), and every reversal (a
//! clawback or a refund) undoes a transfer the ledger holds: a clawback
//! mirrors its original exactly, and a request's refunds never exceed its
//! charge.
//!
//! The check streams transfers through a `Verifier` so a store can verify a
//! ledger far larger than memory would hold as a list (memory grows with the
//! number of accounts, not transfers). Reversals are the exception: they are
//! kept until `finish`, which needs their originals; they exist only for the
//! segments of clawed-back nodes, a small part of any ledger.

use std::collections::{BTreeMap, HashMap};
use std::fmt;

use super::ids::{AccountId, OwnerId, RequestId, Segment, TransferId};
use super::ledger::{AccountState, Ledger};
use super::transfer::{Transfer, TransferKind};
use super::units::MicroUsd;

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
    /// An owner's balance is below minus what clawbacks took from it: a
    /// payout exceeded what was earned.
    NegativeOwnerBalance { account: AccountId, balance: i128 },
    /// A stored transfer cannot be read back, or its id is not the one its
    /// fields derive (it was altered after commit).
    BadTransfer { stored_id: String, reason: String },
    /// A reversal that does not undo a transfer the ledger holds: its
    /// original is missing, or has other accounts or another amount.
    BadReversal {
        transfer: TransferId,
        reason: String,
    },
    /// A request's refunds add up to more than its token charge.
    OverRefunded {
        charge: TransferId,
        charged: i128,
        refunded: i128,
    },
    /// A reversal of a segment that no clawback order names (stores only:
    /// orders live in the store).
    ReversalWithoutOrder { transfer: TransferId },
    /// A segment a clawback order names was paid (`kind`) and the payment
    /// was not reversed (stores only).
    MissingReversal {
        request_id: RequestId,
        segment: Segment,
        kind: TransferKind,
    },
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
            Problem::BadReversal { transfer, reason } => {
                write!(f, "reversal {transfer} {reason}")
            }
            Problem::OverRefunded {
                charge,
                charged,
                refunded,
            } => write!(
                f,
                "token charge {charge} of {charged} micro-usd was refunded {refunded}"
            ),
            Problem::ReversalWithoutOrder { transfer } => {
                write!(f, "reversal {transfer} has no clawback order")
            }
            Problem::MissingReversal {
                request_id,
                segment,
                kind,
            } => write!(
                f,
                "segment {segment} of request {request_id} is clawed back but its {kind} \
                 was not reversed"
            ),
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
    /// Owners whose balance clawbacks took below zero, and by how much: what
    /// they owe, repaid out of their later earnings. Not a problem.
    pub owed_by_owners: Vec<(OwnerId, MicroUsd)>,
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
    /// The part of `debits` that clawbacks took.
    clawed_back: i128,
    /// The first transfer naming the account, to point at if it is unknown.
    first: TransferId,
}

/// Streams transfers, then checks them against the accounts.
#[derive(Debug, Default)]
pub struct Verifier {
    sums: BTreeMap<AccountId, TransferSums>,
    transfers: u64,
    volume: i128,
    /// Every reversal streamed, checked against its original in `finish`.
    reversals: Vec<Transfer>,
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
            clawed_back: 0,
            first: transfer.id(),
        };
        let debited = self
            .sums
            .entry(transfer.debit().clone())
            .or_insert_with(new_sums);
        debited.debits += amount;
        if transfer.kind().is_clawback() {
            debited.clawed_back += amount;
        }
        self.sums
            .entry(transfer.credit().clone())
            .or_insert_with(new_sums)
            .credits += amount;
        if transfer.kind().reverses().is_some() {
            self.reversals.push(transfer.clone());
        }
    }

    pub fn add_problem(&mut self, problem: Problem) {
        self.problems.push(problem);
    }

    /// The reversals streamed so far. `finish` needs the transfers they
    /// reverse ([`Transfer::reversed_id`]); a store looks those up by id.
    pub fn reversals(&self) -> &[Transfer] {
        &self.reversals
    }

    /// Compares the streamed sums with every account's posted totals, and
    /// each reversal with its original, looked up in `originals` (which may
    /// hold other transfers too).
    pub fn finish<'a>(
        mut self,
        accounts: impl IntoIterator<Item = (&'a AccountId, &'a AccountState)>,
        originals: &HashMap<TransferId, Transfer>,
    ) -> VerifyReport {
        let reversal_problems = check_reversals(&self.reversals, originals);
        self.problems.extend(reversal_problems);
        let mut owed_by_owners = Vec::new();
        let mut total_debits = 0_i128;
        let mut total_credits = 0_i128;
        let mut account_count = 0_u64;
        for (account, state) in accounts {
            account_count += 1;
            let posted_debits = i128::from(state.debits_posted.0);
            let posted_credits = i128::from(state.credits_posted.0);
            total_debits += posted_debits;
            total_credits += posted_credits;
            let (transfer_debits, transfer_credits, clawed_back) =
                self.sums.remove(account).map_or((0, 0, 0), |sums| {
                    (sums.debits, sums.credits, sums.clawed_back)
                });
            if (posted_debits, posted_credits) != (transfer_debits, transfer_credits) {
                self.problems.push(Problem::AccountMismatch {
                    account: account.clone(),
                    posted_debits,
                    posted_credits,
                    transfer_debits,
                    transfer_credits,
                });
            }
            if let AccountId::Owner(owner) = account {
                let balance = posted_credits - posted_debits;
                match owed(balance, clawed_back) {
                    Ok(None) => {}
                    Ok(Some(owed)) => owed_by_owners.push((owner.clone(), owed)),
                    Err(()) => self.problems.push(Problem::NegativeOwnerBalance {
                        account: account.clone(),
                        balance,
                    }),
                }
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
            owed_by_owners,
            problems: self.problems,
        }
    }
}

/// What an owner with this balance owes, if anything; an error if the
/// balance is below what clawbacks explain. Payouts are held to the floor of
/// zero, so only clawbacks may take an owner below it, and by no more than
/// they took.
fn owed(balance: i128, clawed_back: i128) -> Result<Option<MicroUsd>, ()> {
    if balance >= 0 {
        return Ok(None);
    }
    if balance + clawed_back < 0 {
        return Err(());
    }
    // Posted totals are i64s, so a balance fits one.
    Ok(Some(MicroUsd(i64::try_from(-balance).unwrap_or(i64::MAX))))
}

/// Checks that each reversal undoes a transfer in `originals`: a clawback
/// moves exactly its original's amount back between the same two accounts;
/// a refund goes back to the tenant its request charged, and a request's
/// refunds add up to no more than the charge.
fn check_reversals(
    reversals: &[Transfer],
    originals: &HashMap<TransferId, Transfer>,
) -> Vec<Problem> {
    let mut problems = Vec::new();
    let mut refunded: BTreeMap<TransferId, i128> = BTreeMap::new();
    for reversal in reversals {
        let bad = |reason: String| Problem::BadReversal {
            transfer: reversal.id(),
            reason,
        };
        let Some(original_id) = reversal.reversed_id() else {
            continue;
        };
        let Some(original) = originals.get(&original_id) else {
            problems.push(bad(format!(
                "reverses transfer {original_id}, which the ledger does not hold"
            )));
            continue;
        };
        if reversal.credit() != original.debit() {
            problems.push(bad(format!(
                "credits {} but its original debited {}",
                reversal.credit(),
                original.debit()
            )));
        } else if reversal.kind() == TransferKind::Refund {
            *refunded.entry(original_id).or_default() += i128::from(reversal.amount().0);
        } else if reversal.debit() != original.credit() || reversal.amount() != original.amount() {
            problems.push(bad(format!(
                "does not mirror its original {original_id} ({} of {})",
                original.amount(),
                original.credit()
            )));
        }
    }
    for (charge_id, total) in refunded {
        let charged = originals
            .get(&charge_id)
            .map_or(0, |charge| i128::from(charge.amount().0));
        if total > charged {
            problems.push(Problem::OverRefunded {
                charge: charge_id,
                charged,
                refunded: total,
            });
        }
    }
    problems
}

/// Verifies an in-memory ledger.
pub fn verify_ledger(ledger: &Ledger) -> VerifyReport {
    let mut verifier = Verifier::default();
    for transfer in ledger.transfers() {
        verifier.add_transfer(transfer);
    }
    let originals: HashMap<TransferId, Transfer> = verifier
        .reversals()
        .iter()
        .filter_map(Transfer::reversed_id)
        .filter_map(|id| ledger.transfer(id))
        .map(|original| (original.id(), original.clone()))
        .collect();
    verifier.finish(ledger.accounts(), &originals)
}
