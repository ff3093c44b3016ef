//! `compare.svg`: grouped bars (etcd, ferrocd) per workload, one panel for throughput and one
//! for p99 latency. Hand-written SVG: a few rectangles and labels need no plotting library.

use crate::compare::{CompareReport, Row};
use crate::stats::Summary;
use std::fmt::Write as _;

const LEFT_MARGIN_PX: f64 = 70.0;
const RIGHT_MARGIN_PX: f64 = 20.0;
const LEGEND_HEIGHT_PX: f64 = 30.0;
const TITLE_HEIGHT_PX: f64 = 30.0;
const PLOT_HEIGHT_PX: f64 = 220.0;
/// Room under a plot for the rotated workload names.
const LABEL_HEIGHT_PX: f64 = 130.0;
const GROUP_WIDTH_PX: f64 = 64.0;
const BAR_WIDTH_PX: f64 = 24.0;
/// Horizontal grid lines per plot, the baseline excluded.
const GRID_LINES: u32 = 4;

/// The servers in bar order, with their colours.
const SERVERS: [(&str, &str); 2] = [("etcd", "#4e79a7"), ("ferrocd", "#f28e2b")];

struct Panel {
    title: &'static str,
    unit: &'static str,
    value: fn(&Summary) -> f64,
}

const PANELS: [Panel; 2] = [
    Panel {
        title: "Throughput (ops/s, higher is better)",
        unit: "ops/s",
        value: |s| s.ops_per_s,
    },
    Panel {
        title: "p99 latency (µs, lower is better)",
        unit: "µs",
        value: |s| s.p99_us as f64,
    },
];

/// The whole chart as an SVG document.
pub fn render_svg(report: &CompareReport) -> String {
    let groups = report.rows.len().max(1) as f64;
    let width = LEFT_MARGIN_PX + groups * GROUP_WIDTH_PX + RIGHT_MARGIN_PX;
    let panel_height = TITLE_HEIGHT_PX + PLOT_HEIGHT_PX + LABEL_HEIGHT_PX;
    let height = LEGEND_HEIGHT_PX + PANELS.len() as f64 * panel_height;
    let mut svg = String::new();
    let mut put = |text: String| {
        svg.push_str(&text);
        svg.push('\n');
    };
    put(format!(
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{width:.0}" height="{height:.0}" viewBox="0 0 {width:.0} {height:.0}" font-family="sans-serif" font-size="11">"#
    ));
    put(r#"<rect x="0" y="0" width="100%" height="100%" fill="white"/>"#.into());
    for (index, (server, colour)) in SERVERS.iter().enumerate() {
        let x = LEFT_MARGIN_PX + index as f64 * 90.0;
        put(format!(
            r#"<rect x="{x:.0}" y="10" width="12" height="12" fill="{colour}"/><text x="{:.0}" y="20">{server}</text>"#,
            x + 16.0
        ));
    }
    for (index, panel) in PANELS.iter().enumerate() {
        let top = LEGEND_HEIGHT_PX + index as f64 * panel_height;
        put(render_panel(report, panel, top));
    }
    put("</svg>".into());
    svg
}

/// One plot: title, grid with values, one bar per workload and measured server, names below.
fn render_panel(report: &CompareReport, panel: &Panel, top: f64) -> String {
    let mut out = String::new();
    let plot_top = top + TITLE_HEIGHT_PX;
    let baseline = plot_top + PLOT_HEIGHT_PX;
    let scale_max = nice_ceiling(max_value(&report.rows, panel));
    writeln!(
        out,
        r#"<text x="{LEFT_MARGIN_PX:.0}" y="{:.0}" font-size="13" font-weight="bold">{}</text>"#,
        top + 20.0,
        escape(panel.title)
    )
    .expect("writing to a String");
    let right = LEFT_MARGIN_PX + report.rows.len() as f64 * GROUP_WIDTH_PX;
    for line in 0..=GRID_LINES {
        let value = scale_max * f64::from(line) / f64::from(GRID_LINES);
        let y = baseline - PLOT_HEIGHT_PX * f64::from(line) / f64::from(GRID_LINES);
        writeln!(
            out,
            r##"<line x1="{LEFT_MARGIN_PX:.0}" y1="{y:.1}" x2="{right:.0}" y2="{y:.1}" stroke="#ddd"/><text x="{:.0}" y="{:.1}" text-anchor="end">{}</text>"##,
            LEFT_MARGIN_PX - 6.0,
            y + 4.0,
            compact(value)
        )
        .expect("writing to a String");
    }
    for (group, row) in report.rows.iter().enumerate() {
        let group_left = LEFT_MARGIN_PX + group as f64 * GROUP_WIDTH_PX + 8.0;
        for (index, ((server, side), (_, colour))) in
            row.sides().into_iter().zip(SERVERS).enumerate()
        {
            let x = group_left + index as f64 * BAR_WIDTH_PX;
            let Some(summary) = side.summary() else {
                writeln!(
                    out,
                    r##"<text class="unsupported" x="{:.1}" y="{:.1}" text-anchor="middle" fill="#999">n/a</text>"##,
                    x + BAR_WIDTH_PX / 2.0,
                    baseline - 4.0
                )
                .expect("writing to a String");
                continue;
            };
            let value = (panel.value)(summary);
            let bar_height = PLOT_HEIGHT_PX * value / scale_max;
            writeln!(
                out,
                r#"<rect class="bar {server}" x="{x:.1}" y="{:.1}" width="{:.1}" height="{bar_height:.1}" fill="{colour}"><title>{server} {}: {value:.0} {}</title></rect>"#,
                baseline - bar_height,
                BAR_WIDTH_PX - 2.0,
                escape(&row.workload),
                panel.unit
            )
            .expect("writing to a String");
        }
        writeln!(
            out,
            r#"<text transform="translate({:.1},{:.1}) rotate(-35)" text-anchor="end">{}</text>"#,
            group_left + BAR_WIDTH_PX,
            baseline + 14.0,
            escape(&row.workload)
        )
        .expect("writing to a String");
    }
    out.trim_end().to_string()
}

fn max_value(rows: &[Row], panel: &Panel) -> f64 {
    let sides = rows.iter().flat_map(Row::sides);
    let values = sides.filter_map(|(_, side)| side.summary().map(panel.value));
    values.fold(0.0, f64::max)
}

/// The smallest 1, 2, 2.5 or 5 times a power of ten that is at least `value` (1 for nothing):
/// quarter grid lines then fall on round numbers.
fn nice_ceiling(value: f64) -> f64 {
    if value <= 0.0 || !value.is_finite() {
        return 1.0;
    }
    let power = 10f64.powf(value.log10().floor());
    [1.0, 2.0, 2.5, 5.0, 10.0]
        .into_iter()
        .map(|step| step * power)
        .find(|candidate| *candidate >= value)
        .expect("10 times the power of ten is above the value")
}

/// `1500` -> `1.5k`, `2000000` -> `2M`.
fn compact(value: f64) -> String {
    let (scaled, suffix) = if value >= 1e6 {
        (value / 1e6, "M")
    } else if value >= 1e3 {
        (value / 1e3, "k")
    } else {
        (value, "")
    };
    let text = format!("{scaled:.1}");
    let text = text.strip_suffix(".0").unwrap_or(&text);
    format!("{text}{suffix}")
}

fn escape(text: &str) -> String {
    text.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ceilings_are_round_numbers() {
        assert_eq!(nice_ceiling(0.0), 1.0);
        assert_eq!(nice_ceiling(7.0), 10.0);
        assert_eq!(nice_ceiling(1234.0), 2000.0);
        assert_eq!(nice_ceiling(201_855.0), 250_000.0);
        assert_eq!(nice_ceiling(5000.0), 5000.0);
        assert_eq!(nice_ceiling(50_001.0), 100_000.0);
    }

    #[test]
    fn values_are_compact() {
        assert_eq!(compact(0.0), "0");
        assert_eq!(compact(1500.0), "1.5k");
        assert_eq!(compact(2_000_000.0), "2M");
        assert_eq!(compact(999.0), "999");
    }

    #[test]
    fn names_are_escaped() {
        assert_eq!(escape(r#"a<b & "c">"#), "a&lt;b &amp; &quot;c&quot;&gt;");
    }
}
