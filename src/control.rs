//! The manager's control protocol: one JSON request per line on a Unix
//! socket in the cluster's registry directory, one JSON response per line.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::Duration;

use adaptive::Decision;
use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(tag = "cmd", rename_all = "lowercase")]
pub enum Request {
    Status,
    Scale { n: usize },
    Adapt { minimum: usize, maximum: usize },
    Down,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Response {
    pub ok: bool,
    #[serde(default)]
    pub error: String,
    #[serde(default)]
    pub status: Option<Status>,
}

impl Response {
    pub fn ok(status: Option<Status>) -> Self {
        Response { ok: true, error: String::new(), status }
    }
    pub fn err(e: impl ToString) -> Self {
        Response { ok: false, error: e.to_string(), status: None }
    }
}

/// One worker as `status` shows it.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct WorkerRow {
    pub name: String,
    /// `pending`, `running`, `retiring`, or `external` (connected, not started by this cluster).
    pub state: String,
    pub detail: String,
    pub address: String,
    pub nthreads: u32,
    pub memory_limit: u64,
    pub managed: u64,
    pub processing: u32,
}

/// The manager's view of its cluster.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Status {
    pub name: String,
    pub backend: deployers::BackendKind,
    pub address: String,
    pub dashboard: Option<String>,
    pub policy: String,
    pub requested: usize,
    pub running: usize,
    pub pending: usize,
    pub threads: u64,
    pub memory_limit: u64,
    pub managed: u64,
    pub tasks: u64,
    pub workers: Vec<WorkerRow>,
    /// The latest scaling decisions, oldest first.
    pub decisions: Vec<Decision>,
}

/// Send one request to the manager of the cluster in `dir`.
pub fn request(dir: &Path, req: &Request, timeout: Duration) -> Result<Response> {
    let path = crate::registry::socket(dir);
    let mut s =
        UnixStream::connect(&path).with_context(|| format!("cannot reach the manager at {}", path.display()))?;
    s.set_read_timeout(Some(timeout))?;
    let mut line = serde_json::to_string(req)?;
    line.push('\n');
    s.write_all(line.as_bytes())?;
    let mut reply = String::new();
    BufReader::new(&s).read_line(&mut reply).context("no answer from the manager")?;
    if reply.is_empty() {
        bail!("the manager closed the connection without answering");
    }
    Ok(serde_json::from_str(&reply)?)
}
