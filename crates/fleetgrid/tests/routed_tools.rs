//! Tool calls on `cloud/<model>` and `auto`: the tools go to the cloud upstream as the client
//! sent them (the local cloud, Qwen2.5-Coder on our own engine, whose template writes
//! Hermes-style calls), its calls reach the client in OpenAI's shape, whole and streamed, and
//! a tool's result sent back gets an answer; `auto`'s calls follow the tools' parameters from
//! whichever tier answers.
//!
//! Needs both test models.

mod cloud_common;
mod common;

use cloud_common::{gateway, post_chat, LocalCloud, CLOUD_MODEL};
use serde_json::{json, Value};

fn weather() -> Value {
    json!({"type": "function", "function": {
        "name": "get_weather",
        "description": "Current weather in a city",
        "parameters": {"type": "object", "properties": {
            "city": {"type": "string", "maxLength": 20},
            "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]}},
            "required": ["city", "unit"], "additionalProperties": false},
    }})
}

fn ask(model: &str, tool_choice: Value) -> Value {
    json!({
        "model": model,
        "messages": [{"role": "user", "content": "What is the weather in Paris?"}],
        "tools": [weather()],
        "tool_choice": tool_choice,
        "max_tokens": 250,
        "temperature": 0.0,
        "seed": 7,
    })
}

/// The calls of a whole answer: (id, name, arguments parsed).
fn calls(body: &Value) -> Vec<(String, String, Value)> {
    body["choices"][0]["message"]["tool_calls"]
        .as_array()
        .unwrap_or_else(|| panic!("no tool_calls: {body}"))
        .iter()
        .map(|call| {
            assert_eq!(call["type"], "function", "{body}");
            let arguments = call["function"]["arguments"].as_str().expect("arguments");
            (
                call["id"].as_str().expect("id").to_string(),
                call["function"]["name"].as_str().expect("name").to_string(),
                serde_json::from_str(arguments)
                    .unwrap_or_else(|_| panic!("arguments are not JSON: {body}")),
            )
        })
        .collect()
}

/// A streamed answer's calls put together from their deltas, the number of argument pieces,
/// and its finish reason.
async fn streamed_calls(
    stack: &common::Stack,
    body: &Value,
) -> (Vec<(String, String, Value)>, usize, String) {
    let mut body = body.clone();
    body["stream"] = json!(true);
    let response = stack.post("/v1/chat/completions", &body).await;
    assert_eq!(response.status(), 200);
    let text = response.text().await.expect("stream");
    let mut calls: Vec<(String, String, String)> = Vec::new();
    let mut pieces = 0;
    let mut finish = String::new();
    for data in text.lines().filter_map(|line| line.strip_prefix("data: ")) {
        let Ok(chunk) = serde_json::from_str::<Value>(data) else {
            continue;
        };
        assert!(chunk.get("error").is_none(), "{text}");
        let Some(choice) = chunk["choices"].get(0) else {
            continue;
        };
        if let Some(reason) = choice["finish_reason"].as_str() {
            finish = reason.to_string();
        }
        for part in choice["delta"]["tool_calls"]
            .as_array()
            .into_iter()
            .flatten()
        {
            let index = part["index"].as_u64().expect("index") as usize;
            if let Some(id) = part["id"].as_str() {
                assert_eq!(index, calls.len(), "calls open in order: {text}");
                let name = part["function"]["name"]
                    .as_str()
                    .expect("a call opens with its name");
                calls.push((id.to_string(), name.to_string(), String::new()));
            }
            if let Some(arguments) = part["function"]["arguments"]
                .as_str()
                .filter(|a| !a.is_empty())
            {
                calls[index].2.push_str(arguments);
                pieces += 1;
            }
        }
    }
    let calls = calls
        .into_iter()
        .map(|(id, name, arguments)| {
            let parsed = serde_json::from_str(&arguments)
                .unwrap_or_else(|_| panic!("streamed arguments are not JSON: {text}"));
            (id, name, parsed)
        })
        .collect();
    (calls, pieces, finish)
}

fn assert_weather_calls(calls: &[(String, String, Value)], context: &Value) {
    assert!(!calls.is_empty(), "{context}");
    for (_, name, arguments) in calls {
        assert_eq!(name, "get_weather", "{context}");
        assert!(arguments["city"].is_string(), "{context}");
    }
}

#[tokio::test]
async fn the_clouds_tool_calls_reach_the_client_and_auto_calls_through_either_tier() {
    let cloud = LocalCloud::shared();
    let stack = gateway(cloud.serve_args()).await;
    let cloud_model = format!("cloud/{CLOUD_MODEL}");

    // `cloud/...`: the cloud's calls, whole and streamed, the same.
    let required = ask(&cloud_model, json!("required"));
    let whole = post_chat(&stack, &required).await;
    assert_eq!(whole.status, 200, "{}", whole.body);
    assert_eq!(whole.tier, "cloud");
    assert_eq!(
        whole.body["choices"][0]["finish_reason"], "tool_calls",
        "{}",
        whole.body
    );
    let whole_calls = calls(&whole.body);
    assert_weather_calls(&whole_calls, &whole.body);
    let (streamed, pieces, finish) = streamed_calls(&stack, &required).await;
    assert_eq!(finish, "tool_calls");
    assert!(pieces >= 1);
    let names_and_arguments = |calls: &[(String, String, Value)]| -> Vec<(String, Value)> {
        calls
            .iter()
            .map(|(_, name, arguments)| (name.clone(), arguments.clone()))
            .collect()
    };
    assert_eq!(
        names_and_arguments(&streamed),
        names_and_arguments(&whole_calls)
    );

    // The tool's result goes back; the cloud answers in words.
    let (id, _, arguments) = &whole_calls[0];
    let mut answer = ask(&cloud_model, json!("none"));
    let messages = answer["messages"].as_array_mut().expect("messages");
    messages.push(
        json!({"role": "assistant", "content": null, "tool_calls": [{
        "id": id, "type": "function",
        "function": {"name": "get_weather", "arguments": arguments.to_string()}}]}),
    );
    messages.push(json!({"role": "tool", "tool_call_id": id, "content": "Sunny, 21 degrees."}));
    let answered = post_chat(&stack, &answer).await;
    assert_eq!(answered.status, 200, "{}", answered.body);
    assert_eq!(answered.tier, "cloud");
    assert!(!answered.content().is_empty(), "{}", answered.body);
    assert!(answered.body["choices"][0]["message"]
        .get("tool_calls")
        .is_none());

    // `auto`: whichever tier answers, the calls follow the tool's parameters.
    let routed = post_chat(&stack, &ask("auto", json!("required"))).await;
    assert_eq!(
        routed.status,
        200,
        "{}\n{}",
        routed.body,
        stack.log("coordinator")
    );
    assert_eq!(
        routed.body["choices"][0]["finish_reason"], "tool_calls",
        "{}",
        routed.body
    );
    assert_weather_calls(&calls(&routed.body), &routed.body);
    let (streamed, _, finish) = streamed_calls(&stack, &ask("auto", json!("required"))).await;
    assert_eq!(finish, "tool_calls");
    assert_weather_calls(&streamed, &routed.body);
}
