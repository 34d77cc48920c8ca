//! Drawing: one function per view, each a pure function of the [`App`].
//! Panels collapse on small terminals (80x24 shows the essentials);
//! colours are 256-colour indexed and dropped entirely with `NO_COLOR`.

use cluster::human::{age, bytes_short as bytes};
use cluster::monitor::Model;
use ratatui::layout::{Constraint, Direction, Layout, Rect};
use ratatui::style::{Color, Modifier, Style};
use ratatui::text::{Line, Span};
use ratatui::widgets::{Block, Borders, Cell, Clear, Paragraph, Row, Sparkline, Table, TableState, Wrap};
use ratatui::Frame;

use crate::app::{App, View, KEYS, SORTS};

/// Colours, or none.
#[derive(Debug, Clone, Copy)]
pub struct Palette {
    pub color: bool,
}

impl Palette {
    fn fg(self, c: u8) -> Style {
        if self.color {
            Style::default().fg(Color::Indexed(c))
        } else {
            Style::default()
        }
    }

    fn group(self, name: &str) -> Style {
        // A stable colour per task group among 12 distinct 256-colour indices.
        const COLORS: [u8; 12] = [33, 208, 70, 135, 167, 176, 142, 44, 111, 215, 150, 98];
        self.fg(COLORS[(cluster::human::stable_hash(name) % COLORS.len() as u64) as usize])
    }

    fn selected(self) -> Style {
        Style::default().add_modifier(Modifier::REVERSED)
    }

    fn error(self) -> Style {
        self.fg(196).add_modifier(Modifier::BOLD)
    }

    fn dim(self) -> Style {
        self.fg(244)
    }
}

/// A bar of `width` cells: `parts` are (fraction, glyph) filled in order.
fn bar(parts: &[(f64, char)], width: usize) -> String {
    let mut out = String::new();
    let mut used = 0usize;
    for (f, glyph) in parts {
        let n = ((f.clamp(0.0, 1.0) * width as f64).round() as usize).min(width - used);
        out.extend(std::iter::repeat_n(*glyph, n));
        used += n;
    }
    out.extend(std::iter::repeat_n('·', width - used));
    out
}

/// Draw the whole screen.
pub fn draw(f: &mut Frame, app: &App, p: Palette) {
    let area = f.area();
    let [main, footer] = Layout::vertical([Constraint::Min(3), Constraint::Length(1)]).areas(area);
    match app.view.unwrap_or(View::Clusters) {
        View::Clusters => clusters(f, main, app, p),
        View::Cluster => cluster(f, main, app, p),
        View::Worker => worker(f, main, app, p),
        View::Logs => logs(f, main, app, " manager log (following) ", p),
    }
    bottom_line(f, footer, app, p);
    if app.help {
        help(f, area, app, p);
    }
}

fn bottom_line(f: &mut Frame, area: Rect, app: &App, p: Palette) {
    let line = if let Some((kind, text)) = &app.prompt {
        Line::from(vec![Span::raw(format!("{kind}{text}")), Span::styled("█", p.dim())])
    } else if let Some((text, error)) = &app.message {
        Line::styled(text.clone(), if *error { p.error() } else { Style::default() })
    } else {
        let ro = if app.readonly { "  [read-only]" } else { "" };
        Line::styled(format!("? help  : command  / filter  Enter open  Esc back  q quit{ro}"), p.dim())
    };
    f.render_widget(Paragraph::new(line), area);
}

fn clusters(f: &mut Frame, area: Rect, app: &App, p: Palette) {
    let rows: Vec<Row> = app
        .visible_clusters()
        .iter()
        .map(|c| {
            let status_style = if c.status == "running" { Style::default() } else { p.error() };
            Row::new(vec![
                Cell::from(c.name.clone()),
                Cell::from(c.backend.clone()),
                Cell::from(c.status.clone()).style(status_style),
                Cell::from(format!("{}/{}", c.running, c.pending)),
                Cell::from(c.threads.to_string()),
                Cell::from(bytes(c.memory)),
                Cell::from(age(c.age)),
                Cell::from(c.policy.clone()),
                Cell::from(c.dashboard.clone().unwrap_or_default()),
            ])
        })
        .collect();
    let empty = rows.is_empty();
    let widths = [
        Constraint::Length(16),
        Constraint::Length(7),
        Constraint::Length(10),
        Constraint::Length(7),
        Constraint::Length(7),
        Constraint::Length(7),
        Constraint::Length(6),
        Constraint::Length(16),
        Constraint::Min(10),
    ];
    let header = Row::new(["NAME", "BACKEND", "STATUS", "WORKERS", "THREADS", "MEMORY", "AGE", "SCALING", "DASHBOARD"])
        .style(p.dim());
    let title = format!(" clusters ({}) ", app.visible_clusters().len());
    let table = Table::new(rows, widths)
        .header(header)
        .row_highlight_style(p.selected())
        .block(Block::default().borders(Borders::ALL).title(title));
    let mut state = TableState::default().with_selected((!empty).then_some(app.selected));
    f.render_stateful_widget(table, area, &mut state);
    if empty {
        let inner = Rect { x: area.x + 2, y: area.y + 2, width: area.width.saturating_sub(4), height: 1 };
        f.render_widget(Paragraph::new("No clusters. Start one with `dask-ctl up`.").style(p.dim()), inner);
    }
}

fn cluster(f: &mut Frame, area: Rect, app: &App, p: Palette) {
    let m = &app.model;
    let big = area.height >= 30;
    let mut constraints = vec![Constraint::Length(3), Constraint::Min(6)];
    if big {
        constraints.push(Constraint::Length((m.workers.len().min(8) as u16 * 2).max(4) + 2));
        // Seven rows show the adaptive decisions and recent events; a
        // 40-row terminal (39 rows here, below the footer) has room for them.
        constraints.push(Constraint::Length(if area.height >= 36 { 7 } else { 4 }));
    }
    let chunks = Layout::vertical(constraints).split(area);
    header(f, chunks[0], app, p);
    let body = Layout::default()
        .direction(Direction::Horizontal)
        .constraints(if area.width >= 120 {
            [Constraint::Percentage(58), Constraint::Percentage(42)]
        } else {
            [Constraint::Percentage(55), Constraint::Percentage(45)]
        })
        .split(chunks[1]);
    workers(f, body[0], app, p);
    progress(f, body[1], m, p);
    if big {
        stream(f, chunks[2], m, p);
        let bottom = Layout::horizontal([Constraint::Percentage(40), Constraint::Percentage(60)]).split(chunks[3]);
        rate(f, bottom[0], m, p);
        events(f, bottom[1], app, p);
    }
}

/// Recent events and, for a managed cluster, the Adaptive panel.
fn events(f: &mut Frame, area: Rect, app: &App, p: Palette) {
    let m = &app.model;
    let row = app.cluster_name().and_then(|n| app.clusters.iter().find(|c| c.name == n));
    let area = match row.filter(|c| !c.policy.is_empty()) {
        Some(c) => {
            let [left, right] =
                Layout::horizontal([Constraint::Percentage(50), Constraint::Percentage(50)]).areas(area);
            adaptive(f, left, c, m.time, p);
            right
        }
        None => area,
    };
    let room = (area.height as usize).saturating_sub(2);
    let mut lines: Vec<Line> = Vec::new();
    for (t, text) in m.events.iter().rev().take(room) {
        let style = if text.contains("erred") || text.contains("left") { p.error() } else { Style::default() };
        lines.push(Line::styled(format!("{:>4}s ago  {text}", (m.time - t).max(0.0) as u64), style));
    }
    if lines.is_empty() {
        lines.push(Line::styled("no events yet", p.dim()));
    }
    let para = Paragraph::new(lines).wrap(Wrap { trim: false });
    f.render_widget(para.block(Block::default().borders(Borders::ALL).title(" events ")), area);
}

/// A managed cluster's scaling: policy, target, running, pending, and its
/// recent decisions with their reasons.
fn adaptive(f: &mut Frame, area: Rect, c: &crate::source::ClusterRow, now: f64, p: Palette) {
    let target = c.decisions.iter().rev().find(|d| d.kind == "target").or(c.decisions.last()).map(|d| d.target);
    let mut lines = vec![Line::styled(
        format!(
            "{}  target {}  running {}  pending {}",
            c.policy,
            target.map_or("-".to_string(), |t| t.to_string()),
            c.running,
            c.pending
        ),
        p.fg(39),
    )];
    let room = (area.height as usize).saturating_sub(3);
    for d in c.decisions.iter().rev().filter(|d| d.kind != "target").take(room) {
        let style = if d.kind.contains("error") || d.kind.contains("failed") { p.error() } else { Style::default() };
        let ago = if now > 0.0 { format!("{:>4}s ago  ", (now - d.time).max(0.0) as u64) } else { String::new() };
        lines.push(Line::styled(format!("{ago}{} to {}: {}", d.kind, d.target, d.reason), style));
    }
    let para = Paragraph::new(lines).wrap(Wrap { trim: false });
    f.render_widget(para.block(Block::default().borders(Borders::ALL).title(" adaptive ")), area);
}

/// One worker: figures, memory over time, recent tasks, the tail of its log.
fn worker(f: &mut Frame, area: Rect, app: &App, p: Palette) {
    let m = &app.model;
    let name = app.worker.clone().unwrap_or_default();
    let Some(w) = m.worker(&name) else {
        let text = format!("worker {name} is not connected (Esc goes back)");
        f.render_widget(Paragraph::new(text).style(p.error()).block(Block::default().borders(Borders::ALL)), area);
        return;
    };
    let [top, mid, bottom] =
        Layout::vertical([Constraint::Length(5), Constraint::Percentage(45), Constraint::Min(4)]).areas(area);
    let limit = if w.memory_limit > 0 { bytes(w.memory_limit) } else { "no limit".into() };
    let facts = vec![
        Line::from(format!("{}  pid {}  threads {}  cpu {:.0}%", w.address, w.pid, w.nthreads, w.cpu)),
        Line::from(format!(
            "memory {} of {limit}  stored {} ({} keys)  spilled {}",
            bytes(w.rss),
            bytes(w.managed),
            w.nkeys,
            bytes(w.spilled)
        )),
        Line::from(format!(
            "executing {}  ready {}  processing {}  in {}  out {}{}",
            w.executing,
            w.ready,
            w.processing,
            bytes(w.bytes_in),
            bytes(w.bytes_out),
            if w.retiring { "  retiring" } else { "" }
        )),
    ];
    f.render_widget(
        Paragraph::new(facts).block(Block::default().borders(Borders::ALL).title(format!(" {name} "))),
        top,
    );
    let [mem, tasks] = Layout::horizontal([Constraint::Percentage(40), Constraint::Percentage(60)]).areas(mid);
    let history: Vec<u64> =
        m.worker_history.get(&w.address).map(|h| h.iter().map(|s| s.rss >> 20).collect()).unwrap_or_default();
    let shown = &history[history.len().saturating_sub(mem.width as usize)..];
    let block = Block::default().borders(Borders::ALL).title(format!(" memory over time (now {}) ", bytes(w.rss)));
    f.render_widget(Sparkline::default().block(block).data(shown).style(p.fg(39)), mem);
    // Borders, the group column and the duration; the thread label and the
    // key share the rest.
    let room = (tasks.width as usize).saturating_sub(2 + 17 + 9 + 4);
    let recent: Vec<Line> = m
        .stream
        .iter()
        .rev()
        .filter(|r| r.worker == w.address)
        .take(tasks.height.saturating_sub(2) as usize)
        .map(|r| {
            let thread = if r.thread == cluster::protocol::SPILL_THREAD {
                "spill".to_string()
            } else {
                format!("#{}", r.thread)
            };
            let key = middle(&r.key, room.saturating_sub(thread.chars().count()));
            Line::from(vec![
                Span::styled(format!("{:<16} ", r.group.chars().take(16).collect::<String>()), p.group(&r.group)),
                Span::raw(format!("{:>8.3}s  {thread}  {key}", r.stop - r.start)),
            ])
        })
        .collect();
    f.render_widget(
        Paragraph::new(recent).block(Block::default().borders(Borders::ALL).title(" recent tasks ")),
        tasks,
    );
    logs(f, bottom, app, " log (following) ", p);
}

/// `s` cut in the middle to `n` characters, so both ends stay (keys differ
/// at their ends).
fn middle(s: &str, n: usize) -> String {
    let count = s.chars().count();
    if count <= n || n < 5 {
        return s.to_string();
    }
    let head = (n - 1) / 2;
    let tail = n - 1 - head;
    let start: String = s.chars().take(head).collect();
    let end: String = s.chars().skip(count - tail).collect();
    format!("{start}…{end}")
}

/// The tail of a log, newest at the bottom.
fn logs(f: &mut Frame, area: Rect, app: &App, title: &str, p: Palette) {
    let room = area.height.saturating_sub(2) as usize;
    let lines: Vec<Line> = app.log[app.log.len().saturating_sub(room)..].iter().map(|l| Line::raw(l.clone())).collect();
    let empty = lines.is_empty();
    let mut para = Paragraph::new(lines).block(Block::default().borders(Borders::ALL).title(title.to_string()));
    if empty {
        para = Paragraph::new(Line::styled("no log lines (a cluster opened by address has no logs here)", p.dim()))
            .block(Block::default().borders(Borders::ALL).title(title.to_string()));
    }
    f.render_widget(para, area);
}

fn header(f: &mut Frame, area: Rect, app: &App, p: Palette) {
    let m = &app.model;
    let (name, address) = app.current.clone().unwrap_or_default();
    let threads: u64 = m.workers.iter().map(|w| w.nthreads as u64).sum();
    let rss: u64 = m.workers.iter().map(|w| w.rss).sum();
    let limit: u64 = m.workers.iter().map(|w| w.memory_limit).sum();
    let rate = m.history.iter().rev().take(4).map(|s| s.tasks_per_second).sum::<f64>() / 4.0;
    let link = match &app.link {
        Some(why) => Span::styled(format!("  {why}"), p.error()),
        None => Span::raw(""),
    };
    let title = format!(" {} ", name.unwrap_or_else(|| address.clone()));
    let lines = vec![
        Line::from(vec![
            Span::raw(format!("{address}  up {}", age(m.time - m.first_seen))),
            Span::styled(
                app.clusters
                    .iter()
                    .find(|c| Some(&c.address) == Some(&Some(address.clone())))
                    .and_then(|c| c.dashboard.clone())
                    .map(|d| format!("  {d}"))
                    .unwrap_or_default(),
                p.dim(),
            ),
            link,
        ]),
        Line::from(format!(
            "workers {}  threads {threads}  mem {}/{}  tasks {}  proc {}  queued {}  {rate:.0}/s",
            m.workers.len(),
            bytes(rss),
            bytes(limit),
            m.ntasks,
            m.load.processing,
            m.load.queued + m.load.no_worker,
        )),
    ];
    f.render_widget(Paragraph::new(lines).block(Block::default().borders(Borders::TOP).title(title)), area);
}

fn workers(f: &mut Frame, area: Rect, app: &App, p: Palette) {
    let ws = app.workers_shown();
    let gauge = (area.width as usize).saturating_sub(44).clamp(6, 30);
    // Only the rows that fit, around the selection (a thousand workers
    // cost no more than a screenful).
    let visible = (area.height as usize).saturating_sub(3).max(1);
    let selected = app.selected.min(ws.len().saturating_sub(1));
    let first = selected.saturating_sub(visible - 1);
    let rows: Vec<Row> = ws[first.min(ws.len())..]
        .iter()
        .take(visible)
        .map(|w| {
            let limit = if w.memory_limit > 0 { w.memory_limit } else { w.rss.max(1) } as f64;
            let stored = w.managed.saturating_sub(w.spilled) as f64;
            let parts = [
                (stored / limit, '█'),
                ((w.rss as f64 - stored).max(0.0) / limit, '▒'),
                (w.spilled as f64 / limit, '░'),
            ];
            Row::new(vec![
                Cell::from(w.name.clone()),
                Cell::from(bar(&parts, gauge)).style(if w.rss as f64 > 0.8 * limit { p.error() } else { p.fg(39) }),
                Cell::from(bytes(w.rss)),
                Cell::from(format!("{}/{}", w.executing, w.ready)),
                Cell::from(w.processing.to_string()),
                Cell::from(if w.retiring { "retiring" } else { "" }),
            ])
        })
        .collect();
    let widths = [
        Constraint::Length(12),
        Constraint::Length(gauge as u16),
        Constraint::Length(6),
        Constraint::Length(6),
        Constraint::Length(5),
        Constraint::Min(0),
    ];
    let header = Row::new(["WORKER", "MEMORY █stored ▒other ░spilled", "RSS", "EX/RDY", "PROC", ""]).style(p.dim());
    let title = format!(" workers ({}) sort: {} ", ws.len(), SORTS[app.sort]);
    let table = Table::new(rows, widths)
        .header(header)
        .row_highlight_style(p.selected())
        .block(Block::default().borders(Borders::ALL).title(title));
    let mut state = TableState::default().with_selected((!ws.is_empty()).then_some(selected - first));
    f.render_stateful_widget(table, area, &mut state);
}

fn progress(f: &mut Frame, area: Rect, m: &Model, p: Palette) {
    let mut groups: Vec<_> = m.groups.values().collect();
    groups.sort_by_key(|g| {
        let active = g.waiting + g.queued + g.no_worker + g.processing;
        (std::cmp::Reverse(active > 0), g.name.clone())
    });
    let inner_w = area.width.saturating_sub(2) as usize;
    let name_w = 14.min(inner_w / 3);
    let count_w = 12;
    let bar_w = inner_w.saturating_sub(name_w + count_w + 2).max(4);
    let lines: Vec<Line> = groups
        .iter()
        .take(area.height.saturating_sub(2) as usize)
        .map(|g| {
            let done = g.released + g.forgotten;
            let waiting = g.waiting + g.queued + g.no_worker;
            let total = (done + g.memory + g.erred + g.processing + waiting).max(1) as f64;
            let finished = done + g.memory + g.erred;
            let parts = [
                ((done + g.memory) as f64 / total, '█'),
                (g.erred as f64 / total, 'x'),
                (g.processing as f64 / total, '▒'),
            ];
            let name: String = g.name.chars().take(name_w).collect();
            Line::from(vec![
                Span::raw(format!("{name:<name_w$} ")),
                Span::styled(bar(&parts, bar_w), p.group(&g.name)),
                Span::raw(format!(" {:>count_w$}", format!("{finished}/{}", total as u64))),
            ])
        })
        .collect();
    let title = format!(" task groups ({}) █done ▒processing x erred ", m.groups.len());
    f.render_widget(Paragraph::new(lines).block(Block::default().borders(Borders::ALL).title(title)), area);
}

fn stream(f: &mut Frame, area: Rect, m: &Model, p: Palette) {
    let window = 20.0;
    let inner = Block::default().borders(Borders::ALL).title(" task stream, last 20 s ");
    let rows_area = inner.inner(area);
    f.render_widget(inner, area);
    // A busy cluster finishes more tasks in 20 s than there are cells: an
    // even sample of at most 20,000 paints the same picture.
    let all: Vec<_> = m.recent(window).collect();
    let recent: Vec<_> = all.iter().step_by(all.len().div_ceil(20_000).max(1)).copied().collect();
    let distinct: std::collections::HashSet<(&str, u32)> =
        recent.iter().map(|r| (r.worker.as_str(), r.thread)).collect();
    let mut rows: Vec<(&str, u32)> = distinct.into_iter().collect();
    rows.sort();
    rows.truncate(rows_area.height as usize);
    let label_w = 16usize;
    let cols = (rows_area.width as usize).saturating_sub(label_w + 1).max(1);
    let per = window / cols as f64;
    // One pass over the records: each paints the cells of its row it covers.
    let index: std::collections::HashMap<(&str, u32), usize> = rows.iter().enumerate().map(|(i, r)| (*r, i)).collect();
    let mut grid: Vec<Vec<Option<&str>>> = vec![vec![None; cols]; rows.len()];
    for r in &recent {
        let Some(&i) = index.get(&(r.worker.as_str(), r.thread)) else { continue };
        let a = (((r.start - (m.time - window)) / per).floor().max(0.0) as usize).min(cols);
        let b = (((r.stop - (m.time - window)) / per).ceil().max(0.0) as usize).min(cols);
        for c in &mut grid[i][a..b.max(a)] {
            *c = Some(r.group.as_str());
        }
    }
    // Rows carry the worker's name, as the workers panel does (its address
    // once it has left).
    let name_of = |addr: &str| -> String {
        m.workers
            .iter()
            .find(|w| w.address == addr)
            .map_or_else(|| cluster::comm::strip_scheme(addr).to_string(), |w| w.name.clone())
    };
    let lines: Vec<Line> = rows
        .iter()
        .zip(&grid)
        .map(|((w, t), cells)| {
            let thread = if *t == cluster::protocol::SPILL_THREAD { " spill".to_string() } else { format!("#{t}") };
            let label: String = format!("{}{thread}", name_of(w)).chars().take(label_w).collect();
            let mut spans = vec![Span::styled(format!("{label:<label_w$} "), p.dim())];
            spans.extend(cells.iter().map(|c| match c {
                Some(g) => Span::styled("█", p.group(g)),
                None => Span::raw(" "),
            }));
            Line::from(spans)
        })
        .collect();
    f.render_widget(Paragraph::new(lines), rows_area);
}

fn rate(f: &mut Frame, area: Rect, m: &Model, p: Palette) {
    let data: Vec<u64> = m.history.iter().map(|s| s.tasks_per_second.round() as u64).collect();
    let shown = &data[data.len().saturating_sub(area.width as usize)..];
    let peak = shown.iter().copied().max().unwrap_or(0);
    let block = Block::default().borders(Borders::ALL).title(format!(" tasks/s (peak {peak}) "));
    f.render_widget(Sparkline::default().block(block).data(shown).style(p.fg(70)), area);
}

fn help(f: &mut Frame, area: Rect, app: &App, p: Palette) {
    let w = 60.min(area.width);
    let h = (KEYS.len() as u16 + 4).min(area.height);
    let r = Rect { x: area.x + (area.width - w) / 2, y: area.y + (area.height - h) / 2, width: w, height: h };
    let mut lines: Vec<Line> = KEYS
        .iter()
        .map(|(k, what)| Line::from(vec![Span::styled(format!("{k:<20}"), p.fg(39)), Span::raw(*what)]))
        .collect();
    if app.readonly {
        lines.push(Line::styled("read-only: commands that change the cluster are refused", p.dim()));
    }
    f.render_widget(Clear, r);
    f.render_widget(
        Paragraph::new(lines).block(Block::default().borders(Borders::ALL).title(" keys (any key closes) ")),
        r,
    );
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::source::ClusterRow;
    use cluster::protocol::{EventsUpdate, GroupCounts, TaskStreamRecord, WorkerInfo};
    use ratatui::backend::TestBackend;
    use ratatui::Terminal;

    /// The screen as text, one line per row.
    fn screen(app: &App, width: u16, height: u16) -> String {
        let mut t = Terminal::new(TestBackend::new(width, height)).unwrap();
        t.draw(|f| draw(f, app, Palette { color: false })).unwrap();
        let buf = t.backend().buffer().clone();
        (0..height)
            .map(|y| (0..width).map(|x| buf[(x, y)].symbol().to_string()).collect::<String>().trim_end().to_string())
            .collect::<Vec<_>>()
            .join("\n")
            + "\n"
    }

    /// Compare with `tests/snapshots/NAME.txt` (`UPDATE_SNAPSHOTS=1` rewrites it).
    fn snapshot(name: &str, text: &str) {
        let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/snapshots").join(format!("{name}.txt"));
        if std::env::var_os("UPDATE_SNAPSHOTS").is_some() || !path.exists() {
            std::fs::create_dir_all(path.parent().unwrap()).unwrap();
            std::fs::write(&path, text).unwrap();
        }
        let want = std::fs::read_to_string(&path).unwrap();
        assert_eq!(text, want, "{name} differs from its snapshot; UPDATE_SNAPSHOTS=1 rewrites it after review");
    }

    fn clusters_app() -> App {
        let mut app = App::new(false);
        app.clusters = vec![
            ClusterRow {
                name: "alpha".into(),
                backend: "local".into(),
                status: "running".into(),
                address: Some("tcp://127.0.0.1:40001".into()),
                dashboard: Some("http://127.0.0.1:8787/status".into()),
                running: 2,
                pending: 0,
                threads: 4,
                memory: 4 << 30,
                age: 754.0,
                policy: "fixed(2)".into(),
                decisions: Vec::new(),
            },
            ClusterRow {
                name: "hpc".into(),
                backend: "slurm".into(),
                status: "manager not running".into(),
                running: 0,
                pending: 3,
                age: 90_000.0,
                policy: "adaptive(0..16)".into(),
                ..Default::default()
            },
        ];
        app
    }

    fn cluster_app() -> App {
        let mut app = clusters_app();
        app.view = Some(View::Cluster);
        app.current = Some((Some("alpha".into()), "tcp://127.0.0.1:40001".into()));
        let workers = (0..2)
            .map(|i| {
                let mut w = WorkerInfo::new(format!("alpha-{i}"), format!("tcp://127.0.0.1:4100{i}"), 2, 2 << 30);
                w.managed = (300 + 200 * i) << 20;
                w.rss = (700 + 300 * i) << 20;
                w.executing = 2;
                w.ready = 3 * i as u32;
                w.processing = 5 + i as u32;
                w
            })
            .collect();
        let groups = vec![
            GroupCounts { name: "random_sample".into(), memory: 40, processing: 4, waiting: 20, ..Default::default() },
            GroupCounts { name: "sum-partial".into(), forgotten: 10, memory: 2, erred: 1, ..Default::default() },
        ];
        let stream: Vec<TaskStreamRecord> = (0..60)
            .map(|i| TaskStreamRecord {
                key: format!("k{i}"),
                group: if i % 3 == 0 { "sum-partial".into() } else { "random_sample".into() },
                worker: format!("tcp://127.0.0.1:4100{}", i % 2),
                thread: (i / 2 % 2) as u32,
                start: 990.0 + i as f64 * 0.15,
                stop: 990.1 + i as f64 * 0.15,
                transfer: 0.0,
                erred: false,
            })
            .collect();
        let mut m = Model::default();
        for t in 0..6 {
            let s = if t == 5 { stream.clone() } else { Vec::new() };
            let mut u = EventsUpdate {
                time: 995.0 + t as f64,
                workers: Vec::clone(&workers),
                ntasks: 77,
                ..Default::default()
            };
            u.stream = s;
            if t == 0 {
                u.groups = groups.clone();
            }
            m.apply(u);
        }
        app.model = m;
        app
    }

    #[test]
    fn clusters_view_snapshots() {
        let app = clusters_app();
        snapshot("clusters-80x24", &screen(&app, 80, 24));
        snapshot("clusters-160x48", &screen(&app, 160, 48));
    }

    #[test]
    fn cluster_view_snapshots() {
        let mut app = cluster_app();
        snapshot("cluster-80x24", &screen(&app, 80, 24));
        app.clusters[0].decisions = vec![cluster::monitor::Decision {
            time: 999.0,
            kind: "scale_up".into(),
            target: 2,
            running: 1,
            pending: 1,
            reason: "1 task queued per thread".into(),
        }];
        app.model.events.push_back((998.0, "worker alpha-1 joined".into()));
        app.model.events.push_back((999.5, "task k7 erred on tcp://127.0.0.1:41001".into()));
        let big = screen(&app, 160, 48);
        assert!(big.contains("scale_up to 2: 1 task queued") && big.contains("fixed(2)  target 2  running 2"), "{big}");
        assert!(big.contains("worker alpha-1 joined") && big.contains("k7 erred"), "{big}");
        snapshot("cluster-160x48", &big);
        // A 120x40 terminal still shows the decisions and their reasons.
        let mid = screen(&app, 120, 40);
        assert!(mid.contains("scale_up to 2: 1 task") && mid.contains("k7 erred"), "{mid}");
        assert!(mid.contains("alpha-1#0") && !mid.contains("41001#0"), "stream rows carry names: {mid}");
    }

    #[test]
    fn worker_view_snapshot() {
        let mut app = cluster_app();
        app.view = Some(View::Worker);
        app.worker = Some("alpha-1".into());
        app.log = (0..30).map(|i| format!("2026-11-30T15:00:{i:02}Z INFO worker log line {i}")).collect();
        snapshot("worker-100x30", &screen(&app, 100, 30));
        app.worker = Some("gone".into());
        assert!(screen(&app, 80, 24).contains("worker gone is not connected"));
    }

    #[test]
    fn help_and_messages_snapshots() {
        let mut app = cluster_app();
        app.readonly = true;
        app.help = true;
        snapshot("help-80x24", &screen(&app, 80, 24));
        app.help = false;
        app.message = Some((":scale 3 refused: the console is read-only (--readonly)".into(), true));
        let text = screen(&app, 80, 24);
        assert!(text.lines().last().unwrap().contains("read-only"), "{text}");
    }

    #[test]
    fn bars_fill_in_order_and_never_overflow() {
        assert_eq!(bar(&[(0.5, '█'), (0.25, '▒')], 8), "████▒▒··");
        assert_eq!(bar(&[(0.9, '█'), (0.9, '▒')], 4), "████");
        assert_eq!(middle("sleep-0123456789abcdef-17", 11), "sleep…ef-17");
        assert_eq!(middle("short", 11), "short");
    }

    /// What a frame costs with 1,000 workers, 1,000 groups and a full
    /// stream (printed; `--nocapture` shows it). The console draws at most
    /// four frames a second.
    #[test]
    fn a_frame_of_a_large_cluster_is_cheap() {
        let mut app = cluster_app();
        let workers: Vec<WorkerInfo> = (0..1000)
            .map(|i| WorkerInfo::new(format!("w{i:04}"), format!("tcp://10.0.{}.{}:1", i / 250, i % 250), 4, 1 << 34))
            .collect();
        let groups: Vec<GroupCounts> = (0..1000)
            .map(|i| GroupCounts { name: format!("group-{i}"), memory: i, waiting: 5, ..Default::default() })
            .collect();
        let stream: Vec<TaskStreamRecord> = (0..100_000)
            .map(|i| TaskStreamRecord {
                key: format!("k{i}"),
                group: format!("group-{}", i % 1000),
                worker: format!("tcp://10.0.{}.{}:1", (i % 1000) / 250, i % 250),
                thread: (i % 4) as u32,
                start: 1000.0 + i as f64 * 1e-4,
                stop: 1000.0 + i as f64 * 1e-4 + 5e-4,
                transfer: 0.0,
                erred: false,
            })
            .collect();
        app.model = Model::default();
        app.model.apply(EventsUpdate { time: 1010.0, workers, groups, stream, ..Default::default() });
        // The selection stays on screen however long the table.
        app.selected = 900;
        assert!(screen(&app, 160, 48).contains("w0900"));
        let mut t = Terminal::new(TestBackend::new(160, 48)).unwrap();
        let start = std::time::Instant::now();
        for _ in 0..20 {
            t.draw(|f| draw(f, &app, Palette { color: true })).unwrap();
        }
        let per = start.elapsed() / 20;
        eprintln!(
            "1,000 workers, 1,000 groups, 100,000 records: {per:?} per 160x48 frame; at 4 frames/s {:.1}% of a core",
            per.as_secs_f64() * 400.0
        );
    }
}
