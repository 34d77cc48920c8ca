//! The cluster registry: one directory per cluster under
//! `$XDG_STATE_HOME/dask-rs/clusters/NAME` (or `~/.local/state/...`), holding
//! `cluster.json` (what `up` asked for and where the manager and scheduler
//! are), `owned.json` (what the backend started, for cleanup after a crash),
//! the cluster's credentials (`token`, and the TLS files `ca.pem`,
//! `cert.pem`, `key.pem`; keys 0600; none for `up --insecure`, no TLS files
//! for `up --no-tls`), the manager's control socket and the logs. Every directory here is
//! private to its owner (0700).

use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use cluster::security::Security;
use cluster::tls::{Tls, TlsFiles};
use deployers::{Credentials, Owned, WorkerOptions};
use serde::{Deserialize, Serialize};

/// `cluster.json`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ClusterRecord {
    pub name: String,
    pub backend: deployers::BackendKind,
    /// Unix time `up` ran.
    pub created: f64,
    pub options: WorkerOptions,
    /// Fixed size, or `None` when adaptive.
    pub workers: Option<usize>,
    pub adapt: Option<(usize, usize)>,
    /// Interface and port the scheduler listens on.
    pub host: String,
    pub port: u16,
    /// Filled in by the manager once the scheduler listens.
    pub address: Option<String>,
    pub dashboard: Option<String>,
    /// Where the manager serves the dashboard (`HOST:PORT` or `:PORT`);
    /// `None`: no dashboard.
    #[serde(default)]
    pub dashboard_address: Option<String>,
    pub manager_pid: Option<u32>,
    pub manager_start: Option<u64>,
    /// Most workers (batch jobs) waiting to start at once; `None` = the controller's default.
    #[serde(default)]
    pub max_pending: Option<usize>,
}

/// Where registries live: `$XDG_STATE_HOME`, else `$HOME/.local/state`,
/// else the home directory the system's user database gives. Never a
/// shared directory such as `/tmp`, where another user could plant entries.
pub fn root() -> Result<PathBuf> {
    let nonempty = |k: &str| std::env::var_os(k).filter(|v| !v.is_empty()).map(PathBuf::from);
    let base = match nonempty("XDG_STATE_HOME") {
        Some(b) => b,
        None => nonempty("HOME")
            .or_else(home_from_passwd)
            .ok_or_else(|| anyhow::anyhow!("cannot find your home directory: set HOME or XDG_STATE_HOME"))?
            .join(".local/state"),
    };
    Ok(base.join("dask-rs").join("clusters"))
}

/// This user's home directory from the user database.
fn home_from_passwd() -> Option<PathBuf> {
    use std::os::unix::ffi::OsStrExt;
    let mut pw: libc::passwd = unsafe { std::mem::zeroed() };
    let mut buf = vec![0 as libc::c_char; 4096];
    let mut out: *mut libc::passwd = std::ptr::null_mut();
    // SAFETY: getpwuid_r writes only into `pw` and `buf` (whose length we
    // pass) and sets `out` to `&pw` on success.
    let rc = unsafe { libc::getpwuid_r(cluster::security::my_uid(), &mut pw, buf.as_mut_ptr(), buf.len(), &mut out) };
    if rc != 0 || out.is_null() || pw.pw_dir.is_null() {
        return None;
    }
    // SAFETY: on success pw_dir points to a NUL-terminated string inside `buf`.
    let dir = unsafe { std::ffi::CStr::from_ptr(pw.pw_dir) };
    let path = PathBuf::from(std::ffi::OsStr::from_bytes(dir.to_bytes()));
    (path.is_absolute() && path != Path::new("/")).then_some(path)
}

/// The directory of cluster `name` (refused unless `name` is a valid
/// cluster name, so no verb can reach outside the registry).
pub fn dir(name: &str) -> Result<PathBuf> {
    check_name(name)?;
    Ok(root()?.join(name))
}

/// Cluster names are used as directory and worker names.
pub fn check_name(name: &str) -> Result<()> {
    if name.is_empty()
        || name.len() > 40
        || !name.chars().all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
        || name.starts_with('-')
    {
        bail!("invalid cluster name {name:?}: use up to 40 letters, digits, '-' and '_'");
    }
    Ok(())
}

fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, bytes).with_context(|| format!("writing {}", tmp.display()))?;
    std::fs::rename(&tmp, path).with_context(|| format!("writing {}", path.display()))?;
    Ok(())
}

impl ClusterRecord {
    pub fn load(dir: &Path) -> Result<ClusterRecord> {
        let path = dir.join("cluster.json");
        let meta = std::fs::metadata(&path).with_context(|| format!("reading {}", path.display()))?;
        if !cluster::security::is_mine(&meta) {
            bail!("{} belongs to another user; ignoring it", path.display());
        }
        let text = std::fs::read_to_string(&path).with_context(|| format!("reading {}", path.display()))?;
        serde_json::from_str(&text).with_context(|| format!("parsing {}", path.display()))
    }

    pub fn save(&self, dir: &Path) -> Result<()> {
        write_atomic(&dir.join("cluster.json"), &serde_json::to_vec_pretty(self)?)
    }

    /// Whether the manager process recorded here still runs.
    pub fn manager_alive(&self) -> bool {
        self.manager_pid.is_some_and(|pid| deployers::process::is_alive(pid, self.manager_start))
    }
}

/// Cluster `name`, or a clear error listing what exists.
pub fn find(name: &str) -> Result<(PathBuf, ClusterRecord)> {
    let d = dir(name)?;
    if !d.join("cluster.json").exists() {
        let known: Vec<String> = list().into_iter().map(|(_, r)| r.name).collect();
        if known.is_empty() {
            bail!("no cluster named {name:?} (no clusters are registered in {})", root()?.display());
        }
        bail!("no cluster named {name:?} (known: {})", known.join(", "));
    }
    let rec = ClusterRecord::load(&d)?;
    Ok((d, rec))
}

/// Every registered cluster, by name.
pub fn list() -> Vec<(PathBuf, ClusterRecord)> {
    let mut out = Vec::new();
    let Ok(root) = root() else { return Vec::new() };
    if let Ok(rd) = std::fs::read_dir(root) {
        for e in rd.flatten() {
            if let Ok(rec) = ClusterRecord::load(&e.path()) {
                out.push((e.path(), rec));
            }
        }
    }
    out.sort_by(|a, b| a.1.name.cmp(&b.1.name));
    out
}

pub fn load_owned(dir: &Path) -> Vec<Owned> {
    std::fs::read_to_string(dir.join("owned.json")).ok().and_then(|t| serde_json::from_str(&t).ok()).unwrap_or_default()
}

pub fn save_owned(dir: &Path, owned: &[Owned]) -> Result<()> {
    write_atomic(&dir.join("owned.json"), &serde_json::to_vec_pretty(owned)?)
}

pub fn socket(dir: &Path) -> PathBuf {
    dir.join("control.sock")
}

pub fn log_dir(dir: &Path) -> PathBuf {
    dir.join("logs")
}

/// Where cluster `dir` keeps its token.
pub fn token_file(dir: &Path) -> PathBuf {
    dir.join("token")
}

/// The TLS files of cluster `dir` (present unless started with
/// `--insecure` or `--no-tls`).
pub fn tls_files(dir: &Path) -> TlsFiles {
    TlsFiles { ca: dir.join("ca.pem"), cert: dir.join("cert.pem"), key: dir.join("key.pem") }
}

/// The credential files of cluster `dir` that exist, as workers get them.
pub fn credentials(dir: &Path) -> Credentials {
    let token = token_file(dir);
    let tls = tls_files(dir);
    Credentials { token_file: token.exists().then_some(token), tls: tls.ca.exists().then_some(tls) }
}

/// The credentials of the cluster registered in `dir` (open for clusters
/// started with `--insecure`).
pub fn security(dir: &Path) -> Result<Security> {
    let creds = credentials(dir);
    let mut security = match &creds.token_file {
        Some(path) => Security::from_file(path)?,
        None => Security::open(),
    };
    if let Some(files) = creds.tls {
        security = security.with_tls(Tls::load(files)?);
    }
    Ok(security)
}

/// Create `dir` (and the registry above it) readable by its owner only, and
/// refuse one that another user owns.
pub fn create_private(dir: &Path) -> Result<()> {
    use std::os::unix::fs::{DirBuilderExt, MetadataExt, PermissionsExt};
    for d in [root()?, dir.to_path_buf()] {
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(&d)
            .with_context(|| format!("creating {}", d.display()))?;
        let meta = std::fs::metadata(&d)?;
        if !cluster::security::is_mine(&meta) {
            bail!("{} belongs to another user; refusing to keep cluster credentials there", d.display());
        }
        if meta.mode() & 0o077 != 0 {
            std::fs::set_permissions(&d, std::fs::Permissions::from_mode(0o700))?;
        }
    }
    Ok(())
}
