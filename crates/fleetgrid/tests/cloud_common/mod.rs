//! The cloud side of routing tests: the local "cloud" (`fleetgrid cloud
//! serve`, Qwen2.5-Coder-0.5B on our own engine), a gateway stack pointed at
//! it over HTTP, and helpers to read routed responses.
//!
//! Needs both test models in the model store (`cargo xtask test` fetches them).

#![allow(dead_code)]

use std::ffi::OsString;
use std::net::SocketAddr;
use std::sync::OnceLock;
use std::time::Duration;

use serde_json::{json, Value};

use stack::{CloudSpec, LogFile};

use crate::common::{fleetgrid, parse_sse, Process, Stack, StackOptions, Streamed};

pub const CLOUD_MODEL: &str = "qwen2.5-coder-0.5b-instruct";

/// How long the local cloud may take to load its model and connect its node
/// (its own bound on that, so that it is the one to say what went wrong).
const CLOUD_START_WAIT: Duration = Duration::from_secs(300);

/// The variable through which gateways under test get the local cloud's key.
pub const CLOUD_KEY_ENV: &str = "FLEETGRID_TEST_CLOUD_KEY";

pub struct LocalCloud {
    pub dir: tempfile::TempDir,
    pub http: SocketAddr,
    pub process: Process,
}

impl LocalCloud {
    /// Starts `fleetgrid cloud serve` and waits until its node serves.
    pub fn start() -> LocalCloud {
        let dir = tempfile::tempdir().expect("tempdir");
        let spec = CloudSpec {
            data_dir: dir.path().to_owned(),
            http_listen: SocketAddr::from(([127, 0, 0, 1], 0)),
            threads: 1,
            args: ["--parallel", "2", "--context-tokens", "512"]
                .map(OsString::from)
                .into(),
            log: LogFile::create(dir.path().join("cloud.log")),
        };
        let cloud = stack::LocalCloud::start_blocking(&fleetgrid(), &spec, CLOUD_START_WAIT)
            .unwrap_or_else(|error| panic!("the local cloud did not start: {error}"));
        // Every gateway under test reads the key from this variable, which
        // child processes inherit. It is set once, before any gateway starts.
        std::env::set_var(CLOUD_KEY_ENV, &cloud.api_key);
        LocalCloud {
            dir,
            http: cloud.http,
            process: cloud.process,
        }
    }

    /// One local cloud per test binary, started on first use; it exits with
    /// the test process (`--exit-with-parent`).
    pub fn shared() -> &'static LocalCloud {
        static CLOUD: OnceLock<LocalCloud> = OnceLock::new();
        CLOUD.get_or_init(LocalCloud::start)
    }

    pub fn base_url(&self) -> String {
        format!("http://{}/v1", self.http)
    }

    /// `fleetgrid serve` flags that make this the gateway's cloud upstream.
    pub fn serve_args(&self) -> Vec<String> {
        let mut args = upstream_args(&self.base_url());
        args.extend(["--cloud-key-env".to_string(), CLOUD_KEY_ENV.to_string()]);
        args
    }
}

/// `fleetgrid serve` flags for a cloud upstream at `base_url` (no API key).
pub fn upstream_args(base_url: &str) -> Vec<String> {
    ["--cloud-url", base_url, "--cloud-model", CLOUD_MODEL]
        .iter()
        .map(|arg| arg.to_string())
        .collect()
}

/// A gateway with `extra` flags and one plugged-in SmolLM2 vehicle.
pub async fn gateway(extra: Vec<String>) -> Stack {
    let mut stack = Stack::start(StackOptions {
        extra_serve_args: extra,
    });
    stack.add_agent("car-1", 2);
    stack.wait_for_nodes(&["car-1"]).await;
    stack
}

/// Writes a router configuration in which every class of prompt cascades
/// with `mean_logprob >= threshold`, with the given streaming limits.
pub fn router_config(
    dir: &std::path::Path,
    threshold: f32,
    holdback_tokens: u32,
    release_lag_tokens: u32,
    collapse_window_mean: f32,
) -> std::path::PathBuf {
    let cascade = json!({"route": "cascade", "feature": "mean_logprob", "threshold": threshold});
    let config = json!({
        "version": 1,
        "policies": {
            "multiple_choice": cascade,
            "math": cascade,
            "code": cascade,
            "open": cascade,
        },
        "cloud_prompt_chars_min": null,
        "incremental": {
            "holdback_tokens": holdback_tokens,
            "release_lag_tokens": release_lag_tokens,
            "collapse_window_mean": collapse_window_mean,
        },
        "prices": {
            "edge": {"prompt_per_million": 20000, "completion_per_million": 20000},
            "cloud": {"prompt_per_million": 150000, "completion_per_million": 600000},
        },
    });
    let path = dir.join("router.json");
    std::fs::write(&path, config.to_string()).expect("write router config");
    path
}

/// A chat body at temperature 0 (greedy, so answers are repeatable).
pub fn chat(model: &str, question: &str, max_tokens: u32) -> Value {
    json!({
        "model": model,
        "messages": [{"role": "user", "content": question}],
        "max_tokens": max_tokens,
        "temperature": 0.0,
        "seed": 7,
    })
}

/// A routed response: status, the route headers and the JSON body.
pub struct Routed {
    pub status: u16,
    pub tier: String,
    pub reason: String,
    pub body: Value,
}

impl Routed {
    pub fn content(&self) -> &str {
        self.body["choices"][0]["message"]["content"]
            .as_str()
            .unwrap_or_default()
    }
}

pub async fn post_chat(stack: &Stack, body: &Value) -> Routed {
    let response = stack.post("/v1/chat/completions", body).await;
    let header = |name: &str| {
        response
            .headers()
            .get(name)
            .and_then(|value| value.to_str().ok())
            .unwrap_or_default()
            .to_string()
    };
    let (tier, reason) = (
        header("x-fleetgrid-tier"),
        header("x-fleetgrid-route-reason"),
    );
    let status = response.status().as_u16();
    let text = response.text().await.expect("body");
    let body = serde_json::from_str(&text).unwrap_or_else(|_| json!({ "raw": text }));
    Routed {
        status,
        tier,
        reason,
        body,
    }
}

/// A streamed routed chat: the parsed stream, every chunk's `fleetgrid`
/// field in order, and the headers.
pub struct RoutedStream {
    pub streamed: Streamed,
    pub route_fields: Vec<Value>,
    pub tier: String,
    pub reason: String,
}

pub async fn stream_chat(stack: &Stack, body: &Value) -> RoutedStream {
    let mut body = body.clone();
    body["stream"] = json!(true);
    body["stream_options"] = json!({"include_usage": true});
    let response = stack.post("/v1/chat/completions", &body).await;
    let status = response.status();
    let header = |name: &str| {
        response
            .headers()
            .get(name)
            .and_then(|value| value.to_str().ok())
            .unwrap_or_default()
            .to_string()
    };
    let (tier, reason) = (
        header("x-fleetgrid-tier"),
        header("x-fleetgrid-route-reason"),
    );
    let text = response.text().await.expect("stream body");
    assert_eq!(status, 200, "stream failed: {text}");
    let route_fields = text
        .lines()
        .filter_map(|line| line.strip_prefix("data: "))
        .filter(|data| *data != "[DONE]")
        .filter_map(|data| serde_json::from_str::<Value>(data).ok())
        .filter_map(|chunk| chunk.get("fleetgrid").cloned())
        .collect();
    RoutedStream {
        streamed: parse_sse(&text),
        route_fields,
        tier,
        reason,
    }
}
