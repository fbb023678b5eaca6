//! Certificate authority, node keys and TLS probing for fleetgrid's mTLS.
//!
//! Every deployment has one [`Authority`] (ECDSA P-256). It signs server
//! certificates for cells ([`Authority::issue_cell`]) and client certificates
//! for nodes ([`Authority::issue_node`]) from CSRs that vehicles make with
//! their own [`NodeKey`]. A node certificate carries its node id in one URI SAN
//! (`urn:fleetgrid:node:<id>`), which [`presented`] reads back on the server.
//! A new agent learns the authority from a cell with [`fetch_authority`],
//! trusting nothing but a pin (`sha256:<hex>` of the authority certificate).
//!
//! All TLS uses the ring provider explicitly, never the process default.

#![warn(missing_docs)]

use std::fmt::{self, Display};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose,
    Ia5String, IsCa, KeyPair, KeyUsagePurpose, PublicKeyData, SanType, SerialNumber,
    SubjectPublicKeyInfo, PKCS_ECDSA_P256_SHA256,
};
use ring::rand::{SecureRandom, SystemRandom};
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::client::WebPkiServerVerifier;
use rustls::crypto::{CryptoProvider, WebPkiSupportedAlgorithms};
use rustls::server::WebPkiClientVerifier;
use rustls::{ClientConfig, DigitallySignedStruct, RootCertStore, ServerConfig, SignatureScheme};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{
    CertificateDer, CertificateSigningRequestDer, PrivateKeyDer, ServerName, UnixTime,
};
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;
use x509_parser::certificate::X509Certificate;
use x509_parser::certification_request::X509CertificationRequest;
use x509_parser::extensions::GeneralName;
use x509_parser::prelude::FromDer;

/// The DNS name every cell's server certificate carries; agents verify cells against it.
pub const CELL_SERVER_NAME: &str = "cell.fleetgrid";
/// The URI SAN prefix that binds a node certificate to its node id.
pub const NODE_URI_PREFIX: &str = "urn:fleetgrid:node:";

const AUTHORITY_NAME: &str = "fleetgrid node authority";
const AUTHORITY_LIFETIME: Duration = Duration::from_secs(3652 * 86_400);
/// 9999-12-31T23:59:59Z, the last instant an X.509 time can express.
const MAX_MS: u64 = 253_402_300_799_000;

/// Errors of this crate. Messages never contain key material.
#[derive(Debug, thiserror::Error)]
pub enum PkiError {
    /// A node id outside 1..=128 characters of `[A-Za-z0-9._-]`.
    #[error("invalid node id: it must be 1 to 128 characters of [A-Za-z0-9._-]")]
    InvalidNodeId,
    /// A certificate (or its PEM) that cannot be read or is not what is needed.
    #[error("invalid certificate: {0}")]
    Certificate(String),
    /// A certificate signing request that cannot be read or whose signature fails.
    #[error("invalid certificate signing request: {0}")]
    Csr(String),
    /// A private key that cannot be read or is not ECDSA P-256.
    #[error("invalid private key: {0}")]
    Key(&'static str),
    /// The private key does not belong to the certificate.
    #[error("the private key does not match the certificate")]
    KeyMismatch,
    /// A validity period that cannot be expressed (negative or past year 9999).
    #[error("validity period out of range")]
    Validity,
    /// The system random number generator failed.
    #[error("the system random number generator failed")]
    Random,
    /// Building or signing a certificate failed.
    #[error("certificate generation failed: {0}")]
    Generate(#[from] rcgen::Error),
    /// A TLS configuration could not be built.
    #[error("TLS configuration: {0}")]
    Config(String),
    /// The TCP connection or the TLS handshake failed.
    #[error("connecting to {address}: {source}")]
    Connect {
        /// The address dialled.
        address: String,
        /// What went wrong.
        source: std::io::Error,
    },
    /// The operation did not finish in time.
    #[error("timed out after {0:?}")]
    Timeout(Duration),
    /// No certificate in the cell's chain (besides its leaf) has the expected pin.
    #[error("no certificate presented by the cell matches pin {0}")]
    PinMismatch(String),
    /// The cell's leaf certificate does not verify against the pinned authority.
    #[error("the cell certificate does not verify against the pinned authority: {0}")]
    Untrusted(rustls::Error),
}

/// The deployment's certificate authority (ECDSA P-256). Debug redacts the key.
pub struct Authority {
    cert_pem: String,
    cert_der: CertificateDer<'static>,
    key_pem: String,
    pin: String,
    key: KeyPair,
    issuer: rcgen::Certificate,
}

impl fmt::Debug for Authority {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Authority")
            .field("pin", &self.pin)
            .field("key", &"<redacted>")
            .finish()
    }
}

impl Authority {
    /// A new CA: CN "fleetgrid node authority", valid from `now_ms` - 1 h for
    /// 10 years, a CA (path length 0) with key usages keyCertSign and cRLSign.
    pub fn generate(now_ms: i64) -> Result<Authority, PkiError> {
        let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256)?;
        let mut params = CertificateParams::default();
        params.distinguished_name = common_name(AUTHORITY_NAME);
        params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
        params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        params.serial_number = Some(random_serial()?);
        set_validity(
            &mut params,
            now_ms,
            Duration::from_secs(3600),
            AUTHORITY_LIFETIME,
        )?;
        let issuer = params.self_signed(&key)?;
        let cert_der = issuer.der().clone();
        Ok(Authority {
            cert_pem: issuer.pem(),
            pin: pin_of_der(&cert_der),
            cert_der,
            key_pem: key.serialize_pem(),
            key,
            issuer,
        })
    }

    /// Loads one stored by [`Authority::generate`]; checks that the certificate
    /// is a CA and that the key matches it.
    pub fn from_pem(cert_pem: &str, key_pem: &str) -> Result<Authority, PkiError> {
        let key = p256_key(key_pem)?;
        let cert_der = first_cert(cert_pem)?;
        let (_, cert) = X509Certificate::from_der(&cert_der).map_err(cert_err)?;
        if !cert.is_ca() {
            return Err(PkiError::Certificate("not a CA certificate".into()));
        }
        if cert.public_key().subject_public_key.data.as_ref() != key.public_key_raw() {
            return Err(PkiError::KeyMismatch);
        }
        // rcgen signs with the issuer's name, key identifier and key usages;
        // re-creating the certificate from the stored one keeps all three.
        let issuer = CertificateParams::from_ca_cert_der(&cert_der)?.self_signed(&key)?;
        Ok(Authority {
            cert_pem: cert_pem.to_owned(),
            pin: pin_of_der(&cert_der),
            cert_der,
            key_pem: key_pem.to_owned(),
            key,
            issuer,
        })
    }

    /// The authority certificate, PEM.
    pub fn cert_pem(&self) -> &str {
        &self.cert_pem
    }

    /// The authority private key, PKCS#8 PEM. Keep it secret.
    pub fn key_pem(&self) -> &str {
        &self.key_pem
    }

    /// `pin_of_pem(self.cert_pem())`.
    pub fn pin(&self) -> String {
        self.pin.clone()
    }

    /// Signs a node certificate for the public key of `csr_pem` (its signature
    /// must verify and its key be ECDSA P-256; its subject and extensions are
    /// ignored): subject CN = `node_id`, exactly one SAN, the URI
    /// [`NODE_URI_PREFIX`] + `node_id`, EKU clientAuth only, not a CA, a random
    /// 16-byte positive serial, valid from `now_ms` - 60 s to `now_ms` + `lifetime`.
    pub fn issue_node(
        &self,
        csr_pem: &str,
        node_id: &str,
        now_ms: i64,
        lifetime: Duration,
    ) -> Result<Issued, PkiError> {
        check_node_id(node_id)?;
        let public_key = csr_public_key(csr_pem)?;
        let params = leaf_params(
            node_id,
            node_uri(node_id)?,
            ExtendedKeyUsagePurpose::ClientAuth,
            now_ms,
            lifetime,
        )?;
        let cert = params.signed_by(&public_key, &self.issuer, &self.key)?;
        let seen = presented(cert.der())?;
        Ok(Issued {
            cert_pem: cert.pem(),
            serial: seen.serial,
            not_after_ms: seen.not_after_ms,
        })
    }

    /// A fresh key pair and server certificate for a cell: SAN DNS
    /// [`CELL_SERVER_NAME`], EKU serverAuth, random serial, valid from
    /// `now_ms` - 60 s to `now_ms` + `lifetime`.
    pub fn issue_cell(&self, now_ms: i64, lifetime: Duration) -> Result<CellIdentity, PkiError> {
        let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256)?;
        let san = SanType::DnsName(Ia5String::try_from(CELL_SERVER_NAME)?);
        let params = leaf_params(
            CELL_SERVER_NAME,
            san,
            ExtendedKeyUsagePurpose::ServerAuth,
            now_ms,
            lifetime,
        )?;
        let cert = params.signed_by(&key, &self.issuer, &self.key)?;
        Ok(CellIdentity {
            chain_pem: cert.pem() + &pem_encode("CERTIFICATE", &self.cert_der),
            key_pem: key.serialize_pem(),
        })
    }
}

/// A node certificate signed by [`Authority::issue_node`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Issued {
    /// The certificate, PEM.
    pub cert_pem: String,
    /// Its serial, lowercase hex: exactly what [`presented`] returns for it.
    pub serial: String,
    /// Its not-after, unix ms (whole seconds, as stored in the certificate).
    pub not_after_ms: i64,
}

/// A cell's TLS identity. Debug redacts the key.
#[derive(Clone)]
pub struct CellIdentity {
    /// The leaf certificate then the authority certificate, PEM.
    pub chain_pem: String,
    /// The leaf's private key, PKCS#8 PEM.
    pub key_pem: String,
}

impl fmt::Debug for CellIdentity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CellIdentity")
            .field("chain_pem", &self.chain_pem)
            .field("key_pem", &"<redacted>")
            .finish()
    }
}

/// A node's private key (ECDSA P-256), generated on the vehicle. Debug redacts it.
pub struct NodeKey {
    key: KeyPair,
    key_pem: String,
}

impl fmt::Debug for NodeKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("NodeKey")
            .field("key", &"<redacted>")
            .finish()
    }
}

impl NodeKey {
    /// A fresh ECDSA P-256 key.
    pub fn generate() -> Result<NodeKey, PkiError> {
        let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256)?;
        Ok(NodeKey {
            key_pem: key.serialize_pem(),
            key,
        })
    }

    /// Loads a key stored from [`NodeKey::key_pem`] (PKCS#8 PEM, ECDSA P-256).
    pub fn from_pem(key_pem: &str) -> Result<NodeKey, PkiError> {
        Ok(NodeKey {
            key: p256_key(key_pem)?,
            key_pem: key_pem.to_owned(),
        })
    }

    /// The key, PKCS#8 PEM. Keep it secret.
    pub fn key_pem(&self) -> &str {
        &self.key_pem
    }

    /// A PKCS#10 request for `node_id` (CN = `node_id`, URI SAN
    /// [`NODE_URI_PREFIX`] + `node_id`), signed by this key.
    pub fn csr_pem(&self, node_id: &str) -> Result<String, PkiError> {
        check_node_id(node_id)?;
        let mut params = CertificateParams::default();
        params.distinguished_name = common_name(node_id);
        params.subject_alt_names = vec![node_uri(node_id)?];
        Ok(params.serialize_request(&self.key)?.pem()?)
    }
}

/// What a verified node certificate says.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Presented {
    /// The node id from the certificate's URI SAN.
    pub node_id: String,
    /// The serial, lowercase hex of its raw bytes.
    pub serial: String,
    /// The not-after, unix ms.
    pub not_after_ms: i64,
}

/// Reads a node's leaf certificate (DER; the TLS layer has already verified it
/// against the CA): the node id from its one URI SAN with [`NODE_URI_PREFIX`]
/// (error if none or more than one, or if the id is malformed), its serial
/// (lowercase hex of the raw serial bytes), its not-after in unix ms.
pub fn presented(cert_der: &[u8]) -> Result<Presented, PkiError> {
    let (_, cert) = X509Certificate::from_der(cert_der).map_err(cert_err)?;
    let san = cert.subject_alternative_name().map_err(cert_err)?;
    let mut ids = san
        .iter()
        .flat_map(|san| &san.value.general_names)
        .filter_map(|name| match name {
            GeneralName::URI(uri) => uri.strip_prefix(NODE_URI_PREFIX),
            _ => None,
        });
    let node_id = match (ids.next(), ids.next()) {
        (Some(id), None) => id,
        (None, _) => return Err(PkiError::Certificate("no node URI SAN".into())),
        (Some(_), Some(_)) => return Err(PkiError::Certificate("several node URI SANs".into())),
    };
    check_node_id(node_id)?;
    Ok(Presented {
        node_id: node_id.to_owned(),
        serial: hex(cert.raw_serial()),
        not_after_ms: cert.validity().not_after.timestamp().saturating_mul(1000),
    })
}

/// Same as [`presented`], from PEM (first certificate).
pub fn presented_pem(cert_pem: &str) -> Result<Presented, PkiError> {
    presented(&first_cert(cert_pem)?)
}

/// Lowercase hex of the SHA-256 of `bytes`.
pub fn sha256_hex(bytes: &[u8]) -> String {
    hex(ring::digest::digest(&ring::digest::SHA256, bytes).as_ref())
}

/// "sha256:" + lowercase hex of the SHA-256 of the certificate's DER (first
/// certificate of the PEM).
pub fn pin_of_pem(cert_pem: &str) -> Result<String, PkiError> {
    Ok(pin_of_der(&first_cert(cert_pem)?))
}

/// Learns the authority's certificate from a cell, trusting nothing but the pin.
///
/// Opens a TLS connection to `address` ("host:port") with a verifier that
/// accepts and records the presented chain (handshake signatures are still
/// checked, so the cell holds its leaf key), then finds the chain certificate
/// after the leaf whose pin equals `pin` and checks, with rustls'
/// `WebPkiServerVerifier` and that certificate as the only root, that the leaf
/// is valid for [`CELL_SERVER_NAME`] now. Returns that certificate's PEM.
/// The connection and handshake are bounded by `timeout`.
pub async fn fetch_authority(
    address: &str,
    pin: &str,
    timeout: Duration,
) -> Result<String, PkiError> {
    let provider = ring_provider();
    let recorder = Arc::new(Recorder {
        chain: Mutex::default(),
        algorithms: provider.signature_verification_algorithms,
    });
    let mut config = ClientConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .map_err(config_err)?
        .dangerous()
        .with_custom_certificate_verifier(recorder.clone())
        .with_no_client_auth();
    config.alpn_protocols = vec![b"h2".to_vec()];
    let name = ServerName::try_from(CELL_SERVER_NAME).map_err(config_err)?;
    let handshake = async {
        let tcp = TcpStream::connect(address).await?;
        TlsConnector::from(Arc::new(config))
            .connect(name.clone(), tcp)
            .await
    };
    let stream = tokio::time::timeout(timeout, handshake)
        .await
        .map_err(|_| PkiError::Timeout(timeout))?
        .map_err(|source| PkiError::Connect {
            address: address.to_owned(),
            source,
        })?;
    drop(stream);

    let chain = std::mem::take(
        &mut *recorder
            .chain
            .lock()
            .unwrap_or_else(PoisonError::into_inner),
    );
    let Some((leaf, rest)) = chain.split_first() else {
        return Err(PkiError::Certificate(
            "the cell presented no certificate".into(),
        ));
    };
    let anchor = rest
        .iter()
        .find(|cert| pin_of_der(cert).eq_ignore_ascii_case(pin.trim()))
        .ok_or_else(|| PkiError::PinMismatch(pin.to_owned()))?;
    let mut roots = RootCertStore::empty();
    roots.add(anchor.clone()).map_err(PkiError::Untrusted)?;
    WebPkiServerVerifier::builder_with_provider(Arc::new(roots), provider)
        .build()
        .map_err(config_err)?
        .verify_server_cert(leaf, rest, &name, &[], UnixTime::now())
        .map_err(PkiError::Untrusted)?;
    Ok(pem_encode("CERTIFICATE", anchor))
}

/// A rustls `ServerConfig` for a cell: the cell identity, client certificates
/// verified against the authority but optional (`WebPkiClientVerifier` with
/// `allow_unauthenticated`), ALPN "h2".
pub fn server_config(
    identity: &CellIdentity,
    authority_pem: &str,
) -> Result<Arc<ServerConfig>, PkiError> {
    let chain = certs(&identity.chain_pem)?;
    let key = PrivateKeyDer::from_pem_slice(identity.key_pem.as_bytes())
        .map_err(|_| PkiError::Key("cannot read the cell key PEM"))?;
    let mut roots = RootCertStore::empty();
    for cert in certs(authority_pem)? {
        roots.add(cert).map_err(cert_err)?;
    }
    let provider = ring_provider();
    let verifier = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider.clone())
        .allow_unauthenticated()
        .build()
        .map_err(config_err)?;
    let mut config = ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(config_err)?
        .with_client_cert_verifier(verifier)
        .with_single_cert(chain, key)
        .map_err(config_err)?;
    config.alpn_protocols = vec![b"h2".to_vec()];
    Ok(Arc::new(config))
}

/// Accepts any server chain, remembering it; still checks handshake signatures.
#[derive(Debug)]
struct Recorder {
    chain: Mutex<Vec<CertificateDer<'static>>>,
    algorithms: WebPkiSupportedAlgorithms,
}

impl ServerCertVerifier for Recorder {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let chain = std::iter::once(end_entity).chain(intermediates);
        *self.chain.lock().unwrap_or_else(PoisonError::into_inner) =
            chain.map(|cert| cert.clone().into_owned()).collect();
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(message, cert, dss, &self.algorithms)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.algorithms.supported_schemes()
    }
}

fn ring_provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

fn check_node_id(node_id: &str) -> Result<(), PkiError> {
    let allowed = |b: u8| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-');
    if (1..=128).contains(&node_id.len()) && node_id.bytes().all(allowed) {
        Ok(())
    } else {
        Err(PkiError::InvalidNodeId)
    }
}

fn node_uri(node_id: &str) -> Result<SanType, PkiError> {
    Ok(SanType::URI(Ia5String::try_from(format!(
        "{NODE_URI_PREFIX}{node_id}"
    ))?))
}

fn common_name(cn: &str) -> DistinguishedName {
    let mut name = DistinguishedName::new();
    name.push(DnType::CommonName, cn);
    name
}

fn p256_key(key_pem: &str) -> Result<KeyPair, PkiError> {
    let key = KeyPair::from_pem(key_pem).map_err(|_| PkiError::Key("cannot read the key PEM"))?;
    if *key.algorithm() != PKCS_ECDSA_P256_SHA256 {
        return Err(PkiError::Key("not an ECDSA P-256 key"));
    }
    Ok(key)
}

/// The verified public key of a CSR; everything else in it is ignored.
fn csr_public_key(csr_pem: &str) -> Result<SubjectPublicKeyInfo, PkiError> {
    let csr_err = |e: &dyn Display| PkiError::Csr(e.to_string());
    let der = CertificateSigningRequestDer::from_pem_slice(csr_pem.as_bytes())
        .map_err(|e| csr_err(&e))?;
    let (rest, csr) = X509CertificationRequest::from_der(der.as_ref()).map_err(|e| csr_err(&e))?;
    if !rest.is_empty() {
        return Err(PkiError::Csr("trailing data".into()));
    }
    csr.verify_signature()
        .map_err(|_| PkiError::Csr("its signature does not verify".into()))?;
    let key = SubjectPublicKeyInfo::from_der(csr.certification_request_info.subject_pki.raw)
        .map_err(|e| csr_err(&e))?;
    if *key.algorithm() != PKCS_ECDSA_P256_SHA256 {
        return Err(PkiError::Csr("the key is not ECDSA P-256".into()));
    }
    Ok(key)
}

fn leaf_params(
    cn: &str,
    san: SanType,
    usage: ExtendedKeyUsagePurpose,
    now_ms: i64,
    lifetime: Duration,
) -> Result<CertificateParams, PkiError> {
    let mut params = CertificateParams::default();
    params.distinguished_name = common_name(cn);
    params.subject_alt_names = vec![san];
    params.is_ca = IsCa::ExplicitNoCa;
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    params.extended_key_usages = vec![usage];
    params.use_authority_key_identifier_extension = true;
    params.serial_number = Some(random_serial()?);
    set_validity(&mut params, now_ms, Duration::from_secs(60), lifetime)?;
    Ok(params)
}

fn set_validity(
    params: &mut CertificateParams,
    now_ms: i64,
    back: Duration,
    lifetime: Duration,
) -> Result<(), PkiError> {
    let ms = |d: Duration| i64::try_from(d.as_millis()).map_err(|_| PkiError::Validity);
    let from = now_ms.checked_sub(ms(back)?).ok_or(PkiError::Validity)?;
    let to = now_ms
        .checked_add(ms(lifetime)?)
        .ok_or(PkiError::Validity)?;
    let epoch = rcgen::date_time_ymd(1970, 1, 1);
    let at = |t: i64| match u64::try_from(t) {
        Ok(t) if t <= MAX_MS => Ok(epoch + Duration::from_millis(t)),
        _ => Err(PkiError::Validity),
    };
    params.not_before = at(from)?;
    params.not_after = at(to)?;
    Ok(())
}

fn random_serial() -> Result<SerialNumber, PkiError> {
    let mut bytes = [0u8; 16];
    SystemRandom::new()
        .fill(&mut bytes)
        .map_err(|_| PkiError::Random)?;
    // Positive, and a leading 1 bit after the sign bit keeps DER at 16 bytes.
    bytes[0] = (bytes[0] & 0x7f) | 0x40;
    Ok(SerialNumber::from_slice(&bytes))
}

fn first_cert(pem: &str) -> Result<CertificateDer<'static>, PkiError> {
    CertificateDer::from_pem_slice(pem.as_bytes()).map_err(|e| cert_err(format!("PEM: {e}")))
}

fn certs(pem: &str) -> Result<Vec<CertificateDer<'static>>, PkiError> {
    let certs = CertificateDer::pem_slice_iter(pem.as_bytes())
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| cert_err(format!("PEM: {e}")))?;
    if certs.is_empty() {
        return Err(cert_err("no certificate in PEM"));
    }
    Ok(certs)
}

fn pin_of_der(der: &[u8]) -> String {
    format!("sha256:{}", sha256_hex(der))
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// PEM exactly as rcgen writes it: 64-column base64, LF line endings.
fn pem_encode(label: &str, der: &[u8]) -> String {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut b64 = Vec::with_capacity(der.len().div_ceil(3) * 4);
    for chunk in der.chunks(3) {
        let n = chunk
            .iter()
            .enumerate()
            .fold(0u32, |n, (i, &b)| n | u32::from(b) << (16 - 8 * i));
        for i in 0..4 {
            b64.push(match i <= chunk.len() {
                true => ALPHABET[(n >> (18 - 6 * i)) as usize & 63],
                false => b'=',
            });
        }
    }
    let mut out = format!("-----BEGIN {label}-----\n");
    for line in b64.chunks(64) {
        out.extend(line.iter().map(|&b| char::from(b)));
        out.push('\n');
    }
    out + &format!("-----END {label}-----\n")
}

fn cert_err(e: impl Display) -> PkiError {
    PkiError::Certificate(e.to_string())
}

fn config_err(e: impl Display) -> PkiError {
    PkiError::Config(e.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pem_encoding_matches_rcgen() {
        for len in [0usize, 1, 2, 3, 47, 48, 49, 100] {
            let der: Vec<u8> = (0..len).map(|i| (i * 37 + 11) as u8).collect();
            let ours = pem_encode("CERTIFICATE", &der);
            let back = CertificateDer::from_pem_slice(ours.as_bytes());
            if len > 0 {
                assert_eq!(back.unwrap().as_ref(), der.as_slice());
            }
        }
        let ca = Authority::generate(1_700_000_000_000).unwrap();
        assert_eq!(pem_encode("CERTIFICATE", &ca.cert_der), ca.cert_pem());
    }

    #[test]
    fn node_ids() {
        for ok in ["a", "veh-01.eu_west", &"x".repeat(128)] {
            assert!(check_node_id(ok).is_ok(), "{ok}");
        }
        for bad in ["", "a b", "a/b", "ü", "a:b", &"x".repeat(129)] {
            assert!(check_node_id(bad).is_err(), "{bad}");
        }
    }

    fn csr_der(key: &NodeKey, node_id: &str) -> Vec<u8> {
        CertificateSigningRequestDer::from_pem_slice(key.csr_pem(node_id).unwrap().as_bytes())
            .unwrap()
            .as_ref()
            .to_vec()
    }

    fn replace(haystack: &mut [u8], needle: &[u8], with: &[u8]) {
        let at = haystack
            .windows(needle.len())
            .position(|w| w == needle)
            .unwrap();
        haystack[at..at + with.len()].copy_from_slice(with);
    }

    #[test]
    fn tampered_csrs_are_refused() {
        let ca = Authority::generate(1_700_000_000_000).unwrap();
        let (a, b) = (NodeKey::generate().unwrap(), NodeKey::generate().unwrap());
        let issue = |der: &[u8]| {
            ca.issue_node(
                &pem_encode("CERTIFICATE REQUEST", der),
                "n1",
                1_700_000_000_000,
                Duration::from_secs(60),
            )
        };
        let original = csr_der(&a, "n1");
        issue(&original).unwrap();

        // Signed by a, but carrying b's public key.
        let mut swapped = original.clone();
        replace(&mut swapped, a.key.public_key_raw(), b.key.public_key_raw());
        assert!(matches!(issue(&swapped), Err(PkiError::Csr(_))));

        // The signed subject changed after signing.
        let mut renamed = original.clone();
        replace(&mut renamed, b"n1", b"n2");
        assert!(matches!(issue(&renamed), Err(PkiError::Csr(_))));

        // A signature bit flipped.
        let mut flipped = original;
        let last = flipped.len() - 1;
        flipped[last] ^= 1;
        assert!(matches!(issue(&flipped), Err(PkiError::Csr(_))));
    }

    #[test]
    fn certificate_contents() {
        let now = 1_700_000_000_000;
        let ca = Authority::generate(now).unwrap();
        let (_, cert) = X509Certificate::from_der(&ca.cert_der).unwrap();
        assert!(cert.is_ca());
        assert_eq!(cert.subject().to_string(), "CN=fleetgrid node authority");
        let usage = cert.key_usage().unwrap().unwrap().value;
        assert!(usage.key_cert_sign() && usage.crl_sign() && !usage.digital_signature());
        assert_eq!(
            cert.validity().not_before.timestamp() * 1000,
            now - 3_600_000
        );
        assert_eq!(
            cert.validity().not_after.timestamp() * 1000,
            now + AUTHORITY_LIFETIME.as_millis() as i64
        );

        let key = NodeKey::generate().unwrap();
        let csr = key.csr_pem("n1").unwrap();
        let issued = ca
            .issue_node(&csr, "n1", now, Duration::from_secs(3600))
            .unwrap();
        let der = first_cert(&issued.cert_pem).unwrap();
        let (_, cert) = X509Certificate::from_der(&der).unwrap();
        assert!(!cert.is_ca());
        assert_eq!(cert.subject().to_string(), "CN=n1");
        assert_eq!(cert.issuer().to_string(), "CN=fleetgrid node authority");
        let sans = &cert
            .subject_alternative_name()
            .unwrap()
            .unwrap()
            .value
            .general_names;
        assert_eq!(sans, &[GeneralName::URI("urn:fleetgrid:node:n1")]);
        let eku = cert.extended_key_usage().unwrap().unwrap().value;
        assert!(eku.client_auth && !eku.server_auth && !eku.any && eku.other.is_empty());
        assert_eq!(cert.validity().not_before.timestamp() * 1000, now - 60_000);
        assert_eq!(issued.not_after_ms, now + 3_600_000);
        assert_eq!(cert.raw_serial().len(), 16);

        let cell = ca.issue_cell(now, Duration::from_secs(3600)).unwrap();
        let chain = certs(&cell.chain_pem).unwrap();
        assert_eq!(chain.len(), 2);
        assert_eq!(chain[1], ca.cert_der);
        let (_, cert) = X509Certificate::from_der(&chain[0]).unwrap();
        assert!(!cert.is_ca());
        let sans = &cert
            .subject_alternative_name()
            .unwrap()
            .unwrap()
            .value
            .general_names;
        assert_eq!(sans, &[GeneralName::DNSName(CELL_SERVER_NAME)]);
        let eku = cert.extended_key_usage().unwrap().unwrap().value;
        assert!(eku.server_auth && !eku.client_auth);
    }

    #[test]
    fn validity_bounds() {
        let ca = Authority::generate(1_700_000_000_000).unwrap();
        assert!(matches!(
            ca.issue_cell(0, Duration::from_secs(1)),
            Err(PkiError::Validity)
        ));
        assert!(matches!(
            ca.issue_cell(1_700_000_000_000, Duration::from_secs(u64::MAX)),
            Err(PkiError::Validity)
        ));
    }
}
