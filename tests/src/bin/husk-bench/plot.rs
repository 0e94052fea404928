//! The benchmark plots, written as plain SVG (which GitHub renders in Markdown): strip plots
//! (every sample a dot, the median a bar) on a linear or logarithmic axis, bar charts of one
//! value per runtime, and line plots over a count. One colour per runtime name, the same in
//! every plot, so a reader learns them once.

use std::fmt::Write;

const WIDTH: f64 = 760.0;
const LEFT: f64 = 90.0;
const RIGHT: f64 = 110.0;
const ROW: f64 = 18.0;
const TITLE: f64 = 24.0;
const AXIS: f64 = 26.0;
const LINE_PANEL: f64 = 240.0;

/// A runtime's colour, fixed by its name.
pub(crate) fn color(name: &str) -> &'static str {
    match name {
        "husk" => "#d62728",
        "husk-cold" => "#ff7f0e",
        "runc" => "#1f77b4",
        "crun" => "#2ca02c",
        "runsc" => "#9467bd",
        _ => "#7f7f7f",
    }
}

/// One panel: a title, the unit of its axis, and the samples of each runtime in order.
pub(crate) struct Panel {
    pub(crate) title: String,
    pub(crate) unit: &'static str,
    pub(crate) series: Vec<(String, Vec<f64>)>,
}

/// Points over a count (x), one line per runtime.
pub(crate) struct LinePanel {
    pub(crate) title: String,
    pub(crate) x_label: &'static str,
    pub(crate) log_y: bool,
    pub(crate) series: Vec<(String, Vec<(f64, f64)>)>,
}

/// A value axis: linear from 0, or logarithmic over whole decades.
struct Axis {
    lo: f64,
    hi: f64,
    log: bool,
}

impl Axis {
    fn new(values: impl Iterator<Item = f64>, log: bool) -> Axis {
        let (mut min, mut max) = (f64::INFINITY, 0.0f64);
        for v in values.filter(|v| v.is_finite() && (!log || *v > 0.0)) {
            min = min.min(v);
            max = max.max(v);
        }
        if log {
            if !min.is_finite() {
                return Axis {
                    lo: 1.0,
                    hi: 10.0,
                    log,
                };
            }
            let lo = 10f64.powf(min.log10().floor());
            let hi = 10f64.powf(max.log10().ceil()).max(lo * 10.0);
            Axis { lo, hi, log }
        } else {
            let step = nice_step(max.max(1e-9) / 5.0);
            Axis {
                lo: 0.0,
                hi: (max / step).ceil().max(1.0) * step,
                log,
            }
        }
    }

    /// Where `v` falls between the axis' ends, 0 to 1 (clamped).
    fn frac(&self, v: f64) -> f64 {
        let f = if self.log {
            (v.max(self.lo).log10() - self.lo.log10()) / (self.hi.log10() - self.lo.log10())
        } else {
            (v - self.lo) / (self.hi - self.lo)
        };
        f.clamp(0.0, 1.0)
    }

    fn ticks(&self) -> Vec<f64> {
        if self.log {
            let mut ticks = Vec::new();
            let mut decade = self.lo;
            while decade <= self.hi * 1.0001 {
                for m in [1.0, 2.0, 5.0] {
                    let t = decade * m;
                    if t <= self.hi * 1.0001 {
                        ticks.push(t);
                    }
                }
                decade *= 10.0;
            }
            ticks
        } else {
            let step = nice_step(self.hi / 5.0);
            (0..=((self.hi / step).round() as usize))
                .map(|i| i as f64 * step)
                .collect()
        }
    }
}

/// 1, 2 or 5 times a power of ten, at least `raw`.
fn nice_step(raw: f64) -> f64 {
    let p = 10f64.powf(raw.log10().floor());
    [1.0, 2.0, 5.0, 10.0]
        .iter()
        .map(|m| m * p)
        .find(|s| *s >= raw * 0.999)
        .unwrap_or(10.0 * p)
}

/// A number as an axis or value label: no more digits than it needs.
pub(crate) fn num(v: f64) -> String {
    let a = v.abs();
    if a >= 100.0 || a == 0.0 {
        format!("{v:.0}")
    } else if a >= 10.0 {
        format!("{v:.1}")
    } else if a >= 0.1 {
        format!("{v:.2}")
    } else {
        // Two significant digits, no trailing zeros: 0.04, 0.0018.
        let decimals = (-a.log10().floor()) as usize + 1;
        let text = format!("{v:.decimals$}");
        text.trim_end_matches('0').trim_end_matches('.').to_string()
    }
}

/// An axis tick: whole numbers without decimals.
fn tick(v: f64) -> String {
    if v.fract() == 0.0 {
        format!("{v:.0}")
    } else {
        num(v)
    }
}

fn esc(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('`', "")
}

fn document(height: f64, body: &str) -> String {
    format!(
        "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{WIDTH}\" height=\"{height:.0}\" \
         font-family=\"sans-serif\" font-size=\"12\">\n\
         <rect width=\"100%\" height=\"100%\" fill=\"white\"/>\n{body}</svg>\n"
    )
}

/// A horizontal axis under rows that end at `y`.
fn x_axis(body: &mut String, axis: &Axis, y: f64, unit: &str) {
    let plot_w = WIDTH - LEFT - RIGHT;
    let _ = writeln!(
        body,
        "<line x1=\"{LEFT}\" x2=\"{:.1}\" y1=\"{y:.1}\" y2=\"{y:.1}\" stroke=\"#888\"/>",
        LEFT + plot_w
    );
    for t in axis.ticks() {
        let x = LEFT + axis.frac(t) * plot_w;
        let _ = writeln!(
            body,
            "<line x1=\"{x:.1}\" x2=\"{x:.1}\" y1=\"{y:.1}\" y2=\"{:.1}\" stroke=\"#888\"/>\
             <text x=\"{x:.1}\" y=\"{:.1}\" font-size=\"10\" text-anchor=\"middle\">{}</text>",
            y + 4.0,
            y + 15.0,
            tick(t)
        );
    }
    let _ = writeln!(
        body,
        "<text x=\"{:.1}\" y=\"{:.1}\" font-size=\"10\">{}{}</text>",
        LEFT + plot_w + 24.0,
        y + 15.0,
        esc(unit),
        if axis.log { " (log)" } else { "" }
    );
}

/// Panels one above the other: each its title, a row per runtime drawn by `row` (given the
/// panel's axis, the row's samples, colour and top), and the panel's axis under them.
fn stacked(
    panels: &[Panel],
    axis_of: impl Fn(&Panel) -> Axis,
    row: impl Fn(&mut String, &Panel, &Axis, &[f64], &str, f64),
) -> String {
    let mut body = String::new();
    let mut y = 0.0;
    for panel in panels.iter().filter(|p| !p.series.is_empty()) {
        let axis = axis_of(panel);
        let _ = writeln!(
            body,
            "<text x=\"4\" y=\"{:.1}\" font-weight=\"bold\">{}</text>",
            y + 16.0,
            esc(&panel.title)
        );
        y += TITLE;
        for (name, values) in &panel.series {
            let c = color(name);
            let _ = writeln!(
                body,
                "<text x=\"{:.1}\" y=\"{:.1}\" text-anchor=\"end\" fill=\"{c}\">{}</text>",
                LEFT - 6.0,
                y + ROW / 2.0 + 4.0,
                esc(name)
            );
            row(&mut body, panel, &axis, values, c, y);
            y += ROW;
        }
        x_axis(&mut body, &axis, y + 2.0, panel.unit);
        y += AXIS + 8.0;
    }
    document(y, &body)
}

/// Strip plots: per panel a row per runtime, a dot per sample and a bar at the median (written
/// beside the row), on one axis per panel.
pub(crate) fn strip(panels: &[Panel], log: bool) -> String {
    let plot_w = WIDTH - LEFT - RIGHT;
    stacked(
        panels,
        |panel| {
            Axis::new(
                panel.series.iter().flat_map(|(_, v)| v.iter().copied()),
                log,
            )
        },
        |body, panel, axis, values, c, y| {
            let mid = y + ROW / 2.0;
            for v in values {
                let _ = writeln!(
                    body,
                    "<circle cx=\"{:.1}\" cy=\"{mid:.1}\" r=\"2.5\" fill=\"{c}\" fill-opacity=\"0.45\"/>",
                    LEFT + axis.frac(*v) * plot_w
                );
            }
            if !values.is_empty() {
                let median = husk_tests::stats(values).0;
                let x = LEFT + axis.frac(median) * plot_w;
                let _ = writeln!(
                    body,
                    "<line x1=\"{x:.1}\" x2=\"{x:.1}\" y1=\"{:.1}\" y2=\"{:.1}\" stroke=\"black\" stroke-width=\"2\"/>\
                     <text x=\"{:.1}\" y=\"{:.1}\" font-size=\"11\">{} {}</text>",
                    mid - 7.0,
                    mid + 7.0,
                    LEFT + plot_w + 8.0,
                    mid + 4.0,
                    num(median),
                    esc(panel.unit)
                );
            }
        },
    )
}

/// Bar charts: per panel a bar per runtime (its first value), linear from 0, the value written
/// at the bar's end.
pub(crate) fn bars(panels: &[Panel]) -> String {
    let plot_w = WIDTH - LEFT - RIGHT;
    let value = |v: &[f64]| v.first().copied().unwrap_or(0.0);
    stacked(
        panels,
        |panel| Axis::new(panel.series.iter().map(|(_, v)| value(v)), false),
        |body, panel, axis, values, c, y| {
            let v = value(values);
            let w = axis.frac(v) * plot_w;
            let _ = writeln!(
                body,
                "<rect x=\"{LEFT}\" y=\"{:.1}\" width=\"{w:.1}\" height=\"{:.1}\" fill=\"{c}\"/>\
                 <text x=\"{:.1}\" y=\"{:.1}\" font-size=\"11\">{} {}</text>",
                y + 3.0,
                ROW - 6.0,
                LEFT + w + 4.0,
                y + ROW / 2.0 + 4.0,
                num(v),
                esc(panel.unit)
            );
        },
    )
}

/// Line plots over a count from 0 to the largest x, one panel above the other.
pub(crate) fn lines(panels: &[LinePanel]) -> String {
    const TOP: f64 = 30.0;
    const BOTTOM: f64 = 30.0;
    let plot_w = WIDTH - LEFT - RIGHT;
    let plot_h = LINE_PANEL - TOP - BOTTOM;
    let max_x = panels
        .iter()
        .flat_map(|p| p.series.iter().flat_map(|(_, s)| s.iter().map(|p| p.0)))
        .fold(1.0f64, f64::max);
    let mut body = String::new();
    for (i, panel) in panels.iter().enumerate() {
        let y0 = i as f64 * LINE_PANEL;
        let axis = Axis::new(
            panel.series.iter().flat_map(|(_, s)| s.iter().map(|p| p.1)),
            panel.log_y,
        );
        let x = |v: f64| LEFT + v / max_x * plot_w;
        let y = |v: f64| y0 + TOP + plot_h - axis.frac(v) * plot_h;
        let _ = writeln!(
            body,
            "<text x=\"4\" y=\"{:.1}\" font-weight=\"bold\">{}{}</text>\n\
             <line x1=\"{LEFT}\" x2=\"{LEFT}\" y1=\"{:.1}\" y2=\"{:.1}\" stroke=\"#888\"/>\n\
             <line x1=\"{LEFT}\" x2=\"{:.1}\" y1=\"{:.1}\" y2=\"{:.1}\" stroke=\"#888\"/>\n\
             <text x=\"{:.1}\" y=\"{:.1}\" font-size=\"10\" text-anchor=\"end\">{} {}</text>",
            y0 + 18.0,
            esc(&panel.title),
            if panel.log_y { " (log scale)" } else { "" },
            y(axis.hi),
            y(axis.lo),
            LEFT + plot_w,
            y(axis.lo),
            y(axis.lo),
            LEFT + plot_w,
            y(axis.lo) + 14.0,
            num(max_x),
            panel.x_label,
        );
        for t in axis.ticks() {
            let _ = writeln!(
                body,
                "<line x1=\"{:.1}\" x2=\"{LEFT}\" y1=\"{:.1}\" y2=\"{:.1}\" stroke=\"#888\"/>\
                 <text x=\"{:.1}\" y=\"{:.1}\" font-size=\"10\" text-anchor=\"end\">{}</text>",
                LEFT - 4.0,
                y(t),
                y(t),
                LEFT - 6.0,
                y(t) + 3.5,
                tick(t)
            );
        }
        for (j, (name, points)) in panel.series.iter().enumerate() {
            let c = color(name);
            let path: Vec<String> = points
                .iter()
                .filter(|p| !panel.log_y || p.1 > 0.0)
                .map(|(px, py)| format!("{:.1},{:.1}", x(*px), y(*py)))
                .collect();
            let _ = writeln!(
                body,
                "<polyline fill=\"none\" stroke=\"{c}\" stroke-width=\"1.5\" points=\"{}\"/>\n\
                 <text x=\"{:.1}\" y=\"{:.1}\" fill=\"{c}\">{}</text>",
                path.join(" "),
                LEFT + plot_w + 8.0,
                y0 + TOP + 14.0 * (j as f64 + 1.0),
                esc(name)
            );
        }
    }
    document(panels.len() as f64 * LINE_PANEL, &body)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_log_axis_spans_whole_decades_with_one_two_five_ticks() {
        let axis = Axis::new([85.0, 1257.0, 66000.0].into_iter(), true);
        assert_eq!((axis.lo, axis.hi), (10.0, 100000.0));
        let ticks = axis.ticks();
        assert_eq!(ticks.first(), Some(&10.0));
        assert!(ticks.contains(&500.0) && ticks.contains(&100000.0));
        assert!((axis.frac(1000.0) - 0.5).abs() < 1e-9);
        // Values off the axis (zero on a log axis) sit at its end, never outside the plot.
        assert_eq!(axis.frac(0.0), 0.0);
    }

    #[test]
    fn numbers_keep_two_significant_digits_at_most_below_ten() {
        assert_eq!(num(1257.4), "1257");
        assert_eq!(num(29.64), "29.6");
        assert_eq!(num(2.634), "2.63");
        assert_eq!(num(0.04), "0.04");
        assert_eq!(num(0.00183), "0.0018");
        assert_eq!(tick(20.0), "20");
        assert_eq!(tick(0.5), "0.50");
    }

    #[test]
    fn a_linear_axis_starts_at_zero_and_ends_on_a_round_number() {
        let axis = Axis::new([3.2, 29.6, 38.2].into_iter(), false);
        assert_eq!((axis.lo, axis.hi), (0.0, 40.0));
        assert_eq!(axis.ticks(), vec![0.0, 10.0, 20.0, 30.0, 40.0]);
    }

    #[test]
    fn plots_escape_their_labels_and_draw_every_sample() {
        let svg = strip(
            &[Panel {
                title: "`run` of <true>".into(),
                unit: "ms",
                series: vec![
                    ("husk".into(), vec![1.0, 2.0, 3.0]),
                    ("runc".into(), vec![]),
                ],
            }],
            true,
        );
        assert!(svg.contains("run of &lt;true&gt;"));
        assert_eq!(svg.matches("<circle").count(), 3);
        assert!(svg.starts_with("<svg") && svg.ends_with("</svg>\n"));
    }
}
