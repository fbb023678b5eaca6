//! Ratios against a reference measured in the same run, and the table that shows them.

use std::fmt::Write as _;

/// One measured figure of ours next to the reference's, with the ratio it must reach.
#[derive(Clone, Debug, PartialEq)]
pub struct Comparison {
    /// e.g. "prefill pp512 (tokens/s)".
    pub metric: String,
    pub ours: f64,
    pub reference: f64,
    /// The lowest acceptable `ours / reference`.
    pub target_ratio: f64,
}

/// Whether a comparison reaches its target.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Verdict {
    Pass,
    Fail,
    /// The reference measured zero (or nothing), so no ratio exists.
    NoReference,
}

impl Comparison {
    /// `ours / reference`, or `None` when the reference measured nothing.
    pub fn ratio(&self) -> Option<f64> {
        (self.reference > 0.0).then(|| self.ours / self.reference)
    }

    pub fn verdict(&self) -> Verdict {
        match self.ratio() {
            None => Verdict::NoReference,
            Some(ratio) if ratio >= self.target_ratio => Verdict::Pass,
            Some(_) => Verdict::Fail,
        }
    }
}

impl std::fmt::Display for Verdict {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        formatter.write_str(match self {
            Verdict::Pass => "pass",
            Verdict::Fail => "FAIL",
            Verdict::NoReference => "n/a",
        })
    }
}

/// A plain-text table: metric, ours, reference, ratio, target, verdict.
pub(crate) fn comparison_table(reference_name: &str, rows: &[Comparison]) -> String {
    let metric_width = rows
        .iter()
        .map(|row| row.metric.len())
        .chain(std::iter::once("metric".len()))
        .max()
        .unwrap_or(0);
    let reference_width = reference_name.len().max(10);
    let mut table = String::new();
    // Writing into a String cannot fail, hence the ignored results.
    let _ = writeln!(
        table,
        "{:<metric_width$}  {:>10}  {:>reference_width$}  {:>6}  {:>7}  result",
        "metric", "ours", reference_name, "ratio", "target"
    );
    for row in rows {
        let ratio = row
            .ratio()
            .map_or_else(|| "-".to_owned(), |ratio| format!("{ratio:.3}"));
        let _ = writeln!(
            table,
            "{:<metric_width$}  {:>10.1}  {:>reference_width$.1}  {:>6}  {:>7}  {}",
            row.metric,
            row.ours,
            row.reference,
            ratio,
            format!("≥{:.2}", row.target_ratio),
            row.verdict()
        );
    }
    table
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row(ours: f64, reference: f64, target_ratio: f64) -> Comparison {
        Comparison {
            metric: "decode tg128 (tokens/s)".to_owned(),
            ours,
            reference,
            target_ratio,
        }
    }

    #[test]
    fn verdict_follows_the_ratio() {
        assert_eq!(row(96.0, 100.0, 0.95).verdict(), Verdict::Pass);
        assert_eq!(row(94.0, 100.0, 0.95).verdict(), Verdict::Fail);
        assert_eq!(row(95.0, 100.0, 0.95).verdict(), Verdict::Pass);
        assert_eq!(row(10.0, 0.0, 0.95).verdict(), Verdict::NoReference);
    }

    #[test]
    fn table_shows_figures_ratio_and_verdict() {
        let table = comparison_table("llama-bench", &[row(90.0, 100.0, 0.95)]);
        let lines: Vec<&str> = table.lines().collect();
        assert_eq!(lines.len(), 2, "{table}");
        assert!(lines[0].contains("llama-bench"));
        for expected in ["decode tg128", "90.0", "100.0", "0.900", "≥0.95", "FAIL"] {
            assert!(
                lines[1].contains(expected),
                "{expected} missing from {}",
                lines[1]
            );
        }
    }
}
