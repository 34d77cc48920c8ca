//! Scaling for dask-rs clusters.
//!
//! A [`Policy`] decides *how many* workers a cluster should have; a
//! [`Backend`] knows *how* to start and stop them (local processes, ssh,
//! batch jobs, pods). The [`Controller`] sits between the two: it compares the
//! policy's target with what the backend has requested, pending and running,
//! and decides what to do, without thrashing and without losing data. It is a
//! pure state machine (time passed in); [`tick`] is the thin driver that calls
//! the backend and the scheduler.

mod backend;
mod controller;
mod policy;

pub use backend::{Backend, BackendError, WorkerRecord, WorkerStatus};
pub use controller::{tick, Action, Controller, ControllerConfig, Decision, Retirer};
pub use policy::{DaskAdaptive, Fixed, Policy, Target};

use cluster::protocol::{EventsUpdate, LoadSummary, WorkerInfo};

/// What the scheduler says about the cluster, as policies see it.
#[derive(Debug, Clone, Default)]
pub struct ClusterView {
    /// Connected workers.
    pub workers: Vec<WorkerInfo>,
    /// Queued and running work.
    pub load: LoadSummary,
}

impl From<&EventsUpdate> for ClusterView {
    fn from(u: &EventsUpdate) -> Self {
        ClusterView { workers: u.workers.clone(), load: u.load.clone() }
    }
}
