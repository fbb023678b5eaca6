//! A real fleetgrid stack for end-to-end tests: the `fleetgrid` binary run as
//! a coordinator and agent processes on loopback, with a fresh database.
//!
//! Needs the SmolLM2 model in the model store (`cargo xtask test` fetches it).

#![allow(dead_code)]

pub mod cluster;
pub mod hostile;

pub mod gateway;

use std::cell::RefCell;
use std::collections::{BTreeMap, BTreeSet};
use std::ffi::OsString;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

// Each test binary uses some of these.
#[allow(unused_imports)]
pub use gateway::{parse_sse, Gateway, Streamed};
pub use stack::Process;
use stack::{AgentSpec, Coordinator, CoordinatorSpec, Fleetgrid, LogFile};

pub const MODEL: &str = "smollm2-135m-instruct";

/// How long a test waits for processes to start or a condition to hold.
pub const WAIT: Duration = Duration::from_secs(120);

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

/// The binary under test, to start processes and run commands with.
pub fn fleetgrid() -> Fleetgrid {
    Fleetgrid::new(binary())
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

/// A coordinator on a fresh data directory, its tenant's key and its agents;
/// every process is stopped when it is dropped. Requests go through its
/// [`Gateway`], which it dereferences to (`stack.http`, `stack.chat(..)`).
pub struct Stack {
    pub dir: tempfile::TempDir,
    pub gateway: Gateway,
    pub grpc: SocketAddr,
    /// Where agents dial: `https://` (mTLS), or `http://` for a coordinator
    /// started with `--agent-plaintext`.
    pub agent_url: String,
    pub coordinator: Process,
    pub agents: Vec<Process>,
}

impl std::ops::Deref for Stack {
    type Target = Gateway;

    fn deref(&self) -> &Gateway {
        &self.gateway
    }
}

impl Drop for Stack {
    fn drop(&mut self) {
        // All together, before the data directory goes.
        stack::stop_all_blocking(std::iter::once(&mut self.coordinator).chain(&mut self.agents));
    }
}

/// Options for the coordinator.
#[derive(Clone, Default)]
pub struct StackOptions {
    pub extra_serve_args: Vec<String>,
}

impl StackOptions {
    /// The coordinator takes plain gRPC (`--agent-plaintext`): for hostile
    /// sessions that present a credential in their `Hello`, without mTLS.
    pub fn plaintext() -> StackOptions {
        StackOptions {
            extra_serve_args: vec!["--agent-plaintext".into()],
        }
    }

    /// The URL agents dial for a coordinator listening on `grpc`.
    pub fn agent_url(&self, grpc: SocketAddr) -> String {
        if self
            .extra_serve_args
            .iter()
            .any(|arg| arg == "--agent-plaintext")
        {
            format!("http://{grpc}")
        } else {
            stack::agent_url(grpc)
        }
    }
}

pub fn run_cli(args: &[&str], data_dir: &Path) -> String {
    fleetgrid()
        .cli(args, data_dir)
        .unwrap_or_else(|error| panic!("{error}"))
}

/// Starts `fleetgrid serve` on a data directory and waits for it to listen.
/// Its log is appended to `coordinator.log` there, so restarts keep one log.
pub fn spawn_coordinator(
    dir: &Path,
    http_listen: &str,
    grpc_listen: &str,
    options: &StackOptions,
) -> (Process, coordinator::Bound) {
    let mut spec = CoordinatorSpec::new(dir, LogFile::append(dir.join("coordinator.log")));
    spec.http_listen = http_listen.parse().expect("an HTTP address");
    spec.grpc_listen = grpc_listen.parse().expect("a gRPC address");
    let heartbeats = [
        "--heartbeat-interval-ms",
        "500",
        "--heartbeat-timeout-ms",
        "2000",
    ];
    spec.args = heartbeats
        .iter()
        .map(OsString::from)
        .chain(options.extra_serve_args.iter().map(OsString::from))
        .collect();
    let coordinator = Coordinator::start_blocking(&fleetgrid(), &spec, WAIT)
        .unwrap_or_else(|error| panic!("the coordinator did not start: {error}"));
    (coordinator.process, coordinator.bound)
}

impl Stack {
    /// Lets a tenant owe without limit, so that billing admits its requests.
    pub fn unlimited_credit(&self, tenant: &str) {
        self.cli(&["billing", "credit", "--tenant", tenant, "--unlimited"]);
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
            gateway: Gateway { http, api_key },
            grpc,
            agent_url: options.agent_url(grpc),
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
        self.add_agent_with(name, parallel, &[])
    }

    /// [`Stack::add_agent`] with further `agent` flags.
    pub fn add_agent_with(&mut self, name: &str, parallel: u32, args: &[&str]) -> usize {
        let credential = run_cli(&["nodes", "add", name], self.dir.path());
        let trace = self.dir.path().join(format!("{name}.json"));
        std::fs::write(&trace, PLUGGED_IN_TRACE).expect("write trace");
        self.spawn_agent_with(
            name,
            &credential,
            &format!("sim:{}", trace.display()),
            parallel,
            args,
        )
    }

    pub fn spawn_agent(
        &mut self,
        name: &str,
        credential: &str,
        vehicle_state: &str,
        parallel: u32,
    ) -> usize {
        self.spawn_agent_with(name, credential, vehicle_state, parallel, &[])
    }

    fn spawn_agent_with(
        &mut self,
        name: &str,
        credential: &str,
        vehicle_state: &str,
        parallel: u32,
        args: &[&str],
    ) -> usize {
        let spec = AgentSpec {
            node_id: name.to_string(),
            credential: credential.to_string(),
            vehicle_state: vehicle_state.to_string(),
            model: MODEL.to_string(),
            parallel,
            threads: 1,
            args: args.iter().map(OsString::from).collect(),
            log: LogFile::create(self.dir.path().join(format!("{name}.log"))),
        };
        let agent = fleetgrid()
            .agent_at(&self.agent_url, &spec)
            .unwrap_or_else(|error| panic!("{error}"));
        self.agents.push(agent);
        self.agents.len() - 1
    }

    pub fn log(&self, name: &str) -> String {
        std::fs::read_to_string(self.dir.path().join(format!("{name}.log"))).unwrap_or_default()
    }

    /// Waits until exactly these nodes are connected.
    pub async fn wait_for_nodes(&self, names: &[&str]) {
        let wanted: BTreeSet<String> = names.iter().map(|name| name.to_string()).collect();
        let client = self.client();
        let connected = RefCell::new(None);
        let what = format!("nodes {wanted:?} connected");
        let waited = stack::probe::wait_until(&[&self.coordinator], &what, WAIT, || async {
            let now = stack::probe::connected_nodes(&client, self.http, &self.api_key).await;
            let done = now.as_ref() == Some(&wanted);
            *connected.borrow_mut() = now;
            done
        })
        .await;
        if let Err(error) = waited {
            panic!(
                "nodes {wanted:?} not connected, have {:?} ({error}); coordinator log:\n{}",
                connected.borrow(),
                self.log("coordinator")
            );
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

/// Runs a Python `script` with `args` in the test virtual environment
/// (`FLEETGRID_TEST_PYTHON`, which `cargo xtask test` sets) and returns the
/// JSON object it prints; panics with its stderr when it fails.
pub async fn run_python(script: &'static str, args: Vec<String>) -> serde_json::Value {
    let python = std::env::var("FLEETGRID_TEST_PYTHON").expect(
        "FLEETGRID_TEST_PYTHON must name the test virtual environment's Python; run `cargo xtask test`",
    );
    let output = tokio::task::spawn_blocking(move || {
        std::process::Command::new(python)
            .args(["-c", script])
            .args(args)
            .output()
    })
    .await
    .expect("join")
    .expect("run python");
    assert!(
        output.status.success(),
        "the python script failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    serde_json::from_slice(&output.stdout).expect("json from python")
}
