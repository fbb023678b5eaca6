//! Per-item evaluation records: one JSON line per answer a tier gave to an
//! item, appended as the evaluation runs, so that calibration and curves can
//! reuse answers without running the models again.
//!
//! A later line for the same (data set, item, tier) replaces an earlier one
//! when the file is read, so re-running an evaluation refreshes its records.
//!
//! An edge answer carries its tokens (text, log-probability, best
//! alternative), so that `eval --replay` feeds the router's machine exactly
//! what the live run fed it; a cloud continuation of a handed-off answer is
//! recorded with the text it continued. Records written before the tokens
//! were kept read as before (calibration needs only their scores), and a
//! replay refuses them with a message to re-record.

use std::collections::BTreeMap;
use std::io::Write;
use std::path::Path;

use anyhow::Context;
use router::calibrate::CalibrationItem;
use router::{ConfidenceScores, Prices, TaskClass, TokenLogprob};
use serde::{Deserialize, Serialize};

use crate::eval_data::Half;

/// The most record lines read from one file.
pub const RECORD_LINES_MAX: usize = 1_000_000;

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Tier {
    Edge,
    Cloud,
    /// The cloud's continuation of an answer the edge started (a handoff);
    /// the record's `continued` is the text it continued.
    Handoff,
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
    /// Each token of an edge answer, for a replay of the streamed cascade.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tokens: Option<Vec<RecordedToken>>,
    /// `stop` or `length`, as the endpoint said.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub finish_reason: Option<String>,
    /// For [`Tier::Handoff`]: the edge text the cloud continued.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub continued: Option<String>,
}

/// One token of an edge answer: the text it adds and its log-probabilities.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RecordedToken {
    pub text: String,
    pub logprob: f32,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub best_alternative: Option<f32>,
}

impl RecordedToken {
    pub fn logprob(&self) -> TokenLogprob {
        TokenLogprob {
            logprob: self.logprob,
            best_alternative: self.best_alternative,
        }
    }
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
    /// Cloud continuations of handed-off answers, one per continued text.
    pub handoffs: Vec<Record>,
}

impl ItemRecords {
    /// The cloud's recorded continuation of `sent`.
    pub fn handoff(&self, sent: &str) -> Option<&Record> {
        self.handoffs
            .iter()
            .find(|record| record.continued.as_deref() == Some(sent))
    }
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
            Tier::Handoff => {
                entry
                    .handoffs
                    .retain(|earlier| earlier.continued != record.continued);
                entry.handoffs.push(record);
            }
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
            tokens: None,
            finish_reason: None,
            continued: None,
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

    #[test]
    fn old_records_read_and_handoffs_are_kept_per_continued_text() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("records.jsonl");
        // A line as written before tokens were recorded.
        let old = r#"{"dataset":"set","item":"0","index":0,"half":"calibrate","class":"math","tier":"edge","model":"m","answer":"4","extracted":"4","correct":true,"prompt_tokens":10,"completion_tokens":2,"latency_ms":5,"confidence":null}"#;
        std::fs::write(&path, format!("{old}\n")).expect("write");
        let handoff = |continued: &str, answer: &str| Record {
            tier: Tier::Handoff,
            answer: answer.into(),
            continued: Some(continued.into()),
            ..record(0, Tier::Cloud, true)
        };
        let mut edge = record(0, Tier::Edge, true);
        edge.tokens = Some(vec![RecordedToken {
            text: "4".into(),
            logprob: -0.5,
            best_alternative: Some(-2.0),
        }]);
        append(
            &path,
            &[
                handoff("2 + 2", " = 5"),
                handoff("2 +", " 2 = 4"),
                handoff("2 + 2", " = 4"),
            ],
        )
        .expect("append");
        let records = load(&path, "set").expect("load");
        assert!(records[&0].edge.as_ref().expect("edge").tokens.is_none());
        assert_eq!(records[&0].handoffs.len(), 2);
        assert_eq!(records[&0].handoff("2 + 2").expect("kept").answer, " = 4");
        assert!(records[&0].handoff("2").is_none());
        // Handoffs are not answers to the item: calibration does not see them.
        assert_eq!(
            calibration_items(&records, Half::All, &Prices::default()),
            (Vec::new(), 1)
        );

        append(&path, &[edge]).expect("append");
        let records = load(&path, "set").expect("load");
        let tokens = records[&0].edge.as_ref().expect("edge").tokens.clone();
        assert_eq!(
            tokens.expect("tokens")[0].logprob().best_alternative,
            Some(-2.0)
        );
    }
}
