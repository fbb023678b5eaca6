//! Vehicle state from an external feed (`file:PATH`): a vehicle gateway, a home-automation system or
//! a script keeps one JSON object in a file, which the agent re-reads on every heartbeat.
//!
//! ```json
//! { "plugged_in": true, "charging": true, "soc": 0.72,
//!   "departure_unix_ms": 1767250800000, "temperature_c": 24.5, "observed_unix_ms": 1767222000000 }
//! ```
//!
//! `plugged_in` and `charging` are required; `soc` (fraction `0..=1`), `departure_unix_ms`
//! (absolute), `temperature_c` and `observed_unix_ms` (when the feed saw this; default: the file's
//! modification time) are optional. Writers should replace the file atomically (write a temporary
//! file, then rename it) so that the agent never reads half of it.
//!
//! A missing, unreadable or malformed file is logged as a warning (once per distinct problem, not on
//! every heartbeat) and reported as "not plugged in": without a trustworthy state, no work.

use std::path::PathBuf;
use std::time::SystemTime;

use serde::Deserialize;

use super::sim::read_small_file;
use super::{from_unix_ms, StateOfCharge, VehicleState, VehicleStateAdapter};
use crate::AgentError;

/// The largest feed file read; it holds one small object.
pub const FEED_BYTES_MAX: u64 = 64 * 1024;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct FeedFile {
    plugged_in: bool,
    charging: bool,
    soc: Option<f32>,
    departure_unix_ms: Option<i64>,
    temperature_c: Option<f32>,
    observed_unix_ms: Option<i64>,
}

/// Re-reads the feed file on every call.
pub struct FileAdapter {
    path: PathBuf,
    /// The last problem logged, so that a file that stays broken is not logged every second.
    last_problem: Option<String>,
}

impl FileAdapter {
    pub fn new(path: PathBuf) -> FileAdapter {
        FileAdapter {
            path,
            last_problem: None,
        }
    }

    fn read(&self, now: SystemTime) -> Result<VehicleState, AgentError> {
        let text = read_small_file(&self.path, FEED_BYTES_MAX)?;
        let invalid = |reason: String| AgentError::InvalidVehicleState {
            path: self.path.clone(),
            reason,
        };
        let feed: FeedFile = serde_json::from_str(&text).map_err(|e| invalid(e.to_string()))?;
        let state_of_charge = match feed.soc {
            Some(soc) => StateOfCharge::from_fraction(soc)
                .ok_or_else(|| invalid(format!("soc {soc} is not within 0..=1")))?,
            None => StateOfCharge::EMPTY,
        };
        let departure = match feed.departure_unix_ms {
            None | Some(0) => None,
            Some(ms) => Some(
                from_unix_ms(ms)
                    .ok_or_else(|| invalid(format!("departure_unix_ms {ms} is not a time")))?,
            ),
        };
        let modified = std::fs::metadata(&self.path)
            .and_then(|m| m.modified())
            .ok();
        let observed_at = feed
            .observed_unix_ms
            .and_then(from_unix_ms)
            .or(modified)
            .unwrap_or(now);
        Ok(VehicleState {
            plugged_in: feed.plugged_in,
            charging: feed.charging,
            state_of_charge,
            departure,
            temperature_c: feed.temperature_c.filter(|t| t.is_finite()),
            observed_at,
        })
    }
}

impl VehicleStateAdapter for FileAdapter {
    fn current(&mut self, now: SystemTime) -> Result<VehicleState, AgentError> {
        match self.read(now) {
            Ok(state) => {
                if self.last_problem.take().is_some() {
                    tracing::info!(path = %self.path.display(), "vehicle state feed readable again");
                }
                Ok(state)
            }
            Err(error) => {
                let problem = error.to_string();
                if self.last_problem.as_deref() != Some(problem.as_str()) {
                    tracing::warn!(
                        path = %self.path.display(),
                        error = %problem,
                        "cannot use the vehicle state feed; reporting not plugged in"
                    );
                    self.last_problem = Some(problem);
                }
                Ok(VehicleState::unplugged(now))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::{Duration, UNIX_EPOCH};

    fn now() -> SystemTime {
        UNIX_EPOCH + Duration::from_secs(1_800_000_000)
    }

    fn read(contents: Option<&str>) -> VehicleState {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("feed.json");
        if let Some(contents) = contents {
            std::fs::write(&path, contents).expect("write");
        }
        FileAdapter::new(path)
            .current(now())
            .expect("the feed adapter never fails")
    }

    #[test]
    fn reads_a_complete_feed() {
        let state = read(Some(
            r#"{"plugged_in": true, "charging": true, "soc": 0.72,
                "departure_unix_ms": 1800003600000, "temperature_c": 24.5,
                "observed_unix_ms": 1799999999000}"#,
        ));
        assert!(state.plugged_in && state.charging);
        assert_eq!(state.state_of_charge.fraction(), 0.72);
        assert_eq!(state.departure, Some(now() + Duration::from_secs(3600)));
        assert_eq!(state.temperature_c, Some(24.5));
        assert_eq!(state.observed_at, now() - Duration::from_secs(1));
    }

    #[test]
    fn minimal_feed_defaults_to_unknowns_and_file_time() {
        let state = read(Some(r#"{"plugged_in": true, "charging": false}"#));
        assert!(state.plugged_in && !state.charging);
        assert_eq!(state.departure, None);
        assert_eq!(state.temperature_c, None);
        // The file was written a moment ago, long before the test's "now" in 2027.
        assert!(state.observed_at < now());
    }

    #[test]
    fn malformed_or_missing_feed_means_not_plugged_in() {
        let cases = [
            None,
            Some(""),
            Some("{\"plugged_in\": tr"),
            Some(r#"{"charging": true}"#),
            Some(r#"{"plugged_in": true, "charging": true, "soc": 7}"#),
            Some(r#"{"plugged_in": true, "charging": true, "departure_unix_ms": -5}"#),
            Some(r#"[true]"#),
        ];
        for contents in cases {
            let state = read(contents);
            assert_eq!(state, VehicleState::unplugged(now()), "{contents:?}");
        }
    }

    #[test]
    fn picks_up_changes_on_the_next_read() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("feed.json");
        let mut adapter = FileAdapter::new(path.clone());
        assert!(!adapter.current(now()).expect("infallible").plugged_in);
        std::fs::write(&path, r#"{"plugged_in": true, "charging": true}"#).expect("write");
        assert!(adapter.current(now()).expect("infallible").plugged_in);
        std::fs::write(&path, r#"{"plugged_in": false, "charging": false}"#).expect("write");
        assert!(!adapter.current(now()).expect("infallible").plugged_in);
    }
}
