//! The official `openai` Python SDK against the gateway, with and without
//! streaming. Needs the virtual environment `cargo xtask test` prepares
//! (`FLEETGRID_TEST_PYTHON` names its interpreter).

mod common;

use common::{run_python, Stack, MODEL};

const SCRIPT: &str = r#"
import json, sys
from openai import OpenAI
base_url, api_key, model = sys.argv[1], sys.argv[2], sys.argv[3]
client = OpenAI(base_url=base_url, api_key=api_key, max_retries=0)
messages = [{"role": "user", "content": "What is the capital of France?"}]
plain = client.chat.completions.create(model=model, messages=messages, max_tokens=24, temperature=0)
again = client.chat.completions.create(model=model, messages=messages, max_tokens=24, temperature=0)
parts = []
for chunk in client.chat.completions.create(model=model, messages=messages, max_tokens=24, temperature=0, stream=True):
    if chunk.choices and chunk.choices[0].delta.content:
        parts.append(chunk.choices[0].delta.content)
try:
    client.chat.completions.create(model="no-such-model", messages=messages)
    error = None
except Exception as exc:
    error = type(exc).__name__
print(json.dumps({
    "plain": plain.choices[0].message.content,
    "finish_reason": plain.choices[0].finish_reason,
    "usage": plain.usage.total_tokens,
    "prompt_tokens": again.usage.prompt_tokens,
    "cached_tokens": again.usage.prompt_tokens_details.cached_tokens,
    "streamed": "".join(parts),
    "error": error,
}))
"#;

#[tokio::test(flavor = "multi_thread")]
async fn the_official_openai_sdk_completes_a_chat_plain_and_streamed() {
    let mut stack = Stack::start(Default::default());
    stack.add_agent("car-1", 2);
    stack.wait_for_nodes(&["car-1"]).await;
    let args = vec![stack.url("/v1"), stack.api_key.clone(), MODEL.to_string()];
    let result = run_python(SCRIPT, args).await;
    let plain = result["plain"].as_str().expect("plain content");
    assert!(plain.contains("Paris"), "unexpected answer {plain:?}");
    assert_eq!(result["streamed"].as_str(), Some(plain));
    assert!(result["usage"].as_u64().is_some_and(|total| total > 0));
    // The SDK reads the prompt head the node kept for the repeated request (it prefills at
    // least the last 2 tokens again).
    let prompt_tokens = result["prompt_tokens"].as_u64().expect("prompt tokens");
    let cached = result["cached_tokens"].as_u64().expect("cached tokens");
    assert!(cached > 0 && cached <= prompt_tokens - 2, "{result}");
    assert_eq!(result["error"], "NotFoundError");
}
