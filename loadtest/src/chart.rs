//! Small SVG line charts for the run summaries: no plotting library, one
//! function that draws axes with round ticks, lines and a legend.

use std::fmt::Write;

const W: f64 = 820.0;
const H: f64 = 460.0;
const LEFT: f64 = 80.0;
const RIGHT: f64 = 24.0;
const TOP: f64 = 44.0;
const BOTTOM: f64 = 56.0;
const COLORS: [&str; 6] = ["#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b"];

/// How x values are placed.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum XScale {
    Linear,
    /// x is a quantile in [0, 1): placed at -log10(1 - q), ticked 0%, 90%, 99%, 99.9%, …
    Percentile,
}

pub struct Series {
    pub name: String,
    pub points: Vec<(f64, f64)>,
}

pub struct Chart {
    pub title: String,
    pub x_label: String,
    pub y_label: String,
    pub x_scale: XScale,
    pub series: Vec<Series>,
}

impl Chart {
    pub fn new(title: &str, x_label: &str, y_label: &str, x_scale: XScale) -> Chart {
        Chart { title: title.into(), x_label: x_label.into(), y_label: y_label.into(), x_scale, series: Vec::new() }
    }

    pub fn series(mut self, name: &str, points: Vec<(f64, f64)>) -> Chart {
        self.series.push(Series { name: name.into(), points });
        self
    }

    fn x_of(&self, x: f64) -> f64 {
        match self.x_scale {
            XScale::Linear => x,
            XScale::Percentile => -(1.0 - x.clamp(0.0, 1.0 - 1e-9)).log10(),
        }
    }

    /// The SVG document.
    pub fn render(&self) -> String {
        let xs = self.series.iter().flat_map(|s| s.points.iter().map(|p| self.x_of(p.0)));
        let ys = self.series.iter().flat_map(|s| s.points.iter().map(|p| p.1));
        let (x0, x1) = bounds(xs, self.x_scale == XScale::Linear);
        let (_, y1) = bounds(ys, true);
        let y_ticks = nice_ticks(0.0, y1);
        let y_top = *y_ticks.last().unwrap_or(&1.0);
        let x_ticks: Vec<(f64, String)> = match self.x_scale {
            XScale::Linear => nice_ticks(x0, x1).into_iter().map(|t| (t, label(t))).collect(),
            XScale::Percentile => (0..=x1.ceil() as i32).map(|d| (d as f64, percent_label(d))).collect(),
        };
        let x_hi = x_ticks.last().map_or(x1, |t| t.0.max(x1));
        let x_lo = x_ticks.first().map_or(x0, |t| t.0.min(x0));
        let pw = W - LEFT - RIGHT;
        let ph = H - TOP - BOTTOM;
        let px = |x: f64| LEFT + (x - x_lo) / (x_hi - x_lo).max(1e-12) * pw;
        let py = |y: f64| TOP + ph - y / y_top.max(1e-12) * ph;

        let mut svg = String::new();
        let _ = write!(
            svg,
            r#"<svg xmlns="http://www.w3.org/2000/svg" width="{W}" height="{H}" viewBox="0 0 {W} {H}" font-family="sans-serif" font-size="12">"#
        );
        let _ = write!(svg, r#"<rect width="{W}" height="{H}" fill="white"/>"#);
        let _ = write!(
            svg,
            r#"<text x="{}" y="24" text-anchor="middle" font-size="15">{}</text>"#,
            W / 2.0,
            esc(&self.title)
        );
        for &t in &y_ticks {
            let y = py(t);
            let _ = write!(svg, r##"<line x1="{LEFT}" y1="{y:.1}" x2="{}" y2="{y:.1}" stroke="#e5e5e5"/>"##, W - RIGHT);
            let _ = write!(svg, r#"<text x="{}" y="{:.1}" text-anchor="end">{}</text>"#, LEFT - 6.0, y + 4.0, label(t));
        }
        for (t, text) in &x_ticks {
            let x = px(*t);
            let _ = write!(svg, r##"<line x1="{x:.1}" y1="{TOP}" x2="{x:.1}" y2="{}" stroke="#e5e5e5"/>"##, TOP + ph);
            let _ =
                write!(svg, r#"<text x="{x:.1}" y="{}" text-anchor="middle">{}</text>"#, TOP + ph + 18.0, esc(text));
        }
        let _ = write!(
            svg,
            r#"<rect x="{LEFT}" y="{TOP}" width="{pw}" height="{ph}" fill="none" stroke="black"/><text x="{}" y="{}" text-anchor="middle">{}</text><text transform="translate(18 {}) rotate(-90)" text-anchor="middle">{}</text>"#,
            LEFT + pw / 2.0,
            H - 12.0,
            esc(&self.x_label),
            TOP + ph / 2.0,
            esc(&self.y_label)
        );
        for (i, s) in self.series.iter().enumerate() {
            let color = COLORS[i % COLORS.len()];
            let path: Vec<String> =
                s.points.iter().map(|&(x, y)| format!("{:.1},{:.1}", px(self.x_of(x)), py(y))).collect();
            let _ =
                write!(svg, r#"<polyline fill="none" stroke="{color}" stroke-width="2" points="{}"/>"#, path.join(" "));
            let ly = TOP + 16.0 + i as f64 * 18.0;
            let _ = write!(
                svg,
                r#"<line x1="{}" y1="{ly}" x2="{}" y2="{ly}" stroke="{color}" stroke-width="3"/><text x="{}" y="{}">{}</text>"#,
                LEFT + 12.0,
                LEFT + 36.0,
                LEFT + 42.0,
                ly + 4.0,
                esc(&s.name)
            );
        }
        svg.push_str("</svg>\n");
        svg
    }
}

fn bounds(values: impl Iterator<Item = f64>, from_zero: bool) -> (f64, f64) {
    let (mut lo, mut hi) = (f64::INFINITY, f64::NEG_INFINITY);
    for v in values.filter(|v| v.is_finite()) {
        lo = lo.min(v);
        hi = hi.max(v);
    }
    if !lo.is_finite() {
        return (0.0, 1.0);
    }
    if from_zero {
        lo = lo.min(0.0);
    }
    if hi <= lo {
        hi = lo + 1.0;
    }
    (lo, hi)
}

/// Round ticks (steps of 1, 2 or 5 × 10^n) covering `lo..=hi`.
pub fn nice_ticks(lo: f64, hi: f64) -> Vec<f64> {
    let raw = (hi - lo) / 6.0;
    let mag = 10f64.powf(raw.log10().floor());
    let step = [1.0, 2.0, 5.0, 10.0].iter().map(|m| m * mag).find(|s| *s >= raw).unwrap_or(10.0 * mag);
    let first = (lo / step).floor() * step;
    let mut ticks = Vec::new();
    let mut t = first;
    while t < hi + step * 0.999 {
        ticks.push(t);
        t += step;
        if ticks.len() > 50 {
            break;
        }
    }
    ticks
}

fn label(v: f64) -> String {
    if v.abs() >= 1e6 {
        format!("{}M", trim(v / 1e6))
    } else if v.abs() >= 1e4 {
        format!("{}k", trim(v / 1e3))
    } else {
        trim(v)
    }
}

fn trim(v: f64) -> String {
    let s = format!("{v:.3}");
    s.trim_end_matches('0').trim_end_matches('.').to_string()
}

fn percent_label(nines: i32) -> String {
    match nines {
        0 => "0%".into(),
        n => format!("{}%", trim(100.0 - 100.0 / 10f64.powi(n))),
    }
}

fn esc(s: &str) -> String {
    s.replace('&', "&amp;").replace('<', "&lt;").replace('>', "&gt;")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ticks_are_round_and_cover_the_range() {
        assert_eq!(nice_ticks(0.0, 9.3), vec![0.0, 2.0, 4.0, 6.0, 8.0, 10.0]);
        assert_eq!(percent_label(3), "99.9%");
        let svg = Chart::new("t", "x", "y", XScale::Percentile).series("a <b>", vec![(0.0, 1.0), (0.99, 5.0)]).render();
        assert!(svg.starts_with("<svg") && svg.contains("99%") && svg.contains("a &lt;b&gt;"));
    }
}
