//! Agents over mTLS: the cell's server certificate, the `Enrolment` service
//! that issues nodes' certificates, the binding of each session to the
//! certificate it presented, and the revocations that close sessions.
//!
//! - The deployment's node authority is made by the first process that
//!   needs it and kept in the store (`store::certificates`); every cell signs
//!   with the same one. A cell issues itself a server certificate for
//!   `pki::CELL_SERVER_NAME` at start.
//! - A node's first certificate is traded for its one-time enrolment token
//!   (`Enrol`, without a client certificate); later ones for the current
//!   certificate (`Renew`, which revokes it as rotated and moves the node's
//!   live session to the new one, so rotation loses nothing in flight).
//! - A session's `Hello` must name the node its certificate was issued to,
//!   and that certificate must be one the store issued and has not revoked.
//! - Every `REVOCATION_POLL_INTERVAL` the cell reads the revoked, unexpired
//!   certificates and closes every session bound to one (but for one its node
//!   renewed), or to an expired one: a `nodes revoke` closes the live stream
//!   within a second.
//!
//! Nothing secret is logged: not the token, not a key.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio_util::sync::CancellationToken;
use tonic::transport::{Certificate, Identity, ServerTlsConfig};
use tonic::{Request, Response, Status};

use store::Store;

/// How long a node's certificate is valid unless the cell is told otherwise;
/// its agent renews it after two thirds of that.
pub const NODE_CERTIFICATE_LIFETIME_DEFAULT: Duration = Duration::from_secs(30 * 86_400);

/// The shortest node certificate lifetime a cell issues (tests rotate with it).
pub const NODE_CERTIFICATE_LIFETIME_MIN: Duration = Duration::from_secs(10);

/// How long the server certificate a cell issues itself at start is valid;
/// a cell restarted within it keeps serving.
pub const CELL_CERTIFICATE_LIFETIME: Duration = Duration::from_secs(365 * 86_400);

/// How often revocations are read from the store.
pub const REVOCATION_POLL_INTERVAL: Duration = Duration::from_millis(250);

/// The answer to a wrong, spent or unknown enrolment: one answer for all, so
/// that nobody learns which nodes are enrolled.
pub const ENROLMENT_REFUSED: &str =
    "unknown node, or an enrolment token that is wrong or already used; \
     issue a new one with 'fleetgrid nodes rotate'";

/// What the operator chose for agents' TLS.
#[derive(Clone, Debug)]
pub struct AgentTlsConfig {
    pub node_certificate_lifetime: Duration,
}

impl Default for AgentTlsConfig {
    fn default() -> Self {
        AgentTlsConfig {
            node_certificate_lifetime: NODE_CERTIFICATE_LIFETIME_DEFAULT,
        }
    }
}

/// A cell's TLS: its server configuration, the authority it signs with and
/// the sessions bound to certificates.
pub struct CellTls {
    pub authority: pki::Authority,
    pub server: ServerTlsConfig,
    pub sessions: Arc<BoundSessions>,
    pub node_certificate_lifetime: Duration,
    /// The cell's metrics: certificates issued, sessions closed by one.
    pub metrics: Arc<crate::metrics::Metrics>,
}

impl CellTls {
    /// Loads the deployment's node authority (making it if this is the first
    /// process to need it) and issues this cell's server certificate.
    pub async fn prepare(
        store: &Store,
        config: &AgentTlsConfig,
        metrics: Arc<crate::metrics::Metrics>,
    ) -> Result<CellTls, TlsError> {
        let now = crate::core::now_ms().0;
        let authority = authority(store, now).await?;
        let identity = authority.issue_cell(now, CELL_CERTIFICATE_LIFETIME)?;
        let server = ServerTlsConfig::new()
            .identity(Identity::from_pem(&identity.chain_pem, &identity.key_pem))
            .client_ca_root(Certificate::from_pem(authority.cert_pem()))
            // `Enrol` comes before a node has a certificate; a session
            // without one is refused by its handshake check.
            .client_auth_optional(true);
        Ok(CellTls {
            authority,
            server,
            sessions: Arc::default(),
            node_certificate_lifetime: config
                .node_certificate_lifetime
                .max(NODE_CERTIFICATE_LIFETIME_MIN),
            metrics,
        })
    }

    /// Issues a certificate for `csr_pem` to `node` and records it.
    async fn issue(
        &self,
        store: &Store,
        node: &str,
        csr_pem: &str,
    ) -> Result<proto::NodeCertificate, Status> {
        let now = crate::core::now_ms().0;
        let issued = self
            .authority
            .issue_node(csr_pem, node, now, self.node_certificate_lifetime)
            .map_err(|error| Status::invalid_argument(format!("certificate request: {error}")))?;
        store
            .record_certificate(&issued.serial, node, now, issued.not_after_ms)
            .await
            .map_err(storage_error)?;
        self.metrics
            .node_certificates_issued
            .fetch_add(1, Ordering::Relaxed);
        tracing::info!(node_id = %node, serial = %issued.serial, not_after_ms = issued.not_after_ms, "issued a node certificate");
        Ok(proto::NodeCertificate {
            certificate_pem: issued.cert_pem,
            authority_pem: self.authority.cert_pem().to_owned(),
            not_after_unix_ms: issued.not_after_ms,
        })
    }
}

#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("node authority in the store: {0}")]
    Store(#[from] store::StoreError),
    #[error("certificates: {0}")]
    Pki(#[from] pki::PkiError),
}

/// The deployment's node authority: the store's, or a new one kept there
/// (of two processes making one at once, both use the one kept first).
pub async fn authority(store: &Store, now_ms: i64) -> Result<pki::Authority, TlsError> {
    let (cert, key) = match store.node_authority().await? {
        Some(kept) => kept,
        None => {
            let made = pki::Authority::generate(now_ms)?;
            store
                .keep_node_authority(made.cert_pem(), made.key_pem(), now_ms)
                .await?
        }
    };
    Ok(pki::Authority::from_pem(&cert, &key)?)
}

fn storage_error(error: store::StoreError) -> Status {
    tracing::error!(%error, "certificate storage");
    Status::unavailable("coordinator storage error; retry later")
}

/// The verified certificate a call's TLS presented, if any.
pub fn presented<T>(request: &Request<T>) -> Option<Result<pki::Presented, pki::PkiError>> {
    let certificates = request.peer_certs()?;
    let leaf = certificates.first()?;
    Some(pki::presented(leaf.as_ref()))
}

/// Checks that a presented certificate is one the store issued to `node`,
/// not revoked and not expired; `Err` is the reason to refuse.
pub async fn check_certificate(
    store: &Store,
    presented: &pki::Presented,
    node: &str,
) -> Result<(), CertificateRefusal> {
    if presented.node_id != node {
        return Err(CertificateRefusal::Refused(format!(
            "this certificate was issued to node {:?}, not {node:?}",
            presented.node_id
        )));
    }
    let record = store
        .certificate(&presented.serial)
        .await
        .map_err(|error| {
            tracing::error!(%error, node_id = %node, "look up node certificate");
            CertificateRefusal::Storage
        })?;
    let now = crate::core::now_ms().0;
    match record {
        Some(record) if record.node == node && record.revoked_ms.is_none() && record.not_after_ms > now => {
            Ok(())
        }
        Some(record) if record.revoked_ms.is_some() => Err(CertificateRefusal::Refused(format!(
            "this certificate was revoked ({}); enrol again with a token from 'fleetgrid nodes rotate'",
            record.revoked_reason.unwrap_or_default()
        ))),
        _ => Err(CertificateRefusal::Refused(
            "this certificate is unknown to the coordinator or expired".into(),
        )),
    }
}

/// Why a certificate was not accepted.
pub enum CertificateRefusal {
    Refused(String),
    Storage,
}

/// Which certificate each live session presented, so that a revocation,
/// an expiry or a rotation reaches it.
#[derive(Default)]
pub struct BoundSessions {
    next: AtomicU64,
    bound: Mutex<HashMap<String, Bound>>,
}

struct Bound {
    id: u64,
    serial: String,
    not_after_ms: i64,
    close: CancellationToken,
}

impl BoundSessions {
    /// Binds `node`'s new session to its certificate; `close` is cancelled to
    /// end it. Returns the binding's id, for `unbind`.
    pub fn bind(&self, node: &str, presented: &pki::Presented, close: CancellationToken) -> u64 {
        let id = self.next.fetch_add(1, Ordering::Relaxed);
        // A binding of an earlier session of the node goes: the core has
        // replaced that session already.
        self.lock().insert(
            node.to_owned(),
            Bound {
                id,
                serial: presented.serial.clone(),
                not_after_ms: presented.not_after_ms,
                close,
            },
        );
        id
    }

    /// Forgets a session that ended (unless a newer one replaced it).
    pub fn unbind(&self, node: &str, id: u64) {
        let mut bound = self.lock();
        if bound.get(node).is_some_and(|b| b.id == id) {
            bound.remove(node);
        }
    }

    /// Moves `node`'s live session from certificate `old` to `new`.
    fn rebind(&self, node: &str, old: &str, new: &str, not_after_ms: i64) {
        if let Some(bound) = self.lock().get_mut(node) {
            if bound.serial == old {
                bound.serial = new.to_owned();
                bound.not_after_ms = not_after_ms;
            }
        }
    }

    /// Closes every session bound to a certificate in `revoked` or expired
    /// at `now_ms`; returns the nodes closed.
    pub fn close_revoked(&self, revoked: &HashSet<String>, now_ms: i64) -> Vec<String> {
        let mut closed = Vec::new();
        self.lock().retain(|node, bound| {
            let keep = !revoked.contains(&bound.serial) && bound.not_after_ms > now_ms;
            if !keep {
                bound.close.cancel();
                closed.push(node.clone());
            }
            keep
        });
        closed
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, Bound>> {
        self.bound
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

/// Closes sessions whose certificate was revoked or expired, until
/// `shutdown`.
pub async fn watch_revocations(store: Store, tls: Arc<CellTls>, shutdown: CancellationToken) {
    let mut interval = tokio::time::interval(REVOCATION_POLL_INTERVAL);
    interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = interval.tick() => {}
        }
        let now = crate::core::now_ms().0;
        match store.revoked_certificates(now).await {
            Ok(revoked) => {
                // A certificate its node renewed closes nothing: the node
                // holds the new one, and a session on it ends when it expires
                // (one on this cell was moved to the new one already).
                let revoked: HashSet<String> = revoked
                    .into_iter()
                    .filter(|(_, reason)| reason != store::certificates::ROTATED)
                    .map(|(serial, _)| serial)
                    .collect();
                for node in tls.sessions.close_revoked(&revoked, now) {
                    tls.metrics
                        .node_sessions_closed_by_certificate
                        .fetch_add(1, Ordering::Relaxed);
                    tracing::warn!(node_id = %node, "closed a session: its certificate was revoked or expired");
                }
            }
            Err(error) => tracing::warn!(%error, "read revoked certificates"),
        }
    }
}

/// The `Enrolment` service.
pub struct EnrolmentService {
    pub store: Store,
    pub tls: Arc<CellTls>,
    /// Places for calls being served (`limits::ENROLMENTS_AT_ONCE_MAX`).
    pub at_once: Arc<tokio::sync::Semaphore>,
}

impl EnrolmentService {
    pub fn new(store: Store, tls: Arc<CellTls>) -> EnrolmentService {
        EnrolmentService {
            store,
            tls,
            at_once: Arc::new(tokio::sync::Semaphore::new(
                crate::limits::ENROLMENTS_AT_ONCE_MAX,
            )),
        }
    }

    fn place(&self) -> Result<tokio::sync::OwnedSemaphorePermit, Status> {
        Arc::clone(&self.at_once)
            .try_acquire_owned()
            .map_err(|_| Status::resource_exhausted("too many enrolments at once; retry later"))
    }
}

#[tonic::async_trait]
impl proto::enrolment_server::Enrolment for EnrolmentService {
    async fn enrol(
        &self,
        request: Request<proto::EnrolRequest>,
    ) -> Result<Response<proto::NodeCertificate>, Status> {
        let _place = self.place()?;
        let request = request.into_inner();
        let spent = self
            .store
            .consume_enrolment(&request.node_id, &request.token)
            .await
            .map_err(storage_error)?;
        if !spent {
            tracing::warn!(node_id = %request.node_id, "refused an enrolment");
            return Err(Status::unauthenticated(ENROLMENT_REFUSED));
        }
        self.tls
            .issue(&self.store, &request.node_id, &request.csr_pem)
            .await
            .map(Response::new)
    }

    async fn renew(
        &self,
        request: Request<proto::RenewRequest>,
    ) -> Result<Response<proto::NodeCertificate>, Status> {
        let _place = self.place()?;
        let Some(Ok(current)) = presented(&request) else {
            return Err(Status::unauthenticated(
                "renewal needs the node's current certificate",
            ));
        };
        match check_certificate(&self.store, &current, &current.node_id).await {
            Ok(()) => {}
            Err(CertificateRefusal::Refused(reason)) => {
                return Err(Status::unauthenticated(reason))
            }
            Err(CertificateRefusal::Storage) => {
                return Err(Status::unavailable(
                    "coordinator storage error; retry later",
                ))
            }
        }
        let node = current.node_id.clone();
        let issued = self
            .tls
            .issue(&self.store, &node, &request.into_inner().csr_pem)
            .await?;
        let new = pki::presented_pem(&issued.certificate_pem)
            .map_err(|error| Status::internal(error.to_string()))?;
        // The live session moves first: it must never be bound to a revoked one.
        self.tls
            .sessions
            .rebind(&node, &current.serial, &new.serial, new.not_after_ms);
        self.store
            .revoke_certificate(
                &current.serial,
                store::certificates::ROTATED,
                crate::core::now_ms().0,
            )
            .await
            .map_err(storage_error)?;
        tracing::info!(node_id = %node, old = %current.serial, new = %new.serial, "rotated a node certificate");
        Ok(Response::new(issued))
    }
}
