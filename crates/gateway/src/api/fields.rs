//! Which request fields the gateway knows, so that none is silently ignored.
//!
//! Every key of a request body (and of each chat message) is one of:
//! - **implemented**: it changes the answer as OpenAI (or, for an extension, llama-server and
//!   vLLM) define it; `validate` checks its value;
//! - **accepted**: on the documented list of fields that ask for nothing a client could miss
//!   (an end-user id, metadata for the client's own bookkeeping, kept with a stored
//!   completion), or accepted only with the value that asks for what the gateway does anyway
//!   (`modalities: ["text"]`); any other value is refused;
//! - anything else is refused with a 400 naming it, as OpenAI refuses an argument it does not
//!   recognise.
//!
//! A field whose value is `null` counts as absent, as in OpenAI's API: clients that send a
//! previous answer's message back send its empty fields as `null`.
//!
//! `docs/API.md` is the same list for users; keep the two together.

use serde_json::{Map, Value};

use super::error::ApiError;
use super::validate::Endpoint;

/// Fields of both endpoints that change the answer.
const SHARED_IMPLEMENTED: &[&str] = &[
    "model",
    "max_tokens",
    "temperature",
    "top_p",
    "top_k",
    "min_p",
    "seed",
    "stop",
    "stream",
    "stream_options",
    "logprobs",
    "n",
    "presence_penalty",
    "frequency_penalty",
    "repetition_penalty",
    "logit_bias",
    "ignore_eos",
    "return_tokens_as_token_ids",
    "quality",
    "prediction",
];

/// Fields only `POST /v1/chat/completions` has that change the answer.
const CHAT_IMPLEMENTED: &[&str] = &[
    "messages",
    "max_completion_tokens",
    "top_logprobs",
    "response_format",
    "tools",
    "tool_choice",
    "parallel_tool_calls",
    "store",
    "on_clawback",
];

/// Fields only `POST /v1/completions` has that change the answer.
const COMPLETION_IMPLEMENTED: &[&str] = &["prompt", "suffix", "echo", "best_of"];

/// Accepted with any value, on both endpoints: they identify or annotate the request for the
/// client's own use and ask nothing of the answer.
const ACCEPTED_ANY: &[&str] = &["user", "safety_identifier", "metadata", "prompt_cache_key"];

/// A field accepted with some values only: its name, which values, and why others are refused.
type AcceptedIf = (&'static str, fn(&Value) -> bool, &'static str);

/// Accepted on chat only with the one value that asks for what the gateway does anyway.
const CHAT_ACCEPTED_IF: &[AcceptedIf] = &[
    (
        "service_tier",
        |value| matches!(value.as_str(), Some("auto" | "default")),
        "'service_tier' may only be 'auto' or 'default'; the tenant's class sets its priority here",
    ),
    (
        "modalities",
        |value| value == &serde_json::json!(["text"]),
        "'modalities' may only be [\"text\"]: text is the only modality",
    ),
];

/// Fields of a chat message that change the answer.
const MESSAGE_IMPLEMENTED: &[&str] = &["role", "content", "tool_calls", "tool_call_id"];

/// Fields of an assistant message sent back as it came that only ever hold what the gateway
/// itself never produces; accepted when empty.
const MESSAGE_ACCEPTED_EMPTY: &[&str] = &["function_call", "audio", "refusal", "annotations"];

/// Checks every key of a request body of `endpoint`, and of each of its chat messages.
pub fn check(body: &Map<String, Value>, endpoint: Endpoint) -> Result<(), ApiError> {
    let implemented = match endpoint {
        Endpoint::Chat => CHAT_IMPLEMENTED,
        Endpoint::Completion => COMPLETION_IMPLEMENTED,
    };
    for (key, value) in body {
        let key_str = key.as_str();
        if value.is_null()
            || SHARED_IMPLEMENTED.contains(&key_str)
            || implemented.contains(&key_str)
        {
            continue;
        }
        if ACCEPTED_ANY.contains(&key.as_str()) {
            continue;
        }
        let accepted_if = CHAT_ACCEPTED_IF
            .iter()
            .filter(|_| endpoint == Endpoint::Chat)
            .find(|(name, _, _)| name == key);
        match accepted_if {
            Some((_, accepts, _)) if accepts(value) => continue,
            Some((_, _, why)) => return Err(refused(key, why)),
            None => return Err(unrecognized(key)),
        }
    }
    if endpoint == Endpoint::Chat {
        if let Some(Value::Array(messages)) = body.get("messages") {
            for (index, message) in messages.iter().enumerate() {
                if let Value::Object(message) = message {
                    check_message(message, index)?;
                }
            }
        }
    }
    Ok(())
}

fn check_message(message: &Map<String, Value>, index: usize) -> Result<(), ApiError> {
    for (key, value) in message {
        if value.is_null() || MESSAGE_IMPLEMENTED.contains(&key.as_str()) {
            continue;
        }
        let param = format!("messages[{index}].{key}");
        let empty = value.as_array().is_some_and(Vec::is_empty);
        if MESSAGE_ACCEPTED_EMPTY.contains(&key.as_str()) {
            if empty {
                continue;
            }
            return Err(refused(
                &param,
                &format!("'{param}' is not supported in a message sent to this model"),
            ));
        }
        if key == "name" {
            return Err(refused(
                &param,
                "message 'name's are not supported: the models' chat templates have no place for them",
            ));
        }
        return Err(unrecognized(&param));
    }
    Ok(())
}

fn refused(param: &str, why: &str) -> ApiError {
    ApiError::invalid(why, Some(param), "unsupported_parameter")
}

/// OpenAI's answer to an argument it does not know.
fn unrecognized(param: &str) -> ApiError {
    ApiError::invalid(
        format!("Unrecognized request argument supplied: {param}"),
        Some(param),
        "unknown_parameter",
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn check_body(body: Value, endpoint: Endpoint) -> Result<(), String> {
        let Value::Object(body) = body else {
            unreachable!("bodies here are objects")
        };
        check(&body, endpoint).map_err(|error| error.param.unwrap_or_default())
    }

    #[test]
    fn an_unknown_field_is_refused_by_name_and_null_counts_as_absent() {
        let body = json!({"model": "m", "messages": [], "guided_json": {"type": "object"}});
        assert_eq!(check_body(body, Endpoint::Chat), Err("guided_json".into()));
        let body = json!({"model": "m", "messages": [], "guided_json": null});
        assert_eq!(check_body(body, Endpoint::Chat), Ok(()));
    }

    #[test]
    fn a_field_of_one_endpoint_is_unknown_on_the_other() {
        let body = json!({"model": "m", "prompt": "x", "top_logprobs": 2});
        assert_eq!(
            check_body(body, Endpoint::Completion),
            Err("top_logprobs".into())
        );
        let body = json!({"model": "m", "messages": [], "echo": true});
        assert_eq!(check_body(body, Endpoint::Chat), Err("echo".into()));
    }

    #[test]
    fn fields_accepted_only_with_one_value_refuse_any_other() {
        for (key, good, bad) in [
            ("service_tier", json!("auto"), json!("priority")),
            ("modalities", json!(["text"]), json!(["text", "audio"])),
        ] {
            let mut body = json!({"model": "m", "messages": []});
            body[key] = good;
            assert_eq!(check_body(body.clone(), Endpoint::Chat), Ok(()), "{key}");
            body[key] = bad;
            assert_eq!(check_body(body, Endpoint::Chat), Err(key.into()));
        }
    }

    #[test]
    fn a_message_sent_back_as_it_came_passes_and_a_named_message_is_refused() {
        let returned = json!({"role": "assistant", "content": "Hi", "refusal": null,
            "tool_calls": [], "annotations": [], "audio": null, "function_call": null});
        let body = json!({"model": "m", "messages": [returned]});
        assert_eq!(check_body(body, Endpoint::Chat), Ok(()));
        let named = json!({"role": "user", "content": "Hi", "name": "bob"});
        let body = json!({"model": "m", "messages": [{"role": "system", "content": "x"}, named]});
        assert_eq!(
            check_body(body, Endpoint::Chat),
            Err("messages[1].name".into())
        );
        let calls = json!({"role": "assistant", "content": null,
            "tool_calls": [{"id": "c", "type": "function", "function": {"name": "f", "arguments": "{}"}}]});
        let result = json!({"role": "tool", "tool_call_id": "c", "content": "42"});
        let body = json!({"model": "m", "messages": [calls, result]});
        assert_eq!(check_body(body, Endpoint::Chat), Ok(()));
    }
}
