//! `fleetgrid demo` survives what the product exists for: the car serving a
//! streamed answer is killed with SIGKILL mid-stream, the client's text is
//! the same as an uninterrupted run, the demo keeps serving, the killed car
//! comes home, and Ctrl-C leaves no process behind. Its two cars have
//! different owners, and each checks the other's answers.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;
use std::process::Command;
use std::time::Instant;

use common::{parse_sse, Gateway, MODEL, WAIT};
use futures::StreamExt;
use serde_json::json;
use stack::{LogFile, Stdout};

/// How long a killed car stays away in this test.
const COME_HOME_SECS: &str = "2";

/// A running `fleetgrid demo`, stopped when dropped (before its directory goes).
struct Demo {
    process: stack::Process,
    dir: tempfile::TempDir,
    gateway: Gateway,
    /// Each car's owner key, as the demo printed them.
    owner_keys: BTreeMap<String, String>,
}

/// The rest of `line` after `prefix`, when it starts with it.
fn after<'a>(line: &'a str, prefix: &str) -> Option<&'a str> {
    line.strip_prefix(prefix).map(str::trim)
}

impl Demo {
    /// Starts the smallest demo that still hands over: two cars, no local cloud. Returns once
    /// it has printed its instructions (every car connected).
    fn start() -> Demo {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut command = common::fleetgrid().command();
        command
            .args(["demo", "--http-listen", "127.0.0.1:0", "--vehicles", "2"])
            .args([
                "--no-cloud",
                "--parallel",
                "1",
                "--threads-per-vehicle",
                "1",
            ])
            .args(["--come-home-secs", COME_HOME_SECS, "--data-dir"])
            .arg(dir.path());
        let log = LogFile::create(dir.path().join("demo.log"));
        let mut process =
            stack::Process::spawn("demo", command, &log, Stdout::Lines).expect("start the demo");
        let mut lines = process.lines().expect("the demo's output");
        let deadline = Instant::now() + WAIT;
        let (mut api_key, mut http) = (None, None);
        let mut owner_keys = BTreeMap::new();
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            let line = match lines.next_blocking(left) {
                Ok(Some(line)) => line,
                outcome => panic!(
                    "the demo did not print its instructions ({outcome:?}); its log:\n{}",
                    process.log_tail()
                ),
            };
            if let Some(key) = after(&line, "API key (tenant 'demo'):") {
                api_key = Some(key.to_string());
            }
            // "Owner key (owner 'NAME', whose cars are car-a, car-c): KEY"
            if let Some(rest) = after(&line, "Owner key (owner '") {
                let (cars, key) = rest
                    .split_once("whose cars are ")
                    .and_then(|(_, rest)| rest.split_once("): "))
                    .unwrap_or_else(|| panic!("an owner key line: {line}"));
                for car in cars.split(", ") {
                    owner_keys.insert(car.to_owned(), key.trim().to_owned());
                }
            }
            if let Some(rest) = after(&line, "Health: http://") {
                http = rest.split('/').next().and_then(|addr| addr.parse().ok());
            }
            if line.starts_with("Press Ctrl-C") {
                break;
            }
        }
        Demo {
            process,
            dir,
            gateway: Gateway {
                http: http.expect("the demo's address"),
                api_key: api_key.expect("the demo's API key"),
            },
            owner_keys,
        }
    }

    /// Sets which tenant classes a car works for, through the owner API.
    async fn allow_classes(&self, car: &str, classes: &[&str]) {
        let response = self
            .gateway
            .client()
            .put(
                self.gateway
                    .url(&format!("/owner/v1/vehicles/{car}/policy")),
            )
            .bearer_auth(self.owner_key(car))
            .json(&json!({ "allowed_classes": classes }))
            .send()
            .await
            .expect("send policy");
        assert_eq!(response.status(), 200, "{:?}", response.text().await);
    }

    fn owner_key(&self, car: &str) -> &str {
        self.owner_keys
            .get(car)
            .unwrap_or_else(|| panic!("no owner key for {car}: {:?}", self.owner_keys))
    }

    /// `car`'s trust as its owner sees it.
    async fn trust(&self, car: &str) -> serde_json::Value {
        let (status, body) = self
            .gateway
            .get_as(self.owner_key(car), "/owner/v1/vehicles")
            .await;
        assert_eq!(status, 200, "{body}");
        body["data"]
            .as_array()
            .and_then(|cars| cars.iter().find(|listed| listed["id"] == car))
            .map(|listed| listed["trust"].clone())
            .unwrap_or_else(|| panic!("{car} not listed: {body}"))
    }

    /// The process id of `car`'s agent, a child of the demo, if it runs.
    fn car_pid(&self, car: &str) -> Option<u32> {
        processes()
            .into_iter()
            .find(|process| {
                process.parent == self.process.pid()
                    && process.args.iter().any(|arg| arg == "agent")
                    && process
                        .args
                        .windows(2)
                        .any(|pair| pair == ["--node-id", car])
            })
            .map(|process| process.pid)
    }

    /// The demo's own log, then its coordinator's lines about verification.
    fn log(&self) -> String {
        let read = |path: std::path::PathBuf| std::fs::read_to_string(path).unwrap_or_default();
        let checks: Vec<String> = read(self.dir.path().join("logs").join("coordinator.log"))
            .lines()
            .filter(|line| line.contains("check") || line.contains("verif"))
            .map(str::to_owned)
            .collect();
        format!(
            "{}\nthe coordinator's lines about verification:\n{}",
            read(self.dir.path().join("demo.log")),
            checks.join("\n")
        )
    }
}

struct Process {
    pid: u32,
    parent: u32,
    args: Vec<String>,
}

/// Every process on this machine, from `/proc`.
fn processes() -> Vec<Process> {
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    entries
        .filter_map(|entry| {
            let entry = entry.ok()?;
            let pid: u32 = entry.file_name().to_str()?.parse().ok()?;
            let stat = std::fs::read_to_string(entry.path().join("stat")).ok()?;
            // The command name in parentheses may hold spaces: the fields follow the last ')'.
            let fields: Vec<&str> = stat.rsplit_once(')')?.1.split_whitespace().collect();
            let parent = fields.get(1)?.parse().ok()?;
            let cmdline = std::fs::read(entry.path().join("cmdline")).ok()?;
            let args = cmdline
                .split(|byte| *byte == 0)
                .filter(|arg| !arg.is_empty())
                .map(|arg| String::from_utf8_lossy(arg).into_owned())
                .collect();
            Some(Process { pid, parent, args })
        })
        .collect()
}

/// Processes whose command line names something under `dir`.
fn processes_using(dir: &Path) -> Vec<u32> {
    let dir = dir.display().to_string();
    processes()
        .into_iter()
        .filter(|process| process.args.iter().any(|arg| arg.contains(&dir)))
        .map(|process| process.pid)
        .collect()
}

fn signal(pid: u32, signal: &str) {
    let status = Command::new("kill")
        .args([signal, &pid.to_string()])
        .status()
        .expect("run kill");
    assert!(status.success(), "kill {signal} {pid} failed");
}

/// Waits until `condition` holds; panics with `what` after [`WAIT`], or as soon as the demo exits.
async fn wait_until<F, Fut>(what: &str, demo: &Demo, condition: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    if let Err(error) = stack::probe::wait_until(&[&demo.process], what, WAIT, condition).await {
        panic!("{error}; the demo's log:\n{}", demo.log());
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn the_demo_hands_over_a_killed_cars_stream_brings_the_car_home_and_stops_cleanly() {
    let began = Instant::now();
    let demo = Demo::start();
    let started_in = began.elapsed();
    let body = common::long_story(0.0);
    let expected = common::long_reference_text(&demo.gateway.chat(&body).await);

    // car-b's owner takes it off the fleet's work for a moment, so the stream starts on car-a.
    demo.allow_classes("car-b", &[]).await;
    let reassigned_before = demo.gateway.metric("fleetgrid_reassignments_total").await;
    let mut streamed_body = body.clone();
    streamed_body["stream"] = json!(true);
    let response = demo
        .gateway
        .post("/v1/chat/completions", &streamed_body)
        .await;
    assert_eq!(response.status(), 200);
    let mut bytes = response.bytes_stream();
    let mut raw = String::new();
    while raw.matches("data: ").count() < 10 {
        let chunk = bytes.next().await.expect("stream open").expect("chunk");
        raw.push_str(&String::from_utf8_lossy(&chunk));
    }
    demo.allow_classes("car-b", &["fleet", "reserved", "spot"])
        .await;
    let killed = demo.car_pid("car-a").expect("car-a's agent runs");
    signal(killed, "-KILL");

    while let Some(chunk) = bytes.next().await {
        raw.push_str(&String::from_utf8_lossy(&chunk.expect("stream chunk")));
    }
    let streamed = parse_sse(&raw);
    assert!(streamed.errors.is_empty(), "errors: {:?}", streamed.errors);
    assert!(streamed.done, "the stream did not end with [DONE]");
    assert_eq!(
        streamed.content, expected,
        "the handed-over stream differs from an uninterrupted run"
    );
    assert_eq!(
        demo.gateway.metric("fleetgrid_reassignments_total").await,
        reassigned_before + 1.0,
        "the stream was not handed over (did it finish before the kill?)"
    );

    // The demo is still serving, and car-a comes home as a new process.
    assert!(
        demo.process.exit().is_none(),
        "the demo stopped; its log:\n{}",
        demo.log()
    );
    let colour = json!({"model": MODEL, "max_tokens": 8, "messages": [{"role": "user", "content": "Name a colour."}]});
    let answer = demo.gateway.chat(&colour).await;
    assert!(answer["choices"][0]["message"]["content"].is_string());
    wait_until("car-a came home", &demo, || async {
        demo.car_pid("car-a").is_some_and(|pid| pid != killed)
            && demo.gateway.connected().await.contains("car-a")
    })
    .await;
    let both: BTreeSet<String> = ["car-a", "car-b"].map(String::from).into();
    assert_eq!(demo.gateway.connected().await, both);

    // The cars are two owners': each car's answers are checked by the
    // other's, and every one checked passed. A check that needs a second
    // verifier of a third owner (an audit, drawn for one in ten) waits for
    // one this demo does not have, and an answer produced by both cars has
    // no verifier here: while none is decided, each wait asks a new answer,
    // a new draw.
    assert_ne!(demo.owner_key("car-a"), demo.owner_key("car-b"));
    wait_until("an answer verified", &demo, || async {
        let mut verified = 0;
        for car in ["car-a", "car-b"] {
            let trust = demo.trust(car).await;
            assert_eq!(trust["verified"], trust["passed"], "{car}: {trust}");
            verified += trust["verified"].as_u64().unwrap_or(0);
        }
        if verified == 0 {
            demo.gateway.chat(&colour).await;
        }
        verified > 0
    })
    .await;
    assert_eq!(
        demo.gateway
            .metric("fleetgrid_verifications_failed_total")
            .await,
        0.0,
        "an honest car's answer failed a check:\n{}",
        demo.log()
    );

    // Ctrl-C stops everything: the demo exits cleanly and leaves no process behind.
    demo.process.interrupt();
    let exit = tokio::time::timeout(WAIT, demo.process.exited())
        .await
        .expect("the demo did not stop on Ctrl-C");
    assert!(
        exit.success(),
        "the demo exited with {exit}:\n{}",
        demo.log()
    );
    assert_eq!(
        processes_using(demo.dir.path()),
        Vec::<u32>::new(),
        "processes outlived the demo"
    );
    eprintln!(
        "demo started in {started_in:?}; the whole test took {:?}",
        began.elapsed()
    );
}
