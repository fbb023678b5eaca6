//! Tests of the stream counting and the request shape.

use super::*;

fn spec(ignore_eos: bool) -> LoadSpec {
    LoadSpec {
        target_name: "test".to_owned(),
        base_url: "http://127.0.0.1:9".to_owned(),
        api_key: None,
        model: "smollm2-135m-instruct".to_owned(),
        concurrency: 2,
        requests: 4,
        first_request: 0,
        max_tokens: 128,
        ignore_eos,
        response_format: None,
    }
}

#[test]
fn content_chunks_are_counted_and_usage_wins() {
    let mut count = StreamCount::default();
    let lines = [
        r#"data: {"choices":[{"delta":{"role":"assistant","content":""}}]}"#,
        "",
        r#"data: {"choices":[{"delta":{"content":"Once"}}]}"#,
        ": keep-alive comment",
        r#"data: {"choices":[{"delta":{"content":" upon"}}]}"#,
        r#"data: {"choices":[],"usage":{"prompt_tokens":40,"completion_tokens":128}}"#,
    ];
    for (step, line) in lines.iter().enumerate() {
        let elapsed = Duration::from_millis(10 * step as u64);
        assert_eq!(apply_sse_line(line, &mut count, elapsed), Ok(false));
    }
    assert_eq!(count.content_chunks, 2);
    assert_eq!(count.usage_completion_tokens, Some(128));
    // The first chunk with text, not the role-only one, marks the first token.
    assert_eq!(count.time_to_first_token, Some(Duration::from_millis(20)));
    assert_eq!(
        apply_sse_line("data: [DONE]", &mut count, Duration::ZERO),
        Ok(true)
    );
}

#[test]
fn error_inside_the_stream_fails_the_request() {
    let mut count = StreamCount::default();
    let result = apply_sse_line(
        r#"data: {"error":{"message":"node left"}}"#,
        &mut count,
        Duration::ZERO,
    );
    assert!(result.is_err_and(|reason| reason.contains("node left")));
}

#[test]
fn requests_differ_and_ask_for_usage() {
    let spec = spec(false);
    let first = request_body(&spec, 0);
    let second = request_body(&spec, 1);
    assert_ne!(first["messages"], second["messages"]);
    assert_eq!(first["max_tokens"], 128);
    assert_eq!(first["stream"], true);
    assert_eq!(first["stream_options"]["include_usage"], true);
    assert!(first.get("ignore_eos").is_none());
    assert_eq!(request_body(&self::spec(true), 0)["ignore_eos"], true);
}

#[test]
fn aggregate_rate_is_total_tokens_over_wall_time() {
    let result = LoadResult {
        requests: 4,
        completion_tokens: 512,
        wall: Duration::from_secs(8),
        time_to_first_token_mean: Duration::from_millis(300),
        usage_reported: true,
    };
    assert_eq!(result.aggregate_tokens_per_second(), 64.0);
    assert_eq!(result.completion_tokens_per_request_mean(), 128.0);
}

#[tokio::test]
async fn unreachable_server_is_an_error_not_a_zero() {
    let port = crate::process::free_local_port().expect("free port");
    let mut spec = spec(false);
    spec.base_url = format!("http://127.0.0.1:{port}");
    assert!(matches!(
        run_load(&spec).await,
        Err(BenchError::Request { .. })
    ));
}
