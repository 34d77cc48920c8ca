//! dask-rs backends: how workers are started, stopped and watched.
//!
//! Each backend implements [`adaptive::Backend`] and reports what it owns
//! ([`Owned`]) so that `dask-ctl down` can clean up even after the cluster's
//! manager died. Options mean the same thing in every backend
//! ([`WorkerOptions`]).

pub mod batch;
mod children;
pub mod credentials;
pub mod kubernetes;
pub mod local;
pub mod marathon;
pub mod process;
pub mod ssh;

use serde::{Deserialize, Serialize};

pub use adaptive::{Backend, BackendError, WorkerRecord, WorkerStatus};
pub use credentials::Credentials;

/// Errors of this crate outside the [`Backend`] calls.
#[derive(Debug, thiserror::Error)]
pub enum DeployError {
    #[error("unknown backend {0:?} (available: {list})", list = BackendKind::list())]
    UnknownBackend(String),
    /// An option a backend cannot use, with why.
    #[error("{0}")]
    Invalid(String),
}

/// Make rustls use *ring* (the TLS provider the rest of dask-rs uses) for
/// HTTPS clients that do not name one.
pub(crate) fn install_crypto_provider() {
    let _ = rustls::crypto::ring::default_provider().install_default();
}

/// Where workers run: the backends `dask-ctl up --backend` offers. Stored
/// in cluster records by its lowercase name.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum BackendKind {
    /// Processes on this machine.
    #[default]
    Local,
    /// Processes started over ssh on a list of hosts.
    Ssh,
    /// One SLURM batch job per worker group.
    Slurm,
    /// One Grid Engine batch job per worker group.
    Sge,
    /// The tasks of one Marathon app.
    Marathon,
    /// One pod per worker.
    Kubernetes,
}

impl BackendKind {
    /// Every backend, in the order help texts list them.
    pub const ALL: [BackendKind; 6] = [
        BackendKind::Local,
        BackendKind::Ssh,
        BackendKind::Slurm,
        BackendKind::Sge,
        BackendKind::Kubernetes,
        BackendKind::Marathon,
    ];

    /// The name users type (`--backend`, config file sections).
    pub fn name(self) -> &'static str {
        match self {
            BackendKind::Local => "local",
            BackendKind::Ssh => "ssh",
            BackendKind::Slurm => "slurm",
            BackendKind::Sge => "sge",
            BackendKind::Marathon => "marathon",
            BackendKind::Kubernetes => "kubernetes",
        }
    }

    /// The batch system behind a batch backend.
    pub fn batch_system(self) -> Option<batch::System> {
        match self {
            BackendKind::Slurm => Some(batch::System::Slurm),
            BackendKind::Sge => Some(batch::System::Sge),
            BackendKind::Local | BackendKind::Ssh | BackendKind::Marathon | BackendKind::Kubernetes => None,
        }
    }

    /// Whether workers run on other machines, so that the scheduler must
    /// listen on more than loopback.
    pub fn remote_workers(self) -> bool {
        self != BackendKind::Local
    }

    fn list() -> String {
        BackendKind::ALL.map(BackendKind::name).join(", ")
    }
}

impl std::str::FromStr for BackendKind {
    type Err = DeployError;

    fn from_str(s: &str) -> Result<Self, DeployError> {
        match BackendKind::ALL.into_iter().find(|b| b.name() == s) {
            Some(b) => Ok(b),
            None => Err(DeployError::UnknownBackend(s.to_string())),
        }
    }
}

impl std::fmt::Display for BackendKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.pad(self.name())
    }
}

/// How workers are made, whatever the backend. Every field is a flag of
/// `dask-ctl up` and a key of the config file.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct WorkerOptions {
    /// The Python that runs `python -m dask_rs worker`.
    pub python: String,
    /// Threads per worker process; 0 = cores / processes for batch jobs, else 1.
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
    /// Shell lines run after the worker exits (batch jobs).
    pub epilogue: Vec<String>,
    /// Generated batch directives to leave out: any line containing one of these.
    pub job_directives_skip: Vec<String>,
    /// Where batch jobs write their output (default: the cluster's log directory).
    pub log_directory: Option<String>,
    /// Extra arguments for `python -m dask_rs worker`.
    pub worker_extra_args: Vec<String>,
    /// Hosts to start workers on (ssh): anything `ssh` accepts as a destination.
    pub hosts: Vec<String>,
    /// Extra arguments for every `ssh` call, before the host (`-F FILE`, `-i KEY`, `-J JUMP`).
    pub ssh_args: Vec<String>,
    /// Scheduler address workers connect to, when it differs from the one it
    /// listens on (NAT, several interfaces).
    pub contact_address: Option<String>,
    /// CPUs per worker, possibly fractional (kubernetes request, marathon
    /// `cpus`); default: `cores`, else 1.
    pub cpus: Option<f64>,
    /// Container image (kubernetes; marathon's Docker image, optional there).
    pub image: Option<String>,
    /// `NAME=VALUE` set in every worker's environment (kubernetes, marathon).
    pub env: Vec<String>,
    /// Kubernetes namespace (default: the context's, else `default`).
    pub namespace: Option<String>,
    /// Kubeconfig file (default: `$KUBECONFIG`, `~/.kube/config`, or the
    /// in-cluster service account).
    pub kubeconfig: Option<String>,
    /// Kubeconfig context (default: the current one).
    pub context: Option<String>,
    /// Service account of worker pods.
    pub service_account: Option<String>,
    /// Pod CPU limit (default: the request, `cpus`).
    pub cpu_limit: Option<String>,
    /// Pod memory limit (default: the request, `memory`).
    pub pod_memory_limit: Option<String>,
    /// `KEY=VALUE` node labels worker pods must run on.
    pub node_selector: Vec<String>,
    /// Taints worker pods tolerate: `KEY=VALUE:EFFECT`, `KEY:EFFECT` (any
    /// value) or `KEY` (any value, any effect).
    pub tolerations: Vec<String>,
    /// YAML or JSON pod manifest merged under the generated one (volumes,
    /// sidecars, affinity...).
    pub pod_template: Option<String>,
    /// Secrets holding registry credentials for pulling the image.
    pub image_pull_secrets: Vec<String>,
    /// Marathon's address, e.g. `http://marathon.mesos:8080`.
    pub marathon_url: Option<String>,
    /// Marathon app of the workers (default: `/dask-rs/NAME`).
    pub app_id: Option<String>,
    /// File with `USER:PASSWORD` (HTTP basic auth) or a token (sent as
    /// `Authorization: token=...`), for Marathon.
    pub marathon_auth_file: Option<String>,
    /// Marathon placement constraints: `FIELD:OPERATOR[:VALUE]`, e.g. `hostname:UNIQUE`.
    pub constraints: Vec<String>,
}

impl WorkerOptions {
    /// Threads per worker process: `nthreads`, or cores shared among the
    /// job's processes, or 1.
    pub fn threads(&self) -> u32 {
        if self.nthreads > 0 {
            self.nthreads
        } else if let Some(c) = self.cores {
            (c / self.processes.max(1)).max(1)
        } else {
            self.cpus.map_or(1, |c| (c.ceil() as u32).max(1))
        }
    }

    /// `env` as pairs; an entry without `=` is an error naming it.
    pub fn env_pairs(&self) -> Result<Vec<(String, String)>, BackendError> {
        self.env
            .iter()
            .map(|e| match e.split_once('=') {
                Some((k, v)) if !k.is_empty() => Ok((k.to_string(), v.to_string())),
                _ => Err(BackendError::ScaleUp(format!("--env {e:?}: expected NAME=VALUE"))),
            })
            .collect()
    }

    /// The address workers should connect to: `contact_address` (a bare host
    /// gets the scheduler's port) or else the scheduler's own address.
    pub fn contact(&self, scheduler: &str) -> String {
        match self.contact_address.as_deref().filter(|c| !c.is_empty()) {
            None => scheduler.to_string(),
            Some(c) => {
                // Workers speak what the scheduler speaks, whatever scheme was written.
                let scheme = if cluster::comm::is_tls_address(scheduler) { "tls" } else { "tcp" };
                let c = cluster::comm::strip_scheme(c);
                let has_port = match c.rfind(':') {
                    Some(i) => !c.starts_with('[') || c[..i].ends_with(']'),
                    None => false,
                };
                if has_port {
                    format!("{scheme}://{c}")
                } else {
                    format!("{scheme}://{c}:{}", port_of(scheduler).unwrap_or(8786))
                }
            }
        }
    }

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
            self.threads().to_string(),
        ];
        if let Some(m) = &self.memory_limit {
            cmd.push("--memory-limit".into());
            cmd.push(m.clone());
        }
        cmd.extend(self.worker_extra_args.iter().cloned());
        cmd
    }
}

/// The port of a `tcp://HOST:PORT` address.
pub fn port_of(address: &str) -> Option<u16> {
    address.rsplit(':').next()?.parse().ok()
}

/// Bytes in `4GiB`, `500MB`, `2G`, `1e9` (Dask's units: k/M/G/T are powers of
/// 1000, Ki/Mi/Gi/Ti powers of 1024; a trailing `B` is optional).
pub fn parse_bytes(text: &str) -> Option<u64> {
    let t = text.trim();
    let split = t.find(|c: char| c.is_ascii_alphabetic() && c != 'e' && c != 'E').unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let num: f64 = num.trim().parse().ok()?;
    let unit = unit.trim().to_ascii_lowercase();
    let unit = unit.strip_suffix('b').unwrap_or(&unit);
    let mult: f64 = match unit {
        "" => 1.0,
        "k" => 1e3,
        "m" => 1e6,
        "g" => 1e9,
        "t" => 1e12,
        "ki" => 1024.0,
        "mi" => 1024f64.powi(2),
        "gi" => 1024f64.powi(3),
        "ti" => 1024f64.powi(4),
        _ => return None,
    };
    (num >= 0.0).then_some((num * mult) as u64)
}

/// The last non-empty line of `text` (what a failed command or worker said last).
pub(crate) fn last_line(text: &str) -> String {
    text.lines().map(str::trim).rfind(|l| !l.is_empty()).unwrap_or("").to_string()
}

/// Create `log_dir/NAME.log` for a worker; returns its path and two handles
/// (stdout, stderr) on it.
pub(crate) fn worker_log(
    log_dir: &std::path::Path,
    name: &str,
) -> Result<(std::path::PathBuf, std::fs::File, std::fs::File), BackendError> {
    std::fs::create_dir_all(log_dir).map_err(|e| BackendError::ScaleUp(format!("{}: {e}", log_dir.display())))?;
    let path = log_dir.join(format!("{name}.log"));
    let out = std::fs::File::create(&path).map_err(|e| BackendError::ScaleUp(format!("{}: {e}", path.display())))?;
    let err = out.try_clone().map_err(|e| BackendError::ScaleUp(e.to_string()))?;
    Ok((path, out, err))
}

/// Quote `s` for a POSIX shell (single quotes; safe for any bytes but NUL).
pub fn sh_quote(s: &str) -> String {
    if !s.is_empty() && s.bytes().all(|b| b.is_ascii_alphanumeric() || b"-_./=:,+@%".contains(&b)) {
        return s.to_string();
    }
    format!("'{}'", s.replace('\'', "'\\''"))
}

/// Something a backend started, recorded so it can be removed after a crash.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "lowercase")]
pub enum Owned {
    /// A local process; `start_time` (from /proc) guards against pid reuse.
    Process { name: String, pid: u32, start_time: u64 },
    /// A worker process on another host, found there by its unique `--name`;
    /// `ssh` is the command prefix (with the destination) that reaches it.
    /// `tag` is the cluster's random tag in the worker's environment
    /// (`DASK_RS_CLUSTER_TAG`), so only this cluster's processes match.
    Remote {
        name: String,
        host: String,
        ssh: Vec<String>,
        #[serde(default)]
        tag: String,
    },
    /// A batch job.
    Job { name: String, system: batch::System, id: String },
    /// A Marathon app (all of a cluster's workers).
    MarathonApp {
        name: String,
        url: String,
        app_id: String,
        #[serde(default)]
        auth_file: Option<String>,
    },
    /// A Kubernetes cluster's objects (found by their labels).
    Kubernetes { name: String, target: kubernetes::Target },
}

/// A backend that also says what it owns.
pub trait Deployer: Backend {
    fn owned(&self) -> Vec<Owned>;
}

/// Remove everything in `owned`; returns what could not be removed, with why.
pub fn cleanup(owned: &[Owned]) -> Vec<String> {
    let mut errors = Vec::new();
    for o in owned {
        if let Owned::Process { name, pid, start_time } = o {
            if let Err(e) = process::terminate(*pid, Some(*start_time), std::time::Duration::from_secs(5)) {
                errors.push(format!("{name} (pid {pid}): {e}"));
            }
        }
    }
    for (system, ids) in job_groups(owned) {
        if let Err(e) = system.cancel(&ids).and_then(|()| system.wait_settled(&ids, std::time::Duration::from_secs(30)))
        {
            errors.push(format!("{} jobs {}: {e}", system.name(), ids.join(", ")));
        }
    }
    for o in owned {
        if let Owned::MarathonApp { url, app_id, auth_file, .. } = o {
            let r = marathon::Marathon::new(url, auth_file.as_deref()).map_err(|e| e.to_string()).and_then(|m| {
                m.delete_app(app_id).and_then(|()| m.wait_deleted(app_id, std::time::Duration::from_secs(60)))
            });
            if let Err(e) = r {
                errors.push(format!("Marathon app {app_id}: {e}"));
            }
        }
    }
    for o in owned {
        if let Owned::Kubernetes { name, target } = o {
            if let Err(e) = kubernetes::cleanup(name, target) {
                errors.push(format!("Kubernetes objects of {name}: {e}"));
            }
        }
    }
    for ((ssh, tag), names) in remote_groups(owned) {
        if let Err(e) = ssh::stop_remote(&ssh, &tag, &names, std::time::Duration::from_secs(10)) {
            errors.push(format!("{} on {}: {e}", names.join(", "), ssh.last().map_or("?", String::as_str)));
        }
    }
    errors
}

/// `(key, value)` pairs grouped by key, keys in order of first appearance.
fn group<K: PartialEq>(pairs: impl Iterator<Item = (K, String)>) -> Vec<(K, Vec<String>)> {
    let mut groups: Vec<(K, Vec<String>)> = Vec::new();
    for (k, v) in pairs {
        match groups.iter_mut().find(|(g, _)| *g == k) {
            Some((_, vs)) => vs.push(v),
            None => groups.push((k, vec![v])),
        }
    }
    groups
}

/// Batch job ids grouped by batch system.
fn job_groups(owned: &[Owned]) -> Vec<(batch::System, Vec<String>)> {
    group(owned.iter().filter_map(|o| match o {
        Owned::Job { system, id, .. } => Some((*system, id.clone())),
        _ => None,
    }))
}

/// The ssh command that reaches a host, and a cluster's tag.
type RemoteGroup = (Vec<String>, String);

/// Remote workers grouped by the ssh command that reaches their host and
/// their cluster's tag.
fn remote_groups(owned: &[Owned]) -> Vec<(RemoteGroup, Vec<String>)> {
    group(owned.iter().filter_map(|o| match o {
        Owned::Remote { name, ssh, tag, .. } => Some(((ssh.clone(), tag.clone()), name.clone())),
        _ => None,
    }))
}

/// Whether anything in `owned` is still alive.
pub fn any_alive(owned: &[Owned]) -> Vec<String> {
    let mut alive: Vec<String> = owned
        .iter()
        .filter_map(|o| match o {
            Owned::Process { name, pid, start_time } => {
                process::is_alive(*pid, Some(*start_time)).then(|| format!("{name} (pid {pid})"))
            }
            Owned::Remote { .. } | Owned::Job { .. } => None,
            Owned::MarathonApp { url, app_id, auth_file, .. } => {
                match marathon::Marathon::new(url, auth_file.as_deref())
                    .map_err(|e| e.to_string())
                    .and_then(|m| m.app(app_id))
                {
                    Ok(None) => None,
                    Ok(Some(app)) => Some(format!(
                        "Marathon app {app_id} ({} instances)",
                        app.get("instances").and_then(serde_json::Value::as_u64).unwrap_or(0)
                    )),
                    Err(e) => Some(format!("Marathon app {app_id}: cannot check ({e})")),
                }
            }
            Owned::Kubernetes { name, target } => match kubernetes::alive(name, target) {
                Ok(left) if left.is_empty() => None,
                Ok(left) => Some(left.join(", ")),
                Err(e) => Some(format!("Kubernetes objects of {name}: cannot check ({e})")),
            },
        })
        .collect();
    for (system, ids) in job_groups(owned) {
        let system_name = system.name();
        match system.poll(&ids) {
            Ok(states) => alive.extend(
                states
                    .into_iter()
                    .filter(|(_, st)| !matches!(st, batch::JobState::Ended(_)))
                    .map(|(id, st)| format!("{system_name} job {id} ({})", st.batch_state())),
            ),
            Err(e) => alive.push(format!("{system_name} jobs {}: cannot check ({e})", ids.join(", "))),
        }
    }
    for ((ssh, tag), names) in remote_groups(owned) {
        let host = ssh.last().cloned().unwrap_or_default();
        match ssh::signal_remote(&ssh, &tag, &names, "0") {
            Ok(found) => alive.extend(found.into_iter().map(|(n, pid)| format!("{n} (pid {pid} on {host})"))),
            Err(e) => alive.push(format!("{} on {host}: cannot check ({e})", names.join(", "))),
        }
    }
    alive
}
