//! Agents over mTLS end to end: `fleetgrid serve` (mTLS by default), real agent
//! processes given only the token `nodes add` printed (with the cell's
//! `https://` URL), and a test client speaking the agents' own gRPC with the
//! certificates an agent keeps.
//!
//! - An agent makes its key, trades its one-time token for a certificate
//!   bound to its node id, and serves; the token does not work twice.
//! - A certificate opens a session for its own node only; a session without
//!   one, or in plain gRPC, gets nowhere.
//! - `nodes revoke` closes the live stream at once and the agent is refused
//!   from then on; a new token from `nodes rotate` brings it back.
//! - A certificate renewed while answers stream loses nothing: no session is
//!   lost, every answer is the uninterrupted one, and the renewed certificate
//!   is the one a restarted agent connects with.
//! - Neither the token nor a key appears in any log.

mod common;

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use common::{fleetgrid, long_reference_text, long_story, Stack, StackOptions, MODEL, WAIT};
use proto::agent_message::Kind as AgentKind;
use proto::coordinator_message::Kind as CoordinatorKind;
use stack::{AgentSpec, LogFile, Process};
use tonic::transport::{Certificate, ClientTlsConfig, Endpoint, Identity};

/// Node certificates live this long here, so that an agent renews its own
/// after 20 s, while the test streams answers.
const CERTIFICATE_LIFETIME_S: u64 = 30;

fn tls_stack() -> Stack {
    Stack::start(StackOptions {
        extra_serve_args: vec![
            "--node-certificate-lifetime-s".into(),
            CERTIFICATE_LIFETIME_S.to_string(),
        ],
    })
}

/// An enrolment for a node of `stack`: the token `nodes add` (or `nodes
/// rotate`) printed with the cell's URL put in, as a cluster's cells are.
struct Enrolled {
    token: String,
    credential: String,
    pin: String,
}

fn enrol(stack: &Stack, command: &str, name: &str) -> Enrolled {
    let printed = stack.cli(&["nodes", command, name]);
    let (credential, pin) = printed
        .rsplit_once('#')
        .unwrap_or_else(|| panic!("a token with the authority's pin: {printed}"));
    assert!(pin.starts_with("sha256:"), "{printed}");
    Enrolled {
        token: format!("{credential}@https://{}#{pin}", stack.grpc),
        credential: credential.to_owned(),
        pin: pin.to_owned(),
    }
}

fn start_agent(stack: &Stack, name: &str, token: &str, log: &str) -> Process {
    let trace = stack.dir.path().join(format!("{name}.json"));
    std::fs::write(&trace, stack::ALWAYS_PLUGGED_IN_TRACE).expect("write trace");
    let spec = AgentSpec {
        node_id: name.to_owned(),
        credential: token.to_owned(),
        vehicle_state: format!("sim:{}", trace.display()),
        model: MODEL.to_owned(),
        parallel: 2,
        threads: 1,
        args: Vec::new(),
        log: LogFile::create(stack.dir.path().join(format!("{log}.log"))),
    };
    fleetgrid()
        .enrolled_agent(&spec)
        .unwrap_or_else(|error| panic!("{error}"))
}

/// Where a stack's agent keeps its identity (`fleetgrid agent
/// --identity-dir`): beside its log.
fn identity_dir(stack: &Stack, node: &str) -> PathBuf {
    stack.dir.path().join("identity").join(node)
}

async fn store_of(stack: &Stack) -> store::Store {
    store::Store::open(stack.dir.path())
        .await
        .expect("open the store")
}

/// A channel to the stack's cell over TLS, presenting `identity` (a kept
/// node identity directory) when given.
async fn channel(
    stack: &Stack,
    authority_pem: &str,
    identity: Option<&Path>,
) -> tonic::transport::Channel {
    let mut tls = ClientTlsConfig::new()
        .ca_certificate(Certificate::from_pem(authority_pem))
        .domain_name(pki::CELL_SERVER_NAME);
    if let Some(dir) = identity {
        let read = |name: &str| std::fs::read_to_string(dir.join(name)).expect(name);
        tls = tls.identity(Identity::from_pem(read("node.crt"), read("node.key")));
    }
    Endpoint::from_shared(format!("https://{}", stack.grpc))
        .expect("endpoint")
        .tls_config(tls)
        .expect("tls")
        .connect()
        .await
        .expect("connect over TLS")
}

/// Opens a session on `channel` as `node` and returns the cell's first answer.
async fn hello(channel: tonic::transport::Channel, node: &str) -> proto::CoordinatorMessage {
    let hello = proto::AgentMessage {
        kind: Some(AgentKind::Hello(proto::Hello {
            protocol_version: proto::PROTOCOL_VERSION,
            node_id: node.to_owned(),
            credential: String::new(),
            hardware: Some(proto::Hardware::default()),
            models: Vec::new(),
            state: Some(proto::VehicleState::default()),
        })),
    };
    let (sender, receiver) = tokio::sync::mpsc::channel(1);
    sender.send(hello).await.expect("queue hello");
    let mut inbound = proto::coordinator_client::CoordinatorClient::new(channel)
        .session(tokio_stream::wrappers::ReceiverStream::new(receiver))
        .await
        .expect("open a session")
        .into_inner();
    let first = inbound
        .message()
        .await
        .expect("an answer")
        .expect("a message");
    drop(sender);
    first
}

fn refusal_of(message: proto::CoordinatorMessage) -> proto::Refusal {
    match message.kind {
        Some(CoordinatorKind::Refusal(refusal)) => refusal,
        other => panic!("expected a refusal, got {other:?}"),
    }
}

/// The kept identity's files, read: (certificate, key).
fn kept(dir: &Path) -> (String, String) {
    let read = |name: &str| std::fs::read_to_string(dir.join(name)).expect(name);
    (read("node.crt"), read("node.key"))
}

/// No log of the stack holds the token's secret or a private key.
fn assert_no_secret_in_logs(stack: &Stack, secrets: &[&str]) {
    for entry in std::fs::read_dir(stack.dir.path()).expect("read dir") {
        let path = entry.expect("entry").path();
        if path.extension().is_some_and(|extension| extension == "log") {
            let log = std::fs::read_to_string(&path).expect("read log");
            assert!(!log.contains("PRIVATE KEY"), "a key in {}", path.display());
            for secret in secrets {
                assert!(!log.contains(secret), "a secret in {}", path.display());
            }
        }
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_certificate_is_bound_to_its_node_and_revoking_it_closes_the_stream() {
    let mut stack = tls_stack();
    let car1 = enrol(&stack, "add", "car-1");
    let car2 = enrol(&stack, "add", "car-2");
    assert_eq!(car1.pin, car2.pin, "one authority per deployment");
    let agent = start_agent(&stack, "car-1", &car1.token, "car-1");
    stack.wait_for_nodes(&["car-1"]).await;
    let answer = stack.chat(&common::colour_chat(8)).await;
    assert!(
        answer["usage"]["completion_tokens"].as_u64().unwrap_or(0) > 0,
        "{answer}"
    );

    let store = store_of(&stack).await;
    let certificates = store
        .node_certificates("car-1")
        .await
        .expect("certificates");
    assert_eq!(certificates.len(), 1, "{certificates:?}");
    let (authority_pem, _) = store
        .node_authority()
        .await
        .expect("authority")
        .expect("made by nodes add");
    assert_eq!(pki::pin_of_pem(&authority_pem).expect("pin"), car1.pin);

    // The token was spent on car-1's certificate.
    let spent =
        proto::enrolment_client::EnrolmentClient::new(channel(&stack, &authority_pem, None).await)
            .enrol(proto::EnrolRequest {
                node_id: "car-1".into(),
                token: car1.credential.clone(),
                csr_pem: pki::NodeKey::generate()
                    .expect("key")
                    .csr_pem("car-1")
                    .expect("csr"),
            })
            .await
            .expect_err("a spent token");
    assert_eq!(spent.code(), tonic::Code::Unauthenticated, "{spent:?}");

    // car-1's certificate, as its agent keeps it, opens nothing for car-2;
    // no certificate, or no TLS, opens nothing at all.
    let car1_identity = identity_dir(&stack, "car-1");
    let refusal = refusal_of(
        hello(
            channel(&stack, &authority_pem, Some(&car1_identity)).await,
            "car-2",
        )
        .await,
    );
    assert_eq!(refusal.code(), proto::RefusalCode::BadCredential);
    assert!(refusal.reason.contains("car-1"), "{}", refusal.reason);
    let refusal = refusal_of(hello(channel(&stack, &authority_pem, None).await, "car-1").await);
    assert_eq!(refusal.code(), proto::RefusalCode::BadCredential);
    let plain = Endpoint::from_shared(format!("http://{}", stack.grpc))
        .expect("endpoint")
        .connect()
        .await;
    if let Ok(plain) = plain {
        let opened = proto::coordinator_client::CoordinatorClient::new(plain)
            .session(tokio_stream::iter(Vec::<proto::AgentMessage>::new()))
            .await;
        assert!(opened.is_err(), "plain gRPC reached a TLS cell");
    }

    // Revoked: the live stream closes at once, the agent is refused for good.
    let revoked_at = Instant::now();
    stack.cli(&["nodes", "revoke", "car-1"]);
    stack.wait_for_nodes(&[]).await;
    let closed_after = revoked_at.elapsed();
    assert_eq!(
        stack
            .metric("fleetgrid_node_sessions_closed_by_certificate_total")
            .await,
        1.0
    );
    println!(
        "the revoked node's stream closed {} ms after `nodes revoke` returned",
        closed_after.as_millis()
    );
    // The cell reads revocations every 250 ms; the rest is the probe's own round trips.
    assert!(
        closed_after < Duration::from_secs(3),
        "closed after {closed_after:?}"
    );
    let exit = tokio::time::timeout(WAIT, agent.exited())
        .await
        .expect("the refused agent stops");
    assert!(!exit.success(), "{exit:?}");
    let certificates = store
        .node_certificates("car-1")
        .await
        .expect("certificates");
    assert!(
        certificates.iter().all(|c| c.revoked_ms.is_some()),
        "{certificates:?}"
    );

    // A new token enrols the vehicle afresh, with a new key.
    let (old_certificate, old_key) = kept(&car1_identity);
    let again = enrol(&stack, "rotate", "car-1");
    stack
        .agents
        .push(start_agent(&stack, "car-1", &again.token, "car-1-again"));
    stack.wait_for_nodes(&["car-1"]).await;
    let (new_certificate, new_key) = kept(&car1_identity);
    assert_ne!(old_certificate, new_certificate);
    assert_ne!(old_key, new_key);

    assert_no_secret_in_logs(
        &stack,
        &[&car1.credential, &car2.credential, &again.credential],
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_certificate_renewed_while_answers_stream_loses_nothing() {
    let mut stack = tls_stack();
    let car = enrol(&stack, "add", "car-1");
    stack
        .agents
        .push(start_agent(&stack, "car-1", &car.token, "car-1"));
    stack.wait_for_nodes(&["car-1"]).await;
    let store = store_of(&stack).await;
    let first = store
        .node_certificates("car-1")
        .await
        .expect("certificates");
    assert_eq!(first.len(), 1);
    let old_expiry_ms = first[0].not_after_ms;

    // Greedy answers, one after another, across the renewal (two thirds of
    // the lifetime) and past the old certificate's expiry, which would close
    // a session still bound to it.
    let reference = long_reference_text(&stack.chat(&long_story(0.0)).await);
    let lost_before = stack.metric("fleetgrid_nodes_lost_total").await;
    let reassigned_before = stack.metric("fleetgrid_reassignments_total").await;
    let started = Instant::now();
    let mut answers = 0;
    loop {
        let streamed = stack.chat_stream(&long_story(0.0)).await;
        assert_eq!(streamed.content, reference, "answer {answers} differs");
        answers += 1;
        let now_ms = i64::try_from(
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .expect("clock")
                .as_millis(),
        )
        .expect("ms");
        if now_ms > old_expiry_ms + 1_000 {
            break;
        }
        assert!(
            started.elapsed() < WAIT,
            "the old certificate never expired"
        );
    }
    let certificates = store
        .node_certificates("car-1")
        .await
        .expect("certificates");
    // Renewed at least once (again after two thirds of the new lifetime, if
    // the answers ran that long): every certificate but the last rotated out.
    let (current, rotated) = certificates.split_last().expect("certificates");
    assert!(!rotated.is_empty(), "never renewed: {certificates:?}");
    assert!(
        rotated
            .iter()
            .all(|c| c.revoked_reason.as_deref() == Some(store::certificates::ROTATED)),
        "{certificates:?}"
    );
    assert!(current.revoked_ms.is_none());
    assert_eq!(
        stack.metric("fleetgrid_nodes_lost_total").await,
        lost_before
    );
    assert_eq!(
        stack
            .metric("fleetgrid_node_certificates_issued_total")
            .await,
        certificates.len() as f64,
        "an enrolment and the renewals"
    );
    assert_eq!(
        stack
            .metric("fleetgrid_node_sessions_closed_by_certificate_total")
            .await,
        0.0
    );
    assert_eq!(
        stack.metric("fleetgrid_reassignments_total").await,
        reassigned_before
    );
    println!("{answers} answers streamed across the renewal");

    // The renewed certificate is the one kept: a restarted agent connects
    // with it (the token is spent and the old certificate revoked).
    let identity = identity_dir(&stack, "car-1");
    let (kept_certificate, _) = kept(&identity);
    let kept_serial = pki::presented_pem(&kept_certificate).expect("kept").serial;
    assert_eq!(kept_serial, current.serial);
    stack.agents[0].kill();
    stack.wait_for_nodes(&[]).await;
    stack.agents[0] = start_agent(&stack, "car-1", &car.token, "car-1-restarted");
    stack.wait_for_nodes(&["car-1"]).await;
    let answer = stack.chat(&common::colour_chat(8)).await;
    assert!(
        answer["usage"]["completion_tokens"].as_u64().unwrap_or(0) > 0,
        "{answer}"
    );

    assert_no_secret_in_logs(&stack, &[&car.credential]);
}
