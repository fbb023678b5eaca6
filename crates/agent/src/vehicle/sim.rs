//! A simulated vehicle: a JSON trace replayed relative to the agent's start (`sim:TRACE`).
//!
//! The format:
//!
//! ```json
//! {
//!   "start_soc": 0.6,
//!   "events": [
//!     { "at_s": 0, "plugged_in": true, "charging": true, "soc": 0.6,
//!       "departure_in_s": 3600, "temperature_c": 31.0 },
//!     { "at_s": 1800, "plugged_in": true, "charging": true, "soc": 0.8 }
//!   ]
//! }
//! ```
//!
//! - `start_soc` (fraction `0..=1`): the state of charge before the first event.
//! - `events`, sorted by `at_s` (seconds after agent start). The trace is a step function: at any
//!   moment the vehicle looks like the last event at or before it. Before the first event the
//!   vehicle is not plugged in.
//! - In an event, `plugged_in` and `charging` are required. `soc` is optional and carries over from
//!   the previous event (a battery does not forget its charge); `departure_in_s` (seconds after
//!   agent start, turned into an absolute time) and `temperature_c` are optional and mean "unknown"
//!   when absent.
//!
//! Demo traces live in the crate's `traces/` folder.

use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use serde::Deserialize;

use super::{StateOfCharge, VehicleState, VehicleStateAdapter};
use crate::AgentError;

/// The largest trace file read; a trace is a few events per simulated day.
pub const TRACE_BYTES_MAX: u64 = 4 * 1024 * 1024;

/// The most events in one trace.
pub const TRACE_EVENTS_MAX: usize = 100_000;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct TraceFile {
    start_soc: f32,
    events: Vec<TraceEventFile>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct TraceEventFile {
    at_s: f64,
    plugged_in: bool,
    charging: bool,
    soc: Option<f32>,
    departure_in_s: Option<f64>,
    temperature_c: Option<f32>,
}

/// One validated step of a trace.
#[derive(Clone, Debug, PartialEq)]
struct TraceStep {
    at: Duration,
    plugged_in: bool,
    charging: bool,
    state_of_charge: StateOfCharge,
    departure_after_start: Option<Duration>,
    temperature_c: Option<f32>,
}

/// A parsed and validated trace.
#[derive(Clone, Debug, PartialEq)]
pub struct Trace {
    start_soc: StateOfCharge,
    steps: Vec<TraceStep>,
}

impl Trace {
    /// Parses and validates a trace; the error says what is wrong, in words.
    pub fn parse(json: &str) -> Result<Trace, String> {
        let file: TraceFile = serde_json::from_str(json).map_err(|e| e.to_string())?;
        let start_soc = StateOfCharge::from_fraction(file.start_soc)
            .ok_or_else(|| format!("start_soc {} is not within 0..=1", file.start_soc))?;
        if file.events.len() > TRACE_EVENTS_MAX {
            return Err(format!(
                "{} events, more than the {TRACE_EVENTS_MAX} allowed",
                file.events.len()
            ));
        }
        let mut steps: Vec<TraceStep> = Vec::with_capacity(file.events.len());
        for (index, event) in file.events.iter().enumerate() {
            let step = validate_event(index, event, steps.last(), start_soc)?;
            steps.push(step);
        }
        Ok(Trace { start_soc, steps })
    }

    /// The state `elapsed` after the agent's start, with the departure made absolute from `start`.
    pub fn state_at(&self, start: SystemTime, elapsed: Duration) -> VehicleState {
        let observed_at = start + elapsed;
        let current = self
            .steps
            .iter()
            .take_while(|step| step.at <= elapsed)
            .last();
        match current {
            None => VehicleState {
                state_of_charge: self.start_soc,
                ..VehicleState::unplugged(observed_at)
            },
            Some(step) => VehicleState {
                plugged_in: step.plugged_in,
                charging: step.charging,
                state_of_charge: step.state_of_charge,
                departure: step
                    .departure_after_start
                    .and_then(|after| start.checked_add(after)),
                temperature_c: step.temperature_c,
                observed_at,
            },
        }
    }
}

fn validate_event(
    index: usize,
    event: &TraceEventFile,
    previous: Option<&TraceStep>,
    start_soc: StateOfCharge,
) -> Result<TraceStep, String> {
    let at = seconds(event.at_s).ok_or_else(|| {
        format!(
            "event {index}: at_s {} is not a non-negative number",
            event.at_s
        )
    })?;
    if previous.is_some_and(|previous| previous.at > at) {
        return Err(format!(
            "event {index}: at_s {} goes back in time",
            event.at_s
        ));
    }
    let state_of_charge = match event.soc {
        Some(soc) => StateOfCharge::from_fraction(soc)
            .ok_or_else(|| format!("event {index}: soc {soc} is not within 0..=1"))?,
        None => previous.map_or(start_soc, |previous| previous.state_of_charge),
    };
    let departure_after_start = match event.departure_in_s {
        Some(departure) => Some(seconds(departure).ok_or_else(|| {
            format!("event {index}: departure_in_s {departure} is not a non-negative number")
        })?),
        None => None,
    };
    if event.temperature_c.is_some_and(|t| !t.is_finite()) {
        return Err(format!("event {index}: temperature_c is not a number"));
    }
    Ok(TraceStep {
        at,
        plugged_in: event.plugged_in,
        charging: event.charging,
        state_of_charge,
        departure_after_start,
        temperature_c: event.temperature_c,
    })
}

fn seconds(value: f64) -> Option<Duration> {
    Duration::try_from_secs_f64(value).ok()
}

/// Replays a [`Trace`] against the wall clock.
pub struct SimAdapter {
    trace: Trace,
    start: SystemTime,
}

impl SimAdapter {
    /// Reads and validates the trace at `path`; `start` is the moment the trace's time 0 maps to.
    pub fn load(path: &Path, start: SystemTime) -> Result<SimAdapter, AgentError> {
        let json = read_small_file(path, TRACE_BYTES_MAX)?;
        let trace = Trace::parse(&json).map_err(|reason| AgentError::InvalidVehicleState {
            path: path.to_owned(),
            reason,
        })?;
        Ok(SimAdapter { trace, start })
    }

    pub fn new(trace: Trace, start: SystemTime) -> SimAdapter {
        SimAdapter { trace, start }
    }
}

impl VehicleStateAdapter for SimAdapter {
    fn current(&mut self, now: SystemTime) -> Result<VehicleState, AgentError> {
        // A clock stepped backwards is read as "still at the start".
        let elapsed = now.duration_since(self.start).unwrap_or(Duration::ZERO);
        Ok(self.trace.state_at(self.start, elapsed))
    }
}

/// Reads a small text file, refusing one larger than `bytes_max`.
pub(crate) fn read_small_file(path: &Path, bytes_max: u64) -> Result<String, AgentError> {
    use std::io::Read;
    let io_error = |cause| AgentError::ReadVehicleState {
        path: PathBuf::from(path),
        cause,
    };
    let file = std::fs::File::open(path).map_err(io_error)?;
    let mut text = String::new();
    file.take(bytes_max + 1)
        .read_to_string(&mut text)
        .map_err(io_error)?;
    if text.len() as u64 > bytes_max {
        return Err(AgentError::InvalidVehicleState {
            path: path.to_owned(),
            reason: format!("larger than {bytes_max} bytes"),
        });
    }
    Ok(text)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::UNIX_EPOCH;

    const TRACE: &str = r#"{
        "start_soc": 0.5,
        "events": [
            { "at_s": 10, "plugged_in": true, "charging": true, "soc": 0.6,
              "departure_in_s": 3600, "temperature_c": 31.0 },
            { "at_s": 100, "plugged_in": true, "charging": false },
            { "at_s": 200, "plugged_in": false, "charging": false, "soc": 0.55 }
        ]
    }"#;

    fn start() -> SystemTime {
        UNIX_EPOCH + Duration::from_secs(1_700_000_000)
    }

    fn at(trace: &Trace, seconds: u64) -> VehicleState {
        trace.state_at(start(), Duration::from_secs(seconds))
    }

    #[test]
    fn replays_a_step_function_relative_to_start() {
        let trace = Trace::parse(TRACE).expect("valid trace");

        let before_first = at(&trace, 5);
        assert!(!before_first.plugged_in);
        assert_eq!(before_first.state_of_charge.fraction(), 0.5);

        let first = at(&trace, 10);
        assert!(first.plugged_in && first.charging);
        assert_eq!(first.state_of_charge.fraction(), 0.6);
        assert_eq!(first.departure, Some(start() + Duration::from_secs(3600)));
        assert_eq!(first.temperature_c, Some(31.0));
        assert_eq!(first.observed_at, start() + Duration::from_secs(10));
        assert_eq!(
            at(&trace, 99),
            VehicleState {
                observed_at: first.observed_at + Duration::from_secs(89),
                ..first
            }
        );

        let idle = at(&trace, 150);
        assert!(idle.plugged_in && !idle.charging);
        assert_eq!(idle.state_of_charge.fraction(), 0.6, "soc carries over");
        assert_eq!(idle.departure, None, "departure is per event");

        let gone = at(&trace, 1_000_000);
        assert!(!gone.plugged_in);
        assert_eq!(gone.state_of_charge.fraction(), 0.55);
    }

    #[test]
    fn adapter_follows_the_wall_clock() {
        let trace = Trace::parse(TRACE).expect("valid trace");
        let mut adapter = SimAdapter::new(trace, start());
        let now = start() + Duration::from_secs(150);
        let state = adapter.current(now).expect("sim never fails");
        assert!(state.plugged_in && !state.charging);
        let earlier = adapter
            .current(start() - Duration::from_secs(60))
            .expect("sim never fails");
        assert!(!earlier.plugged_in);
    }

    #[test]
    fn refuses_invalid_traces() {
        let cases = [
            (r#"{"start_soc": 1.2, "events": []}"#, "start_soc"),
            (r#"{"start_soc": 0.5}"#, "events"),
            (
                r#"{"start_soc": 0.5, "events": [{"at_s": 5, "plugged_in": true, "charging": true},
                   {"at_s": 1, "plugged_in": true, "charging": true}]}"#,
                "back in time",
            ),
            (
                r#"{"start_soc": 0.5, "events": [{"at_s": -1, "plugged_in": true, "charging": true}]}"#,
                "at_s",
            ),
            (
                r#"{"start_soc": 0.5, "events": [{"at_s": 0, "plugged_in": true, "charging": true, "soc": 2}]}"#,
                "soc",
            ),
            (
                r#"{"start_soc": 0.5, "events": [{"at_s": 0, "plugged": true, "charging": true}]}"#,
                "unknown field",
            ),
        ];
        for (json, expected) in cases {
            let error = Trace::parse(json).expect_err(json);
            assert!(error.contains(expected), "{json}: {error}");
        }
    }

    #[test]
    fn demo_traces_are_valid_and_start_plugged_in() {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("traces");
        for name in ["car-a.json", "car-b.json", "car-c.json"] {
            let mut adapter = SimAdapter::load(&dir.join(name), start()).expect(name);
            let state = adapter.current(start()).expect(name);
            assert!(state.plugged_in, "{name} must start plugged in");
        }
    }

    #[test]
    fn demo_traces_tell_their_stories() {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("traces");
        let load = |name: &str| SimAdapter::load(&dir.join(name), start()).expect(name);
        let hours = |h: u64| start() + Duration::from_secs(h * 3600);

        let mut car_a = load("car-a.json");
        let evening = car_a.current(hours(5)).expect("sim");
        assert!(evening.plugged_in);
        assert_eq!(evening.departure, Some(hours(10)));

        let mut car_b = load("car-b.json");
        assert!(car_b.current(start()).expect("sim").charging);
        let full = car_b.current(hours(8)).expect("sim");
        assert!(full.plugged_in && !full.charging);
        assert_eq!(full.state_of_charge, StateOfCharge::FULL);

        let mut car_c = load("car-c.json");
        assert_eq!(
            car_c.current(start()).expect("sim").departure,
            Some(hours(2))
        );
        assert!(!car_c.current(hours(3)).expect("sim").plugged_in);
    }

    #[test]
    fn refuses_oversized_files() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("big.json");
        std::fs::write(&path, " ".repeat(TRACE_BYTES_MAX as usize + 1)).expect("write");
        let error = SimAdapter::load(&path, start())
            .err()
            .map(|e| e.to_string());
        assert!(error.is_some_and(|e| e.contains("larger than")));
    }
}
