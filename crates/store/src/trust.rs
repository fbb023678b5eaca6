//! Vehicles' trust in the store: what their cell recorded of their
//! verification (`node_trust`), and the generations a quarantine takes the
//! earnings of back (`node_clawbacks`) until the books have done it.
//!
//! A cell is the only writer of its vehicles' trust and writes it after the
//! fact; the owner API and the operator read it here, and a cell refuses a
//! vehicle quarantined here whichever cell quarantined it. The books
//! (`fleetgrid` billing) apply pending clawbacks and mark them applied; the
//! ledger's clawback is idempotent, so one applied twice after a crash
//! takes nothing twice.

use crate::{on_database, Store, StoreError};

/// A vehicle's trust, as its owner sees it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TrustRecord {
    pub node: String,
    /// `probation`, `trusted` or `quarantined`.
    pub state: String,
    pub verified: i64,
    pub passed: i64,
    /// Why it is quarantined, when it is.
    pub reason: Option<String>,
    pub quarantined_ms: Option<i64>,
    pub updated_ms: i64,
}

/// One generation's earnings to take back from a quarantined vehicle.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PendingClawback {
    pub node: String,
    pub request_id: String,
    pub reason: String,
    pub at_ms: i64,
}

type TrustRow = (String, String, i64, i64, Option<String>, Option<i64>, i64);

/// A quarantined vehicle whose checks' pay waits to be taken back.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PendingCheckClawback {
    pub node: String,
    pub reason: String,
    pub quarantined_ms: i64,
}

impl Store {
    /// Records a vehicle's trust (not a quarantine: see `quarantine_node`).
    /// A quarantine recorded here is kept: only `release_node` lifts it.
    pub async fn record_trust(&self, record: &TrustRecord) -> Result<(), StoreError> {
        let sql = "INSERT INTO node_trust (node_name, state, verified, passed, reason, \
                   quarantined_ms, updated_ms) VALUES ($1, $2, $3, $4, NULL, NULL, $5) \
                   ON CONFLICT (node_name) DO UPDATE SET \
                   state = CASE WHEN node_trust.state = 'quarantined' THEN node_trust.state \
                   ELSE excluded.state END, \
                   verified = excluded.verified, passed = excluded.passed, \
                   updated_ms = excluded.updated_ms";
        on_database!(&self.database, pool => {
            sqlx::query(sql)
                .bind(&record.node)
                .bind(&record.state)
                .bind(record.verified)
                .bind(record.passed)
                .bind(record.updated_ms)
                .execute(pool)
                .await?;
        });
        Ok(())
    }

    /// Quarantines `node` for `reason` and records the generations whose
    /// earnings are taken back, in one transaction. Recording the same
    /// quarantine again changes nothing.
    pub async fn quarantine_node(
        &self,
        node: &str,
        reason: &str,
        suspects: &[String],
        at_ms: i64,
    ) -> Result<(), StoreError> {
        let trust = "INSERT INTO node_trust (node_name, state, verified, passed, reason, \
                     quarantined_ms, updated_ms) VALUES ($1, 'quarantined', 0, 0, $2, $3, $3) \
                     ON CONFLICT (node_name) DO UPDATE SET state = 'quarantined', \
                     reason = excluded.reason, quarantined_ms = excluded.quarantined_ms, \
                     updated_ms = excluded.updated_ms";
        let clawback = "INSERT INTO node_clawbacks (node_name, request_id, reason, at_ms) \
                        VALUES ($1, $2, $3, $4) ON CONFLICT (node_name, request_id) DO NOTHING";
        on_database!(&self.database, pool => {
            let mut transaction = pool.begin().await?;
            sqlx::query(trust)
                .bind(node)
                .bind(reason)
                .bind(at_ms)
                .execute(&mut *transaction)
                .await?;
            for request_id in suspects {
                sqlx::query(clawback)
                    .bind(node)
                    .bind(request_id)
                    .bind(reason)
                    .bind(at_ms)
                    .execute(&mut *transaction)
                    .await?;
            }
            transaction.commit().await?;
        });
        Ok(())
    }

    /// Whether `node` is quarantined.
    pub async fn is_quarantined(&self, node: &str) -> Result<bool, StoreError> {
        Ok(self
            .node_trust(node)
            .await?
            .is_some_and(|record| record.state == "quarantined"))
    }

    /// The operator lifts `node`'s quarantine: it starts probation again when
    /// it next connects. What was taken back stays taken. Returns whether it
    /// was quarantined.
    pub async fn release_node(&self, node: &str, now_ms: i64) -> Result<bool, StoreError> {
        let sql = "UPDATE node_trust SET state = 'probation', reason = NULL, \
                   quarantined_ms = NULL, checks_clawed_back_ms = NULL, updated_ms = $2 \
                   WHERE node_name = $1 AND state = 'quarantined'";
        let released = on_database!(&self.database, pool => sqlx::query(sql)
            .bind(node)
            .bind(now_ms)
            .execute(pool)
            .await?
            .rows_affected());
        Ok(released > 0)
    }

    /// `node`'s trust as last recorded, if any was.
    pub async fn node_trust(&self, node: &str) -> Result<Option<TrustRecord>, StoreError> {
        let sql = "SELECT node_name, state, verified, passed, reason, quarantined_ms, updated_ms \
                   FROM node_trust WHERE node_name = $1";
        let row: Option<TrustRow> = on_database!(&self.database, pool => sqlx::query_as(sql)
            .bind(node)
            .fetch_optional(pool)
            .await?);
        Ok(row.map(trust_record))
    }

    /// Up to `limit` clawbacks the books have not applied yet, oldest first.
    pub async fn pending_clawbacks(&self, limit: u32) -> Result<Vec<PendingClawback>, StoreError> {
        let sql = "SELECT node_name, request_id, reason, at_ms FROM node_clawbacks \
                   WHERE applied_ms IS NULL ORDER BY at_ms, node_name, request_id LIMIT $1";
        let rows: Vec<(String, String, String, i64)> = on_database!(&self.database, pool => sqlx::query_as(sql)
            .bind(i64::from(limit))
            .fetch_all(pool)
            .await?);
        Ok(rows
            .into_iter()
            .map(|(node, request_id, reason, at_ms)| PendingClawback {
                node,
                request_id,
                reason,
                at_ms,
            })
            .collect())
    }

    /// Up to `limit` quarantined vehicles whose checks' pay the books have
    /// not taken back yet, with their reason and quarantine time.
    pub async fn pending_check_clawbacks(
        &self,
        limit: u32,
    ) -> Result<Vec<PendingCheckClawback>, StoreError> {
        let sql = "SELECT node_name, reason, quarantined_ms FROM node_trust \
                   WHERE state = 'quarantined' AND checks_clawed_back_ms IS NULL \
                   AND quarantined_ms IS NOT NULL ORDER BY quarantined_ms, node_name LIMIT $1";
        let rows: Vec<(String, Option<String>, i64)> = on_database!(&self.database, pool => sqlx::query_as(sql)
            .bind(i64::from(limit))
            .fetch_all(pool)
            .await?);
        Ok(rows
            .into_iter()
            .map(|(node, reason, quarantined_ms)| PendingCheckClawback {
                node,
                reason: reason.unwrap_or_default(),
                quarantined_ms,
            })
            .collect())
    }

    /// Marks the checks of `node`, quarantined at `quarantined_ms`, taken
    /// back by the books.
    pub async fn check_clawback_applied(
        &self,
        node: &str,
        quarantined_ms: i64,
        now_ms: i64,
    ) -> Result<(), StoreError> {
        let sql = "UPDATE node_trust SET checks_clawed_back_ms = $3 \
                   WHERE node_name = $1 AND quarantined_ms = $2 AND checks_clawed_back_ms IS NULL";
        on_database!(&self.database, pool => {
            sqlx::query(sql)
                .bind(node)
                .bind(quarantined_ms)
                .bind(now_ms)
                .execute(pool)
                .await?;
        });
        Ok(())
    }

    /// Marks the clawback of `request_id` from `node` applied by the books.
    pub async fn clawback_applied(
        &self,
        node: &str,
        request_id: &str,
        now_ms: i64,
    ) -> Result<(), StoreError> {
        let sql = "UPDATE node_clawbacks SET applied_ms = $3 \
                   WHERE node_name = $1 AND request_id = $2 AND applied_ms IS NULL";
        on_database!(&self.database, pool => {
            sqlx::query(sql)
                .bind(node)
                .bind(request_id)
                .bind(now_ms)
                .execute(pool)
                .await?;
        });
        Ok(())
    }
}

fn trust_record(row: TrustRow) -> TrustRecord {
    let (node, state, verified, passed, reason, quarantined_ms, updated_ms) = row;
    TrustRecord {
        node,
        state,
        verified,
        passed,
        reason,
        quarantined_ms,
        updated_ms,
    }
}
