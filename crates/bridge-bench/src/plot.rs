//! A small SVG line chart for benchmark results: one panel per series group,
//! shared time axis. Written by hand because what it draws is two panels of
//! polylines; a plotting crate would bring a font stack for axis labels that
//! an SVG viewer renders anyway.

use std::fmt::Write;

pub struct Series<'a> {
    pub name: &'a str,
    pub colour: &'a str,
    /// (seconds since start, value)
    pub points: Vec<(f64, f64)>,
}

pub struct Panel<'a> {
    pub title: &'a str,
    pub unit: &'a str,
    pub series: Vec<Series<'a>>,
}

const WIDTH: f64 = 900.0;
const PANEL_HEIGHT: f64 = 260.0;
const LEFT: f64 = 70.0;
const RIGHT: f64 = 160.0;
const TOP: f64 = 60.0;
const BOTTOM: f64 = 40.0;

pub fn svg(title: &str, panels: &[Panel<'_>]) -> String {
    let height = TOP + panels.len() as f64 * (PANEL_HEIGHT + BOTTOM) + 10.0;
    let x_max = panels
        .iter()
        .flat_map(|panel| panel.series.iter().flat_map(|series| series.points.iter().map(|(x, _)| *x)))
        .fold(1.0_f64, f64::max);
    let mut out = String::new();
    let _ = writeln!(
        out,
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{WIDTH}" height="{height}" font-family="sans-serif" font-size="12">"#
    );
    let _ = writeln!(out, r#"<rect width="100%" height="100%" fill="white"/>"#);
    let _ = writeln!(out, r#"<text x="{LEFT}" y="22" font-size="15" font-weight="bold">{}</text>"#, escape(title));
    let plot_width = WIDTH - LEFT - RIGHT;
    for (index, panel) in panels.iter().enumerate() {
        let top = TOP + index as f64 * (PANEL_HEIGHT + BOTTOM);
        let y_max = nice_ceiling(
            panel.series.iter().flat_map(|series| series.points.iter().map(|(_, y)| *y)).fold(0.0_f64, f64::max),
        );
        let to_x = |x: f64| LEFT + x / x_max * plot_width;
        let to_y = |y: f64| top + PANEL_HEIGHT - y / y_max * PANEL_HEIGHT;
        let _ = writeln!(
            out,
            r##"<rect x="{LEFT}" y="{top}" width="{plot_width}" height="{PANEL_HEIGHT}" fill="none" stroke="#888"/>"##
        );
        let _ = writeln!(
            out,
            r#"<text x="{LEFT}" y="{}" font-weight="bold">{} ({})</text>"#,
            top - 6.0,
            escape(panel.title),
            escape(panel.unit)
        );
        for tick in 0..=4 {
            let value = y_max * tick as f64 / 4.0;
            let y = to_y(value);
            let _ = writeln!(
                out,
                r##"<line x1="{LEFT}" x2="{}" y1="{y}" y2="{y}" stroke="#eee"/><text x="{}" y="{}" text-anchor="end">{}</text>"##,
                LEFT + plot_width,
                LEFT - 6.0,
                y + 4.0,
                format_value(value)
            );
        }
        for tick in 0..=5 {
            let value = x_max * tick as f64 / 5.0;
            let x = to_x(value);
            let _ = writeln!(
                out,
                r#"<text x="{x}" y="{}" text-anchor="middle">{:.0} s</text>"#,
                top + PANEL_HEIGHT + 16.0,
                value
            );
        }
        for (row, series) in panel.series.iter().enumerate() {
            let points: Vec<String> =
                series.points.iter().map(|(x, y)| format!("{:.1},{:.1}", to_x(*x), to_y(*y))).collect();
            let _ = writeln!(
                out,
                r#"<polyline fill="none" stroke="{}" stroke-width="1.6" points="{}"/>"#,
                series.colour,
                points.join(" ")
            );
            let legend_y = top + 14.0 + row as f64 * 18.0;
            let legend_x = LEFT + plot_width + 12.0;
            let _ = writeln!(
                out,
                r#"<line x1="{legend_x}" x2="{}" y1="{}" y2="{}" stroke="{}" stroke-width="3"/><text x="{}" y="{legend_y}">{}</text>"#,
                legend_x + 18.0,
                legend_y - 4.0,
                legend_y - 4.0,
                series.colour,
                legend_x + 24.0,
                escape(series.name)
            );
        }
    }
    out.push_str("</svg>\n");
    out
}

/// The smallest 1, 2 or 5 × 10^n at or above `value`.
fn nice_ceiling(value: f64) -> f64 {
    if value <= 0.0 {
        return 1.0;
    }
    let magnitude = 10f64.powf(value.log10().floor());
    [1.0, 2.0, 5.0, 10.0].into_iter().map(|step| step * magnitude).find(|ceiling| *ceiling >= value).unwrap_or(value)
}

fn format_value(value: f64) -> String {
    if value >= 10.0 || value == 0.0 {
        format!("{value:.0}")
    } else {
        format!("{value:.1}")
    }
}

fn escape(text: &str) -> String {
    text.replace('&', "&amp;").replace('<', "&lt;").replace('>', "&gt;")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ceilings_are_round() {
        assert_eq!(nice_ceiling(0.0), 1.0);
        assert_eq!(nice_ceiling(3.2), 5.0);
        assert_eq!(nice_ceiling(730.0), 1000.0);
        assert_eq!(nice_ceiling(1500.0), 2000.0);
    }

    #[test]
    fn draws_every_series_and_escapes_titles() {
        let chart = svg(
            "a < b",
            &[Panel {
                title: "rate",
                unit: "1/s",
                series: vec![Series { name: "done", colour: "red", points: vec![(0.0, 1.0), (1.0, 2.0)] }],
            }],
        );
        assert!(chart.contains("a &lt; b"));
        assert_eq!(chart.matches("<polyline").count(), 1);
        assert!(chart.ends_with("</svg>\n"));
    }
}
