//! Crash safety of billing: load through the real gateway (SmolLM2 on real
//! agents), the coordinator SIGKILLed at random moments and restarted on the
//! same data directory, again and again. Afterwards every request that
//! returned success to its client has exactly one charge, of exactly its
//! tokens, and exactly one revenue-share credit per contributing node, to
//! that node's owner; every settled request is whole; `ledger verify` passes.

mod common;

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::{Stack, StackOptions, MODEL, PLUGGED_IN_TRACE};
use ledger::core::{RequestId, TransferKind};
use serde_json::{json, Value};

/// Coordinator kills; the issue asks for at least 20.
const ROUNDS: usize = 20;
/// Clients sending requests at once.
const CLIENTS: usize = 3;
/// Micro-dollars per prompt and per completion token for spot tenants.
const PROMPT_MICRO: u64 = 2;
const COMPLETION_MICRO: u64 = 4;

fn prices() -> String {
    json!({
        "owner_share_bps": 7000,
        "fleet": { MODEL: {
            "fleet": {"prompt": "5.00", "completion": "10.00"},
            "reserved": {"prompt": "3.00", "completion": "6.00"},
            "spot": {"prompt": "2.00", "completion": "4.00"}
        }},
        "payout_per_unit": {"cash": "0.01"},
        "power": {"watts_idle": 15, "watts_busy": 60},
        "tariff": {"per_kwh": "0.30"}
    })
    .to_string()
}

/// A small deterministic generator, so a failing run can be replayed from
/// the seed it prints.
struct Lcg(u64);

impl Lcg {
    fn next_below(&mut self, bound: u64) -> u64 {
        self.0 = self
            .0
            .wrapping_mul(6_364_136_223_846_793_005)
            .wrapping_add(1_442_695_040_888_963_407);
        (self.0 >> 33) % bound
    }
}

/// A request the client saw succeed: id, prompt and completion tokens.
type Success = (String, u64, u64);

async fn one_request(
    client: &reqwest::Client,
    url: &str,
    key: &str,
    stream: bool,
) -> Option<Success> {
    let body = json!({
        "model": MODEL,
        "messages": [{"role": "user", "content": "Say hi."}],
        "max_tokens": 6,
        "stream": stream,
        "stream_options": {"include_usage": true},
    });
    let response = client
        .post(url)
        .bearer_auth(key)
        .json(&body)
        .send()
        .await
        .ok()?;
    if response.status() != 200 {
        return None;
    }
    let text = response.text().await.ok()?;
    let (id, usage) = if stream {
        let streamed = common::parse_sse(&text);
        if !streamed.done || !streamed.errors.is_empty() || streamed.finish_reason.is_none() {
            return None;
        }
        let first = text.lines().find_map(|line| line.strip_prefix("data: "))?;
        let first: Value = serde_json::from_str(first).ok()?;
        (first["id"].as_str()?.to_string(), streamed.usage?)
    } else {
        let body: Value = serde_json::from_str(&text).ok()?;
        (body["id"].as_str()?.to_string(), body["usage"].clone())
    };
    Some((
        id,
        usage["prompt_tokens"].as_u64()?,
        usage["completion_tokens"].as_u64()?,
    ))
}

#[tokio::test(flavor = "multi_thread")]
async fn sigkilled_coordinators_leave_every_success_charged_once_and_the_ledger_whole() {
    let prices_dir = tempfile::tempdir().expect("tempdir");
    let prices_path = prices_dir.path().join("prices.json");
    std::fs::write(&prices_path, prices()).expect("prices");
    let options = StackOptions {
        extra_serve_args: vec!["--prices".into(), prices_path.display().to_string()],
    };
    let mut stack = Stack::start(options.clone());
    let owners = BTreeMap::from([("car-1", "alice"), ("car-2", "bob")]);
    for (node, owner) in &owners {
        stack.cli(&["owners", "create", *owner]);
        let credential = stack.cli(&["nodes", "add", *node, "--owner", *owner]);
        let trace = stack.dir.path().join(format!("{node}.json"));
        std::fs::write(&trace, PLUGGED_IN_TRACE).expect("trace");
        stack.spawn_agent(node, &credential, &format!("sim:{}", trace.display()), 2);
    }
    let key = stack.cli(&["tenants", "create", "crash", "--class", "spot"]);
    stack.cli(&[
        "billing",
        "topup",
        "--tenant",
        "crash",
        "--amount",
        "50",
        "--reference",
        "c1",
    ]);

    let seed = coordinator::core::now_ms().0.unsigned_abs();
    println!("crash test seed {seed}");
    let mut rng = Lcg(seed);
    let successes: Arc<Mutex<Vec<Success>>> = Arc::default();
    let client = reqwest::Client::builder()
        .timeout(Duration::from_secs(60))
        .build()
        .expect("client");
    let url = stack.url("/v1/chat/completions");
    for round in 0..ROUNDS {
        stack.wait_for_nodes(&["car-1", "car-2"]).await;
        let stop = Arc::new(AtomicBool::new(false));
        let mut clients = Vec::new();
        for index in 0..CLIENTS {
            let (client, url, key) = (client.clone(), url.clone(), key.clone());
            let (stop, successes) = (Arc::clone(&stop), Arc::clone(&successes));
            clients.push(tokio::spawn(async move {
                let mut stream = index % 2 == 0;
                while !stop.load(Ordering::Relaxed) {
                    if let Some(success) = one_request(&client, &url, &key, stream).await {
                        successes.lock().expect("lock").push(success);
                    }
                    stream = !stream;
                }
            }));
        }
        let kill_after = Duration::from_millis(150 + rng.next_below(1_350));
        tokio::time::sleep(kill_after).await;
        stack.restart_coordinator(&options);
        stop.store(true, Ordering::Relaxed);
        for client in clients {
            client.await.expect("client task");
        }
        println!("round {round}: killed after {kill_after:?}");
    }

    // The restarted coordinator passes verification with its own CLI.
    stack.cli(&["ledger", "verify"]);
    let ledger = ledger::store::Store::open_sqlite(&stack.dir.path().join("ledger.db"))
        .await
        .expect("open ledger");
    // The ledger keys accounts by ids; the coordinator's database has them.
    let mut owner_accounts = BTreeMap::new();
    for (node, owner) in &owners {
        owner_accounts.insert(*node, stack.owner_account(owner).await);
    }
    let successes = successes.lock().expect("lock").clone();
    assert!(
        successes.len() >= ROUNDS,
        "too few requests succeeded to prove anything: {}",
        successes.len()
    );
    for (id, prompt, completion) in &successes {
        let request = RequestId::new(id.as_str()).expect("request id");
        let transfers = ledger.request_transfers(&request).await.expect("transfers");
        let charges: Vec<_> = transfers
            .iter()
            .filter(|transfer| transfer.kind() == TransferKind::TokenCharge)
            .collect();
        assert_eq!(
            charges.len(),
            1,
            "{id} succeeded and has {} charges",
            charges.len()
        );
        assert_eq!(
            charges[0].amount().0 as u64,
            prompt * PROMPT_MICRO + completion * COMPLETION_MICRO,
            "{id} is charged its tokens exactly"
        );
        assert_eq!(charges[0].quantity(), prompt + completion);
        let usage = ledger.request_usage(&request).await.expect("usage");
        assert!(!usage.is_empty(), "{id} has no usage segments");
        for segment in &usage {
            let contributed = segment.segment.0 == 0 || segment.completion_tokens.0 > 0;
            let shares: Vec<_> = transfers
                .iter()
                .filter(|transfer| {
                    transfer.kind() == TransferKind::RevenueShare
                        && transfer.segment() == segment.segment
                })
                .collect();
            assert_eq!(
                shares.len(),
                usize::from(contributed),
                "{id} segment {}",
                segment.segment
            );
            if let (Some(share), ledger::metering::Server::Node { node, .. }) =
                (shares.first(), &segment.server)
            {
                assert_eq!(share.credit().to_string(), owner_accounts[node.as_str()]);
            }
        }
    }
    // Every request the ledger holds is whole: its summary and its charge
    // were committed together, never one without the other.
    let everything = ledger::statement::Period {
        from: ledger::core::TimestampMs(0),
        until: ledger::core::TimestampMs(i64::MAX),
    };
    let store = coordinator::store::Store::open(stack.dir.path())
        .await
        .expect("open the coordinator's database");
    let tenant = store
        .tenant_by_name("crash")
        .await
        .expect("tenant")
        .expect("tenant");
    let tenant = coordinator::billing::ledger_tenant(&tenant);
    let settled = ledger
        .tenant_requests(&tenant, everything)
        .await
        .expect("requests");
    for summary in &settled {
        let transfers = ledger
            .request_transfers(&summary.request_id)
            .await
            .expect("transfers");
        let charged: i64 = transfers
            .iter()
            .filter(|transfer| transfer.kind() == TransferKind::TokenCharge)
            .map(|transfer| transfer.amount().0)
            .sum();
        assert_eq!(
            charged, summary.charge.0,
            "{} is half-applied",
            summary.request_id
        );
    }
    println!(
        "{} successes over {ROUNDS} kills; {} requests settled",
        successes.len(),
        settled.len()
    );
    let report = ledger::store::verify(&ledger).await.expect("verify");
    assert!(report.is_ok(), "{:?}", report.problems);
}
