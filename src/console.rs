//! `dask-ctl tui`: the console's view of the registry and its control
//! paths (the same as `dask-ctl status`, `scale`, `adapt` and `down`).

use std::time::Duration;

use cluster::client::ClientCore;
use tui::{ClusterRow, Command, Source};

use crate::control::Request;
use crate::ctl;
use crate::registry;

/// The registry of this user's clusters, read afresh on every call.
pub struct Registry {
    /// Where the credentials for a bare scheduler address are
    /// (`--credentials`), else the environment's.
    pub credentials: Option<std::path::PathBuf>,
}

impl Source for Registry {
    fn security(&mut self, name: Option<&str>) -> Result<cluster::security::Security, String> {
        match name {
            Some(n) => registry::dir(n).and_then(|d| registry::security(&d)).map_err(|e| e.to_string()),
            None => match &self.credentials {
                Some(dir) if registry::credentials(dir).token_file.is_none() => {
                    Err(format!("no cluster token in {} (--credentials)", dir.display()))
                }
                Some(dir) => registry::security(dir).map_err(|e| format!("credentials in {}: {e}", dir.display())),
                None => cluster::security::Security::from_env().map_err(|e| e.to_string()),
            },
        }
    }

    fn clusters(&mut self) -> Vec<ClusterRow> {
        registry::list()
            .into_iter()
            .map(|(dir, rec)| {
                let st = ctl::live_status(&dir, &rec);
                let status = match (&st, rec.manager_alive()) {
                    (Ok(_), _) => "running",
                    (Err(_), true) => "unresponsive",
                    (Err(_), false) => "manager dead",
                };
                let mut row = ClusterRow {
                    name: rec.name.clone(),
                    backend: rec.backend.to_string(),
                    status: status.into(),
                    address: rec.address.clone(),
                    dashboard: rec.dashboard.clone(),
                    age: cluster::now() - rec.created,
                    ..Default::default()
                };
                if let Ok(s) = st {
                    row.running = s.running;
                    row.pending = s.pending;
                    row.threads = s.threads;
                    row.memory = s.memory_limit;
                    row.policy = s.policy;
                    row.decisions = s
                        .decisions
                        .into_iter()
                        .map(|d| cluster::monitor::Decision {
                            time: d.time,
                            kind: d.kind,
                            target: d.target,
                            running: d.running,
                            pending: d.pending,
                            reason: d.reason,
                        })
                        .collect();
                }
                row
            })
            .collect()
    }

    fn act(&mut self, name: &str, command: &Command) -> Result<String, String> {
        let done = match command {
            Command::Scale(n) => {
                ctl::send(name, Request::Scale { n: *n }).map(|_| format!("scaling {name} to {n} workers"))
            }
            Command::Adapt(lo, hi) => ctl::send(name, Request::Adapt { minimum: *lo, maximum: *hi })
                .map(|_| format!("scaling {name} adaptively between {lo} and {hi} workers")),
            Command::Down => ctl::stop_cluster(name).map(|(summary, notes)| {
                // (A manager that was not running shows in the clusters view already.)
                if notes.is_empty() {
                    summary
                } else {
                    format!("{summary} ({})", notes.join("; "))
                }
            }),
            Command::Retire(worker) => retire(name, worker),
        };
        done.map_err(|e| format!("{e:#}"))
    }

    fn log(&mut self, name: &str, worker: Option<&str>, lines: usize) -> Vec<String> {
        let Ok((dir, _)) = registry::find(name) else { return Vec::new() };
        let path = match worker {
            Some(w) => registry::log_dir(&dir).join(format!("{w}.log")),
            None => registry::log_dir(&dir).join("manager.log"),
        };
        let text = std::fs::read_to_string(&path).unwrap_or_default();
        let all: Vec<&str> = text.lines().collect();
        all[all.len().saturating_sub(lines)..].iter().map(|l| l.to_string()).collect()
    }
}

/// Retire one worker through the scheduler (its data moves first).
fn retire(name: &str, worker: &str) -> anyhow::Result<String> {
    let (dir, rec) = registry::find(name)?;
    let address = rec.address.ok_or_else(|| anyhow::anyhow!("{name} has no scheduler address yet"))?;
    let security = registry::security(&dir)?;
    let core = ClientCore::connect_monitor(&address, "dask-ctl-tui", Duration::from_secs(5), &security)?;
    let (retired, failed) = core.retire_workers(vec![worker.to_string()], Duration::from_secs(60))?;
    match (retired.first(), failed.first()) {
        (Some(w), _) => Ok(format!("retired {w}")),
        (None, Some((w, why))) => anyhow::bail!("{w} was not retired: {why}"),
        (None, None) => anyhow::bail!("no worker {worker:?} in {name}"),
    }
}
