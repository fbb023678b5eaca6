//! Deterministic simulation harness: a random world of vehicles, tenants and requests drives the
//! real scheduler; a small model of the coordinator turns `Assign` and `Stop` into token
//! progress; and after every event the invariants of the scheduler's contract are checked (see
//! `check`). A seed replays a run exactly: the world's randomness comes from [`SimRng`] and time
//! is simulated.
//!
//! The fleet simulator reuses [`SimRng`] and the shape of this loop at larger scale.

mod check;
mod world;

use std::collections::{BTreeMap, VecDeque};

use crate::config::SchedulerConfig;
use crate::event::{Command, Event};
use crate::scheduler::Scheduler;
use crate::types::{
    Millis, ModelId, NodeCapacity, NodeId, OwnerPolicy, RequestId, TenantClass, TenantId,
    VehicleState,
};

/// Events and commands kept for the failure report.
const TRACE_MAX: usize = 48;

/// SplitMix64: tiny, fast, and good enough to draw scenarios; the same seed gives the same
/// sequence on every platform.
#[derive(Debug, Clone)]
pub struct SimRng(u64);

impl SimRng {
    pub fn new(seed: u64) -> Self {
        SimRng(seed)
    }

    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in `0..n` (0 when `n` is 0).
    pub fn below(&mut self, n: u64) -> u64 {
        if n == 0 {
            return 0;
        }
        // Multiply-shift: unbiased enough for scenarios and free of division.
        ((u128::from(self.next_u64()) * u128::from(n)) >> 64) as u64
    }

    /// Uniform in `low..=high`.
    pub fn between(&mut self, low: u64, high: u64) -> u64 {
        low + self.below(high.saturating_sub(low) + 1)
    }

    /// True with probability `permille / 1000`.
    pub fn chance(&mut self, permille: u64) -> bool {
        self.below(1000) < permille
    }
}

/// The size and length of one simulated scenario.
#[derive(Debug, Clone)]
pub struct SimConfig {
    /// Vehicles (node ids `0..vehicles_max`).
    pub vehicles_max: u32,
    /// Models, ids `0..models`.
    pub models: u16,
    /// Steps of random events (arrivals, departures, crashes, policy changes, bursts).
    pub chaos_steps: u32,
    /// After the chaos the world calms down; every request must then end within this many steps.
    pub settle_steps_max: u32,
    /// Simulated time per step is random up to this.
    pub step_ms_max: u64,
    /// The scheduler under test.
    pub scheduler: SchedulerConfig,
}

impl Default for SimConfig {
    fn default() -> Self {
        let scheduler = SchedulerConfig {
            queue_max_per_class: [6, 6, 6],
            no_node_grace_ms: 120_000,
            ..Default::default()
        };
        SimConfig {
            vehicles_max: 8,
            models: 2,
            chaos_steps: 300,
            settle_steps_max: 3_000,
            step_ms_max: 20_000,
            scheduler,
        }
    }
}

/// What happened in a run that passed.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SimReport {
    pub events: u64,
    pub requests: u64,
    pub finished: u64,
    pub cancelled: u64,
    pub rejected: u64,
    pub assigns: u64,
    pub stops: u64,
    pub preemptions: u64,
    /// A hash of every command in order: equal digests mean the same run, command for command.
    pub digest: u64,
}

/// Fold one command into a run digest.
fn digest(previous: u64, command: &Command) -> u64 {
    let word = match *command {
        Command::Assign {
            request,
            node,
            resume_from,
        } => {
            1 ^ (request.0 << 8)
                ^ (u64::from(node.0) << 32)
                ^ u64::from(resume_from).rotate_left(48)
        }
        Command::Stop {
            request,
            node,
            reason,
        } => 2 ^ (request.0 << 8) ^ (u64::from(node.0) << 32) ^ ((reason as u64) << 60),
        Command::Cancel { request, node } => 3 ^ (request.0 << 8) ^ (u64::from(node.0) << 32),
        Command::Reject {
            request,
            reason,
            retry_after_ms,
        } => {
            4 ^ (request.0 << 8)
                ^ ((reason as u64) << 56)
                ^ retry_after_ms.unwrap_or(0).rotate_left(24)
        }
    };
    (previous.rotate_left(5) ^ word).wrapping_mul(0x51_7c_c1_b7_27_22_0a_95)
}

/// An invariant broken, with what led to it.
#[derive(Debug, Clone, thiserror::Error)]
#[error("seed {seed}, step {step}, t={now_ms} ms: {message}\nlast events and commands, oldest first:\n{trace}")]
pub struct Violation {
    pub seed: u64,
    pub step: u32,
    pub now_ms: i64,
    pub message: String,
    pub trace: String,
}

/// Run one scenario.
pub fn run(seed: u64, config: &SimConfig) -> Result<SimReport, Violation> {
    let mut sim = Sim::new(seed, config.clone());
    sim.setup().map_err(|message| sim.violation(message))?;
    for _ in 0..config.chaos_steps {
        sim.step += 1;
        sim.advance().map_err(|message| sim.violation(message))?;
        sim.chaos().map_err(|message| sim.violation(message))?;
    }
    sim.calm().map_err(|message| sim.violation(message))?;
    for _ in 0..config.settle_steps_max {
        if sim.all_ended() {
            break;
        }
        sim.step += 1;
        sim.advance().map_err(|message| sim.violation(message))?;
    }
    if let Some((id, request)) = sim.requests.iter().find(|(_, request)| !request.ended) {
        let message = format!("request {id:?} never ended: {request:?}");
        return Err(sim.violation(message));
    }
    Ok(sim.report.clone())
}

/// A vehicle as the world knows it.
#[derive(Debug, Clone)]
struct Vehicle {
    connected: bool,
    capacity: NodeCapacity,
    state: VehicleState,
    policy: OwnerPolicy,
    battery_ok: bool,
    /// Real decode speed relative to the advertised one (permille): estimates can be wrong.
    speed_permille: u32,
    energy_day: i64,
    energy_wh: u32,
    running: Vec<RequestId>,
}

/// A request as the client and the coordinator model know it.
#[derive(Debug, Clone)]
struct SimRequest {
    tenant: TenantId,
    class: Option<TenantClass>,
    model: ModelId,
    prompt_tokens: u32,
    max_tokens: u32,
    /// Tokens the coordinator has committed (and reported).
    committed: u32,
    node: Option<NodeId>,
    /// The numerics of the node it was last assigned to.
    numerics: Option<u32>,
    /// Finished, cancelled or rejected.
    ended: bool,
    /// Cancelled by the client while running: a `Cancel` must follow.
    cancel_pending: bool,
}

#[derive(Debug, Clone)]
enum Trace {
    Event(Millis, Event),
    Command(Command),
}

struct Sim {
    seed: u64,
    config: SimConfig,
    rng: SimRng,
    scheduler: Scheduler,
    now: Millis,
    step: u32,
    vehicles: Vec<Option<Vehicle>>,
    tenants: BTreeMap<TenantId, crate::types::TenantConfig>,
    requests: BTreeMap<RequestId, SimRequest>,
    /// Per tenant: (minute, prompt + max tokens admitted in it).
    tokens_per_minute: BTreeMap<TenantId, (u64, u64)>,
    next_request: u64,
    /// The node being re-registered while that event is handled (its work is stopped as lost).
    reconnecting: Option<NodeId>,
    out: Vec<Command>,
    trace: VecDeque<Trace>,
    report: SimReport,
}

impl Sim {
    fn new(seed: u64, config: SimConfig) -> Sim {
        let scheduler = Scheduler::new(config.scheduler.clone());
        Sim {
            seed,
            rng: SimRng::new(seed),
            scheduler,
            // Somewhere in 2024, at a random time of day.
            now: Millis(1_704_067_200_000).plus((seed % 1_000) * 86_413),
            step: 0,
            vehicles: vec![None; config.vehicles_max as usize],
            tenants: BTreeMap::new(),
            requests: BTreeMap::new(),
            tokens_per_minute: BTreeMap::new(),
            next_request: 1,
            reconnecting: None,
            out: Vec::new(),
            trace: VecDeque::with_capacity(TRACE_MAX),
            report: SimReport::default(),
            config,
        }
    }

    /// Hand one event to the scheduler, carry out and check its commands, then check the
    /// invariants.
    fn send(&mut self, event: Event) -> Result<(), String> {
        self.record(Trace::Event(self.now, event.clone()));
        self.report.events += 1;
        let arriving = match &event {
            Event::RequestArrived { request, .. } => Some(*request),
            _ => None,
        };
        let mut out = std::mem::take(&mut self.out);
        out.clear();
        self.scheduler.handle(self.now, event, &mut out);
        let result = out.iter().try_for_each(|command| {
            self.record(Trace::Command(*command));
            self.report.digest = digest(self.report.digest, command);
            self.apply(*command, arriving)
        });
        self.out = out;
        result?;
        if let Some(request) = arriving {
            self.admitted(request)?;
        }
        self.check_invariants()
    }

    fn record(&mut self, entry: Trace) {
        if self.trace.len() == TRACE_MAX {
            self.trace.pop_front();
        }
        self.trace.push_back(entry);
    }

    fn violation(&self, message: String) -> Violation {
        let trace = self
            .trace
            .iter()
            .map(|entry| match entry {
                Trace::Event(at, event) => format!("  t={} {event:?}", at.0),
                Trace::Command(command) => format!("      -> {command:?}"),
            })
            .collect::<Vec<_>>()
            .join("\n");
        Violation {
            seed: self.seed,
            step: self.step,
            now_ms: self.now.0,
            message,
            trace,
        }
    }

    fn all_ended(&self) -> bool {
        self.requests.values().all(|request| request.ended)
    }

    /// Let time pass: apply due timers, produce tokens, finish generations, let cars whose
    /// departure came drive off.
    fn advance(&mut self) -> Result<(), String> {
        let step_ms = self.rng.between(50, self.config.step_ms_max);
        self.now = self.now.plus(step_ms);
        self.send(Event::Tick)?;
        let running: Vec<(RequestId, NodeId)> = self
            .requests
            .iter()
            .filter_map(|(id, request)| request.node.map(|node| (*id, node)))
            .collect();
        for (id, node) in running {
            self.progress(id, node, step_ms)?;
        }
        for index in 0..self.vehicles.len() {
            let Some(vehicle) = &self.vehicles[index] else {
                continue;
            };
            let departed =
                vehicle.connected && vehicle.state.departure_at.is_some_and(|at| at <= self.now);
            if departed {
                let state = VehicleState {
                    plugged_in: false,
                    departure_at: None,
                    ..vehicle.state
                };
                self.set_state(index, state)?;
            }
        }
        Ok(())
    }

    fn progress(&mut self, id: RequestId, node: NodeId, step_ms: u64) -> Result<(), String> {
        let Some(request) = self.requests.get(&id) else {
            return Ok(());
        };
        if request.node != Some(node) || request.cancel_pending {
            return Ok(());
        }
        let Some(vehicle) = self.vehicle(node) else {
            return Err(format!("{id:?} runs on unknown {node:?}"));
        };
        let tokens = (f64::from(vehicle.capacity.decode_tokens_per_second)
            * f64::from(vehicle.speed_permille)
            / 1000.0
            * step_ms as f64
            / 1000.0) as u32;
        let committed = request
            .committed
            .saturating_add(tokens.max(1))
            .min(request.max_tokens);
        let done = committed == request.max_tokens;
        if let Some(request) = self.requests.get_mut(&id) {
            request.committed = committed;
        }
        self.send(Event::TokensCommitted {
            request: id,
            committed_total: committed,
        })?;
        if done {
            self.release(id);
            if let Some(request) = self.requests.get_mut(&id) {
                request.ended = true;
            }
            self.report.finished += 1;
            self.send(Event::RequestFinished { request: id })?;
        }
        Ok(())
    }

    fn vehicle(&self, node: NodeId) -> Option<&Vehicle> {
        self.vehicles.get(node.0 as usize).and_then(Option::as_ref)
    }

    fn vehicle_mut(&mut self, node: NodeId) -> Option<&mut Vehicle> {
        self.vehicles
            .get_mut(node.0 as usize)
            .and_then(Option::as_mut)
    }

    /// Take a request off its node in the world (it finished or failed there).
    fn release(&mut self, id: RequestId) {
        let Some(node) = self
            .requests
            .get_mut(&id)
            .and_then(|request| request.node.take())
        else {
            return;
        };
        if let Some(vehicle) = self.vehicle_mut(node) {
            vehicle.running.retain(|running| *running != id);
        }
    }
}
