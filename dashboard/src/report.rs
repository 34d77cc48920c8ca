//! A stretch of work as one self-contained HTML file (Python's
//! `performance_report`): the facts, the task stream of the stretch, tasks
//! per second, progress of the task groups that ran and memory per worker
//! at its end. No scripts and nothing loaded from elsewhere, so it opens
//! offline, anywhere.

use std::fmt::Write;

use cluster::protocol::EventsUpdate;

use crate::plots::{self, esc};
use cluster::monitor::Model;

/// The report of the work between `start` and `stop` (Unix seconds), from a
/// snapshot of the scheduler's events (`update`: the task-stream ring, the
/// groups, the workers) and `facts` to list first.
pub fn report_html(mut update: EventsUpdate, start: f64, stop: f64, title: &str, facts: &[(String, String)]) -> String {
    update.stream.retain(|r| r.stop >= start && r.stop <= stop);
    let ran: std::collections::BTreeSet<String> = update.stream.iter().map(|r| r.group.clone()).collect();
    update.groups.retain(|g| ran.contains(&g.name));
    let mut m = Model::default();
    m.apply(update);
    m.time = stop;
    let window = (stop - start).max(1e-3);
    // Tasks finished per second, in 100 bins over the stretch.
    let bins = 100usize;
    let width = window / bins as f64;
    let mut counts = vec![0u64; bins];
    for r in &m.stream {
        let i = (((r.stop - start) / width) as usize).min(bins - 1);
        counts[i] += 1;
    }
    let rate: Vec<(f64, f64)> =
        counts.iter().enumerate().map(|(i, n)| (start + (i as f64 + 0.5) * width, *n as f64 / width)).collect();
    let rate_plot =
        plots::timeline(&[("tasks/s", plots::group_color("rate"), rate)], stop, 1200, 220, "task-rate", &|y| {
            format!("{y:.0}")
        });
    let mut rows = String::new();
    for (k, v) in facts {
        let _ = write!(rows, "<tr><td>{}</td><td>{}</td></tr>", esc(k), esc(v));
    }
    format!(
        "<!doctype html><html lang=\"en\"><head><meta charset=\"utf-8\"><title>{title}</title><style>{STYLE}</style></head><body>\
         <h1>{title}</h1><table class=\"facts\">{rows}</table>\
         <h2>Task stream</h2>{}\
         <h2>Tasks per second</h2>{rate_plot}\
         <div class=\"two\"><div><h2>Task groups that ran</h2>{}</div><div><h2>Memory per worker at the end</h2>{}</div></div>\
         </body></html>",
        plots::task_stream(&m, window, 1200, 420),
        plots::progress(&m, 640),
        plots::memory(&m, 560),
        title = esc(title),
    )
}

/// The task stream of the work between `start` and `stop` alone, as SVG
/// (Python's `get_task_stream(plot=True)`).
pub fn task_stream_svg(mut update: EventsUpdate, start: f64, stop: f64, width: u32, height: u32) -> String {
    update.stream.retain(|r| r.stop >= start && r.stop <= stop);
    let mut m = Model::default();
    m.apply(update);
    m.time = stop;
    plots::task_stream(&m, (stop - start).max(1e-3), width, height)
}

const STYLE: &str = "
:root { color-scheme: light dark; }
body { font: 14px/1.4 system-ui, sans-serif; margin: 1em 2em; }
h1 { font-size: 20px; } h2 { font-size: 15px; margin: 1.2em 0 .3em; color: #777; }
table.facts td { padding: 2px 12px 2px 0; } table.facts td:first-child { color: #777; }
.two { display: flex; gap: 2em; flex-wrap: wrap; }
svg.plot { display: block; max-width: 100%; height: auto; }
";

#[cfg(test)]
mod tests {
    use super::*;
    use cluster::protocol::{GroupCounts, TaskStreamRecord, WorkerInfo};

    #[test]
    fn keeps_only_the_stretch_and_the_groups_that_ran_in_it() {
        let rec = |key: &str, group: &str, stop: f64| TaskStreamRecord {
            key: key.into(),
            group: group.into(),
            worker: "tcp://h:1".into(),
            thread: 0,
            start: stop - 0.5,
            stop,
            transfer: 0.0,
            erred: false,
        };
        let update = EventsUpdate {
            time: 200.0,
            stream: vec![rec("old-1", "old", 50.0), rec("inc-1", "inc", 120.0), rec("inc-2", "inc", 130.0)],
            groups: vec![
                GroupCounts { name: "old".into(), memory: 1, ..Default::default() },
                GroupCounts { name: "inc".into(), memory: 2, ..Default::default() },
            ],
            workers: vec![WorkerInfo::new("w0", "tcp://h:1", 1, 1 << 30)],
            ..Default::default()
        };
        let html = report_html(update, 100.0, 150.0, "My <report>", &[("tasks".into(), "2".into())]);
        assert!(html.contains("<title>My &lt;report&gt;</title>"));
        assert!(html.contains("data-group=\"inc\"") && !html.contains("data-group=\"old\""));
        assert!(html.contains("data-key=\"inc\"") && !html.contains("data-key=\"old\""));
        assert!(!html.contains("<script"), "nothing to run, nothing to fetch");
        assert!(html.contains("<td>tasks</td><td>2</td>"));
    }
}
