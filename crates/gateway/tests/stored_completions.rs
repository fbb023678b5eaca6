//! Stored chat completions (`store: true`) and re-running a clawed-back
//! answer for a tenant that asked (`on_clawback: "rerun"`), in-process
//! against a scripted cell.

mod support;

use axum::body::Body;
use axum::http::Request;
use cell_api::fake::Script;
use cell_api::FinishReason;
use gateway::api::rerun::Reruns;
use gateway::store::TenantClass;
use serde_json::{json, Value};
use support::{send, Gateway, MODEL};

fn chat(content: &str, extra: Value) -> String {
    let mut body = json!({"model": MODEL, "messages": [{"role": "user", "content": content}]});
    if let (Some(body), Some(extra)) = (body.as_object_mut(), extra.as_object()) {
        body.extend(extra.clone());
    }
    body.to_string()
}

/// `method path` as the holder of `key`, with `body` if any.
async fn call(
    gateway: &Gateway,
    key: &str,
    method: &str,
    path: &str,
    body: Option<Value>,
) -> support::Answer {
    let request = Request::builder()
        .method(method)
        .uri(path)
        .header("authorization", format!("Bearer {key}"))
        .header("content-type", "application/json")
        .body(body.map_or_else(Body::empty, |body| Body::from(body.to_string())))
        .expect("request");
    send(gateway.router(), request).await
}

fn refused_param(answer: &support::Answer) -> String {
    assert_eq!(
        answer.status,
        400,
        "{}",
        String::from_utf8_lossy(&answer.body)
    );
    answer.json()["error"]["param"]
        .as_str()
        .unwrap_or_default()
        .to_owned()
}

#[tokio::test]
async fn a_stored_completion_is_its_tenants_to_read_list_update_and_delete() {
    let gateway = Gateway::start(TenantClass::Fleet).await;
    gateway.cell.script([
        Script::answer(&["Hel", "lo"]),
        Script::Answer {
            node: "car-1".into(),
            pieces: vec!["A".into(), "B".into()],
            reason: FinishReason::Length,
        },
        Script::answer(&["not kept"]),
    ]);
    let first = gateway
        .post(
            "/v1/chat/completions",
            &chat("Hi", json!({"store": true, "metadata": {"run": "one"}})),
        )
        .await;
    assert_eq!(first.status, 200);
    let first = first.json();
    let id = first["id"].as_str().expect("id").to_owned();
    let streamed = gateway
        .post(
            "/v1/chat/completions",
            &chat(
                "Letters",
                json!({"store": true, "stream": true, "max_tokens": 2}),
            ),
        )
        .await;
    assert_eq!(streamed.status, 200);
    let streamed_id = serde_json::from_str::<Value>(&streamed.events()[0]).expect("chunk")["id"]
        .as_str()
        .expect("id")
        .to_owned();
    let unkept = gateway
        .post("/v1/chat/completions", &chat("Hi", json!({})))
        .await
        .json();

    let read = gateway.get(&format!("/v1/chat/completions/{id}")).await;
    assert_eq!(read.status, 200);
    let read = read.json();
    assert_eq!(
        read["choices"], first["choices"],
        "the answer as the client got it"
    );
    assert_eq!(read["usage"], first["usage"]);
    assert_eq!(read["metadata"], json!({"run": "one"}));
    assert_eq!(read["fleetgrid"]["on_clawback"], "refund");
    let streamed_read = gateway
        .get(&format!("/v1/chat/completions/{streamed_id}"))
        .await
        .json();
    assert_eq!(
        streamed_read["choices"][0]["message"]["content"], "AB",
        "a stream is kept whole"
    );
    assert_eq!(streamed_read["choices"][0]["finish_reason"], "length");
    let missing = gateway
        .get(&format!(
            "/v1/chat/completions/{}",
            unkept["id"].as_str().unwrap()
        ))
        .await;
    assert_eq!(missing.status, 404, "only what was asked to be kept is");

    let list = gateway.get("/v1/chat/completions").await.json();
    let ids: Vec<&str> = list["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|item| item["id"].as_str().unwrap())
        .collect();
    assert_eq!(ids, [id.as_str(), streamed_id.as_str()]);
    assert_eq!(
        (list["first_id"].as_str(), list["has_more"].as_bool()),
        (Some(id.as_str()), Some(false))
    );
    let page = gateway
        .get("/v1/chat/completions?limit=1&order=desc")
        .await
        .json();
    assert_eq!(
        (page["data"][0]["id"].as_str(), page["has_more"].as_bool()),
        (Some(streamed_id.as_str()), Some(true))
    );
    let next = gateway
        .get(&format!(
            "/v1/chat/completions?limit=1&order=desc&after={streamed_id}"
        ))
        .await
        .json();
    assert_eq!(
        (next["data"][0]["id"].as_str(), next["has_more"].as_bool()),
        (Some(id.as_str()), Some(false))
    );
    let messages = gateway
        .get(&format!("/v1/chat/completions/{id}/messages"))
        .await
        .json();
    assert_eq!(
        messages["data"],
        json!([{"id": format!("{id}-0"), "role": "user", "content": "Hi"}])
    );

    let updated = call(
        &gateway,
        &gateway.key,
        "POST",
        &format!("/v1/chat/completions/{id}"),
        Some(json!({"metadata": {"run": "two"}})),
    )
    .await;
    assert_eq!(updated.json()["metadata"], json!({"run": "two"}));

    // Another tenant finds none of it.
    let (_, other) = gateway
        .store
        .create_tenant("rival", TenantClass::Spot, 1)
        .await
        .expect("tenant");
    for (method, path) in [
        ("GET", format!("/v1/chat/completions/{id}")),
        ("GET", format!("/v1/chat/completions/{id}/messages")),
        ("DELETE", format!("/v1/chat/completions/{id}")),
    ] {
        assert_eq!(
            call(&gateway, &other, method, &path, None).await.status,
            404,
            "{method} {path}"
        );
    }
    let theirs = call(&gateway, &other, "GET", "/v1/chat/completions", None)
        .await
        .json();
    assert_eq!(theirs["data"], json!([]));

    let deleted = call(
        &gateway,
        &gateway.key,
        "DELETE",
        &format!("/v1/chat/completions/{id}"),
        None,
    )
    .await
    .json();
    assert_eq!(
        deleted,
        json!({"object": "chat.completion.deleted", "id": id, "deleted": true})
    );
    assert_eq!(
        gateway
            .get(&format!("/v1/chat/completions/{id}"))
            .await
            .status,
        404
    );
}

#[tokio::test]
async fn what_a_stored_completion_cannot_do_is_refused_by_name() {
    let gateway = Gateway::start(TenantClass::Fleet).await;
    let post = |body: String| {
        let gateway = &gateway;
        async move { gateway.post("/v1/chat/completions", &body).await }
    };
    let too_many: serde_json::Map<String, Value> = (0..17)
        .map(|index| (format!("k{index}"), json!("v")))
        .collect();
    for (extra, param) in [
        (json!({"on_clawback": "rerun"}), "on_clawback"),
        (json!({"store": true, "on_clawback": "redo"}), "on_clawback"),
        (json!({"store": "yes"}), "store"),
        (json!({"store": true, "n": 2}), "store"),
        (json!({"store": true, "metadata": too_many}), "metadata"),
        (json!({"store": true, "metadata": {"k": 1}}), "metadata"),
    ] {
        assert_eq!(
            refused_param(&post(chat("Hi", extra.clone())).await),
            param,
            "{extra}"
        );
    }
    let routed =
        json!({"model": "auto", "messages": [{"role": "user", "content": "Hi"}], "store": true});
    assert_eq!(refused_param(&post(routed.to_string()).await), "store");
    let completion = json!({"model": MODEL, "prompt": "Hi", "store": true});
    assert_eq!(
        refused_param(
            &gateway
                .post("/v1/completions", &completion.to_string())
                .await
        ),
        "store"
    );
    for (query, param) in [
        ("limit=0", "limit"),
        ("order=up", "order"),
        ("metadata[k]=v", "metadata[k]"),
        ("sort=id", "sort"),
    ] {
        assert_eq!(
            refused_param(&gateway.get(&format!("/v1/chat/completions?{query}")).await),
            param,
            "{query}"
        );
    }
    assert!(gateway.cell.submitted().is_empty(), "nothing refused ran");
}

#[tokio::test]
async fn a_clawed_back_answer_asked_to_be_rerun_is_replaced_and_paid_for_once() {
    let gateway = Gateway::start(TenantClass::Fleet).await;
    gateway.allow_credit("1.00").await;
    gateway
        .store
        .add_node("car-2", "alice", 1)
        .await
        .expect("node");
    gateway.cell.script([
        Script::answer(&["Ba", "d"]),
        Script::Answer {
            node: "car-2".into(),
            pieces: vec!["Goo".into(), "d".into()],
            reason: FinishReason::Stop,
        },
    ]);
    let before = gateway.balance().await;
    let first = gateway
        .post(
            "/v1/chat/completions",
            &chat(
                "Say it",
                json!({"store": true, "on_clawback": "rerun", "metadata": {"job": "7"}}),
            ),
        )
        .await
        .json();
    let id = first["id"].as_str().expect("id").to_owned();
    let charged = gateway.balance().await;
    assert!(charged < before);
    let reruns = Reruns::new(gateway.state.clone());
    assert_eq!(
        reruns.pass(now_ms()).await.expect("pass"),
        0,
        "nothing clawed back yet"
    );

    gateway
        .store
        .quarantine_node(
            "car-1",
            "generation failed verification",
            std::slice::from_ref(&id),
            now_ms(),
        )
        .await
        .expect("quarantine");
    let shown = gateway
        .get(&format!("/v1/chat/completions/{id}"))
        .await
        .json();
    assert_eq!(
        shown["fleetgrid"]["clawed_back"]["reason"],
        "generation failed verification"
    );
    support::apply_clawbacks(&gateway).await;
    assert_eq!(
        gateway.balance().await,
        before,
        "the clawed-back answer is refunded"
    );

    assert_eq!(reruns.pass(now_ms()).await.expect("pass"), 1);
    let submitted = gateway.cell.submitted();
    assert_eq!(submitted.len(), 2);
    assert_eq!(submitted[1].prompt, submitted[0].prompt);
    assert_eq!(
        submitted[1].sampling.seed, submitted[0].sampling.seed,
        "the re-run samples as the first run had to"
    );
    let rerun = gateway
        .get(&format!("/v1/chat/completions/{id}"))
        .await
        .json();
    assert_eq!(rerun["id"], id.as_str(), "found under its first id");
    assert_eq!(rerun["choices"][0]["message"]["content"], "Good");
    assert_eq!(rerun["metadata"], json!({"job": "7"}));
    let fleetgrid = &rerun["fleetgrid"];
    assert_eq!(fleetgrid["rerun"]["count"], 1);
    assert_eq!(
        fleetgrid["rerun"]["reason"],
        "generation failed verification"
    );
    assert_eq!(
        fleetgrid["rerun"]["request_id"],
        submitted[1].public_id.as_str()
    );
    assert!(
        fleetgrid.get("clawed_back").is_none(),
        "the answer shown now stands"
    );
    assert_eq!(
        gateway.balance().await,
        charged,
        "the tenant pays for the answer it keeps, once"
    );

    assert_eq!(reruns.pass(now_ms()).await.expect("pass"), 0, "re-run once");
    assert_eq!(gateway.cell.submitted().len(), 2);
}

fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("clock")
        .as_millis() as i64
}
