//! The contract between the controller and a deployer.

use serde::{Deserialize, Serialize};

/// Errors a backend reports; the text is shown to the user as is.
#[derive(Debug, thiserror::Error)]
pub enum BackendError {
    /// Starting workers failed (a refused job submission, an unreachable host).
    #[error("cannot start workers: {0}")]
    ScaleUp(String),
    /// Stopping workers failed.
    #[error("cannot stop workers: {0}")]
    ScaleDown(String),
    /// Asking for the workers' state failed (a batch system that does not answer).
    #[error("cannot read worker state: {0}")]
    Status(String),
}

/// A worker's state as the backend sees it (its process or batch job),
/// before any connection to the scheduler.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum WorkerStatus {
    /// Requested, not started yet (a job waiting in the queue).
    Pending,
    /// Its process or job runs.
    Running,
    /// It ended on its own (crashed, killed from outside, walltime). Reported
    /// once, then forgotten by the backend.
    Failed,
}

/// One worker a backend started or requested.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct WorkerRecord {
    /// The name the worker registers with (`--name`); how the controller
    /// matches it with the scheduler's workers.
    pub name: String,
    pub status: WorkerStatus,
    /// For humans: a pid, a host, a job id and its batch state.
    pub detail: String,
}

/// What every deployer implements. Calls may block (they run commands); the
/// manager calls them from its controller thread.
pub trait Backend: Send {
    /// Short name: `local`, `ssh`, `slurm`...
    fn kind(&self) -> &'static str;
    /// Bring the number of requested workers (pending + running) to `n`.
    fn scale_up(&mut self, n: usize) -> Result<(), BackendError>;
    /// Remove exactly these workers (by name); names it does not know are ignored.
    fn scale_down(&mut self, workers: &[String]) -> Result<(), BackendError>;
    /// Every worker requested and not yet removed, plus those that failed
    /// since the last call.
    fn workers(&mut self) -> Result<Vec<WorkerRecord>, BackendError>;
    /// Remove everything (used by `down`).
    fn close(&mut self) -> Result<(), BackendError> {
        let names: Vec<String> = self.workers()?.into_iter().map(|w| w.name).collect();
        self.scale_down(&names)
    }
}
