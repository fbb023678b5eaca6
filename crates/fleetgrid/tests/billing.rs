//! End to end: money on the request path, as the tenant meets it. A real
//! coordinator, a real agent running SmolLM2, the SQLite ledger, real HTTP:
//! admission (402 before any work), usage reports and invoices that match
//! the ledger, and idempotent replay. What finished, abandoned and migrated
//! requests settle to is in `billing_settlement.rs`.
//!
//! Prices here are high enough ($2 to $10 per million tokens) that every
//! token is worth whole micro-dollars, so expected charges are exact.

mod billing_common;
mod common;

use billing_common::{
    month_now, ok_json, RESERVED_COMPLETION_MICRO, RESERVED_PROMPT_MICRO, SPOT_COMPLETION_MICRO,
    SPOT_PROMPT_MICRO,
};
use common::{billed_options, colour_chat, u64_of, Stack, MODEL};
use serde_json::{json, Value};

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
