//! What the console reads and acts through, provided by `dask-ctl`: the
//! registry of clusters and the control paths of `scale`, `adapt` and
//! `down`. The console itself knows nothing of registries or sockets.

/// One registered cluster, as the clusters view lists it.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct ClusterRow {
    pub name: String,
    pub backend: String,
    /// `running`, `manager not running`, ...
    pub status: String,
    /// Scheduler address, once known.
    pub address: Option<String>,
    pub dashboard: Option<String>,
    pub running: usize,
    pub pending: usize,
    pub threads: u64,
    pub memory: u64,
    /// Seconds since it was started.
    pub age: f64,
    /// `fixed(N)` or `adaptive(MIN..MAX)`.
    pub policy: String,
    /// The manager's latest scaling decisions, oldest first.
    pub decisions: Vec<cluster::monitor::Decision>,
}

/// An action on a managed cluster.
#[derive(Debug, Clone, PartialEq)]
pub enum Command {
    Scale(usize),
    Adapt(usize, usize),
    Down,
    Retire(String),
}

/// The registry and the control paths.
pub trait Source: Send {
    /// Every registered cluster, now.
    fn clusters(&mut self) -> Vec<ClusterRow>;
    /// Carry out `command` on cluster `name`; the answer to show, or why not.
    fn act(&mut self, name: &str, command: &Command) -> Result<String, String>;
    /// The last `lines` lines of cluster `name`'s manager log, or of one
    /// of its workers' logs.
    fn log(&mut self, name: &str, worker: Option<&str>, lines: usize) -> Vec<String>;
    /// The credential to follow cluster `name` with (for an address rather
    /// than a name, `None`): the environment's, unless the source knows it.
    fn security(&mut self, name: Option<&str>) -> Result<cluster::security::Security, String> {
        let _ = name;
        cluster::security::Security::from_env().map_err(|e| e.to_string())
    }
}
