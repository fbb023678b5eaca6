//! Checks vehicles carried out on other vehicles' answers (`node_checks`),
//! kept until the books have paid the verifiers' owners for them.
//!
//! A cell records each check a vehicle answered; the books (`fleetgrid`
//! billing) pay the pending ones from the platform's verification account
//! and mark them paid. A gateway claims the checks it pays for a lease, so
//! gateways paying at once share the work instead of each paying the same
//! ones; a gateway that dies leaves its claims to lapse. The ledger pays a
//! check once whatever happens, so one paid twice after a crash between the
//! ledger's commit and the mark, or after a lease lapsed, costs nothing
//! twice.

use crate::{on_database, Store, StoreError};

/// One check a vehicle answered, as its cell counted it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CheckRecord {
    /// The check's name, unique in the deployment: `check:{answer}:{round}`.
    pub check: String,
    /// The verifier.
    pub node: String,
    pub model: String,
    /// Tokens it prefilled: the prompt and the answer.
    pub tokens: i64,
    /// Its compute time, no more than the cell saw the check take.
    pub compute_ms: i64,
    /// When the check was sent to it, and when its verdict came.
    pub started_ms: i64,
    pub at_ms: i64,
}

type CheckRow = (String, String, String, i64, i64, i64, i64);

impl Store {
    /// Records checks; one recorded before is left as it was.
    pub async fn record_checks(&self, checks: &[CheckRecord]) -> Result<(), StoreError> {
        let sql = "INSERT INTO node_checks (check_id, node_name, model, tokens, compute_ms, \
                   started_ms, at_ms) VALUES ($1, $2, $3, $4, $5, $6, $7) \
                   ON CONFLICT (check_id) DO NOTHING";
        on_database!(&self.database, pool => {
            let mut transaction = pool.begin().await?;
            for check in checks {
                sqlx::query(sql)
                    .bind(&check.check)
                    .bind(&check.node)
                    .bind(&check.model)
                    .bind(check.tokens)
                    .bind(check.compute_ms)
                    .bind(check.started_ms)
                    .bind(check.at_ms)
                    .execute(&mut *transaction)
                    .await?;
            }
            transaction.commit().await?;
        });
        Ok(())
    }

    /// Claims, until `now_ms + lease_ms`, up to `limit` checks the books have
    /// not paid yet and nobody else holds a claim on at `now_ms`, oldest
    /// first, and returns them (in no set order). The claim's condition is
    /// checked again on each row as it is updated, so two gateways claiming
    /// at once never both get a check.
    pub async fn claim_unpaid_checks(
        &self,
        limit: u32,
        now_ms: i64,
        lease_ms: i64,
    ) -> Result<Vec<CheckRecord>, StoreError> {
        let sql = "UPDATE node_checks SET claimed_until_ms = $2 + $3 \
                   WHERE paid_ms IS NULL AND (claimed_until_ms IS NULL OR claimed_until_ms <= $2) \
                   AND check_id IN (SELECT check_id FROM node_checks WHERE paid_ms IS NULL \
                   AND (claimed_until_ms IS NULL OR claimed_until_ms <= $2) \
                   ORDER BY at_ms, check_id LIMIT $1) \
                   RETURNING check_id, node_name, model, tokens, compute_ms, started_ms, at_ms";
        let rows: Vec<CheckRow> = on_database!(&self.database, pool => sqlx::query_as(sql)
            .bind(i64::from(limit))
            .bind(now_ms)
            .bind(lease_ms)
            .fetch_all(pool)
            .await?);
        Ok(rows
            .into_iter()
            .map(
                |(check, node, model, tokens, compute_ms, started_ms, at_ms)| CheckRecord {
                    check,
                    node,
                    model,
                    tokens,
                    compute_ms,
                    started_ms,
                    at_ms,
                },
            )
            .collect())
    }

    /// Marks a check paid by the books.
    pub async fn check_paid(&self, check: &str, now_ms: i64) -> Result<(), StoreError> {
        let sql = "UPDATE node_checks SET paid_ms = $2 WHERE check_id = $1 AND paid_ms IS NULL";
        on_database!(&self.database, pool => {
            sqlx::query(sql).bind(check).bind(now_ms).execute(pool).await?;
        });
        Ok(())
    }
}
