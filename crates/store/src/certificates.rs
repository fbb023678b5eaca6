//! The agents' mTLS in the store: the deployment's node authority (its
//! certificate and key, made once by whichever process needed it first),
//! every certificate issued to a node, and their revocations.
//!
//! The enrolment token `nodes add` prints is the node's credential: an agent
//! trades it once for its first certificate (`consume_enrolment`), after which
//! it no longer works, over TLS or not. `nodes rotate` issues a new one.
//!
//! The authority's key is kept here with every other secret of the
//! deployment (API key and credential hashes, tenants' balances): whoever can
//! write the store can already enrol a node.

use crate::{on_database, secrets, Store, StoreError};

/// A certificate as the store knows it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CertificateRecord {
    pub serial: String,
    pub node: String,
    pub issued_ms: i64,
    pub not_after_ms: i64,
    pub revoked_ms: Option<i64>,
    pub revoked_reason: Option<String>,
}

/// The reason a certificate its node renewed is revoked for.
pub const ROTATED: &str = "rotated";

/// What a spent enrolment token's hash becomes: no credential hashes to it.
const SPENT_PREFIX: &str = "spent:";

type CertificateRow = (String, String, i64, i64, Option<i64>, Option<String>);

fn certificate_from_row(row: CertificateRow) -> CertificateRecord {
    let (serial, node, issued_ms, not_after_ms, revoked_ms, revoked_reason) = row;
    CertificateRecord {
        serial,
        node,
        issued_ms,
        not_after_ms,
        revoked_ms,
        revoked_reason,
    }
}

impl Store {
    /// The node authority's certificate and key, if one was made.
    pub async fn node_authority(&self) -> Result<Option<(String, String)>, StoreError> {
        let sql = "SELECT cert_pem, key_pem FROM node_authority WHERE id = 1";
        let row: Option<(String, String)> = on_database!(&self.database, pool =>
            sqlx::query_as(sql).fetch_optional(pool).await?);
        Ok(row)
    }

    /// Keeps `cert_pem` and `key_pem` as the node authority unless one was
    /// kept first, and returns the one that is: of two processes making it
    /// at once, both end up with the same.
    pub async fn keep_node_authority(
        &self,
        cert_pem: &str,
        key_pem: &str,
        now_ms: i64,
    ) -> Result<(String, String), StoreError> {
        let sql = "INSERT INTO node_authority (id, cert_pem, key_pem, created_ms) \
                   VALUES (1, $1, $2, $3) ON CONFLICT (id) DO NOTHING";
        on_database!(&self.database, pool => {
            sqlx::query(sql)
                .bind(cert_pem)
                .bind(key_pem)
                .bind(now_ms)
                .execute(pool)
                .await?;
        });
        self.node_authority()
            .await?
            .ok_or(StoreError::Database(sqlx::Error::RowNotFound))
    }

    /// Spends `node`'s enrolment token if `token` is it: true exactly once
    /// per token, however many processes try it at once.
    pub async fn consume_enrolment(&self, node: &str, token: &str) -> Result<bool, StoreError> {
        let offered = secrets::hash(token);
        let Some(stored) = self.node_credential_hash(node).await? else {
            return Ok(false);
        };
        if !secrets::hashes_equal(&stored, &offered) {
            return Ok(false);
        }
        let sql = "UPDATE nodes SET credential_hash = $1 WHERE name = $2 AND credential_hash = $3";
        let spent = on_database!(&self.database, pool => sqlx::query(sql)
            .bind(format!("{SPENT_PREFIX}{stored}"))
            .bind(node)
            .bind(&stored)
            .execute(pool)
            .await?
            .rows_affected());
        Ok(spent == 1)
    }

    /// Records a certificate issued to `node`.
    pub async fn record_certificate(
        &self,
        serial: &str,
        node: &str,
        issued_ms: i64,
        not_after_ms: i64,
    ) -> Result<(), StoreError> {
        let sql = "INSERT INTO node_certificates (serial, node_name, issued_ms, not_after_ms) \
                   VALUES ($1, $2, $3, $4)";
        on_database!(&self.database, pool => {
            sqlx::query(sql)
                .bind(serial)
                .bind(node)
                .bind(issued_ms)
                .bind(not_after_ms)
                .execute(pool)
                .await?;
        });
        Ok(())
    }

    /// One certificate by its serial, if it was issued here.
    pub async fn certificate(&self, serial: &str) -> Result<Option<CertificateRecord>, StoreError> {
        let sql = "SELECT serial, node_name, issued_ms, not_after_ms, revoked_ms, revoked_reason \
                   FROM node_certificates WHERE serial = $1";
        let row: Option<CertificateRow> = on_database!(&self.database, pool =>
            sqlx::query_as(sql).bind(serial).fetch_optional(pool).await?);
        Ok(row.map(certificate_from_row))
    }

    /// Every certificate issued to `node`, oldest first.
    pub async fn node_certificates(
        &self,
        node: &str,
    ) -> Result<Vec<CertificateRecord>, StoreError> {
        let sql = "SELECT serial, node_name, issued_ms, not_after_ms, revoked_ms, revoked_reason \
                   FROM node_certificates WHERE node_name = $1 ORDER BY issued_ms, serial";
        let rows: Vec<CertificateRow> = on_database!(&self.database, pool =>
            sqlx::query_as(sql).bind(node).fetch_all(pool).await?);
        Ok(rows.into_iter().map(certificate_from_row).collect())
    }

    /// Revokes one certificate (a revoked one stays as it was revoked).
    pub async fn revoke_certificate(
        &self,
        serial: &str,
        reason: &str,
        now_ms: i64,
    ) -> Result<(), StoreError> {
        let sql = "UPDATE node_certificates SET revoked_ms = $1, revoked_reason = $2 \
                   WHERE serial = $3 AND revoked_ms IS NULL";
        on_database!(&self.database, pool => {
            sqlx::query(sql)
                .bind(now_ms)
                .bind(reason)
                .bind(serial)
                .execute(pool)
                .await?;
        });
        Ok(())
    }

    /// Revokes every certificate of `node` and spends its enrolment token:
    /// it connects again only with a new one (`nodes rotate`). Returns how
    /// many certificates were revoked now.
    pub async fn revoke_node(
        &self,
        node: &str,
        reason: &str,
        now_ms: i64,
    ) -> Result<u64, StoreError> {
        let certificates = "UPDATE node_certificates SET revoked_ms = $1, revoked_reason = $2 \
                            WHERE node_name = $3 AND revoked_ms IS NULL";
        let token = "UPDATE nodes SET credential_hash = $1 || credential_hash \
                     WHERE name = $2 AND credential_hash NOT LIKE 'spent:%'";
        let revoked = on_database!(&self.database, pool => {
            let mut tx = pool.begin().await?;
            let revoked = sqlx::query(certificates)
                .bind(now_ms)
                .bind(reason)
                .bind(node)
                .execute(&mut *tx)
                .await?
                .rows_affected();
            sqlx::query(token)
                .bind(SPENT_PREFIX)
                .bind(node)
                .execute(&mut *tx)
                .await?;
            tx.commit().await?;
            revoked
        });
        Ok(revoked)
    }

    /// The revoked certificates that have not yet expired, with the reason
    /// each was revoked for: what a cell refuses and may have to close.
    pub async fn revoked_certificates(
        &self,
        now_ms: i64,
    ) -> Result<Vec<(String, String)>, StoreError> {
        let sql = "SELECT serial, COALESCE(revoked_reason, '') FROM node_certificates \
                   WHERE revoked_ms IS NOT NULL AND not_after_ms > $1";
        let rows: Vec<(String, String)> = on_database!(&self.database, pool =>
            sqlx::query_as(sql).bind(now_ms).fetch_all(pool).await?);
        Ok(rows)
    }
}
