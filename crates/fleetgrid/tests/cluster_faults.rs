//! A cluster end to end under the loss of a part other than a cell: a
//! gateway killed with SIGKILL while it streams answers, and one NATS server
//! of the three killed in the middle of a streamed answer. Real `fleetgrid
//! gateway` and `fleetgrid cell` processes, real agents serving the real
//! model, a real NATS cluster and PostgreSQL.
//!
//! Needs PostgreSQL on 127.0.0.1:5432 and Debian's `nats-server` (`cargo
//! xtask test` starts and installs them); fails, never skips, without them.

mod common;

use common::cluster::{
    prompt_tokens, spot_worst_case, uninterrupted_answer, Cluster, ClusterOptions, OpenStream,
};
use common::{Gateway, MODEL, WAIT};
use coordinator::{NATS_CELL_NAME_PREFIX, NATS_GATEWAY_NAME};
use serde_json::json;
use store::testing::PgSchema;

/// The shortest hold lease a gateway takes: a killed gateway's holds stop
/// counting about this long after its last renewal.
const HOLD_LEASE_MS: u64 = 1_000;

/// Tokens each answer streamed through the gateway that is killed may run to.
const STREAM_TOKENS: u32 = 160;

/// A story that runs to `max_tokens` (end-of-generation ignored).
fn story(max_tokens: u32) -> serde_json::Value {
    json!({
        "model": MODEL, "max_tokens": max_tokens, "temperature": 0.0, "ignore_eos": true,
        "messages": [{"role": "user", "content": "Tell a long story about a lighthouse keeper."}],
    })
}

/// A question answered in a few tokens, whatever `max_tokens` allows.
fn short_question(max_tokens: u32) -> serde_json::Value {
    json!({
        "model": MODEL, "max_tokens": max_tokens, "temperature": 0.0,
        "messages": [{"role": "user", "content": "Answer with one word: is the sky blue?"}],
    })
}

/// A chat completion's status and body.
async fn chat_status(gateway: &Gateway, body: &serde_json::Value) -> (u16, serde_json::Value) {
    let response = gateway.post("/v1/chat/completions", body).await;
    let status = response.status().as_u16();
    let body = response.json().await.unwrap_or(serde_json::Value::Null);
    (status, body)
}

#[tokio::test(flavor = "multi_thread")]
async fn a_killed_gateway_charges_nothing_twice_and_its_holds_lapse() {
    let schema = PgSchema::create().await;
    let mut options = ClusterOptions::new(schema.url());
    options.gateways = 2;
    options.cells = 1;
    options.test_prices = true;
    options.gateway_args = vec!["--hold-lease-ms".into(), HOLD_LEASE_MS.to_string()];
    let mut cluster = Cluster::start(options).await;
    cluster.add_agent("car-a", &[0], 2);
    cluster.add_agent("car-b", &[0], 2);
    cluster.wait_for_nodes(&["car-a", "car-b"]).await;

    // The tenant's balance is exactly the worst case of one request that
    // the second gateway will ask for at the end; the two answers streamed
    // through the first gateway hold all of it but at most two micro-dollars.
    let operator = cluster.gateway(1);
    let story_prompt = prompt_tokens(&operator, &story(1)).await;
    let question_prompt = prompt_tokens(&operator, &short_question(1)).await;
    let streams_held = spot_worst_case(story_prompt, STREAM_TOKENS).0 * 2;
    let whole_balance_tokens =
        u32::try_from((streams_held - spot_worst_case(question_prompt, 0).0 + 3) / 4)
            .expect("tokens");
    let whole_balance = short_question(whole_balance_tokens);
    let balance = spot_worst_case(question_prompt, whole_balance_tokens);
    assert!(balance.0 >= streams_held && balance.0 - streams_held < 4);
    let key = cluster.funded_tenant("payer", "spot", balance);
    let doomed = cluster.gateway_as(0, &key);
    let survivor = cluster.gateway_as(1, &key);

    let mut streams = Vec::new();
    for _ in 0..2 {
        let mut stream = OpenStream::open(&doomed, &story(STREAM_TOKENS)).await;
        assert!(
            stream.read_until(|read| !read.content.is_empty()).await,
            "the answer ended before its first text"
        );
        streams.push(stream);
    }
    // The other gateway counts the first gateway's holds.
    let (status, refusal) = chat_status(&survivor, &whole_balance).await;
    assert_eq!(status, 402, "admitted past the holds: {refusal}");

    cluster.kill_gateway(0);
    for stream in streams {
        let stream = stream.finish().await;
        let read = stream.read();
        assert!(
            !read.done && read.finish_reason.is_none(),
            "an answer of the killed gateway ended as if complete"
        );
    }

    // One lease after the killed gateway's last renewal its holds stop
    // counting, and the other gateway admits the whole balance again.
    let answer = std::cell::RefCell::new(serde_json::Value::Null);
    stack::probe::wait_until(
        &cluster.members(),
        "the whole balance admitted again",
        WAIT,
        || async {
            let (status, body) = chat_status(&survivor, &whole_balance).await;
            assert!(
                status == 200 || status == 402,
                "a request failed with {status}: {body}"
            );
            *answer.borrow_mut() = body;
            status == 200
        },
    )
    .await
    .unwrap_or_else(|error| panic!("{error}"));
    let answer = answer.into_inner();
    let completion = answer["usage"]["completion_tokens"]
        .as_u64()
        .expect("usage");
    let prompt = answer["usage"]["prompt_tokens"].as_u64().expect("usage");
    assert_eq!(prompt, u64::from(question_prompt));

    // Nothing the killed gateway served was charged, the survivor's answer
    // once; the balance is what is left after it, and never below zero.
    let charged = spot_worst_case(question_prompt, u32::try_from(completion).expect("tokens"));
    let (_, usage) = survivor.get_as(&key, "/v1/usage").await;
    assert_eq!(usage["requests"], 1, "usage: {usage}");
    assert_eq!(usage["charged_micro_usd"], charged.0, "usage: {usage}");
    assert_eq!(cluster.balance("payer").0, balance.0 - charged.0);
    cluster.verify_ledger();
    drop(cluster);
    schema.remove().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_nats_server_lost_mid_stream_costs_the_client_nothing() {
    let schema = PgSchema::create().await;
    let mut cluster = Cluster::start(ClusterOptions::new(schema.url())).await;
    let gateway = cluster.gateway(0);
    cluster.two_vehicles_failing_over().await;

    let body = json!({
        "model": MODEL, "max_tokens": 120, "temperature": 0.8, "seed": 9090,
        "messages": [{"role": "user", "content": "Explain how a wind turbine makes electricity."}],
    });
    let expected = uninterrupted_answer(&gateway, &body).await;

    // The server the gateway receives its tokens through dies mid-answer.
    let mut stream = OpenStream::open(&gateway, &body).await;
    assert!(
        stream.read_until(|read| read.chunks >= 10).await,
        "the answer ended before the kill"
    );
    let lost = cluster
        .nats
        .server_of(NATS_GATEWAY_NAME)
        .await
        .expect("the gateway is connected to a NATS server");
    cluster.nats.servers[lost].kill();
    let streamed = stream.finish().await.read();
    assert!(
        streamed.errors.is_empty(),
        "errors in the stream: {:?}",
        streamed.errors
    );
    assert!(streamed.done, "the answer did not end");
    assert_eq!(
        streamed.content, expected,
        "the answer differs from an uninterrupted run"
    );

    // The gateway and both cells are connected again, through the others.
    let mut names = vec![NATS_GATEWAY_NAME.to_owned()];
    names.extend(
        (0..cluster.cells.len()).map(|index| format!("{NATS_CELL_NAME_PREFIX}cell-{index}")),
    );
    for name in &names {
        let nats = &cluster.nats;
        let what = format!("{name} connected to a surviving NATS server");
        stack::probe::wait_until(&cluster.members(), &what, WAIT, || async {
            nats.server_of(name)
                .await
                .is_some_and(|server| server != lost)
        })
        .await
        .unwrap_or_else(|error| panic!("{error}"));
    }

    // New requests are served as before, by both vehicles' cells.
    let again = gateway.chat(&body).await;
    assert_eq!(again["choices"][0]["message"]["content"], expected.as_str());
    let streamed_again = OpenStream::open(&gateway, &body)
        .await
        .finish()
        .await
        .read();
    assert!(streamed_again.errors.is_empty() && streamed_again.done);
    assert_eq!(streamed_again.content, expected);
    let (_, usage) = gateway.get_as(&gateway.api_key, "/v1/usage").await;
    assert_eq!(usage["requests"], 4, "usage: {usage}");
    cluster.verify_ledger();
    drop(cluster);
    schema.remove().await;
}
