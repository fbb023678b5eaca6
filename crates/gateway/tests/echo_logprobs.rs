//! `echo` with `logprobs` on `/v1/completions` (an evaluation harness's loglikelihood request)
//! through the whole gateway against a scripted cell: the cell is asked to score the prompt,
//! and the answer starts with the prompt's tokens, the first unscored, in the body and the
//! stream alike. The real model's scores are checked in `engine`'s `prompt_scores` tests and
//! end to end in `fleetgrid`'s client suite.

mod support;

use cell_api::fake::Script;
use cell_api::served::PieceTable;
use gateway::store::TenantClass;
use serde_json::{json, Value};
use support::{Gateway, MODEL};

const PROMPT: &str = "Question: what is two plus two?\nAnswer:";

fn loglikelihood(stream: bool) -> String {
    json!({"model": MODEL, "prompt": PROMPT, "echo": true, "logprobs": 1, "max_tokens": 1,
           "temperature": 0, "stream": stream})
    .to_string()
}

async fn scripted_gateway() -> Gateway {
    let gateway = Gateway::start(TenantClass::Fleet).await;
    let model = gateway.models.lookup(MODEL).expect("the served model");
    gateway
        .cell
        .render_with(PieceTable::build(&model.tokenizer));
    gateway
}

/// The prompt's tokens as the gateway's tokenizer makes them, and each one's text.
fn prompt_tokens(gateway: &Gateway) -> (Vec<i32>, Vec<String>) {
    let submitted = &gateway.cell.submitted()[0];
    let model = gateway.models.lookup(MODEL).expect("the served model");
    let texts = submitted
        .prompt
        .iter()
        .map(|&token| String::from_utf8_lossy(&model.tokenizer.piece(token)).into_owned())
        .collect();
    (submitted.prompt.clone(), texts)
}

/// Checks a completions `logprobs` object for `PROMPT` followed by the one token " 4".
fn assert_prompt_then_answer(gateway: &Gateway, logprobs: &Value) {
    let (prompt, texts) = prompt_tokens(gateway);
    let tokens: Vec<&str> = logprobs["tokens"]
        .as_array()
        .expect("tokens")
        .iter()
        .map(|token| token.as_str().expect("token text"))
        .collect();
    assert_eq!(tokens.len(), prompt.len() + 1, "{logprobs}");
    assert_eq!(tokens[..prompt.len()], texts[..]);
    assert_eq!(tokens.concat(), format!("{PROMPT} 4"));
    let token_logprobs = logprobs["token_logprobs"].as_array().expect("logprobs");
    let top = logprobs["top_logprobs"].as_array().expect("top");
    // The first token has nothing before it to be scored by.
    assert!(
        token_logprobs[0].is_null() && top[0].is_null(),
        "{logprobs}"
    );
    for index in 1..prompt.len() {
        let expected = -0.25 * index as f64;
        assert_eq!(token_logprobs[index].as_f64(), Some(expected), "{index}");
        assert_eq!(
            top[index][&texts[index]].as_f64(),
            Some(expected),
            "{index}"
        );
    }
    assert_eq!(token_logprobs[prompt.len()].as_f64(), Some(-0.5));
    // Each token's text starts where the ones before it end.
    let offsets: Vec<u64> = logprobs["text_offset"]
        .as_array()
        .expect("text_offset")
        .iter()
        .map(|offset| offset.as_u64().expect("an offset"))
        .collect();
    let mut expected = Vec::new();
    let mut at = 0;
    for token in &tokens {
        expected.push(at);
        at += token.chars().count() as u64;
    }
    assert_eq!(offsets, expected);
}

#[tokio::test]
async fn an_echoed_prompt_comes_with_its_tokens_log_probabilities() {
    let gateway = scripted_gateway().await;
    gateway.cell.script([Script::answer(&[" 4"])]);
    let answer = gateway.post("/v1/completions", &loglikelihood(false)).await;
    let body = answer.json();
    assert_eq!(answer.status, 200, "{body}");
    let submitted = &gateway.cell.submitted()[0];
    assert!(submitted.prompt_logprobs);
    assert_eq!(submitted.top_logprobs, 1);
    let choice = &body["choices"][0];
    assert_eq!(choice["text"], format!("{PROMPT} 4"));
    assert_prompt_then_answer(&gateway, &choice["logprobs"]);
    // The prompt is prefilled once, as any completion's: usage counts it once.
    let prompt_len = submitted.prompt.len() as u64;
    assert_eq!(body["usage"]["prompt_tokens"].as_u64(), Some(prompt_len));
    assert_eq!(body["usage"]["completion_tokens"], 1);
}

#[tokio::test]
async fn a_streamed_echo_opens_with_the_prompt_and_its_log_probabilities() {
    let gateway = scripted_gateway().await;
    gateway.cell.script([Script::answer(&[" 4"])]);
    let answer = gateway.post("/v1/completions", &loglikelihood(true)).await;
    assert_eq!(answer.status, 200);
    let chunks: Vec<Value> = answer
        .events()
        .iter()
        .filter(|data| *data != "[DONE]")
        .map(|data| serde_json::from_str(data).expect("a JSON chunk"))
        .collect();
    let first = &chunks[0]["choices"][0];
    assert_eq!(first["text"], PROMPT);
    let (prompt, _) = prompt_tokens(&gateway);
    assert_eq!(
        first["logprobs"]["tokens"].as_array().map(Vec::len),
        Some(prompt.len())
    );
    // The chunks together say what the body says.
    let mut merged =
        json!({"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []});
    let mut text = String::new();
    for chunk in &chunks {
        let choice = &chunk["choices"][0];
        text.push_str(choice["text"].as_str().unwrap_or_default());
        for field in ["tokens", "token_logprobs", "top_logprobs", "text_offset"] {
            let part = choice["logprobs"][field]
                .as_array()
                .cloned()
                .unwrap_or_default();
            merged[field].as_array_mut().expect("a list").extend(part);
        }
    }
    assert_eq!(text, format!("{PROMPT} 4"));
    assert_prompt_then_answer(&gateway, &merged);
}

#[tokio::test]
async fn echo_without_logprobs_does_not_ask_for_the_prompts_scores() {
    let gateway = scripted_gateway().await;
    gateway.cell.script([Script::answer(&[" 4"])]);
    let body = json!({"model": MODEL, "prompt": PROMPT, "echo": true, "max_tokens": 1});
    let answer = gateway.post("/v1/completions", &body.to_string()).await;
    assert_eq!(answer.status, 200, "{}", answer.json());
    assert_eq!(answer.json()["choices"][0]["text"], format!("{PROMPT} 4"));
    assert!(!gateway.cell.submitted()[0].prompt_logprobs);
    // Logprobs without echo: the answer's tokens only, their offsets after nothing.
    gateway.cell.script([Script::answer(&[" 4"])]);
    let body = json!({"model": MODEL, "prompt": PROMPT, "logprobs": 0, "max_tokens": 1});
    let answer = gateway.post("/v1/completions", &body.to_string()).await;
    let logprobs = &answer.json()["choices"][0]["logprobs"];
    assert_eq!(logprobs["tokens"], json!([" 4"]), "{logprobs}");
    assert_eq!(logprobs["text_offset"], json!([0]));
    assert!(!gateway.cell.submitted()[1].prompt_logprobs);
}

#[tokio::test]
async fn a_prompt_of_token_ids_is_run_as_given_and_echoed_as_its_text() {
    let gateway = scripted_gateway().await;
    let model = gateway.models.lookup(MODEL).expect("the served model");
    let ids = model.tokenizer.tokenize(PROMPT, false).expect("tokenize");
    gateway
        .cell
        .script([Script::answer(&[" 4"]), Script::answer(&[" 4"])]);
    for prompt in [json!(ids), json!([ids])] {
        let body = json!({"model": MODEL, "prompt": prompt, "echo": true, "logprobs": 1,
                          "max_tokens": 1});
        let answer = gateway.post("/v1/completions", &body.to_string()).await;
        let reply = answer.json();
        assert_eq!(answer.status, 200, "{reply}");
        assert_eq!(reply["choices"][0]["text"], format!("{PROMPT} 4"));
        assert_prompt_then_answer(&gateway, &reply["choices"][0]["logprobs"]);
    }
    let submitted = gateway.cell.submitted();
    assert!(submitted.iter().all(|generation| generation.prompt == ids));
    // Ids outside the vocabulary, an empty list and several prompts are refused by name.
    let vocab = i64::from(model.tokenizer.vocab_size());
    for prompt in [json!([1, vocab]), json!([-1]), json!([]), json!([[1], [2]])] {
        let body = json!({"model": MODEL, "prompt": prompt, "max_tokens": 1});
        let answer = gateway.post("/v1/completions", &body.to_string()).await;
        assert_eq!(answer.status, 400, "{prompt}: {}", answer.json());
        assert_eq!(answer.json()["error"]["param"], "prompt", "{prompt}");
    }
    assert_eq!(gateway.cell.submitted().len(), 2);
}
