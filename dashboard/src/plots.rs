//! The pictures, drawn server side with plotters as SVG. Each plot is a pure
//! function of the [`Model`]; hover details are `<title>`s on transparent
//! shapes laid over the plot (with `data-*` attributes naming what they
//! show), since plotters' SVG has none. Plots decimate so that their size
//! does not grow with the cluster: at most [`MAX_BARS`] bars, and task-stream
//! rectangles narrower than a pixel merged with their neighbours.

use std::fmt::Write;

use plotters::coord::Shift;
use plotters::prelude::*;
use plotters::style::text_anchor::{HPos, Pos, VPos};

use cluster::protocol::TaskStreamRecord;

use cluster::monitor::Model;

/// Most bars one bar chart draws; more rows are aggregated.
pub const MAX_BARS: usize = 64;
/// Most task-stream rows (worker threads) drawn.
pub const MAX_ROWS: usize = 256;

/// Category colours for task groups (a fixed palette, chosen by a hash of
/// the group name so a group keeps its colour across pages and runs).
const PALETTE: [RGBColor; 20] = [
    RGBColor(31, 119, 180),
    RGBColor(255, 127, 14),
    RGBColor(44, 160, 44),
    RGBColor(148, 103, 189),
    RGBColor(140, 86, 75),
    RGBColor(227, 119, 194),
    RGBColor(188, 189, 34),
    RGBColor(23, 190, 207),
    RGBColor(174, 199, 232),
    RGBColor(255, 187, 120),
    RGBColor(152, 223, 138),
    RGBColor(197, 176, 213),
    RGBColor(196, 156, 148),
    RGBColor(247, 182, 210),
    RGBColor(219, 219, 141),
    RGBColor(158, 218, 229),
    RGBColor(57, 59, 121),
    RGBColor(99, 121, 57),
    RGBColor(140, 109, 49),
    RGBColor(132, 60, 57),
];
// As Dask's task stream: transfers red, errors black.
const ERRED: RGBColor = RGBColor(40, 40, 40);
const TRANSFER: RGBColor = RGBColor(214, 39, 40);
/// Spills to disk (gold: apart from the groups' palette).
const SPILL: RGBColor = RGBColor(255, 215, 0);
const AXIS: RGBColor = RGBColor(128, 128, 128);
const WAITING: RGBColor = RGBColor(200, 200, 200);
const PROCESSING: RGBColor = RGBColor(120, 120, 120);
const SPILLED: RGBColor = RGBColor(140, 140, 200);
const UNMANAGED: RGBColor = RGBColor(170, 200, 230);
const MANAGED: RGBColor = RGBColor(31, 119, 180);

/// The colour of task group `name`.
pub fn group_color(name: &str) -> RGBColor {
    if name == cluster::protocol::SPILL_GROUP {
        return SPILL;
    }
    PALETTE[(cluster::human::stable_hash(name) % PALETTE.len() as u64) as usize]
}

/// Escape text for XML.
pub fn esc(s: &str) -> String {
    s.replace('&', "&amp;").replace('<', "&lt;").replace('>', "&gt;").replace('"', "&quot;")
}

pub use cluster::human::bytes as fmt_bytes;

/// Seconds for people: `12 ms`, `3.4 s`.
pub fn fmt_seconds(s: f64) -> String {
    if s < 1e-3 {
        format!("{:.0} us", s * 1e6)
    } else if s < 1.0 {
        format!("{:.0} ms", s * 1e3)
    } else {
        format!("{s:.1} s")
    }
}

/// A hover shape in pixels, with its tooltip and attributes.
struct Hover {
    x: i32,
    y: i32,
    w: i32,
    h: i32,
    class: &'static str,
    attrs: Vec<(&'static str, String)>,
    title: String,
}

/// Finish an SVG drawn by plotters: add the hover layer, a class and a
/// description for the whole picture.
fn finish(mut svg: String, class: &str, label: &str, hovers: &[Hover]) -> String {
    let mut layer = String::from("<g class=\"hover\">");
    for h in hovers {
        let _ = write!(
            layer,
            "<rect class=\"{}\" x=\"{}\" y=\"{}\" width=\"{}\" height=\"{}\" fill=\"transparent\"",
            h.class,
            h.x,
            h.y,
            h.w.max(1),
            h.h.max(1)
        );
        for (k, v) in &h.attrs {
            let _ = write!(layer, " data-{k}=\"{}\"", esc(v));
        }
        let _ = write!(layer, "><title>{}</title></rect>", esc(&h.title));
    }
    layer.push_str("</g></svg>");
    if let Some(end) = svg.rfind("</svg>") {
        svg.truncate(end);
    }
    svg.push_str(&layer);
    svg.replacen("<svg ", &format!("<svg class=\"plot {class}\" role=\"img\" aria-label=\"{}\" ", esc(label)), 1)
}

fn empty(width: u32, height: u32, class: &str, text: &str) -> String {
    format!(
        "<svg class=\"plot {class}\" width=\"{width}\" height=\"{height}\" xmlns=\"http://www.w3.org/2000/svg\">\
         <text x=\"{}\" y=\"{}\" text-anchor=\"middle\" fill=\"#808080\" font-family=\"sans-serif\" font-size=\"13\">{}</text></svg>",
        width / 2,
        height / 2,
        esc(text)
    )
}

fn axis_font<'a>() -> TextStyle<'a> {
    ("sans-serif", 11).into_font().color(&AXIS)
}

/// Row labels: right-aligned, centred on their row.
fn row_label<'a>() -> TextStyle<'a> {
    axis_font().pos(Pos::new(HPos::Right, VPos::Center))
}

/// `s` cut to `n` characters (with an ellipsis).
fn clip(s: &str, n: usize) -> String {
    if s.chars().count() <= n {
        s.to_string()
    } else {
        format!("{}…", s.chars().take(n - 1).collect::<String>())
    }
}

/// The task stream of the last `window` seconds: one row per worker thread,
/// one rectangle per task coloured by group, the transfer before it in
/// orange, erred tasks in red.
pub fn task_stream(model: &Model, window: f64, width: u32, height: u32) -> String {
    task_stream_range(model, window, 0.0, width, height)
}

/// The task stream of the `span` seconds that ended `ago` seconds before
/// the model's time (zoomed and panned views of `/tasks`).
pub fn task_stream_range(model: &Model, span: f64, ago: f64, width: u32, height: u32) -> String {
    let now = model.time;
    let window = span;
    let until = now - ago;
    let mut records: Vec<_> = model.recent(span + ago).filter(|r| r.start - r.transfer <= until).collect();
    // A busy cluster finishes more tasks in the window than there are
    // pixels: draw an even sample of them (the picture is the same, the
    // cost bounded).
    if records.len() > MAX_SAMPLED {
        let stride = records.len().div_ceil(MAX_SAMPLED);
        records = records.into_iter().step_by(stride).collect();
    }
    if records.is_empty() {
        return empty(width, height, "task-stream", "no tasks finished in this window");
    }
    // Rows: (worker, thread), sorted; beyond MAX_ROWS threads fold onto rows.
    let mut rows: Vec<(&str, u32)> = records.iter().map(|r| (r.worker.as_str(), r.thread)).collect();
    rows.sort();
    rows.dedup();
    // At least 3 pixels per row; more threads than that fold onto rows.
    let nrows = rows.len().min(MAX_ROWS).min((height as usize / 3).max(1));
    let row_of = |w: &str, t: u32| rows.binary_search(&(w, t)).unwrap_or(0) % nrows;
    let (x0, x1) = (-(span + ago), -ago);
    let px = window / width.max(1) as f64;
    let mut sorted: Vec<_> = records.iter().map(|r| (row_of(&r.worker, r.thread), *r)).collect();
    sorted.sort_by(|a, b| (a.0, a.1.start).partial_cmp(&(b.0, b.1.start)).unwrap_or(std::cmp::Ordering::Equal));
    // Merge, per row, consecutive tasks of one group less than a pixel
    // apart; while that leaves too many blocks, merge across groups with a
    // gap that doubles each time.
    let mut blocks = merge_blocks(&sorted, px, true);
    let mut gap = px;
    while blocks.len() > MAX_BLOCKS {
        blocks = merge_blocks(&sorted, gap, false);
        gap *= 2.0;
    }
    let mut svg = String::new();
    let mut hovers = Vec::new();
    {
        let root = SVGBackend::with_string(&mut svg, (width, height)).into_drawing_area();
        let drawn = (|| -> Result<(), Box<dyn std::error::Error + '_>> {
            let mut chart = ChartBuilder::on(&root)
                .margin(4)
                .x_label_area_size(22)
                .y_label_area_size(110)
                .build_cartesian_2d(x0..x1, 0.0..nrows as f64)?;
            chart
                .configure_mesh()
                .disable_mesh()
                .x_labels(6)
                .y_labels(0)
                .x_label_formatter(&|x| seconds_label(*x, window))
                .label_style(axis_font())
                .axis_style(AXIS)
                .draw()?;
            // Row labels (at most about one per 12 pixels), right-aligned left of the plot.
            let step = (nrows * 12).div_ceil(height.saturating_sub(30).max(1) as usize).max(1);
            for (i, (w, t)) in rows.iter().take(nrows).enumerate().step_by(step) {
                let (px, py) = chart.backend_coord(&(x0, i as f64 + 0.5));
                let label = if *t == cluster::protocol::SPILL_THREAD {
                    format!("{} spill", short(w))
                } else {
                    format!("{} #{t}", short(w))
                };
                root.draw(&Text::new(label, (px - 6, py), row_label()))?;
            }
            for b in &blocks {
                let (s, e) = ((b.start - now).clamp(x0, x1), (b.stop - now).clamp(x0, x1));
                let (y0, y1) = (b.row as f64 + 0.1, b.row as f64 + 0.9);
                if b.transfer > 0.0 {
                    let ts = (b.start - b.transfer - now).clamp(x0, x1);
                    chart.draw_series(std::iter::once(Rectangle::new([(ts, y0), (s, y1)], TRANSFER.filled())))?;
                }
                let color = if b.erred { ERRED } else { group_color(b.group) };
                chart.draw_series(std::iter::once(Rectangle::new([(s, y0), (e, y1)], color.filled())))?;
                let (px0, py0) = chart.backend_coord(&(s, y1));
                let (px1, py1) = chart.backend_coord(&(e, y0));
                let title = if b.n == 1 {
                    format!("{}\n{} on {}\n{}", b.key, b.group, b.worker, fmt_seconds(b.stop - b.start))
                } else {
                    format!("{} tasks from {} on {}\n{}", b.n, b.group, b.worker, fmt_seconds(b.stop - b.start))
                };
                hovers.push(Hover {
                    x: px0,
                    y: py0,
                    w: px1 - px0,
                    h: py1 - py0,
                    class: "task",
                    attrs: vec![("group", b.group.to_string()), ("worker", b.worker.to_string())],
                    title,
                });
            }
            root.present()?;
            Ok(())
        })();
        if let Err(e) = drawn {
            tracing::warn!("task stream plot: {e}");
        }
    }
    finish(svg, "task-stream", "task stream", &hovers)
}

/// Most task-stream records one plot looks at (an even sample beyond).
pub const MAX_SAMPLED: usize = 20_000;

/// Most rectangles one task-stream plot draws.
pub const MAX_BLOCKS: usize = 3000;

/// Tasks of one row drawn as one rectangle.
struct Block<'a> {
    row: usize,
    start: f64,
    stop: f64,
    transfer: f64,
    group: &'a str,
    erred: bool,
    n: usize,
    key: &'a str,
    worker: &'a str,
}

/// Consecutive tasks of a row (`sorted` by row, then start) less than `gap`
/// apart as one block; of the same group and outcome only, if `same_group`.
fn merge_blocks<'a>(sorted: &[(usize, &'a TaskStreamRecord)], gap: f64, same_group: bool) -> Vec<Block<'a>> {
    let mut blocks: Vec<Block> = Vec::new();
    for &(row, r) in sorted {
        if let Some(b) = blocks.last_mut() {
            let alike = !same_group || (b.group == r.group && b.erred == r.erred);
            if b.row == row && alike && r.start - b.stop < gap {
                b.stop = b.stop.max(r.stop);
                b.n += 1;
                b.erred |= r.erred;
                continue;
            }
        }
        blocks.push(Block {
            row,
            start: r.start,
            stop: r.stop,
            transfer: r.transfer,
            group: &r.group,
            erred: r.erred,
            n: 1,
            key: &r.key,
            worker: &r.worker,
        });
    }
    blocks
}

/// An axis label in seconds, with as many decimals as the span needs.
fn seconds_label(x: f64, span: f64) -> String {
    match span {
        s if s < 2.0 => format!("{x:.2}s"),
        s if s < 20.0 => format!("{x:.1}s"),
        _ => format!("{x:.0}s"),
    }
}

/// A worker address without the scheme.
fn short(address: &str) -> &str {
    cluster::comm::strip_scheme(address)
}

/// One bar of a horizontal bar chart.
pub struct Bar {
    pub label: String,
    /// Segments: from, to, colour, name (for the hover).
    pub segments: Vec<(f64, f64, RGBColor, String)>,
    /// A vertical mark on the bar (a memory limit).
    pub mark: Option<f64>,
    /// Text at the bar's right end.
    pub note: String,
    /// What the bar stands for (`data-key` on its hover shape).
    pub key: String,
}

/// Horizontal bars, one per row, each split into coloured segments.
fn bars(bars: &[Bar], x_max: f64, width: u32, class: &'static str, x_fmt: &dyn Fn(f64) -> String) -> String {
    let height = (bars.len() as u32 * 22 + 36).max(60);
    if bars.is_empty() {
        return empty(width, 60, class, "nothing to show yet");
    }
    let n = bars.len();
    let mut svg = String::new();
    let mut hovers = Vec::new();
    {
        let root: DrawingArea<SVGBackend, Shift> =
            SVGBackend::with_string(&mut svg, (width, height)).into_drawing_area();
        let drawn = (|| -> Result<(), Box<dyn std::error::Error + '_>> {
            let x_max = if x_max > 0.0 { x_max } else { 1.0 };
            let mut chart = ChartBuilder::on(&root)
                .margin(4)
                .x_label_area_size(22)
                .y_label_area_size(150)
                .build_cartesian_2d(0.0..x_max * 1.25, 0.0..n as f64)?;
            chart
                .configure_mesh()
                .disable_mesh()
                .x_labels(5)
                .y_labels(0)
                .x_label_formatter(&|x| x_fmt(*x))
                .label_style(axis_font())
                .axis_style(AXIS)
                .draw()?;
            for (i, b) in bars.iter().enumerate() {
                let row = (n - 1 - i) as f64;
                let (y0, y1) = (row + 0.15, row + 0.85);
                for (from, to, color, _) in &b.segments {
                    if to > from {
                        chart.draw_series(std::iter::once(Rectangle::new([(*from, y0), (*to, y1)], color.filled())))?;
                    }
                }
                if let Some(m) = b.mark {
                    chart.draw_series(std::iter::once(PathElement::new(
                        vec![(m, row + 0.05), (m, row + 0.95)],
                        ShapeStyle::from(&ERRED).stroke_width(2),
                    )))?;
                }
                let end = b.segments.iter().map(|s| s.1).fold(0.0, f64::max).max(b.mark.unwrap_or(0.0));
                chart.draw_series(std::iter::once(Text::new(
                    b.note.clone(),
                    (end + x_max * 0.01, row + 0.75),
                    axis_font(),
                )))?;
                let (lx, ly) = chart.backend_coord(&(0.0, row + 0.5));
                root.draw(&Text::new(clip(&b.label, 24), (lx - 6, ly), row_label()))?;
                let (px0, py0) = chart.backend_coord(&(0.0, y1));
                let (px1, py1) = chart.backend_coord(&(end.max(x_max * 0.002), y0));
                let parts: Vec<String> = b.segments.iter().filter(|s| s.1 > s.0).map(|s| s.3.clone()).collect();
                hovers.push(Hover {
                    x: px0,
                    y: py0,
                    w: px1 - px0,
                    h: py1 - py0,
                    class: "bar",
                    attrs: vec![("key", b.key.clone())],
                    title: format!("{}\n{}", b.label, parts.join("\n")),
                });
            }
            root.present()?;
            Ok(())
        })();
        if let Err(e) = drawn {
            tracing::warn!("{class} plot: {e}");
        }
    }
    finish(svg, class, class, &hovers)
}

/// Progress per task group: bars split into done (released), in memory,
/// erred, processing and waiting, with counts.
pub fn progress(model: &Model, width: u32) -> String {
    let mut groups: Vec<_> = model.groups.values().collect();
    // Active groups first, then the largest; at most MAX_BARS.
    groups.sort_by_key(|g| {
        let active = g.waiting + g.queued + g.no_worker + g.processing;
        (std::cmp::Reverse(active > 0), std::cmp::Reverse(g.memory + g.released + g.forgotten + active + g.erred))
    });
    let hidden = groups.len().saturating_sub(MAX_BARS);
    groups.truncate(MAX_BARS);
    groups.sort_by(|a, b| a.name.cmp(&b.name));
    let rows: Vec<Bar> = groups
        .iter()
        .map(|g| {
            let waiting = g.waiting + g.queued + g.no_worker;
            let done = g.released + g.forgotten;
            let total = (done + g.memory + g.erred + g.processing + waiting).max(1) as f64;
            let mut at = 0.0;
            let mut segments = Vec::new();
            for (n, color, what) in [
                (done, group_color(&g.name).mix(0.45).to_rgba(), "done and released"),
                (g.memory, group_color(&g.name).to_rgba(), "in memory"),
                (g.erred, ERRED.to_rgba(), "erred"),
                (g.processing, PROCESSING.to_rgba(), "processing"),
                (waiting, WAITING.to_rgba(), "waiting"),
            ] {
                let w = n as f64 / total;
                let c = RGBColor(color.0, color.1, color.2);
                let c = if color.3 < 1.0 { blend(c, color.3) } else { c };
                segments.push((at, at + w, c, format!("{what}: {n}")));
                at += w;
            }
            let finished = done + g.memory + g.erred;
            Bar {
                label: g.name.clone(),
                segments,
                mark: None,
                note: format!("{finished} / {}", total as u64),
                key: g.name.clone(),
            }
        })
        .collect();
    let mut svg = bars(&rows, 1.0, width, "progress", &|x| format!("{:.0}%", x * 100.0));
    if hidden > 0 {
        svg = svg.replacen("</svg>", &format!("<text x=\"4\" y=\"14\" fill=\"#808080\" font-family=\"sans-serif\" font-size=\"11\">{hidden} more groups not shown</text></svg>"), 1);
    }
    svg
}

/// `c` at `alpha` over white, as an opaque colour (plotters' SVG fills are opaque).
fn blend(c: RGBColor, alpha: f64) -> RGBColor {
    let f = |v: u8| (v as f64 * alpha + 255.0 * (1.0 - alpha)) as u8;
    RGBColor(f(c.0), f(c.1), f(c.2))
}

/// Memory per worker: managed in memory, unmanaged, spilled, against the limit.
pub fn memory(model: &Model, width: u32) -> String {
    let groups = chunks(model.workers.len());
    let rows: Vec<Bar> = groups
        .iter()
        .map(|r| {
            let ws = &model.workers[r.clone()];
            let k = ws.len() as u64;
            let in_memory: u64 = ws.iter().map(|w| w.managed.saturating_sub(w.spilled)).sum::<u64>() / k;
            let rss: u64 = ws.iter().map(|w| w.rss).sum::<u64>() / k;
            let spilled: u64 = ws.iter().map(|w| w.spilled).sum::<u64>() / k;
            let limit: u64 = ws.iter().map(|w| w.memory_limit).sum::<u64>() / k;
            let unmanaged = rss.saturating_sub(in_memory);
            let (a, b, c) =
                (in_memory as f64, (in_memory + unmanaged) as f64, (in_memory + unmanaged + spilled) as f64);
            let label = if k == 1 { ws[0].name.clone() } else { format!("{} workers (mean)", k) };
            Bar {
                label,
                segments: vec![
                    (0.0, a, MANAGED, format!("managed: {}", fmt_bytes(in_memory))),
                    (a, b, UNMANAGED, format!("unmanaged: {}", fmt_bytes(unmanaged))),
                    (b, c, SPILLED, format!("spilled: {}", fmt_bytes(spilled))),
                ],
                mark: (limit > 0).then_some(limit as f64),
                note: if limit > 0 { format!("{} / {}", fmt_bytes(rss), fmt_bytes(limit)) } else { fmt_bytes(rss) },
                key: ws.iter().map(|w| w.address.as_str()).collect::<Vec<_>>().join(" "),
            }
        })
        .collect();
    let x_max =
        rows.iter().map(|b| b.segments.last().map_or(0.0, |s| s.1).max(b.mark.unwrap_or(0.0))).fold(0.0, f64::max);
    bars(&rows, x_max, width, "memory", &|x| fmt_bytes(x as u64))
}

/// Tasks processing per worker (executing, then assigned and waiting).
pub fn processing(model: &Model, width: u32) -> String {
    let rows: Vec<Bar> = chunks(model.workers.len())
        .iter()
        .map(|r| {
            let ws = &model.workers[r.clone()];
            let k = ws.len() as f64;
            let executing = ws.iter().map(|w| w.executing as f64).sum::<f64>() / k;
            let processing = ws.iter().map(|w| w.processing as f64).sum::<f64>() / k;
            let label = if ws.len() == 1 { ws[0].name.clone() } else { format!("{} workers (mean)", ws.len()) };
            Bar {
                label,
                segments: vec![
                    (0.0, executing, PROCESSING, format!("executing: {executing:.0}")),
                    (executing, processing.max(executing), WAITING, format!("assigned: {processing:.0}")),
                ],
                mark: None,
                note: format!("{processing:.0}"),
                key: ws.iter().map(|w| w.address.as_str()).collect::<Vec<_>>().join(" "),
            }
        })
        .collect();
    let x_max = rows.iter().map(|b| b.segments[1].1).fold(1.0, f64::max);
    let whole = |x: f64| if (x - x.round()).abs() < 1e-9 { format!("{x:.0}") } else { String::new() };
    bars(&rows, x_max, width, "processing", &whole)
}

/// Most task groups the group graph draws.
pub const MAX_GRAPH_GROUPS: usize = 150;

/// The task groups as a graph: one box per group in a column by its depth
/// (how many groups lie upstream), filled by the share of its tasks done,
/// lines from the groups it depends on.
pub fn groups_graph(model: &Model, width: u32) -> String {
    let mut groups: Vec<&cluster::protocol::GroupCounts> = model.groups.values().collect();
    if groups.is_empty() {
        return empty(width, 80, "groups", "no task groups yet");
    }
    let hidden = groups.len().saturating_sub(MAX_GRAPH_GROUPS);
    groups.sort_by_key(|g| std::cmp::Reverse(g.waiting + g.queued + g.no_worker + g.processing + g.memory));
    groups.truncate(MAX_GRAPH_GROUPS);
    let index: std::collections::HashMap<&str, usize> =
        groups.iter().enumerate().map(|(i, g)| (g.name.as_str(), i)).collect();
    let deps: Vec<Vec<usize>> =
        groups.iter().map(|g| g.dependencies.iter().filter_map(|d| index.get(d.as_str()).copied()).collect()).collect();
    // Depth by relaxation, bounded (group-level cycles are possible).
    let mut depth = vec![0usize; groups.len()];
    for _ in 0..groups.len().min(64) {
        let mut changed = false;
        for i in 0..groups.len() {
            let d = deps[i].iter().map(|&j| depth[j] + 1).max().unwrap_or(0).min(32);
            if d > depth[i] {
                depth[i] = d;
                changed = true;
            }
        }
        if !changed {
            break;
        }
    }
    let columns = depth.iter().max().map_or(1, |d| d + 1);
    let mut slot = vec![0usize; groups.len()];
    let mut per_column = vec![0usize; columns];
    let mut order: Vec<usize> = (0..groups.len()).collect();
    order.sort_by(|&a, &b| groups[a].name.cmp(&groups[b].name));
    for i in order {
        slot[i] = per_column[depth[i]];
        per_column[depth[i]] += 1;
    }
    let rows = per_column.iter().copied().max().unwrap_or(1);
    let (box_w, box_h, gap_y) = (150i32, 30i32, 12i32);
    let col_w = ((width as i32 - 20) / columns as i32).max(box_w + 30);
    let width = (col_w * columns as i32 + 20).max(width as i32) as u32;
    let height = (rows as i32 * (box_h + gap_y) + 30) as u32;
    let pos = |i: usize| (10 + depth[i] as i32 * col_w, 20 + slot[i] as i32 * (box_h + gap_y));
    let mut svg = String::new();
    let mut hovers = Vec::new();
    {
        let root = SVGBackend::with_string(&mut svg, (width, height)).into_drawing_area();
        let drawn = (|| -> Result<(), Box<dyn std::error::Error + '_>> {
            for (i, ds) in deps.iter().enumerate() {
                let (x, y) = pos(i);
                for &j in ds {
                    let (xj, yj) = pos(j);
                    root.draw(&PathElement::new(
                        vec![(xj + box_w, yj + box_h / 2), (x, y + box_h / 2)],
                        AXIS.stroke_width(1),
                    ))?;
                }
            }
            for (i, g) in groups.iter().enumerate() {
                let (x, y) = pos(i);
                let done = g.memory + g.released + g.forgotten;
                let total = (done + g.erred + g.processing + g.waiting + g.queued + g.no_worker).max(1);
                let fill = (box_w as f64 * done as f64 / total as f64) as i32;
                root.draw(&Rectangle::new([(x, y), (x + box_w, y + box_h)], WAITING.filled()))?;
                if fill > 0 {
                    root.draw(&Rectangle::new([(x, y), (x + fill, y + box_h)], group_color(&g.name).filled()))?;
                }
                if g.erred > 0 {
                    root.draw(&Rectangle::new([(x, y + box_h - 4), (x + box_w, y + box_h)], ERRED.filled()))?;
                }
                root.draw(&Text::new(clip(&g.name, 20), (x + 4, y + 3), ("sans-serif", 11).into_font().color(&BLACK)))?;
                root.draw(&Text::new(
                    format!("{done} / {total}"),
                    (x + 4, y + 16),
                    ("sans-serif", 10).into_font().color(&BLACK),
                ))?;
                hovers.push(Hover {
                    x,
                    y,
                    w: box_w,
                    h: box_h,
                    class: "group",
                    attrs: vec![("group", g.name.clone())],
                    title: format!(
                        "{}\ndone {done} of {total}, processing {}, waiting {}, erred {}\ndepends on: {}",
                        g.name,
                        g.processing,
                        g.waiting + g.queued + g.no_worker,
                        g.erred,
                        if g.dependencies.is_empty() { "-".to_string() } else { g.dependencies.join(", ") }
                    ),
                });
            }
            root.present()?;
            Ok(())
        })();
        if let Err(e) = drawn {
            tracing::warn!("groups plot: {e}");
        }
    }
    let mut out = finish(svg, "groups", "task groups", &hovers);
    if hidden > 0 {
        out = out.replacen("</svg>", &format!("<text x=\"4\" y=\"12\" fill=\"#808080\" font-family=\"sans-serif\" font-size=\"11\">{hidden} more groups not shown</text></svg>"), 1);
    }
    out
}

/// `n` rows cut into at most [`MAX_BARS`] consecutive ranges.
fn chunks(n: usize) -> Vec<std::ops::Range<usize>> {
    let per = n.div_ceil(MAX_BARS).max(1);
    (0..n).step_by(per).map(|i| i..(i + per).min(n)).collect()
}

/// A named line: its colour and `(time, value)` points.
pub type Series<'a> = (&'a str, RGBColor, Vec<(f64, f64)>);

/// A line plot of `series` over time (`(time, value)` points, one colour each).
pub fn timeline(
    series: &[Series],
    now: f64,
    width: u32,
    height: u32,
    class: &'static str,
    y_fmt: &dyn Fn(f64) -> String,
) -> String {
    let start = series.iter().flat_map(|s| s.2.first()).map(|p| p.0).fold(now, f64::min);
    let y_max = series.iter().flat_map(|s| s.2.iter()).map(|p| p.1).fold(0.0, f64::max).max(1.0);
    if series.iter().all(|s| s.2.is_empty()) {
        return empty(width, height, class, "no history yet");
    }
    let mut svg = String::new();
    {
        let root = SVGBackend::with_string(&mut svg, (width, height)).into_drawing_area();
        let drawn = (|| -> Result<(), Box<dyn std::error::Error + '_>> {
            let mut chart = ChartBuilder::on(&root)
                .margin(4)
                .x_label_area_size(22)
                .y_label_area_size(70)
                .build_cartesian_2d((start - now).min(-1e-3)..0.0, 0.0..y_max * 1.1)?;
            chart
                .configure_mesh()
                .disable_mesh()
                .x_labels(6)
                .y_labels(5)
                .x_label_formatter(&|x| seconds_label(*x, now - start))
                .y_label_formatter(&|y| y_fmt(*y))
                .label_style(axis_font())
                .axis_style(AXIS)
                .draw()?;
            for (name, color, points) in series {
                chart
                    .draw_series(LineSeries::new(points.iter().map(|(t, v)| (t - now, *v)), color.stroke_width(2)))?
                    .label(*name)
                    .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 12, y)], color.stroke_width(2)));
            }
            chart
                .configure_series_labels()
                .label_font(axis_font())
                .border_style(AXIS)
                .background_style(WHITE.mix(0.0))
                .position(SeriesLabelPosition::UpperLeft)
                .draw()?;
            root.present()?;
            Ok(())
        })();
        if let Err(e) = drawn {
            tracing::warn!("{class} plot: {e}");
        }
    }
    finish(svg, class, class, &[])
}

#[cfg(test)]
mod tests {
    use super::*;
    use cluster::protocol::{EventsUpdate, GroupCounts, TaskStreamRecord, WorkerInfo};

    fn model() -> Model {
        let mut m = Model::default();
        let stream = (0..500)
            .map(|i| TaskStreamRecord {
                key: format!("('inc-abc', {i})"),
                group: "inc".into(),
                worker: format!("tcp://127.0.0.1:{}", 1000 + i % 2),
                thread: (i % 3) as u32,
                start: 100.0 + i as f64 * 0.01,
                stop: 100.005 + i as f64 * 0.01,
                transfer: 0.0,
                erred: i == 7,
            })
            .collect();
        let workers = (0..2)
            .map(|i| {
                let mut w = WorkerInfo::new(format!("w{i}"), format!("tcp://127.0.0.1:{}", 1000 + i), 3, 1 << 30);
                w.managed = 100 << 20;
                w.rss = 300 << 20;
                w
            })
            .collect();
        let groups =
            vec![GroupCounts { name: "inc".into(), memory: 400, processing: 50, waiting: 50, ..Default::default() }];
        m.apply(EventsUpdate { time: 105.0, stream, workers, groups, ..Default::default() });
        m
    }

    #[test]
    fn a_panned_view_shows_the_tasks_of_its_span_only() {
        let rec = |group: &str, start: f64| TaskStreamRecord {
            key: format!("{group}-{start}"),
            group: group.into(),
            worker: "tcp://h:1".into(),
            thread: 0,
            start,
            stop: start + 0.5,
            transfer: 0.0,
            erred: false,
        };
        let mut m = Model::default();
        let mut stream: Vec<_> = (0..10).map(|i| rec("early", 1000.0 + i as f64)).collect();
        stream.extend((0..10).map(|i| rec("late", 1090.0 + i as f64)));
        m.apply(EventsUpdate { time: 1100.0, stream, ..Default::default() });
        let live = task_stream_range(&m, 20.0, 0.0, 800, 300);
        assert!(live.contains("data-group=\"late\"") && !live.contains("data-group=\"early\""));
        let past = task_stream_range(&m, 20.0, 85.0, 800, 300);
        assert!(past.contains("data-group=\"early\"") && !past.contains("data-group=\"late\""));
        let all = task_stream_range(&m, 120.0, 0.0, 800, 300);
        assert!(all.contains("data-group=\"early\"") && all.contains("data-group=\"late\""));
        assert!(task_stream_range(&m, 20.0, 40.0, 800, 300).contains("no tasks finished in this window"));
    }

    #[test]
    fn plots_are_svg_with_one_hover_per_bar_and_group_names() {
        let m = model();
        let ts = task_stream(&m, 10.0, 800, 300);
        assert!(ts.starts_with("<svg class=\"plot task-stream\""), "{}", &ts[..80]);
        assert!(ts.contains("data-group=\"inc\""));
        let mem = memory(&m, 600);
        assert_eq!(mem.matches("class=\"bar\"").count(), 2, "one memory bar per worker");
        assert!(mem.contains("data-key=\"tcp://127.0.0.1:1000\""));
        let p = progress(&m, 600);
        assert!(p.contains("data-key=\"inc\"") && p.contains("400 / 500"), "{p}");
        assert!(processing(&m, 600).contains("class=\"bar\""));
    }

    #[test]
    fn tasks_narrower_than_a_pixel_merge_and_many_workers_aggregate() {
        let m = model();
        // 500 tasks 10 ms apart over 10 s in 100 px: 0.1 s per pixel, so
        // consecutive tasks of one row merge.
        let ts = task_stream(&m, 10.0, 100, 300);
        assert!(ts.matches("class=\"task\"").count() < 60, "merged");
        let mut many = Model::default();
        let workers = (0..1000).map(|i| WorkerInfo::new(format!("w{i:04}"), format!("tcp://h:{i}"), 1, 0)).collect();
        many.apply(EventsUpdate { time: 1.0, workers, ..Default::default() });
        assert_eq!(memory(&many, 600).matches("class=\"bar\"").count(), 63);
    }

    /// A cluster of 1,000 workers and 1,000 task groups with a full task
    /// stream: every plot stays bounded in size (and the time to draw them
    /// is printed, for the record; `--nocapture` shows it).
    #[test]
    fn plots_stay_bounded_for_a_thousand_workers_and_groups() {
        let mut m = Model::default();
        let workers: Vec<WorkerInfo> = (0..1000)
            .map(|i| {
                let mut w =
                    WorkerInfo::new(format!("w{i:04}"), format!("tcp://10.0.{}.{}:1", i / 250, i % 250), 4, 1 << 34);
                w.managed = (i as u64) << 20;
                w.rss = (2 * i as u64) << 20;
                w.processing = (i % 7) as u32;
                w
            })
            .collect();
        let groups: Vec<GroupCounts> = (0..1000)
            .map(|i| GroupCounts { name: format!("group-{i}"), memory: i, waiting: 1000 - i, ..Default::default() })
            .collect();
        let stream: Vec<TaskStreamRecord> = (0..cluster::monitor::STREAM_CAPACITY)
            .map(|i| TaskStreamRecord {
                key: format!("('group-{}', {i})", i % 1000),
                group: format!("group-{}", i % 1000),
                worker: format!("tcp://10.0.{}.{}:1", (i % 1000) / 250, i % 250),
                thread: (i % 4) as u32,
                start: 1000.0 + i as f64 * 1e-4,
                stop: 1000.0 + i as f64 * 1e-4 + 5e-4,
                transfer: 0.0,
                erred: false,
            })
            .collect();
        m.apply(EventsUpdate { time: 1010.0, stream, workers, groups, ..Default::default() });
        let t = std::time::Instant::now();
        let sizes = [
            task_stream(&m, 10.0, 1200, 260).len(),
            task_stream(&m, 3600.0, 1200, 520).len(),
            progress(&m, 700).len(),
            memory(&m, 560).len(),
            processing(&m, 560).len(),
        ];
        eprintln!("1,000 workers, 1,000 groups, 100,000 records: all plots in {:?}, SVG bytes {sizes:?}", t.elapsed());
        assert!(sizes.iter().all(|&n| n < 2_000_000), "{sizes:?}");
        assert!(progress(&m, 700).contains("936 more groups not shown"));
    }

    #[test]
    fn the_group_graph_places_groups_after_what_they_depend_on() {
        let mut m = Model::default();
        let g = |name: &str, deps: &[&str]| GroupCounts {
            name: name.into(),
            memory: 1,
            waiting: 1,
            dependencies: deps.iter().map(|d| d.to_string()).collect(),
            ..Default::default()
        };
        let groups =
            vec![g("load", &[]), g("clean", &["load"]), g("sum", &["clean", "load"]), g("a", &["b"]), g("b", &["a"])];
        m.apply(EventsUpdate { time: 1.0, groups, ..Default::default() });
        let svg = groups_graph(&m, 900);
        let x_of = |name: &str| -> i32 {
            let at = svg.find(&format!("data-group=\"{name}\"")).unwrap();
            let tag = &svg[svg[..at].rfind("<rect").unwrap()..at];
            tag.split("x=\"").nth(1).unwrap().split('"').next().unwrap().parse().unwrap()
        };
        assert!(x_of("load") < x_of("clean") && x_of("clean") < x_of("sum"), "columns by depth");
        assert!(svg.contains("1 / 2"), "counts on the boxes");
        assert!(svg.contains("depends on: clean, load"));
    }
}
