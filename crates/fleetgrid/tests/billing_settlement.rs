//! End to end: what a request settles to in the ledger. A real coordinator,
//! real agents running SmolLM2, real HTTP: a request the client abandons
//! pays for what was made, the coordinator settles into PostgreSQL as into
//! SQLite, and a migrated generation pays the prompt once and each owner
//! for their own tokens. Admission, reports and replay are in `billing.rs`.
//!
//! Prices here are high enough ($2 to $10 per million tokens) that every
//! token is worth whole micro-dollars, so expected charges are exact.

mod billing_common;
mod common;

use std::time::Duration;

use billing_common::{ok_json, SPOT_COMPLETION_MICRO, SPOT_PROMPT_MICRO};
use common::{billed_options, colour_chat, u64_of, Stack};
use serde_json::{json, Value};

#[tokio::test(flavor = "multi_thread")]
async fn a_request_the_client_abandons_is_charged_for_what_was_made() {
    let (options, _prices) = billed_options(&[]);
    let mut stack = Stack::start(options);
    stack.add_agent("car-1", 2);
    stack.wait_for_nodes(&["car-1"]).await;
    let key = stack.cli(&["tenants", "create", "quitter", "--class", "spot"]);
    stack.cli(&[
        "billing",
        "topup",
        "--tenant",
        "quitter",
        "--amount",
        "0.01",
        "--reference",
        "q1",
    ]);
    let mut body = colour_chat(200);
    body["messages"] = json!([{"role": "user", "content": "Write a long story about a car."}]);
    body["stream"] = json!(true);
    let mut response = stack.post_as(&key, "/v1/chat/completions", &body).await;
    assert_eq!(response.status(), 200);
    // Read the first chunks, then hang up.
    let _ = response.chunk().await.expect("chunk");
    let _ = response.chunk().await.expect("chunk");
    drop(response);
    // The tokens made until the hang-up are charged (issue 11): poll the
    // usage until the cancelled request's settlement shows.
    let deadline = std::time::Instant::now() + common::WAIT;
    let usage = loop {
        let (_, usage) = stack.get_as(&key, "/v1/usage").await;
        if u64_of(&usage["requests"]) > 0 {
            break usage;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "never charged: {usage}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert_eq!(u64_of(&usage["requests"]), 1, "{usage}");
    let completion = u64_of(&usage["completion_tokens"]);
    assert!(completion < 200, "the generation was cut short: {usage}");
    let charged =
        u64_of(&usage["prompt_tokens"]) * SPOT_PROMPT_MICRO + completion * SPOT_COMPLETION_MICRO;
    assert_eq!(u64_of(&usage["charged_micro_usd"]), charged, "{usage}");
    let left = ledger::core::MicroUsd(10_000 - charged as i64).to_string();
    assert_eq!(usage["balance_usd"], left.as_str());
    // Its hold is gone too: the whole balance is available again.
    assert_eq!(usage["available_usd"], left.as_str());
    stack.cli(&["ledger", "verify"]);
}

#[tokio::test(flavor = "multi_thread")]
async fn the_coordinator_settles_into_postgresql() {
    // Needs PostgreSQL on 127.0.0.1:5432 (`cargo xtask test` starts it);
    // fails, never skips, when it is not there.
    let base = std::env::var("LEDGER_TEST_POSTGRES_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/test".to_owned());
    let schema = format!(
        "fleetgrid_e2e_{}_{}",
        std::process::id(),
        coordinator::core::now_ms().0
    );
    let mut admin = <sqlx::PgConnection as sqlx::Connection>::connect(&base)
        .await
        .unwrap_or_else(|error| panic!("this test needs PostgreSQL at {base}: {error}"));
    sqlx::query(&format!("CREATE SCHEMA {schema}"))
        .execute(&mut admin)
        .await
        .expect("create schema");
    let url = format!("{base}?options[search_path]={schema}");
    let (options, _prices) = billed_options(&["--ledger-url", &url]);
    let mut stack = Stack::start(options);
    stack.add_agent("car-1", 2);
    stack.wait_for_nodes(&["car-1"]).await;
    let key = stack.cli(&["tenants", "create", "pg-tenant", "--class", "spot"]);
    let ledger_args = ["--ledger-url", url.as_str()];
    let mut topup = vec![
        "billing",
        "topup",
        "--tenant",
        "pg-tenant",
        "--amount",
        "1",
        "--reference",
        "p1",
    ];
    topup.extend(ledger_args);
    stack.cli(&topup);
    let response = stack
        .post_as(&key, "/v1/chat/completions", &colour_chat(6))
        .await;
    let body = ok_json(response).await;
    let charged = u64_of(&body["usage"]["prompt_tokens"]) * SPOT_PROMPT_MICRO
        + u64_of(&body["usage"]["completion_tokens"]) * SPOT_COMPLETION_MICRO;

    // The charge is in PostgreSQL, committed before the response came back,
    // on the account keyed by the tenant's id.
    let store = coordinator::store::Store::open(stack.dir.path())
        .await
        .expect("open the coordinator's database");
    let tenant = store
        .tenant_by_name("pg-tenant")
        .await
        .expect("tenant")
        .expect("tenant");
    let account = ledger::core::AccountId::Tenant(coordinator::billing::ledger_tenant(&tenant));
    let (sum,): (i64,) = sqlx::query_as(&format!(
        "SELECT CAST(COALESCE(SUM(amount), 0) AS BIGINT) FROM {schema}.ledger_transfers \
         WHERE kind = 'token-charge' AND debit_account = $1"
    ))
    .bind(account.to_string())
    .fetch_one(&mut admin)
    .await
    .expect("sum charges");
    assert_eq!(sum as u64, charged);
    let (_, usage) = stack.get_as(&key, "/v1/usage").await;
    assert_eq!(u64_of(&usage["charged_micro_usd"]), charged);
    let mut verify = vec!["ledger", "verify"];
    verify.extend(ledger_args);
    stack.cli(&verify);
    assert!(!std::path::Path::new(&stack.dir.path().join("ledger.db")).exists());

    drop(stack);
    sqlx::query(&format!("DROP SCHEMA {schema} CASCADE"))
        .execute(&mut admin)
        .await
        .expect("drop schema");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_migrated_generation_charges_the_prompt_once_and_pays_each_owner_who_sees_only_their_own()
{
    use futures::StreamExt;
    let (options, _prices) = billed_options(&[]);
    let mut stack = Stack::start(options);
    let mut owner_keys = std::collections::BTreeMap::new();
    for (node, owner) in [("car-1", "alice"), ("car-2", "bob")] {
        owner_keys.insert(node, stack.cli(&["owners", "create", owner]));
        let credential = stack.cli(&["nodes", "add", node, "--owner", owner]);
        let trace = stack.dir.path().join(format!("{node}.json"));
        std::fs::write(&trace, common::PLUGGED_IN_TRACE).expect("trace");
        stack.spawn_agent(node, &credential, &format!("sim:{}", trace.display()), 2);
    }
    stack.wait_for_nodes(&["car-1", "car-2"]).await;
    let key = stack.cli(&["tenants", "create", "mover", "--class", "spot"]);
    stack.cli(&[
        "billing",
        "topup",
        "--tenant",
        "mover",
        "--amount",
        "1",
        "--reference",
        "m1",
    ]);
    let mut body = colour_chat(60);
    body["messages"] = json!([{"role": "user", "content": "Write a long story about a car."}]);
    body["stream"] = json!(true);
    body["stream_options"] = json!({"include_usage": true});
    body["seed"] = json!(7);
    let assigned_before = stack.assignment_counts().await;
    let response = stack.post_as(&key, "/v1/chat/completions", &body).await;
    assert_eq!(response.status(), 200);
    let mut bytes = response.bytes_stream();
    let mut raw = String::new();
    let mut killed = None;
    while let Some(chunk) = bytes.next().await {
        raw.push_str(&String::from_utf8_lossy(&chunk.expect("chunk")));
        if killed.is_none() && raw.matches("data: ").count() >= 6 {
            let node = stack.assigned_since(&assigned_before).await;
            let agent = stack
                .agents
                .iter_mut()
                .find(|agent| agent.name == node)
                .expect("agent");
            agent.kill();
            killed = Some(node);
        }
    }
    let streamed = common::parse_sse(&raw);
    assert!(streamed.done && streamed.errors.is_empty(), "{raw}");
    let usage = streamed.usage.expect("usage");
    let (prompt, completion) = (
        u64_of(&usage["prompt_tokens"]),
        u64_of(&usage["completion_tokens"]),
    );
    let id = raw
        .lines()
        .find_map(|line| line.strip_prefix("data: "))
        .and_then(|data| serde_json::from_str::<Value>(data).ok())
        .and_then(|chunk| chunk["id"].as_str().map(str::to_string))
        .expect("id");

    let ledger = ledger::store::Store::open_sqlite(&stack.dir.path().join("ledger.db"))
        .await
        .expect("ledger");
    let request = ledger::core::RequestId::new(id.as_str()).expect("id");
    let segments = ledger.request_usage(&request).await.expect("usage");
    assert_eq!(segments.len(), 2, "the generation ran on two nodes");
    // The second node prefilled the prompt and the tokens so far again.
    assert!(segments[1].prompt_tokens.0 > prompt);
    let produced: u64 = segments.iter().map(|s| s.completion_tokens.0).sum();
    assert_eq!(produced, completion);
    let transfers = ledger.request_transfers(&request).await.expect("transfers");
    let charge: Vec<_> = transfers
        .iter()
        .filter(|t| t.kind() == ledger::core::TransferKind::TokenCharge)
        .collect();
    assert_eq!(charge.len(), 1);
    // The prompt once, every token once: the re-prefill is not charged.
    assert_eq!(
        charge[0].amount().0 as u64,
        prompt * SPOT_PROMPT_MICRO + completion * SPOT_COMPLETION_MICRO
    );
    let mut owner_accounts = std::collections::BTreeMap::new();
    for (node, owner) in [("car-1", "alice"), ("car-2", "bob")] {
        owner_accounts.insert(node, stack.owner_account(owner).await);
    }
    let killed = killed.expect("a node was killed");
    let survivor = if killed == "car-1" { "car-2" } else { "car-1" };
    for (position, node) in [(0_u32, killed.as_str()), (1, survivor)] {
        let shares: Vec<_> = transfers
            .iter()
            .filter(|t| {
                t.kind() == ledger::core::TransferKind::RevenueShare && t.segment().0 == position
            })
            .collect();
        assert_eq!(shares.len(), 1, "segment {position}");
        assert_eq!(shares[0].credit().to_string(), owner_accounts[node]);
    }
    // Each vehicle's statement shows the request and what it earned.
    let today = ledger::invoice::month_containing(coordinator::core::now_ms());
    let period = ledger::invoice::month_period(&today).expect("month");
    let statement = ledger
        .statement(&ledger::core::NodeId::new(survivor).expect("node"), period)
        .await
        .expect("statement");
    assert_eq!(statement.totals.requests, 1);
    assert!(statement.totals.revenue_share.0 > 0);

    // Over the owner API each owner reads their own vehicle's statement,
    // the same figures as the ledger's; another owner's vehicle is a 404.
    let path = format!("/owner/v1/vehicles/{survivor}/statement");
    let (status, own) = stack.get_as(&owner_keys[survivor], &path).await;
    assert_eq!(status, 200, "{own}");
    assert_eq!(own["vehicle"], survivor);
    assert_eq!(u64_of(&own["requests"]), 1);
    assert_eq!(
        own["earnings_micro_usd"].as_i64(),
        Some(statement.totals.earnings.0)
    );
    assert_eq!(own["lines"][0]["request_id"], id.as_str());
    let (status, other) = stack.get_as(&owner_keys[killed.as_str()], &path).await;
    assert_eq!(status, 404, "{other}");
    let (status, _) = stack
        .get_as(&owner_keys[survivor], "/owner/v1/vehicles/car-9/statement")
        .await;
    assert_eq!(status, 404);
    let (status, _) = stack.get_as(&key, &path).await;
    assert_eq!(status, 401, "a tenant key opens no owner route");
    let (status, csv) = stack
        .get_as(&owner_keys[survivor], &format!("{path}?format=csv"))
        .await;
    assert_eq!(status, 200);
    let cli_csv = stack.cli(&[
        "ledger",
        "statement",
        "--node",
        survivor,
        "--from",
        "1970-01-01",
        "--to",
        "2100-01-01",
        "--csv",
    ]);
    assert_eq!(
        csv.as_str().and_then(|text| text.lines().last()),
        Some(cli_csv.as_str())
    );
    stack.cli(&["ledger", "verify"]);
}
