//! The cost–quality curve: a cascade on one confidence feature swept over
//! every threshold, next to edge-only, cloud-only and the calibrated policy,
//! drawn as a hand-written SVG (no plotting dependency).

use std::fmt::Write as _;

use serde::{Deserialize, Serialize};

use crate::calibrate::{all, evaluate, CalibrationItem, Totals};
use crate::confidence::ConfidenceFeature;
use crate::config::{AcceptRule, ClassPolicies, ClassPolicy};

/// One threshold of the sweep.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct CurvePoint {
    pub threshold: f32,
    pub totals: Totals,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Curve {
    /// Names the data set and its half, e.g. "gsm8k, report half (odd items)".
    pub title: String,
    pub feature: ConfidenceFeature,
    /// Sorted by threshold, lowest (everything accepted) first.
    pub points: Vec<CurvePoint>,
    pub edge_only: Totals,
    pub cloud_only: Totals,
    /// The configured policies on the same items, when there are some.
    pub chosen: Option<Totals>,
}

/// Sweeps a cascade on `feature` (for every class) over each distinct score,
/// from accepting everything to escalating everything.
pub fn sweep(
    title: &str,
    items: &[CalibrationItem],
    feature: ConfidenceFeature,
    chosen: Option<&ClassPolicies>,
) -> Curve {
    let mut scores: Vec<f32> = items
        .iter()
        .map(|item| item.edge_confidence.get(feature))
        .collect();
    scores.sort_by(f32::total_cmp);
    scores.dedup();
    let above_all = scores.last().map_or(0.0, |max| max + 1.0);
    let points = scores
        .iter()
        .copied()
        .chain(std::iter::once(above_all))
        .map(|threshold| {
            let policy = ClassPolicy::Cascade(AcceptRule { feature, threshold });
            CurvePoint {
                threshold,
                totals: evaluate(&all(policy), items),
            }
        })
        .collect();
    Curve {
        title: title.to_string(),
        feature,
        points,
        edge_only: evaluate(&all(ClassPolicy::Edge), items),
        cloud_only: evaluate(&all(ClassPolicy::Cloud), items),
        chosen: chosen.map(|policies| evaluate(policies, items)),
    }
}

const WIDTH: f64 = 720.0;
const HEIGHT: f64 = 480.0;
const LEFT: f64 = 80.0;
const RIGHT: f64 = 30.0;
const TOP: f64 = 60.0;
const BOTTOM: f64 = 70.0;

fn escape(text: &str) -> String {
    text.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}

impl Curve {
    /// Cost as a percentage of cloud-only cost.
    fn cost_percent(&self, totals: &Totals) -> f64 {
        if self.cloud_only.cost.0 == 0 {
            return 0.0;
        }
        100.0 * totals.cost.0 as f64 / self.cloud_only.cost.0 as f64
    }

    /// The curve as a standalone SVG document: x is cost as a percentage of
    /// cloud-only cost, y is accuracy in percent.
    pub fn to_svg(&self) -> String {
        let all_totals = self
            .points
            .iter()
            .map(|point| point.totals)
            .chain([self.edge_only, self.cloud_only])
            .chain(self.chosen);
        let x_max_raw = all_totals
            .map(|totals| self.cost_percent(&totals))
            .fold(100.0f64, f64::max);
        let x_max = (x_max_raw / 25.0).ceil() * 25.0;
        let plot_width = WIDTH - LEFT - RIGHT;
        let plot_height = HEIGHT - TOP - BOTTOM;
        let x = |percent: f64| LEFT + plot_width * percent / x_max;
        let y = |accuracy: f64| TOP + plot_height * (1.0 - accuracy);
        let mut svg = String::new();
        let _ = writeln!(
            svg,
            r#"<svg xmlns="http://www.w3.org/2000/svg" width="{WIDTH}" height="{HEIGHT}" viewBox="0 0 {WIDTH} {HEIGHT}" font-family="sans-serif" font-size="12">"#
        );
        let _ = writeln!(svg, r#"<rect width="100%" height="100%" fill="white"/>"#);
        let _ = writeln!(
            svg,
            r#"<text x="{}" y="28" text-anchor="middle" font-size="15" font-weight="bold">{}</text>"#,
            WIDTH / 2.0,
            escape(&self.title)
        );
        let _ = writeln!(
            svg,
            r##"<text x="{}" y="46" text-anchor="middle" fill="#555">cascade on {} swept over every threshold; {} items</text>"##,
            WIDTH / 2.0,
            self.feature,
            self.cloud_only.items
        );
        self.axes(&mut svg, x_max, &x, &y);
        let path: Vec<String> = {
            let mut points: Vec<(f64, f64)> = self
                .points
                .iter()
                .map(|point| (self.cost_percent(&point.totals), point.totals.accuracy()))
                .collect();
            points.sort_by(|a, b| a.0.total_cmp(&b.0).then(a.1.total_cmp(&b.1)));
            points
                .iter()
                .map(|(cost, accuracy)| format!("{:.1},{:.1}", x(*cost), y(*accuracy)))
                .collect()
        };
        let _ = writeln!(
            svg,
            r##"<polyline points="{}" fill="none" stroke="#1f77b4" stroke-width="2"/>"##,
            path.join(" ")
        );
        for point in &path {
            if let Some((cx, cy)) = point.split_once(',') {
                let _ = writeln!(
                    svg,
                    r##"<circle cx="{cx}" cy="{cy}" r="2.5" fill="#1f77b4"/>"##
                );
            }
        }
        let mut markers = vec![
            ("edge only", self.edge_only, "#2ca02c"),
            ("cloud only", self.cloud_only, "#d62728"),
        ];
        if let Some(chosen) = self.chosen {
            markers.push(("auto (configured)", chosen, "#ff7f0e"));
        }
        for (label, totals, colour) in markers {
            let (px, py) = (x(self.cost_percent(&totals)), y(totals.accuracy()));
            let _ = writeln!(
                svg,
                r#"<rect x="{:.1}" y="{:.1}" width="10" height="10" fill="{colour}"/>"#,
                px - 5.0,
                py - 5.0
            );
            let _ = writeln!(
                svg,
                r#"<text x="{:.1}" y="{:.1}" fill="{colour}">{label} ({:.0}%, {:.0}% cost)</text>"#,
                px + 8.0,
                py - 8.0,
                totals.accuracy() * 100.0,
                self.cost_percent(&totals)
            );
        }
        svg.push_str("</svg>\n");
        svg
    }

    fn axes(&self, svg: &mut String, x_max: f64, x: &dyn Fn(f64) -> f64, y: &dyn Fn(f64) -> f64) {
        let (x0, y0) = (x(0.0), y(0.0));
        let _ = writeln!(
            svg,
            r#"<line x1="{x0}" y1="{y0}" x2="{}" y2="{y0}" stroke="black"/>"#,
            x(x_max)
        );
        let _ = writeln!(
            svg,
            r#"<line x1="{x0}" y1="{y0}" x2="{x0}" y2="{}" stroke="black"/>"#,
            y(1.0)
        );
        let mut tick = 0.0;
        while tick <= x_max + 1e-9 {
            let px = x(tick);
            let _ = writeln!(
                svg,
                r##"<line x1="{px:.1}" y1="{y0}" x2="{px:.1}" y2="{}" stroke="#ddd"/><text x="{px:.1}" y="{}" text-anchor="middle">{tick:.0}%</text>"##,
                y(1.0),
                y0 + 18.0
            );
            tick += 25.0;
        }
        for step in 0..=10 {
            let accuracy = f64::from(step) / 10.0;
            let py = y(accuracy);
            let _ = writeln!(
                svg,
                r##"<line x1="{x0}" y1="{py:.1}" x2="{}" y2="{py:.1}" stroke="#eee"/><text x="{}" y="{:.1}" text-anchor="end">{:.0}%</text>"##,
                x(x_max),
                x0 - 6.0,
                py + 4.0,
                accuracy * 100.0
            );
        }
        let _ = writeln!(
            svg,
            r#"<text x="{:.1}" y="{}" text-anchor="middle">cost (% of cloud-only cost)</text>"#,
            x(x_max / 2.0),
            HEIGHT - 20.0
        );
        let _ = writeln!(
            svg,
            r#"<text x="20" y="{:.1}" text-anchor="middle" transform="rotate(-90 20 {:.1})">accuracy (%)</text>"#,
            y(0.5),
            y(0.5)
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::confidence::ConfidenceScores;
    use crate::cost::MicroUsd;
    use crate::features::TaskClass;

    fn item(edge: bool, mean_logprob: f32) -> CalibrationItem {
        CalibrationItem {
            class: TaskClass::Math,
            edge_correct: edge,
            cloud_correct: true,
            edge_confidence: ConfidenceScores {
                mean_logprob,
                ..ConfidenceScores::EMPTY
            },
            edge_cost: MicroUsd(1),
            cloud_cost: MicroUsd(10),
        }
    }

    #[test]
    fn the_sweep_runs_from_edge_only_quality_to_cloud_quality() {
        let items = [item(true, -0.1), item(false, -2.0), item(true, -0.5)];
        let curve = sweep(
            "math & <friends>, report half",
            &items,
            ConfidenceFeature::MeanLogprob,
            None,
        );
        assert_eq!(curve.points.len(), 4);
        let first = curve.points[0].totals;
        assert_eq!((first.correct, first.edge_served), (2, 3));
        let last = curve.points[3].totals;
        assert_eq!(
            (last.correct, last.edge_served, last.cost),
            (3, 0, MicroUsd(33))
        );
        assert_eq!(curve.cloud_only.cost, MicroUsd(30));

        let svg = curve.to_svg();
        assert!(svg.starts_with("<svg"));
        assert!(svg.trim_end().ends_with("</svg>"));
        assert!(svg.contains("math &amp; &lt;friends&gt;, report half"));
        assert!(svg.contains("cost (% of cloud-only cost)"));
        assert!(svg.contains("accuracy (%)"));
        assert!(svg.contains("edge only (67%"), "{svg}");
        assert!(svg.contains("cloud only (100%, 100% cost)"));
        // Escalating everything costs 110% of cloud-only: the axis reaches 125%.
        assert!(svg.contains(">125%</text>"));
    }
}
