//! The HTML: a shell per page (navigation, placeholders, one small script
//! that follows the page's event stream and swaps in the fragments it
//! receives) and the fragments themselves, rendered from the [`Model`].
//! Everything is served by the binary; no page loads anything from elsewhere.

use std::fmt::Write;

use serde_json::json;

use crate::plots::{self, esc, fmt_bytes, fmt_seconds};
use cluster::monitor::Model;

/// Pages with a live stream, and their titles.
pub const PAGES: &[(&str, &str)] = &[
    ("status", "Status"),
    ("workers", "Workers"),
    ("tasks", "Tasks"),
    ("groups", "Groups"),
    ("adaptive", "Adaptive"),
    ("info", "Info"),
];

/// Single plots for embedding (`/individual-plots.json`).
pub const INDIVIDUAL: &[(&str, &str)] = &[
    ("individual-task-stream", "Individual Task Stream"),
    ("individual-progress", "Individual Progress"),
    ("individual-workers-memory", "Individual Workers Memory"),
    ("individual-processing", "Individual Processing"),
    ("individual-cluster-memory", "Individual Cluster Memory"),
];

const STYLE: &str = r#"
:root { color-scheme: light dark; --fg: #222; --bg: #fff; --muted: #777; --line: #ddd; --accent: #1f77b4; }
@media (prefers-color-scheme: dark) { :root { --fg: #ddd; --bg: #16181c; --muted: #999; --line: #333; --accent: #6aaee0; } }
body { margin: 0; font: 14px/1.4 system-ui, sans-serif; color: var(--fg); background: var(--bg); }
nav { display: flex; gap: 1.2em; align-items: baseline; padding: .5em 1em; border-bottom: 1px solid var(--line); }
nav b { margin-right: 1em; } nav a { color: var(--fg); text-decoration: none; } nav a.here { color: var(--accent); font-weight: 600; }
nav .conn { margin-left: auto; color: var(--muted); font-size: 12px; }
main { padding: .5em 1em; }
.grid { display: grid; grid-template-columns: minmax(0, 3fr) minmax(0, 2fr); gap: .8em; }
.card { border: 1px solid var(--line); border-radius: 6px; padding: .4em .6em; overflow: hidden; }
.card h2 { font-size: 13px; margin: 0 0 .3em; color: var(--muted); font-weight: 600; }
.wide { grid-column: 1 / -1; }
#totals { display: flex; gap: 2em; flex-wrap: wrap; }
#totals div span { display: block; font-size: 20px; font-weight: 600; }
table { border-collapse: collapse; width: 100%; font-variant-numeric: tabular-nums; }
th, td { text-align: right; padding: 3px 8px; border-bottom: 1px solid var(--line); white-space: nowrap; }
th:first-child, td:first-child { text-align: left; } th { cursor: pointer; color: var(--muted); }
a { color: var(--accent); } svg.plot { display: block; max-width: 100%; height: auto; }
.zoom button { font-size: 12px; margin-left: .3em; }
"#;

/// The script every live page runs: follow `/stream/PAGE`, put each
/// fragment into the element with its id, keep table sorting.
const SCRIPT: &str = r#"
const page = document.body.dataset.page, extra = document.body.dataset.query || location.search;
// `?once=1`: one update, then the page stays as it is (for tools that wait
// until a page has no connection open, such as headless browsers).
const once = new URLSearchParams(location.search).get("once") === "1";
let sortKey = null, sortDesc = false;
function sortTables() {
  if (sortKey === null) return;
  for (const t of document.querySelectorAll("table.sortable")) {
    const rows = [...t.tBodies[0].rows];
    rows.sort((a, b) => { const x = a.cells[sortKey].dataset.v ?? a.cells[sortKey].textContent,
      y = b.cells[sortKey].dataset.v ?? b.cells[sortKey].textContent;
      const nx = parseFloat(x), ny = parseFloat(y);
      const c = (!isNaN(nx) && !isNaN(ny)) ? nx - ny : String(x).localeCompare(String(y));
      return sortDesc ? -c : c; });
    for (const r of rows) t.tBodies[0].appendChild(r);
  }
}
document.addEventListener("click", e => { const th = e.target.closest("th"); if (!th) return;
  const k = th.cellIndex; sortDesc = sortKey === k ? !sortDesc : false; sortKey = k; sortTables(); });
function connect() {
  const es = new EventSource("/stream/" + page + extra);
  es.onmessage = m => { const parts = JSON.parse(m.data);
    for (const [id, html] of Object.entries(parts)) { const el = document.getElementById(id); if (el) el.innerHTML = html; }
    sortTables(); document.getElementById("conn").textContent = "live";
    if (once) es.close(); };
  es.onerror = () => { document.getElementById("conn").textContent = "reconnecting…"; };
}
connect();
"#;

/// A page shell: navigation, then `body` (placeholders the stream fills).
pub fn shell(page: &str, title: &str, query: &str, body: &str) -> String {
    let mut nav = String::new();
    for (p, t) in PAGES {
        let class = if *p == page { " class=\"here\"" } else { "" };
        let _ = write!(nav, "<a href=\"/{p}\"{class}>{t}</a>");
    }
    format!(
        "<!doctype html><html lang=\"en\"><head><meta charset=\"utf-8\">\
         <meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">\
         <title>{} · dask-rs</title><style>{STYLE}</style></head>\
         <body data-page=\"{}\" data-query=\"{}\"><nav><b>dask-rs</b>{nav}<span class=\"conn\" id=\"conn\">connecting…</span></nav>\
         <main>{body}</main><script>{SCRIPT}</script></body></html>",
        esc(title),
        esc(page),
        esc(query),
    )
}

/// `/status`: totals, task stream, progress, memory and processing per worker.
pub fn status_page() -> String {
    let body = r#"<div class="grid">
<div class="card wide"><div id="totals"></div></div>
<div class="card wide"><h2>Task stream <span class="zoom">
<button onclick="location.search='?window=10'">10 s</button><button onclick="location.search='?window=60'">1 min</button>
<button onclick="location.search='?window=300'">5 min</button></span></h2><div id="task-stream"></div></div>
<div class="card"><h2>Progress</h2><div id="progress"></div></div>
<div class="card"><h2>Bytes stored per worker</h2><div id="memory"></div>
<h2>Tasks processing per worker</h2><div id="processing"></div></div>
</div>"#;
    let query = "";
    shell("status", "Status", query, body)
}

/// The `window` query of the status and task pages, in seconds (one of a
/// fixed set, so that each is rendered once per tick whatever the viewers).
pub fn window_of(query: Option<&str>, default: f64) -> f64 {
    match query.and_then(|q| q.parse::<f64>().ok()) {
        Some(w) if w <= 10.0 => 10.0,
        Some(w) if w <= 60.0 => 60.0,
        Some(w) if w <= 300.0 => 300.0,
        Some(_) => 3600.0,
        None => default,
    }
}

/// The fragments of `/status` for a task-stream window of `window` seconds.
pub fn status_fragments(m: &Model, window: f64) -> serde_json::Value {
    json!({
        "totals": totals(m),
        "task-stream": plots::task_stream(m, window, 1200, 260),
        "progress": plots::progress(m, 700),
        "memory": plots::memory(m, 560),
        "processing": plots::processing(m, 560),
    })
}

fn totals(m: &Model) -> String {
    let threads: u64 = m.workers.iter().map(|w| w.nthreads as u64).sum();
    let managed: u64 = m.workers.iter().map(|w| w.managed).sum();
    let rss: u64 = m.workers.iter().map(|w| w.rss).sum();
    let limit: u64 = m.workers.iter().map(|w| w.memory_limit).sum();
    let rate = m.history.iter().rev().take(4).map(|s| s.tasks_per_second).sum::<f64>() / 4.0;
    let items = [
        ("workers", m.workers.len().to_string()),
        ("threads", threads.to_string()),
        ("memory", if limit > 0 { format!("{} / {}", fmt_bytes(rss), fmt_bytes(limit)) } else { fmt_bytes(rss) }),
        ("stored", fmt_bytes(managed)),
        ("tasks", m.ntasks.to_string()),
        ("processing", m.load.processing.to_string()),
        ("queued", (m.load.queued + m.load.no_worker).to_string()),
        ("tasks/s", format!("{rate:.0}")),
        ("clients", m.nclients.to_string()),
    ];
    items
        .iter()
        .map(|(k, v)| format!("<div id=\"total-{}\">{k}<span>{}</span></div>", k.replace('/', "-per-"), esc(v)))
        .collect()
}

/// `/workers`: the sortable table.
pub fn workers_page() -> String {
    shell(
        "workers",
        "Workers",
        "",
        r#"<div class="card"><h2>Workers</h2><div id="workers-table"></div></div>
<div class="card"><h2>Cluster memory over time</h2><div id="cluster-memory"></div></div>"#,
    )
}

/// The fragments of `/workers`.
pub fn workers_fragments(m: &Model) -> serde_json::Value {
    let mut t = String::from(
        "<table class=\"sortable\"><thead><tr><th>name</th><th>address</th><th>threads</th><th>memory</th>\
         <th>% of limit</th><th>managed</th><th>spilled</th><th>CPU</th><th>executing</th><th>ready</th><th>processing</th>\
         <th>bytes in</th><th>bytes out</th><th>status</th></tr></thead><tbody>",
    );
    for w in &m.workers {
        let pct = if w.memory_limit > 0 {
            format!("{:.0}%", 100.0 * w.rss as f64 / w.memory_limit as f64)
        } else {
            "-".into()
        };
        let _ = write!(
            t,
            "<tr data-worker=\"{addr}\"><td><a href=\"/workers/{name_q}\">{name}</a></td><td>{addr}</td><td>{}</td>\
             <td data-v=\"{}\">{}</td><td>{pct}</td><td data-v=\"{}\">{}</td><td data-v=\"{}\">{}</td>\
             <td class=\"cpu\" data-v=\"{:.1}\">{:.0}%</td><td>{}</td><td>{}</td>\
             <td>{}</td><td data-v=\"{}\">{}</td><td data-v=\"{}\">{}</td><td>{}</td></tr>",
            w.nthreads,
            w.rss,
            fmt_bytes(w.rss),
            w.managed,
            fmt_bytes(w.managed),
            w.spilled,
            fmt_bytes(w.spilled),
            w.cpu,
            w.cpu,
            w.executing,
            w.ready,
            w.processing,
            w.bytes_in,
            fmt_bytes(w.bytes_in),
            w.bytes_out,
            fmt_bytes(w.bytes_out),
            if w.retiring { "retiring" } else { "running" },
            addr = esc(&w.address),
            name = esc(&w.name),
            name_q = esc(&urlencode(&w.name)),
        );
    }
    t.push_str("</tbody></table>");
    let h = &m.history;
    let series = vec![
        ("stored", plots::group_color("stored"), h.iter().map(|s| (s.time, s.managed as f64)).collect()),
        ("process memory", plots::group_color("rss"), h.iter().map(|s| (s.time, s.rss as f64)).collect()),
        ("spilled", plots::group_color("spilled"), h.iter().map(|s| (s.time, s.spilled as f64)).collect()),
    ];
    let mem = plots::timeline(&series, m.time, 1000, 240, "cluster-memory", &|y| fmt_bytes(y as u64));
    json!({ "workers-table": t, "cluster-memory": mem })
}

/// `/workers/NAME`: one worker's figures, memory over time and recent tasks.
pub fn worker_page(name: &str) -> String {
    shell(
        "workers",
        name,
        &format!("?worker={}", urlencode(name)),
        r#"<div class="card"><div id="worker-name"></div><div id="worker-facts"></div></div>
<div class="card"><h2>Memory over time</h2><div id="worker-memory"></div></div>
<div class="card"><h2>Recent tasks</h2><div id="worker-tasks"></div></div>"#,
    )
}

/// The fragments of `/workers/NAME`.
pub fn worker_fragments(m: &Model, name: &str) -> serde_json::Value {
    let Some(w) = m.worker(name) else {
        let title = format!("<h2>{} (not connected)</h2>", esc(name));
        return json!({ "worker-name": title, "worker-facts": "", "worker-memory": "", "worker-tasks": "" });
    };
    let facts = format!(
        "<table><tr><td>address</td><td>{}</td></tr><tr><td>threads</td><td>{}</td></tr><tr><td>pid</td><td>{}</td></tr>\
         <tr><td>memory</td><td>{} of {}</td></tr><tr><td>stored</td><td>{} ({} keys)</td></tr><tr><td>spilled</td><td>{}</td></tr>\
         <tr><td>CPU</td><td>{:.0}% of a core</td></tr>\
         <tr><td>executing / ready / processing</td><td>{} / {} / {}</td></tr></table>",
        esc(&w.address),
        w.nthreads,
        w.pid,
        fmt_bytes(w.rss),
        if w.memory_limit > 0 { fmt_bytes(w.memory_limit) } else { "no limit".into() },
        fmt_bytes(w.managed),
        w.nkeys,
        fmt_bytes(w.spilled),
        w.cpu,
        w.executing,
        w.ready,
        w.processing
    );
    let h = m.worker_history.get(&w.address).cloned().unwrap_or_default();
    let series = vec![
        ("stored", plots::group_color("stored"), h.iter().map(|s| (s.time, s.managed as f64)).collect()),
        ("process memory", plots::group_color("rss"), h.iter().map(|s| (s.time, s.rss as f64)).collect()),
        ("spilled", plots::group_color("spilled"), h.iter().map(|s| (s.time, s.spilled as f64)).collect()),
    ];
    let mem = plots::timeline(&series, m.time, 900, 220, "worker-memory", &|y| fmt_bytes(y as u64));
    let mut tasks = String::from("<table><thead><tr><th>key</th><th>group</th><th>thread</th><th>duration</th><th>ended</th></tr></thead><tbody>");
    for r in m.stream.iter().rev().filter(|r| r.worker == w.address).take(50) {
        let _ = write!(
            tasks,
            "<tr><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{:.1} s ago</td></tr>",
            esc(&r.key),
            esc(&r.group),
            r.thread,
            fmt_seconds(r.stop - r.start),
            m.time - r.stop
        );
    }
    tasks.push_str("</tbody></table>");
    json!({ "worker-name": format!("<h2>{}</h2>", esc(&w.name)), "worker-facts": facts, "worker-memory": mem, "worker-tasks": tasks })
}

/// `/tasks`: the long task stream.
pub fn tasks_page() -> String {
    shell(
        "tasks",
        "Tasks",
        "",
        r#"<div class="card"><h2>Task stream, everything kept <span class="zoom">
<button onclick="view(60, 0)">1 min</button><button onclick="view(300, 0)">5 min</button><button onclick="view(3600, 0)">1 h</button>
<button onclick="zoom(0.5)" title="zoom in">+</button><button onclick="zoom(2)" title="zoom out">&minus;</button>
<button onclick="pan(1)" title="earlier">&larr;</button><button onclick="pan(-1)" title="later">&rarr;</button>
<button onclick="view(shown()[0], 0)" title="follow the present">now</button></span></h2>
<div id="task-stream-view"></div><div id="task-stream-long"></div></div>
<script>
function shown() {
  const p = new URLSearchParams(location.search);
  return [parseFloat(p.get("span") || p.get("window") || "300"), parseFloat(p.get("end") || "0")];
}
function view(span, end) {
  span = Math.min(3600, Math.max(1, span)); end = Math.min(3600, Math.max(0, end));
  location.search = "?span=" + span.toFixed(1) + "&end=" + end.toFixed(1);
}
function zoom(f) { const [s, e] = shown(); const mid = e + s / 2; view(s * f, mid - s * f / 2); }
function pan(f) { const [s, e] = shown(); view(s, e + f * s / 2); }
</script>
<div class="card"><h2>Tasks per second</h2><div id="task-rate"></div></div>"#,
    )
}

/// `/tasks`' view of the stream: `span` seconds ending `end` seconds ago
/// (`span` or the older `window`, 1 s to 1 h, default 5 min; `end` 0 to 1 h).
pub fn tasks_view(span: Option<&str>, end: Option<&str>) -> (f64, f64) {
    let num = |v: Option<&str>| v.and_then(|v| v.parse::<f64>().ok()).filter(|v| v.is_finite());
    let span = num(span).unwrap_or(300.0).clamp(1.0, 3600.0);
    let end = num(end).unwrap_or(0.0).clamp(0.0, 3600.0);
    // Rounded, so that nearby views share one rendering.
    ((span * 10.0).round() / 10.0, (end * 10.0).round() / 10.0)
}

/// A span of time as people say it: `30 s`, `1.5 min`, `2 h`.
fn fmt_span(s: f64) -> String {
    let trim = |v: f64| format!("{v:.1}").trim_end_matches(".0").to_string();
    match s {
        s if s < 60.0 => format!("{} s", trim(s)),
        s if s < 3600.0 => format!("{} min", trim(s / 60.0)),
        s => format!("{} h", trim(s / 3600.0)),
    }
}

/// The fragments of `/tasks` for the view from [`tasks_view`].
pub fn tasks_fragments(m: &Model, span: f64, end: f64) -> serde_json::Value {
    let rate =
        vec![("tasks/s", plots::group_color("rate"), m.history.iter().map(|s| (s.time, s.tasks_per_second)).collect())];
    let until = if end > 0.0 { format!("ending {} ago", fmt_span(end)) } else { "ending now (live)".into() };
    json!({
        "task-stream-view": format!("<p class=\"view\" data-span=\"{span}\" data-end=\"{end}\">{} {until}</p>", fmt_span(span)),
        "task-stream-long": plots::task_stream_range(m, span, end, 1200, 520),
        "task-rate": plots::timeline(&rate, m.time, 1200, 200, "task-rate", &|y| format!("{y:.0}")),
    })
}

/// `/groups`: the task-group graph.
pub fn groups_page() -> String {
    shell(
        "groups",
        "Groups",
        "",
        r#"<div class="card"><h2>Task groups: columns by dependency depth, filled by the share done</h2><div id="groups-graph"></div></div>"#,
    )
}

/// The fragments of `/groups`.
pub fn groups_fragments(m: &Model) -> serde_json::Value {
    json!({ "groups-graph": plots::groups_graph(m, 1200) })
}

/// `/adaptive`: a cluster manager's target, running and pending workers
/// over time, and its decisions with their reasons.
pub fn adaptive_page() -> String {
    shell(
        "adaptive",
        "Adaptive",
        "",
        r#"<div class="card"><h2>Workers: target, running, pending</h2><div id="adaptive-plot"></div></div>
<div class="card"><h2>Decisions</h2><div id="adaptive-decisions"></div></div>"#,
    )
}

/// The fragments of `/adaptive`.
pub fn adaptive_fragments(m: &Model) -> serde_json::Value {
    if m.manager.is_empty() {
        let none = "<p>This scheduler is not run by a cluster manager: start one with <code>dask-ctl up</code> \
                    to see its scaling here (the target Dask would aim for is at <code>/api/v1/adaptive_target</code>).</p>";
        return json!({ "adaptive-plot": none, "adaptive-decisions": "" });
    }
    let series = |i: usize| m.manager.iter().map(|s| (s.0, [s.1, s.2, s.3][i] as f64)).collect::<Vec<_>>();
    let lines = vec![
        ("target", plots::group_color("target"), series(0)),
        ("running", plots::group_color("running"), series(1)),
        ("pending", plots::group_color("pending"), series(2)),
    ];
    let plot = plots::timeline(&lines, m.time, 1200, 260, "adaptive", &|y| format!("{y:.0}"));
    let mut t = String::from(
        "<table><thead><tr><th>when</th><th>decision</th><th>target</th><th>running</th><th>pending</th><th>why</th></tr></thead><tbody>",
    );
    for d in m.decisions.iter().rev().take(100) {
        let _ = write!(
            t,
            "<tr class=\"decision\"><td>{:.0} s ago</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td style=\"text-align:left\">{}</td></tr>",
            (m.time - d.time).max(0.0),
            esc(&d.kind),
            d.target,
            d.running,
            d.pending,
            esc(&d.reason)
        );
    }
    t.push_str("</tbody></table>");
    json!({ "adaptive-plot": plot, "adaptive-decisions": t })
}

/// `/info`: identity and uptime, configuration, the log's last lines.
pub fn info_page() -> String {
    shell(
        "info",
        "Info",
        "",
        r#"<div class="card"><h2>Cluster</h2><div id="info"></div></div>
<div class="card"><h2>Configuration</h2><div id="info-config"></div></div>
<div class="card"><h2>Log (this process, newest last)</h2><div id="info-log"></div></div>"#,
    )
}

/// The fragments of `/info`.
pub fn info_fragments(m: &Model, scheduler: &str, config: &[(String, String)], log: &[String]) -> serde_json::Value {
    let mut lines = String::new();
    for l in log {
        let _ = writeln!(lines, "{}", esc(l));
    }
    if lines.is_empty() {
        lines.push_str("(nothing logged yet)");
    }
    let mut table = String::from("<table class=\"config\">");
    for (k, v) in config {
        let _ = write!(table, "<tr><td>{}</td><td>{}</td></tr>", esc(k), esc(v));
    }
    table.push_str("</table>");
    if config.is_empty() {
        table = "<p>(not reported by this process)</p>".into();
    }
    json!({ "info-config": table, "info-log": format!("<pre class=\"log\">{lines}</pre>"), "info": format!(
        "<table><tr><td>scheduler</td><td>{}</td></tr><tr><td>version</td><td>dask-rs {}</td></tr>\
         <tr><td>watching for</td><td>{:.0} s</td></tr><tr><td>workers</td><td>{}</td></tr><tr><td>tasks seen finishing</td><td>{}</td></tr>\
         <tr><td>task-stream records dropped</td><td>{}</td></tr></table>",
        esc(scheduler), env!("CARGO_PKG_VERSION"), m.time - m.first_seen, m.workers.len(), m.tasks_finished, m.stream_dropped) })
}

/// One plot alone on a page (for embedding, e.g. in JupyterLab).
pub fn individual_page(plot: &str) -> String {
    let title = INDIVIDUAL.iter().find(|(p, _)| *p == plot).map_or(plot, |(_, t)| t);
    shell(plot, title, "", &format!("<div id=\"{}\"></div>", esc(plot)))
}

/// The fragment of one individual plot.
pub fn individual_fragments(m: &Model, plot: &str) -> serde_json::Value {
    let svg = match plot {
        "individual-task-stream" => plots::task_stream(m, 10.0, 800, 300),
        "individual-progress" => plots::progress(m, 600),
        "individual-workers-memory" => plots::memory(m, 600),
        "individual-processing" => plots::processing(m, 600),
        _ => {
            let h = &m.history;
            let series =
                vec![("stored", plots::group_color("stored"), h.iter().map(|s| (s.time, s.managed as f64)).collect())];
            plots::timeline(&series, m.time, 600, 240, "cluster-memory", &|y| fmt_bytes(y as u64))
        }
    };
    json!({ plot: svg })
}

/// Percent-encode a path segment.
pub fn urlencode(s: &str) -> String {
    s.bytes()
        .map(|b| {
            if b.is_ascii_alphanumeric() || b"-_.~".contains(&b) {
                (b as char).to_string()
            } else {
                format!("%{b:02X}")
            }
        })
        .collect()
}
