//! `dask-ctl tui`: the terminal console. The clusters view lists every
//! registered cluster; the cluster view follows one scheduler (workers with
//! memory gauges, task-group progress, the task stream, tasks per second);
//! `:` commands act through the same control paths as `dask-ctl scale`,
//! `adapt` and `down`.
//!
//! The state and its keys are pure ([`app`]); drawing is a pure function of
//! the state ([`views`]); this module is the driver: the terminal, the
//! clock, the scheduler subscription and the [`Source`] of clusters.

pub mod app;
pub mod source;
pub mod views;

use std::io::Stdout;
use std::time::{Duration, Instant};

use cluster::client::ClientCore;
use cluster::monitor::Model;
use crossterm::event::{self, Event, KeyEventKind};
use crossterm::terminal::{disable_raw_mode, enable_raw_mode, EnterAlternateScreen, LeaveAlternateScreen};
use crossterm::ExecutableCommand;
use ratatui::backend::CrosstermBackend;
use ratatui::Terminal;

pub use app::{App, Effect, View};
pub use source::{ClusterRow, Command, Source};

/// Errors of the console.
#[derive(Debug, thiserror::Error)]
pub enum TuiError {
    #[error("the console needs a terminal: {0}")]
    Terminal(#[from] std::io::Error),
    #[error("cannot follow {target}: {reason}")]
    Open { target: String, reason: String },
}

/// How the console starts.
#[derive(Debug, Clone, Default)]
pub struct Options {
    /// A registered cluster name or `tcp://HOST:PORT` to open at once.
    pub open: Option<String>,
    /// Refuse every command that changes a cluster.
    pub readonly: bool,
    /// Draw without colours (`NO_COLOR`).
    pub no_color: bool,
}

/// Puts the terminal back as it was, whatever happens (drop, panic).
struct Restore;

impl Drop for Restore {
    fn drop(&mut self) {
        let _ = disable_raw_mode();
        let _ = std::io::stdout().execute(LeaveAlternateScreen);
        let _ = std::io::stdout().execute(crossterm::cursor::Show);
    }
}

/// Run the console until `q` (or SIGTERM / SIGINT, which also restore the
/// terminal).
pub fn run(options: Options, mut source: Box<dyn Source>) -> Result<(), TuiError> {
    let mut app = App::new(options.readonly);
    app.clusters = source.clusters();
    let mut follow: Option<ClientCore> = None;
    if let Some(target) = &options.open {
        follow = Some(open(&mut app, &mut *source, target)?);
    }
    let stop = signal_flag();
    enable_raw_mode()?;
    let _restore = Restore;
    std::io::stdout().execute(EnterAlternateScreen)?;
    let mut terminal: Terminal<CrosstermBackend<Stdout>> = Terminal::new(CrosstermBackend::new(std::io::stdout()))?;
    let palette = views::Palette { color: !options.no_color };
    let mut next_refresh = Instant::now();
    // Draw when something changed: a key, an update, the clusters' refresh.
    let mut dirty = true;
    loop {
        if stop.load(std::sync::atomic::Ordering::Relaxed) {
            return Ok(());
        }
        if Instant::now() >= next_refresh {
            app.clusters = source.clusters();
            dirty = true;
            if let (Some(View::Worker | View::Logs), Some(name)) = (app.view, app.cluster_name().map(String::from)) {
                let worker = if app.view == Some(View::Worker) { app.worker.clone() } else { None };
                app.log = source.log(&name, worker.as_deref(), 200);
            }
            next_refresh = Instant::now() + Duration::from_secs(1);
        }
        if let Some(core) = &follow {
            for u in core.take_events(Duration::ZERO) {
                app.model.apply(u);
                dirty = true;
            }
            let link = core.closed_reason();
            dirty |= link != app.link;
            app.link = link;
        }
        if std::mem::take(&mut dirty) {
            terminal.draw(|f| views::draw(f, &app, palette))?;
        }
        if !event::poll(Duration::from_millis(250))? {
            continue;
        }
        dirty = true;
        let Event::Key(key) = event::read()? else { continue };
        if key.kind != KeyEventKind::Press {
            continue;
        }
        let view = app.view;
        let effect = app.key(key);
        if app.view != view {
            // A new view shows its logs at once.
            next_refresh = Instant::now();
        }
        match effect {
            None => {}
            Some(Effect::Quit) => return Ok(()),
            Some(Effect::Close) => follow = None,
            Some(Effect::Open(target)) => match open(&mut app, &mut *source, &target) {
                Ok(core) => follow = Some(core),
                Err(e) => app.answer(Err(e.to_string())),
            },
            Some(Effect::Act(name, command)) => {
                let result = source.act(&name, &command);
                app.answer(result);
                next_refresh = Instant::now();
            }
        }
    }
}

/// Follow `target` (a registered name, or an address) as a monitor.
fn open(app: &mut App, source: &mut dyn Source, target: &str) -> Result<ClientCore, TuiError> {
    let err = |reason: String| TuiError::Open { target: target.to_string(), reason };
    let (name, address) = if target.starts_with("tcp://") || target.starts_with("tls://") {
        (None, target.to_string())
    } else {
        let row = source.clusters().into_iter().find(|c| c.name == target);
        let row = row.ok_or_else(|| err(format!("no cluster named {target:?} (`dask-ctl list` shows them)")))?;
        let address = row.address.ok_or_else(|| err("its scheduler has no address yet".into()))?;
        (Some(row.name), address)
    };
    let security = source.security(name.as_deref()).map_err(&err)?;
    let core = ClientCore::connect_monitor(&address, "dask-ctl-tui", Duration::from_secs(5), &security)
        .map_err(|e| err(e.to_string()))?;
    core.subscribe(Duration::from_millis(500)).map_err(|e| err(e.to_string()))?;
    app.view = Some(View::Cluster);
    app.current = Some((name, address));
    app.model = Model::default();
    app.selected = 0;
    app.filter.clear();
    app.message = None;
    Ok(core)
}

/// A flag set by SIGTERM or SIGINT (raw mode turns Ctrl-C into a key, so
/// SIGINT comes only from `kill`).
fn signal_flag() -> std::sync::Arc<std::sync::atomic::AtomicBool> {
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::Arc;
    static FLAG: std::sync::OnceLock<Arc<AtomicBool>> = std::sync::OnceLock::new();
    let flag = FLAG.get_or_init(|| Arc::new(AtomicBool::new(false))).clone();
    extern "C" fn on_signal(_: i32) {
        if let Some(f) = FLAG.get() {
            f.store(true, Ordering::Relaxed);
        }
    }
    // SAFETY: the handler only stores to an atomic, which is signal-safe.
    unsafe {
        libc::signal(libc::SIGTERM, on_signal as *const () as libc::sighandler_t);
        libc::signal(libc::SIGINT, on_signal as *const () as libc::sighandler_t);
    }
    flag
}
