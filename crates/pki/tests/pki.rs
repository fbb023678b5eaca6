//! Behaviour of the public API: issuing, verifying, pinning and mTLS over loopback.

use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use pki::{
    fetch_authority, pin_of_pem, presented, presented_pem, server_config, Authority, CellIdentity,
    NodeKey, PkiError,
};
use rustls::client::danger::ServerCertVerifier;
use rustls::client::WebPkiServerVerifier;
use rustls::server::WebPkiClientVerifier;
use rustls::{ClientConfig, RootCertStore, ServerConfig};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinHandle;
use tokio_rustls::{TlsAcceptor, TlsConnector};

const DAY: Duration = Duration::from_secs(86_400);
const WAIT: Duration = Duration::from_secs(10);

fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_millis() as i64
}

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

fn certs(pem: &str) -> Vec<CertificateDer<'static>> {
    CertificateDer::pem_slice_iter(pem.as_bytes())
        .collect::<Result<_, _>>()
        .unwrap()
}

fn roots(ca_pem: &str) -> Arc<RootCertStore> {
    let mut roots = RootCertStore::empty();
    for cert in certs(ca_pem) {
        roots.add(cert).unwrap();
    }
    Arc::new(roots)
}

/// Verifies a node certificate as a client certificate against `ca_pem`.
fn verify_client(cert_pem: &str, ca_pem: &str) -> Result<(), rustls::Error> {
    let verifier = WebPkiClientVerifier::builder_with_provider(roots(ca_pem), provider())
        .build()
        .unwrap();
    verifier.verify_client_cert(&certs(cert_pem)[0], &[], UnixTime::now())?;
    Ok(())
}

fn issue(ca: &Authority, node_id: &str) -> (NodeKey, pki::Issued) {
    let key = NodeKey::generate().unwrap();
    let csr = key.csr_pem(node_id).unwrap();
    let issued = ca.issue_node(&csr, node_id, now_ms(), DAY).unwrap();
    (key, issued)
}

#[test]
fn issued_node_certificate_reads_back_and_verifies_only_against_its_ca() {
    let now = now_ms();
    let ca = Authority::generate(now).unwrap();
    let key = NodeKey::generate().unwrap();
    let csr = key.csr_pem("veh-0042.eu").unwrap();
    let issued = ca.issue_node(&csr, "veh-0042.eu", now, DAY).unwrap();

    let seen = presented_pem(&issued.cert_pem).unwrap();
    assert_eq!(seen.node_id, "veh-0042.eu");
    assert_eq!(seen.serial, issued.serial);
    assert_eq!(seen.not_after_ms, issued.not_after_ms);
    assert!((seen.not_after_ms - (now + DAY.as_millis() as i64)).abs() <= 1000);
    assert_eq!(seen, presented(&certs(&issued.cert_pem)[0]).unwrap());
    // 16 bytes of serial, positive.
    assert_eq!(issued.serial.len(), 32);
    assert!(u8::from_str_radix(&issued.serial[..2], 16).unwrap() < 0x80);
    // Serials are random.
    let again = ca.issue_node(&csr, "veh-0042.eu", now, DAY).unwrap();
    assert_ne!(again.serial, issued.serial);

    verify_client(&issued.cert_pem, ca.cert_pem()).unwrap();
    let other = Authority::generate(now).unwrap();
    assert!(verify_client(&issued.cert_pem, other.cert_pem()).is_err());
    // A client certificate is not a server certificate.
    let server = WebPkiServerVerifier::builder_with_provider(roots(ca.cert_pem()), provider())
        .build()
        .unwrap();
    let name = ServerName::try_from(pki::CELL_SERVER_NAME).unwrap();
    let leaf = &certs(&issued.cert_pem)[0];
    assert!(server
        .verify_server_cert(leaf, &[], &name, &[], UnixTime::now())
        .is_err());
}

#[test]
fn expired_node_certificate_does_not_verify() {
    let then = now_ms() - 10 * DAY.as_millis() as i64;
    let ca = Authority::generate(then).unwrap();
    let key = NodeKey::generate().unwrap();
    let csr = key.csr_pem("old").unwrap();
    let issued = ca.issue_node(&csr, "old", then, DAY).unwrap();
    assert!(verify_client(&issued.cert_pem, ca.cert_pem()).is_err());
}

#[test]
fn bad_node_ids_and_csrs_are_refused() {
    let ca = Authority::generate(now_ms()).unwrap();
    let key = NodeKey::generate().unwrap();
    let csr = key.csr_pem("good").unwrap();
    for bad in ["", "has space", "a/b", "urn:x", &"n".repeat(129)] {
        assert!(matches!(
            ca.issue_node(&csr, bad, now_ms(), DAY),
            Err(PkiError::InvalidNodeId)
        ));
        assert!(matches!(key.csr_pem(bad), Err(PkiError::InvalidNodeId)));
    }
    assert!(ca.issue_node("garbage", "good", now_ms(), DAY).is_err());
    assert!(ca.issue_node(ca.cert_pem(), "good", now_ms(), DAY).is_err());
    // A PEM CSR with one base64 character changed in the middle.
    let mut tampered = csr.clone().into_bytes();
    let i = tampered.len() / 2;
    tampered[i] = if tampered[i] == b'A' { b'B' } else { b'A' };
    let tampered = String::from_utf8(tampered).unwrap();
    assert!(ca.issue_node(&tampered, "good", now_ms(), DAY).is_err());
}

#[test]
fn the_node_id_comes_from_the_caller_not_the_csr() {
    let ca = Authority::generate(now_ms()).unwrap();
    let key = NodeKey::generate().unwrap();
    let csr = key.csr_pem("asked-for").unwrap();
    let issued = ca.issue_node(&csr, "granted", now_ms(), DAY).unwrap();
    assert_eq!(presented_pem(&issued.cert_pem).unwrap().node_id, "granted");
}

#[test]
fn certificates_without_one_node_uri_are_refused() {
    let ca = Authority::generate(now_ms()).unwrap();
    let cell = ca.issue_cell(now_ms(), DAY).unwrap();
    assert!(presented_pem(&cell.chain_pem).is_err());
    assert!(presented_pem(ca.cert_pem()).is_err());
    assert!(presented(b"not der").is_err());
}

#[test]
fn authority_round_trips_through_pem() {
    let ca = Authority::generate(now_ms()).unwrap();
    let reloaded = Authority::from_pem(ca.cert_pem(), ca.key_pem()).unwrap();
    assert_eq!(reloaded.pin(), ca.pin());
    assert_eq!(reloaded.cert_pem(), ca.cert_pem());
    let (_, issued) = issue(&reloaded, "after-reload");
    verify_client(&issued.cert_pem, ca.cert_pem()).unwrap();

    let other = Authority::generate(now_ms()).unwrap();
    assert!(matches!(
        Authority::from_pem(ca.cert_pem(), other.key_pem()),
        Err(PkiError::KeyMismatch)
    ));
    assert!(Authority::from_pem(ca.cert_pem(), "nonsense").is_err());
    assert!(Authority::from_pem("nonsense", ca.key_pem()).is_err());
    // A leaf certificate is not an authority, even with its own key.
    let (key, issued) = issue(&ca, "leaf");
    assert!(Authority::from_pem(&issued.cert_pem, key.key_pem()).is_err());
}

#[test]
fn node_key_round_trips_through_pem() {
    let ca = Authority::generate(now_ms()).unwrap();
    let key = NodeKey::generate().unwrap();
    let reloaded = NodeKey::from_pem(key.key_pem()).unwrap();
    assert_eq!(reloaded.key_pem(), key.key_pem());
    let csr = reloaded.csr_pem("n1").unwrap();
    ca.issue_node(&csr, "n1", now_ms(), DAY).unwrap();
    assert!(NodeKey::from_pem("nonsense").is_err());
}

#[test]
fn pins_are_stable_and_distinct() {
    let a = Authority::generate(now_ms()).unwrap();
    let b = Authority::generate(now_ms()).unwrap();
    let pin = pin_of_pem(a.cert_pem()).unwrap();
    assert_eq!(pin, a.pin());
    assert_eq!(pin, pin_of_pem(a.cert_pem()).unwrap());
    assert_ne!(pin, b.pin());
    assert!(pin.starts_with("sha256:"));
    assert_eq!(pin.len(), "sha256:".len() + 64);
    assert!(pin[7..]
        .bytes()
        .all(|c| c.is_ascii_digit() || (b'a'..=b'f').contains(&c)));
    assert!(pin_of_pem("no pem here").is_err());
}

#[test]
fn debug_never_shows_keys() {
    let ca = Authority::generate(now_ms()).unwrap();
    let key = NodeKey::generate().unwrap();
    let cell = ca.issue_cell(now_ms(), DAY).unwrap();
    for debug in [format!("{ca:?}"), format!("{key:?}"), format!("{cell:?}")] {
        assert!(!debug.contains("PRIVATE KEY"), "{debug}");
    }
    let body = |pem: &str| pem.lines().nth(1).unwrap().to_owned();
    assert!(!format!("{ca:?}").contains(&body(ca.key_pem())));
    assert!(!format!("{key:?}").contains(&body(key.key_pem())));
    assert!(!format!("{cell:?}").contains(&body(&cell.key_pem)));
}

/// Serves one TLS connection; yields the client's certificates (if any).
async fn serve_once(
    config: Arc<ServerConfig>,
) -> (
    String,
    JoinHandle<std::io::Result<Option<Vec<CertificateDer<'static>>>>>,
) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let address = listener.local_addr().unwrap().to_string();
    let task = tokio::spawn(async move {
        let (tcp, _) = listener.accept().await?;
        let tls = TlsAcceptor::from(config).accept(tcp).await?;
        Ok(tls.get_ref().1.peer_certificates().map(<[_]>::to_vec))
    });
    (address, task)
}

async fn served<T>(task: JoinHandle<T>) -> T {
    tokio::time::timeout(WAIT, task).await.unwrap().unwrap()
}

#[tokio::test]
async fn fetch_authority_returns_the_pinned_ca() {
    let ca = Authority::generate(now_ms()).unwrap();
    let cell = ca.issue_cell(now_ms(), DAY).unwrap();
    let config = server_config(&cell, ca.cert_pem()).unwrap();

    let (address, task) = serve_once(config.clone()).await;
    let fetched = fetch_authority(&address, &ca.pin(), WAIT).await.unwrap();
    assert_eq!(fetched, ca.cert_pem());
    served(task).await.unwrap();

    let other = Authority::generate(now_ms()).unwrap();
    let (address, task) = serve_once(config).await;
    let err = fetch_authority(&address, &other.pin(), WAIT)
        .await
        .unwrap_err();
    assert!(matches!(err, PkiError::PinMismatch(_)), "{err}");
    let _ = served(task).await;
}

#[tokio::test]
async fn fetch_authority_refuses_a_leaf_from_another_ca() {
    let ca1 = Authority::generate(now_ms()).unwrap();
    let ca2 = Authority::generate(now_ms()).unwrap();
    let cell2 = ca2.issue_cell(now_ms(), DAY).unwrap();
    let leaf2 = &cell2.chain_pem[..cell2.chain_pem.find("-----END").unwrap()];
    let forged = CellIdentity {
        chain_pem: format!("{leaf2}-----END CERTIFICATE-----\n{}", ca1.cert_pem()),
        key_pem: cell2.key_pem.clone(),
    };
    assert_eq!(certs(&forged.chain_pem).len(), 2);
    let (address, task) = serve_once(server_config(&forged, ca1.cert_pem()).unwrap()).await;
    let err = fetch_authority(&address, &ca1.pin(), WAIT)
        .await
        .unwrap_err();
    assert!(matches!(err, PkiError::Untrusted(_)), "{err}");
    let _ = served(task).await;
}

#[tokio::test]
async fn fetch_authority_fails_on_connect_errors_and_timeouts() {
    // A port that was just free: nothing listens there.
    let closed = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let address = closed.local_addr().unwrap().to_string();
    drop(closed);
    let err = fetch_authority(&address, "sha256:00", WAIT)
        .await
        .unwrap_err();
    assert!(matches!(err, PkiError::Connect { .. }), "{err}");

    // A listener that never answers the handshake.
    let silent = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let address = silent.local_addr().unwrap().to_string();
    let timeout = Duration::from_millis(200);
    let err = fetch_authority(&address, "sha256:00", timeout)
        .await
        .unwrap_err();
    assert!(matches!(err, PkiError::Timeout(_)), "{err}");
}

fn client_config(ca_pem: &str, identity: Option<(&str, &str)>) -> Arc<ClientConfig> {
    let builder = ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots(ca_pem));
    let config = match identity {
        Some((cert_pem, key_pem)) => builder
            .with_client_auth_cert(
                certs(cert_pem),
                PrivateKeyDer::from_pem_slice(key_pem.as_bytes()).unwrap(),
            )
            .unwrap(),
        None => builder.with_no_client_auth(),
    };
    Arc::new(config)
}

/// Connects to a fresh single-connection server; returns what the server saw.
async fn mtls(
    ca: &Authority,
    client: Arc<ClientConfig>,
) -> std::io::Result<Option<Vec<CertificateDer<'static>>>> {
    let cell = ca.issue_cell(now_ms(), DAY).unwrap();
    let (address, task) = serve_once(server_config(&cell, ca.cert_pem()).unwrap()).await;
    let tcp = TcpStream::connect(&address).await.unwrap();
    let name = ServerName::try_from(pki::CELL_SERVER_NAME).unwrap();
    // With TLS 1.3 the client may finish before the server rejects its
    // certificate, so the server's side is what counts; keep the stream open.
    let stream = TlsConnector::from(client).connect(name, tcp).await;
    let result = served(task).await;
    drop(stream);
    result
}

#[tokio::test]
async fn mtls_round_trip_identifies_the_node() {
    let ca = Authority::generate(now_ms()).unwrap();
    let (key, issued) = issue(&ca, "veh-7");

    let client = client_config(ca.cert_pem(), Some((&issued.cert_pem, key.key_pem())));
    let peer = mtls(&ca, client)
        .await
        .unwrap()
        .expect("a client certificate");
    let seen = presented(&peer[0]).unwrap();
    assert_eq!(seen.node_id, "veh-7");
    assert_eq!(seen.serial, issued.serial);

    // Client authentication is optional.
    assert!(mtls(&ca, client_config(ca.cert_pem(), None))
        .await
        .unwrap()
        .is_none());

    // A certificate from another authority is refused.
    let other = Authority::generate(now_ms()).unwrap();
    let (key, foreign) = issue(&other, "veh-7");
    let client = client_config(ca.cert_pem(), Some((&foreign.cert_pem, key.key_pem())));
    assert!(mtls(&ca, client).await.is_err());
}
