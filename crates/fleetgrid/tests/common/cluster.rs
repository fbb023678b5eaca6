//! A cluster for end-to-end tests: a real three-server NATS cluster, any
//! number of `fleetgrid gateway` and `fleetgrid cell` processes on one
//! PostgreSQL database (a throw-away schema of the shared server, or a
//! private server a test may stop), and real agents serving the real model.
//! Every process is stopped when the cluster is dropped.

use std::cell::RefCell;
use std::collections::BTreeSet;
use std::ffi::OsString;

use ledger::core::MicroUsd;
use stack::nats::NatsCluster;
use stack::{AgentSpec, ClusterCell, ClusterGateway, ClusterSpec, LogFile, MemberSpec, Process};

use super::{fleetgrid, parse_sse, test_prices_json, Gateway, Streamed, MODEL, WAIT};

/// How fast cells and agents notice each other's loss in these tests.
pub const HEARTBEATS: [&str; 4] = [
    "--heartbeat-interval-ms",
    "500",
    "--heartbeat-timeout-ms",
    "2000",
];

/// The name of the fleet-class tenant every cluster has: the operator,
/// whose key sees the connected vehicles on `/health`.
pub const OPERATOR: &str = "operator";

/// What to start.
pub struct ClusterOptions {
    /// `postgres://…` of the cluster's database.
    pub database: String,
    pub gateways: usize,
    pub cells: usize,
    /// Further flags of every gateway.
    pub gateway_args: Vec<String>,
    /// Further flags of every cell ([`HEARTBEATS`] unless set).
    pub cell_args: Vec<String>,
    /// Whether gateways charge by the test price sheet (`test_prices_json`)
    /// instead of the shipped one.
    pub test_prices: bool,
}

impl ClusterOptions {
    /// One gateway and two cells on `database`, at the shipped prices.
    pub fn new(database: String) -> ClusterOptions {
        ClusterOptions {
            database,
            gateways: 1,
            cells: 2,
            gateway_args: Vec::new(),
            cell_args: HEARTBEATS.iter().map(|arg| arg.to_string()).collect(),
            test_prices: false,
        }
    }
}

/// The cluster under test.
pub struct Cluster {
    pub dir: tempfile::TempDir,
    pub spec: ClusterSpec,
    pub nats: NatsCluster,
    /// The operator's (fleet-class) API key.
    pub operator_key: String,
    pub gateways: Vec<ClusterGateway>,
    pub cells: Vec<ClusterCell>,
    pub agents: Vec<Process>,
    /// Members a test killed on purpose: no longer watched.
    killed: BTreeSet<String>,
}

impl Drop for Cluster {
    fn drop(&mut self) {
        stack::stop_all_blocking(
            self.gateways
                .iter_mut()
                .map(|gateway| &mut gateway.process)
                .chain(self.cells.iter_mut().map(|cell| &mut cell.process))
                .chain(&mut self.agents),
        );
    }
}

impl Cluster {
    /// NATS (three servers), the cells, the gateways and the operator.
    pub async fn start(options: ClusterOptions) -> Cluster {
        let dir = tempfile::tempdir().expect("tempdir");
        let nats = NatsCluster::start(3, dir.path(), WAIT)
            .await
            .expect("a NATS cluster starts");
        let spec = ClusterSpec {
            nats: nats.urls(),
            database: options.database.clone(),
            data_dir: dir.path().to_path_buf(),
            models: vec![MODEL.to_owned()],
        };
        let operator_key = cli(&spec, &["tenants", "create", OPERATOR, "--class", "fleet"]);
        let mut gateway_args: Vec<OsString> =
            options.gateway_args.iter().map(OsString::from).collect();
        if options.test_prices {
            let prices = dir.path().join("prices.json");
            std::fs::write(&prices, test_prices_json()).expect("write prices");
            gateway_args.extend([OsString::from("--prices"), prices.into_os_string()]);
        }
        let mut cells = Vec::new();
        for index in 0..options.cells {
            let cell_id = format!("cell-{index}");
            let mut member = MemberSpec::new(log(&dir, &cell_id));
            member.args = options.cell_args.iter().map(OsString::from).collect();
            let (fleetgrid, spec) = (fleetgrid(), spec.clone());
            cells.push(tokio::task::spawn_blocking(move || {
                ClusterCell::start_blocking(&fleetgrid, &spec, &cell_id, &member, WAIT)
            }));
        }
        let mut gateways = Vec::new();
        for index in 0..options.gateways {
            let name = format!("gateway-{index}");
            let mut member = MemberSpec::new(log(&dir, &name));
            member.args = gateway_args.clone();
            let (fleetgrid, spec) = (fleetgrid(), spec.clone());
            gateways.push(tokio::task::spawn_blocking(move || {
                ClusterGateway::start_blocking(&fleetgrid, &spec, &name, &member, WAIT)
            }));
        }
        let mut cluster = Cluster {
            dir,
            spec,
            nats,
            operator_key,
            gateways: Vec::new(),
            cells: Vec::new(),
            agents: Vec::new(),
            killed: BTreeSet::new(),
        };
        // Kept as they come, so that those started are stopped on a panic.
        for cell in cells {
            let cell = cell.await.expect("start task");
            cluster
                .cells
                .push(cell.unwrap_or_else(|error| panic!("a cell did not start: {error}")));
        }
        for gateway in gateways {
            let gateway = gateway.await.expect("start task");
            cluster
                .gateways
                .push(gateway.unwrap_or_else(|error| panic!("a gateway did not start: {error}")));
        }
        cluster
    }

    /// Gateway `index` as the operator speaks to it.
    pub fn gateway(&self, index: usize) -> Gateway {
        self.gateway_as(index, &self.operator_key)
    }

    /// Gateway `index` as the tenant with `key` speaks to it.
    pub fn gateway_as(&self, index: usize, key: &str) -> Gateway {
        Gateway {
            http: self.gateways[index].http,
            api_key: key.to_owned(),
        }
    }

    /// Runs a one-shot CLI command on the cluster's database; its last line.
    pub fn cli(&self, args: &[&str]) -> String {
        cli(&self.spec, args)
    }

    /// Creates a prepaid tenant of `class` (spot, reserved) topped up with
    /// `balance`; its API key.
    pub fn funded_tenant(&self, name: &str, class: &str, balance: MicroUsd) -> String {
        let key = self.cli(&["tenants", "create", name, "--class", class]);
        let amount = balance.to_string();
        let reference = format!("{name}-opening");
        self.cli(&[
            "billing",
            "topup",
            "--tenant",
            name,
            "--amount",
            &amount,
            "--reference",
            &reference,
        ]);
        key
    }

    /// A tenant's balance as `fleetgrid billing show` prints it.
    pub fn balance(&self, tenant: &str) -> MicroUsd {
        let shown = cli_output(&self.spec, &["billing", "show", "--tenant", tenant]);
        shown
            .lines()
            .find_map(|line| line.strip_prefix("balance"))
            .and_then(|rest| MicroUsd::parse_usd(rest.trim().trim_start_matches('$')))
            .unwrap_or_else(|| panic!("no balance in `billing show`: {shown}"))
    }

    /// Enrols `name` and starts its agent on `cells` (indexes into
    /// `self.cells`, its own cell first, then where it may fail over to),
    /// decoding `parallel` sequences at once.
    pub fn add_agent(&mut self, name: &str, cells: &[usize], parallel: u32) {
        self.add_agent_with(name, cells, parallel, &[]);
    }

    /// `add_agent`, with more arguments for `fleetgrid agent`.
    pub fn add_agent_with(&mut self, name: &str, cells: &[usize], parallel: u32, args: &[&str]) {
        let credential = self.cli(&["nodes", "add", name]);
        let trace = self.dir.path().join(format!("{name}.json"));
        std::fs::write(&trace, stack::ALWAYS_PLUGGED_IN_TRACE).expect("write trace");
        let spec = AgentSpec {
            node_id: name.to_owned(),
            credential,
            vehicle_state: format!("sim:{}", trace.display()),
            model: MODEL.to_owned(),
            parallel,
            threads: 1,
            args: args.iter().map(std::ffi::OsString::from).collect(),
            log: log(&self.dir, name),
        };
        let endpoints: Vec<_> = cells.iter().map(|index| self.cells[*index].grpc).collect();
        let agent = fleetgrid()
            .cluster_agent(&endpoints, &spec)
            .unwrap_or_else(|error| panic!("{error}"));
        self.agents.push(agent);
    }

    /// Kills gateway `index` with SIGKILL: no shutdown of any kind.
    pub fn kill_gateway(&mut self, index: usize) {
        let process = &mut self.gateways[index].process;
        self.killed.insert(process.name.clone());
        process.kill();
    }

    /// Kills cell `index` with SIGKILL: no shutdown of any kind.
    pub fn kill_cell(&mut self, index: usize) {
        let process = &mut self.cells[index].process;
        self.killed.insert(process.name.clone());
        process.kill();
    }

    /// The members that should be running: all but those killed on purpose.
    pub fn members(&self) -> Vec<&Process> {
        self.gateways
            .iter()
            .map(|gateway| &gateway.process)
            .chain(self.cells.iter().map(|cell| &cell.process))
            .chain(&self.agents)
            .filter(|process| !self.killed.contains(&process.name))
            .collect()
    }

    /// The first gateway not killed, as the operator speaks to it.
    fn live_gateway(&self) -> Gateway {
        let index = self
            .gateways
            .iter()
            .position(|gateway| !self.killed.contains(&gateway.process.name))
            .expect("a gateway that was not killed");
        self.gateway(index)
    }

    /// Two vehicles, `car-a` at home in cell 0 and `car-b` in cell 1, each
    /// allowed to fail over to the other cell; returns once both are
    /// connected.
    pub async fn two_vehicles_failing_over(&mut self) {
        self.add_agent("car-a", &[0, 1], 1);
        self.add_agent("car-b", &[1, 0], 1);
        self.wait_for_nodes(&["car-a", "car-b"]).await;
    }

    /// Waits until exactly the vehicles `names` are connected, as a live
    /// gateway sees the cells.
    pub async fn wait_for_nodes(&self, names: &[&str]) {
        let wanted: BTreeSet<String> = names.iter().map(|name| name.to_string()).collect();
        let gateway = self.live_gateway();
        let client = gateway.client();
        let what = format!("nodes {wanted:?} connected through the gateway");
        stack::probe::wait_until(&self.members(), &what, WAIT, || async {
            stack::probe::connected_nodes(&client, gateway.http, &gateway.api_key).await
                == Some(wanted.clone())
        })
        .await
        .unwrap_or_else(|error| panic!("{error}"));
    }

    /// The vehicle running a generation now, as a live gateway sees its cells.
    pub async fn busy_node(&self) -> String {
        let gateway = self.live_gateway();
        let busy = RefCell::new(None);
        stack::probe::wait_until(&self.members(), "a busy vehicle", WAIT, || async {
            let health = gateway.operator_health().await;
            let found = health["running"].as_object().and_then(|running| {
                running
                    .iter()
                    .find(|(_, count)| count.as_u64().unwrap_or(0) > 0)
                    .map(|(name, _)| name.clone())
            });
            let done = found.is_some();
            *busy.borrow_mut() = found;
            done
        })
        .await
        .unwrap_or_else(|error| panic!("{error}"));
        busy.into_inner().expect("a busy vehicle")
    }

    /// Checks the ledger with `fleetgrid ledger verify` (it fails on any problem).
    pub fn verify_ledger(&self) {
        self.cli(&["ledger", "verify"]);
    }
}

fn log(dir: &tempfile::TempDir, name: &str) -> LogFile {
    LogFile::create(dir.path().join(format!("{name}.log")))
}

fn cli_command(spec: &ClusterSpec) -> stack::Fleetgrid {
    fleetgrid()
        .env("FLEETGRID_DATABASE_URL", &spec.database)
        .env("FLEETGRID_LEDGER_URL", &spec.database)
}

/// Runs a one-shot CLI command on the cluster's database; its last line.
fn cli(spec: &ClusterSpec, args: &[&str]) -> String {
    cli_command(spec)
        .cli(args, &spec.data_dir)
        .unwrap_or_else(|error| panic!("{error}"))
}

/// Runs a one-shot CLI command on the cluster's database; all it printed.
fn cli_output(spec: &ClusterSpec, args: &[&str]) -> String {
    let output = cli_command(spec)
        .command()
        .args(args)
        .arg("--data-dir")
        .arg(&spec.data_dir)
        .output()
        .expect("run fleetgrid");
    assert!(
        output.status.success(),
        "fleetgrid {args:?} failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8_lossy(&output.stdout).into_owned()
}

/// What a spot tenant pays per prompt and per completion token under the
/// test price sheet (`test_prices_json`: $2 and $4 per million).
pub const SPOT_PROMPT_MICRO_USD: i64 = 2;
pub const SPOT_COMPLETION_MICRO_USD: i64 = 4;

/// The worst case a spot tenant's request is admitted against: its whole
/// prompt and `max_tokens` completion tokens.
pub fn spot_worst_case(prompt_tokens: u32, max_tokens: u32) -> MicroUsd {
    MicroUsd(
        SPOT_PROMPT_MICRO_USD * i64::from(prompt_tokens)
            + SPOT_COMPLETION_MICRO_USD * i64::from(max_tokens),
    )
}

/// How many tokens the gateway counts in `body`'s prompt (asked as the
/// operator, whose requests are invoiced, not prepaid).
/// The text of a whole (not streamed) answer to `body`, checked to be long
/// enough (40 tokens or more) to be interrupted part way.
pub async fn uninterrupted_answer(gateway: &Gateway, body: &serde_json::Value) -> String {
    let answer = gateway.chat(body).await;
    assert!(
        super::u64_of(&answer["usage"]["completion_tokens"]) >= 40,
        "the reference answer is too short to interrupt: {answer}"
    );
    answer["choices"][0]["message"]["content"]
        .as_str()
        .expect("content")
        .to_owned()
}

pub async fn prompt_tokens(operator: &Gateway, body: &serde_json::Value) -> u32 {
    let mut probe = body.clone();
    probe["max_tokens"] = serde_json::json!(1);
    let answer = operator.chat(&probe).await;
    let tokens = super::u64_of(&answer["usage"]["prompt_tokens"]);
    u32::try_from(tokens).expect("a prompt of a few tokens")
}

/// A streamed answer being read, chunk by chunk as the gateway sends them.
pub struct OpenStream {
    response: reqwest::Response,
    raw: Vec<u8>,
    /// The connection broke before the body ended.
    pub broken: bool,
    ended: bool,
}

impl OpenStream {
    /// Starts `body` as a streamed answer; panics unless it is accepted (200).
    pub async fn open(gateway: &Gateway, body: &serde_json::Value) -> OpenStream {
        let mut body = body.clone();
        body["stream"] = serde_json::json!(true);
        let response = gateway.post("/v1/chat/completions", &body).await;
        let status = response.status();
        if status != 200 {
            let text = response.text().await.unwrap_or_default();
            panic!("a streamed answer was refused with {status}: {text}");
        }
        OpenStream {
            response,
            raw: Vec::new(),
            broken: false,
            ended: false,
        }
    }

    /// What arrived so far.
    pub fn read(&self) -> Streamed {
        parse_sse(&String::from_utf8_lossy(&self.raw))
    }

    /// Reads until `holds` is true of what arrived, or the body ends;
    /// whether it holds.
    pub async fn read_until(&mut self, holds: impl Fn(&Streamed) -> bool) -> bool {
        loop {
            if holds(&self.read()) {
                return true;
            }
            if self.ended || self.broken {
                return false;
            }
            match self.response.chunk().await {
                Ok(Some(chunk)) => self.raw.extend_from_slice(&chunk),
                Ok(None) => self.ended = true,
                Err(_) => self.broken = true,
            }
        }
    }

    /// Reads to the end of the body (or of the connection).
    pub async fn finish(mut self) -> OpenStream {
        self.read_until(|_| false).await;
        self
    }
}
