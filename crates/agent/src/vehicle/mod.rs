//! Where the agent learns the state of its vehicle: plugged in, charging, state of charge, scheduled
//! departure and temperature.
//!
//! Each source is an adapter behind [`VehicleStateAdapter`]: a simulated trace ([`sim`]), the Linux
//! power-supply class so that a laptop on AC power is a node ([`linux_power`]), or a JSON file that an
//! external feed keeps up to date ([`file`]). The agent reads the adapter on every heartbeat and sends
//! what it sees; deciding whether to give the vehicle work is the coordinator's business.
//!
//! When a source cannot be read, the agent reports [`VehicleState::unplugged`]: the owner comes
//! first, so "unknown" must mean "no work".

pub mod file;
pub mod linux_power;
pub mod sim;

use std::path::PathBuf;
use std::str::FromStr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use crate::AgentError;

/// The default root of the Linux power-supply class.
pub const LINUX_POWER_SUPPLY_ROOT: &str = "/sys/class/power_supply";

/// A battery's state of charge as a fraction in `0.0..=1.0`.
#[derive(Clone, Copy, Debug, PartialEq, PartialOrd)]
pub struct StateOfCharge(f32);

impl StateOfCharge {
    pub const EMPTY: StateOfCharge = StateOfCharge(0.0);
    pub const FULL: StateOfCharge = StateOfCharge(1.0);

    /// A fraction in `0.0..=1.0`; anything else (NaN included) is refused.
    pub fn from_fraction(fraction: f32) -> Option<StateOfCharge> {
        (0.0..=1.0)
            .contains(&fraction)
            .then_some(StateOfCharge(fraction))
    }

    /// A percentage as the kernel reports it; values slightly over 100 (seen on worn batteries whose
    /// "full" moved) are clamped rather than refused.
    pub fn from_percent(percent: f32) -> Option<StateOfCharge> {
        if !(0.0..=110.0).contains(&percent) {
            return None;
        }
        Some(StateOfCharge((percent / 100.0).min(1.0)))
    }

    pub fn fraction(self) -> f32 {
        self.0
    }
}

/// What the vehicle looks like right now.
#[derive(Clone, Debug, PartialEq)]
pub struct VehicleState {
    pub plugged_in: bool,
    pub charging: bool,
    pub state_of_charge: StateOfCharge,
    /// The owner's scheduled departure, when known.
    pub departure: Option<SystemTime>,
    /// The hottest sensor, when the source has one.
    pub temperature_c: Option<f32>,
    /// When the source observed this state.
    pub observed_at: SystemTime,
}

impl VehicleState {
    /// The state reported when nothing is known: not plugged in, so the coordinator sends no work.
    pub fn unplugged(now: SystemTime) -> VehicleState {
        VehicleState {
            plugged_in: false,
            charging: false,
            state_of_charge: StateOfCharge::EMPTY,
            departure: None,
            temperature_c: None,
            observed_at: now,
        }
    }

    /// The wire form; unknown values become the protocol's zeros.
    pub fn to_proto(&self) -> proto::VehicleState {
        proto::VehicleState {
            plugged_in: self.plugged_in,
            charging: self.charging,
            state_of_charge: self.state_of_charge.fraction(),
            departure_unix_ms: self.departure.map_or(0, unix_ms),
            temperature_c: self.temperature_c.filter(|t| t.is_finite()).unwrap_or(0.0),
            observed_unix_ms: unix_ms(self.observed_at),
        }
    }
}

/// A source of vehicle state, read once per heartbeat.
///
/// Implementations do small blocking reads (sysfs, one small file); the agent calls them off the
/// async threads.
pub trait VehicleStateAdapter: Send {
    fn current(&mut self, now: SystemTime) -> Result<VehicleState, AgentError>;
}

/// Which adapter to use, as given on the command line.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum VehicleStateSource {
    /// `sim:TRACE` — replay a JSON trace relative to agent start.
    Sim(PathBuf),
    /// `linux-power[:ROOT]` — the Linux power-supply class.
    LinuxPower(PathBuf),
    /// `file:PATH` — a JSON object kept up to date by an external feed.
    File(PathBuf),
    /// `datacenter` — a machine that is always on mains power with no departure: the local
    /// stand-in for a cloud model's server.
    Datacenter,
}

impl VehicleStateSource {
    /// Opens the adapter; `start` is the agent's start, to which simulated traces are relative.
    pub fn open(&self, start: SystemTime) -> Result<Box<dyn VehicleStateAdapter>, AgentError> {
        Ok(match self {
            VehicleStateSource::Sim(path) => Box::new(sim::SimAdapter::load(path, start)?),
            VehicleStateSource::LinuxPower(root) => {
                Box::new(linux_power::LinuxPowerAdapter::open(root.clone())?)
            }
            VehicleStateSource::File(path) => Box::new(file::FileAdapter::new(path.clone())),
            VehicleStateSource::Datacenter => Box::new(AlwaysOn),
        })
    }
}

impl FromStr for VehicleStateSource {
    type Err = AgentError;

    fn from_str(input: &str) -> Result<Self, Self::Err> {
        let invalid = |reason: &str| AgentError::InvalidVehicleStateSource {
            input: input.to_owned(),
            reason: reason.to_owned(),
        };
        let (kind, path) = match input.split_once(':') {
            Some((kind, path)) => (kind, Some(path)),
            None => (input, None),
        };
        if path == Some("") {
            return Err(invalid("the path after ':' is empty"));
        }
        match (kind, path) {
            ("sim", Some(path)) => Ok(VehicleStateSource::Sim(path.into())),
            ("file", Some(path)) => Ok(VehicleStateSource::File(path.into())),
            ("linux-power", path) => Ok(VehicleStateSource::LinuxPower(
                path.unwrap_or(LINUX_POWER_SUPPLY_ROOT).into(),
            )),
            ("datacenter", None) => Ok(VehicleStateSource::Datacenter),
            ("sim" | "file", None) => {
                Err(invalid("a path is required, as in sim:PATH or file:PATH"))
            }
            _ => Err(invalid(
                "expected sim:TRACE, linux-power, linux-power:ROOT, file:PATH or datacenter",
            )),
        }
    }
}

/// The `datacenter` source: plugged in, full, never leaving.
struct AlwaysOn;

impl VehicleStateAdapter for AlwaysOn {
    fn current(&mut self, now: SystemTime) -> Result<VehicleState, AgentError> {
        Ok(VehicleState {
            plugged_in: true,
            charging: false,
            state_of_charge: StateOfCharge::FULL,
            departure: None,
            temperature_c: None,
            observed_at: now,
        })
    }
}

/// Reads an adapter from async code: the small blocking reads run on the blocking pool.
#[derive(Clone)]
pub(crate) struct VehicleReader {
    // A std mutex: it is only ever locked inside the blocking closure, never across an `.await`.
    inner: Arc<Mutex<ReaderState>>,
}

struct ReaderState {
    adapter: Box<dyn VehicleStateAdapter>,
    /// The last failure logged, so that a source that stays broken is not logged every heartbeat.
    last_problem: Option<String>,
}

impl VehicleReader {
    pub(crate) fn new(adapter: Box<dyn VehicleStateAdapter>) -> VehicleReader {
        VehicleReader {
            inner: Arc::new(Mutex::new(ReaderState {
                adapter,
                last_problem: None,
            })),
        }
    }

    /// The current state; a source that fails is logged and read as [`VehicleState::unplugged`].
    pub(crate) async fn read(&self) -> VehicleState {
        let inner = Arc::clone(&self.inner);
        let read = tokio::task::spawn_blocking(move || {
            let now = SystemTime::now();
            // A panic in an earlier read does not make the adapter's own state unusable.
            let mut state = inner.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
            match state.adapter.current(now) {
                Ok(vehicle) => {
                    state.last_problem = None;
                    vehicle
                }
                Err(error) => {
                    let problem = error.to_string();
                    if state.last_problem.as_deref() != Some(problem.as_str()) {
                        tracing::warn!(error = %problem, "cannot read the vehicle state; reporting not plugged in");
                        state.last_problem = Some(problem);
                    }
                    VehicleState::unplugged(now)
                }
            }
        })
        .await;
        read.unwrap_or_else(|join_error| {
            tracing::warn!(error = %join_error, "vehicle state read failed; reporting not plugged in");
            VehicleState::unplugged(SystemTime::now())
        })
    }
}

/// Milliseconds since the Unix epoch, negative before it.
pub fn unix_ms(time: SystemTime) -> i64 {
    match time.duration_since(UNIX_EPOCH) {
        Ok(after) => i64::try_from(after.as_millis()).unwrap_or(i64::MAX),
        Err(before) => i64::try_from(before.duration().as_millis()).map_or(i64::MIN, |ms| -ms),
    }
}

/// The inverse of [`unix_ms`] for times after the epoch.
pub fn from_unix_ms(ms: i64) -> Option<SystemTime> {
    let ms = u64::try_from(ms).ok()?;
    UNIX_EPOCH.checked_add(Duration::from_millis(ms))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_every_source_form() {
        let cases = [
            (
                "sim:traces/car-a.json",
                VehicleStateSource::Sim("traces/car-a.json".into()),
            ),
            (
                "file:/run/feed.json",
                VehicleStateSource::File("/run/feed.json".into()),
            ),
            (
                "linux-power",
                VehicleStateSource::LinuxPower(LINUX_POWER_SUPPLY_ROOT.into()),
            ),
            (
                "linux-power:/x/ps",
                VehicleStateSource::LinuxPower("/x/ps".into()),
            ),
            ("datacenter", VehicleStateSource::Datacenter),
        ];
        for (input, expected) in cases {
            assert_eq!(
                input.parse::<VehicleStateSource>().ok(),
                Some(expected),
                "{input}"
            );
        }
    }

    #[test]
    fn refuses_malformed_sources_with_a_reason() {
        for input in ["sim", "sim:", "file", "battery", "", "linux-power:"] {
            let error = input.parse::<VehicleStateSource>().err();
            let message = error.map(|e| e.to_string()).unwrap_or_default();
            assert!(
                message.contains("vehicle state source"),
                "{input}: {message}"
            );
        }
    }

    #[test]
    fn state_of_charge_bounds() {
        assert_eq!(
            StateOfCharge::from_fraction(0.5).map(|s| s.fraction()),
            Some(0.5)
        );
        assert_eq!(StateOfCharge::from_fraction(1.5), None);
        assert_eq!(StateOfCharge::from_fraction(f32::NAN), None);
        assert_eq!(
            StateOfCharge::from_percent(104.0),
            Some(StateOfCharge::FULL)
        );
        assert_eq!(StateOfCharge::from_percent(-1.0), None);
    }

    #[test]
    fn unknown_values_become_protocol_zeros() {
        let observed_at = UNIX_EPOCH + Duration::from_millis(1_700_000_000_123);
        let state = VehicleState {
            temperature_c: Some(f32::NAN),
            ..VehicleState::unplugged(observed_at)
        };
        let wire = state.to_proto();
        assert!(!wire.plugged_in);
        assert_eq!(wire.departure_unix_ms, 0);
        assert_eq!(wire.temperature_c, 0.0);
        assert_eq!(wire.observed_unix_ms, 1_700_000_000_123);
        assert_eq!(from_unix_ms(wire.observed_unix_ms), Some(observed_at));
    }
}
