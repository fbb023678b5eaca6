//! Throughput and latency of the scheduler at fleet scale, for `fleetgrid bench scheduler`.
//!
//! This is the one module of the crate that reads a clock (`std::time::Instant`): it times the
//! scheduler from outside and never feeds the clock into it. Simulated time is still injected.

use std::time::Instant;

use crate::config::SchedulerConfig;
use crate::event::{Command, Event};
use crate::scheduler::Scheduler;
use crate::sim::SimRng;
use crate::types::{
    Millis, ModelId, NodeCapacity, NodeId, OwnerPolicy, RequestId, TenantClass, TenantConfig,
    TenantId, VehicleState,
};

/// Requests placed in the placement phase.
const PLACEMENTS: u64 = 300_000;
/// Requests kept running at once in the placement phase; older ones finish as new ones arrive.
const RUNNING_WINDOW: u64 = 100_000;
/// Node state events in the state phase.
const STATE_EVENTS: u64 = 2_000_000;
/// Of the state events, those (per mille) that also change the vehicle's scheduled departure: a
/// heartbeat repeats the departure the car has, and the owner's plan changes rarely.
const DEPARTURE_CHANGE_PERMILLE: u64 = 10;
/// Models in the fleet; each node holds two of them.
const MODELS: u16 = 4;
/// Requests placed in the prefix-affinity phase, after the first: each prompt is one of
/// `SYSTEM_PROMPTS` shared heads of `SYSTEM_PROMPT_TOKENS` followed by a question of its own.
const AFFINITY_PLACEMENTS: u64 = 100_000;
/// Distinct shared system prompts in the prefix-affinity phase.
const SYSTEM_PROMPTS: u64 = 64;
/// Tokens of each shared system prompt (eight head blocks).
const SYSTEM_PROMPT_TOKENS: i32 = 512;

/// What one run measured.
#[derive(Debug, Clone, PartialEq)]
pub struct BenchReport {
    pub nodes: usize,
    pub seed: u64,
    /// Node registrations per second while building the fleet.
    pub registrations_per_second: f64,
    pub placements: u64,
    /// Requests placed per second (arrival handled, `Assign` out), one core.
    pub placements_per_second: f64,
    /// Median and 99th percentile of one arrival's handling, microseconds.
    pub placement_p50_us: f64,
    pub placement_p99_us: f64,
    /// The same, for requests whose prompts share heads with earlier ones (prefix affinity).
    pub affinity_placements: u64,
    pub affinity_placements_per_second: f64,
    pub affinity_placement_p50_us: f64,
    pub affinity_placement_p99_us: f64,
    pub state_events: u64,
    /// Node state changes (state of charge, temperature, plug) handled per second.
    pub state_events_per_second: f64,
    /// Estimated memory held per node (node table, indexes, timers), computed from the sizes and
    /// capacities of the data structures.
    pub bytes_per_node: u64,
}

impl std::fmt::Display for BenchReport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        writeln!(
            f,
            "scheduler benchmark: {} nodes, seed {}",
            self.nodes, self.seed
        )?;
        writeln!(
            f,
            "  registrations/s     {:>12.0}",
            self.registrations_per_second
        )?;
        writeln!(
            f,
            "  placements/s        {:>12.0}  (target >= 200000)",
            self.placements_per_second
        )?;
        writeln!(
            f,
            "  placement p50       {:>12.2} us",
            self.placement_p50_us
        )?;
        writeln!(
            f,
            "  placement p99       {:>12.2} us  (target <= 50)",
            self.placement_p99_us
        )?;
        writeln!(
            f,
            "  shared-head placements/s {:>7.0}  p50 {:.2} us  p99 {:.2} us",
            self.affinity_placements_per_second,
            self.affinity_placement_p50_us,
            self.affinity_placement_p99_us
        )?;
        writeln!(
            f,
            "  state events/s      {:>12.0}  (target >= 1000000)",
            self.state_events_per_second
        )?;
        write!(
            f,
            "  bytes per node      {:>12}  (target <= 1024)",
            self.bytes_per_node
        )
    }
}

/// Build a fleet of `nodes` vehicles and measure placement and state-event handling.
pub fn run(nodes: usize, seed: u64) -> BenchReport {
    let mut rng = SimRng::new(seed);
    let config = SchedulerConfig {
        nodes_max: u32::try_from(nodes).unwrap_or(u32::MAX).max(1),
        ..Default::default()
    };
    let mut scheduler = Scheduler::new(config);
    let mut out = Vec::with_capacity(1024);
    let now = Millis(1_704_067_200_000);
    configure_tenants(&mut scheduler, now, &mut out);

    let started = Instant::now();
    let mut departures = Vec::with_capacity(nodes);
    for id in 0..nodes {
        let (capacity, state) = random_node(&mut rng, now);
        departures.push(state.departure_at);
        let node = NodeId(id as u32);
        scheduler.handle(
            now,
            Event::NodeRegistered {
                node,
                capacity,
                state,
                policy: OwnerPolicy::default(),
            },
            &mut out,
        );
        out.clear();
    }
    let registrations_per_second = nodes as f64 / started.elapsed().as_secs_f64();

    let (placements_per_second, placement_p50_us, placement_p99_us) = placements(
        &mut scheduler,
        &mut rng,
        now,
        &mut out,
        0..PLACEMENTS,
        false,
    );
    let affinity_ids = PLACEMENTS..PLACEMENTS + AFFINITY_PLACEMENTS;
    let (affinity_placements_per_second, affinity_placement_p50_us, affinity_placement_p99_us) =
        placements(&mut scheduler, &mut rng, now, &mut out, affinity_ids, true);
    let state_events_per_second =
        state_events(&mut scheduler, &mut rng, &departures, now, &mut out);
    let bytes_per_node = scheduler.memory_estimate_bytes() / nodes.max(1) as u64;
    BenchReport {
        nodes,
        seed,
        registrations_per_second,
        placements: PLACEMENTS,
        placements_per_second,
        placement_p50_us,
        placement_p99_us,
        affinity_placements: AFFINITY_PLACEMENTS,
        affinity_placements_per_second,
        affinity_placement_p50_us,
        affinity_placement_p99_us,
        state_events: STATE_EVENTS,
        state_events_per_second,
        bytes_per_node,
    }
}

fn configure_tenants(scheduler: &mut Scheduler, now: Millis, out: &mut Vec<Command>) {
    for (id, class) in [
        (1, TenantClass::Fleet),
        (2, TenantClass::Reserved),
        (3, TenantClass::Spot),
    ] {
        let config = TenantConfig {
            class,
            weight: 1,
            max_concurrency: u32::MAX,
            tokens_per_minute: None,
            reserved_min_share_permille: 0,
        };
        scheduler.handle(
            now,
            Event::TenantConfigured {
                tenant: TenantId(id),
                config,
            },
            out,
        );
    }
    out.clear();
}

fn random_node(rng: &mut SimRng, now: Millis) -> (NodeCapacity, VehicleState) {
    let first = rng.below(u64::from(MODELS)) as u16;
    let second = (first + 1 + rng.below(u64::from(MODELS) - 1) as u16) % MODELS;
    let capacity = NodeCapacity {
        slots: rng.between(2, 8) as u16,
        decode_tokens_per_second: [15.0, 25.0, 40.0][rng.below(3) as usize],
        prefill_tokens_per_second: 400.0,
        models: vec![ModelId(first), ModelId(second)],
        loaded: vec![ModelId(first)],
        energy_price_micro_usd_per_kwh: rng.between(50_000, 400_000) as u32,
        numerics: 0,
    };
    // A third of the cars have a departure scheduled within the next day.
    let departure_at = rng
        .chance(333)
        .then(|| now.plus(rng.between(30 * 60_000, 24 * 3_600_000)));
    let state = VehicleState {
        departure_at,
        ..VehicleState::default()
    };
    (capacity, state)
}

/// Place the requests `ids`, finishing the oldest to keep `RUNNING_WINDOW` running; returns
/// (placements/s, p50 µs, p99 µs) over the arrivals alone. With `shared_heads`, each prompt
/// starts with one of `SYSTEM_PROMPTS` system prompts (hashed before the clock starts).
fn placements(
    scheduler: &mut Scheduler,
    rng: &mut SimRng,
    now: Millis,
    out: &mut Vec<Command>,
    ids: std::ops::Range<u64>,
    shared_heads: bool,
) -> (f64, f64, f64) {
    let count = ids.end - ids.start;
    let mut latencies_ns: Vec<u32> = Vec::with_capacity(count as usize);
    let mut total_ns: u128 = 0;
    let mut prompt: Vec<i32> = Vec::new();
    for id in ids {
        // Drawn in this order so that the first phase's workload stays what it always was.
        let tenant = TenantId(1 + rng.below(3) as u32);
        let model = ModelId(rng.below(u64::from(MODELS)) as u16);
        let prompt_tokens = rng.between(10, 2_000) as u32;
        let max_tokens = rng.between(16, 1_024) as u32;
        let prompt_heads = if shared_heads {
            let system = rng.below(SYSTEM_PROMPTS) as i32;
            prompt.clear();
            prompt.extend((0..SYSTEM_PROMPT_TOKENS).map(|at| system * 1_000_000 + at));
            let question = prompt_tokens.saturating_sub(SYSTEM_PROMPT_TOKENS as u32);
            prompt.extend((0..question as i32).map(|at| (id as i32) ^ (at << 20)));
            crate::PromptHeads::of(&prompt)
        } else {
            crate::PromptHeads::default()
        };
        let event = Event::RequestArrived {
            request: RequestId(id),
            tenant,
            model,
            prompt_tokens,
            max_tokens,
            deadline: None,
            prompt_heads,
            resumes: None,
        };
        let started = Instant::now();
        scheduler.handle(now, event, out);
        let elapsed = started.elapsed().as_nanos();
        total_ns += elapsed;
        latencies_ns.push(u32::try_from(elapsed).unwrap_or(u32::MAX));
        out.clear();
        if id >= RUNNING_WINDOW {
            scheduler.handle(
                now,
                Event::RequestFinished {
                    request: RequestId(id - RUNNING_WINDOW),
                },
                out,
            );
            out.clear();
        }
    }
    latencies_ns.sort_unstable();
    let percentile =
        |p: usize| f64::from(latencies_ns[(latencies_ns.len() - 1) * p / 100]) / 1000.0;
    let per_second = count as f64 / (total_ns as f64 / 1e9);
    (per_second, percentile(50), percentile(99))
}

/// Handle `STATE_EVENTS` state changes on random nodes, each node keeping the departure it
/// registered with except for [`DEPARTURE_CHANGE_PERMILLE`] of the events; returns events per
/// second.
fn state_events(
    scheduler: &mut Scheduler,
    rng: &mut SimRng,
    departures: &[Option<Millis>],
    now: Millis,
    out: &mut Vec<Command>,
) -> f64 {
    let mut events: Vec<Event> = Vec::with_capacity(STATE_EVENTS as usize);
    for _ in 0..STATE_EVENTS {
        let index = rng.below(departures.len() as u64) as usize;
        let node = NodeId(index as u32);
        let departure_at = if rng.chance(DEPARTURE_CHANGE_PERMILLE) {
            rng.chance(500)
                .then(|| now.plus(rng.between(30 * 60_000, 24 * 3_600_000)))
        } else {
            departures[index]
        };
        let state = VehicleState {
            plugged_in: rng.chance(990),
            charging: rng.chance(500),
            state_of_charge_permille: rng.between(300, 1000) as u16,
            departure_at,
            chip_temperature_decicelsius: rng.between(300, 800) as i16,
        };
        events.push(Event::NodeStateChanged { node, state });
    }
    let started = Instant::now();
    for event in events {
        scheduler.handle(now, event, out);
        out.clear();
    }
    STATE_EVENTS as f64 / started.elapsed().as_secs_f64()
}
