//! The node's certificate for its mTLS session with cells (`https://` cell URLs).
//!
//! - **Enrolment.** The agent makes its key pair itself; the key never leaves the vehicle. It
//!   learns the deployment's authority from a cell, trusting only the pin in its enrolment token
//!   (`pki::fetch_authority`), then trades the one-time token and a certificate request for its
//!   certificate (`Enrolment.Enrol`), bound to its node id.
//! - **Kept.** Key, certificate and authority are written to the node's identity directory (the
//!   key readable by its user only) with the hash of the token they were enrolled with: a restart
//!   reuses them, a new token (`nodes rotate`) enrols afresh.
//! - **Renewed.** After two thirds of its lifetime the agent asks its cell for a new certificate
//!   with a new key (`Enrolment.Renew`, over mTLS with the current one), at the cell of its latest
//!   session first. The live session goes on; that cell moves it to the new certificate, and the
//!   next connection presents the new one.

use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use proto::enrolment_client::EnrolmentClient;
use tokio_util::sync::CancellationToken;
use tonic::transport::{Certificate, ClientTlsConfig, Endpoint, Identity};

use crate::connection::{CONNECT_TIMEOUT, HANDSHAKE_TIMEOUT};
use crate::AgentError;

const KEY_FILE: &str = "node.key";
const CERTIFICATE_FILE: &str = "node.crt";
const AUTHORITY_FILE: &str = "authority.crt";
/// The SHA-256 of the token the kept certificate was enrolled with (not the token).
const TOKEN_HASH_FILE: &str = "token.sha256";

/// Waits between rounds of enrolment or renewal attempts that found no cell.
const RETRY_MIN: Duration = Duration::from_secs(1);
const RETRY_MAX: Duration = Duration::from_secs(30);

/// The node's identity: key, certificate and the authority that signed it.
struct Held {
    key_pem: String,
    certificate_pem: String,
    authority_pem: String,
    /// When this certificate was obtained and when it expires, Unix ms.
    obtained_ms: i64,
    not_after_ms: i64,
}

/// A node's certificate, kept current.
pub struct NodeTls {
    node_id: String,
    dir: PathBuf,
    held: RwLock<Held>,
    /// The cell of the node's latest session: renewal asks it first, so that it moves that
    /// session to the new certificate.
    session_cell: std::sync::Mutex<Option<String>>,
}

impl std::fmt::Debug for NodeTls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NodeTls")
            .field("node_id", &self.node_id)
            .field("dir", &self.dir)
            .finish_non_exhaustive()
    }
}

fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |elapsed| {
            i64::try_from(elapsed.as_millis()).unwrap_or(i64::MAX)
        })
}

fn token_hash(token: &str) -> String {
    pki::sha256_hex(token.as_bytes())
}

fn tls_error(reason: impl std::fmt::Display) -> AgentError {
    AgentError::Tls(reason.to_string())
}

/// `host:port` of an `https://` URL.
fn host_port(url: &str) -> Result<&str, AgentError> {
    url.strip_prefix("https://")
        .map(|rest| rest.trim_end_matches('/'))
        .ok_or_else(|| tls_error(format!("{url} is not an https:// URL")))
}

impl NodeTls {
    /// The node's identity from `dir` when it was enrolled with `token` by the authority `pin`
    /// names and has not expired; otherwise a new key pair, enrolled with `token` at the first of
    /// `cells` that answers (retried until `shutdown`). A refusal (wrong or used token) is final.
    pub async fn obtain(
        dir: &Path,
        node_id: &str,
        token: &str,
        pin: &str,
        cells: &[String],
        shutdown: &CancellationToken,
    ) -> Result<Option<Arc<NodeTls>>, AgentError> {
        if let Some(held) = load(dir, node_id, token, pin)? {
            tracing::info!(node_id, dir = %dir.display(), "using the node's kept certificate");
            return Ok(Some(Arc::new(NodeTls {
                node_id: node_id.to_owned(),
                dir: dir.to_owned(),
                held: RwLock::new(held),
                session_cell: std::sync::Mutex::default(),
            })));
        }
        let key = pki::NodeKey::generate().map_err(tls_error)?;
        let csr_pem = key.csr_pem(node_id).map_err(tls_error)?;
        let mut wait = RETRY_MIN;
        loop {
            for url in cells {
                match enrol(url, node_id, token, pin, &csr_pem).await {
                    Ok(issued) => {
                        let held = Held {
                            key_pem: key.key_pem().to_owned(),
                            certificate_pem: issued.certificate_pem,
                            authority_pem: issued.authority_pem,
                            obtained_ms: now_ms(),
                            not_after_ms: issued.not_after_unix_ms,
                        };
                        save(dir, &held, Some(token))?;
                        tracing::info!(node_id, url = %url, not_after_ms = held.not_after_ms, "enrolled: the node has its certificate");
                        return Ok(Some(Arc::new(NodeTls {
                            node_id: node_id.to_owned(),
                            dir: dir.to_owned(),
                            held: RwLock::new(held),
                            session_cell: std::sync::Mutex::default(),
                        })));
                    }
                    Err(Attempt::Refused(reason)) => {
                        return Err(AgentError::Refused {
                            code: proto::RefusalCode::BadCredential,
                            reason,
                        })
                    }
                    Err(Attempt::Failed(reason)) => {
                        tracing::warn!(node_id, url = %url, %reason, "enrolment failed");
                    }
                }
            }
            tokio::select! {
                () = shutdown.cancelled() => return Ok(None),
                () = tokio::time::sleep(wait) => {}
            }
            wait = (wait * 2).min(RETRY_MAX);
        }
    }

    /// The TLS a session's connection presents: the current certificate, cells checked against
    /// the authority.
    pub fn client_config(&self) -> ClientTlsConfig {
        let held = self.read();
        client_tls(&held.authority_pem)
            .identity(Identity::from_pem(&held.certificate_pem, &held.key_pem))
    }

    /// Records the cell that welcomed the node's latest session.
    pub fn welcomed_by(&self, url: &str) {
        *self
            .session_cell
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner()) = Some(url.to_owned());
    }

    /// `cells` in the order renewal tries them: the latest session's cell first.
    fn renewal_order(&self, cells: &[String]) -> Vec<String> {
        let first = self
            .session_cell
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .clone();
        let rest = cells
            .iter()
            .filter(|url| Some(*url) != first.as_ref())
            .cloned();
        first.clone().into_iter().chain(rest).collect()
    }

    /// When the current certificate is due for renewal: two thirds of its lifetime.
    pub fn renew_at_ms(&self) -> i64 {
        let held = self.read();
        held.obtained_ms + (held.not_after_ms - held.obtained_ms) * 2 / 3
    }

    /// The current certificate's serial.
    pub fn serial(&self) -> String {
        pki::presented_pem(&self.read().certificate_pem)
            .map(|presented| presented.serial)
            .unwrap_or_default()
    }

    /// Renews the certificate at the cell at `url`, with a new key.
    pub async fn renew(&self, url: &str) -> Result<(), AgentError> {
        let key = pki::NodeKey::generate().map_err(tls_error)?;
        let csr_pem = key.csr_pem(&self.node_id).map_err(tls_error)?;
        let endpoint = Endpoint::from_shared(url.to_owned())
            .map_err(tls_error)?
            .connect_timeout(CONNECT_TIMEOUT)
            .timeout(HANDSHAKE_TIMEOUT)
            .tls_config(self.client_config())
            .map_err(tls_error)?;
        let channel = endpoint.connect().await.map_err(tls_error)?;
        let issued = EnrolmentClient::new(channel)
            .renew(proto::RenewRequest { csr_pem })
            .await
            .map_err(|status| tls_error(format!("renew: {}", status.message())))?
            .into_inner();
        let held = Held {
            key_pem: key.key_pem().to_owned(),
            certificate_pem: issued.certificate_pem,
            authority_pem: self.read().authority_pem.clone(),
            obtained_ms: now_ms(),
            not_after_ms: issued.not_after_unix_ms,
        };
        save(&self.dir, &held, None)?;
        *self
            .held
            .write()
            .unwrap_or_else(|poisoned| poisoned.into_inner()) = held;
        Ok(())
    }

    fn read(&self) -> std::sync::RwLockReadGuard<'_, Held> {
        self.held
            .read()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

/// Renews `tls` whenever it is due, at the first of `cells` that renews it, until `shutdown`.
pub async fn keep_renewed(tls: Arc<NodeTls>, cells: Vec<String>, shutdown: CancellationToken) {
    let mut wait = RETRY_MIN;
    loop {
        let due_in = u64::try_from(tls.renew_at_ms() - now_ms()).unwrap_or(0);
        tokio::select! {
            () = shutdown.cancelled() => return,
            () = tokio::time::sleep(Duration::from_millis(due_in)) => {}
        }
        let mut renewed = false;
        for url in &tls.renewal_order(&cells) {
            match tls.renew(url).await {
                Ok(()) => {
                    tracing::info!(node_id = %tls.node_id, url = %url, serial = %tls.serial(), "renewed the node's certificate");
                    renewed = true;
                    break;
                }
                Err(error) => {
                    tracing::warn!(node_id = %tls.node_id, url = %url, %error, "renewing the certificate failed")
                }
            }
        }
        if renewed {
            wait = RETRY_MIN;
            continue;
        }
        tokio::select! {
            () = shutdown.cancelled() => return,
            () = tokio::time::sleep(wait) => {}
        }
        wait = (wait * 2).min(RETRY_MAX);
    }
}

/// Cells are checked against the authority, by the name every cell's certificate carries.
fn client_tls(authority_pem: &str) -> ClientTlsConfig {
    ClientTlsConfig::new()
        .ca_certificate(Certificate::from_pem(authority_pem))
        .domain_name(pki::CELL_SERVER_NAME)
}

enum Attempt {
    /// The cell refused the token: final.
    Refused(String),
    /// The cell could not be reached or failed: try another.
    Failed(String),
}

async fn enrol(
    url: &str,
    node_id: &str,
    token: &str,
    pin: &str,
    csr_pem: &str,
) -> Result<proto::NodeCertificate, Attempt> {
    let failed = |reason: String| Attempt::Failed(reason);
    let address = host_port(url).map_err(|error| failed(error.to_string()))?;
    let authority_pem = pki::fetch_authority(address, pin, CONNECT_TIMEOUT)
        .await
        .map_err(|error| failed(format!("learn the authority: {error}")))?;
    let endpoint = Endpoint::from_shared(url.to_owned())
        .map_err(|error| failed(error.to_string()))?
        .connect_timeout(CONNECT_TIMEOUT)
        .timeout(HANDSHAKE_TIMEOUT)
        .tls_config(client_tls(&authority_pem))
        .map_err(|error| failed(error.to_string()))?;
    let channel = endpoint
        .connect()
        .await
        .map_err(|error| failed(format!("connect: {error}")))?;
    let issued = EnrolmentClient::new(channel)
        .enrol(proto::EnrolRequest {
            node_id: node_id.to_owned(),
            token: token.to_owned(),
            csr_pem: csr_pem.to_owned(),
        })
        .await
        .map_err(|status| match status.code() {
            tonic::Code::Unauthenticated | tonic::Code::InvalidArgument => {
                Attempt::Refused(status.message().to_owned())
            }
            _ => failed(format!("enrol: {}", status.message())),
        })?
        .into_inner();
    if pki::pin_of_pem(&issued.authority_pem).ok().as_deref() != Some(pin) {
        return Err(failed(
            "the cell answered with another authority than the token's".into(),
        ));
    }
    Ok(issued)
}

/// The kept identity, if it is for `node_id`, enrolled with `token`, by the authority `pin` names,
/// and not expired.
fn load(dir: &Path, node_id: &str, token: &str, pin: &str) -> Result<Option<Held>, AgentError> {
    let read = |name: &str| std::fs::read_to_string(dir.join(name)).ok();
    let (Some(key_pem), Some(certificate_pem), Some(authority_pem), Some(enrolled_with)) = (
        read(KEY_FILE),
        read(CERTIFICATE_FILE),
        read(AUTHORITY_FILE),
        read(TOKEN_HASH_FILE),
    ) else {
        return Ok(None);
    };
    if enrolled_with.trim() != token_hash(token)
        || pki::pin_of_pem(&authority_pem).ok().as_deref() != Some(pin)
    {
        return Ok(None);
    }
    let Ok(presented) = pki::presented_pem(&certificate_pem) else {
        return Ok(None);
    };
    if presented.node_id != node_id || presented.not_after_ms <= now_ms() {
        return Ok(None);
    }
    let obtained_ms = std::fs::metadata(dir.join(CERTIFICATE_FILE))
        .and_then(|metadata| metadata.modified())
        .ok()
        .and_then(|modified| modified.duration_since(UNIX_EPOCH).ok())
        .map_or_else(now_ms, |since| {
            i64::try_from(since.as_millis()).unwrap_or(i64::MAX)
        });
    Ok(Some(Held {
        key_pem,
        certificate_pem,
        authority_pem,
        obtained_ms,
        not_after_ms: presented.not_after_ms,
    }))
}

/// Writes the identity to `dir`, each file whole (written aside, then renamed); the key readable
/// by this user only. `token` is recorded at enrolment and kept at renewal (`None`).
fn save(dir: &Path, held: &Held, token: Option<&str>) -> Result<(), AgentError> {
    let io = |what: &str, error: std::io::Error| {
        tls_error(format!(
            "keep the node's {what} in {}: {error}",
            dir.display()
        ))
    };
    std::fs::create_dir_all(dir).map_err(|error| io("identity directory", error))?;
    let write = |name: &str, contents: &str, private: bool| {
        let aside = dir.join(format!(".{name}.new"));
        let mut options = std::fs::OpenOptions::new();
        options.write(true).create(true).truncate(true);
        #[cfg(unix)]
        if private {
            use std::os::unix::fs::OpenOptionsExt;
            options.mode(0o600);
        }
        #[cfg(not(unix))]
        let _ = private;
        let mut file = options.open(&aside).map_err(|error| io(name, error))?;
        std::io::Write::write_all(&mut file, contents.as_bytes())
            .map_err(|error| io(name, error))?;
        file.sync_all().map_err(|error| io(name, error))?;
        std::fs::rename(&aside, dir.join(name)).map_err(|error| io(name, error))
    };
    write(KEY_FILE, &held.key_pem, true)?;
    write(AUTHORITY_FILE, &held.authority_pem, false)?;
    if let Some(token) = token {
        write(TOKEN_HASH_FILE, &token_hash(token), false)?;
    }
    // Last: its modification time is when the certificate was obtained.
    write(CERTIFICATE_FILE, &held.certificate_pem, false)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renewal_asks_the_cell_of_the_latest_session_first() {
        let tls = NodeTls {
            node_id: "car-1".into(),
            dir: PathBuf::from("unused"),
            held: RwLock::new(Held {
                key_pem: String::new(),
                certificate_pem: String::new(),
                authority_pem: String::new(),
                obtained_ms: 0,
                not_after_ms: 3_000,
            }),
            session_cell: std::sync::Mutex::default(),
        };
        let cells: Vec<String> = ["https://a:1", "https://b:1", "https://c:1"]
            .map(str::to_owned)
            .to_vec();
        assert_eq!(tls.renewal_order(&cells), cells);
        tls.welcomed_by("https://b:1");
        assert_eq!(
            tls.renewal_order(&cells),
            ["https://b:1", "https://a:1", "https://c:1"]
        );
        assert_eq!(tls.renew_at_ms(), 2_000);
    }
}
