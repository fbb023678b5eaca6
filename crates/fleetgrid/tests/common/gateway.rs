//! A client of one gateway under test, whoever started it (a test's own
//! stack, `fleetgrid demo`): requests as its tenant, `/health`, `/metrics`
//! and streamed answers.

use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

/// How often [`Gateway::wait_for_metric`] reads `/metrics`.
pub const METRIC_POLL_INTERVAL: Duration = Duration::from_millis(50);

/// A gateway and the API key of the tenant a test speaks as.
pub struct Gateway {
    pub http: SocketAddr,
    pub api_key: String,
}

impl Gateway {
    pub fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.http)
    }

    pub fn client(&self) -> reqwest::Client {
        reqwest::Client::new()
    }

    /// `/health` as anyone sees it: healthy or not, nothing more.
    pub async fn health(&self) -> serde_json::Value {
        reqwest::get(self.url("/health"))
            .await
            .expect("health")
            .json()
            .await
            .expect("health json")
    }

    /// `/health` as the operator sees it (the tenant is fleet-class): with
    /// the connected nodes.
    pub async fn operator_health(&self) -> serde_json::Value {
        self.client()
            .get(self.url("/health"))
            .bearer_auth(&self.api_key)
            .send()
            .await
            .expect("health")
            .json()
            .await
            .expect("health json")
    }

    /// The nodes connected now, by name, as the operator sees them.
    pub async fn connected(&self) -> BTreeSet<String> {
        stack::probe::connected_nodes(&self.client(), self.http, &self.api_key)
            .await
            .expect("the connected nodes on /health")
    }

    /// The value of one series on `/metrics`: a plain metric
    /// (`fleetgrid_reassignments_total`) or one value of a labelled counter
    /// (see [`super::labelled`]), which is zero until it is first counted.
    /// Panics when the coordinator has no such metric at all.
    pub async fn metric(&self, series: &str) -> f64 {
        let text = reqwest::get(self.url("/metrics"))
            .await
            .expect("metrics")
            .text()
            .await
            .expect("metrics text");
        let value = text.lines().find_map(|line| {
            line.strip_prefix(series)
                .and_then(|rest| rest.strip_prefix(' '))
                .and_then(|value| value.trim().parse().ok())
        });
        if let Some(value) = value {
            return value;
        }
        let family = series.split('{').next().unwrap_or(series);
        let declared = text.contains(&format!("# TYPE {family} counter\n"));
        assert!(declared && family != series, "metric {series} missing");
        0.0
    }

    /// Polls the metric `series` until `holds` is true of its value and
    /// returns that value; panics after `within`, saying `what` did not
    /// happen.
    pub async fn wait_for_metric(
        &self,
        series: &str,
        within: Duration,
        what: &str,
        holds: impl Fn(f64) -> bool,
    ) -> f64 {
        let deadline = Instant::now() + within;
        loop {
            let value = self.metric(series).await;
            if holds(value) {
                return value;
            }
            assert!(
                Instant::now() < deadline,
                "{what} within {within:?} ({series} is {value})"
            );
            tokio::time::sleep(METRIC_POLL_INTERVAL).await;
        }
    }

    pub async fn post(&self, path: &str, body: &serde_json::Value) -> reqwest::Response {
        self.post_as(&self.api_key, path, body).await
    }

    /// A POST of `body` to `path` with another key than the tenant's.
    pub async fn post_as(
        &self,
        key: &str,
        path: &str,
        body: &serde_json::Value,
    ) -> reqwest::Response {
        self.client()
            .post(self.url(path))
            .bearer_auth(key)
            .json(body)
            .send()
            .await
            .expect("send request")
    }

    /// A GET of `path` with `key`: the status and the body as JSON (or as a
    /// JSON string when it is not JSON).
    pub async fn get_as(&self, key: &str, path: &str) -> (u16, serde_json::Value) {
        let response = self
            .client()
            .get(self.url(path))
            .bearer_auth(key)
            .send()
            .await
            .expect("send request");
        let status = response.status().as_u16();
        let text = response.text().await.expect("body");
        let body = serde_json::from_str(&text).unwrap_or(serde_json::Value::String(text));
        (status, body)
    }

    /// A non-streaming chat completion; panics unless it is 200.
    pub async fn chat(&self, body: &serde_json::Value) -> serde_json::Value {
        let response = self.post("/v1/chat/completions", body).await;
        let status = response.status();
        let text = response.text().await.expect("body");
        assert_eq!(status, 200, "chat failed: {text}");
        serde_json::from_str(&text).expect("json body")
    }

    /// A streamed chat completion: the concatenated content, the finish
    /// reason and the usage chunk (when asked for).
    pub async fn chat_stream(&self, body: &serde_json::Value) -> Streamed {
        let mut body = body.clone();
        body["stream"] = serde_json::json!(true);
        let response = self.post("/v1/chat/completions", &body).await;
        assert_eq!(response.status(), 200);
        let text = response.text().await.expect("stream body");
        parse_sse(&text)
    }
}

#[derive(Debug, Default)]
pub struct Streamed {
    pub content: String,
    pub finish_reason: Option<String>,
    pub usage: Option<serde_json::Value>,
    pub chunks: usize,
    pub done: bool,
    pub errors: Vec<serde_json::Value>,
}

pub fn parse_sse(text: &str) -> Streamed {
    let mut streamed = Streamed::default();
    for line in text.lines() {
        let Some(data) = line.strip_prefix("data: ") else {
            continue;
        };
        if data == "[DONE]" {
            streamed.done = true;
            continue;
        }
        let chunk: serde_json::Value = serde_json::from_str(data).expect("chunk json");
        if chunk.get("error").is_some() {
            streamed.errors.push(chunk);
            continue;
        }
        streamed.chunks += 1;
        if let Some(choice) = chunk["choices"].get(0) {
            if let Some(content) = choice["delta"]["content"].as_str() {
                streamed.content.push_str(content);
            }
            if let Some(reason) = choice["finish_reason"].as_str() {
                streamed.finish_reason = Some(reason.to_string());
            }
        }
        if chunk.get("usage").is_some_and(|usage| !usage.is_null()) {
            streamed.usage = Some(chunk["usage"].clone());
        }
    }
    streamed
}
