//! Plain SVG charts: lines over labelled points and grouped bars. No
//! scripts, no external fonts; deterministic text for equal data.

use std::fmt::Write;

const WIDTH: f64 = 720.0;
const HEIGHT: f64 = 360.0;
const LEFT: f64 = 70.0;
const RIGHT: f64 = 20.0;
const TOP: f64 = 40.0;
const BOTTOM: f64 = 70.0;
const COLOURS: [&str; 6] = [
    "#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b",
];

/// One line of a chart.
pub struct Line {
    pub name: String,
    pub values: Vec<f64>,
}

impl Line {
    pub fn new(name: &str, values: Vec<f64>) -> Line {
        Line {
            name: name.to_owned(),
            values,
        }
    }
}

fn escape(text: &str) -> String {
    text.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
}

/// A value axis from 0 to a round maximum at or above `max`.
fn axis_max(max: f64) -> f64 {
    if max.is_nan() || max <= 0.0 {
        return 1.0;
    }
    let magnitude = 10f64.powf(max.log10().floor());
    for step in [1.0, 2.0, 2.5, 5.0, 10.0] {
        if step * magnitude >= max {
            return step * magnitude;
        }
    }
    10.0 * magnitude
}

fn number(value: f64) -> String {
    if value == 0.0 {
        "0".into()
    } else if value.abs() >= 1e9 {
        format!("{:.1}G", value / 1e9)
    } else if value.abs() >= 1e6 {
        format!("{:.1}M", value / 1e6)
    } else if value.abs() >= 1e4 {
        format!("{:.0}k", value / 1e3)
    } else if value.abs() >= 10.0 {
        format!("{value:.0}")
    } else {
        format!("{value:.2}")
    }
}

/// The SVG's head, title and value grid up to a round top at or above
/// `max`; the SVG so far and that top.
fn frame(title: &str, max: f64) -> (String, f64) {
    let top = axis_max(max);
    let mut svg = String::new();
    let _ = write!(
        &mut svg,
        "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{WIDTH}\" height=\"{HEIGHT}\" viewBox=\"0 0 {WIDTH} {HEIGHT}\" font-family=\"sans-serif\" font-size=\"11\">\n\
         <rect width=\"100%\" height=\"100%\" fill=\"white\"/>\n\
         <text x=\"{x}\" y=\"22\" font-size=\"14\" text-anchor=\"middle\">{title}</text>\n",
        x = WIDTH / 2.0,
        title = escape(title),
    );
    let plot_height = HEIGHT - TOP - BOTTOM;
    for tick in 0..=4 {
        let y = TOP + plot_height * (1.0 - f64::from(tick) / 4.0);
        let _ = writeln!(
            &mut svg,
            "<line x1=\"{LEFT}\" y1=\"{y:.1}\" x2=\"{x2}\" y2=\"{y:.1}\" stroke=\"#ddd\"/>\n\
             <text x=\"{lx}\" y=\"{ty:.1}\" text-anchor=\"end\">{label}</text>",
            x2 = WIDTH - RIGHT,
            lx = LEFT - 6.0,
            ty = y + 4.0,
            label = number(top * f64::from(tick) / 4.0),
        );
    }
    (svg, top)
}

fn legend(svg: &mut String, names: &[&str]) {
    for (index, name) in names.iter().enumerate() {
        let x = LEFT + index as f64 * 150.0;
        let y = HEIGHT - 18.0;
        let _ = writeln!(
            svg,
            "<rect x=\"{x}\" y=\"{ry}\" width=\"12\" height=\"12\" fill=\"{colour}\"/>\n\
             <text x=\"{tx}\" y=\"{y}\">{name}</text>",
            ry = y - 10.0,
            colour = COLOURS[index % COLOURS.len()],
            tx = x + 16.0,
            name = escape(name),
        );
    }
}

/// Lines over `labels` (one value per label).
pub fn line_chart(title: &str, labels: &[String], lines: &[Line]) -> String {
    let max = lines
        .iter()
        .flat_map(|line| line.values.iter().copied())
        .fold(0.0, f64::max);
    let (mut svg, top) = frame(title, max);
    let (plot_width, plot_height) = (WIDTH - LEFT - RIGHT, HEIGHT - TOP - BOTTOM);
    let count = labels.len().max(2);
    let x_of = |index: usize| LEFT + plot_width * index as f64 / (count - 1) as f64;
    for (index, label) in labels.iter().enumerate() {
        let _ = writeln!(
            svg,
            "<text x=\"{x:.1}\" y=\"{y}\" text-anchor=\"middle\">{label}</text>",
            x = x_of(index),
            y = HEIGHT - BOTTOM + 16.0,
            label = escape(label),
        );
    }
    for (index, line) in lines.iter().enumerate() {
        let points: Vec<String> = line
            .values
            .iter()
            .enumerate()
            .map(|(i, value)| {
                let y = TOP + plot_height * (1.0 - (value / top).clamp(0.0, 1.0));
                format!("{:.1},{:.1}", x_of(i), y)
            })
            .collect();
        let _ = writeln!(
            svg,
            "<polyline fill=\"none\" stroke=\"{colour}\" stroke-width=\"2\" points=\"{points}\"/>",
            colour = COLOURS[index % COLOURS.len()],
            points = points.join(" "),
        );
    }
    let names: Vec<&str> = lines.iter().map(|line| line.name.as_str()).collect();
    legend(&mut svg, &names);
    svg.push_str("</svg>\n");
    svg
}

/// Groups of bars: one group per label, one bar per series.
pub fn bar_chart<const N: usize>(
    title: &str,
    labels: &[&str; N],
    series: &[(&str, [f64; N])],
) -> String {
    let max = series
        .iter()
        .flat_map(|(_, values)| values.iter().copied())
        .fold(0.0, f64::max);
    let (mut svg, top) = frame(title, max);
    let (plot_width, plot_height) = (WIDTH - LEFT - RIGHT, HEIGHT - TOP - BOTTOM);
    let group = plot_width / N as f64;
    let bar = group * 0.8 / series.len().max(1) as f64;
    for (index, label) in labels.iter().enumerate() {
        let _ = writeln!(
            svg,
            "<text x=\"{x:.1}\" y=\"{y}\" text-anchor=\"middle\">{label}</text>",
            x = LEFT + group * (index as f64 + 0.5),
            y = HEIGHT - BOTTOM + 16.0,
        );
        for (which, (_, values)) in series.iter().enumerate() {
            let value = values[index].max(0.0);
            let height = plot_height * (value / top).min(1.0);
            let _ = writeln!(
                svg,
                "<rect x=\"{x:.1}\" y=\"{y:.1}\" width=\"{bar:.1}\" height=\"{height:.1}\" fill=\"{colour}\"><title>{value:.2}</title></rect>",
                x = LEFT + group * index as f64 + group * 0.1 + bar * which as f64,
                y = TOP + plot_height - height,
                colour = COLOURS[which % COLOURS.len()],
            );
        }
    }
    let names: Vec<&str> = series.iter().map(|(name, _)| *name).collect();
    legend(&mut svg, &names);
    svg.push_str("</svg>\n");
    svg
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_line_chart_scales_to_a_round_top_and_names_its_lines() {
        let labels: Vec<String> = (0..3).map(|h| h.to_string()).collect();
        let svg = line_chart(
            "a <title>",
            &labels,
            &[Line::new("busy", vec![0.0, 3.7, 1.0])],
        );
        assert!(svg.starts_with("<svg") && svg.ends_with("</svg>\n"));
        assert!(svg.contains("a &lt;title&gt;"));
        assert!(svg.contains(">busy<"));
        // 3.7 rounds the axis up to 5: its point sits at 74 % of the height.
        assert_eq!(axis_max(3.7), 5.0);
        let y = TOP + (HEIGHT - TOP - BOTTOM) * (1.0 - 3.7 / 5.0);
        assert!(svg.contains(&format!("{:.1}", y)), "{svg}");
    }
}
