//! The lag chart of `agentd bench`: the cumulative distribution of scheduling lag per
//! scenario, as a self-contained SVG (no plotting dependency: a few lines and labels). The
//! lag axis is logarithmic (decades of milliseconds), so a steady rate's few milliseconds
//! and a burst's second show on one chart.

use std::fmt::Write;

const WIDTH: f64 = 720.0;
const HEIGHT: f64 = 420.0;
const LEFT: f64 = 70.0;
const RIGHT: f64 = 20.0;
const TOP: f64 = 40.0;
const BOTTOM: f64 = 60.0;
const COLOURS: [&str; 4] = ["#1f77b4", "#d62728", "#2ca02c", "#9467bd"];

/// A "nice" axis maximum at or above `value` (1, 2 or 5 times a power of ten).
fn nice_ceiling(value: f64) -> f64 {
    if value <= 0.0 || !value.is_finite() {
        return 1.0;
    }
    let power = 10f64.powf(value.log10().floor());
    for step in [1.0, 2.0, 5.0, 10.0] {
        if step * power >= value {
            return step * power;
        }
    }
    10.0 * power
}

fn escape(text: &str) -> String {
    text.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
}

/// The chart: one curve per `(label, sorted lags in seconds)`; x in milliseconds.
pub fn lag_cdf_svg(title: &str, series: &[(String, Vec<f64>)]) -> String {
    let max_ms = series
        .iter()
        .filter_map(|(_, lags)| lags.last())
        .fold(0.0f64, |max, lag| max.max(lag * 1000.0));
    // Decades from 1 ms (everything faster is drawn at 1 ms) to the one above the maximum.
    let decades = nice_ceiling(max_ms).max(10.0).log10().ceil().max(1.0);
    let plot_w = WIDTH - LEFT - RIGHT;
    let plot_h = HEIGHT - TOP - BOTTOM;
    let x = |ms: f64| LEFT + (ms.max(1.0).log10() / decades).clamp(0.0, 1.0) * plot_w;
    let y = |fraction: f64| TOP + (1.0 - fraction) * plot_h;

    let mut svg = String::new();
    let _ = writeln!(
        svg,
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{WIDTH}" height="{HEIGHT}" viewBox="0 0 {WIDTH} {HEIGHT}" font-family="sans-serif" font-size="12">"#
    );
    let _ = writeln!(
        svg,
        r#"<rect width="{WIDTH}" height="{HEIGHT}" fill="white"/><text x="{}" y="22" text-anchor="middle" font-size="15">{}</text>"#,
        WIDTH / 2.0,
        escape(title)
    );
    // Grid and ticks: a vertical line per decade, a horizontal one per 20%.
    for decade in 0..=decades as i32 {
        let ms = 10f64.powi(decade);
        let _ = writeln!(
            svg,
            r##"<line x1="{x0:.1}" y1="{TOP}" x2="{x0:.1}" y2="{y0:.1}" stroke="#ddd"/><text x="{x0:.1}" y="{ty:.1}" text-anchor="middle">{ms}</text>"##,
            x0 = x(ms),
            y0 = TOP + plot_h,
            ty = TOP + plot_h + 18.0,
            ms = format_ms(ms)
        );
    }
    for tick in 0..=5 {
        let fraction = f64::from(tick) / 5.0;
        let _ = writeln!(
            svg,
            r##"<line x1="{LEFT}" y1="{y0:.1}" x2="{x1:.1}" y2="{y0:.1}" stroke="#ddd"/><text x="{tx:.1}" y="{ty:.1}" text-anchor="end">{p}%</text>"##,
            y0 = y(fraction),
            x1 = LEFT + plot_w,
            tx = LEFT - 8.0,
            ty = y(fraction) + 4.0,
            p = tick * 20
        );
    }
    let _ = writeln!(
        svg,
        r#"<rect x="{LEFT}" y="{TOP}" width="{plot_w}" height="{plot_h}" fill="none" stroke="black"/>"#
    );
    let _ = writeln!(
        svg,
        r#"<text x="{}" y="{}" text-anchor="middle">scheduling lag, ms, log scale (start_time − scheduled_for)</text>"#,
        LEFT + plot_w / 2.0,
        HEIGHT - 15.0
    );
    let _ = writeln!(
        svg,
        r#"<text x="16" y="{}" text-anchor="middle" transform="rotate(-90 16 {})">runs started by then</text>"#,
        TOP + plot_h / 2.0,
        TOP + plot_h / 2.0
    );
    // Curves: a step function through at most ~600 points.
    for (index, (label, lags)) in series.iter().enumerate() {
        if lags.is_empty() {
            continue;
        }
        let colour = COLOURS[index % COLOURS.len()];
        let stride = (lags.len() / 600).max(1);
        let mut points = format!("{:.1},{:.1}", x(lags[0] * 1000.0), y(0.0));
        for (position, lag) in lags.iter().enumerate() {
            if position % stride != 0 && position + 1 != lags.len() {
                continue;
            }
            let fraction = (position + 1) as f64 / lags.len() as f64;
            let _ = write!(points, " {:.1},{:.1}", x(lag * 1000.0), y(fraction));
        }
        let _ = writeln!(
            svg,
            r#"<polyline fill="none" stroke="{colour}" stroke-width="2" points="{points}"/>"#
        );
        let legend_y = TOP + 20.0 + index as f64 * 18.0;
        let _ = writeln!(
            svg,
            r#"<line x1="{lx0:.1}" y1="{legend_y:.1}" x2="{lx1:.1}" y2="{legend_y:.1}" stroke="{colour}" stroke-width="3"/><text x="{tx:.1}" y="{ty:.1}">{label}</text>"#,
            lx0 = LEFT + plot_w - 230.0,
            lx1 = LEFT + plot_w - 205.0,
            tx = LEFT + plot_w - 198.0,
            ty = legend_y + 4.0,
            label = escape(label)
        );
    }
    svg.push_str("</svg>\n");
    svg
}

fn format_ms(ms: f64) -> String {
    if ms >= 1000.0 {
        format!("{:.0} s", ms / 1000.0)
    } else {
        format!("{ms:.0}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn axis_maxima_are_round() {
        assert_eq!(nice_ceiling(0.0), 1.0);
        assert_eq!(nice_ceiling(3.2), 5.0);
        assert_eq!(nice_ceiling(120.0), 200.0);
        assert_eq!(nice_ceiling(1000.0), 1000.0);
    }

    #[test]
    fn draws_one_curve_per_series_with_its_label() {
        let svg = lag_cdf_svg(
            "lag <test>",
            &[
                ("burst".into(), vec![0.001, 0.002, 0.010]),
                ("steady".into(), vec![]),
            ],
        );
        assert!(svg.starts_with("<svg") && svg.trim_end().ends_with("</svg>"));
        assert_eq!(svg.matches("<polyline").count(), 1);
        assert!(svg.contains(">burst<") && svg.contains("lag &lt;test&gt;"));
    }
}
