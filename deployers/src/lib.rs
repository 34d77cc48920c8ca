//! dask-rs backends: how workers are started, stopped and watched.
//!
//! Each backend implements [`adaptive::Backend`] and reports what it owns
//! ([`Owned`]) so that `dask-ctl down` can clean up even after the cluster's
//! manager died. Options mean the same thing in every backend
//! ([`WorkerOptions`]).

pub mod local;
pub mod process;

use serde::{Deserialize, Serialize};

pub use adaptive::{Backend, BackendError, WorkerRecord, WorkerStatus};

/// Errors of this crate outside the [`Backend`] calls.
#[derive(Debug, thiserror::Error)]
pub enum DeployError {
    #[error("unknown backend {0:?} (choose local or ssh)")]
    UnknownBackend(String),
    #[error("{0}")]
    Check(String),
    #[error(transparent)]
    Io(#[from] std::io::Error),
}

/// How workers are made, whatever the backend. Every field is a flag of
/// `dask-ctl up` and a key of the config file.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct WorkerOptions {
    /// The Python that runs `python -m dask_rs worker`.
    pub python: String,
    /// Threads per worker process.
    pub nthreads: u32,
    /// Memory limit per worker process (`4GiB`), passed to the worker.
    pub memory_limit: Option<String>,
    /// Worker processes per job or host slot.
    pub processes: u32,
    /// Cores per job (batch backends).
    pub cores: Option<u32>,
    /// Memory per job (batch backends).
    pub memory: Option<String>,
    /// Wall-clock limit per job (batch backends), e.g. `01:00:00`.
    pub walltime: Option<String>,
    /// Queue or partition (batch backends).
    pub queue: Option<String>,
    /// Account or project (batch backends).
    pub account: Option<String>,
    /// Extra batch directives.
    pub job_extra: Vec<String>,
    /// Shell lines run before the worker starts (module loads, venv activation).
    pub prologue: Vec<String>,
    /// Extra arguments for `python -m dask_rs worker`.
    pub worker_extra_args: Vec<String>,
    /// Hosts to start workers on (ssh).
    pub hosts: Vec<String>,
    /// Scheduler address workers connect to, when it differs from the one it
    /// listens on (NAT, several interfaces).
    pub contact_address: Option<String>,
}

impl WorkerOptions {
    /// The worker command for one worker named `name`.
    pub fn worker_command(&self, scheduler: &str, name: &str) -> Vec<String> {
        let mut cmd = vec![
            self.python.clone(),
            "-m".into(),
            "dask_rs".into(),
            "worker".into(),
            scheduler.to_string(),
            "--name".into(),
            name.to_string(),
            "--nthreads".into(),
            self.nthreads.max(1).to_string(),
        ];
        if let Some(m) = &self.memory_limit {
            cmd.push("--memory-limit".into());
            cmd.push(m.clone());
        }
        cmd.extend(self.worker_extra_args.iter().cloned());
        cmd
    }
}

/// Something a backend started, recorded so it can be removed after a crash.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "lowercase")]
pub enum Owned {
    /// A local process; `start_time` (from /proc) guards against pid reuse.
    Process { name: String, pid: u32, start_time: u64 },
}

/// A backend that also says what it owns.
pub trait Deployer: Backend {
    fn owned(&self) -> Vec<Owned>;
}

/// Remove everything in `owned`; returns what could not be removed, with why.
pub fn cleanup(owned: &[Owned]) -> Vec<String> {
    let mut errors = Vec::new();
    for o in owned {
        match o {
            Owned::Process { name, pid, start_time } => {
                if let Err(e) = process::terminate(*pid, Some(*start_time), std::time::Duration::from_secs(5)) {
                    errors.push(format!("{name} (pid {pid}): {e}"));
                }
            }
        }
    }
    errors
}

/// Whether anything in `owned` is still alive.
pub fn any_alive(owned: &[Owned]) -> Vec<String> {
    owned
        .iter()
        .filter_map(|o| match o {
            Owned::Process { name, pid, start_time } => {
                process::is_alive(*pid, Some(*start_time)).then(|| format!("{name} (pid {pid})"))
            }
        })
        .collect()
}
