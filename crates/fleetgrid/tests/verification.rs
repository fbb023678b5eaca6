//! Untrusted vehicles end to end (issue 14): real agents on the real model
//! verify each other's answers; three vehicles cheat, and each is quarantined,
//! refused, and has its earnings clawed back on its owner's statement and in
//! the ledger, while the honest ones are never flagged.
//!
//! The cheats live here, not in the product: a cheating vehicle is a real
//! `fleetgrid agent` whose stream to the cell runs through a tampering proxy
//! in this test, which rewrites what it sends — random tokens in place of
//! its answer's, ten times the compute it used, or the tokens of the other
//! packaged model, which it runs while saying it runs the test model. The
//! proxy holds the vehicle's own certificate, enrolled with its token, and
//! speaks mTLS to the cell as the vehicle would: an owner controls the key
//! on their car. No build of the agent can cheat.

mod common;

use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use common::{billed_options, Stack, WAIT};
use futures::{Stream, StreamExt};
use proto::agent_message::Kind as AgentKind;
use serde_json::{json, Value};
use stack::{AgentSpec, LogFile};
use tonic::{Request, Response, Status, Streaming};

/// The other packaged model, which one cheater runs in place of the test model.
const OTHER_MODEL: &str = "qwen2.5-coder-0.5b-instruct";

/// Honest answers that must be verified, and pass, before the test ends.
const HONEST_VERIFIED_MIN: i64 = 200;

/// What a tampering proxy does to the agent's messages.
#[derive(Clone, Copy, Debug)]
enum Cheat {
    /// Every token of its answers replaced by another of the vocabulary.
    RandomTokens,
    /// Ten times the compute it used, and a minute more.
    InflatedCompute,
    /// The other packaged model (Qwen2.5-Coder-0.5B) runs on the vehicle,
    /// which says it serves the test model: its `Hello` names the test
    /// model, the assignments it gets are passed on for the model it runs,
    /// and its tokens go out without their text, which would give it away.
    OtherModel,
}

fn tamper(mut message: proto::AgentMessage, cheat: Cheat) -> proto::AgentMessage {
    match (&mut message.kind, cheat) {
        (Some(AgentKind::Tokens(batch)), Cheat::RandomTokens) => {
            for token in &mut batch.tokens {
                let mixed = u64::from(token.position) * 104_729 + token.token_id as u64 * 7_919;
                token.token_id = ((mixed + 13) % 49_152) as i32;
                // The text would give the forgery away before verification.
                token.piece.clear();
            }
        }
        (Some(AgentKind::Done(done)), Cheat::InflatedCompute) => {
            done.compute_ms = done.compute_ms * 10 + 60_000;
        }
        (Some(AgentKind::Hello(hello)), Cheat::OtherModel) => {
            let claimed = std::fs::metadata(common::model_path()).expect("the test model");
            for model in &mut hello.models {
                if model.sha256 == engine::testing::CLOUD_TEST_MODEL_SHA256 {
                    model.name = common::MODEL.to_owned();
                    model.sha256 = engine::testing::TEST_MODEL_SHA256.to_owned();
                    model.size_bytes = claimed.len();
                }
            }
        }
        (Some(AgentKind::Tokens(batch)), Cheat::OtherModel) => {
            for token in &mut batch.tokens {
                token.piece.clear();
            }
        }
        _ => {}
    }
    message
}

/// What the cell sends a cheating vehicle, as the vehicle's proxy passes it
/// on (`None`: not passed on). A vehicle running another model gets its
/// work for that model, and vouches for every answer it is asked to check
/// without looking (`vouch`), as it cannot check them.
fn pass_on(
    mut message: proto::CoordinatorMessage,
    cheat: Cheat,
    vouch: &tokio::sync::mpsc::UnboundedSender<proto::AgentMessage>,
) -> Option<proto::CoordinatorMessage> {
    if let (Some(proto::coordinator_message::Kind::Assign(assign)), Cheat::OtherModel) =
        (&mut message.kind, cheat)
    {
        if let Some(answer) = &assign.verify {
            let checked = answer.completion_tokens.len() as u32 - answer.given_tokens
                + u32::from(answer.ended_by_eos);
            let passed = proto::Verified {
                generation_id: assign.generation_id.clone(),
                checked,
                compute_ms: 50,
                ..Default::default()
            };
            let _ = vouch.send(proto::AgentMessage {
                kind: Some(AgentKind::Verified(passed)),
            });
            return None;
        }
        if assign.model_sha256 == engine::testing::TEST_MODEL_SHA256 {
            assign.model_sha256 = engine::testing::CLOUD_TEST_MODEL_SHA256.to_owned();
        }
    }
    Some(message)
}

/// A gRPC server that passes an agent's session through to the cell over
/// mTLS with the vehicle's certificate, tampering with what the agent sends.
struct TamperingProxy {
    /// The cell's `https://` URL.
    cell: String,
    tls: Arc<agent::tls::NodeTls>,
    cheat: Cheat,
}

type Outbound = Pin<Box<dyn Stream<Item = Result<proto::CoordinatorMessage, Status>> + Send>>;

#[tonic::async_trait]
impl proto::coordinator_server::Coordinator for TamperingProxy {
    type SessionStream = Outbound;

    async fn session(
        &self,
        request: Request<Streaming<proto::AgentMessage>>,
    ) -> Result<Response<Outbound>, Status> {
        let cheat = self.cheat;
        let (vouch, vouched) = tokio::sync::mpsc::unbounded_channel();
        // What the agent sends, tampered with, and what the proxy says for
        // it, until the agent's stream ends.
        let agent = request
            .into_inner()
            .take_while(|message| futures::future::ready(message.is_ok()))
            .filter_map(|message| futures::future::ready(message.ok()))
            .map(move |message| Some(tamper(message, cheat)))
            .chain(futures::stream::once(futures::future::ready(None)));
        let said = tokio_stream::wrappers::UnboundedReceiverStream::new(vouched).map(Some);
        let upstream = futures::stream::select(agent, said)
            .take_while(|message| futures::future::ready(message.is_some()))
            .filter_map(futures::future::ready);
        let unavailable = |error: tonic::transport::Error| Status::unavailable(error.to_string());
        let channel = tonic::transport::Endpoint::from_shared(self.cell.clone())
            .map_err(unavailable)?
            .tls_config(self.tls.client_config())
            .map_err(unavailable)?
            .connect()
            .await
            .map_err(unavailable)?;
        let mut client = proto::coordinator_client::CoordinatorClient::new(channel)
            .max_decoding_message_size(proto::MESSAGE_BYTES_MAX);
        let downstream = client
            .session(upstream)
            .await?
            .into_inner()
            .filter_map(move |message| {
                futures::future::ready(match message {
                    Ok(message) => pass_on(message, cheat, &vouch).map(Ok),
                    Err(status) => Some(Err(status)),
                })
            });
        Ok(Response::new(Box::pin(downstream)))
    }
}

/// Enrols `name` with `token` (what `nodes add` printed) as its cheating
/// owner would, and starts a tampering proxy in front of the stack's cell
/// with the certificate; returns where the vehicle's agent dials it.
async fn tampering_proxy(stack: &Stack, name: &str, token: &str, cheat: Cheat) -> SocketAddr {
    let enrolment = agent::Enrolment::parse(token).expect("a token");
    let pin = enrolment.authority_pin.expect("the authority's pin");
    let cell = stack.agent_url.clone();
    let tls = agent::tls::NodeTls::obtain(
        &stack.dir.path().join("proxy-identity").join(name),
        name,
        &enrolment.credential,
        &pin,
        std::slice::from_ref(&cell),
        &tokio_util::sync::CancellationToken::new(),
    )
    .await
    .expect("enrol the cheating vehicle")
    .expect("enrolled before any shutdown");
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind the proxy");
    let address = listener.local_addr().expect("proxy address");
    let service =
        proto::coordinator_server::CoordinatorServer::new(TamperingProxy { cell, tls, cheat })
            .max_decoding_message_size(proto::MESSAGE_BYTES_MAX)
            .max_encoding_message_size(proto::MESSAGE_BYTES_MAX);
    tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(service)
            .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener)),
    );
    address
}

/// Enrols `name` under its own owner and starts its agent: on the cell over
/// mTLS, or with `cheat` through a tampering proxy (on the owner's machine,
/// so the agent speaks plain gRPC to it); returns the owner's API key.
async fn vehicle(
    stack: &mut Stack,
    name: &str,
    cheat: Option<Cheat>,
    parallel: u32,
    threads: u32,
) -> String {
    let owner = format!("owner-of-{name}");
    let key = stack.cli(&["owners", "create", &owner]);
    let credential = stack.cli(&["nodes", "add", name, "--owner", &owner]);
    let dial = match cheat {
        None => stack.agent_url.clone(),
        Some(cheat) => format!(
            "http://{}",
            tampering_proxy(stack, name, &credential, cheat).await
        ),
    };
    let trace = stack.dir.path().join(format!("{name}.json"));
    std::fs::write(&trace, common::PLUGGED_IN_TRACE).expect("write trace");
    let spec = AgentSpec {
        node_id: name.to_owned(),
        credential,
        vehicle_state: format!("sim:{}", trace.display()),
        model: match cheat {
            Some(Cheat::OtherModel) => OTHER_MODEL.to_owned(),
            _ => common::MODEL.to_owned(),
        },
        parallel,
        threads,
        args: Vec::new(),
        log: LogFile::create(stack.dir.path().join(format!("{name}.log"))),
    };
    let agent = common::fleetgrid()
        .agent_at(&dial, &spec)
        .unwrap_or_else(|error| panic!("{error}"));
    stack.agents.push(agent);
    key
}

/// The vehicle's trust as its owner sees it.
async fn trust(stack: &Stack, owner_key: &str, name: &str) -> Value {
    let (status, body) = stack.get_as(owner_key, "/owner/v1/vehicles").await;
    assert_eq!(status, 200, "{body}");
    body["data"]
        .as_array()
        .expect("vehicles")
        .iter()
        .find(|vehicle| vehicle["id"] == name)
        .map(|vehicle| vehicle["trust"].clone())
        .unwrap_or_else(|| panic!("{name} not listed: {body}"))
}

/// A short answer drawn at temperature 0.8 with its own seed.
fn drawn_chat(seed: u64) -> Value {
    json!({
        "model": common::MODEL,
        "messages": [{"role": "user", "content": format!("Name a colour and a fruit, #{seed}.")}],
        "max_tokens": 12,
        "temperature": 0.8,
        "seed": seed,
    })
}

/// [`drawn_chat`], but one in three ends at a stop sequence where it writes
/// one, and one in three is structured by a JSON schema: both are verified
/// as any other answer.
fn varied_chat(seed: u64) -> Value {
    let mut body = drawn_chat(seed);
    match seed % 3 {
        1 => body["stop"] = json!([",", " and"]),
        2 => {
            body["max_tokens"] = json!(24);
            body["response_format"] = json!({
                "type": "json_schema",
                "json_schema": {"name": "pick", "schema": {
                    "type": "object",
                    "properties": {"colour": {"type": "string", "maxLength": 12}},
                    "required": ["colour"],
                    "additionalProperties": false,
                }},
            });
        }
        _ => {}
    }
    body
}

#[tokio::test(flavor = "multi_thread")]
async fn cheating_vehicles_are_quarantined_and_clawed_back_and_honest_ones_never_flagged() {
    // Every answer of an owned vehicle is verified: its probation never ends.
    let (options, _prices) = billed_options(&["--verification-probation", "1000000"]);
    let mut stack = Stack::start(options);
    stack.unlimited_credit("test-tenant");
    let mut owners = std::collections::BTreeMap::new();
    // Honest vehicles that differ in threads and parallel sequences.
    for (name, parallel, threads) in [("honest-a", 1, 1), ("honest-b", 4, 2), ("honest-c", 2, 1)] {
        owners.insert(
            name,
            vehicle(&mut stack, name, None, parallel, threads).await,
        );
    }
    for (name, cheat) in [
        ("cheat-random", Cheat::RandomTokens),
        ("cheat-compute", Cheat::InflatedCompute),
        ("cheat-model", Cheat::OtherModel),
    ] {
        owners.insert(name, vehicle(&mut stack, name, Some(cheat), 2, 1).await);
    }
    stack
        .wait_for_nodes(&[
            "cheat-compute",
            "cheat-model",
            "cheat-random",
            "honest-a",
            "honest-b",
            "honest-c",
        ])
        .await;
    let cheaters = ["cheat-random", "cheat-compute", "cheat-model"];

    // Rounds of answers, enough at once for every vehicle to serve some,
    // until every cheater is out. They are stored, and asked to be re-run
    // should they be clawed back.
    let deadline = tokio::time::Instant::now() + WAIT * 4;
    let mut seed = 0;
    let mut answered = 0;
    loop {
        let round: Vec<Value> = (0..10)
            .map(|_| {
                seed += 1;
                let mut body = drawn_chat(seed);
                body["store"] = json!(true);
                body["on_clawback"] = json!("rerun");
                body
            })
            .collect();
        let answers = futures::future::join_all(round.iter().map(|body| stack.chat(body))).await;
        answered += answers.len();
        let mut states = Vec::new();
        for cheater in cheaters {
            states.push(trust(&stack, &owners[cheater], cheater).await);
        }
        if states.iter().all(|state| state["state"] == "quarantined") {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "after {answered} answers: {cheaters:?} {states:?}; coordinator log:\n{}",
            stack.log("coordinator")
        );
    }

    let random_out = trust(&stack, &owners["cheat-random"], "cheat-random").await;
    let reason = random_out["reason"].as_str().expect("a reason");
    assert!(reason.contains("failed verification"), "{random_out}");
    let compute_out = trust(&stack, &owners["cheat-compute"], "cheat-compute").await;
    let reason = compute_out["reason"].as_str().expect("a reason");
    assert!(reason.contains("ms of compute"), "{compute_out}");
    // Caught by its tokens: outside the test model's vocabulary, or failing
    // verification.
    let model_out = trust(&stack, &owners["cheat-model"], "cheat-model").await;
    assert!(
        model_out["reason"]
            .as_str()
            .is_some_and(|reason| !reason.is_empty()),
        "{model_out}"
    );
    eprintln!("the other model's vehicle: {model_out}");

    // None serves again: later answers all come from honest vehicles.
    for _ in 0..6 {
        seed += 1;
        let answer = stack.chat(&drawn_chat(seed)).await;
        assert!(
            answer["choices"][0]["finish_reason"].is_string(),
            "{answer}"
        );
    }
    let nodes = stack::probe::connected_nodes(&stack.client(), stack.http, &stack.api_key).await;
    let nodes = nodes.expect("connected nodes");
    assert!(
        nodes.iter().all(|name| name.starts_with("honest-")),
        "{nodes:?}"
    );

    // The owners' statements show what was taken back, and why.
    for cheater in cheaters {
        let path = format!("/owner/v1/vehicles/{cheater}/statement");
        let statement = wait_for_lines(&stack, &owners[cheater], &path, "clawbacks").await;
        let clawbacks = statement["clawbacks"].as_array().expect("clawbacks");
        assert!(!clawbacks.is_empty(), "{statement}");
        assert!(
            clawbacks
                .iter()
                .all(|line| line["reason"].as_str().is_some_and(|r| !r.is_empty())),
            "{statement}"
        );
        let earned = statement["earnings_micro_usd"].as_i64().expect("earnings");
        let net = statement["net_earnings_micro_usd"].as_i64().expect("net");
        assert!(net < earned, "nothing taken back: {statement}");
    }
    // The vehicle that vouched for every answer it was asked to check, and
    // was paid for it as long as the answers were good, gives that pay back
    // with its own answers' earnings: it keeps nothing.
    let path = "/owner/v1/vehicles/cheat-model/statement";
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let (status, statement) = stack.get_as(&owners["cheat-model"], path).await;
        assert_eq!(status, 200, "{statement}");
        let net = statement["net_earnings_micro_usd"].as_i64().expect("net");
        if net <= 0 {
            eprintln!("the other model's vehicle's statement: {statement}");
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "it kept {net} µUSD: {statement}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    stack.cli(&["ledger", "verify"]);

    // Every stored answer that was clawed back is run again, and the new
    // answer replaces it under its first id.
    let reruns = wait_for_reruns(&stack, answered).await;
    eprintln!("stored answers clawed back and re-run: {reruns}");

    // The honest vehicles, with their different threads and parallel
    // sequences, serve on until 200 of their answers are verified, some
    // ended at stop sequences and some structured: every one passed.
    let deadline = tokio::time::Instant::now() + WAIT * 6;
    let verified = loop {
        let mut verified = 0;
        for honest in ["honest-a", "honest-b", "honest-c"] {
            let record = trust(&stack, &owners[honest], honest).await;
            assert_ne!(record["state"], "quarantined", "{honest}: {record}");
            assert_eq!(record["verified"], record["passed"], "{honest}: {record}");
            verified += record["verified"].as_i64().expect("a count");
        }
        if verified >= HONEST_VERIFIED_MIN {
            break verified;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "only {verified} honest answers verified"
        );
        let round: Vec<Value> = (0..9)
            .map(|_| {
                seed += 1;
                varied_chat(seed)
            })
            .collect();
        futures::future::join_all(round.iter().map(|body| stack.chat(body))).await;
    };
    eprintln!("honest answers verified, all passed: {verified}");
    let share = stack.metric("fleetgrid_verification_compute_share").await;
    assert!(share > 0.0 && share < 1.0, "verification share {share}");

    // The platform paid the honest vehicles' owners for their checks: each
    // shows on the vehicle's statement with the tokens it prefilled and
    // what it earned, part of the vehicle's earnings.
    let mut checks = 0;
    for honest in ["honest-a", "honest-b", "honest-c"] {
        let path = format!("/owner/v1/vehicles/{honest}/statement");
        let statement = wait_for_lines(&stack, &owners[honest], &path, "check_lines").await;
        let lines = statement["check_lines"].as_array().expect("check lines");
        for line in lines {
            assert!(
                line["check"]
                    .as_str()
                    .is_some_and(|name| name.starts_with("check:")),
                "{line}"
            );
            assert!(
                line["tokens"].as_u64().is_some_and(|tokens| tokens > 0),
                "{line}"
            );
            assert_ne!(line["total_usd"], "0.000000", "{line}");
        }
        assert_ne!(statement["verification_usd"], "0.000000", "{statement}");
        checks += lines.len();
    }
    eprintln!("checks paid to honest vehicles' owners: {checks}");
    stack.cli(&["ledger", "verify"]);
    eprintln!("answers before every cheater was out: {answered}");
}

/// The tenant's `expected` stored completions, once none shows a clawed-back
/// answer any more; returns how many were re-run. Each re-run names the
/// clawback's reason and has an answer of its own.
async fn wait_for_reruns(stack: &Stack, expected: usize) -> usize {
    let deadline = tokio::time::Instant::now() + WAIT * 2;
    loop {
        let mut kept = Vec::new();
        let mut after: Option<String> = None;
        loop {
            let path = match &after {
                Some(id) => format!("/v1/chat/completions?limit=100&after={id}"),
                None => "/v1/chat/completions?limit=100".to_owned(),
            };
            let (status, page) = stack.get_as(&stack.api_key, &path).await;
            assert_eq!(status, 200, "{page}");
            kept.extend(page["data"].as_array().expect("data").iter().cloned());
            if page["has_more"] != json!(true) {
                break;
            }
            after = page["last_id"].as_str().map(str::to_owned);
        }
        assert_eq!(
            kept.len(),
            expected,
            "every answer of the first rounds is stored"
        );
        let waiting = kept
            .iter()
            .filter(|completion| completion["fleetgrid"].get("clawed_back").is_some())
            .count();
        let rerun: Vec<&Value> = kept
            .iter()
            .filter(|completion| completion["fleetgrid"].get("rerun").is_some())
            .collect();
        if waiting == 0 && !rerun.is_empty() {
            for completion in &rerun {
                let record = &completion["fleetgrid"]["rerun"];
                assert!(
                    record["reason"]
                        .as_str()
                        .is_some_and(|reason| !reason.is_empty()),
                    "{completion}"
                );
                assert_ne!(record["request_id"], completion["id"], "{completion}");
                assert!(
                    completion["choices"][0]["message"]["content"].is_string(),
                    "{completion}"
                );
            }
            return rerun.len();
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "{waiting} clawed-back answers not re-run, {} re-run; coordinator log:\n{}",
            rerun.len(),
            stack.log("coordinator")
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

/// The statement at `path` once it lists something in `field` (the books
/// apply clawbacks and pay checks a pass at a time).
async fn wait_for_lines(stack: &Stack, owner_key: &str, path: &str, field: &str) -> Value {
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let (status, statement) = stack.get_as(owner_key, path).await;
        assert_eq!(status, 200, "{statement}");
        if statement[field]
            .as_array()
            .is_some_and(|lines| !lines.is_empty())
        {
            return statement;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "nothing in {field} on {path}: {statement}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}
