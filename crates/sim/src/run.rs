//! The run: the production scheduler fed in simulated time, and the world
//! carrying out its commands.
//!
//! Time advances from event to event (`world::Agenda`); nothing is done per
//! vehicle per step, so a day of a million vehicles costs what its events
//! cost. The world's randomness is `scheduler::sim::SimRng` from the seed;
//! equal seeds give equal runs, event for event.

use domain::TenantClass;
use ledger::price_file::PriceConfig;
use ledger::pricing::PriceBook;
use scheduler::sim::SimRng;
use scheduler::{
    Command, Event, Millis, ModelId, NodeCapacity, NodeId, OwnerPolicy, RejectReason, RequestId,
    Scheduler, SchedulerConfig, StopReason, TenantConfig, TenantId, VehicleState,
};

use crate::fleet::{self, Session, DAY_MS, HOUR_MS};
use crate::model::{substream, unit, ClassModel, ClassWork, TariffModel};
use crate::scenario::Scenario;
use crate::settle::{SettlementThread, Settler, Work};
use crate::stats::{ClassCounts, Earnings, Migrations, Money, StepPoint};
use crate::world::{lease_of, request_id, Agenda, Due, Lease, Leases, Running, Vehicle, NONE};

/// Streams of randomness of the run itself.
const ARRIVALS: u64 = 10;
const GRID: u64 = 11;
const TARIFFS: u64 = 12;

/// What to run.
#[derive(Debug, Clone, Copy)]
pub struct Options {
    pub vehicles: u32,
    pub days: u32,
    pub seed: u64,
    /// A window instead of whole days (the validation run's shape).
    pub window: Option<Window>,
}

impl Options {
    /// Whole days from midnight of the scenario's first day.
    pub fn days(vehicles: u32, days: u32, seed: u64) -> Options {
        Options {
            vehicles,
            days,
            seed,
            window: None,
        }
    }
}

/// A stretch of the first day: requests arrive from `start_minute` for
/// `arrival_minutes`, and the run goes on `drain_minutes` more, so that the
/// work they brought can end. What the world did (plug-ins, unplugs,
/// arrivals) is recorded in the outcome, to be replayed by real processes.
#[derive(Debug, Clone, Copy)]
pub struct Window {
    pub start_minute: u32,
    pub arrival_minutes: u32,
    pub drain_minutes: u32,
}

/// What the world did during a window, in order.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Recording {
    /// When the window started (ms of simulated time).
    pub start_ms: i64,
    pub events: Vec<Recorded>,
}

#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Recorded {
    /// A vehicle plugged in (or was plugged in when the window started),
    /// with the departure its owner announced, if any.
    PlugIn {
        at_ms: i64,
        vehicle: u32,
        departure_ms: Option<i64>,
    },
    Unplug {
        at_ms: i64,
        vehicle: u32,
    },
    /// A request of tenant class `class` (index into `TenantClass::ALL`).
    Arrival {
        at_ms: i64,
        class: u8,
    },
}

/// Why a run could not start.
#[derive(Debug, thiserror::Error)]
pub enum RunError {
    #[error("{0}")]
    Setup(String),
}

/// Everything a finished run counted.
pub struct Outcome {
    pub options: Options,
    pub lease_requests: u32,
    pub classes: [ClassCounts; 3],
    pub migrations: Migrations,
    pub money: Money,
    pub earnings: Vec<Earnings>,
    pub series: Vec<StepPoint>,
    pub step_ms: i64,
    pub vehicle_classes: Vec<ClassModel>,
    pub class_of_vehicle_counts: Vec<u64>,
    pub energy_wh: f64,
    pub energy_cost: f64,
    pub scheduler_events: u64,
    pub world_events: u64,
    /// Broken promises of the scheduler the run saw (work assigned to an
    /// unplugged vehicle, work still running after an unplug, commands about
    /// unknown leases); a correct scheduler leaves it 0.
    pub anomalies: std::collections::BTreeMap<&'static str, u64>,
    pub stale_events: u64,
    pub settlement_failures: u64,
    pub first_settlement_failure: Option<String>,
    pub scheduler_memory_bytes: u64,
    /// Slots of every vehicle together (for utilisation).
    pub total_slots: u64,
    /// What the world did, for a run over a window.
    pub recording: Option<Recording>,
}

/// The run's whole state.
pub struct Run<'a> {
    scenario: &'a Scenario,
    options: Options,
    scheduler: Scheduler,
    agenda: Agenda,
    vehicles: Vec<Vehicle>,
    classes: Vec<ClassModel>,
    work: [ClassWork; 3],
    tariffs: Vec<TariffModel>,
    policies: Vec<OwnerPolicy>,
    leases: Leases,
    settlement: Option<SettlementThread>,
    arrivals: [SimRng; 3],
    /// Lease arrivals per second at the busiest hour, and each hour's share
    /// of that, per class.
    arrival_peak: [f64; 3],
    arrival_hourly: [[f64; 24]; 3],
    lease_requests: u32,
    /// Midnight of the first day: sessions and grid events are drawn per
    /// day from here.
    origin: i64,
    start: i64,
    /// No request arrives from here on.
    arrivals_end: i64,
    end: i64,
    recording: Option<Recording>,
    step_ms: i64,
    serial: u64,
    commands: Vec<Command>,
    /// Stopped requests whose committed tokens are still to be told to the
    /// scheduler, the last stopped first: `(request, committed_total)`.
    committed: Vec<(RequestId, u32)>,
    /// Reused by `finish_due` for the leases that end.
    scratch_done: Vec<u32>,
    sessions: Vec<Session>,
    // What is counted.
    counts: [ClassCounts; 3],
    migrations: Migrations,
    money: Money,
    earnings: Vec<Earnings>,
    series: Vec<StepPoint>,
    current: StepPoint,
    plugged: u32,
    busy: u64,
    /// Completion tokens per second being delivered now, per class; W being
    /// drawn now, per tariff.
    token_rate: [f64; 3],
    power_by_tariff: Vec<f64>,
    rates_at: i64,
    energy_wh: f64,
    energy_cost: f64,
    scheduler_events: u64,
    world_events: u64,
    anomalies: std::collections::BTreeMap<&'static str, u64>,
    /// The request whose end is being told to the scheduler: before the
    /// end, the scheduler applies what time changed up to now, which may
    /// stop and place it again; those commands are moot.
    finishing: Option<u64>,
    escalation_rng: SimRng,
}

impl<'a> Run<'a> {
    pub fn new(
        scenario: &'a Scenario,
        prices: &PriceConfig,
        options: Options,
    ) -> Result<Run<'a>, RunError> {
        let setup = RunError::Setup;
        if options.vehicles == 0 || options.days == 0 {
            return Err(setup("--vehicles and --days must be at least 1".into()));
        }
        if let Some(window) = options.window {
            if window.arrival_minutes == 0
                || window.start_minute + window.arrival_minutes + window.drain_minutes
                    > (DAY_MS / 60_000) as u32
            {
                return Err(setup(
                    "a window needs arrival minutes and must end within its day".into(),
                ));
            }
        }
        let book = PriceBook::new(prices.sheet.clone()).map_err(|e| setup(e.to_string()))?;
        let settler = Settler::new(book, &scenario.model, &scenario.cloud_model).map_err(setup)?;
        let work = TenantClass::ALL.map(|class| {
            let demand = scenario
                .demand
                .classes
                .iter()
                .find(|c| c.class == class.as_str());
            let (prompt, answer) = demand.map_or((1, 1), |d| (d.prompt_tokens, d.answer_tokens));
            ClassWork::new(scenario, prompt, answer)
        });
        let vehicles_f = f64::from(options.vehicles);
        let per_day: f64 = scenario
            .demand
            .classes
            .iter()
            .map(|class| class.requests_per_vehicle_per_day * vehicles_f)
            .sum();
        let lease_requests = if scenario.demand.lease_requests > 0 {
            scenario.demand.lease_requests
        } else {
            let total = per_day * f64::from(options.days);
            (total / scenario.demand.leases_max as f64).ceil().max(1.0) as u32
        };
        let mut arrival_peak = [0.0; 3];
        let mut arrival_hourly = [[0.0; 24]; 3];
        for demand in &scenario.demand.classes {
            let index = demand
                .class
                .parse::<TenantClass>()
                .expect("validated")
                .index();
            let total: f64 = demand.hourly_shape.iter().sum();
            if total <= 0.0 {
                continue;
            }
            let daily =
                demand.requests_per_vehicle_per_day * vehicles_f / f64::from(lease_requests);
            for (hour, weight) in demand.hourly_shape.iter().enumerate() {
                arrival_hourly[index][hour] = daily * weight / total / 3_600.0;
            }
            arrival_peak[index] = arrival_hourly[index].iter().cloned().fold(0.0, f64::max);
        }
        let queue = ((scenario.demand.queue_requests_per_vehicle * vehicles_f)
            / f64::from(lease_requests))
        .ceil()
        .max(1.0) as u32;
        let config = SchedulerConfig {
            queue_max_per_class: [queue; 3],
            nodes_max: options.vehicles.max(SchedulerConfig::default().nodes_max),
            ..SchedulerConfig::default()
        };
        config.validate().map_err(|e| setup(e.to_string()))?;
        let origin = scenario.start_day * DAY_MS;
        let (start, arrivals_end, end) = match options.window {
            None => {
                let end = origin + i64::from(options.days) * DAY_MS;
                (origin, end, end)
            }
            Some(window) => {
                let start = origin + i64::from(window.start_minute) * 60_000;
                let arrivals_end = start + i64::from(window.arrival_minutes) * 60_000;
                (
                    start,
                    arrivals_end,
                    arrivals_end + i64::from(window.drain_minutes) * 60_000,
                )
            }
        };
        let step_ms = i64::from(scenario.step_seconds) * 1_000;
        let classes: Vec<ClassModel> = (0..scenario.vehicle_classes.len())
            .map(|index| ClassModel::new(scenario, index))
            .collect();
        let tariffs: Vec<TariffModel> = scenario.tariffs.iter().map(TariffModel::new).collect();
        let policies = (0..scenario.owner_policies.len())
            .map(|index| fleet::owner_policy(scenario, index))
            .collect();
        let vehicles = (0..options.vehicles)
            .map(|vehicle| Vehicle::new(fleet::traits(scenario, options.seed, vehicle)))
            .collect();
        Ok(Run {
            scenario,
            options,
            scheduler: Scheduler::new(config),
            agenda: Agenda::default(),
            vehicles,
            work,
            power_by_tariff: vec![0.0; tariffs.len()],
            tariffs,
            classes,
            policies,
            leases: Leases::default(),
            settlement: Some(SettlementThread::start(settler, options.vehicles as usize)),
            arrivals: [0, 1, 2].map(|class| substream(options.seed, ARRIVALS, class)),
            arrival_peak,
            arrival_hourly,
            lease_requests,
            origin,
            start,
            arrivals_end,
            end,
            recording: options.window.map(|_| Recording {
                start_ms: start,
                events: Vec::new(),
            }),
            step_ms,
            serial: 0,
            commands: Vec::new(),
            committed: Vec::new(),
            scratch_done: Vec::new(),
            sessions: Vec::new(),
            counts: Default::default(),
            migrations: Migrations::default(),
            money: Money::default(),
            earnings: vec![Earnings::default(); options.vehicles as usize],
            series: Vec::new(),
            current: StepPoint::default(),
            plugged: 0,
            busy: 0,
            token_rate: [0.0; 3],
            rates_at: start,
            energy_wh: 0.0,
            energy_cost: 0.0,
            scheduler_events: 0,
            world_events: 0,
            anomalies: Default::default(),
            finishing: None,
            escalation_rng: substream(options.seed, ARRIVALS, 99),
        })
    }

    /// Runs to the end and hands back what was counted.
    pub fn run(mut self) -> Outcome {
        self.setup();
        while let Some((at, due)) = self.agenda.pop_before(self.end) {
            self.world_events += 1;
            self.handle(at, due);
        }
        self.finish();
        let settled = self
            .settlement
            .take()
            .expect("settled once, at the end")
            .finish();
        let mut money = settled.money;
        money.grid_payments = self.money.grid_payments;
        for (earnings, (share, energy)) in self.earnings.iter_mut().zip(&settled.owners) {
            earnings.revenue_share = *share;
            earnings.energy_reimbursed = *energy;
        }
        let class_of_vehicle_counts = (0..self.classes.len())
            .map(|class| {
                self.vehicles
                    .iter()
                    .filter(|v| usize::from(v.traits.class) == class)
                    .count() as u64
            })
            .collect();
        let total_slots = self
            .vehicles
            .iter()
            .map(|v| u64::from(self.classes[usize::from(v.traits.class)].slots))
            .sum();
        Outcome {
            options: self.options,
            lease_requests: self.lease_requests,
            classes: self.counts,
            migrations: self.migrations,
            money,
            earnings: self.earnings,
            series: self.series,
            step_ms: self.step_ms,
            vehicle_classes: self.classes,
            class_of_vehicle_counts,
            energy_wh: self.energy_wh,
            energy_cost: self.energy_cost,
            scheduler_events: self.scheduler_events,
            world_events: self.world_events,
            anomalies: std::mem::take(&mut self.anomalies),
            stale_events: self.scheduler.stale_events(),
            settlement_failures: settled.failures,
            first_settlement_failure: settled.first_failure,
            scheduler_memory_bytes: self.scheduler.memory_estimate_bytes(),
            total_slots,
            recording: self.recording.take(),
        }
    }

    fn setup(&mut self) {
        let now = self.start;
        for (index, class) in TenantClass::ALL.into_iter().enumerate() {
            let config = TenantConfig {
                class,
                weight: 1,
                max_concurrency: u32::MAX,
                tokens_per_minute: None,
                reserved_min_share_permille: 0,
            };
            self.feed(
                now,
                Event::TenantConfigured {
                    tenant: TenantId(index as u32 + 1),
                    config,
                },
            );
        }
        for vehicle in 0..self.vehicles.len() {
            let traits = self.vehicles[vehicle].traits;
            let class = &self.classes[usize::from(traits.class)];
            let tariff = &self.tariffs[usize::from(traits.tariff)];
            let capacity = NodeCapacity {
                slots: class.slots,
                decode_tokens_per_second: class.decode_tokens_per_second,
                prefill_tokens_per_second: class.prefill_tokens_per_second,
                models: vec![ModelId(0)],
                loaded: vec![ModelId(0)],
                energy_price_micro_usd_per_kwh: (tariff.mean_price() * 1e6) as u32,
                // Every simulated vehicle runs one engine build and attention setting.
                numerics: 0,
            };
            let state = VehicleState {
                plugged_in: false,
                charging: false,
                state_of_charge_permille: 600,
                ..VehicleState::default()
            };
            let policy = self.policies[usize::from(traits.policy)];
            self.vehicles[vehicle].last = now;
            self.feed(
                now,
                Event::NodeRegistered {
                    node: NodeId(vehicle as u32),
                    capacity,
                    state,
                    policy,
                },
            );
        }
        // The night before the first day: cars plugged in overnight are
        // plugged in when the run starts.
        self.draw_sessions(-1);
        self.agenda.push(now, Due::DayStart { day: 0 });
        self.agenda.push(now, Due::Tick);
        for class in 0..3u8 {
            self.next_arrival(now, class);
        }
    }

    fn handle(&mut self, now: i64, due: Due) {
        match due {
            Due::Tick => {
                // A point holds the flows of its step and the state at its
                // start.
                self.flush_rates(now);
                if now > self.start {
                    self.series.push(std::mem::take(&mut self.current));
                }
                self.current.plugged_vehicles = self.plugged;
                self.current.available_slots = self.scheduler.available_slots();
                self.current.busy_slots = self.busy;
                self.current.waiting_requests = TenantClass::ALL
                    .iter()
                    .map(|class| self.scheduler.queued(*class) as u64)
                    .sum::<u64>()
                    * u64::from(self.lease_requests);
                self.feed(now, Event::Tick);
                self.agenda.push(now + self.step_ms, Due::Tick);
            }
            Due::DayStart { day } => {
                for (index, tariff) in self.tariffs.iter_mut().enumerate() {
                    let mut rng =
                        substream(self.options.seed, TARIFFS, (day as u64) << 8 | index as u64);
                    tariff.draw_day(&mut rng);
                }
                self.draw_sessions(day);
                self.draw_grid_events(day);
                self.agenda.push(
                    self.origin + (day + 1) * DAY_MS,
                    Due::DayStart { day: day + 1 },
                );
            }
            Due::PlugIn {
                vehicle,
                unplug,
                departure,
            } => self.plug_in(now, vehicle, unplug, departure),
            Due::Unplug { vehicle, session } => self.unplug(now, vehicle, session),
            Due::Arrival { class } => {
                self.record(Recorded::Arrival { at_ms: now, class });
                self.arrive(now, class);
                self.next_arrival(now, class);
            }
            Due::Retry { lease, request } => self.retry(now, lease, request),
            Due::Finish { vehicle } => {
                let car = &mut self.vehicles[vehicle as usize];
                if car.due_finish == now {
                    car.due_finish = i64::MAX;
                    self.finish_due(now, vehicle);
                }
            }
            Due::EnergyCap { vehicle } => {
                let car = &mut self.vehicles[vehicle as usize];
                if car.due_cap == now {
                    car.due_cap = i64::MAX;
                    self.advance(now, vehicle);
                    self.report_energy(now, vehicle);
                    self.reschedule(now, vehicle);
                }
            }
            Due::GridStart { programme } => self.grid(now, programme, true),
            Due::GridEnd { programme } => self.grid(now, programme, false),
        }
    }

    /// Applies one event to the scheduler and carries out its commands, and
    /// the events those commands lead to.
    fn feed(&mut self, now: i64, event: Event) {
        self.feed_one(now, event);
        while let Some((request, committed_total)) = self.committed.pop() {
            let event = Event::TokensCommitted {
                request,
                committed_total,
            };
            self.feed_one(now, event);
        }
    }

    /// Applies one event to the scheduler and carries out its commands.
    #[inline]
    fn feed_one(&mut self, now: i64, event: Event) {
        self.scheduler_events += 1;
        let mut commands = std::mem::take(&mut self.commands);
        commands.clear();
        self.scheduler.handle(Millis(now), event, &mut commands);
        for command in &commands {
            self.apply(now, *command);
        }
        self.commands = commands;
    }

    fn apply(&mut self, now: i64, command: Command) {
        match command {
            Command::Assign { request, node, .. } => self.start_lease(now, request, node),
            Command::Stop {
                request,
                node,
                reason,
            } => {
                let Some(index) = self.lease_index(request) else {
                    self.anomaly_about(request, "stop_unknown");
                    return;
                };
                if self.leases.get(index).map(|l| l.vehicle) != Some(node.0) {
                    self.anomaly_about(request, "stop_elsewhere");
                    return;
                }
                self.stop_lease(now, index, true);
                let counter = match reason {
                    StopReason::Departed => &mut self.migrations.departed,
                    StopReason::Draining => &mut self.migrations.draining,
                    StopReason::Preempted => &mut self.migrations.preempted,
                    StopReason::NodeLost => &mut self.migrations.node_lost,
                    StopReason::Stalled => &mut self.migrations.stalled,
                };
                *counter += 1;
                let lease = self.leases.get(index).expect("stopped, not removed");
                let committed = (lease.fraction_done()
                    * f64::from(lease.requests)
                    * f64::from(self.work[usize::from(lease.class)].answer_tokens))
                    as u32;
                self.committed.push((request, committed));
            }
            Command::Cancel { .. } => self.anomaly("cancel"),
            Command::Reject {
                request,
                reason,
                retry_after_ms,
            } => self.rejected(now, request, reason, retry_after_ms),
        }
    }

    fn anomaly(&mut self, kind: &'static str) {
        *self.anomalies.entry(kind).or_default() += 1;
    }

    fn settle(&mut self, work: Work) {
        self.settlement
            .as_mut()
            .expect("settling until the end")
            .send(work);
    }

    /// Counts a broken promise, unless it is about the request whose end
    /// is being told.
    fn anomaly_about(&mut self, request: RequestId, kind: &'static str) {
        if self.finishing != Some(request.0) {
            self.anomaly(kind);
        }
    }

    fn lease_index(&self, request: RequestId) -> Option<u32> {
        let index = lease_of(request.0);
        (self.leases.get(index)?.request == request.0).then_some(index)
    }

    fn record(&mut self, event: Recorded) {
        if let Some(recording) = &mut self.recording {
            recording.events.push(event);
        }
    }

    fn draw_sessions(&mut self, day: i64) {
        let day_start = self.origin + day * DAY_MS;
        let mut sessions = std::mem::take(&mut self.sessions);
        for vehicle in 0..self.vehicles.len() {
            let segment = usize::from(self.vehicles[vehicle].traits.segment);
            fleet::sessions(
                self.scenario,
                self.options.seed,
                vehicle as u32,
                segment,
                day,
                Millis(day_start),
                &mut sessions,
            );
            for session in &sessions {
                if session.unplug.0 <= self.start {
                    continue;
                }
                self.agenda.push(
                    session.plug_in.0.max(self.start),
                    Due::PlugIn {
                        vehicle: vehicle as u32,
                        unplug: session.unplug.0,
                        departure: session.announced_departure.map_or(-1, |d| d.0),
                    },
                );
            }
        }
        self.sessions = sessions;
    }

    fn draw_grid_events(&mut self, day: i64) {
        let day_start = self.origin + day * DAY_MS;
        let mut rng = substream(self.options.seed, GRID, day as u64);
        for (index, event) in self.scenario.grid_events.iter().enumerate().take(8) {
            if unit(&mut rng) < event.probability_per_day {
                let programme = index as u8;
                let start = day_start + i64::from(event.start_hour) * HOUR_MS;
                let end = day_start + i64::from(event.end_hour) * HOUR_MS;
                self.agenda.push(start, Due::GridStart { programme });
                self.agenda.push(end, Due::GridEnd { programme });
            }
        }
    }

    fn plug_in(&mut self, now: i64, vehicle: u32, unplug: i64, departure: i64) {
        let car = &mut self.vehicles[vehicle as usize];
        if car.plugged {
            return;
        }
        car.plugged = true;
        car.session += 1;
        let session = car.session;
        self.plugged += 1;
        self.agenda.push(unplug, Due::Unplug { vehicle, session });
        let departure = (departure >= 0).then_some(Millis(departure));
        self.record(Recorded::PlugIn {
            at_ms: now,
            vehicle,
            departure_ms: departure.map(|d| d.0),
        });
        self.feed(now, state_changed(vehicle, true, departure));
    }

    fn unplug(&mut self, now: i64, vehicle: u32, session: u32) {
        let car = &self.vehicles[vehicle as usize];
        if !car.plugged || car.session != session {
            return;
        }
        // The car is plugged in until the scheduler has applied what time
        // alone changed up to now, which it does before the unplug itself
        // (a drain may move work onto this car first, then off again).
        self.record(Recorded::Unplug {
            at_ms: now,
            vehicle,
        });
        self.feed(now, state_changed(vehicle, false, None));
        self.vehicles[vehicle as usize].plugged = false;
        self.plugged -= 1;
        // The scheduler must have moved everything off a car that left.
        let left_running: Vec<u32> = self.vehicles[vehicle as usize]
            .running
            .iter()
            .map(|running| running.lease)
            .collect();
        for lease in left_running {
            self.anomaly("left_running");
            self.stop_lease(now, lease, true);
        }
    }

    fn next_arrival(&mut self, now: i64, class: u8) {
        let index = usize::from(class);
        let peak = self.arrival_peak[index];
        if peak <= 0.0 {
            return;
        }
        let rng = &mut self.arrivals[index];
        let mut at = now as f64;
        // Thinning: candidates at the peak rate, kept by the hour's share.
        loop {
            at += -(1.0 - unit(rng)).ln() / peak * 1_000.0;
            let hour = ((at as i64).rem_euclid(DAY_MS) / HOUR_MS) as usize;
            if unit(rng) * peak < self.arrival_hourly[index][hour] || at >= self.arrivals_end as f64
            {
                break;
            }
        }
        if (at as i64) < self.arrivals_end {
            self.agenda.push(at as i64, Due::Arrival { class });
        }
    }

    fn arrive(&mut self, now: i64, class: u8) {
        let index = usize::from(class);
        let tenant_class = TenantClass::ALL[index];
        let demand = self
            .scenario
            .demand
            .classes
            .iter()
            .find(|c| c.class == tenant_class.as_str())
            .expect("a class with arrivals has demand");
        let deadline_ms = i64::from(demand.deadline_seconds) * 1_000;
        let requests = self.lease_requests;
        // Escalated requests: the expected share, the remainder drawn.
        let expected = f64::from(requests) * self.scenario.demand.escalation_share;
        let mut escalated = expected.floor() as u32;
        if unit(&mut self.escalation_rng) < expected.fract() {
            escalated += 1;
        }
        let work = self.work[index].clone();
        self.counts[index].arrived += u64::from(requests);
        self.serial += 1;
        if escalated > 0 {
            self.counts[index].escalated += u64::from(escalated);
            let prompt = u64::from(escalated) * u64::from(work.prompt_tokens);
            let completion = u64::from(escalated) * u64::from(work.answer_tokens);
            self.counts[index].cloud_prompt_tokens += prompt;
            self.counts[index].cloud_completion_tokens += completion;
            self.settle(Work {
                serial: self.serial,
                segment: 0,
                class: tenant_class,
                admitted_at: now,
                completed_at: now,
                prompt_tokens: prompt,
                completion_tokens: completion,
                vehicle: None,
                started_at: now,
            });
        }
        let fleet_requests = requests - escalated;
        if fleet_requests == 0 {
            return;
        }
        let lease = Lease {
            request: 0,
            serial: self.serial,
            class,
            requests: fleet_requests,
            arrived: now,
            deadline: now + deadline_ms,
            work: f64::from(fleet_requests) * work.reference_seconds,
            done: 0.0,
            reprefill_due: 0.0,
            vehicle: NONE,
            segment_progress: 0.0,
            segment_energy: 0.0,
            segment_start: now,
            segment_reprefill: 0.0,
            segments: 0,
            first_start: -1,
            stopped_at: -1,
            gaps_ms: 0,
            moves: 0,
            retries: 0,
            prompt_settled: 0,
            completion_settled: 0,
        };
        let lease = self.leases.insert(lease);
        self.admit(now, lease);
    }

    fn admit(&mut self, now: i64, index: u32) {
        self.serial += 1;
        let request = request_id(self.serial, index);
        let lease = self.leases.get_mut(index).expect("admitted lease");
        lease.request = request;
        let work = &self.work[usize::from(lease.class)];
        let event = Event::RequestArrived {
            request: RequestId(request),
            tenant: TenantId(u32::from(lease.class) + 1),
            model: ModelId(0),
            prompt_tokens: lease.requests.saturating_mul(work.prompt_tokens),
            max_tokens: lease.requests.saturating_mul(work.answer_tokens),
            deadline: Some(Millis(lease.deadline)),
            prompt_heads: Default::default(),
            resumes: None,
        };
        self.feed(now, event);
    }

    fn retry(&mut self, now: i64, index: u32, request: u64) {
        if self.leases.get(index).is_some_and(|l| l.request == request) {
            self.admit(now, index);
        }
    }

    fn rejected(&mut self, now: i64, request: RequestId, reason: RejectReason, retry: Option<u64>) {
        let Some(index) = self.lease_index(request) else {
            self.anomaly_about(request, "reject_unknown");
            return;
        };
        let lease = self.leases.get(index).expect("known lease");
        let class = usize::from(lease.class);
        if let Some(after) = retry.filter(|_| reason.is_retryable()) {
            let at = now + after as i64;
            let retries_left = lease.retries < self.scenario.demand.client_retries;
            if retries_left && at < lease.deadline && lease.first_start < 0 {
                self.leases.get_mut(index).expect("known lease").retries += 1;
                self.agenda.push(
                    at,
                    Due::Retry {
                        lease: index,
                        request: request.0,
                    },
                );
                return;
            }
        }
        let lease = self.leases.remove(index).expect("known lease");
        let served = (lease.fraction_done() * f64::from(lease.requests)).floor() as u64;
        self.counts[class].served += served;
        let lost = u64::from(lease.requests) - served;
        match reason {
            RejectReason::DeadlineExpired => self.counts[class].deadline_missed += lost,
            _ => {
                *self.counts[class]
                    .refused_by_reason
                    .entry(reason_name(reason))
                    .or_default() += lost;
            }
        }
    }

    /// Brings a vehicle's clocks, energy and its owner's cost up to `now`.
    fn advance(&mut self, now: i64, vehicle: u32) {
        let car = &mut self.vehicles[vehicle as usize];
        let elapsed = now - car.last;
        car.last = now;
        let active = car.running.len();
        if elapsed <= 0 || active == 0 {
            return;
        }
        let class = &self.classes[usize::from(car.traits.class)];
        let seconds = elapsed as f64 / 1_000.0;
        car.progress += seconds * class.per_stream_speed[active];
        let wh = class.watts[active] * seconds / 3_600.0;
        car.energy_per_stream += wh / active as f64;
        let day = (now - self.origin).div_euclid(DAY_MS);
        if day != car.energy_day {
            car.energy_day = day;
            car.energy_today = 0.0;
        }
        car.energy_today += wh;
        if self.policies[usize::from(car.traits.policy)]
            .max_energy_per_day_wh
            .is_some()
        {
            car.energy_unreported += wh;
        }
        // The owner's cost, hour by hour at their tariff.
        let tariff = &self.tariffs[usize::from(car.traits.tariff)];
        let watts = class.watts[active];
        let mut from = now - elapsed;
        let mut cost = 0.0;
        while from < now {
            let hour_end = (from.div_euclid(HOUR_MS) + 1) * HOUR_MS;
            let to = hour_end.min(now);
            let day = (from - self.origin).div_euclid(DAY_MS).max(0) as usize;
            let hour = (from.rem_euclid(DAY_MS) / HOUR_MS) as usize;
            cost += watts * (to - from) as f64 / 3_600_000.0 / 1_000.0 * tariff.price(day, hour);
            from = to;
        }
        self.earnings[vehicle as usize].energy_cost += cost;
    }

    fn report_energy(&mut self, now: i64, vehicle: u32) {
        let car = &mut self.vehicles[vehicle as usize];
        let wh = car.energy_unreported.floor();
        if wh >= 1.0 {
            car.energy_unreported -= wh;
            let event = Event::NodeEnergyUsed {
                node: NodeId(vehicle),
                wh: wh as u32,
            };
            self.feed(now, event);
        }
    }

    /// Adds what the delivery and power rates produced since they were last
    /// flushed to the current step.
    fn flush_rates(&mut self, now: i64) {
        let seconds = (now - self.rates_at) as f64 / 1_000.0;
        if seconds <= 0.0 {
            return;
        }
        self.rates_at = now;
        for class in 0..3 {
            self.current.tokens[class] += self.token_rate[class] * seconds;
        }
        let day = ((now - self.origin).div_euclid(DAY_MS)).max(0) as usize;
        let hour = (((now - 1).rem_euclid(DAY_MS)) / HOUR_MS) as usize;
        for (tariff, watts) in self.power_by_tariff.iter().enumerate() {
            let wh = watts * seconds / 3_600.0;
            self.current.energy_wh += wh;
            self.energy_wh += wh;
            let cost = wh / 1_000.0 * self.tariffs[tariff].price(day, hour);
            self.current.energy_cost += cost;
            self.energy_cost += cost;
        }
    }

    /// A vehicle serving anything, its class and how many leases it runs.
    fn serving(&self, vehicle: u32) -> Option<(&Vehicle, &ClassModel, usize)> {
        let car = &self.vehicles[vehicle as usize];
        let active = car.running.len();
        let class = &self.classes[usize::from(car.traits.class)];
        (active > 0).then_some((car, class, active))
    }

    /// Adds (`sign` 1) or removes (-1) a vehicle's current leases from the
    /// delivery and power rates.
    fn account_rates(&mut self, vehicle: u32, sign: f64) {
        let Some((car, class, active)) = self.serving(vehicle) else {
            return;
        };
        let speed = class.per_stream_speed[active];
        let (watts, tariff) = (class.watts[active], usize::from(car.traits.tariff));
        let mut tokens_per_second = [0.0; 3];
        for (class, running) in car.running_by_class.iter().enumerate() {
            let work = &self.work[class];
            let per_lease = speed * f64::from(work.answer_tokens) / work.reference_seconds;
            // Added once per lease, as a sum of the leases' rates.
            for _ in 0..*running {
                tokens_per_second[class] += per_lease;
            }
        }
        for (rate, added) in self.token_rate.iter_mut().zip(tokens_per_second) {
            *rate += sign * added;
        }
        self.power_by_tariff[tariff] += sign * watts;
    }

    /// Queues the vehicle's next finish and, for a capped owner, the moment
    /// its cap is reached.
    fn reschedule(&mut self, now: i64, vehicle: u32) {
        let Some((car, class, active)) = self.serving(vehicle) else {
            return;
        };
        let speed = class.per_stream_speed[active];
        let nearest = car
            .running
            .iter()
            .map(|running| running.target)
            .fold(f64::INFINITY, f64::min);
        let seconds = ((nearest - car.progress) / speed).max(0.0);
        let finish = now + domain::ceil_ms(seconds * 1_000.0);
        let cap = self.policies[usize::from(car.traits.policy)]
            .max_energy_per_day_wh
            .map(|cap| {
                let left = (f64::from(cap) - car.energy_today).max(0.0) + 1.0;
                now + domain::ceil_ms(left / class.watts[active] * 3_600_000.0)
            });
        let car = &mut self.vehicles[vehicle as usize];
        if finish < car.due_finish {
            car.due_finish = finish;
            self.agenda.push(finish, Due::Finish { vehicle });
        }
        if let Some(cap) = cap.filter(|cap| *cap < car.due_cap) {
            car.due_cap = cap;
            self.agenda.push(cap, Due::EnergyCap { vehicle });
        }
    }

    fn start_lease(&mut self, now: i64, request: RequestId, node: NodeId) {
        let Some(index) = self.lease_index(request) else {
            self.anomaly_about(request, "assign_unknown");
            return;
        };
        let vehicle = node.0;
        let Some(car) = self.vehicles.get(vehicle as usize) else {
            self.anomaly("assign_unknown_vehicle");
            return;
        };
        if !car.plugged || self.leases.get(index).is_some_and(Lease::running) {
            self.anomaly("assign_unplugged_or_running");
            return;
        }
        self.flush_rates(now);
        self.advance(now, vehicle);
        self.account_rates(vehicle, -1.0);
        let car = &self.vehicles[vehicle as usize];
        let (progress, energy) = (car.progress, car.energy_per_stream);
        let lease = self.leases.get_mut(index).expect("known lease");
        let lease_class = lease.class;
        lease.vehicle = vehicle;
        lease.segment_progress = progress;
        lease.segment_energy = energy;
        lease.segment_start = now;
        lease.segment_reprefill = std::mem::take(&mut lease.reprefill_due);
        if lease.first_start < 0 {
            lease.first_start = now;
            let class = usize::from(lease.class);
            let wait = (now - lease.arrived) as f64;
            self.counts[class]
                .queueing
                .add(wait, u64::from(lease.requests));
        } else if lease.stopped_at >= 0 {
            lease.gaps_ms += now - lease.stopped_at;
            lease.stopped_at = -1;
        }
        let target = lease.target();
        let car = &mut self.vehicles[vehicle as usize];
        car.running.push(Running {
            lease: index,
            target,
        });
        car.running_by_class[usize::from(lease_class)] += 1;
        self.busy += 1;
        self.account_rates(vehicle, 1.0);
        self.reschedule(now, vehicle);
    }

    /// Takes a lease off its vehicle at `now` and settles the segment; it
    /// stays alive (to be placed again) unless it is done.
    fn stop_lease(&mut self, now: i64, index: u32, moved: bool) {
        let vehicle = self.leases.get(index).expect("running lease").vehicle;
        self.flush_rates(now);
        self.advance(now, vehicle);
        self.account_rates(vehicle, -1.0);
        let car = &mut self.vehicles[vehicle as usize];
        if let Some(at) = car.running.iter().position(|r| r.lease == index) {
            car.running.remove(at);
            let class = self.leases.get(index).expect("running lease").class;
            car.running_by_class[usize::from(class)] -= 1;
        }
        let (progress, energy_clock) = (car.progress, car.energy_per_stream);
        let tariff_index = usize::from(car.traits.tariff);
        self.busy -= 1;
        let lease = self.leases.get_mut(index).expect("running lease");
        let advanced = progress - lease.segment_progress;
        let fresh = (advanced - lease.segment_reprefill)
            .max(0.0)
            .min(lease.work - lease.done);
        lease.done += fresh;
        if lease.work - lease.done < 1e-6 {
            lease.done = lease.work;
        }
        lease.vehicle = NONE;
        if moved {
            lease.moves += 1;
            lease.stopped_at = now;
            lease.reprefill_due = self.work[usize::from(lease.class)].reprefill_seconds;
        }
        let energy = energy_clock - lease.segment_energy;
        let work = &self.work[usize::from(lease.class)];
        let fraction = lease.fraction_done();
        let requests = f64::from(lease.requests);
        let prompt_total = (fraction * requests * f64::from(work.prompt_tokens)) as u64;
        let completion_total = (fraction * requests * f64::from(work.answer_tokens)) as u64;
        let prompt = prompt_total.saturating_sub(lease.prompt_settled);
        let completion = completion_total.saturating_sub(lease.completion_settled);
        lease.prompt_settled = prompt_total.max(lease.prompt_settled);
        lease.completion_settled = completion_total.max(lease.completion_settled);
        lease.segments += 1;
        let class = TenantClass::ALL[usize::from(lease.class)];
        let (serial, segment) = (lease.serial, lease.segments);
        let started = lease.segment_start;
        let (arrived, elapsed) = (lease.arrived, now - lease.segment_start);
        let counts = &mut self.counts[class.index()];
        counts.fleet_prompt_tokens += prompt;
        counts.fleet_completion_tokens += completion;
        let started_day = (started - self.origin).div_euclid(DAY_MS).max(0) as usize;
        let started_hour = (started.rem_euclid(DAY_MS) / HOUR_MS) as usize;
        let tariff = self.tariffs[tariff_index].price(started_day, started_hour);
        self.settle(Work {
            serial,
            segment,
            class,
            admitted_at: arrived,
            completed_at: now,
            prompt_tokens: prompt,
            completion_tokens: completion,
            vehicle: Some((vehicle, energy, elapsed, tariff)),
            started_at: started,
        });
        self.account_rates(vehicle, 1.0);
        self.reschedule(now, vehicle);
    }

    fn finish_due(&mut self, now: i64, vehicle: u32) {
        self.advance(now, vehicle);
        let car = &self.vehicles[vehicle as usize];
        let speed = self.classes[usize::from(car.traits.class)].per_stream_speed[car.active()];
        // Within a millisecond's progress of the end counts as done.
        let slack = speed / 1_000.0 + 1e-9;
        let mut done = std::mem::take(&mut self.scratch_done);
        done.clear();
        done.extend(
            car.running
                .iter()
                .filter(|running| running.target - car.progress <= slack)
                .map(|running| running.lease),
        );
        if done.is_empty() {
            self.scratch_done = done;
            self.reschedule(now, vehicle);
            return;
        }
        for index in done.drain(..) {
            let request = self.leases.get(index).expect("running").request;
            self.stop_lease(now, index, false);
            let lease = self.leases.remove(index).expect("finished lease");
            let class = usize::from(lease.class);
            let counts = &mut self.counts[class];
            counts.served += u64::from(lease.requests);
            let wait = (lease.first_start - lease.arrived) as f64;
            let active = (now - lease.first_start - lease.gaps_ms) as f64;
            let service = active / f64::from(lease.requests);
            let moved = u64::from(lease.moves.min(lease.requests));
            counts
                .latency
                .add(wait + service, u64::from(lease.requests) - moved);
            if moved > 0 {
                let gap = lease.gaps_ms as f64 / moved as f64;
                counts.latency.add(wait + service + gap, moved);
            }
            self.finishing = Some(request);
            self.feed(
                now,
                Event::RequestFinished {
                    request: RequestId(request),
                },
            );
            self.finishing = None;
        }
        self.scratch_done = done;
    }

    fn grid(&mut self, now: i64, programme: u8, starts: bool) {
        let event = &self.scenario.grid_events[usize::from(programme)];
        let hours = u64::from(event.end_hour - event.start_hour);
        let pays = event.pays_per_kwh;
        let window: u32 = (event.start_hour..event.end_hour).fold(0, |mask, h| mask | 1 << h);
        for vehicle in 0..self.vehicles.len() {
            let car = &self.vehicles[vehicle];
            if car.traits.grid_events & (1 << programme) == 0 {
                continue;
            }
            let mut policy = self.policies[usize::from(car.traits.policy)];
            if starts {
                // Paid for the compute load it does not draw in the window:
                // what it was drawing when the event began.
                let active = car.active();
                if active > 0 {
                    let watts = self.classes[usize::from(car.traits.class)].watts[active];
                    let paid = watts / 1_000.0 * hours as f64 * pays;
                    let micro = (paid * 1e6) as i64;
                    self.earnings[vehicle].grid_payments += micro;
                    self.money.grid_payments += micro;
                }
                policy.allowed_hours_utc &= !window;
            }
            self.feed(
                now,
                Event::NodePolicyChanged {
                    node: NodeId(vehicle as u32),
                    policy,
                },
            );
        }
    }

    /// The end: what still runs is settled as far as it got.
    fn finish(&mut self) {
        let end = self.end;
        self.flush_rates(end);
        self.series.push(std::mem::take(&mut self.current));
        for index in self.leases.indexes() {
            if self.leases.get(index).is_some_and(Lease::running) {
                self.stop_lease(end, index, false);
            }
            let lease = self.leases.remove(index).expect("alive");
            let served = (lease.fraction_done() * f64::from(lease.requests)).floor() as u64;
            let counts = &mut self.counts[usize::from(lease.class)];
            counts.served += served;
            counts.unfinished += u64::from(lease.requests) - served;
        }
    }
}

/// The name a refusal's reason has in the report.
fn reason_name(reason: RejectReason) -> &'static str {
    match reason {
        RejectReason::NoEligibleNode => "no_eligible_node",
        RejectReason::QueueFull => "queue_full",
        RejectReason::OverConcurrency => "over_concurrency",
        RejectReason::OverTokensPerMinute => "over_tokens_per_minute",
        RejectReason::DeadlineExpired => "deadline_expired",
        RejectReason::UnknownTenant => "unknown_tenant",
        RejectReason::AttemptsExhausted => "attempts_exhausted",
    }
}

/// A vehicle's report of being plugged in (charging, with the departure its
/// owner announced) or not.
fn state_changed(vehicle: u32, plugged_in: bool, departure_at: Option<Millis>) -> Event {
    Event::NodeStateChanged {
        node: NodeId(vehicle),
        state: VehicleState {
            plugged_in,
            charging: plugged_in,
            state_of_charge_permille: 600,
            departure_at,
            ..VehicleState::default()
        },
    }
}
