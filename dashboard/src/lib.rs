//! The web dashboard: live pages of a cluster (`/status`, `/workers`,
//! `/tasks`, `/info`, single plots for embedding), `/metrics` for
//! Prometheus, `/health` and a small JSON API.
//!
//! It runs beside a scheduler and reads it the way any monitor would: a
//! [`ClientCore`] connected as a monitor and subscribed to the scheduler's
//! events feeds a [`Model`] on the dashboard's own thread; HTTP runs on
//! another thread with its own runtime and renders from the model. The
//! scheduler's loop only produces the events update it produces for every
//! subscriber, bounded per tick, so no viewer can slow scheduling or grow
//! the scheduler's memory.

pub mod logbook;
mod metrics;
mod pages;
mod plots;
mod report;
mod server;

use cluster::security::Security;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use cluster::client::ClientCore;

pub use cluster::monitor::{Decision, Model};
pub use metrics::ManagerGauges;
pub use report::{report_html, task_stream_svg};

/// Dask's dashboard port.
pub const DEFAULT_PORT: u16 = 8787;

/// Errors of starting a dashboard.
#[derive(Debug, thiserror::Error)]
pub enum DashboardError {
    #[error("invalid dashboard address {0:?}: expected HOST:PORT, :PORT or PORT")]
    Address(String),
    #[error("cannot listen on {addr}: {source}")]
    Bind { addr: String, source: std::io::Error },
    #[error("the dashboard cannot follow the scheduler at {addr}: {reason}")]
    Scheduler { addr: String, reason: String },
    #[error("i/o error: {0}")]
    Io(#[from] std::io::Error),
}

/// A running dashboard; stopped when dropped.
pub struct Dashboard {
    url: String,
    /// Set when the requested port was taken and another was chosen.
    warning: Option<String>,
    shared: Arc<server::Shared>,
    stop: Arc<AtomicBool>,
    shutdown: Option<tokio::sync::oneshot::Sender<()>>,
    threads: Vec<std::thread::JoinHandle<()>>,
}

/// `HOST:PORT`, `:PORT` or `PORT` into host and port; an empty host is
/// `default_host`.
pub fn parse_address(address: &str, default_host: &str) -> Result<(String, u16), DashboardError> {
    let bad = || DashboardError::Address(address.to_string());
    let a = address.trim().trim_start_matches("http://");
    let (host, port) = match a.rsplit_once(':') {
        Some((h, p)) => (h.trim_matches(|c| c == '[' || c == ']'), p),
        None => ("", a),
    };
    let port: u16 = port.parse().map_err(|_| bad())?;
    let host = if host.is_empty() { default_host } else { host };
    Ok((host.to_string(), port))
}

/// This machine's host name, for links when listening on every interface.
fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|s| s.trim().to_string())
        .ok()
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| "localhost".into())
}

impl Dashboard {
    /// Serve the dashboard of the scheduler at `scheduler` on `address`
    /// (`HOST:PORT`, `:PORT` or `PORT`; an empty host means `default_host`,
    /// normally the interface the scheduler listens on). When the port is
    /// taken, a free one is used and [`warning`](Self::warning) says so.
    ///
    /// With a cluster token in `security`, the dashboard follows the
    /// scheduler with it, and when it listens on more than loopback every
    /// page but `/health` asks for the token too ([`url`](Self::url)
    /// carries it).
    pub fn start(
        scheduler: &str,
        address: &str,
        default_host: &str,
        security: &Security,
    ) -> Result<Dashboard, DashboardError> {
        let (host, port) = parse_address(address, default_host)?;
        let bind = |port: u16| std::net::TcpListener::bind((host.as_str(), port));
        let (listener, warning) = match bind(port) {
            Ok(l) => (l, None),
            Err(e) if e.kind() == std::io::ErrorKind::AddrInUse && port != 0 => {
                let l = bind(0).map_err(|source| DashboardError::Bind { addr: format!("{host}:0"), source })?;
                let chosen = l.local_addr()?.port();
                (l, Some(format!("port {port} is already in use; the dashboard is on port {chosen} instead")))
            }
            Err(source) => return Err(DashboardError::Bind { addr: format!("{host}:{port}"), source }),
        };
        listener.set_nonblocking(true)?;
        let local = listener.local_addr()?;
        let url_host = if cluster::comm::is_wildcard_host(&host) { hostname() } else { local.ip().to_string() };
        let url_host = if url_host.contains(':') { format!("[{url_host}]") } else { url_host };
        let guarded = security.token().filter(|_| !local.ip().is_loopback()).map(String::from);
        let url = match &guarded {
            Some(token) => format!("http://{url_host}:{}/status?token={token}", local.port()),
            None => format!("http://{url_host}:{}/status", local.port()),
        };

        let scheduler_err = |reason: String| DashboardError::Scheduler { addr: scheduler.to_string(), reason };
        let core = ClientCore::connect_monitor(scheduler, "dashboard", Duration::from_secs(10), security)
            .map_err(|e| scheduler_err(e.to_string()))?;
        core.subscribe(Duration::from_millis(250)).map_err(|e| scheduler_err(e.to_string()))?;
        let core = Arc::new(core);
        let retirer = core.clone();
        let retire = Box::new(move |workers: Vec<String>| {
            retirer.retire_workers(workers, Duration::from_secs(60)).map_err(|e| e.to_string())
        });
        let shared = Arc::new(server::Shared::new(scheduler.to_string(), retire, guarded));
        let stop = Arc::new(AtomicBool::new(false));

        let feeder = {
            let (shared, stop) = (shared.clone(), stop.clone());
            std::thread::Builder::new().name("dask-rs-dashboard-feed".into()).spawn(move || {
                while !stop.load(Ordering::Relaxed) {
                    let updates = core.take_events(Duration::from_millis(200));
                    if !updates.is_empty() {
                        let mut m = shared.model.lock().expect("model");
                        for u in updates {
                            m.apply(u);
                        }
                    }
                }
            })?
        };
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        let http = {
            let shared = shared.clone();
            // Named, so its cost can be measured per thread (`bench/suite.py`).
            let rt = tokio::runtime::Builder::new_current_thread()
                .thread_name("dask-rs-dashboard-render")
                .enable_all()
                .build()?;
            std::thread::Builder::new().name("dask-rs-dashboard-http".into()).spawn(move || {
                rt.block_on(async move {
                    let listener = match tokio::net::TcpListener::from_std(listener) {
                        Ok(l) => l,
                        Err(e) => return tracing::error!("dashboard: {e}"),
                    };
                    let app = server::router(shared);
                    let served = axum::serve(listener, app).with_graceful_shutdown(async {
                        let _ = rx.await;
                    });
                    if let Err(e) = served.await {
                        tracing::error!("dashboard: {e}");
                    }
                });
            })?
        };
        if let Some(w) = &warning {
            tracing::warn!("{w}");
        }
        Ok(Dashboard { url, warning, shared, stop, shutdown: Some(tx), threads: vec![feeder, http] })
    }

    /// The link to `/status` (with the token, when pages ask for it).
    pub fn url(&self) -> &str {
        &self.url
    }

    /// Why the dashboard is not on the port asked for, if it is not.
    pub fn warning(&self) -> Option<&str> {
        self.warning.as_deref()
    }

    /// Report the cluster manager's figures (Adaptive's target, running and
    /// pending workers) for `/metrics` and `/api/v1/adaptive_target`.
    pub fn set_manager_gauges(&self, gauges: ManagerGauges) {
        *self.shared.manager.lock().expect("manager") = Some(gauges);
    }

    /// Report the manager's figures and its decisions for the `/adaptive`
    /// page (and `/metrics`).
    pub fn set_manager(&self, gauges: ManagerGauges, decisions: Vec<Decision>) {
        self.set_manager_gauges(gauges);
        let mut m = self.shared.model.lock().expect("model");
        let now = if m.time > 0.0 { m.time } else { cluster::now() };
        m.set_manager(now, gauges.target, gauges.running, gauges.pending, decisions);
    }

    /// Show `config` (name, value pairs: how the scheduler or cluster was
    /// set up) on `/info`.
    pub fn set_config(&self, config: Vec<(String, String)>) {
        *self.shared.config.lock().expect("config") = config;
    }

    /// Stop serving and following the scheduler.
    pub fn stop(mut self) {
        self.halt();
    }

    fn halt(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

impl Drop for Dashboard {
    fn drop(&mut self) {
        self.halt();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn addresses() {
        assert_eq!(parse_address(":8787", "127.0.0.1").unwrap(), ("127.0.0.1".into(), 8787));
        assert_eq!(parse_address("0.0.0.0:9000", "127.0.0.1").unwrap(), ("0.0.0.0".into(), 9000));
        assert_eq!(parse_address("8788", "h").unwrap(), ("h".into(), 8788));
        assert_eq!(parse_address("[::1]:1", "h").unwrap(), ("::1".into(), 1));
        assert!(parse_address("nope", "h").is_err());
        assert!(parse_address("h:99999", "h").is_err());
    }
}
