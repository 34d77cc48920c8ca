//! `bench-plot [RESULTS_DIR]`: reads `scale.json` written by `bench/scale.py`
//! and draws `workers.png` (registration time, idle scheduler CPU and no-op
//! tasks/s against the number of workers) and `growth.png` (tasks/s and
//! scheduler bytes per task against the graph size), dask-rs beside Dask.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use plotters::coord::Shift;
use plotters::prelude::*;
use serde_json::Value;

/// One line of a chart.
struct Series {
    label: &'static str,
    color: RGBColor,
    points: Vec<(f64, f64)>,
}

const DASK_RS: RGBColor = RGBColor(214, 95, 0);
const DASK: RGBColor = RGBColor(31, 119, 180);

/// The fonts people have: DejaVu (Debian's fonts-dejavu-core) or Liberation.
fn register_font() -> Result<()> {
    let candidates = [
        "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf",
        "/usr/share/fonts/truetype/liberation/LiberationSans-Regular.ttf",
        "/usr/share/fonts/TTF/DejaVuSans.ttf",
    ];
    for c in candidates {
        if let Ok(bytes) = std::fs::read(c) {
            let bytes: &'static [u8] = Box::leak(bytes.into_boxed_slice());
            plotters::style::register_font("sans-serif", FontStyle::Normal, bytes)
                .map_err(|_| anyhow::anyhow!("{c}: not a font"))?;
            return Ok(());
        }
    }
    bail!("no TrueType font found (install fonts-dejavu-core)")
}

/// `(x, y)` of the rows of `system` where both fields are numbers.
fn points(rows: &[Value], system: &str, x: &str, y: &str) -> Vec<(f64, f64)> {
    rows.iter().filter(|r| r["system"] == system).filter_map(|r| Some((r[x].as_f64()?, r[y].as_f64()?))).collect()
}

/// A chart with a log x axis (and a log y axis when `log_y`).
fn chart(
    area: &DrawingArea<BitMapBackend, Shift>,
    title: &str,
    x_label: &str,
    y_label: &str,
    series: &[Series],
    log_y: bool,
) -> Result<()> {
    let all: Vec<(f64, f64)> = series.iter().flat_map(|s| s.points.iter().copied()).collect();
    if all.is_empty() {
        return Ok(());
    }
    let (xmin, xmax) = all.iter().fold((f64::MAX, f64::MIN), |(a, b), p| (a.min(p.0), b.max(p.0)));
    let (ymin, ymax) = all.iter().fold((f64::MAX, f64::MIN), |(a, b), p| (a.min(p.1), b.max(p.1)));
    let x = (xmin / 1.5)..(xmax * 1.5);
    let mut builder = ChartBuilder::on(area);
    builder.caption(title, ("sans-serif", 22)).margin(14).x_label_area_size(44).y_label_area_size(70);
    // One decimal where the whole number would round (9,500 is "9.5k", not
    // a second "10k" on a log axis).
    let short = |v: f64, unit: &str| {
        if (v - v.round()).abs() < 1e-6 * v.abs().max(1.0) {
            format!("{v:.0}{unit}")
        } else {
            format!("{v:.1}{unit}")
        }
    };
    let fmt_num = |v: &f64| {
        if *v >= 1e6 {
            short(v / 1e6, "M")
        } else if *v >= 1e3 {
            short(v / 1e3, "k")
        } else if *v >= 10.0 {
            format!("{v:.0}")
        } else {
            format!("{v:.2}").trim_end_matches('0').trim_end_matches('.').to_string()
        }
    };
    macro_rules! draw {
        ($chart:expr) => {{
            let mut c = $chart;
            c.configure_mesh()
                .x_desc(x_label)
                .y_desc(y_label)
                .x_label_formatter(&fmt_num)
                .y_label_formatter(&fmt_num)
                .label_style(("sans-serif", 14))
                .light_line_style(TRANSPARENT)
                .draw()?;
            for s in series {
                let color = s.color;
                c.draw_series(LineSeries::new(s.points.iter().copied(), color.stroke_width(3)))?
                    .label(s.label)
                    .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], color.stroke_width(3)));
                c.draw_series(s.points.iter().map(|p| Circle::new(*p, 4, color.filled())))?;
            }
            c.configure_series_labels()
                .background_style(WHITE.mix(0.8))
                .border_style(BLACK)
                .label_font(("sans-serif", 15))
                .position(SeriesLabelPosition::UpperLeft)
                .draw()?;
        }};
    }
    if log_y {
        draw!(builder.build_cartesian_2d(x.log_scale(), ((ymin / 2.0).max(1e-3)..ymax * 2.0).log_scale())?);
    } else {
        draw!(builder.build_cartesian_2d(x.log_scale(), 0.0..ymax * 1.15)?);
    }
    Ok(())
}

fn two(rows: &[Value], x: &str, y: &str) -> Vec<Series> {
    vec![
        Series { label: "dask-rs", color: DASK_RS, points: points(rows, "dask-rs", x, y) },
        Series { label: "Dask distributed", color: DASK, points: points(rows, "dask", x, y) },
    ]
}

fn draw(dir: &Path) -> Result<()> {
    let path = dir.join("scale.json");
    let report: Value =
        serde_json::from_str(&std::fs::read_to_string(&path).with_context(|| format!("reading {}", path.display()))?)?;
    let empty = Vec::new();
    let workers = report["workers"].as_array().unwrap_or(&empty);
    let growth = report["growth"].as_array().unwrap_or(&empty);

    let out = dir.join("workers.png");
    let root = BitMapBackend::new(&out, (1500, 480)).into_drawing_area();
    root.fill(&WHITE)?;
    let panels = root.split_evenly((1, 3));
    chart(
        &panels[0],
        "Time until all workers registered",
        "workers",
        "seconds",
        &two(workers, "n", "registered"),
        true,
    )?;
    chart(
        &panels[1],
        "Idle scheduler CPU (heartbeats)",
        "workers",
        "% of one core",
        &two(workers, "n", "idle_cpu"),
        false,
    )?;
    chart(&panels[2], "No-op tasks per second", "workers", "tasks/s", &two(workers, "n", "tasks_per_s"), true)?;
    root.present()?;

    let out2 = dir.join("growth.png");
    let root = BitMapBackend::new(&out2, (1000, 480)).into_drawing_area();
    root.fill(&WHITE)?;
    let panels = root.split_evenly((1, 2));
    chart(&panels[0], "No-op map + gather", "tasks in the graph", "tasks/s", &two(growth, "n", "tasks_per_s"), true)?;
    chart(
        &panels[1],
        "Scheduler peak memory per task",
        "tasks in the graph",
        "bytes per task",
        &two(growth, "n", "bytes_per_task"),
        true,
    )?;
    root.present()?;
    println!("wrote {} and {}", out.display(), out2.display());
    Ok(())
}

fn main() -> Result<()> {
    register_font()?;
    let dir = std::env::args().nth(1).map(PathBuf::from).unwrap_or_else(|| PathBuf::from("bench/results"));
    draw(&dir)
}
