//! The operator's price file: token prices per model and class, the owners'
//! revenue share, the cloud margin, payout rates, and the power profile and
//! electricity tariff of each vehicle (with defaults for the rest).
//!
//! The file is JSON. Money is written as decimal US dollars in strings
//! (`"0.03"`), parsed exactly into micro-dollars: a float never touches an
//! amount. `prices/default.json` in this crate is the sheet the coordinator
//! uses when none is given.

use std::collections::BTreeMap;

use serde_json::{Map, Value};

use crate::core::{BasisPoints, Instrument, MicroUsd, ModelId, NodeId};
use crate::metering::{PowerProfile, TimeOfUseTariff};
use crate::payout::PayoutRates;
use crate::pricing::{Price, PriceSheet, TenantClass};

/// The default price sheet shipped with fleetgrid.
pub const DEFAULT_PRICES_JSON: &str = include_str!("../prices/default.json");

/// Largest price file read, so a wrong path cannot fill memory.
pub const PRICE_FILE_BYTES_MAX: usize = 1024 * 1024;

/// Why a price file or an amount was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PriceFileError {
    #[error("price file is not valid JSON: {0}")]
    Json(String),
    #[error("{0}: expected {1}")]
    Shape(String, &'static str),
    #[error("{at}: {amount:?} is not an amount in dollars with at most six decimals")]
    BadAmount { at: String, amount: String },
    #[error("{0}")]
    Invalid(String),
}

/// Everything the price file configures.
#[derive(Debug, Clone)]
pub struct PriceConfig {
    pub sheet: PriceSheet,
    pub payout_rates: PayoutRates,
    pub default_power: PowerProfile,
    pub default_tariff: TimeOfUseTariff,
    /// Vehicles whose power profile or tariff differ from the defaults.
    pub nodes: BTreeMap<NodeId, NodeEnergy>,
}

/// A vehicle's own power profile and tariff.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodeEnergy {
    pub power: Option<PowerProfile>,
    pub tariff: Option<TimeOfUseTariff>,
}

impl PriceConfig {
    pub fn default_sheet() -> Result<PriceConfig, PriceFileError> {
        PriceConfig::parse_json(DEFAULT_PRICES_JSON)
    }

    pub fn parse_json(text: &str) -> Result<PriceConfig, PriceFileError> {
        let root: Value =
            serde_json::from_str(text).map_err(|error| PriceFileError::Json(error.to_string()))?;
        let root = object(&root, "the price file")?;
        let sheet = PriceSheet {
            fleet: fleet_prices(field(root, "fleet", "the price file")?)?,
            upstream: upstream_prices(root.get("upstream"))?,
            cloud_margin: BasisPoints(bps(root, "cloud_margin_bps", 0)?),
            owner_share: BasisPoints(bps(root, "owner_share_bps", 7_000)?),
        };
        sheet
            .validate()
            .map_err(|error| PriceFileError::Invalid(error.to_string()))?;
        let payout_rates = payout_rates(field(root, "payout_per_unit", "the price file")?)?;
        let default_power = power(field(root, "power", "the price file")?, "power")?;
        let default_tariff = tariff(field(root, "tariff", "the price file")?, "tariff")?;
        let mut nodes = BTreeMap::new();
        if let Some(listed) = root.get("nodes") {
            for (name, energy) in object(listed, "nodes")? {
                let at = format!("nodes.{name}");
                let node = NodeId::new(name.as_str())
                    .map_err(|error| PriceFileError::Invalid(format!("{at}: {error}")))?;
                let energy_fields = object(energy, "a node's power and tariff")?;
                let node_power = energy_fields
                    .get("power")
                    .map(|value| power(value, &format!("{at}.power")))
                    .transpose()?;
                let node_tariff = energy_fields
                    .get("tariff")
                    .map(|value| tariff(value, &format!("{at}.tariff")))
                    .transpose()?;
                nodes.insert(
                    node,
                    NodeEnergy {
                        power: node_power,
                        tariff: node_tariff,
                    },
                );
            }
        }
        Ok(PriceConfig {
            sheet,
            payout_rates,
            default_power,
            default_tariff,
            nodes,
        })
    }

    pub fn power_of(&self, node: &NodeId) -> PowerProfile {
        self.nodes
            .get(node)
            .and_then(|energy| energy.power)
            .unwrap_or(self.default_power)
    }

    /// Every vehicle with a tariff of its own and its day-mean price per
    /// kWh; the rest pay the default tariff's, returned first.
    pub fn day_mean_prices(&self) -> (MicroUsd, Vec<(&NodeId, MicroUsd)>) {
        let own = self
            .nodes
            .iter()
            .filter_map(|(node, energy)| Some((node, energy.tariff.as_ref()?.day_mean_per_kwh())))
            .collect();
        (self.default_tariff.day_mean_per_kwh(), own)
    }

    pub fn tariff_of(&self, node: &NodeId) -> &TimeOfUseTariff {
        self.nodes
            .get(node)
            .and_then(|energy| energy.tariff.as_ref())
            .unwrap_or(&self.default_tariff)
    }
}

/// [`MicroUsd::parse_usd`] at the path callers of the price file know.
pub fn parse_usd(text: &str) -> Option<MicroUsd> {
    MicroUsd::parse_usd(text)
}

fn object<'a>(value: &'a Value, at: &str) -> Result<&'a Map<String, Value>, PriceFileError> {
    value
        .as_object()
        .ok_or_else(|| PriceFileError::Shape(at.to_owned(), "an object"))
}

fn field<'a>(
    map: &'a Map<String, Value>,
    name: &str,
    at: &str,
) -> Result<&'a Value, PriceFileError> {
    map.get(name)
        .ok_or_else(|| PriceFileError::Shape(format!("{at}.{name}"), "a value (it is missing)"))
}

fn amount(value: &Value, at: &str) -> Result<MicroUsd, PriceFileError> {
    let text = value.as_str().ok_or_else(|| {
        PriceFileError::Shape(at.to_owned(), "dollars as a string, e.g. \"0.03\"")
    })?;
    match MicroUsd::parse_usd(text) {
        Some(amount) => Ok(amount),
        _ => Err(PriceFileError::BadAmount {
            at: at.to_owned(),
            amount: text.to_owned(),
        }),
    }
}

fn integer(map: &Map<String, Value>, name: &str, at: &str) -> Result<u64, PriceFileError> {
    field(map, name, at)?
        .as_u64()
        .ok_or_else(|| PriceFileError::Shape(format!("{at}.{name}"), "a whole number"))
}

fn bps(map: &Map<String, Value>, name: &str, default: u32) -> Result<u32, PriceFileError> {
    match map.get(name) {
        None => Ok(default),
        Some(value) => value
            .as_u64()
            .and_then(|bps| u32::try_from(bps).ok())
            .ok_or_else(|| PriceFileError::Shape(name.to_owned(), "basis points (10000 = 100 %)")),
    }
}

fn price(value: &Value, at: &str) -> Result<Price, PriceFileError> {
    let fields = object(value, at)?;
    Ok(Price {
        prompt_per_million: amount(field(fields, "prompt", at)?, &format!("{at}.prompt"))?,
        completion_per_million: amount(
            field(fields, "completion", at)?,
            &format!("{at}.completion"),
        )?,
    })
}

fn model_id(name: &str, at: &str) -> Result<ModelId, PriceFileError> {
    ModelId::new(name).map_err(|error| PriceFileError::Invalid(format!("{at}: {error}")))
}

fn fleet_prices(value: &Value) -> Result<BTreeMap<(ModelId, TenantClass), Price>, PriceFileError> {
    let mut prices = BTreeMap::new();
    for (model, classes) in object(value, "fleet")? {
        let at = format!("fleet.{model}");
        let id = model_id(model, &at)?;
        for (class, class_price) in object(classes, &at)? {
            let class: TenantClass = class
                .parse()
                .map_err(|error| PriceFileError::Invalid(format!("{at}: {error}")))?;
            prices.insert(
                (id.clone(), class),
                price(class_price, &format!("{at}.{class}"))?,
            );
        }
    }
    Ok(prices)
}

fn upstream_prices(value: Option<&Value>) -> Result<BTreeMap<ModelId, Price>, PriceFileError> {
    let mut prices = BTreeMap::new();
    let Some(value) = value else {
        return Ok(prices);
    };
    for (model, model_price) in object(value, "upstream")? {
        let at = format!("upstream.{model}");
        prices.insert(model_id(model, &at)?, price(model_price, &at)?);
    }
    Ok(prices)
}

fn payout_rates(value: &Value) -> Result<PayoutRates, PriceFileError> {
    let mut rates = Vec::new();
    for (instrument, rate) in object(value, "payout_per_unit")? {
        let at = format!("payout_per_unit.{instrument}");
        let instrument: Instrument = instrument
            .parse()
            .map_err(|error| PriceFileError::Invalid(format!("{at}: {error}")))?;
        rates.push((instrument, amount(rate, &at)?));
    }
    PayoutRates::new(rates).map_err(|error| PriceFileError::Invalid(error.to_string()))
}

fn power(value: &Value, at: &str) -> Result<PowerProfile, PriceFileError> {
    let fields = object(value, at)?;
    let watts = |name: &str| {
        integer(fields, name, at).and_then(|watts| {
            u32::try_from(watts)
                .map_err(|_| PriceFileError::Shape(format!("{at}.{name}"), "watts below 2^32"))
        })
    };
    Ok(PowerProfile {
        watts_idle: watts("watts_idle")?,
        watts_busy: watts("watts_busy")?,
    })
}

fn tariff(value: &Value, at: &str) -> Result<TimeOfUseTariff, PriceFileError> {
    let fields = object(value, at)?;
    let offset = match fields.get("utc_offset_minutes") {
        None => 0,
        Some(offset) => offset
            .as_i64()
            .and_then(|minutes| i32::try_from(minutes).ok())
            .filter(|minutes| minutes.abs() <= 14 * 60)
            .ok_or_else(|| {
                PriceFileError::Shape(format!("{at}.utc_offset_minutes"), "minutes within ±14 h")
            })?,
    };
    let mut per_kwh_by_hour = [MicroUsd::ZERO; 24];
    match (fields.get("per_kwh"), fields.get("per_kwh_by_hour")) {
        (Some(flat), None) => per_kwh_by_hour = [amount(flat, &format!("{at}.per_kwh"))?; 24],
        (None, Some(hours)) => {
            let hours = hours
                .as_array()
                .filter(|hours| hours.len() == 24)
                .ok_or_else(|| {
                    PriceFileError::Shape(format!("{at}.per_kwh_by_hour"), "24 amounts")
                })?;
            for (hour, price) in hours.iter().enumerate() {
                per_kwh_by_hour[hour] = amount(price, &format!("{at}.per_kwh_by_hour[{hour}]"))?;
            }
        }
        _ => {
            return Err(PriceFileError::Shape(
                at.to_owned(),
                "exactly one of per_kwh or per_kwh_by_hour",
            ))
        }
    }
    Ok(TimeOfUseTariff {
        utc_offset_minutes: offset,
        per_kwh_by_hour,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::core::TimestampMs;

    #[test]
    fn the_default_sheet_is_valid_and_spot_is_cheapest() {
        let config = PriceConfig::default_sheet().unwrap();
        let model = ModelId::new("smollm2-135m-instruct").unwrap();
        let spot = config.sheet.rate(&model, TenantClass::Spot).unwrap();
        let fleet = config.sheet.rate(&model, TenantClass::Fleet).unwrap();
        assert!(spot.customer().completion_per_million < fleet.customer().completion_per_million);
        assert_eq!(config.sheet.owner_share, BasisPoints(7_000));
        assert_eq!(
            config.payout_rates.per_unit(Instrument::Cash),
            Some(MicroUsd(10_000))
        );
        // Off-peak from 22:00 to 06:00 UTC.
        let at_23h = TimestampMs(23 * TimestampMs::PER_HOUR);
        assert_eq!(config.default_tariff.per_kwh_at(at_23h), MicroUsd(150_000));
    }

    #[test]
    fn per_node_energy_overrides_the_defaults() {
        let text = DEFAULT_PRICES_JSON.replace(
            "\"nodes\": {}",
            r#""nodes": {"car-1": {"power": {"watts_idle": 5, "watts_busy": 30},
                                    "tariff": {"per_kwh": "0.10"}}}"#,
        );
        let config = PriceConfig::parse_json(&text).unwrap();
        let car = NodeId::new("car-1").unwrap();
        let other = NodeId::new("car-2").unwrap();
        assert_eq!(config.power_of(&car).watts_busy, 30);
        assert_eq!(config.power_of(&other).watts_busy, 60);
        assert_eq!(
            config.tariff_of(&car).per_kwh_at(TimestampMs(0)),
            MicroUsd(100_000)
        );
        // Placement's view: the vehicle's own flat price, and the default
        // time-of-use tariff's day mean (off-peak 22:00-06:00 is cheaper
        // than the rest) for every other vehicle.
        let (default, own) = config.day_mean_prices();
        assert_eq!(own, vec![(&car, MicroUsd(100_000))]);
        let day_mean = config.default_tariff.day_mean_per_kwh();
        assert_eq!(default, day_mean);
        assert!(day_mean > MicroUsd(150_000));
        assert!(
            day_mean
                < config
                    .default_tariff
                    .per_kwh_at(TimestampMs(12 * TimestampMs::PER_HOUR))
        );
    }

    #[test]
    fn mistakes_are_named_by_their_place_in_the_file() {
        let float_price = DEFAULT_PRICES_JSON.replacen("\"0.03\"", "0.03", 1);
        let error = PriceConfig::parse_json(&float_price).unwrap_err();
        assert!(
            error
                .to_string()
                .contains("fleet.smollm2-135m-instruct.spot.prompt"),
            "{error}"
        );
        let dear_spot = DEFAULT_PRICES_JSON.replacen("\"0.03\"", "\"0.07\"", 1);
        let error = PriceConfig::parse_json(&dear_spot).unwrap_err();
        assert!(
            error.to_string().contains("spot must be the cheapest"),
            "{error}"
        );
    }
}
