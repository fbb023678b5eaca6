//! The demo's cars: one agent process per simulated vehicle, the vehicle-state
//! feed it reads, and what happens when a car goes away.
//!
//! Each car reads its vehicle state from a `file:` feed that the demo keeps:
//! the car's simulated trace (`crates/agent/traces`), replayed from the car's
//! start, unless its owner (here, `--chaos`) unplugged it or scheduled a
//! departure. The feed is the same mechanism a real vehicle gateway uses, so
//! the coordinator sees an unplugging or a departure exactly as it would see
//! one in a real fleet.
//!
//! A car whose process ends — crashed, killed, or driven off — is a handover,
//! not the end of the demo: the coordinator moves its work to the other cars
//! and the car comes home after a pause. A car that exits before it ever
//! connects is crashing at start-up: it is retried after a pause that doubles
//! each time, and given up after [`STARTUP_FAILURES_MAX`] tries in a row while
//! the others keep serving.

use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant, SystemTime};

use agent::vehicle::sim::Trace;
use agent::VehicleState;
use anyhow::{bail, Context};
use stack::{AgentSpec, Exit, Fleetgrid, LogFile, Process};

use crate::demo_chaos::{ChaosEvent, Disruption, DEPARTURE_NOTICE};

/// The pause after a car's first failed start; it doubles with each failure in a row.
pub const STARTUP_BACKOFF_INITIAL: Duration = Duration::from_secs(2);

/// The longest pause between two starts of a failing car.
pub const STARTUP_BACKOFF_MAX: Duration = Duration::from_secs(30);

/// Failed starts in a row after which a car is given up.
pub const STARTUP_FAILURES_MAX: u32 = 5;

/// What becomes of a car whose process ended on its own.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AfterExit {
    /// It had served: it comes home after the usual pause.
    ComeHome(Duration),
    /// It ended before it connected: it is started again after `pause`.
    Retry { pause: Duration, failures: u32 },
    /// It failed to start too many times in a row.
    GiveUp { failures: u32 },
}

/// The restart bound of one car: failed starts in a row.
#[derive(Clone, Debug, Default)]
pub struct Restarts {
    failures_in_a_row: u32,
}

impl Restarts {
    /// Decides what follows an exit; `connected` says whether the car connected since its start.
    pub fn after_exit(&mut self, connected: bool, come_home: Duration) -> AfterExit {
        if connected {
            self.failures_in_a_row = 0;
            return AfterExit::ComeHome(come_home);
        }
        self.failures_in_a_row = self.failures_in_a_row.saturating_add(1);
        let failures = self.failures_in_a_row;
        if failures >= STARTUP_FAILURES_MAX {
            return AfterExit::GiveUp { failures };
        }
        let doublings = (failures - 1).min(16);
        let pause = STARTUP_BACKOFF_INITIAL
            .saturating_mul(1 << doublings)
            .min(STARTUP_BACKOFF_MAX);
        AfterExit::Retry { pause, failures }
    }
}

/// How the demo starts an agent.
pub struct Launch {
    pub fleetgrid: Fleetgrid,
    pub grpc: SocketAddr,
    pub model: String,
    pub parallel: u32,
    pub threads: u32,
    pub logs: PathBuf,
    pub feeds: PathBuf,
}

/// Where a car is, as its owner and the demo see it.
#[derive(Clone, Copy, Debug, PartialEq)]
enum Presence {
    /// Following its trace.
    Home,
    /// Unplugged by its owner until then; the process keeps running.
    Unplugged { until: Instant },
    /// Its owner leaves at `at` (announced as `departure`); then it is away for `away`.
    Leaving {
        at: Instant,
        departure: SystemTime,
        away: Duration,
    },
    /// No process (or one on its way out); it comes home at `back_at`.
    Away { back_at: Instant },
    /// Failed to start too often; it stays away.
    GaveUp,
}

struct Car {
    name: String,
    trace: Trace,
    credential: String,
    process: Option<Process>,
    /// The start of the car's trace: its latest start.
    trace_start: SystemTime,
    presence: Presence,
    /// Seen connected since its latest start.
    connected: bool,
    starts: u32,
    /// The process was ended on purpose; its exit is no failure.
    exit_expected: bool,
    restarts: Restarts,
    /// The feed as last written, so that an unchanged state is not rewritten.
    feed_written: String,
}

/// The demo's cars.
pub struct Fleet {
    launch: Launch,
    come_home: Duration,
    cars: Vec<Car>,
}

impl Fleet {
    pub fn new(launch: Launch, come_home: Duration) -> Fleet {
        Fleet {
            launch,
            come_home,
            cars: Vec::new(),
        }
    }

    /// Adds a car and starts its agent.
    pub fn add(&mut self, name: String, trace: &str, credential: String) -> anyhow::Result<()> {
        let trace = Trace::parse(trace)
            .map_err(|reason| anyhow::anyhow!("the trace of {name} is invalid: {reason}"))?;
        let mut car = Car {
            name,
            trace,
            credential,
            process: None,
            trace_start: SystemTime::now(),
            presence: Presence::Home,
            connected: false,
            starts: 0,
            exit_expected: false,
            restarts: Restarts::default(),
            feed_written: String::new(),
        };
        car.start(&self.launch)?;
        self.cars.push(car);
        Ok(())
    }

    /// Notices exits, arrivals and the ends of pauses, and keeps every feed current.
    pub fn step(&mut self, now: Instant, connected: &BTreeSet<String>) -> anyhow::Result<()> {
        for car in &mut self.cars {
            car.step(now, connected, &self.launch, self.come_home)?;
        }
        if self.cars.iter().all(|car| car.presence == Presence::GaveUp) {
            bail!(
                "every car failed to start; see the logs in {}",
                self.launch.logs.display()
            );
        }
        Ok(())
    }

    /// Whether every car still tried has connected since its latest start.
    pub fn all_connected(&self) -> bool {
        self.cars
            .iter()
            .filter(|car| car.presence != Presence::GaveUp)
            .all(|car| car.connected)
    }

    /// How many cars have connected since their latest start.
    pub fn connected_count(&self) -> usize {
        self.cars.iter().filter(|car| car.connected).count()
    }

    /// The cars at home, running and connected: those that may be disrupted.
    pub fn serving(&self, connected: &BTreeSet<String>) -> Vec<usize> {
        (0..self.cars.len())
            .filter(|&index| {
                let car = &self.cars[index];
                car.presence == Presence::Home
                    && car.process.is_some()
                    && car.connected
                    && connected.contains(&car.name)
            })
            .collect()
    }

    /// Carries out a chaos decision.
    pub fn disrupt(&mut self, event: ChaosEvent, now: Instant) -> anyhow::Result<()> {
        let car = &mut self.cars[event.car];
        let away = event.away.as_secs();
        match event.disruption {
            Disruption::Unplug => {
                car.presence = Presence::Unplugged {
                    until: now + event.away,
                };
                say(&format!(
                    "chaos: {} unplugged for {away} s; its work moves to the other cars",
                    car.name
                ));
            }
            Disruption::Depart => {
                car.presence = Presence::Leaving {
                    at: now + DEPARTURE_NOTICE,
                    departure: SystemTime::now() + DEPARTURE_NOTICE,
                    away: event.away,
                };
                say(&format!(
                    "chaos: the owner of {} leaves in {} s; its work moves now, and it is back {away} s after it left",
                    car.name,
                    DEPARTURE_NOTICE.as_secs()
                ));
            }
            Disruption::Kill => {
                car.exit_expected = true;
                if let Some(process) = &car.process {
                    process.start_kill();
                }
                car.presence = Presence::Away {
                    back_at: now + event.away,
                };
                say(&format!(
                    "chaos: killed {} (SIGKILL); its work moves to the other cars, it comes home in {away} s",
                    car.name
                ));
            }
        }
        car.write_feed(&self.launch.feeds)
    }

    /// Every running agent, to be stopped.
    pub fn processes_mut(&mut self) -> impl Iterator<Item = &mut Process> {
        self.cars.iter_mut().filter_map(|car| car.process.as_mut())
    }
}

impl Car {
    fn start(&mut self, launch: &Launch) -> anyhow::Result<()> {
        self.trace_start = SystemTime::now();
        self.presence = Presence::Home;
        self.connected = false;
        self.write_feed(&launch.feeds)?;
        let log_path = launch.logs.join(format!("{}.log", self.name));
        // Appended: the log of a car that crashed stays readable after it comes home.
        let log = if self.starts == 0 {
            LogFile::create(log_path)
        } else {
            LogFile::append(log_path)
        };
        let feed = feed_path(&launch.feeds, &self.name);
        let spec = AgentSpec {
            node_id: self.name.clone(),
            credential: self.credential.clone(),
            vehicle_state: format!("file:{}", feed.display()),
            model: launch.model.to_string(),
            parallel: launch.parallel,
            threads: launch.threads,
            args: Vec::new(),
            log,
        };
        // In its own process group: a Ctrl-C in the terminal reaches the demo, which stops
        // the cars itself, rather than each car on its own.
        let process = launch
            .fleetgrid
            .agent(launch.grpc, &spec)
            .with_context(|| format!("start the agent of {}", self.name))?;
        self.process = Some(process);
        self.starts += 1;
        Ok(())
    }

    fn step(
        &mut self,
        now: Instant,
        connected: &BTreeSet<String>,
        launch: &Launch,
        come_home: Duration,
    ) -> anyhow::Result<()> {
        if let Some(exit) = self.process.as_ref().and_then(Process::exit) {
            self.process = None;
            self.exited(now, exit, come_home, &launch.logs);
        }
        if self.process.is_some() && !self.connected && connected.contains(&self.name) {
            self.connected = true;
            if self.starts > 1 {
                say(&format!("{} is back home and serving", self.name));
            }
        }
        match self.presence {
            Presence::Unplugged { until } if now >= until => {
                self.presence = Presence::Home;
                say(&format!("{} is plugged in again", self.name));
            }
            Presence::Leaving { at, away, .. } if now >= at => {
                self.exit_expected = true;
                if let Some(process) = &self.process {
                    process.terminate();
                }
                self.presence = Presence::Away {
                    back_at: now + away,
                };
                say(&format!(
                    "{} drove off; it comes home in {} s",
                    self.name,
                    away.as_secs()
                ));
            }
            Presence::Away { back_at } if now >= back_at => match &self.process {
                // Still on its way out after its time away: it is not waited for any longer.
                Some(process) => process.start_kill(),
                None => {
                    say(&format!("{} is coming home", self.name));
                    self.start(launch)?;
                }
            },
            _ => {}
        }
        self.write_feed(&launch.feeds)
    }

    fn exited(&mut self, now: Instant, status: Exit, come_home: Duration, logs: &Path) {
        if std::mem::take(&mut self.exit_expected) {
            if !matches!(self.presence, Presence::Away { .. }) {
                self.presence = Presence::Away {
                    back_at: now + come_home,
                };
            }
            return;
        }
        let log = logs.join(format!("{}.log", self.name));
        let name = &self.name;
        match self.restarts.after_exit(self.connected, come_home) {
            AfterExit::ComeHome(pause) => {
                say(&format!(
                    "{name} went away ({status}); its work moves to the other cars, it comes home in {} s",
                    pause.as_secs()
                ));
                self.presence = Presence::Away {
                    back_at: now + pause,
                };
            }
            AfterExit::Retry { pause, failures } => {
                say(&format!(
                    "{name} exited before it connected ({status}); starting it again in {} s \
                     (failure {failures} of {STARTUP_FAILURES_MAX}); see {}",
                    pause.as_secs(),
                    log.display()
                ));
                self.presence = Presence::Away {
                    back_at: now + pause,
                };
            }
            AfterExit::GiveUp { failures } => {
                say(&format!(
                    "{name} failed to start {failures} times in a row ({status}); giving up on it \
                     while the other cars keep serving; see {}",
                    log.display()
                ));
                self.presence = Presence::GaveUp;
            }
        }
    }

    /// The state the car's feed says now.
    fn state(&self) -> VehicleState {
        let now = SystemTime::now();
        let elapsed = now.duration_since(self.trace_start).unwrap_or_default();
        let traced = self.trace.state_at(self.trace_start, elapsed);
        match self.presence {
            Presence::Home => traced,
            Presence::Leaving { departure, .. } => VehicleState {
                departure: Some(departure),
                ..traced
            },
            Presence::Unplugged { .. } | Presence::Away { .. } | Presence::GaveUp => VehicleState {
                plugged_in: false,
                charging: false,
                departure: None,
                ..traced
            },
        }
    }

    /// Replaces the feed file atomically (as the `file:` adapter asks) when the state changed.
    fn write_feed(&mut self, feeds: &Path) -> anyhow::Result<()> {
        let state = self.state();
        let feed = serde_json::json!({
            "plugged_in": state.plugged_in,
            "charging": state.charging,
            "soc": state.state_of_charge.fraction(),
            "departure_unix_ms": state.departure.map_or(0, agent::vehicle::unix_ms),
            "temperature_c": state.temperature_c,
        })
        .to_string();
        if feed == self.feed_written {
            return Ok(());
        }
        let path = feed_path(feeds, &self.name);
        let temporary = path.with_extension("tmp");
        std::fs::write(&temporary, &feed)
            .with_context(|| format!("write {}", temporary.display()))?;
        std::fs::rename(&temporary, &path)
            .with_context(|| format!("replace {}", path.display()))?;
        self.feed_written = feed;
        Ok(())
    }
}

fn feed_path(feeds: &Path, name: &str) -> PathBuf {
    feeds.join(format!("{name}.json"))
}

fn say(message: &str) {
    eprintln!("fleetgrid demo: {message}");
}

#[cfg(test)]
mod tests {
    use super::*;

    const COME_HOME: Duration = Duration::from_secs(10);

    #[test]
    fn a_car_that_served_comes_home_after_the_usual_pause() {
        let mut restarts = Restarts::default();
        for _ in 0..2 * STARTUP_FAILURES_MAX {
            assert_eq!(
                restarts.after_exit(true, COME_HOME),
                AfterExit::ComeHome(COME_HOME)
            );
        }
    }

    #[test]
    fn a_car_failing_at_start_up_backs_off_then_is_given_up() {
        let mut restarts = Restarts::default();
        let mut pauses = Vec::new();
        loop {
            match restarts.after_exit(false, COME_HOME) {
                AfterExit::Retry { pause, .. } => pauses.push(pause.as_secs()),
                AfterExit::GiveUp { failures } => {
                    assert_eq!(failures, STARTUP_FAILURES_MAX);
                    break;
                }
                AfterExit::ComeHome(_) => panic!("a car that never connected came home"),
            }
        }
        assert_eq!(pauses, [2, 4, 8, 16]);
    }

    #[test]
    fn a_car_that_connects_between_failures_starts_counting_again() {
        let mut restarts = Restarts::default();
        for _ in 1..STARTUP_FAILURES_MAX {
            restarts.after_exit(false, COME_HOME);
        }
        restarts.after_exit(true, COME_HOME);
        assert_eq!(
            restarts.after_exit(false, COME_HOME),
            AfterExit::Retry {
                pause: STARTUP_BACKOFF_INITIAL,
                failures: 1
            }
        );
    }

    fn car(presence: Presence) -> Car {
        Car {
            name: "car-x".into(),
            trace: Trace::parse(include_str!("../../agent/traces/car-a.json")).expect("trace"),
            credential: String::new(),
            process: None,
            trace_start: SystemTime::now(),
            presence,
            connected: false,
            starts: 0,
            exit_expected: false,
            restarts: Restarts::default(),
            feed_written: String::new(),
        }
    }

    /// What the agent's own `file:` adapter reads from the feed the demo writes.
    fn read_back(car: &mut Car) -> VehicleState {
        use agent::VehicleStateAdapter;
        let dir = tempfile::tempdir().expect("tempdir");
        car.write_feed(dir.path()).expect("write feed");
        let mut adapter = agent::vehicle::file::FileAdapter::new(feed_path(dir.path(), "car-x"));
        adapter.current(SystemTime::now()).expect("a valid feed")
    }

    #[test]
    fn the_feed_says_what_the_owner_did() {
        let now = Instant::now();
        let home = read_back(&mut car(Presence::Home));
        assert!(home.plugged_in && home.charging);
        assert!(home
            .departure
            .is_some_and(|at| at > SystemTime::now() + Duration::from_secs(3600)));

        let unplugged = read_back(&mut car(Presence::Unplugged { until: now }));
        assert!(!unplugged.plugged_in && !unplugged.charging);
        assert_eq!(unplugged.state_of_charge, home.state_of_charge);

        let departure = SystemTime::now() + DEPARTURE_NOTICE;
        let leaving = read_back(&mut car(Presence::Leaving {
            at: now,
            departure,
            away: COME_HOME,
        }));
        assert!(leaving.plugged_in);
        assert_eq!(
            leaving.departure.map(agent::vehicle::unix_ms),
            Some(agent::vehicle::unix_ms(departure))
        );
    }
}
