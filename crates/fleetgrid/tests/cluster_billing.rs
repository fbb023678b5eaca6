//! A cluster's money end to end: PostgreSQL stopped under running answers,
//! and four gateways admitting one tenant's requests at once. Real `fleetgrid
//! gateway` and `fleetgrid cell` processes, real agents serving the real
//! model, a real NATS cluster and PostgreSQL.
//!
//! Each test starts a private PostgreSQL server of Debian's binaries
//! (`stack::postgres`): a shared server must never be stopped, nor emptied
//! of connections by four gateways. Both need those binaries and Debian's
//! `nats-server` (`cargo xtask test` installs them); they fail, never skip,
//! without them.

mod common;

use std::sync::atomic::{AtomicBool, AtomicI64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::cluster::{
    prompt_tokens, spot_worst_case, Cluster, ClusterOptions, OpenStream, HEARTBEATS,
};
use common::{Gateway, Process, MODEL, WAIT};
use ledger::core::{AccountId, MicroUsd};
use serde_json::json;
use stack::postgres::PostgresServer;

/// How long the database stays away at least.
const OUTAGE: Duration = Duration::from_secs(10);

/// The longest a new request may wait for its 503 while the database is
/// away: the gateway bounds its database calls well below this.
const REFUSAL_WAIT_MAX: Duration = Duration::from_secs(5);

/// Tokens of each answer running when the database goes away.
const ANSWER_TOKENS: u32 = 48;

/// Retries of one request answered 503 (`Retry-After`) before the test
/// gives up on it.
const RETRIES_MAX: u32 = 30;

/// A story that runs to `max_tokens` (end-of-generation ignored).
fn story(max_tokens: u32) -> serde_json::Value {
    json!({
        "model": MODEL, "max_tokens": max_tokens, "temperature": 0.0, "ignore_eos": true,
        "messages": [{"role": "user", "content": "Tell a story about a train crossing a desert."}],
    })
}

/// Pauses (`STOP`) or resumes (`CONT`) an agent: a vehicle that goes slow.
fn signal(agent: &Process, signal: &str) {
    let status = std::process::Command::new("kill")
        .arg(format!("-{signal}"))
        .arg(agent.pid().to_string())
        .status()
        .expect("run kill");
    assert!(status.success(), "kill -{signal} {}", agent.name);
}

fn agent<'a>(cluster: &'a Cluster, name: &str) -> &'a Process {
    cluster
        .agents
        .iter()
        .find(|agent| agent.name == name)
        .expect("an agent of that name")
}

#[tokio::test(flavor = "multi_thread")]
async fn a_database_outage_refuses_new_requests_and_loses_no_settlement() {
    let mut postgres = PostgresServer::start(WAIT)
        .await
        .unwrap_or_else(|error| panic!("a private PostgreSQL server: {error}"));
    let mut options = ClusterOptions::new(postgres.url());
    options.cells = 1;
    options.test_prices = true;
    // Vehicles paused through the outage are neither lost nor stalled.
    let mut cell_args = vec![HEARTBEATS[0], HEARTBEATS[1]];
    cell_args.extend([
        "--heartbeat-timeout-ms",
        "60000",
        "--stall-floor-ms",
        "60000",
        "--stall-ceiling-ms",
        "60000",
    ]);
    options.cell_args = cell_args.into_iter().map(str::to_owned).collect();
    let mut cluster = Cluster::start(options).await;
    cluster.add_agent("car-a", &[0], 1);
    cluster.wait_for_nodes(&["car-a"]).await;
    let funded = MicroUsd(1_000_000);
    let key = cluster.funded_tenant("payer", "spot", funded);
    let payer = cluster.gateway_as(0, &key);

    // Two answers run, one on each vehicle: the first will end while the
    // database is away (its vehicle's owner never looked up before, so the
    // gateway cannot price it then), the second after it is back. Each vehicle is
    // paused as soon as its answer has begun, well short of its end.
    let mut ending_during = OpenStream::open(&payer, &story(ANSWER_TOKENS)).await;
    let begun = |read: &common::Streamed| !read.content.is_empty();
    assert!(ending_during.read_until(begun).await);
    signal(agent(&cluster, "car-a"), "STOP");
    cluster.add_agent("car-b", &[0], 1);
    cluster.wait_for_nodes(&["car-a", "car-b"]).await;
    let mut ending_after = OpenStream::open(&payer, &story(ANSWER_TOKENS)).await;
    assert!(ending_after.read_until(begun).await);
    signal(agent(&cluster, "car-b"), "STOP");

    postgres.stop().await;
    let stopped = Instant::now();
    signal(agent(&cluster, "car-a"), "CONT");
    // The database stays away until this answer has ended, 10 s at least.
    let ended_during = ending_during.finish().await.read();
    // Its text was sent; its end is withheld until the ledger records it.
    assert!(
        ended_during.finish_reason.is_none(),
        "a success before it was settled"
    );
    assert_eq!(
        ended_during
            .errors
            .first()
            .map(|error| &error["error"]["code"]),
        Some(&json!("billing_unavailable")),
        "{:?}",
        ended_during.errors
    );

    // New requests are refused at once, with Retry-After, while it is away.
    loop {
        let asked = Instant::now();
        let response = payer.post("/v1/chat/completions", &story(8)).await;
        let waited = asked.elapsed();
        let status = response.status();
        let retry_after = response.headers().contains_key("retry-after");
        let text = response.text().await.unwrap_or_default();
        assert_eq!(status, 503, "a new request during the outage: {text}");
        assert!(retry_after, "a 503 without Retry-After: {text}");
        assert!(waited < REFUSAL_WAIT_MAX, "a refusal took {waited:?}");
        if stopped.elapsed() >= OUTAGE {
            break;
        }
    }

    postgres
        .start_again(WAIT)
        .await
        .unwrap_or_else(|error| panic!("PostgreSQL starts again: {error}"));
    signal(agent(&cluster, "car-b"), "CONT");
    let ended_after = ending_after.finish().await.read();
    assert!(
        ended_after.errors.is_empty() && ended_after.done,
        "the answer running through the outage did not end well: {:?}",
        ended_after.errors
    );

    // Every answer is settled once: the one withheld during the outage too.
    let usage = std::cell::RefCell::new(serde_json::Value::Null);
    stack::probe::wait_until(&cluster.members(), "both answers settled", WAIT, || async {
        let (status, body) = payer.get_as(&key, "/v1/usage").await;
        let settled = status == 200 && body["requests"] == 2;
        *usage.borrow_mut() = body;
        settled
    })
    .await
    .unwrap_or_else(|error| panic!("{error}; usage: {}", usage.borrow()));
    let usage = usage.into_inner();
    assert_eq!(
        usage["completion_tokens"],
        2 * ANSWER_TOKENS,
        "usage: {usage}"
    );
    let charged = common::u64_of(&usage["charged_micro_usd"]);
    assert_eq!(
        cluster.balance("payer").0,
        funded.0 - i64::try_from(charged).expect("charge")
    );
    payer.chat(&story(8)).await;
    cluster.verify_ledger();
}

/// A chat completion's status and body, retried as an OpenAI client does
/// while it is answered 503 with `Retry-After` (billing busy or away).
async fn post_retrying(gateway: &Gateway, body: &serde_json::Value) -> (u16, serde_json::Value) {
    for _ in 0..RETRIES_MAX {
        let response = gateway.post("/v1/chat/completions", body).await;
        let status = response.status().as_u16();
        let retry_after = response
            .headers()
            .get("retry-after")
            .and_then(|value| value.to_str().ok()?.parse::<u64>().ok());
        let answer: serde_json::Value = response.json().await.unwrap_or_default();
        match (status, retry_after) {
            (503, Some(seconds)) => tokio::time::sleep(Duration::from_secs(seconds)).await,
            _ => return (status, answer),
        }
    }
    panic!("a request was answered 503 {RETRIES_MAX} times");
}

#[tokio::test(flavor = "multi_thread")]
async fn four_gateways_admit_no_more_than_the_balance_covers() {
    const GATEWAYS: usize = 4;
    const FITS: i64 = 50;
    const TRIES: usize = 200;
    const MAX_TOKENS: u32 = 4;
    // A server of its own: four gateways and a cell hold more connections
    // than a shared server may spare.
    let postgres = PostgresServer::start(WAIT)
        .await
        .unwrap_or_else(|error| panic!("a private PostgreSQL server: {error}"));
    let mut options = ClusterOptions::new(postgres.url());
    options.gateways = GATEWAYS;
    options.cells = 1;
    options.test_prices = true;
    let mut cluster = Cluster::start(options).await;
    cluster.add_agent("car-a", &[0], 4);
    cluster.add_agent("car-b", &[0], 4);
    cluster.wait_for_nodes(&["car-a", "car-b"]).await;

    // Every answer runs to its `max_tokens`, so each costs its worst case.
    let prompt = prompt_tokens(&cluster.gateway(0), &story(1)).await;
    let worst_case = spot_worst_case(prompt, MAX_TOKENS);
    let balance = MicroUsd(worst_case.0 * FITS);
    let key = cluster.funded_tenant("payer", "spot", balance);

    // The balance as the ledger holds it, watched throughout.
    let ledger = ledger::store::Store::connect_postgres(&postgres.url())
        .await
        .expect("open the ledger");
    let tenant = store::Store::connect(&postgres.url())
        .await
        .expect("open the store")
        .tenant_by_name("payer")
        .await
        .expect("read the tenant")
        .expect("the tenant");
    let account = AccountId::Tenant(coordinator::billing::ledger_tenant(&tenant));
    let lowest = Arc::new(AtomicI64::new(i64::MAX));
    let watching = Arc::new(AtomicBool::new(true));
    let watcher = {
        let (lowest, watching) = (Arc::clone(&lowest), Arc::clone(&watching));
        tokio::spawn(async move {
            while watching.load(Ordering::Relaxed) {
                let state = ledger.account(&account).await.expect("read the balance");
                let now = state.expect("the tenant's account").balance();
                lowest.fetch_min(now.0, Ordering::Relaxed);
            }
        })
    };

    let mut tries = tokio::task::JoinSet::new();
    for index in 0..TRIES {
        let gateway: Gateway = cluster.gateway_as(index % GATEWAYS, &key);
        tries.spawn(async move { post_retrying(&gateway, &story(MAX_TOKENS)).await });
    }
    let (mut answered, mut refused) = (0, 0);
    while let Some(joined) = tries.join_next().await {
        let (status, body) = joined.expect("a request task");
        match status {
            200 => {
                assert_eq!(body["usage"]["completion_tokens"], MAX_TOKENS);
                answered += 1;
            }
            402 => refused += 1,
            other => panic!("a request failed with {other}: {body}"),
        }
    }
    watching.store(false, Ordering::Relaxed);
    watcher.await.expect("the watcher");

    // Admission across the four gateways stays within the balance: it
    // covers 50 worst cases, so at most 50 answers are served, each charged
    // its worst case, and the rest refused. (Fewer may be served on a
    // loaded machine: an admission that timed out may leave its hold to
    // count until its lease ends, which errs on the side of refusing.)
    assert!(
        (1..=FITS).contains(&answered) && answered + refused == TRIES as i64,
        "{answered} answered, {refused} refused"
    );
    assert!(
        lowest.load(Ordering::Relaxed) >= 0,
        "the balance went negative"
    );
    let charged = MicroUsd(worst_case.0 * answered);
    assert_eq!(cluster.balance("payer"), MicroUsd(balance.0 - charged.0));
    let (_, usage) = cluster.gateway_as(1, &key).get_as(&key, "/v1/usage").await;
    assert_eq!(usage["requests"], answered, "usage: {usage}");
    assert_eq!(usage["charged_micro_usd"], charged.0, "usage: {usage}");
    if answered == FITS {
        let one_more = cluster
            .gateway_as(2, &key)
            .post("/v1/chat/completions", &story(MAX_TOKENS))
            .await;
        assert_eq!(one_more.status(), 402);
    }
    cluster.verify_ledger();
}
