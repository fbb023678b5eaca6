//! One-off re-keying of accounts: moving every trace of an account (its row,
//! the transfers that name it, and the rows that carry its raw id) to a new
//! id, for example from a name a user chose to an immutable id.
//!
//! A re-keying has a name and is applied at most once: a row in
//! `ledger_rekeys` is written in the same transaction as the moves, so a
//! second run (or a concurrent one on a shared PostgreSQL ledger) changes
//! nothing. Transfer ids derive from (request, segment, kind), never from
//! accounts, so every moved transfer keeps a valid id and `verify` passes.
//!
//! Moves go through temporary ids first, so that a re-keying may swap ids
//! (old id of one account = new id of another). A move onto an account that
//! already exists outside the re-keying merges the two: posted totals add
//! up, and the existing account's floor is kept.

use std::collections::BTreeSet;

use crate::core::{AccountId, TimestampMs};

use super::{Backend, Store, StoreError};

/// One account to move.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rekey {
    pub from: AccountId,
    pub to: AccountId,
}

/// What a re-keying did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RekeyOutcome {
    /// Applied now; `accounts` account rows were moved (accounts named in
    /// the re-keying but absent from the ledger are skipped).
    Applied { accounts: u64 },
    /// Applied before; nothing changed.
    AlreadyApplied,
}

/// Which raw-id columns an account's id also lives in.
#[derive(Clone, Copy)]
enum Kind {
    Tenant,
    Owner,
}

/// One move of a re-keying, as SQL text: the account ids and the raw ids.
struct Move {
    from_account: String,
    from_raw: String,
    to_account: String,
    to_raw: String,
    kind: Kind,
}

fn raw_id(account: &AccountId) -> Option<(String, Kind)> {
    match account {
        AccountId::Tenant(tenant) => Some((tenant.as_str().to_owned(), Kind::Tenant)),
        AccountId::Owner(owner) => Some((owner.as_str().to_owned(), Kind::Owner)),
        _ => None,
    }
}

/// Checks a re-keying and turns it into two phases of moves: every `from`
/// to a temporary id, then every temporary id to its `to`. Temporary ids
/// contain `#`, which no account id or name may hold.
fn plan(rekeys: &[Rekey]) -> Result<Vec<Move>, StoreError> {
    let invalid = |reason: String| StoreError::Rekey(reason);
    let mut froms = BTreeSet::new();
    let mut tos = BTreeSet::new();
    let mut first = Vec::new();
    let mut second = Vec::new();
    for (index, rekey) in rekeys.iter().enumerate() {
        let (Some((from_raw, kind)), Some((to_raw, to_kind))) =
            (raw_id(&rekey.from), raw_id(&rekey.to))
        else {
            return Err(invalid(format!(
                "only tenant and owner accounts can be re-keyed, not {} -> {}",
                rekey.from, rekey.to
            )));
        };
        if !matches!(
            (kind, to_kind),
            (Kind::Tenant, Kind::Tenant) | (Kind::Owner, Kind::Owner)
        ) {
            return Err(invalid(format!(
                "{} and {} are accounts of different kinds",
                rekey.from, rekey.to
            )));
        }
        if !froms.insert(rekey.from.clone()) || !tos.insert(rekey.to.clone()) {
            return Err(invalid(format!(
                "{} -> {} repeats an account",
                rekey.from, rekey.to
            )));
        }
        if rekey.from == rekey.to {
            continue;
        }
        let temporary = format!("rekey#{index}");
        first.push(Move {
            from_account: rekey.from.to_string(),
            from_raw,
            to_account: temporary.clone(),
            to_raw: temporary.clone(),
            kind,
        });
        second.push(Move {
            from_account: temporary.clone(),
            from_raw: temporary,
            to_account: rekey.to.to_string(),
            to_raw,
            kind,
        });
    }
    first.extend(second);
    Ok(first)
}

impl Store {
    /// Applies the re-keying `name` once (see the module's comment).
    pub async fn rekey_accounts(
        &self,
        name: &str,
        rekeys: &[Rekey],
        at: TimestampMs,
    ) -> Result<RekeyOutcome, StoreError> {
        let moves = plan(rekeys)?;
        let listed = i64::try_from(rekeys.len()).unwrap_or(i64::MAX);
        let mut moved_accounts = 0_u64;
        on_pool!(self, pool => {
            // The marker is written first: on SQLite the transaction takes
            // the write lock at once, and on PostgreSQL a concurrent run
            // waits on the marker's key and then finds it applied.
            let mut tx = pool.begin().await?;
            let marked = sqlx::query(
                "INSERT INTO ledger_rekeys (name, accounts, at_ms) VALUES ($1, $2, $3) \
                 ON CONFLICT (name) DO NOTHING",
            )
            .bind(name)
            .bind(listed)
            .bind(at.0)
            .execute(&mut *tx)
            .await?
            .rows_affected();
            if marked == 0 {
                return Ok(RekeyOutcome::AlreadyApplied);
            }
            for step in &moves {
                for sql in [
                    "UPDATE ledger_transfers SET debit_account = $2 WHERE debit_account = $1",
                    "UPDATE ledger_transfers SET credit_account = $2 WHERE credit_account = $1",
                ] {
                    sqlx::query(sql)
                        .bind(&step.from_account)
                        .bind(&step.to_account)
                        .execute(&mut *tx)
                        .await?;
                }
                let merged = sqlx::query(
                    "UPDATE ledger_accounts SET \
                     debits_posted = debits_posted + COALESCE((SELECT a.debits_posted \
                         FROM ledger_accounts a WHERE a.id = $1), 0), \
                     credits_posted = credits_posted + COALESCE((SELECT a.credits_posted \
                         FROM ledger_accounts a WHERE a.id = $1), 0) \
                     WHERE id = $2",
                )
                .bind(&step.from_account)
                .bind(&step.to_account)
                .execute(&mut *tx)
                .await?
                .rows_affected();
                let moved = if merged == 1 {
                    sqlx::query("DELETE FROM ledger_accounts WHERE id = $1")
                        .bind(&step.from_account)
                        .execute(&mut *tx)
                        .await?
                } else {
                    sqlx::query("UPDATE ledger_accounts SET id = $2 WHERE id = $1")
                        .bind(&step.from_account)
                        .bind(&step.to_account)
                        .execute(&mut *tx)
                        .await?
                }
                .rows_affected();
                if step.to_account.contains('#') {
                    moved_accounts += moved;
                }
                let raw_moves: &[&str] = match step.kind {
                    Kind::Tenant => &[
                        "UPDATE ledger_requests SET tenant_id = $2 WHERE tenant_id = $1",
                        "DELETE FROM ledger_tenant_limits WHERE tenant_id = $1 AND EXISTS \
                         (SELECT 1 FROM ledger_tenant_limits l WHERE l.tenant_id = $2)",
                        "UPDATE ledger_tenant_limits SET tenant_id = $2 WHERE tenant_id = $1",
                    ],
                    Kind::Owner => {
                        &["UPDATE ledger_usage SET owner_id = $2 WHERE owner_id = $1"]
                    }
                };
                for sql in raw_moves {
                    sqlx::query(sql)
                        .bind(&step.from_raw)
                        .bind(&step.to_raw)
                        .execute(&mut *tx)
                        .await?;
                }
            }
            tx.commit().await?;
        });
        Ok(RekeyOutcome::Applied {
            accounts: moved_accounts,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::core::{OwnerId, TenantId};

    fn tenant(name: &str) -> AccountId {
        AccountId::Tenant(TenantId::new(name).unwrap())
    }

    #[test]
    fn a_plan_refuses_mixed_kinds_system_accounts_and_repeats() {
        let owner = AccountId::Owner(OwnerId::new("alice").unwrap());
        let mixed = [Rekey {
            from: tenant("a"),
            to: owner,
        }];
        assert!(plan(&mixed).is_err());
        let system = [Rekey {
            from: AccountId::PlatformRevenue,
            to: tenant("a"),
        }];
        assert!(plan(&system).is_err());
        let repeated = [
            Rekey {
                from: tenant("a"),
                to: tenant("1"),
            },
            Rekey {
                from: tenant("b"),
                to: tenant("1"),
            },
        ];
        assert!(plan(&repeated).is_err());
    }

    #[test]
    fn a_swap_goes_through_temporary_ids() {
        let swap = [
            Rekey {
                from: tenant("1"),
                to: tenant("2"),
            },
            Rekey {
                from: tenant("2"),
                to: tenant("1"),
            },
        ];
        let moves = plan(&swap).unwrap();
        let steps: Vec<(&str, &str)> = moves
            .iter()
            .map(|step| (step.from_account.as_str(), step.to_account.as_str()))
            .collect();
        assert_eq!(
            steps,
            [
                ("tenant:1", "rekey#0"),
                ("tenant:2", "rekey#1"),
                ("rekey#0", "tenant:2"),
                ("rekey#1", "tenant:1"),
            ]
        );
    }
}
