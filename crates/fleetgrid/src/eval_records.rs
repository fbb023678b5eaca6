//! Per-item evaluation records: one JSON line per answer a tier gave to an
//! item, appended as the evaluation runs, so that calibration and curves can
//! reuse answers without running the models again.
//!
//! A later line for the same (data set, item, tier) replaces an earlier one
//! when the file is read, so re-running an evaluation refreshes its records.

use std::collections::BTreeMap;
use std::io::Write;
use std::path::Path;

use anyhow::Context;
use router::calibrate::CalibrationItem;
use router::{ConfidenceScores, Prices, TaskClass};
use serde::{Deserialize, Serialize};

use crate::eval_data::Half;

/// The most record lines read from one file.
pub const RECORD_LINES_MAX: usize = 1_000_000;

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Tier {
    Edge,
    Cloud,
}

/// One tier's answer to one item.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Record {
    pub dataset: String,
    pub item: String,
    pub index: usize,
    pub half: Half,
    pub class: TaskClass,
    pub tier: Tier,
    pub model: String,
    pub answer: String,
    pub extracted: Option<String>,
    pub correct: bool,
    pub prompt_tokens: u32,
    pub completion_tokens: u32,
    pub latency_ms: u64,
    /// The answer's confidence scores, when log-probabilities came back.
    pub confidence: Option<ConfidenceScores>,
}

/// Appends records to a JSONL file, creating it (and its folder) if needed.
pub fn append(path: &Path, records: &[Record]) -> anyhow::Result<()> {
    if let Some(parent) = path
        .parent()
        .filter(|parent| !parent.as_os_str().is_empty())
    {
        std::fs::create_dir_all(parent).with_context(|| format!("create {}", parent.display()))?;
    }
    let mut file = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
        .with_context(|| format!("open {}", path.display()))?;
    let mut text = String::new();
    for record in records {
        text.push_str(&serde_json::to_string(record).context("serialise a record")?);
        text.push('\n');
    }
    file.write_all(text.as_bytes())
        .with_context(|| format!("write {}", path.display()))
}

/// Both tiers' answers to one item, as far as they are recorded.
#[derive(Debug, Clone, Default)]
pub struct ItemRecords {
    pub edge: Option<Record>,
    pub cloud: Option<Record>,
}

/// The records of one data set, by item index (the last line for each tier wins).
pub fn load(path: &Path, dataset: &str) -> anyhow::Result<BTreeMap<usize, ItemRecords>> {
    let mut items: BTreeMap<usize, ItemRecords> = BTreeMap::new();
    if !path.exists() {
        return Ok(items);
    }
    let text = std::fs::read_to_string(path).with_context(|| format!("read {}", path.display()))?;
    for (number, line) in text.lines().enumerate().take(RECORD_LINES_MAX) {
        if line.trim().is_empty() {
            continue;
        }
        let record: Record = serde_json::from_str(line)
            .with_context(|| format!("{}:{}: not a record", path.display(), number + 1))?;
        if record.dataset != dataset {
            continue;
        }
        let entry = items.entry(record.index).or_default();
        match record.tier {
            Tier::Edge => entry.edge = Some(record),
            Tier::Cloud => entry.cloud = Some(record),
        }
    }
    Ok(items)
}

/// Calibration items from records that have both tiers' answers and the
/// edge answer's confidence; also returns how many items lacked them.
pub fn calibration_items(
    records: &BTreeMap<usize, ItemRecords>,
    half: Half,
    prices: &Prices,
) -> (Vec<CalibrationItem>, usize) {
    let mut items = Vec::new();
    let mut incomplete = 0;
    for (index, item) in records {
        if !half.contains(*index) {
            continue;
        }
        let (Some(edge), Some(cloud)) = (&item.edge, &item.cloud) else {
            incomplete += 1;
            continue;
        };
        let Some(confidence) = edge.confidence else {
            incomplete += 1;
            continue;
        };
        items.push(CalibrationItem {
            class: edge.class,
            edge_correct: edge.correct,
            cloud_correct: cloud.correct,
            edge_confidence: confidence,
            edge_cost: prices.edge.cost(edge.prompt_tokens, edge.completion_tokens),
            cloud_cost: prices
                .cloud
                .cost(cloud.prompt_tokens, cloud.completion_tokens),
        });
    }
    (items, incomplete)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(index: usize, tier: Tier, correct: bool) -> Record {
        Record {
            dataset: "set".into(),
            item: index.to_string(),
            index,
            half: Half::of_index(index),
            class: TaskClass::Math,
            tier,
            model: "m".into(),
            answer: "4".into(),
            extracted: Some("4".into()),
            correct,
            prompt_tokens: 10,
            completion_tokens: 2,
            latency_ms: 5,
            confidence: (tier == Tier::Edge).then_some(ConfidenceScores::EMPTY),
        }
    }

    #[test]
    fn later_records_replace_earlier_ones_and_halves_filter() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("records.jsonl");
        append(
            &path,
            &[record(0, Tier::Edge, false), record(0, Tier::Cloud, true)],
        )
        .expect("append");
        append(
            &path,
            &[record(0, Tier::Edge, true), record(1, Tier::Edge, true)],
        )
        .expect("append");
        let mut other = record(2, Tier::Edge, true);
        other.dataset = "other".into();
        append(&path, &[other]).expect("append");

        let records = load(&path, "set").expect("load");
        assert_eq!(records.len(), 2);
        assert!(records[&0].edge.as_ref().expect("edge").correct);

        let (items, incomplete) = calibration_items(&records, Half::All, &Prices::default());
        assert_eq!((items.len(), incomplete), (1, 1));
        assert!(items[0].edge_correct && items[0].cloud_correct);
        let (items, incomplete) = calibration_items(&records, Half::Report, &Prices::default());
        assert_eq!((items.len(), incomplete), (0, 1));
        assert!(load(&dir.path().join("missing.jsonl"), "set")
            .expect("missing is empty")
            .is_empty());
    }
}
