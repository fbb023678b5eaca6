//! `auto` and `cloud/...` with both real models: SmolLM2-135M on a simulated
//! vehicle (the fleet) and Qwen2.5-Coder-0.5B behind `fleetgrid cloud serve`
//! (the cloud), reached over HTTP like a hosted provider.
//!
//! Answers are greedy (temperature 0) so that what each tier says is
//! repeatable: a routed answer is compared with the same request sent to
//! that tier directly.

mod cloud_common;
mod common;

use cloud_common::{chat, gateway, post_chat, router_config, stream_chat, LocalCloud, CLOUD_MODEL};
use common::Stack;
use ledger::core::{AccountId, Transfer, TransferKind};
use ledger::metering::{Server, UsageSegment};
use serde_json::{json, Value};

/// A question SmolLM2 answers fluently.
const EASY: &str = "What is the capital of France?";

/// A question SmolLM2 can only guess at.
const HARD: &str = "What is 7384 multiplied by 2917? Reply with the number only.";

/// Accept the fleet's answer when its mean token logprob is at least this;
/// the easy question scores about -0.13, the hard one about -0.69.
const THRESHOLD: f32 = -0.4;

fn cloud_name() -> String {
    format!("cloud/{CLOUD_MODEL}")
}

/// The shipped price sheet in micro-dollars per million tokens: the cloud
/// model's upstream price plus the 20 % cloud margin, and SmolLM2's price
/// for the fleet class (the test tenant's).
const CLOUD_PROMPT_PER_MILLION: u64 = 180_000;
const CLOUD_COMPLETION_PER_MILLION: u64 = 720_000;
const UPSTREAM_PROMPT_PER_MILLION: u64 = 150_000;
const UPSTREAM_COMPLETION_PER_MILLION: u64 = 600_000;
const EDGE_PROMPT_PER_MILLION: u64 = 80_000;
const EDGE_COMPLETION_PER_MILLION: u64 = 160_000;

/// Micro-dollars for an exact amount in millionths of one, rounded up as the
/// ledger rounds a charge or an upstream cost.
fn round_up(millionths: u64) -> u64 {
    millionths.div_ceil(1_000_000)
}

fn count(value: &Value) -> u64 {
    value
        .as_u64()
        .unwrap_or_else(|| panic!("not a count: {value}"))
}

/// A routed request as the gateway's ledger holds it.
struct Booked {
    segments: Vec<UsageSegment>,
    transfers: Vec<Transfer>,
}

impl Booked {
    /// Reads the request whose response `body` is from the stack's ledger.
    async fn read(stack: &Stack, body: &Value) -> Booked {
        let id = body["id"].as_str().expect("response id");
        let ledger = ledger::store::Store::open_sqlite(&stack.dir.path().join("ledger.db"))
            .await
            .expect("ledger");
        let request = ledger::core::RequestId::new(id).expect("request id");
        let segments = ledger.request_usage(&request).await.expect("usage");
        let transfers = ledger.request_transfers(&request).await.expect("transfers");
        ledger.close().await;
        Booked {
            segments,
            transfers,
        }
    }

    /// (segment, amount, credited account) of every transfer of a kind.
    fn of_kind(&self, kind: TransferKind) -> Vec<(u32, u64, AccountId)> {
        let mut found: Vec<_> = self
            .transfers
            .iter()
            .filter(|transfer| transfer.kind() == kind)
            .map(|transfer| {
                let amount = u64::try_from(transfer.amount().0).expect("positive amount");
                (transfer.segment().0, amount, transfer.credit().clone())
            })
            .collect();
        found.sort_by_key(|(segment, _, _)| *segment);
        found
    }

    /// The tenant's one charge for the request.
    fn charge(&self) -> u64 {
        let charges = self.of_kind(TransferKind::TokenCharge);
        assert_eq!(charges.len(), 1, "{:?}", self.transfers);
        charges[0].1
    }
}

#[tokio::test]
async fn auto_keeps_confident_answers_on_the_fleet_and_escalates_unsure_ones() {
    let cloud = LocalCloud::shared();
    let dir = tempfile::tempdir().expect("tempdir");
    // A hold-back longer than any answer here: each answer is judged whole.
    let config = router_config(dir.path(), THRESHOLD, 32, 8, -50.0);
    let mut args = cloud.serve_args();
    args.extend(["--router-config".into(), config.display().to_string()]);
    let stack = gateway(args).await;

    // What each tier says on its own.
    let mut edge_easy = chat("fleet/smollm2-135m-instruct", EASY, 24);
    edge_easy["logprobs"] = json!(true);
    let edge_easy = stack.chat(&edge_easy).await;
    assert_eq!(edge_easy["fleetgrid"]["reason"], "explicit_fleet");
    let edge_hard = stack.chat(&chat("smollm2-135m-instruct", HARD, 24)).await;
    let cloud_hard = post_chat(&stack, &chat(&cloud_name(), HARD, 24)).await;
    assert_eq!(cloud_hard.status, 200, "{}", cloud_hard.body);
    assert_eq!(cloud_hard.tier, "cloud");
    assert_eq!(cloud_hard.reason, "explicit_cloud");
    let edge_hard_text = edge_hard["choices"][0]["message"]["content"]
        .as_str()
        .expect("edge answer");
    assert_ne!(
        edge_hard_text,
        cloud_hard.content(),
        "the tiers must differ"
    );

    // Confident: served on the fleet, the same answer, with the reason.
    let easy = post_chat(&stack, &chat("auto", EASY, 24)).await;
    assert_eq!(easy.status, 200, "{}", easy.body);
    assert_eq!(
        (easy.tier.as_str(), easy.reason.as_str()),
        ("fleet", "cascade_accepted")
    );
    assert_eq!(
        easy.content(),
        edge_easy["choices"][0]["message"]["content"]
            .as_str()
            .expect("edge answer")
    );
    let detail = easy.body["fleetgrid"]["detail"]
        .as_str()
        .unwrap_or_default();
    assert!(detail.contains("mean_logprob"), "{detail}");
    assert!(easy.body["fleetgrid"]["usage"]["cloud"].is_null());
    assert_eq!(
        easy.body["fleetgrid"]["usage"]["edge"]["completion_tokens"],
        easy.body["usage"]["completion_tokens"]
    );

    // Unsure: escalated to the cloud, whose answer is served whole.
    let hard = post_chat(&stack, &chat("auto", HARD, 24)).await;
    assert_eq!(hard.status, 200, "{}", hard.body);
    assert_eq!(
        (hard.tier.as_str(), hard.reason.as_str()),
        ("cloud", "cascade_escalated")
    );
    assert_eq!(hard.content(), cloud_hard.content());
    let usage = &hard.body["fleetgrid"]["usage"];
    assert_eq!(usage["edge"]["completion_tokens"], 0);
    assert!(
        usage["edge"]["discarded_tokens"].as_u64() > Some(0),
        "{usage}"
    );
    assert!(
        usage["cloud"]["cost_micro_usd"].as_u64() > Some(0),
        "{usage}"
    );
    // One charge, the cloud's answer at the cloud price; the discarded edge
    // attempt comes after it with no completion tokens: its owner is
    // reimbursed the energy, the tenant pays nothing for it.
    let booked = Booked::read(&stack, &hard.body).await;
    assert_eq!(
        booked.charge(),
        count(&usage["cloud"]["cost_micro_usd"]),
        "{usage}"
    );
    assert_eq!(
        booked.charge(),
        count(&hard.body["fleetgrid"]["cost_micro_usd"])
    );
    assert_eq!(booked.segments[0].server, Server::Cloud);
    assert!(booked.segments.len() >= 2, "{:?}", booked.segments);
    assert!(booked.segments[1..]
        .iter()
        .all(|segment| matches!(segment.server, Server::Node { .. })
            && segment.completion_tokens.0 == 0));
    assert!(booked
        .of_kind(TransferKind::RevenueShare)
        .iter()
        .all(|(segment, _, _)| *segment == 0));
    let reimbursed = booked.of_kind(TransferKind::EnergyReimbursement);
    for discarded in &booked.segments[1..] {
        let Server::Node {
            energy,
            tariff_per_kwh,
            ..
        } = &discarded.server
        else {
            unreachable!("checked above");
        };
        assert!(energy.0 > 0, "{discarded:?}");
        let owed = ledger::settlement::energy_cost(*energy, *tariff_per_kwh).0;
        let paid: i64 = reimbursed
            .iter()
            .filter(|(segment, _, _)| *segment == discarded.segment.0)
            .map(|(_, amount, _)| *amount as i64)
            .sum();
        assert_eq!(paid, owed, "{:?}", booked.transfers);
    }

    // Streaming: the client sees only the final tier's text, never the
    // fleet's discarded guess, and the first chunk already names the cloud.
    let streamed = stream_chat(&stack, &chat("auto", HARD, 24)).await;
    assert_eq!(streamed.tier, "cloud");
    assert_eq!(streamed.streamed.content, cloud_hard.content());
    assert!(!streamed.streamed.content.contains(edge_hard_text.trim()));
    assert_eq!(streamed.route_fields[0]["tier"], "cloud");
    assert!(streamed
        .route_fields
        .iter()
        .all(|field| field["tier"] == "cloud"));
    assert!(streamed.streamed.done && streamed.streamed.errors.is_empty());

    let streamed = stream_chat(&stack, &chat("auto", EASY, 24)).await;
    assert_eq!(streamed.tier, "fleet");
    assert_eq!(streamed.streamed.content, easy.content());
    assert!(streamed
        .route_fields
        .iter()
        .all(|field| field["tier"] == "fleet"));

    // /v1/models lists the routed names.
    let models: serde_json::Value = stack
        .client()
        .get(stack.url("/v1/models"))
        .bearer_auth(&stack.api_key)
        .send()
        .await
        .expect("models")
        .json()
        .await
        .expect("models json");
    let ids: Vec<&str> = models["data"]
        .as_array()
        .expect("data")
        .iter()
        .filter_map(|model| model["id"].as_str())
        .collect();
    assert!(
        ids.contains(&"auto") && ids.contains(&cloud_name().as_str()),
        "{ids:?}"
    );
}

#[tokio::test]
async fn a_collapse_mid_answer_hands_off_to_the_cloud_in_one_stream_metered_in_two_parts() {
    let cloud = LocalCloud::shared();
    let dir = tempfile::tempdir().expect("tempdir");
    // Accept every start, release with a lag of two tokens after a hold-back
    // of four, and call any window of eight tokens a collapse: the handoff
    // comes at token 8, keeping the five tokens sent by then (token 7 was
    // the last to release one) and dropping tokens 6 to 8.
    let config = router_config(dir.path(), -100.0, 4, 2, 0.0);
    let mut args = cloud.serve_args();
    args.extend(["--router-config".into(), config.display().to_string()]);
    let stack = gateway(args).await;
    let question = "Write one sentence about the sea.";

    let mut edge = chat("smollm2-135m-instruct", question, 24);
    edge["logprobs"] = json!(true);
    let edge = stack.chat(&edge).await;
    let kept: String = edge["choices"][0]["logprobs"]["content"]
        .as_array()
        .expect("logprobs")
        .iter()
        .take(5)
        .filter_map(|entry| entry["token"].as_str())
        .collect();

    // As a user asks for a repeatable answer: temperature 0 and a seed.
    let mut auto = chat("auto", question, 24);
    auto["seed"] = json!(7);
    let streamed = stream_chat(&stack, &auto).await;
    assert_eq!(streamed.tier, "fleet");
    let text = &streamed.streamed.content;
    assert!(streamed.streamed.done && streamed.streamed.errors.is_empty());
    assert!(
        text.starts_with(&kept),
        "{text:?} does not start with {kept:?}"
    );
    assert!(text.len() > kept.len(), "the cloud added nothing: {text:?}");
    let handoff = streamed
        .route_fields
        .iter()
        .find(|field| field["reason"] == "handoff")
        .expect("a handoff chunk");
    assert_eq!(handoff["tier"], "fleet+cloud");
    let last = streamed.route_fields.last().expect("final route field");
    assert_eq!(last["tier"], "fleet+cloud");
    let usage = &last["usage"];
    assert_eq!(usage["edge"]["completion_tokens"], 5, "{usage}");
    assert_eq!(usage["edge"]["discarded_tokens"], 3, "{usage}");
    assert!(
        usage["cloud"]["completion_tokens"].as_u64() > Some(0),
        "{usage}"
    );
    assert!(
        usage["cloud"]["cost_micro_usd"].as_u64() > Some(0),
        "{usage}"
    );
    let total = streamed.streamed.usage.expect("usage chunk");
    assert_eq!(
        total["completion_tokens"].as_u64(),
        Some(5 + usage["cloud"]["completion_tokens"].as_u64().unwrap_or(0))
    );

    // The same without streaming: one answer, the same split.
    let whole = post_chat(&stack, &auto).await;
    assert_eq!(
        (whole.tier.as_str(), whole.reason.as_str()),
        ("fleet+cloud", "handoff")
    );
    assert_eq!(whole.content(), text.as_str());
    // And streamed again. Both models now start from cells their earlier answers left, so they
    // prefill a few tokens where they first prefilled the whole prompt; the handoff comes at the
    // same token and the cloud continues the same way.
    let again = stream_chat(&stack, &auto).await;
    assert_eq!(again.streamed.content, *text);
    assert_eq!(
        again.route_fields.last().expect("final route field")["usage"]["edge"]["completion_tokens"],
        5
    );

    // Charged once for both parts: the prompt and the five sent tokens at
    // the fleet price, the cloud's tokens at the cloud price; the cloud's
    // re-prefill of prompt and sent text is the platform's cost only.
    let usage = &whole.body["fleetgrid"]["usage"];
    let edge_prompt = count(&usage["edge"]["prompt_tokens"]);
    let cloud_prompt = count(&usage["cloud"]["prompt_tokens"]);
    let cloud_completion = count(&usage["cloud"]["completion_tokens"]);
    assert_eq!(count(&whole.body["usage"]["prompt_tokens"]), edge_prompt);
    let booked = Booked::read(&stack, &whole.body).await;
    let expected = round_up(
        edge_prompt * EDGE_PROMPT_PER_MILLION
            + 5 * EDGE_COMPLETION_PER_MILLION
            + cloud_completion * CLOUD_COMPLETION_PER_MILLION,
    );
    assert_eq!(booked.charge(), expected, "{usage}");
    assert_eq!(count(&whole.body["fleetgrid"]["cost_micro_usd"]), expected);
    let (cloud, edge) = booked.segments.split_last().expect("segments");
    assert!(
        edge.iter()
            .all(|segment| matches!(segment.server, Server::Node { .. })),
        "{:?}",
        booked.segments
    );
    assert_eq!(edge[0].prompt_tokens.0, edge_prompt);
    let sent: u64 = edge.iter().map(|segment| segment.completion_tokens.0).sum();
    assert_eq!(sent, 5);
    assert_eq!(cloud.server, Server::Cloud);
    assert_eq!(
        (cloud.prompt_tokens.0, cloud.completion_tokens.0),
        (cloud_prompt, cloud_completion)
    );
    let upstream = booked.of_kind(TransferKind::CloudCost);
    assert_eq!(upstream.len(), 1);
    assert_eq!(
        upstream[0].1,
        round_up(
            cloud_prompt * UPSTREAM_PROMPT_PER_MILLION
                + cloud_completion * UPSTREAM_COMPLETION_PER_MILLION
        )
    );
    assert_eq!(
        upstream[0].1,
        count(&usage["cloud"]["upstream_cost_micro_usd"])
    );
    stack.cli(&["ledger", "verify"]);
}

#[tokio::test]
async fn a_spent_cloud_budget_keeps_auto_on_the_fleet_and_refuses_cloud_with_402() {
    let cloud = LocalCloud::shared();
    let stack = gateway(cloud.serve_args()).await;
    // The default configuration sends code questions straight to the cloud.
    let code = "Write a Python function that returns the sum of a list.";
    common::run_cli(
        &[
            "cloud",
            "budget",
            "set",
            "test-tenant",
            "--cap-usd",
            "0.000001",
        ],
        stack.dir.path(),
    );

    // Under the cap: served in the cloud, and the spend passes the cap.
    let first = post_chat(&stack, &chat(&cloud_name(), "Say hi.", 6)).await;
    assert_eq!(first.status, 200, "{}", first.body);
    let spent = first.body["fleetgrid"]["usage"]["cloud"]["cost_micro_usd"]
        .as_u64()
        .expect("cost");
    assert!(spent >= 1, "{}", first.body);

    // Booked once in the ledger at the price sheet's cloud price: the tenant
    // pays what the response reports, the upstream is owed its cost.
    let usage = &first.body["usage"];
    let (prompt, completion) = (
        count(&usage["prompt_tokens"]),
        count(&usage["completion_tokens"]),
    );
    let booked = Booked::read(&stack, &first.body).await;
    assert_eq!(
        booked.charge(),
        round_up(prompt * CLOUD_PROMPT_PER_MILLION + completion * CLOUD_COMPLETION_PER_MILLION)
    );
    assert_eq!(booked.charge(), spent);
    assert_eq!(
        booked.charge(),
        count(&first.body["fleetgrid"]["cost_micro_usd"])
    );
    assert_eq!(booked.segments.len(), 1, "{:?}", booked.segments);
    assert_eq!(booked.segments[0].server, Server::Cloud);
    assert_eq!(booked.segments[0].model.as_str(), cloud_name());
    let upstream_cost = round_up(
        prompt * UPSTREAM_PROMPT_PER_MILLION + completion * UPSTREAM_COMPLETION_PER_MILLION,
    );
    assert_eq!(
        booked.of_kind(TransferKind::CloudCost),
        [(0, upstream_cost, AccountId::CloudProvider)]
    );
    assert_eq!(
        count(&first.body["fleetgrid"]["usage"]["cloud"]["upstream_cost_micro_usd"]),
        upstream_cost
    );

    let refused = post_chat(&stack, &chat(&cloud_name(), "Say hi.", 6)).await;
    assert_eq!(refused.status, 402, "{}", refused.body);
    assert_eq!(refused.body["error"]["code"], "cloud_budget_exceeded");
    let message = refused.body["error"]["message"]
        .as_str()
        .unwrap_or_default();
    assert!(message.contains("cloud budget is spent"), "{message}");

    let stayed = post_chat(&stack, &chat("auto", code, 8)).await;
    assert_eq!(stayed.status, 200, "{}", stayed.body);
    assert_eq!(
        (stayed.tier.as_str(), stayed.reason.as_str()),
        ("fleet", "budget_exhausted")
    );
    assert!(!stayed.content().is_empty());
    // Both answers are in the tenant's usage, each under its model; the
    // refused request is not.
    let usage: serde_json::Value = stack
        .client()
        .get(stack.url("/v1/usage"))
        .bearer_auth(&stack.api_key)
        .send()
        .await
        .expect("usage")
        .json()
        .await
        .expect("usage json");
    assert_eq!(usage["requests"], 2, "{usage}");
    let line = |model: &str| {
        usage["by_model"]
            .as_array()
            .and_then(|lines| lines.iter().find(|line| line["model"] == model))
            .cloned()
            .unwrap_or_else(|| panic!("no usage of {model}: {usage}"))
    };
    assert_eq!(
        line("smollm2-135m-instruct")["completion_tokens"],
        stayed.body["usage"]["completion_tokens"],
        "{usage}"
    );
    assert_eq!(
        count(&line(&cloud_name())["charged_micro_usd"]),
        spent,
        "{usage}"
    );
    stack.cli(&["ledger", "verify"]);

    // Raising the cap lets the cloud answer again.
    common::run_cli(
        &["cloud", "budget", "set", "test-tenant", "--cap-usd", "1"],
        stack.dir.path(),
    );
    let again = post_chat(&stack, &chat("auto", code, 8)).await;
    assert_eq!(
        (again.tier.as_str(), again.reason.as_str()),
        ("cloud", "pre_route_cloud")
    );
}

/// Asks the local cloud itself for a completion of `prompt`, sampled at 0.8 with seed 3, its
/// tokens named by id; `prediction` as token ids when given.
async fn cloud_completion(cloud: &LocalCloud, prompt: &str, prediction: Option<&[i64]>) -> Value {
    let mut body = json!({
        "model": CLOUD_MODEL,
        "prompt": prompt,
        "max_tokens": 24,
        "temperature": 0.8,
        "seed": 3,
        "logprobs": 1,
        "return_tokens_as_token_ids": true,
    });
    if let Some(prediction) = prediction {
        body["prediction"] = json!({"type": "content", "content": prediction});
    }
    let key = std::env::var(cloud_common::CLOUD_KEY_ENV).expect("the cloud's key");
    let response = reqwest::Client::new()
        .post(format!("{}/completions", cloud.base_url()))
        .bearer_auth(key)
        .json(&body)
        .send()
        .await
        .expect("the cloud answers");
    assert_eq!(response.status(), 200);
    response.json().await.expect("a JSON body")
}

/// The ids of a completion's tokens (`token_id:<id>`).
fn token_ids(body: &Value) -> Vec<i64> {
    body["choices"][0]["logprobs"]["tokens"]
        .as_array()
        .expect("tokens")
        .iter()
        .map(|token| {
            let named = token.as_str().expect("a token name");
            named["token_id:".len()..].parse().expect("an id")
        })
        .collect()
}

/// The whole chain of a prediction, on real processes: the local cloud's gateway takes it as
/// token ids, its cell hands it to its node, whose engine (on the reference kernels) prefills
/// it and keeps what it would have drawn. A sampled answer with a prediction is the answer
/// without, token for token and log-probability for log-probability, and the usage counts
/// what it took of the prediction.
#[tokio::test]
async fn the_local_cloud_follows_a_prediction_without_changing_its_answer() {
    let cloud = LocalCloud::shared();
    let prompt = "The three primary colours are";
    let alone = cloud_completion(cloud, prompt, None).await;
    let said = token_ids(&alone);
    assert!(said.len() > 8, "{alone}");
    let mut wrong = said.clone();
    wrong[5] = if wrong[5] == 11 { 12 } else { 11 };
    for (prediction, accepted) in [(said.clone(), said.len()), (wrong, 5)] {
        let predicted = cloud_completion(cloud, prompt, Some(&prediction)).await;
        assert_eq!(
            predicted["choices"][0]["logprobs"], alone["choices"][0]["logprobs"],
            "the same tokens and log-probabilities"
        );
        assert_eq!(predicted["choices"][0]["text"], alone["choices"][0]["text"]);
        assert_eq!(
            predicted["usage"]["completion_tokens_details"],
            json!({"accepted_prediction_tokens": accepted,
                   "rejected_prediction_tokens": prediction.len() - accepted}),
            "{predicted}"
        );
    }
}
