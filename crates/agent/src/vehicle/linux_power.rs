//! The Linux power-supply class as a vehicle (`linux-power[:ROOT]`), so that a laptop on AC power,
//! or a desktop, can be a node.
//!
//! Every folder under ROOT (default `/sys/class/power_supply`) is one supply with small text files:
//! `type` (`Mains`, `Battery`, `USB`, ...), `online` (`1` when an external supply delivers power),
//! `status` (`Charging`, `Discharging`, `Full`, `Not charging`) and `capacity` (percent). Batteries
//! whose `scope` is `Device` belong to peripherals (a mouse) and are ignored.
//!
//! - With a battery: plugged in when an external supply is online or the battery says it is charging,
//!   full or held at a charge limit ("Not charging"); the state of charge is the batteries' mean.
//! - Without a battery: a machine that runs without a battery runs on external power, so it is
//!   plugged in with a full "charge" — unless a supply explicitly reports being offline (a UPS).
//!
//! Temperature is the hottest `thermal_zone*/temp` (millidegrees) in the `thermal` folder next to
//! ROOT (`/sys/class/thermal` for the default), when there is one.

use std::fs;
use std::path::{Path, PathBuf};
use std::time::SystemTime;

use super::{StateOfCharge, VehicleState, VehicleStateAdapter};
use crate::AgentError;

/// The most supplies looked at; a real machine has a handful.
pub const POWER_SUPPLIES_MAX: usize = 64;

/// The most thermal zones looked at.
pub const THERMAL_ZONES_MAX: usize = 256;

/// Reads the power-supply class on every call.
pub struct LinuxPowerAdapter {
    power_supply_root: PathBuf,
    thermal_root: PathBuf,
}

/// What one supply folder says.
#[derive(Debug, Default)]
struct Supply {
    is_battery: bool,
    online: Option<bool>,
    status: Option<String>,
    capacity_percent: Option<f32>,
}

impl LinuxPowerAdapter {
    /// Checks that `power_supply_root` can be listed; the thermal folder is its sibling `thermal`.
    pub fn open(power_supply_root: PathBuf) -> Result<LinuxPowerAdapter, AgentError> {
        let thermal_root = power_supply_root
            .parent()
            .map_or_else(|| PathBuf::from("thermal"), |parent| parent.join("thermal"));
        fs::read_dir(&power_supply_root).map_err(|cause| AgentError::ReadVehicleState {
            path: power_supply_root.clone(),
            cause,
        })?;
        Ok(LinuxPowerAdapter {
            power_supply_root,
            thermal_root,
        })
    }

    fn supplies(&self) -> Result<Vec<Supply>, AgentError> {
        let entries = fs::read_dir(&self.power_supply_root).map_err(|cause| {
            AgentError::ReadVehicleState {
                path: self.power_supply_root.clone(),
                cause,
            }
        })?;
        let mut supplies = Vec::new();
        for entry in entries.flatten().take(POWER_SUPPLIES_MAX) {
            if let Some(supply) = read_supply(&entry.path()) {
                supplies.push(supply);
            }
        }
        Ok(supplies)
    }

    /// The hottest thermal zone in °C, if any can be read.
    fn temperature_c(&self) -> Option<f32> {
        let entries = fs::read_dir(&self.thermal_root).ok()?;
        entries
            .flatten()
            .filter(|entry| {
                entry
                    .file_name()
                    .to_string_lossy()
                    .starts_with("thermal_zone")
            })
            .take(THERMAL_ZONES_MAX)
            .filter_map(|entry| read_trimmed(&entry.path().join("temp")))
            .filter_map(|millidegrees| millidegrees.parse::<f32>().ok())
            .map(|millidegrees| millidegrees / 1000.0)
            .filter(|celsius| celsius.is_finite())
            .reduce(f32::max)
    }
}

impl VehicleStateAdapter for LinuxPowerAdapter {
    fn current(&mut self, now: SystemTime) -> Result<VehicleState, AgentError> {
        let supplies = self.supplies()?;
        Ok(VehicleState {
            temperature_c: self.temperature_c(),
            ..combine(&supplies, now)
        })
    }
}

/// Reads one supply folder; `None` for a peripheral's battery or a folder without a `type`.
fn read_supply(dir: &Path) -> Option<Supply> {
    let kind = read_trimmed(&dir.join("type"))?;
    let is_battery = kind == "Battery";
    if is_battery && read_trimmed(&dir.join("scope")).as_deref() == Some("Device") {
        return None;
    }
    Some(Supply {
        is_battery,
        online: read_trimmed(&dir.join("online")).map(|online| online == "1"),
        status: read_trimmed(&dir.join("status")),
        capacity_percent: read_trimmed(&dir.join("capacity")).and_then(|c| c.parse().ok()),
    })
}

/// Turns what the supplies say into a vehicle state (temperature left unknown).
fn combine(supplies: &[Supply], now: SystemTime) -> VehicleState {
    let external: Vec<&Supply> = supplies.iter().filter(|s| !s.is_battery).collect();
    let batteries: Vec<&Supply> = supplies.iter().filter(|s| s.is_battery).collect();
    let external_online = external.iter().any(|s| s.online == Some(true));

    if batteries.is_empty() {
        let reported_offline =
            !external.is_empty() && external.iter().all(|s| s.online == Some(false));
        return VehicleState {
            plugged_in: !reported_offline,
            charging: false,
            state_of_charge: StateOfCharge::FULL,
            ..VehicleState::unplugged(now)
        };
    }

    let status_is = |wanted: &[&str]| {
        batteries.iter().any(|b| {
            b.status
                .as_deref()
                .is_some_and(|status| wanted.contains(&status))
        })
    };
    let charging = status_is(&["Charging"]);
    let plugged_in = external_online || status_is(&["Charging", "Full", "Not charging"]);
    let capacities: Vec<f32> = batteries
        .iter()
        .filter_map(|b| b.capacity_percent)
        .collect();
    let state_of_charge = if capacities.is_empty() {
        // A battery that does not say how full it is: assume the worst, so that no work drains it.
        StateOfCharge::EMPTY
    } else {
        let mean = capacities.iter().sum::<f32>() / capacities.len() as f32;
        StateOfCharge::from_percent(mean).unwrap_or(StateOfCharge::EMPTY)
    };
    VehicleState {
        plugged_in,
        charging,
        state_of_charge,
        ..VehicleState::unplugged(now)
    }
}

/// A sysfs attribute, trimmed; `None` when absent or unreadable (many attributes are optional).
fn read_trimmed(path: &Path) -> Option<String> {
    fs::read_to_string(path)
        .ok()
        .map(|text| text.trim().to_owned())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::UNIX_EPOCH;

    /// A fake `/sys/class` with `power_supply` and `thermal` folders.
    struct FakeSysfs {
        dir: tempfile::TempDir,
    }

    impl FakeSysfs {
        fn new() -> FakeSysfs {
            let dir = tempfile::tempdir().expect("tempdir");
            fs::create_dir_all(dir.path().join("class/power_supply")).expect("mkdir");
            FakeSysfs { dir }
        }

        fn supply(&self, name: &str, attributes: &[(&str, &str)]) -> &FakeSysfs {
            let folder = self.dir.path().join("class/power_supply").join(name);
            fs::create_dir_all(&folder).expect("mkdir");
            for (attribute, value) in attributes {
                fs::write(folder.join(attribute), format!("{value}\n")).expect("write");
            }
            self
        }

        fn thermal_zone(&self, index: u32, millidegrees: &str) -> &FakeSysfs {
            let folder = self
                .dir
                .path()
                .join(format!("class/thermal/thermal_zone{index}"));
            fs::create_dir_all(&folder).expect("mkdir");
            fs::write(folder.join("temp"), millidegrees).expect("write");
            self
        }

        fn read(&self) -> VehicleState {
            let root = self.dir.path().join("class/power_supply");
            let mut adapter = LinuxPowerAdapter::open(root).expect("open");
            adapter.current(UNIX_EPOCH).expect("read")
        }
    }

    #[test]
    fn laptop_on_ac_and_charging() {
        let sysfs = FakeSysfs::new();
        sysfs
            .supply("AC", &[("type", "Mains"), ("online", "1")])
            .supply(
                "BAT0",
                &[
                    ("type", "Battery"),
                    ("status", "Charging"),
                    ("capacity", "64"),
                ],
            )
            .thermal_zone(0, "45000")
            .thermal_zone(1, "61500");
        let state = sysfs.read();
        assert!(state.plugged_in && state.charging);
        assert_eq!(state.state_of_charge.fraction(), 0.64);
        assert_eq!(state.temperature_c, Some(61.5));
    }

    #[test]
    fn laptop_on_battery_is_not_plugged_in() {
        let sysfs = FakeSysfs::new();
        sysfs
            .supply("AC", &[("type", "Mains"), ("online", "0")])
            .supply(
                "BAT0",
                &[
                    ("type", "Battery"),
                    ("status", "Discharging"),
                    ("capacity", "80"),
                ],
            );
        let state = sysfs.read();
        assert!(!state.plugged_in && !state.charging);
        assert_eq!(state.state_of_charge.fraction(), 0.8);
        assert_eq!(state.temperature_c, None);
    }

    #[test]
    fn laptop_held_at_a_charge_limit_is_plugged_in() {
        let sysfs = FakeSysfs::new();
        sysfs.supply(
            "BAT1",
            &[
                ("type", "Battery"),
                ("status", "Not charging"),
                ("capacity", "80"),
            ],
        );
        let state = sysfs.read();
        assert!(state.plugged_in && !state.charging);
    }

    #[test]
    fn desktop_on_mains_is_plugged_in_and_full() {
        let sysfs = FakeSysfs::new();
        sysfs.supply("ACAD", &[("type", "Mains"), ("online", "1")]);
        let state = sysfs.read();
        assert!(state.plugged_in && !state.charging);
        assert_eq!(state.state_of_charge, StateOfCharge::FULL);
    }

    #[test]
    fn machine_without_any_supply_runs_on_external_power() {
        let state = FakeSysfs::new().read();
        assert!(state.plugged_in);
        assert_eq!(state.state_of_charge, StateOfCharge::FULL);
    }

    #[test]
    fn peripheral_batteries_are_ignored() {
        let sysfs = FakeSysfs::new();
        sysfs
            .supply("AC", &[("type", "Mains"), ("online", "1")])
            .supply(
                "hidpp_battery_0",
                &[
                    ("type", "Battery"),
                    ("scope", "Device"),
                    ("status", "Discharging"),
                    ("capacity", "5"),
                ],
            );
        let state = sysfs.read();
        assert!(state.plugged_in);
        assert_eq!(state.state_of_charge, StateOfCharge::FULL);
    }

    #[test]
    fn mains_offline_without_battery_is_not_plugged_in() {
        let sysfs = FakeSysfs::new();
        sysfs.supply("AC", &[("type", "Mains"), ("online", "0")]);
        assert!(!sysfs.read().plugged_in);
    }

    #[test]
    fn missing_root_is_an_error_naming_the_path() {
        let dir = tempfile::tempdir().expect("tempdir");
        let missing = dir.path().join("nope");
        let error = LinuxPowerAdapter::open(missing.clone())
            .err()
            .map(|e| e.to_string());
        assert!(error.is_some_and(|e| e.contains(&missing.display().to_string())));
    }
}
