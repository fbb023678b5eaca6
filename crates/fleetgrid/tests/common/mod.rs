//! A real fleetgrid stack for end-to-end tests: the `fleetgrid` binary run as
//! a coordinator and agent processes on loopback, with a fresh database.
//!
//! Needs the SmolLM2 model in the model store (`cargo xtask test` fetches it).

#![allow(dead_code)]

pub mod hostile;

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

pub const MODEL: &str = "smollm2-135m-instruct";

/// How long a test waits for processes to start or a condition to hold.
pub const WAIT: Duration = Duration::from_secs(120);

/// How often [`Stack::wait_for_metric`] reads `/metrics`.
pub const METRIC_POLL_INTERVAL: Duration = Duration::from_millis(50);

/// The series of a labelled counter for one label value, as `/metrics`
/// names it: `labelled("fleetgrid_node_assignments_total", "node_id", "car-1")`.
pub fn labelled(name: &str, label: &str, value: &str) -> String {
    format!("{name}{{{label}=\"{value}\"}}")
}

/// The series counting the generations assigned to node `node`.
pub fn node_assignments(node: &str) -> String {
    labelled("fleetgrid_node_assignments_total", "node_id", node)
}

/// The series counting running generations stopped for `reason`
/// (`preempted`, `draining`, `departed`, `node_lost`, `stalled`).
pub fn generations_stopped(reason: &str) -> String {
    labelled("fleetgrid_generations_stopped_total", "reason", reason)
}

pub fn binary() -> &'static str {
    env!("CARGO_BIN_EXE_fleetgrid")
}

/// The model file, for tokenizer checks in tests.
pub fn model_path() -> PathBuf {
    let store =
        models::ModelStore::open(models::ModelStore::default_root()).expect("open model store");
    store
        .resolve(MODEL)
        .unwrap_or_else(|error| panic!("model {MODEL} missing ({error}); run `cargo xtask test`"))
        .path
}

/// A child process killed when dropped.
pub struct Process {
    pub name: String,
    pub child: Child,
}

impl Process {
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }
}

impl Drop for Process {
    fn drop(&mut self) {
        self.kill();
    }
}

pub struct Stack {
    pub dir: tempfile::TempDir,
    pub http: SocketAddr,
    pub grpc: SocketAddr,
    pub api_key: String,
    pub coordinator: Process,
    pub agents: Vec<Process>,
}

/// Options for the coordinator.
#[derive(Clone, Default)]
pub struct StackOptions {
    pub extra_serve_args: Vec<String>,
}

pub fn run_cli(args: &[&str], data_dir: &Path) -> String {
    let output = Command::new(binary())
        .args(args)
        .arg("--data-dir")
        .arg(data_dir)
        .output()
        .expect("run fleetgrid");
    assert!(
        output.status.success(),
        "fleetgrid {args:?} failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    let stdout = String::from_utf8(output.stdout).expect("utf-8 output");
    stdout
        .lines()
        .last()
        .expect("one line of output")
        .trim()
        .to_string()
}

/// Starts `fleetgrid serve` on a data directory and waits for it to listen.
/// Its log is appended to `coordinator.log` there, so restarts keep one log.
pub fn spawn_coordinator(
    dir: &Path,
    http_listen: &str,
    grpc_listen: &str,
    options: &StackOptions,
) -> (Process, coordinator::Bound) {
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(dir.join("coordinator.log"))
        .expect("log file");
    let mut child = Command::new(binary())
        .args([
            "serve",
            "--http-listen",
            http_listen,
            "--grpc-listen",
            grpc_listen,
        ])
        .args([
            "--heartbeat-interval-ms",
            "500",
            "--heartbeat-timeout-ms",
            "2000",
            "--exit-with-parent",
        ])
        .args(&options.extra_serve_args)
        .arg("--data-dir")
        .arg(dir)
        .stdout(Stdio::piped())
        .stderr(log)
        .spawn()
        .expect("start coordinator");
    let stdout = child.stdout.take().expect("stdout");
    let coordinator = Process {
        name: "coordinator".into(),
        child,
    };
    let mut line = String::new();
    BufReader::new(stdout)
        .read_line(&mut line)
        .expect("read coordinator output");
    let bound = coordinator::Bound::parse_announcement(&line).unwrap_or_else(|| {
        panic!(
            "coordinator did not start: {line:?}; log: {}",
            std::fs::read_to_string(dir.join("coordinator.log")).unwrap_or_default()
        )
    });
    (coordinator, bound)
}

impl Stack {
    /// Lets a tenant owe without limit, so that billing admits its requests.
    pub fn unlimited_credit(&self, tenant: &str) {
        let output = std::process::Command::new(binary())
            .args([
                "billing",
                "credit",
                "--tenant",
                tenant,
                "--unlimited",
                "--data-dir",
            ])
            .arg(self.dir.path())
            .output()
            .expect("run fleetgrid");
        assert!(
            output.status.success(),
            "billing credit failed: {}",
            String::from_utf8_lossy(&output.stderr)
        );
    }

    pub fn start(options: StackOptions) -> Stack {
        let dir = tempfile::tempdir().expect("tempdir");
        let api_key = run_cli(
            &["tenants", "create", "test-tenant", "--class", "fleet"],
            dir.path(),
        );
        let (coordinator, coordinator::Bound { http, grpc }) =
            spawn_coordinator(dir.path(), "127.0.0.1:0", "127.0.0.1:0", &options);
        Stack {
            dir,
            http,
            grpc,
            api_key,
            coordinator,
            agents: Vec::new(),
        }
    }

    /// Kills the coordinator with SIGKILL (no shutdown of any kind) and
    /// starts a new one on the same data directory and addresses; agents
    /// reconnect by themselves.
    pub fn restart_coordinator(&mut self, options: &StackOptions) {
        self.coordinator.kill();
        let (http, grpc) = (self.http.to_string(), self.grpc.to_string());
        let (coordinator, _) = spawn_coordinator(self.dir.path(), &http, &grpc, options);
        self.coordinator = coordinator;
    }

    /// Runs the CLI on this stack's data directory; returns its last line.
    pub fn cli(&self, args: &[&str]) -> String {
        run_cli(args, self.dir.path())
    }

    /// Enrols and starts an agent with a plugged-in simulated vehicle.
    pub fn add_agent(&mut self, name: &str, parallel: u32) -> usize {
        let credential = run_cli(&["nodes", "add", name], self.dir.path());
        let trace = self.dir.path().join(format!("{name}.json"));
        std::fs::write(&trace, PLUGGED_IN_TRACE).expect("write trace");
        self.spawn_agent(
            name,
            &credential,
            &format!("sim:{}", trace.display()),
            parallel,
        )
    }

    pub fn spawn_agent(
        &mut self,
        name: &str,
        credential: &str,
        vehicle_state: &str,
        parallel: u32,
    ) -> usize {
        let log =
            std::fs::File::create(self.dir.path().join(format!("{name}.log"))).expect("log file");
        let child = Command::new(binary())
            .args([
                "agent",
                "--coordinator",
                &format!("http://{}", self.grpc),
                "--node-id",
                name,
            ])
            .args([
                "--vehicle-state",
                vehicle_state,
                "--model",
                MODEL,
                "--threads",
                "1",
            ])
            .args(["--parallel", &parallel.to_string(), "--exit-with-parent"])
            .env("FLEETGRID_NODE_CREDENTIAL", credential)
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("start agent");
        self.agents.push(Process {
            name: name.to_string(),
            child,
        });
        self.agents.len() - 1
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.http)
    }

    pub fn log(&self, name: &str) -> String {
        std::fs::read_to_string(self.dir.path().join(format!("{name}.log"))).unwrap_or_default()
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

    /// `/health` as the operator sees it (the stack's tenant is fleet-class):
    /// with the connected nodes.
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

    /// Waits until exactly these nodes are connected.
    pub async fn wait_for_nodes(&self, names: &[&str]) {
        let deadline = Instant::now() + WAIT;
        loop {
            let health = self.operator_health().await;
            let mut connected: Vec<String> = health["nodes"]
                .as_array()
                .map(|nodes| {
                    nodes
                        .iter()
                        .filter_map(|node| node.as_str().map(str::to_string))
                        .collect()
                })
                .unwrap_or_default();
            connected.sort();
            let mut wanted: Vec<String> = names.iter().map(|name| name.to_string()).collect();
            wanted.sort();
            if connected == wanted {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "nodes {wanted:?} not connected, have {connected:?}; coordinator log:\n{}",
                self.log("coordinator")
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// The value of one series on `/metrics`: a plain metric
    /// (`fleetgrid_reassignments_total`) or one value of a labelled counter
    /// (see [`labelled`]), which is zero until it is first counted. Panics
    /// when the coordinator has no such metric at all.
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

    /// How many generations each of the stack's agents has been assigned.
    pub async fn assignment_counts(&self) -> BTreeMap<String, f64> {
        let mut counts = BTreeMap::new();
        for agent in &self.agents {
            let count = self.metric(&node_assignments(&agent.name)).await;
            counts.insert(agent.name.clone(), count);
        }
        counts
    }

    /// The one agent assigned a generation since `before` was taken (with
    /// [`Stack::assignment_counts`]); panics unless exactly one was.
    pub async fn assigned_since(&self, before: &BTreeMap<String, f64>) -> String {
        let now = self.assignment_counts().await;
        let assigned: Vec<&String> = now
            .iter()
            .filter(|(name, count)| **count > before.get(*name).copied().unwrap_or(0.0))
            .map(|(name, _)| name)
            .collect();
        assert_eq!(
            assigned.len(),
            1,
            "expected one node given work since {before:?}, got {now:?}"
        );
        assigned[0].clone()
    }

    pub fn client(&self) -> reqwest::Client {
        reqwest::Client::new()
    }

    pub async fn post(&self, path: &str, body: &serde_json::Value) -> reqwest::Response {
        self.client()
            .post(self.url(path))
            .bearer_auth(&self.api_key)
            .json(body)
            .send()
            .await
            .expect("send request")
    }

    /// A POST of `body` to `path` with another key than the stack's.
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

/// A chat body whose answer runs long enough to interrupt mid-way: up to
/// 300 tokens of a story, with a fixed seed.
pub fn long_story(temperature: f64) -> serde_json::Value {
    serde_json::json!({
        "model": MODEL, "max_tokens": 300, "temperature": temperature, "seed": 11,
        "messages": [{"role": "user", "content": "Write a long story about a trip across the mountains."}],
    })
}

/// The text of an uninterrupted reference `answer`, asserted long enough
/// (150 tokens at least) that a test can interrupt a run of it mid-way.
pub fn long_reference_text(answer: &serde_json::Value) -> String {
    let tokens = answer["usage"]["completion_tokens"].as_u64().unwrap_or(0);
    assert!(
        tokens >= 150,
        "the reference run is too short to interrupt: {tokens} tokens"
    );
    answer["choices"][0]["message"]["content"]
        .as_str()
        .expect("content")
        .to_string()
}

/// Options that point the coordinator at the test price sheet (written to a
/// directory kept alive by the returned guard), plus `extra` arguments.
pub fn billed_options(extra: &[&str]) -> (StackOptions, tempfile::TempDir) {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("prices.json");
    std::fs::write(&path, test_prices_json()).expect("write prices");
    let mut args = vec!["--prices".to_string(), path.display().to_string()];
    args.extend(extra.iter().map(|arg| arg.to_string()));
    (
        StackOptions {
            extra_serve_args: args,
        },
        dir,
    )
}

/// A short greedy chat of `max_tokens` tokens at most.
pub fn colour_chat(max_tokens: u32) -> serde_json::Value {
    serde_json::json!({
        "model": MODEL,
        "messages": [{"role": "user", "content": "Name a colour."}],
        "max_tokens": max_tokens,
        "temperature": 0.0,
    })
}

/// A JSON count, or a panic showing the value.
pub fn u64_of(value: &serde_json::Value) -> u64 {
    value
        .as_u64()
        .unwrap_or_else(|| panic!("not a count: {value}"))
}

/// The billing tests' price sheet: spot $2 / $4, reserved $3 / $6 and fleet
/// $5 / $10 per million prompt / completion tokens, and the local cloud model
/// at $5 / $10 upstream ($6 / $12 with the 20 % margin), so that every token
/// is worth whole micro-dollars and charges are exact.
pub fn test_prices_json() -> String {
    serde_json::json!({
        "owner_share_bps": 7000,
        "cloud_margin_bps": 2000,
        "fleet": { MODEL: {
            "fleet": {"prompt": "5.00", "completion": "10.00"},
            "reserved": {"prompt": "3.00", "completion": "6.00"},
            "spot": {"prompt": "2.00", "completion": "4.00"}
        }},
        "upstream": {"cloud/qwen2.5-coder-0.5b-instruct": {"prompt": "5.00", "completion": "10.00"}},
        "payout_per_unit": {"cash": "0.01", "charging-credit": "0.0003",
                            "subscription-credit": "0.009", "ride-credit": "0.009"},
        "power": {"watts_idle": 15, "watts_busy": 60},
        "tariff": {"per_kwh": "0.30"}
    })
    .to_string()
}

impl Stack {
    /// The ledger account (as `ledger balances` names it by key) of the
    /// owner called `owner`: the ledger keys accounts by the ids in the
    /// coordinator's database.
    pub async fn owner_account(&self, owner: &str) -> String {
        let store = coordinator::store::Store::open(self.dir.path())
            .await
            .expect("open the coordinator's database");
        let record = store
            .owner_by_name(owner)
            .await
            .expect("owner")
            .expect("owner");
        let key = coordinator::billing_accounts::owner_key(record.id);
        ledger::core::AccountId::Owner(key).to_string()
    }
}

/// A vehicle plugged in and charging for the next ten hours.
pub const PLUGGED_IN_TRACE: &str = r#"{"start_soc": 0.6, "events": [
  {"at_s": 0, "plugged_in": true, "charging": true, "soc": 0.6, "departure_in_s": 36000, "temperature_c": 30.0}
]}"#;
