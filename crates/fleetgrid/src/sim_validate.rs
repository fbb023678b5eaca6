//! `fleetgrid sim --validate`: the simulator against real processes on the
//! same window of the same scenario.
//!
//! 1. A coordinator starts (child process, its own data directory under
//!    `--out`) with a price sheet that gives every vehicle its scenario
//!    tariff (aligned so that the real clock's hour is the window's
//!    simulated hour) and its class's draw.
//! 2. Calibration: the prompts' real token counts, then the prefill and
//!    decode speeds of a request of each tenant class while `busy + 1`
//!    generations run at once on as many agents (a request arriving in the
//!    window finds `busy` others running on average, and every agent shares
//!    this machine's cores).
//! 3. The simulator runs the window with the scenario made runnable here
//!    (`sim::validate::scenario`) and records what its world did: every
//!    plug-in, announced departure, unplug and request arrival. When fewer
//!    vehicles than `busy + 1` are plugged in during the window, no more
//!    generations than vehicles ever run at once there, and the calibration
//!    runs at that many: which vehicles plug in does not depend on the
//!    speeds, so a run at the scenario's reference speeds, before the
//!    calibration, tells how many.
//! 4. One agent per vehicle that was plugged in during the window replays
//!    its recorded sessions as a `sim:` trace; a client replays every
//!    recorded request at its time, with its tenant class's key, prompt and
//!    answer length, retrying a 429/503 after `Retry-After` as the OpenAI
//!    SDK does.
//! 5. The window's agents stop and the calibration runs again at as many
//!    generations at once: a shared machine's speed drifts, and the real
//!    generations ran at the speed of their moment.
//! 6. Delivered tokens (from the answers' usage), migrations (the
//!    coordinator's `fleetgrid_reassignments_total`) and owner earnings (each
//!    vehicle's ledger statement) are compared with the simulator's within
//!    the tolerances of `sim::validate` (energy, and the money that follows
//!    it, with the band between the simulated figure at the speeds before
//!    and after) and written to validation.md and validation.json; the
//!    command fails when one is outside.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use anyhow::{bail, Context};
use coordinator::store::{Store, TenantClass};
use serde_json::{json, Value};
use sim::validate::{self, Calibration, Check, Figures};
use sim::{Options, Scenario, Window};
use stack::{AgentSpec, Coordinator, CoordinatorSpec, Fleetgrid, LogFile, Stack};

/// How long the coordinator and agents may take to start.
const STARTUP_TIMEOUT: Duration = Duration::from_secs(300);
/// Time between the agents' start and the window: every agent started and
/// connected, one after another.
const LEAD_BASE: Duration = Duration::from_secs(20);
const LEAD_PER_AGENT: Duration = Duration::from_secs(4);
/// The sentence the prompts are made of.
const FILLER: &str = "A parked car charges at night and lends its computer to the fleet. ";
/// The most vehicles a validation run enrols (each may start an agent).
const VEHICLES_MAX: u32 = 100;
/// The calibration's vehicles are named from this.
const CALIBRATION_NODE: &str = "calibration";
/// The most calibration agents (generations at once).
const CALIBRATION_AGENTS_MAX: u32 = 4;

/// What the validation runs.
pub struct ValidateArgs {
    pub vehicles: u32,
    pub seed: u64,
    pub out: PathBuf,
    pub model: String,
    pub threads: u32,
    pub start_minute: u32,
    pub minutes: u32,
    pub drain_minutes: u32,
    pub busy: f64,
    pub prices: Option<PathBuf>,
}

/// One tenant class's key and request shape.
struct ClassClient {
    key: String,
    model: String,
    fillers: usize,
    answer_tokens: u32,
}

/// What a replayed request ended as.
#[derive(Default, Clone, Copy)]
struct Answer {
    served: bool,
    prompt_tokens: u64,
    completion_tokens: u64,
}

pub async fn run(base: Scenario, args: ValidateArgs) -> anyhow::Result<()> {
    if args.vehicles == 0 || args.minutes == 0 {
        bail!("--vehicles and --minutes must be at least 1");
    }
    if args.vehicles > VEHICLES_MAX {
        bail!(
            "--validate starts an agent per vehicle on this machine: at most {VEHICLES_MAX} vehicles (e.g. --vehicles 20)"
        );
    }
    let started = Instant::now();
    let out = &args.out;
    let data = out.join("coordinator");
    let logs = out.join("logs");
    let traces = out.join("traces");
    for dir in [&data, &logs, &traces] {
        if dir.exists() {
            std::fs::remove_dir_all(dir).with_context(|| format!("clear {}", dir.display()))?;
        }
        std::fs::create_dir_all(dir).with_context(|| format!("create {}", dir.display()))?;
    }
    crate::home::ensure_model(&args.model, "fleetgrid sim --validate").await?;
    let prices_text = match &args.prices {
        Some(path) => crate::ledger_cmd::read_at_most(
            path,
            ledger::price_file::PRICE_FILE_BYTES_MAX,
            "price file",
        )?,
        None => ledger::price_file::DEFAULT_PRICES_JSON.to_owned(),
    };

    // The window's simulated minute is the real clock's minute at its start:
    // tariffs are given with the UTC offset that makes it so. The window
    // starts after the calibration, so the offset is fixed now and the
    // window's real start is chosen on the same minute grid later.
    let store = Store::open(&data)
        .await
        .context("open the coordinator's database")?;
    let now = coordinator::core::now_ms().0;
    let mut classes = Vec::new();
    for class in TenantClass::ALL {
        let name = format!("tenant-{}", class.as_str());
        let (_, key) = store.create_tenant(&name, class, now).await?;
        classes.push(key);
    }
    let credentials = {
        // Which vehicles the window needs is known once the simulator ran;
        // every one is enrolled up front (cheap), only those used start.
        let mut credentials = Vec::new();
        for vehicle in 0..args.vehicles {
            let owner = format!("owner-{}", vehicle + 1);
            store.ensure_owner(&owner, now).await?;
            credentials
                .push(crate::demo::enrolled_credential(&store, &node_name(vehicle), &owner).await?);
        }
        credentials
    };
    let calibrating = (args.busy.round().max(0.0) as u32 + 1).min(CALIBRATION_AGENTS_MAX);
    let mut calibration_credentials = Vec::new();
    for number in 1..=calibrating {
        let name = format!("{CALIBRATION_NODE}-{number}");
        calibration_credentials.push((
            name.clone(),
            crate::demo::enrolled_credential(&store, &name, "").await?,
        ));
    }
    let utc_offset_minutes = utc_offset(args.start_minute, now);
    let prices_path = out.join("prices.json");
    let price_sheet = price_sheet(
        &prices_text,
        &base,
        args.seed,
        args.vehicles,
        utc_offset_minutes,
    )?;
    std::fs::write(&prices_path, format!("{price_sheet:#}\n"))
        .with_context(|| format!("write {}", prices_path.display()))?;
    let exe = std::env::current_exe().context("find the fleetgrid executable")?;
    let fleetgrid = Fleetgrid::new(exe);
    // Reserved and spot tenants are prepaid by default; these owe without
    // limit, so that money never refuses a replayed request.
    for class in [TenantClass::Reserved, TenantClass::Spot] {
        let tenant = format!("tenant-{}", class.as_str());
        fleetgrid.cli(
            &["billing", "credit", "--tenant", &tenant, "--unlimited"],
            &data,
        )?;
    }
    let mut spec = CoordinatorSpec::new(&data, LogFile::create(logs.join("coordinator.log")));
    spec.models = vec![args.model.clone()];
    spec.args = vec!["--prices".into(), prices_path.clone().into_os_string()];
    let coordinator = Coordinator::start(&fleetgrid, &spec, STARTUP_TIMEOUT)
        .await
        .context("start the coordinator")?;
    let mut running = Stack::new(fleetgrid, coordinator);
    let http = format!("http://{}", running.http());
    let client = reqwest::Client::new();
    let prices = ledger::price_file::PriceConfig::parse_json(&price_sheet.to_string())
        .context("the validation's price sheet")?;
    let calibrating_on = Calibrating {
        client: &client,
        http: &http,
        args: &args,
        base: &base,
        keys: &classes,
        credentials: &calibration_credentials,
        trace: traces.join("calibration.json"),
        logs: &logs,
    };

    // Calibration at `busy + 1` generations at once, then the simulator's
    // run of the window. A window whose vehicles are fewer than that never
    // runs as many at once (each serves one at a time): it is calibrated at
    // as many generations as it has vehicles. Which vehicles plug in follows
    // the owners' sessions, not the speeds, so a run at the scenario's
    // reference speeds tells which.
    let plugged_in = simulate(&base, &args, &reference_speeds(&base), &prices)?.used;
    let at_once = calibrating.min(plugged_in.len().max(1) as u32);
    let (calibration, class_clients) = calibrating_on.run(&running, at_once, 0, "before").await?;
    let simulation = simulate(&base, &args, &calibration, &prices)?;
    if simulation.used != plugged_in {
        bail!("the simulator plugged in other vehicles at the calibrated speeds than at the reference speeds");
    }
    let prompt_tokens = calibration.prompt_tokens;
    let Simulation {
        validation,
        simulated,
        recording,
        arrivals,
        used,
    } = simulation;

    // The real run of the same window.
    let lead = LEAD_BASE + LEAD_PER_AGENT * used.len() as u32;
    let window_start = SystemTime::now() + lead;
    for vehicle in &used {
        let lead_s = window_start
            .duration_since(SystemTime::now())
            .unwrap_or_default()
            .as_secs_f64();
        let trace = validate::trace(&recording, *vehicle, lead_s);
        let path = traces.join(format!("{}.json", node_name(*vehicle)));
        std::fs::write(&path, trace.to_string())
            .with_context(|| format!("write {}", path.display()))?;
        running.add_agent(&AgentSpec {
            node_id: node_name(*vehicle),
            credential: credentials[*vehicle as usize].clone(),
            vehicle_state: format!("sim:{}", path.display()),
            model: args.model.clone(),
            parallel: 1,
            threads: args.threads,
            args: Vec::new(),
            log: LogFile::create(logs.join(format!("{}.log", node_name(*vehicle)))),
        })?;
        // One at a time, in the simulator's order: a cell numbers vehicles
        // as they connect, and placement breaks a full tie by that number
        // as the simulator does by the vehicle's.
        let name = node_name(*vehicle);
        let (http_address, fleet_key) = (running.http(), classes[0].clone());
        stack::probe::wait_until(
            &running.members(),
            &format!("{name} connected"),
            STARTUP_TIMEOUT,
            || async {
                stack::probe::connected_nodes(&client, http_address, &fleet_key)
                    .await
                    .is_some_and(|connected| connected.contains(&name))
            },
        )
        .await?;
    }
    let names: BTreeSet<String> = used.iter().map(|v| node_name(*v)).collect();
    let (http_address, fleet_key) = (running.http(), classes[0].clone());
    stack::probe::wait_until(
        &running.members(),
        "every vehicle of the window connected, the calibration cars gone",
        lead,
        || async {
            stack::probe::connected_nodes(&client, http_address, &fleet_key)
                .await
                .is_some_and(|connected| connected == names)
        },
    )
    .await?;
    if SystemTime::now() > window_start {
        bail!(
            "the window's agents took longer than {} s to connect: their traces would start late",
            lead.as_secs()
        );
    }
    let migrations_before = metric(&client, &http, "fleetgrid_reassignments_total").await?;
    eprintln!(
        "fleetgrid sim --validate: {} vehicles, {} requests over {} minutes (+{} to drain)",
        used.len(),
        arrivals.len(),
        args.minutes,
        args.drain_minutes
    );
    let answers = replay(
        &client,
        &http,
        class_clients,
        &arrivals,
        window_start,
        Duration::from_secs(u64::from(args.minutes + args.drain_minutes) * 60),
        base.demand.client_retries,
    )
    .await;
    let migrations =
        metric(&client, &http, "fleetgrid_reassignments_total").await? - migrations_before;
    // The machine's speeds again, at as many generations at once: the real
    // generations ran at the speed of their moment, and a shared machine's
    // speed drifts. Energy is compared with the band between the simulated
    // energy at the speeds before and after.
    running.stop_agents().await;
    let (speeds_after, _) = calibrating_on
        .run(&running, at_once, 3 * at_once + 1, "after")
        .await?;
    running.stop().await;

    let mut real = Figures {
        migrations: migrations as u64,
        owner_earnings: vec![0; args.vehicles as usize],
        ..Figures::default()
    };
    for ((_, class), answer) in arrivals.iter().zip(&answers) {
        if answer.served {
            let index = class.index();
            real.served[index] += 1;
            real.prompt_tokens[index] += answer.prompt_tokens;
            real.completion_tokens[index] += answer.completion_tokens;
        }
    }
    ledger_earnings(&data, args.vehicles, &mut real).await?;
    let speed_ratio = validate::service_time_ratio(&simulated, &calibration, &speeds_after);
    let checks = validate::compare(&simulated, speed_ratio, &real);
    let report = json!({
        "vehicles": args.vehicles,
        "vehicles_plugged_in": used.len(),
        "requests": arrivals.len(),
        "seed": args.seed,
        "model": args.model,
        "window": {"start_minute": args.start_minute, "minutes": args.minutes, "drain_minutes": args.drain_minutes},
        "calibration": calibration,
        "calibration_after": speeds_after,
        "prompt_tokens": prompt_tokens,
        "changes_to_the_scenario": validation.changes,
        "demand_factor": validation.demand_factor,
        "simulated": simulated,
        "real": real,
        "checks": checks,
        "wall_seconds": started.elapsed().as_secs_f64(),
    });
    std::fs::write(out.join("validation.json"), format!("{report:#}\n"))?;
    let markdown = markdown(
        &args,
        &validation.changes,
        [&calibration, &speeds_after],
        used.len(),
        arrivals.len(),
        &simulated,
        &real,
        &checks,
    );
    std::fs::write(out.join("validation.md"), &markdown)?;
    print!("{markdown}");
    let outside: Vec<&str> = checks
        .iter()
        .filter(|c| !c.within)
        .map(|c| c.figure)
        .collect();
    if !outside.is_empty() {
        bail!(
            "the simulator and the real processes disagree beyond tolerance on: {}; see {}",
            outside.join(", "),
            out.join("validation.md").display()
        );
    }
    Ok(())
}

fn node_name(vehicle: u32) -> String {
    format!("vehicle-{}", vehicle + 1)
}

/// The UTC offset, in minutes within ±12 h, that makes the real clock's
/// local minute at `now_ms` the window's simulated `start_minute`.
fn utc_offset(start_minute: u32, now_ms: i64) -> i32 {
    let real_minute = now_ms.div_euclid(60_000).rem_euclid(1_440);
    let offset = (i64::from(start_minute) - real_minute).rem_euclid(1_440);
    (if offset > 720 { offset - 1_440 } else { offset }) as i32
}

/// The price sheet with every vehicle's tariff (its scenario tariff, shifted
/// by `utc_offset_minutes`) and draw (its class's one-stream draw).
fn price_sheet(
    text: &str,
    base: &Scenario,
    seed: u64,
    vehicles: u32,
    utc_offset_minutes: i32,
) -> anyhow::Result<Value> {
    let mut sheet: Value = serde_json::from_str(text).context("the price sheet is JSON")?;
    let watts = base.vehicle_classes[0].watts_one_stream.round() as u32;
    let mut nodes = serde_json::Map::new();
    for vehicle in 0..vehicles {
        let traits = sim::fleet::traits(base, seed, vehicle);
        let tariff = sim::model::TariffModel::new(&base.tariffs[usize::from(traits.tariff)]);
        let hours: Vec<String> = tariff
            .per_kwh_by_hour
            .iter()
            .map(|price| format!("{price:.6}"))
            .collect();
        nodes.insert(
            node_name(vehicle),
            json!({
                "power": {"watts_idle": 0, "watts_busy": watts},
                "tariff": {"utc_offset_minutes": utc_offset_minutes, "per_kwh_by_hour": hours},
            }),
        );
    }
    sheet["nodes"] = Value::Object(nodes);
    Ok(sheet)
}

/// The scenario's own reference speeds and prompt lengths, as a calibration:
/// what the simulator is given before this machine is measured.
fn reference_speeds(base: &Scenario) -> Calibration {
    let point = &base.reference.points[0];
    Calibration {
        decode_tokens_per_second: point.decode_tokens_per_second,
        prefill_tokens_per_second: point.prefill_tokens_per_second,
        prompt_tokens: TenantClass::ALL.map(|class| {
            base.demand
                .classes
                .iter()
                .find(|d| d.class == class.as_str())
                .map_or(1, |d| d.prompt_tokens)
        }),
        measured_on: base.reference.measured_on.clone(),
    }
}

/// The simulator's run of the window, and what the real run replays of it.
struct Simulation {
    validation: validate::ValidationScenario,
    simulated: Figures,
    recording: sim::Recording,
    arrivals: Vec<(u64, TenantClass)>,
    /// The vehicles plugged in during the window, in order.
    used: Vec<u32>,
}

fn simulate(
    base: &Scenario,
    args: &ValidateArgs,
    calibration: &Calibration,
    prices: &ledger::price_file::PriceConfig,
) -> anyhow::Result<Simulation> {
    let validation = validate::scenario(
        base,
        &args.model,
        calibration,
        args.vehicles,
        args.start_minute,
        args.busy,
    );
    let options = Options {
        window: Some(Window {
            start_minute: args.start_minute,
            arrival_minutes: args.minutes,
            drain_minutes: args.drain_minutes,
        }),
        ..Options::days(args.vehicles, 1, args.seed)
    };
    let outcome = sim::Run::new(&validation.scenario, prices, options)?.run();
    if !outcome.anomalies.is_empty() || outcome.settlement_failures > 0 {
        bail!(
            "the simulator saw anomalies {:?} and {} settlement failures",
            outcome.anomalies,
            outcome.settlement_failures
        );
    }
    let simulated = Figures::of_outcome(&outcome);
    let recording = outcome.recording.clone().expect("a window run records");
    let arrivals = validate::arrivals(&recording);
    let mut used: Vec<u32> = recording
        .events
        .iter()
        .filter_map(|event| match event {
            sim::Recorded::PlugIn { vehicle, .. } => Some(*vehicle),
            _ => None,
        })
        .collect();
    used.sort_unstable();
    used.dedup();
    Ok(Simulation {
        validation,
        simulated,
        recording,
        arrivals,
        used,
    })
}

/// What a calibration needs beside the stack it runs on: the clients, the
/// calibration cars' names and credentials.
struct Calibrating<'a> {
    client: &'a reqwest::Client,
    http: &'a str,
    args: &'a ValidateArgs,
    base: &'a Scenario,
    keys: &'a [String],
    credentials: &'a [(String, String)],
    trace: PathBuf,
    logs: &'a Path,
}

impl Calibrating<'_> {
    /// Starts `at_once` calibration agents, calibrates on them and stops
    /// them. Prompts are numbered from `serial_base`, so that no agent meets
    /// a prompt head an earlier calibration left.
    async fn run(
        &self,
        running: &Stack,
        at_once: u32,
        serial_base: u32,
        when: &str,
    ) -> anyhow::Result<(Calibration, Vec<Arc<ClassClient>>)> {
        eprintln!(
            "fleetgrid sim --validate: calibrating {at_once} agents at once, {when} the window"
        );
        std::fs::write(&self.trace, stack::ALWAYS_PLUGGED_IN_TRACE)?;
        let mut agents = Vec::new();
        for (name, credential) in self.credentials.iter().take(at_once as usize) {
            agents.push(running.fleetgrid().agent(
                running.grpc(),
                &AgentSpec {
                    node_id: name.clone(),
                    credential: credential.clone(),
                    vehicle_state: format!("sim:{}", self.trace.display()),
                    model: self.args.model.clone(),
                    parallel: 1,
                    threads: self.args.threads,
                    args: Vec::new(),
                    log: LogFile::create(self.logs.join(format!("{name}-{serial_base}.log"))),
                },
            )?);
        }
        let calibrated = async {
            running
                .wait_for_vehicles(u64::from(at_once), STARTUP_TIMEOUT)
                .await?;
            calibrate(self, at_once, serial_base as usize, when).await
        }
        .await;
        stack::stop_all(agents.iter_mut()).await;
        calibrated
    }
}

/// Request `serial`'s prompt: `fillers` sentences after its number, which
/// makes it differ from every other from its first tokens (no node answers
/// it from a kept prompt head).
fn prompt(serial: usize, fillers: usize) -> String {
    format!("Request {serial}. {}", FILLER.repeat(fillers))
}

/// The prompts' token counts, then `at_once` requests of each class
/// together on as many calibration agents: their speeds.
async fn calibrate(
    on: &Calibrating<'_>,
    at_once: u32,
    serial_base: usize,
    when: &str,
) -> anyhow::Result<(Calibration, Vec<Arc<ClassClient>>)> {
    let &Calibrating {
        client,
        http,
        args,
        base,
        keys,
        ..
    } = on;
    // Tokens per filler sentence: two prompts' usage apart (the chat
    // template's own tokens cancel).
    const LONGER_BY: usize = 20;
    let short = timed(
        client,
        http,
        &keys[0],
        &args.model,
        &prompt(serial_base, 1),
        1,
    )
    .await?;
    let long = timed(
        client,
        http,
        &keys[0],
        &args.model,
        &prompt(serial_base, 1 + LONGER_BY),
        1,
    )
    .await?;
    let per_filler =
        long.prompt_tokens.saturating_sub(short.prompt_tokens) as f64 / LONGER_BY as f64;
    let overhead = short.prompt_tokens as f64 - per_filler;
    let mut prompt_tokens = [0u32; 3];
    let mut class_clients = Vec::new();
    // (tokens, seconds): a rate over every request together, so that the
    // long requests, slower per token as their context grows, weigh as much
    // as the time they take.
    let (mut prefill, mut decode) = ((0.0, 0.0), (0.0, 0.0));
    for class in TenantClass::ALL {
        let demand = base
            .demand
            .classes
            .iter()
            .find(|d| d.class == class.as_str())
            .with_context(|| format!("the scenario has no demand for {}", class.as_str()))?;
        let fillers = ((f64::from(demand.prompt_tokens) - overhead) / per_filler.max(1.0))
            .round()
            .max(1.0) as usize;
        let key = &keys[class.index()];
        // Every prompt starts with its own serial, as in the window: an
        // agent reuses no earlier prompt's prefix, which would make its
        // prefill look faster than the window's.
        let requests = (0..at_once).map(|number| {
            let serial = serial_base + 1 + class.index() * at_once as usize + number as usize;
            let text = prompt(serial, fillers);
            async move { timed(client, http, key, &args.model, &text, demand.answer_tokens).await }
        });
        for timing in futures::future::try_join_all(requests).await? {
            prompt_tokens[class.index()] = timing.prompt_tokens as u32;
            prefill.0 += timing.prompt_tokens as f64;
            prefill.1 += timing.first_token.as_secs_f64();
            decode.0 += timing.completion_tokens.saturating_sub(1) as f64;
            decode.1 += timing
                .total
                .saturating_sub(timing.first_token)
                .as_secs_f64();
        }
        class_clients.push(Arc::new(ClassClient {
            key: key.clone(),
            model: args.model.clone(),
            fillers,
            answer_tokens: demand.answer_tokens,
        }));
    }
    let rate = |(tokens, seconds): (f64, f64)| tokens / f64::max(seconds, 1e-3);
    let calibration = Calibration {
        decode_tokens_per_second: rate(decode),
        prefill_tokens_per_second: rate(prefill),
        prompt_tokens,
        measured_on: format!(
            "this machine: {at_once} agents of {} with {} thread(s) each, one request of each class on every one at once, {when} the validation's window",
            args.model, args.threads
        ),
    };
    Ok((calibration, class_clients))
}

struct Timing {
    prompt_tokens: u64,
    completion_tokens: u64,
    first_token: Duration,
    total: Duration,
}

/// A streamed request: its usage and when its first and last token came.
async fn timed(
    client: &reqwest::Client,
    http: &str,
    key: &str,
    model: &str,
    text: &str,
    max_tokens: u32,
) -> anyhow::Result<Timing> {
    use futures::StreamExt;
    let sent = Instant::now();
    let body = json!({
        "model": model,
        "messages": [{"role": "user", "content": text}],
        "max_tokens": max_tokens,
        "ignore_eos": true,
        "temperature": 0.0,
        "stream": true,
        "stream_options": {"include_usage": true},
    });
    let response = client
        .post(format!("{http}/v1/chat/completions"))
        .bearer_auth(key)
        .json(&body)
        .send()
        .await?;
    if !response.status().is_success() {
        let status = response.status();
        bail!(
            "calibration request refused: {status} {}",
            response.text().await.unwrap_or_default()
        );
    }
    let mut stream = response.bytes_stream();
    let mut buffer = Vec::new();
    let mut first_token = None;
    let mut usage = None;
    while let Some(chunk) = stream.next().await {
        buffer.extend_from_slice(&chunk?);
        while let Some(end) = buffer.iter().position(|b| *b == b'\n') {
            let line: Vec<u8> = buffer.drain(..=end).collect();
            let line = String::from_utf8_lossy(&line);
            let Some(data) = line.trim().strip_prefix("data: ") else {
                continue;
            };
            if data == "[DONE]" {
                continue;
            }
            let value: Value = serde_json::from_str(data).context("a stream chunk is JSON")?;
            let content = value["choices"][0]["delta"]["content"].as_str();
            if first_token.is_none() && content.is_some_and(|text| !text.is_empty()) {
                first_token = Some(sent.elapsed());
            }
            if value["usage"].is_object() {
                usage = Some(value["usage"].clone());
            }
        }
    }
    let usage = usage.context("the stream ended without usage")?;
    Ok(Timing {
        prompt_tokens: usage["prompt_tokens"].as_u64().unwrap_or(0),
        completion_tokens: usage["completion_tokens"].as_u64().unwrap_or(0),
        first_token: first_token.unwrap_or_else(|| sent.elapsed()),
        total: sent.elapsed(),
    })
}

/// Sends every arrival at its time after `window_start`; waits for all, up
/// to `limit` after the window's start (a request still open then counts as
/// not served).
async fn replay(
    client: &reqwest::Client,
    http: &str,
    classes: Vec<Arc<ClassClient>>,
    arrivals: &[(u64, domain::TenantClass)],
    window_start: SystemTime,
    limit: Duration,
    retries: u32,
) -> Vec<Answer> {
    let deadline = tokio::time::Instant::now()
        + window_start
            .duration_since(SystemTime::now())
            .unwrap_or_default()
        + limit;
    let mut tasks = Vec::with_capacity(arrivals.len());
    for (serial, (at_ms, class)) in arrivals.iter().enumerate() {
        let at = window_start + Duration::from_millis(*at_ms);
        let class_client = Arc::clone(&classes[class.index()]);
        let client = client.clone();
        let url = format!("{http}/v1/chat/completions");
        tasks.push(tokio::spawn(async move {
            let wait = at.duration_since(SystemTime::now()).unwrap_or_default();
            tokio::time::sleep(wait).await;
            let body = json!({
                "model": class_client.model,
                "messages": [{"role": "user", "content": prompt(serial + 100, class_client.fillers)}],
                "max_tokens": class_client.answer_tokens,
                "ignore_eos": true,
                "temperature": 0.0,
            });
            let send = async {
                for attempt in 0..=retries {
                    let Ok(response) = client
                        .post(&url)
                        .bearer_auth(&class_client.key)
                        .json(&body)
                        .send()
                        .await
                    else {
                        return Answer::default();
                    };
                    let status = response.status().as_u16();
                    if (status == 429 || status == 503) && attempt < retries {
                        let after = response
                            .headers()
                            .get("retry-after")
                            .and_then(|v| v.to_str().ok())
                            .and_then(|v| v.parse::<u64>().ok())
                            .unwrap_or(1);
                        tokio::time::sleep(Duration::from_secs(after)).await;
                        continue;
                    }
                    if status != 200 {
                        return Answer::default();
                    }
                    let Ok(value) = response.json::<Value>().await else {
                        return Answer::default();
                    };
                    return Answer {
                        served: true,
                        prompt_tokens: value["usage"]["prompt_tokens"].as_u64().unwrap_or(0),
                        completion_tokens: value["usage"]["completion_tokens"]
                            .as_u64()
                            .unwrap_or(0),
                    };
                }
                Answer::default()
            };
            tokio::time::timeout_at(deadline, send)
                .await
                .unwrap_or_default()
        }));
    }
    let mut answers = Vec::with_capacity(tasks.len());
    for task in tasks {
        answers.push(task.await.unwrap_or_default());
    }
    answers
}

async fn metric(client: &reqwest::Client, http: &str, name: &str) -> anyhow::Result<f64> {
    let text = client
        .get(format!("{http}/metrics"))
        .send()
        .await?
        .text()
        .await?;
    text.lines()
        .find_map(|line| {
            line.strip_prefix(name)
                .and_then(|rest| rest.strip_prefix(' '))
                .and_then(|value| value.trim().parse().ok())
        })
        .with_context(|| format!("the coordinator's metrics have no {name}"))
}

/// Every vehicle's statement from the ledger, summed into `real`.
async fn ledger_earnings(data: &Path, vehicles: u32, real: &mut Figures) -> anyhow::Result<()> {
    let ledger = coordinator::billing::open_ledger(None, data).await?;
    let now = coordinator::core::now_ms().0;
    let period = ledger::statement::Period {
        from: ledger::core::TimestampMs(now - 2 * 86_400_000),
        until: ledger::core::TimestampMs(now + 86_400_000),
    };
    for vehicle in 0..vehicles {
        let node = ledger::core::NodeId::new(node_name(vehicle).as_str())?;
        let totals = ledger.statement(&node, period).await?.totals;
        real.revenue_share += totals.revenue_share.0;
        real.energy_reimbursed += totals.energy_reimbursement.0;
        real.energy_wh += totals.energy.0 as f64 / 1e6;
        real.owner_earnings[vehicle as usize] = totals.earnings.0;
    }
    Ok(())
}

#[allow(clippy::too_many_arguments)]
fn markdown(
    args: &ValidateArgs,
    changes: &[String],
    [calibration, after]: [&Calibration; 2],
    plugged: usize,
    requests: usize,
    simulated: &Figures,
    real: &Figures,
    checks: &[Check],
) -> String {
    let mut text = format!(
        "# Validation: the simulator against real processes\n\n\
         {} vehicles ({plugged} plugged in during the window), {} minutes from minute {} of the day \
         plus {} to drain, seed {}; {requests} requests.\n\n\
         Calibration: {:.1} decode / {:.0} prefill tokens/s; {}. \
         Again after the window: {:.1} decode / {:.0} prefill tokens/s.\n\n\
         Changes to the scenario for one machine:\n\n",
        args.vehicles,
        args.minutes,
        args.start_minute,
        args.drain_minutes,
        args.seed,
        calibration.decode_tokens_per_second,
        calibration.prefill_tokens_per_second,
        calibration.measured_on,
        after.decode_tokens_per_second,
        after.prefill_tokens_per_second,
    );
    for change in changes {
        text += &format!("- {change}\n");
    }
    text += "\n| figure | simulated | real | tolerance | within |\n|---|---|---|---|---|\n";
    for check in checks {
        let simulated = match check.simulated_at_speeds_after {
            Some(after) => format!(
                "{} (at the speeds after: {})",
                shown(check.simulated),
                shown(after)
            ),
            None => shown(check.simulated),
        };
        text += &format!(
            "| {} | {} | {} | {} | {} |\n",
            check.figure,
            simulated,
            shown(check.real),
            check.tolerance,
            if check.within { "yes" } else { "**no**" }
        );
    }
    text += &format!(
        "\nServed per class (fleet / reserved / spot): simulated {:?}, real {:?}.\n",
        simulated.served, real.served
    );
    text
}

/// A count as a whole number, money and energy to the micro-unit.
fn shown(value: f64) -> String {
    if value.fract() == 0.0 {
        format!("{value:.0}")
    } else {
        format!("{value:.6}")
    }
}
