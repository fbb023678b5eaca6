//! Chat completions kept for later retrieval (`store: true`), per tenant:
//! the request as it ran, the answer the client got, the client's metadata,
//! and what to do should the answer be clawed back from a cheating vehicle.
//!
//! A tenant that asked for a re-run (`on_clawback = rerun`) gets one: a
//! gateway claims the kept completions whose current answer the books have
//! clawed back ([`Store::claim_reruns`], a lease as for checks), runs each
//! request again, and replaces the answer ([`Store::rerun_done`]), which
//! then names the new run in `answered_by`. Every claim counts as an attempt;
//! after [`RERUN_ATTEMPTS_MAX`] the completion stays refunded, not re-run.
//! Rows older than the retention are deleted ([`Store::forget_stored_before`]).

use crate::{on_database, Store, StoreError};

/// Re-runs tried for one kept completion, in all, before it is left
/// refunded.
pub const RERUN_ATTEMPTS_MAX: i64 = 5;

/// What to do with a kept answer that is clawed back.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum OnClawback {
    /// Refund the tenant (what every clawed-back answer gets).
    Refund,
    /// Refund it and run the request again; the new answer replaces it.
    Rerun,
}

impl OnClawback {
    pub fn as_str(self) -> &'static str {
        match self {
            OnClawback::Refund => "refund",
            OnClawback::Rerun => "rerun",
        }
    }

    pub fn parse(name: &str) -> Option<OnClawback> {
        match name {
            "refund" => Some(OnClawback::Refund),
            "rerun" => Some(OnClawback::Rerun),
            _ => None,
        }
    }
}

impl TryFrom<String> for OnClawback {
    type Error = StoreError;

    fn try_from(name: String) -> Result<OnClawback, StoreError> {
        OnClawback::parse(&name).ok_or_else(|| StoreError::Corrupt(format!("on_clawback {name:?}")))
    }
}

/// A completion to keep, as the gateway finished it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NewStoredCompletion {
    pub id: String,
    pub tenant_id: i64,
    pub model: String,
    pub created_ms: i64,
    /// A JSON object of strings.
    pub metadata: String,
    /// The request body as it ran, JSON.
    pub request: String,
    /// The `chat.completion` the client got, JSON.
    pub response: String,
    pub on_clawback: OnClawback,
}

/// A kept completion as read back.
#[derive(Clone, Debug, PartialEq, Eq, sqlx::FromRow)]
pub struct StoredCompletion {
    pub id: String,
    pub tenant_id: i64,
    pub model: String,
    pub created_ms: i64,
    pub metadata: String,
    pub request: String,
    pub response: String,
    #[sqlx(try_from = "String")]
    pub on_clawback: OnClawback,
    /// The request id whose answer `response` is.
    pub answered_by: String,
    /// How many times the answer was replaced by a re-run.
    pub reruns: i64,
    pub rerun_attempts: i64,
    /// Why the last re-run was made (the clawback's reason).
    pub rerun_reason: Option<String>,
    /// The reason the current answer was clawed back, if it was.
    pub clawed_back: Option<String>,
}

/// A kept completion a gateway claimed to run again.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RerunClaim {
    pub id: String,
    pub tenant_id: i64,
    pub request: String,
    /// The answer clawed back: the re-run replaces it only if it is still
    /// the current one.
    pub answered_by: String,
    pub reason: String,
}

/// Which kept completions a list returns.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct StoredQuery {
    /// Only those after this id, in the list's order.
    pub after: Option<String>,
    pub limit: u32,
    /// Newest first.
    pub descending: bool,
    pub model: Option<String>,
}

const COLUMNS: &str = "s.id, s.tenant_id, s.model, s.created_ms, s.metadata, s.request, \
                       s.response, s.on_clawback, s.answered_by, s.reruns, s.rerun_attempts, \
                       s.rerun_reason, \
                       (SELECT MIN(c.reason) FROM node_clawbacks c \
                        WHERE c.request_id = s.answered_by) AS clawed_back";

impl Store {
    /// Keeps a finished completion. Its id is new: keeping one twice is an
    /// error.
    pub async fn keep_completion(&self, kept: &NewStoredCompletion) -> Result<(), StoreError> {
        let sql = "INSERT INTO stored_completions (id, tenant_id, model, created_ms, metadata, \
                   request, response, on_clawback, answered_by) \
                   VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $1)";
        on_database!(&self.database, pool => {
            sqlx::query(sql)
                .bind(&kept.id)
                .bind(kept.tenant_id)
                .bind(&kept.model)
                .bind(kept.created_ms)
                .bind(&kept.metadata)
                .bind(&kept.request)
                .bind(&kept.response)
                .bind(kept.on_clawback.as_str())
                .execute(pool)
                .await?;
        });
        Ok(())
    }

    /// The tenant's kept completion `id`; `None` for one it does not own.
    pub async fn stored_completion(
        &self,
        tenant_id: i64,
        id: &str,
    ) -> Result<Option<StoredCompletion>, StoreError> {
        let sql = format!(
            "SELECT {COLUMNS} FROM stored_completions s WHERE s.tenant_id = $1 AND s.id = $2"
        );
        Ok(on_database!(&self.database, pool => sqlx::query_as(&sql)
            .bind(tenant_id)
            .bind(id)
            .fetch_optional(pool)
            .await?))
    }

    /// The tenant's kept completions in order of creation (then id), from
    /// after `query.after` (which must be the tenant's), at most
    /// `query.limit`.
    pub async fn list_stored_completions(
        &self,
        tenant_id: i64,
        query: &StoredQuery,
    ) -> Result<Vec<StoredCompletion>, StoreError> {
        let (order, beyond) = match query.descending {
            true => ("DESC", "<"),
            false => ("ASC", ">"),
        };
        let sql = format!(
            "SELECT {COLUMNS} FROM stored_completions s WHERE s.tenant_id = $1 \
             AND ($4 IS NULL OR s.model = $4) \
             AND ($3 = '' OR (s.created_ms, s.id) {beyond} (SELECT a.created_ms, a.id \
             FROM stored_completions a WHERE a.tenant_id = $1 AND a.id = $3)) \
             ORDER BY s.created_ms {order}, s.id {order} LIMIT $2"
        );
        Ok(on_database!(&self.database, pool => sqlx::query_as(&sql)
            .bind(tenant_id)
            .bind(i64::from(query.limit))
            .bind(query.after.as_deref().unwrap_or(""))
            .bind(query.model.as_deref())
            .fetch_all(pool)
            .await?))
    }

    /// Replaces the metadata of the tenant's kept completion `id`; whether
    /// it was there.
    pub async fn update_stored_metadata(
        &self,
        tenant_id: i64,
        id: &str,
        metadata: &str,
    ) -> Result<bool, StoreError> {
        let sql = "UPDATE stored_completions SET metadata = $3 WHERE tenant_id = $1 AND id = $2";
        let done = on_database!(&self.database, pool => sqlx::query(sql)
            .bind(tenant_id)
            .bind(id)
            .bind(metadata)
            .execute(pool)
            .await?
            .rows_affected());
        Ok(done == 1)
    }

    /// Deletes the tenant's kept completion `id`; whether it was there.
    pub async fn delete_stored_completion(
        &self,
        tenant_id: i64,
        id: &str,
    ) -> Result<bool, StoreError> {
        let sql = "DELETE FROM stored_completions WHERE tenant_id = $1 AND id = $2";
        let done = on_database!(&self.database, pool => sqlx::query(sql)
            .bind(tenant_id)
            .bind(id)
            .execute(pool)
            .await?
            .rows_affected());
        Ok(done == 1)
    }

    /// Deletes every kept completion created before `before_ms`; how many.
    pub async fn forget_stored_before(&self, before_ms: i64) -> Result<u64, StoreError> {
        let sql = "DELETE FROM stored_completions WHERE created_ms < $1";
        let done = on_database!(&self.database, pool => sqlx::query(sql)
            .bind(before_ms)
            .execute(pool)
            .await?
            .rows_affected());
        Ok(done)
    }

    /// Claims, until `now_ms + lease_ms`, up to `limit` kept completions
    /// that asked for a re-run, whose current answer the books have clawed
    /// back, that have attempts left and that nobody else holds a claim on;
    /// each claim counts as an attempt. As with checks, the condition is
    /// checked again on each row as it is updated, so two gateways never
    /// both claim one.
    pub async fn claim_reruns(
        &self,
        limit: u32,
        now_ms: i64,
        lease_ms: i64,
    ) -> Result<Vec<RerunClaim>, StoreError> {
        // Driven from the applied clawbacks (few: only cheaters' answers),
        // each joined to the kept completion it answered, if any; checked
        // again on the row as it is updated, since another gateway may have
        // replaced its answer since.
        let due = |table: &str| {
            format!(
                "{table}.on_clawback = 'rerun' AND {table}.rerun_attempts < $4 \
                 AND ({table}.claimed_until_ms IS NULL OR {table}.claimed_until_ms <= $2)"
            )
        };
        let sql = format!(
            "UPDATE stored_completions SET claimed_until_ms = $2 + $3, \
             rerun_attempts = rerun_attempts + 1 \
             WHERE {} AND EXISTS (SELECT 1 FROM node_clawbacks applied \
             WHERE applied.request_id = stored_completions.answered_by \
             AND applied.applied_ms IS NOT NULL) \
             AND id IN (SELECT s.id FROM node_clawbacks c \
             JOIN stored_completions s ON s.answered_by = c.request_id \
             WHERE c.applied_ms IS NOT NULL AND {} \
             ORDER BY s.created_ms, s.id LIMIT $1) \
             RETURNING id, tenant_id, request, answered_by",
            due("stored_completions"),
            due("s"),
        );
        let rows: Vec<(String, i64, String, String)> = on_database!(&self.database, pool => sqlx::query_as(&sql)
                .bind(i64::from(limit))
                .bind(now_ms)
                .bind(lease_ms)
                .bind(RERUN_ATTEMPTS_MAX)
                .fetch_all(pool)
                .await?);
        let reason_sql = "SELECT MIN(reason) FROM node_clawbacks WHERE request_id = $1";
        let mut claims = Vec::with_capacity(rows.len());
        for (id, tenant_id, request, answered_by) in rows {
            let reason: Option<String> = on_database!(&self.database, pool => sqlx::query_scalar(reason_sql)
                    .bind(&answered_by)
                    .fetch_one(pool)
                    .await?);
            claims.push(RerunClaim {
                id,
                tenant_id,
                request,
                answered_by,
                reason: reason.unwrap_or_default(),
            });
        }
        Ok(claims)
    }

    /// Replaces the answer of a re-run completion with the answer of the
    /// request `rerun_id`, if `claim.answered_by` is still its answer (a
    /// gateway whose claim lapsed finds another finished first); whether it
    /// did.
    pub async fn rerun_done(
        &self,
        claim: &RerunClaim,
        rerun_id: &str,
        response: &str,
    ) -> Result<bool, StoreError> {
        let sql = "UPDATE stored_completions SET response = $3, answered_by = $4, \
                   reruns = reruns + 1, rerun_reason = $5, claimed_until_ms = NULL \
                   WHERE id = $1 AND answered_by = $2";
        let done = on_database!(&self.database, pool => sqlx::query(sql)
            .bind(&claim.id)
            .bind(&claim.answered_by)
            .bind(response)
            .bind(rerun_id)
            .bind(&claim.reason)
            .execute(pool)
            .await?
            .rows_affected());
        Ok(done == 1)
    }
}
