//! The last lines this process logged, for `/info`: a `tracing` layer that
//! keeps the most recent [`KEEP`] events of the runtime's own crates (info
//! and above) in memory, whatever the process prints to its terminal.
//!
//! A process installs [`layer`] beside its usual output; the dashboard of
//! that process shows [`recent`].

use std::collections::VecDeque;
use std::fmt::Write as _;
use std::sync::Mutex;

use tracing::field::{Field, Visit};
use tracing::{Event, Level, Subscriber};
use tracing_subscriber::filter::Targets;
use tracing_subscriber::layer::{Context, Layer};

/// How many lines are kept.
pub const KEEP: usize = 300;

static LINES: Mutex<VecDeque<String>> = Mutex::new(VecDeque::new());

/// The kept lines, oldest first.
pub fn recent() -> Vec<String> {
    LINES.lock().map(|l| l.iter().cloned().collect()).unwrap_or_default()
}

/// Keep `line` (the oldest goes beyond [`KEEP`]).
fn push(line: String) {
    if let Ok(mut l) = LINES.lock() {
        if l.len() == KEEP {
            l.pop_front();
        }
        l.push_back(line);
    }
}

/// The layer to install: info and above from the runtime's crates, warnings
/// and errors from the libraries under them.
pub fn layer<S>() -> impl Layer<S>
where
    S: Subscriber + for<'a> tracing_subscriber::registry::LookupSpan<'a>,
{
    let ours = ["cluster", "dashboard", "adaptive", "deployers", "dask_ctl", "_core", "tui"];
    let targets = ours.iter().fold(Targets::new().with_default(Level::WARN), |t, c| t.with_target(*c, Level::INFO));
    Recorder.with_filter(targets)
}

struct Recorder;

impl<S: Subscriber> Layer<S> for Recorder {
    fn on_event(&self, event: &Event<'_>, _ctx: Context<'_, S>) {
        let meta = event.metadata();
        let mut fields = Fields::default();
        event.record(&mut fields);
        let secs = cluster::now();
        let day = secs.rem_euclid(86_400.0);
        let (h, m, s) = ((day / 3600.0) as u32, (day % 3600.0 / 60.0) as u32, day % 60.0);
        push(format!(
            "{h:02}:{m:02}:{s:06.3} {:>5} {}: {}{}",
            meta.level(),
            meta.target(),
            fields.message,
            fields.rest
        ));
    }
}

/// An event's message and its other fields as ` key=value`.
#[derive(Default)]
struct Fields {
    message: String,
    rest: String,
}

impl Visit for Fields {
    fn record_debug(&mut self, field: &Field, value: &dyn std::fmt::Debug) {
        if field.name() == "message" {
            let _ = write!(self.message, "{value:?}");
        } else {
            let _ = write!(self.rest, " {}={value:?}", field.name());
        }
    }

    fn record_str(&mut self, field: &Field, value: &str) {
        if field.name() == "message" {
            self.message.push_str(value);
        } else {
            let _ = write!(self.rest, " {}={value}", field.name());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tracing_subscriber::prelude::*;

    #[test]
    fn keeps_our_info_lines_and_only_warnings_from_others() {
        let subscriber = tracing_subscriber::registry().with(layer());
        tracing::subscriber::with_default(subscriber, || {
            tracing::info!(target: "cluster::scheduler", worker = "w1", "worker joined");
            tracing::info!(target: "hyper::proto", "chatter");
            tracing::warn!(target: "rustls::conn", "a library's warning");
            tracing::debug!(target: "cluster::comm", "too fine");
        });
        let lines = recent();
        assert!(lines.iter().any(|l| l.contains("INFO cluster::scheduler: worker joined worker=w1")), "{lines:?}");
        assert!(lines.iter().any(|l| l.contains("WARN rustls::conn: a library's warning")), "{lines:?}");
        assert!(!lines.iter().any(|l| l.contains("chatter") || l.contains("too fine")), "{lines:?}");
        for i in 0..KEEP + 5 {
            push(format!("line {i}"));
        }
        let lines = recent();
        assert_eq!(lines.len(), KEEP);
        assert_eq!(lines.last().map(String::as_str), Some(format!("line {}", KEEP + 4).as_str()));
    }
}
