//! The owner API end to end: owners and their keys come from the CLI, an
//! owner sees and edits only their own vehicles, bad policies are refused
//! with a 400 that names the field, and a policy that excludes the spot class
//! keeps spot work off the car from the moment it is saved (through the API
//! at once, through the CLI within the coordinator's change-feed interval).

mod common;

use std::time::{Duration, Instant};

use common::{Stack, MODEL, PLUGGED_IN_TRACE};
use serde_json::{json, Value};

/// How long a CLI change may take to reach the running coordinator: its
/// change-feed interval (1 s) plus slack for a loaded machine.
const CLI_CHANGE_WAIT: Duration = Duration::from_secs(10);

/// How long one probe of the policy may take; an answer of a few tokens
/// takes well under a second.
const PROBE_WAIT: Duration = Duration::from_secs(3);

async fn owner_get(stack: &Stack, key: &str, path: &str) -> (u16, Value) {
    let response = stack
        .client()
        .get(stack.url(path))
        .bearer_auth(key)
        .send()
        .await
        .expect("send");
    let status = response.status().as_u16();
    (status, response.json().await.expect("json body"))
}

async fn owner_put(stack: &Stack, key: &str, path: &str, body: &Value) -> (u16, Value) {
    let response = stack
        .client()
        .put(stack.url(path))
        .bearer_auth(key)
        .json(body)
        .send()
        .await
        .expect("send");
    let status = response.status().as_u16();
    (status, response.json().await.expect("json body"))
}

/// A short chat completion under `key`; returns the status and body.
async fn chat_as(stack: &Stack, key: &str) -> (u16, Value) {
    let body = json!({
        "model": MODEL, "max_tokens": 4, "temperature": 0.0,
        "messages": [{"role": "user", "content": "Say hi."}],
    });
    let response = stack
        .client()
        .post(stack.url("/v1/chat/completions"))
        .bearer_auth(key)
        .json(&body)
        .send()
        .await
        .expect("send");
    let status = response.status().as_u16();
    (status, response.json().await.expect("json body"))
}

#[tokio::test(flavor = "multi_thread")]
async fn an_owner_sees_and_edits_only_their_own_vehicles() {
    let stack = Stack::start(Default::default());
    let alice = stack.cli(&["owners", "create", "alice"]);
    let bob = stack.cli(&["owners", "create", "bob"]);
    stack.cli(&["nodes", "add", "car-a", "--owner", "alice"]);
    stack.cli(&["nodes", "add", "car-b", "--owner", "bob"]);
    let refused = std::process::Command::new(common::binary())
        .args(["nodes", "add", "car-c", "--owner", "carol", "--data-dir"])
        .arg(stack.dir.path())
        .output()
        .expect("run fleetgrid");
    assert!(
        !refused.status.success(),
        "a node with an unknown owner was enrolled"
    );
    assert!(String::from_utf8_lossy(&refused.stderr).contains("no owner named \"carol\""));

    let (status, listed) = owner_get(&stack, &alice, "/owner/v1/vehicles").await;
    assert_eq!(status, 200, "{listed}");
    let names: Vec<&str> = listed["data"]
        .as_array()
        .expect("data")
        .iter()
        .filter_map(|vehicle| vehicle["id"].as_str())
        .collect();
    assert_eq!(names, ["car-a"]);
    assert_eq!(
        listed["data"][0]["policy"]["stop_before_departure_minutes"],
        15
    );
    assert_eq!(listed["data"][0]["policy"]["compute_when_unplugged"], false);

    // Another owner's vehicle and a vehicle that does not exist look the same.
    for path in [
        "/owner/v1/vehicles/car-b/policy",
        "/owner/v1/vehicles/car-zz/policy",
    ] {
        let (status, body) = owner_get(&stack, &alice, path).await;
        assert_eq!(status, 404, "{path}: {body}");
        assert_eq!(body["error"]["code"], "not_found");
        let (status, _) = owner_put(&stack, &alice, path, &json!({"allowed_classes": []})).await;
        assert_eq!(status, 404, "{path}");
    }
    let (status, bobs) = owner_get(&stack, &bob, "/owner/v1/vehicles/car-b/policy").await;
    assert_eq!(status, 200);
    assert_eq!(
        bobs["allowed_classes"],
        json!(["fleet", "reserved", "spot"])
    );

    // Tenant keys and owner keys each open only their own side.
    let (status, body) = owner_get(&stack, &stack.api_key, "/owner/v1/vehicles").await;
    assert_eq!(status, 401, "{body}");
    assert_eq!(body["error"]["code"], "invalid_api_key");
    let (status, body) = owner_get(&stack, &alice, "/v1/models").await;
    assert_eq!(status, 401, "{body}");
    let unauthenticated = stack
        .client()
        .get(stack.url("/owner/v1/vehicles"))
        .send()
        .await
        .expect("send");
    assert_eq!(unauthenticated.status(), 401);

    // Bad values are refused, naming the field; nothing is stored.
    let path = "/owner/v1/vehicles/car-a/policy";
    let (status, body) = owner_put(
        &stack,
        &alice,
        path,
        &json!({"compute_when_unplugged": true, "unplugged_stop_soc_percent": 60, "unplugged_resume_soc_percent": 40}),
    )
    .await;
    assert_eq!(status, 400, "{body}");
    assert_eq!(body["error"]["param"], "unplugged_resume_soc_percent");
    assert!(body["error"]["message"]
        .as_str()
        .is_some_and(|message| message.contains("must not be below the stop threshold")));
    for bad in [
        json!({"allowed_hours": [25]}),
        json!({"max_chip_temperature_c": 900}),
        json!({"allowed_classes": ["gold"]}),
        json!({"stop_before_departure": 5}),
    ] {
        let (status, body) = owner_put(&stack, &alice, path, &bad).await;
        assert_eq!(status, 400, "{bad}: {body}");
        assert_eq!(body["error"]["type"], "invalid_request_error");
    }
    let (_, unchanged) = owner_get(&stack, &alice, path).await;
    assert_eq!(unchanged["compute_when_unplugged"], false);

    // A good change is stored and is what the operator's CLI shows too.
    let (status, changed) = owner_put(
        &stack,
        &alice,
        path,
        &json!({"compute_when_unplugged": true, "unplugged_stop_soc_percent": 40,
                "unplugged_resume_soc_percent": 60, "stop_before_departure_minutes": 30,
                "max_energy_per_day_kwh": 1.5, "allowed_hours": [22, 23, 0, 1, 2]}),
    )
    .await;
    assert_eq!(status, 200, "{changed}");
    let (_, read_back) = owner_get(&stack, &alice, path).await;
    assert_eq!(read_back, changed);
    assert_eq!(read_back["stop_before_departure_minutes"], 30);
    let shown = std::process::Command::new(common::binary())
        .args(["policy", "show", "--node", "car-a", "--data-dir"])
        .arg(stack.dir.path())
        .output()
        .expect("run fleetgrid");
    let shown: Value = serde_json::from_slice(&shown.stdout).expect("policy json");
    assert_eq!(shown["max_energy_per_day_kwh"], 1.5);
    assert_eq!(shown["allowed_hours"], json!([0, 1, 2, 22, 23]));
}

#[tokio::test(flavor = "multi_thread")]
async fn a_policy_without_the_spot_class_keeps_spot_work_off_the_car() {
    let mut stack = Stack::start(Default::default());
    let alice = stack.cli(&["owners", "create", "alice"]);
    let credential = stack.cli(&["nodes", "add", "car-a", "--owner", "alice"]);
    let trace = stack.dir.path().join("car-a.json");
    std::fs::write(&trace, PLUGGED_IN_TRACE).expect("write trace");
    stack.spawn_agent("car-a", &credential, &format!("sim:{}", trace.display()), 1);
    stack.wait_for_nodes(&["car-a"]).await;
    let spot = stack.cli(&["tenants", "create", "cheap", "--class", "spot"]);
    stack.unlimited_credit("cheap");
    let (status, body) = chat_as(&stack, &spot).await;
    assert_eq!(
        status,
        200,
        "spot work runs under the default policy: {body}\n{}",
        stack.log("coordinator")
    );

    let path = "/owner/v1/vehicles/car-a/policy";
    let (status, body) = owner_put(
        &stack,
        &alice,
        path,
        &json!({"allowed_classes": ["fleet", "reserved"]}),
    )
    .await;
    assert_eq!(status, 200, "{body}");
    // Applied at once: the very next spot request finds no car that takes it.
    let (status, body) = chat_as(&stack, &spot).await;
    assert_eq!(
        status, 503,
        "spot work reached a car that excludes it: {body}"
    );
    assert!(body["error"]["message"].is_string());
    let (status, body) = chat_as(&stack, &stack.api_key).await;
    assert_eq!(status, 200, "fleet work must still run: {body}");

    let (status, _) = owner_put(
        &stack,
        &alice,
        path,
        &json!({"allowed_classes": ["fleet", "reserved", "spot"]}),
    )
    .await;
    assert_eq!(status, 200);
    let (status, body) = chat_as(&stack, &spot).await;
    assert_eq!(status, 200, "{body}");

    // The operator's CLI writes the database; the running coordinator
    // follows within its change-feed interval.
    stack.cli(&["policy", "set", "--node", "car-a", "--classes", "fleet"]);
    let changed_at = Instant::now();
    loop {
        assert!(
            changed_at.elapsed() < CLI_CHANGE_WAIT,
            "the CLI's policy change did not reach the coordinator"
        );
        // A probe running when the change lands is taken off the car and
        // waits for one that takes spot work: it is given up, and the next
        // probe asks again.
        let probe = tokio::time::timeout(PROBE_WAIT, chat_as(&stack, &spot)).await;
        let Ok((status, body)) = probe else {
            continue;
        };
        if status == 503 {
            break;
        }
        assert_eq!(status, 200, "{body}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    // A vehicle that reconnects runs under its stored policy from the start.
    stack.agents[0].kill();
    stack.wait_for_nodes(&[]).await;
    stack.spawn_agent("car-a", &credential, &format!("sim:{}", trace.display()), 1);
    stack.wait_for_nodes(&["car-a"]).await;
    let (status, body) = chat_as(&stack, &spot).await;
    assert_eq!(
        status, 503,
        "the stored policy was not applied on reconnect: {body}"
    );
    let (status, body) = chat_as(&stack, &stack.api_key).await;
    assert_eq!(status, 200, "{body}");
}
