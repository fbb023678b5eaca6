//! No field silently ignored: every key of a request either changes what the cell is asked to
//! do, is on the documented list of accepted fields, or is refused with a 400 naming it.
//! In-process against a scripted cell.

mod support;

use cell_api::fake::Script;
use gateway::store::TenantClass;
use serde_json::{json, Value};
use support::{Gateway, MODEL};

fn chat(extra: Value) -> String {
    let mut body = json!({"model": MODEL, "messages": [{"role": "user", "content": "Hi"}]});
    if let (Some(body), Some(extra)) = (body.as_object_mut(), extra.as_object()) {
        body.extend(extra.clone());
    }
    body.to_string()
}

fn completion(extra: Value) -> String {
    let mut body = json!({"model": MODEL, "prompt": "Once upon a time"});
    if let (Some(body), Some(extra)) = (body.as_object_mut(), extra.as_object()) {
        body.extend(extra.clone());
    }
    body.to_string()
}

/// Posts `body` and expects a 400 naming `param` with `code`; the cell saw nothing.
async fn assert_refused(gateway: &Gateway, path: &str, body: &str, param: &str, code: &str) {
    let answer = gateway.post(path, body).await;
    assert_eq!(answer.status, 400, "{body}");
    let error = &answer.json()["error"];
    assert_eq!(error["param"], param, "{body}: {error}");
    assert_eq!(error["code"], code, "{body}: {error}");
    assert_eq!(error["type"], "invalid_request_error");
    assert!(
        error["message"]
            .as_str()
            .is_some_and(|message| message.contains(param.rsplit('.').next().unwrap_or(param))),
        "the message names the field: {error}"
    );
    assert!(gateway.cell.submitted().is_empty(), "{body}");
}

/// Posts `body` and expects a 200.
async fn assert_served(gateway: &Gateway, path: &str, body: &str) {
    let answer = gateway.post(path, body).await;
    assert_eq!(
        answer.status,
        200,
        "{}",
        String::from_utf8_lossy(&answer.body)
    );
}

#[tokio::test]
async fn every_field_the_gateway_does_not_implement_is_refused_by_name() {
    let gateway = Gateway::start(TenantClass::Fleet).await;
    let chat_path = "/v1/chat/completions";
    let unknown = "unknown_parameter";
    let unsupported = "unsupported_parameter";
    let cases = [
        (
            chat(json!({"guided_json": {"type": "object"}})),
            "guided_json",
            unknown,
        ),
        (chat(json!({"mirostat": 2})), "mirostat", unknown),
        (chat(json!({"echo": true})), "echo", unknown),
        (
            chat(json!({"functions": [{"name": "f"}]})),
            "functions",
            unknown,
        ),
        (chat(json!({"audio": {"voice": "alloy"}})), "audio", unknown),
        (chat(json!({"store": true, "n": 2})), "store", unsupported),
        (
            chat(json!({"service_tier": "priority"})),
            "service_tier",
            unsupported,
        ),
        (
            chat(json!({"modalities": ["text", "audio"]})),
            "modalities",
            unsupported,
        ),
        (
            chat(
                json!({"tools": [{"type": "function", "function": {"name": "f", "parameters": {
                "type": "object", "required": ["n"],
                "properties": {"n": {"type": "integer", "minimum": 5, "maximum": 1}}}}}],
                "tool_choice": "required"}),
            ),
            "tools",
            "invalid_value",
        ),
        (
            chat(json!({"tools": [{"type": "retrieval"}]})),
            "tools[0].type",
            "invalid_value",
        ),
        (
            chat(
                json!({"tools": [{"type": "function", "function": {"name": "f"}}],
                "tool_choice": {"type": "function", "function": {"name": "g"}}}),
            ),
            "tool_choice",
            "invalid_value",
        ),
        (
            chat(
                json!({"tools": [{"type": "function", "function": {"name": "f"}}],
                "response_format": {"type": "json_object"}}),
            ),
            "response_format",
            unsupported,
        ),
        (
            chat(json!({"tool_choice": "required"})),
            "tool_choice",
            "invalid_value",
        ),
        (
            json!({"model": MODEL, "messages": [{"role": "tool", "content": "42"}]}).to_string(),
            "messages[0].tool_call_id",
            "missing_required_parameter",
        ),
        (
            chat(json!({"parallel_tool_calls": true})),
            "parallel_tool_calls",
            "invalid_value",
        ),
        (chat(json!({"n": 17})), "n", "invalid_value"),
        (chat(json!({"n": 0})), "n", "invalid_value"),
        (
            json!({"model": MODEL, "messages": [{"role": "user", "content": "Hi", "name": "bob"}]})
                .to_string(),
            "messages[0].name",
            unsupported,
        ),
        (
            json!({"model": MODEL, "messages": [{"role": "user", "content": "Hi", "weight": 2}]})
                .to_string(),
            "messages[0].weight",
            unknown,
        ),
    ];
    for (body, param, code) in &cases {
        assert_refused(&gateway, chat_path, body, param, code).await;
    }
    let completions = "/v1/completions";
    let cases = [
        (
            completion(json!({"top_logprobs": 2})),
            "top_logprobs",
            unknown,
        ),
        (
            completion(json!({"max_completion_tokens": 4})),
            "max_completion_tokens",
            unknown,
        ),
        (
            completion(json!({"best_of": 2, "n": 3})),
            "best_of",
            "invalid_value",
        ),
        (
            completion(json!({"best_of": 3, "stream": true})),
            "best_of",
            "invalid_value",
        ),
        (completion(json!({"store": true})), "store", unknown),
        (
            completion(json!({"suffix": "The end."})),
            "suffix",
            unsupported,
        ),
    ];
    for (body, param, code) in &cases {
        assert_refused(&gateway, completions, body, param, code).await;
    }
}

#[tokio::test]
async fn sampling_fields_out_of_range_are_refused_by_name() {
    let gateway = Gateway::start(TenantClass::Fleet).await;
    let path = "/v1/chat/completions";
    let cases = [
        (json!({"presence_penalty": 2.5}), "presence_penalty"),
        (json!({"frequency_penalty": -3}), "frequency_penalty"),
        (json!({"repetition_penalty": 0}), "repetition_penalty"),
        (json!({"min_p": 1.5}), "min_p"),
        (json!({"logit_bias": {"50": 101}}), "logit_bias"),
        (json!({"logit_bias": {"token": 5}}), "logit_bias"),
        (json!({"logit_bias": {"999999": 5}}), "logit_bias"),
    ];
    for (extra, param) in cases {
        assert_refused(&gateway, path, &chat(extra), param, "invalid_value").await;
    }
    let too_many: serde_json::Map<String, Value> = (0..301)
        .map(|token| (token.to_string(), json!(1)))
        .collect();
    assert_refused(
        &gateway,
        path,
        &chat(json!({ "logit_bias": too_many })),
        "logit_bias",
        "invalid_value",
    )
    .await;
}

#[tokio::test]
async fn penalties_min_p_and_logit_bias_reach_the_cell_as_the_client_set_them() {
    let gateway = Gateway::start(TenantClass::Fleet).await;
    gateway.cell.script([Script::answer(&["ok"])]);
    assert_served(
        &gateway,
        "/v1/chat/completions",
        &chat(json!({
            "presence_penalty": 0.5,
            "frequency_penalty": -0.25,
            "repetition_penalty": 1.1,
            "min_p": 0.05,
            "top_k": 40,
            "logit_bias": {"300": -100, "17": 2.5},
            "seed": 9,
        })),
    )
    .await;
    let submitted = gateway.cell.submitted();
    let sampling = &submitted[0].sampling;
    assert_eq!(sampling.presence_penalty, 0.5);
    assert_eq!(sampling.frequency_penalty, -0.25);
    assert_eq!(sampling.repetition_penalty, 1.1);
    assert_eq!(sampling.min_p, 0.05);
    assert_eq!(sampling.top_k, 40);
    assert_eq!(sampling.seed, 9);
    let bias: Vec<(i32, f32)> = sampling
        .logit_bias
        .iter()
        .map(|entry| (entry.token, entry.bias))
        .collect();
    assert_eq!(bias, vec![(17, 2.5), (300, -100.0)]);
}

#[tokio::test]
async fn documented_harmless_fields_and_nulls_are_accepted() {
    let gateway = Gateway::start(TenantClass::Fleet).await;
    gateway
        .cell
        .script([Script::answer(&["ok"]), Script::answer(&["ok"])]);
    let returned_message = json!({"role": "assistant", "content": "Hello", "refusal": null,
        "tool_calls": [], "annotations": [], "function_call": null, "audio": null});
    let body = json!({
        "model": MODEL,
        "messages": [{"role": "user", "content": "Hi"}, returned_message, {"role": "user", "content": "Again"}],
        "user": "end-user-7", "safety_identifier": "hash", "metadata": {"run": "a"},
        "prompt_cache_key": "k", "store": false, "service_tier": "auto", "modalities": ["text"],
        "response_format": {"type": "text"}, "tool_choice": "none", "tools": null,
        "presence_penalty": 0, "frequency_penalty": 0, "logit_bias": {}, "best_of": null,
    });
    assert_served(&gateway, "/v1/chat/completions", &body.to_string()).await;
    assert_served(
        &gateway,
        "/v1/completions",
        &completion(json!({"best_of": 1, "echo": true, "user": "u"})),
    )
    .await;
    assert_eq!(gateway.cell.submitted().len(), 2);
}

#[tokio::test]
async fn a_json_schema_reaches_the_cell_as_a_grammar_and_a_schema_the_fleet_cannot_follow_is_refused(
) {
    let gateway = Gateway::start(TenantClass::Fleet).await;
    gateway
        .cell
        .script([Script::answer(&["{}"]), Script::answer(&["{\"a\": 1}"])]);
    let schema = json!({"type": "object", "properties": {"a": {"type": "integer"}},
        "required": ["a"], "additionalProperties": false});
    let format = json!({"type": "json_schema",
        "json_schema": {"name": "thing", "schema": schema, "strict": true}});
    for response_format in [json!({"type": "json_object"}), format] {
        assert_served(
            &gateway,
            "/v1/chat/completions",
            &chat(json!({ "response_format": response_format })),
        )
        .await;
    }
    let submitted = gateway.cell.submitted();
    assert_eq!(submitted.len(), 2);
    assert!(submitted
        .iter()
        .all(|generation| !generation.sampling.grammar.is_empty()));
    assert_ne!(submitted[0].sampling.grammar, submitted[1].sampling.grammar);

    let refused = Gateway::start(TenantClass::Fleet).await;
    let path = "/v1/chat/completions";
    let unsatisfiable = json!({"type": "json_schema", "json_schema": {"name": "n",
        "schema": {"type": "integer", "minimum": 5, "maximum": 1}}});
    let unnamed = json!({"type": "json_schema", "json_schema": {"schema": {}}});
    let extra = json!({"type": "json_schema", "json_schema": {"name": "n", "shape": {}}});
    for (extra_fields, param, code) in [
        (
            json!({"response_format": unsatisfiable}),
            "response_format",
            "invalid_value",
        ),
        (
            json!({"response_format": unnamed}),
            "response_format",
            "invalid_value",
        ),
        (
            json!({"response_format": extra}),
            "response_format",
            "invalid_value",
        ),
        (
            json!({"response_format": {"type": "xml"}}),
            "response_format",
            "invalid_value",
        ),
        (
            json!({"response_format": {"type": "json_schema"}}),
            "response_format",
            "missing_required_parameter",
        ),
        (
            json!({"response_format": {"type": "json_object"}, "ignore_eos": true}),
            "ignore_eos",
            "invalid_value",
        ),
    ] {
        assert_refused(&refused, path, &chat(extra_fields), param, code).await;
    }
}

/// OpenAI's predicted outputs: the prediction reaches the cell as the answer's tokens would be,
/// and the usage says how much of it the answer took from its start and how much it did not.
#[tokio::test]
async fn a_prediction_reaches_the_cell_as_tokens_and_the_usage_counts_what_the_answer_took() {
    let gateway = Gateway::start(TenantClass::Fleet).await;
    let tokenizer = &gateway.models.all()[0].tokenizer;
    let predicted = " Paris is the capital of France";
    let tokens = tokenizer.tokenize(predicted, false).expect("tokenize");
    assert!(tokens.len() > 3, "{tokens:?}");
    let piece = |id: i32| String::from_utf8_lossy(&tokenizer.piece(id)).into_owned();
    // The answer takes the prediction's first two tokens, then parts from it.
    let answer: Vec<(i32, String)> = tokens[..2]
        .iter()
        .chain(&[tokens[3]])
        .map(|&id| (id, piece(id)))
        .collect();
    gateway.cell.script([Script::AnswerTokens(answer.clone())]);
    let text_prediction = json!({"prediction": {"type": "content", "content": predicted}});
    let answer_body = gateway
        .post("/v1/chat/completions", &chat(text_prediction))
        .await;
    assert_eq!(answer_body.status, 200);
    let submitted = gateway.cell.submitted();
    assert_eq!(submitted[0].draft, tokens);
    assert_eq!(
        answer_body.json()["usage"]["completion_tokens_details"],
        json!({"accepted_prediction_tokens": 2, "rejected_prediction_tokens": tokens.len() - 2})
    );

    // Text parts, and on completions token ids, as its prompt may be; cut to `max_tokens`.
    gateway.cell.script([Script::AnswerTokens(answer.clone())]);
    let parts = json!({"prediction": {"type": "content", "content": [
        {"type": "text", "text": " Paris is"}, {"type": "text", "text": " the capital of France"}]}});
    assert_served(&gateway, "/v1/chat/completions", &chat(parts)).await;
    gateway.cell.script([Script::AnswerTokens(answer)]);
    let ids = json!({"prediction": {"type": "content", "content": tokens}, "max_tokens": 3});
    assert_served(&gateway, "/v1/completions", &completion(ids)).await;
    let submitted = gateway.cell.submitted();
    assert_eq!(submitted[1].draft, tokens);
    assert_eq!(submitted[2].draft, tokens[..3]);
}

#[tokio::test]
async fn a_prediction_the_gateway_cannot_follow_is_refused_by_name() {
    let gateway = Gateway::start(TenantClass::Fleet).await;
    let invalid = "invalid_value";
    let cases = [
        (
            "/v1/chat/completions",
            chat(json!({"prediction": {"type": "content", "content": [1, 2]}})),
            invalid,
        ),
        (
            "/v1/chat/completions",
            chat(json!({"prediction": {"type": "text", "content": "Hi"}})),
            invalid,
        ),
        (
            "/v1/chat/completions",
            chat(json!({"prediction": "Hi"})),
            invalid,
        ),
        (
            "/v1/completions",
            completion(json!({"prediction": {"type": "content", "content": [1, -4]}})),
            invalid,
        ),
        (
            "/v1/completions",
            completion(json!({"prediction": {"type": "content", "content": "a"},
                "echo": true, "logprobs": 1})),
            "unsupported_parameter",
        ),
    ];
    for (path, body, code) in cases {
        assert_refused(&gateway, path, &body, "prediction", code).await;
    }
}
