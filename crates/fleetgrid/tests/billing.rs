//! End to end: money on the request path. A real coordinator, a real agent
//! running SmolLM2, the SQLite ledger (and once PostgreSQL), real HTTP.
//!
//! Prices here are high enough ($2 to $10 per million tokens) that every
//! token is worth whole micro-dollars, so expected charges are exact.

mod common;

use std::time::Duration;

use common::{billed_options, colour_chat, u64_of, Stack, MODEL};
use serde_json::{json, Value};

/// Spot $2 / $4, reserved $3 / $6, fleet $5 / $10 per million prompt /
/// completion tokens, in micro-dollars per token.
const SPOT_PROMPT_MICRO: u64 = 2;
const SPOT_COMPLETION_MICRO: u64 = 4;
const RESERVED_PROMPT_MICRO: u64 = 3;
const RESERVED_COMPLETION_MICRO: u64 = 6;

/// The JSON body of a response that must be 200, or a panic showing it.
async fn ok_json(response: reqwest::Response) -> Value {
    let status = response.status();
    let text = response.text().await.expect("body");
    assert_eq!(status, 200, "{text}");
    serde_json::from_str(&text).expect("json body")
}

fn month_now() -> String {
    ledger::invoice::month_containing(coordinator::core::now_ms())
}

#[tokio::test(flavor = "multi_thread")]
async fn a_tenant_that_cannot_pay_is_refused_402_before_any_work_starts() {
    let (options, _prices) = billed_options(&[]);
    let mut stack = Stack::start(options);
    stack.add_agent("car-1", 2);
    stack.wait_for_nodes(&["car-1"]).await;
    let key = stack.cli(&["tenants", "create", "broke", "--class", "spot"]);

    let accepted_before = stack.metric("fleetgrid_requests_accepted_total").await;
    let response = stack
        .post_as(&key, "/v1/chat/completions", &colour_chat(8))
        .await;
    assert_eq!(response.status(), 402);
    let error: Value = response.json().await.expect("json");
    assert_eq!(error["error"]["type"], "insufficient_quota");
    let message = error["error"]["message"].as_str().expect("message");
    assert!(message.starts_with("insufficient balance"), "{message}");
    // Nothing was queued or assigned: the scheduler never saw the request.
    assert_eq!(
        stack.metric("fleetgrid_requests_accepted_total").await,
        accepted_before
    );
    assert_eq!(stack.metric(&common::node_assignments("car-1")).await, 0.0);

    // The refusal names the worst case: the whole prompt plus max_tokens.
    // Exactly that much admits the request; one token more is refused.
    let worst_case = message
        .split("up to $")
        .nth(1)
        .and_then(|rest| rest.split(' ').next())
        .expect("worst case in the message")
        .to_string();
    stack.cli(&[
        "billing",
        "topup",
        "--tenant",
        "broke",
        "--amount",
        &worst_case,
        "--reference",
        "r1",
    ]);
    let response = stack
        .post_as(&key, "/v1/chat/completions", &colour_chat(9))
        .await;
    assert_eq!(response.status(), 402, "one more token costs 4 µUSD more");
    let response = stack
        .post_as(&key, "/v1/chat/completions", &colour_chat(8))
        .await;
    let body = ok_json(response).await;
    assert_eq!(stack.metric(&common::node_assignments("car-1")).await, 1.0);
    let prompt = u64_of(&body["usage"]["prompt_tokens"]);
    let completion = u64_of(&body["usage"]["completion_tokens"]);
    let charged = prompt * SPOT_PROMPT_MICRO + completion * SPOT_COMPLETION_MICRO;
    let worst_micro = ledger::price_file::parse_usd(&worst_case)
        .expect("amount")
        .0;
    assert_eq!(
        worst_micro as u64,
        prompt * SPOT_PROMPT_MICRO + 8 * SPOT_COMPLETION_MICRO
    );
    let (status, usage) = stack.get_as(&key, "/v1/usage").await;
    assert_eq!(status, 200, "{usage}");
    assert_eq!(u64_of(&usage["charged_micro_usd"]), charged);
    assert_eq!(
        usage["balance_usd"],
        ledger::core::MicroUsd(worst_micro - charged as i64).to_string()
    );

    // A daily cap refuses even with money left, with its own message.
    stack.cli(&[
        "billing",
        "topup",
        "--tenant",
        "broke",
        "--amount",
        "1",
        "--reference",
        "r2",
    ]);
    // Spent today plus this request's worst case is one micro-dollar over.
    let cap = ledger::core::MicroUsd(charged as i64 + worst_micro - 1).to_string();
    stack.cli(&["billing", "cap", "--tenant", "broke", "--daily", &cap]);
    let response = stack
        .post_as(&key, "/v1/chat/completions", &colour_chat(8))
        .await;
    assert_eq!(response.status(), 402);
    let error: Value = response.json().await.expect("json");
    let message = error["error"]["message"].as_str().expect("message");
    assert!(message.starts_with("daily spend cap reached"), "{message}");
    let cap = ledger::core::MicroUsd(charged as i64 + worst_micro).to_string();
    stack.cli(&["billing", "cap", "--tenant", "broke", "--daily", &cap]);
    let response = stack
        .post_as(&key, "/v1/chat/completions", &colour_chat(8))
        .await;
    ok_json(response).await;
    stack.cli(&["billing", "cap", "--tenant", "broke", "--none"]);

    // A credit limit counts as available money for a tenant with none.
    let debtor = stack.cli(&["tenants", "create", "debtor", "--class", "reserved"]);
    stack.cli(&["billing", "credit", "--tenant", "debtor", "--limit", "0.01"]);
    let response = stack
        .post_as(&debtor, "/v1/chat/completions", &colour_chat(8))
        .await;
    assert_eq!(response.status(), 200);
    let (_, usage) = stack.get_as(&debtor, "/v1/usage").await;
    let owed = usage["balance_usd"].as_str().expect("balance");
    assert!(
        owed.starts_with("-0.0000"),
        "a tenant on credit owes: {owed}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn usage_and_invoices_match_the_ledger_and_no_tenant_reads_another() {
    let (options, _prices) = billed_options(&[]);
    let mut stack = Stack::start(options);
    stack.add_agent("car-1", 2);
    stack.wait_for_nodes(&["car-1"]).await;
    let alpha = stack.cli(&["tenants", "create", "alpha", "--class", "spot"]);
    let beta = stack.cli(&["tenants", "create", "beta", "--class", "reserved"]);
    for (tenant, reference) in [("alpha", "a1"), ("beta", "b1")] {
        stack.cli(&[
            "billing",
            "topup",
            "--tenant",
            tenant,
            "--amount",
            "5",
            "--reference",
            reference,
        ]);
    }

    let mut alpha_expected = (0_u64, 0_u64, 0_u64);
    for max_tokens in [6, 9] {
        let response = stack
            .post_as(&alpha, "/v1/chat/completions", &colour_chat(max_tokens))
            .await;
        let body = ok_json(response).await;
        let prompt = u64_of(&body["usage"]["prompt_tokens"]);
        let completion = u64_of(&body["usage"]["completion_tokens"]);
        alpha_expected.0 += prompt;
        alpha_expected.1 += completion;
        alpha_expected.2 += prompt * SPOT_PROMPT_MICRO + completion * SPOT_COMPLETION_MICRO;
    }
    // A streamed request is billed the same way, before its [DONE].
    let mut streamed = colour_chat(7);
    streamed["stream"] = json!(true);
    streamed["stream_options"] = json!({"include_usage": true});
    let response = stack
        .post_as(&alpha, "/v1/chat/completions", &streamed)
        .await;
    let sse = common::parse_sse(&response.text().await.expect("stream"));
    assert!(sse.done && sse.errors.is_empty(), "{sse:?}");
    let usage = sse.usage.expect("usage chunk");
    let (prompt, completion) = (
        u64_of(&usage["prompt_tokens"]),
        u64_of(&usage["completion_tokens"]),
    );
    alpha_expected.0 += prompt;
    alpha_expected.1 += completion;
    alpha_expected.2 += prompt * SPOT_PROMPT_MICRO + completion * SPOT_COMPLETION_MICRO;

    let response = stack
        .post_as(&beta, "/v1/chat/completions", &colour_chat(5))
        .await;
    let body = ok_json(response).await;
    let beta_charged = u64_of(&body["usage"]["prompt_tokens"]) * RESERVED_PROMPT_MICRO
        + u64_of(&body["usage"]["completion_tokens"]) * RESERVED_COMPLETION_MICRO;

    let (status, usage) = stack.get_as(&alpha, "/v1/usage").await;
    assert_eq!(status, 200, "{usage}");
    assert_eq!(usage["tenant"], "alpha");
    assert_eq!(u64_of(&usage["requests"]), 3);
    assert_eq!(u64_of(&usage["prompt_tokens"]), alpha_expected.0);
    assert_eq!(u64_of(&usage["completion_tokens"]), alpha_expected.1);
    assert_eq!(u64_of(&usage["charged_micro_usd"]), alpha_expected.2);
    assert_eq!(usage["by_model"][0]["model"], MODEL);

    let month = month_now();
    let (status, invoice) = stack.get_as(&alpha, &format!("/v1/invoices/{month}")).await;
    assert_eq!(status, 200, "{invoice}");
    assert_eq!(u64_of(&invoice["total_micro_usd"]), alpha_expected.2);
    assert_eq!(invoice["top_ups_usd"], "5.000000");
    // The CLI's CSV invoice has one line per request and the same total,
    // to the micro-dollar, as the tenant's token-charge transfers.
    let total_line = stack.cli(&[
        "ledger", "invoice", "--tenant", "alpha", "--month", &month, "--csv",
    ]);
    let expected_total = ledger::core::MicroUsd(alpha_expected.2 as i64).to_string();
    assert!(
        total_line.ends_with(&format!(",{expected_total}")),
        "{total_line}"
    );
    let balances = std::process::Command::new(common::binary())
        .args(["ledger", "balances", "--data-dir"])
        .arg(stack.dir.path())
        .output()
        .expect("balances");
    let balances = String::from_utf8_lossy(&balances.stdout);
    let alpha_balance = ledger::core::MicroUsd(5_000_000 - alpha_expected.2 as i64).to_string();
    assert!(
        balances
            .lines()
            .any(|line| line.starts_with("tenant:alpha") && line.contains(&alpha_balance)),
        "{balances}"
    );

    // Beta sees only its own request; naming alpha is forbidden.
    let (_, beta_usage) = stack.get_as(&beta, "/v1/usage").await;
    assert_eq!(u64_of(&beta_usage["requests"]), 1);
    assert_eq!(u64_of(&beta_usage["charged_micro_usd"]), beta_charged);
    let (status, forbidden) = stack.get_as(&beta, "/v1/usage?tenant=alpha").await;
    assert_eq!(status, 403, "{forbidden}");
    assert_eq!(forbidden["error"]["type"], "permission_error");
    let (status, _) = stack
        .get_as(&beta, &format!("/v1/invoices/{month}?tenant=alpha"))
        .await;
    assert_eq!(status, 403);
    let (_, beta_invoice) = stack.get_as(&beta, &format!("/v1/invoices/{month}")).await;
    assert_eq!(u64_of(&beta_invoice["total_micro_usd"]), beta_charged);
    let (status, _) = stack.get_as("fg-not-a-key", "/v1/usage").await;
    assert_eq!(status, 401);
    let (status, bad) = stack.get_as(&alpha, "/v1/invoices/2026-13").await;
    assert_eq!(status, 400, "{bad}");

    stack.cli(&["ledger", "verify"]);
}

#[tokio::test(flavor = "multi_thread")]
async fn an_idempotency_key_replays_the_result_without_charging_again() {
    let (options, _prices) = billed_options(&[]);
    let mut stack = Stack::start(options);
    stack.add_agent("car-1", 2);
    stack.wait_for_nodes(&["car-1"]).await;
    let key = stack.api_key.clone();
    let send = |idempotency: &'static str, body: Value| {
        let request = stack
            .client()
            .post(stack.url("/v1/chat/completions"))
            .bearer_auth(&key)
            .header("Idempotency-Key", idempotency)
            .json(&body);
        async move { request.send().await.expect("send") }
    };
    let mut body = colour_chat(12);
    body["temperature"] = json!(0.9);

    let first = ok_json(send("order-1", body.clone()).await).await;
    let again = send("order-1", body.clone()).await;
    assert_eq!(again.status(), 200);
    assert_eq!(again.headers()["idempotent-replayed"], "true");
    let again: Value = again.json().await.expect("json");
    // The very same response, even with sampling at temperature 0.9.
    assert_eq!(again, first);
    let (_, usage) = stack.get_as(&key, "/v1/usage").await;
    assert_eq!(
        u64_of(&usage["requests"]),
        1,
        "a replay is not charged: {usage}"
    );

    let mut other = body.clone();
    other["max_tokens"] = json!(13);
    let reused = send("order-1", other).await;
    assert_eq!(reused.status(), 422);
    let reused: Value = reused.json().await.expect("json");
    assert_eq!(reused["error"]["code"], "idempotency_key_reused");

    // A streamed request is replayed as a stream with the same text.
    let mut streamed = body.clone();
    streamed["stream"] = json!(true);
    let live = common::parse_sse(
        &send("order-2", streamed.clone())
            .await
            .text()
            .await
            .expect("sse"),
    );
    let replayed = common::parse_sse(&send("order-2", streamed).await.text().await.expect("sse"));
    assert!(live.done && replayed.done);
    assert_eq!(replayed.content, live.content);
    assert_eq!(replayed.finish_reason, live.finish_reason);

    // While the first request with a key runs, a repeat is told to retry.
    let mut long = colour_chat(120);
    long["messages"] = json!([{"role": "user", "content": "Write a long story about a car."}]);
    let accepted = stack.metric("fleetgrid_requests_accepted_total").await;
    let running = tokio::spawn(send("order-3", long.clone()));
    // The key is claimed before the request is queued: once it is queued,
    // the first request holds the key.
    stack
        .wait_for_metric(
            "fleetgrid_requests_accepted_total",
            common::WAIT,
            "the first request with the key was queued",
            |now| now > accepted,
        )
        .await;
    let repeat = send("order-3", long).await;
    assert_eq!(repeat.status(), 409);
    assert!(repeat.headers().contains_key("retry-after"));
    assert_eq!(running.await.expect("first").status(), 200);

    let (_, usage) = stack.get_as(&key, "/v1/usage").await;
    assert_eq!(u64_of(&usage["requests"]), 3, "{usage}");
    stack.cli(&["ledger", "verify"]);
}

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
