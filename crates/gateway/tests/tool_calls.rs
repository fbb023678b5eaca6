//! Tool calls through the whole gateway against a scripted cell: what the cell is asked to
//! run (the conversation rendered by the model's template with the tools described, and the
//! grammar a call follows), the calls read back out of the vehicle's text, a conversation with
//! a call and its result sent back, and `/tokenize` counting a chat with tools as the
//! completion does. The answers the real model gives are in `fleetgrid`'s client suite.

mod support;

use cell_api::fake::Script;
use gateway::store::TenantClass;
use serde_json::{json, Value};
use support::{Gateway, MODEL};

fn weather() -> Value {
    json!({"type": "function", "function": {
        "name": "get_weather", "description": "Current weather in a city",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}},
                       "required": ["city"]},
    }})
}

fn ask(extra: Value) -> Value {
    let mut body = json!({
        "model": MODEL,
        "messages": [{"role": "user", "content": "Weather in Paris?"}],
        "tools": [weather()],
    });
    for (key, value) in extra.as_object().into_iter().flatten() {
        body[key] = value.clone();
    }
    body
}

#[tokio::test]
async fn a_call_is_asked_for_under_its_grammar_and_read_back_into_tool_calls() {
    let gateway = Gateway::start(TenantClass::Fleet).await;
    gateway.cell.script([Script::answer(&[
        r#"{"tool_calls": [{"name": "get_"#,
        r#"weather", "arguments": {"city": "#,
        r#""Paris"}}]}"#,
    ])]);
    let answer = gateway
        .post(
            "/v1/chat/completions",
            &ask(json!({"tool_choice": "required"})).to_string(),
        )
        .await;
    let body = answer.json();
    assert_eq!(answer.status, 200, "{body}");
    let choice = &body["choices"][0];
    assert_eq!(choice["finish_reason"], "tool_calls");
    assert!(choice["message"]["content"].is_null());
    let call = &choice["message"]["tool_calls"][0];
    assert_eq!(call["type"], "function");
    assert_eq!(call["function"]["name"], "get_weather");
    assert_eq!(call["function"]["arguments"], r#"{"city": "Paris"}"#);
    assert!(call["id"]
        .as_str()
        .is_some_and(|id| id.starts_with("call_")));

    // The vehicle was given the tools in its prompt and a grammar to follow.
    let submitted = &gateway.cell.submitted()[0];
    assert!(!submitted.sampling.grammar.is_empty());
    let prompt = gateway_prompt_text(&gateway, &submitted.prompt);
    assert!(prompt.contains("get_weather"), "{prompt}");
    assert!(prompt.contains("tool_calls"), "{prompt}");
}

#[tokio::test]
async fn a_calls_result_sent_back_is_rendered_and_none_asks_for_words() {
    let gateway = Gateway::start(TenantClass::Fleet).await;
    gateway.cell.script([Script::answer(&["It is sunny."])]);
    let mut body = ask(json!({"tool_choice": "none"}));
    let messages = body["messages"].as_array_mut().expect("messages");
    messages.push(
        json!({"role": "assistant", "content": null, "tool_calls": [{
        "id": "call_1", "type": "function",
        "function": {"name": "get_weather", "arguments": "{\"city\": \"Paris\"}"}}]}),
    );
    messages.push(json!({"role": "tool", "tool_call_id": "call_1", "content": "Sunny, 21 C"}));
    let answer = gateway
        .post("/v1/chat/completions", &body.to_string())
        .await;
    let reply = answer.json();
    assert_eq!(answer.status, 200, "{reply}");
    assert_eq!(reply["choices"][0]["message"]["content"], "It is sunny.");
    assert_eq!(reply["choices"][0]["finish_reason"], "stop");
    let submitted = &gateway.cell.submitted()[0];
    // `none`: no grammar, and the tools are not offered; the call and its result are there.
    assert!(submitted.sampling.grammar.is_empty());
    let prompt = gateway_prompt_text(&gateway, &submitted.prompt);
    assert!(
        prompt.contains(
            r#"{"tool_calls": [{"name": "get_weather", "arguments": {"city": "Paris"}}]}"#
        ),
        "{prompt}"
    );
    assert!(prompt.contains("Sunny, 21 C"), "{prompt}");
    assert!(!prompt.contains("You can call"), "{prompt}");
}

#[tokio::test]
async fn a_tokenized_chat_with_tools_counts_what_its_completion_is_given() {
    let gateway = Gateway::start(TenantClass::Fleet).await;
    gateway
        .cell
        .script([Script::answer(&[r#"{"response": "Hi"}"#])]);
    let answer = gateway
        .post("/v1/chat/completions", &ask(json!({})).to_string())
        .await;
    assert_eq!(answer.status, 200, "{}", answer.json());
    assert_eq!(answer.json()["choices"][0]["message"]["content"], "Hi");
    let tokenized = gateway
        .post(
            "/tokenize",
            &json!({"model": MODEL, "messages": ask(json!({}))["messages"], "tools": [weather()]})
                .to_string(),
        )
        .await;
    assert_eq!(tokenized.status, 200, "{}", tokenized.json());
    assert_eq!(
        tokenized.json()["tokens"],
        json!(gateway.cell.submitted()[0].prompt)
    );
    let text_prompt = gateway
        .post(
            "/tokenize",
            &json!({"model": MODEL, "prompt": "x", "tools": [weather()]}).to_string(),
        )
        .await;
    assert_eq!(text_prompt.status, 400);
    assert_eq!(text_prompt.json()["error"]["param"], "tools");
}

/// The text of prompt tokens, as the gateway's own tokenizer reads them.
fn gateway_prompt_text(gateway: &Gateway, tokens: &[i32]) -> String {
    let model = gateway.models.lookup(MODEL).expect("the served model");
    model.tokenizer.detokenize(tokens)
}
