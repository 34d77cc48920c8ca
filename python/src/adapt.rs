//! `dask_rs._core.Adaptive`: the `adaptive` crate's controller and Dask's
//! policy for `LocalCluster.adapt`, so that a LocalCluster grows and shrinks
//! by the same rules as `dask-ctl adapt`. Python starts and retires the
//! worker processes; this decides how many and which.

use std::sync::{Mutex, MutexGuard};
use std::time::Duration;

use adaptive::{Action, ClusterView, Controller, ControllerConfig, DaskAdaptive, WorkerRecord, WorkerStatus};
use cluster::protocol::EventsUpdate;
use pyo3::exceptions::PyValueError;
use pyo3::prelude::*;
use pyo3::types::PyDict;

use crate::ClientCore;

/// What the controller wants now: `("hold", 0, [], [])`, `("scale_up", n,
/// [], [])` (bring the requested workers to `n`), or `("remove", 0, pending,
/// running)` (stop those pending workers; retire, then stop, those running).
type Step = (&'static str, usize, Vec<String>, Vec<String>);

/// Adaptive scaling state for one cluster.
#[pyclass(module = "dask_rs._core")]
pub struct Adaptive {
    /// Locked only by the thread running the checks, and by readers of
    /// `target` and `decisions`.
    ctrl: Mutex<Controller>,
    latest: EventsUpdate,
    interval: f64,
    subscribed: bool,
}

impl Adaptive {
    fn ctrl(&self) -> MutexGuard<'_, Controller> {
        self.ctrl.lock().unwrap_or_else(|e| e.into_inner())
    }
}

#[pymethods]
impl Adaptive {
    #[new]
    #[pyo3(signature = (minimum, maximum, threads_per_worker, target_duration=5.0, wait_count=3, interval=1.0))]
    fn new(
        minimum: usize,
        maximum: usize,
        threads_per_worker: u32,
        target_duration: f64,
        wait_count: u32,
        interval: f64,
    ) -> PyResult<Self> {
        if maximum < minimum {
            return Err(PyValueError::new_err(format!("maximum {maximum} is below minimum {minimum}")));
        }
        if !(target_duration > 0.0 && interval > 0.0) {
            return Err(PyValueError::new_err("target_duration and interval must be positive"));
        }
        let mut policy = DaskAdaptive::new(minimum, maximum, threads_per_worker);
        policy.target_duration = target_duration;
        let config = ControllerConfig { interval, wait_count: wait_count.max(1), ..Default::default() };
        Ok(Adaptive {
            ctrl: Mutex::new(Controller::new(Box::new(policy), config)),
            latest: EventsUpdate::default(),
            interval,
            subscribed: false,
        })
    }

    /// One check. `records` are the cluster's workers as `(name, state,
    /// detail)`, state `running` (its process lives) or `failed` (it ended
    /// on its own); the scheduler's view comes from `core`'s event updates.
    fn step(
        &mut self,
        py: Python<'_>,
        core: &ClientCore,
        now: f64,
        records: Vec<(String, String, String)>,
    ) -> PyResult<Step> {
        if !self.subscribed {
            core.core.subscribe(Duration::from_secs_f64(self.interval / 2.0)).map_err(crate::client_err)?;
            self.subscribed = true;
        }
        if let Some(u) = py.detach(|| core.core.take_events(Duration::ZERO)).pop() {
            self.latest = u;
        }
        let records: Vec<WorkerRecord> = records
            .into_iter()
            .map(|(name, state, detail)| {
                let status = match state.as_str() {
                    "failed" => WorkerStatus::Failed,
                    "pending" => WorkerStatus::Pending,
                    _ => WorkerStatus::Running,
                };
                WorkerRecord { name, status, detail }
            })
            .collect();
        let view = ClusterView::from(&self.latest);
        Ok(match self.ctrl().step(now, &view, &records) {
            Action::Hold => ("hold", 0, Vec::new(), Vec::new()),
            Action::ScaleUp(n) => ("scale_up", n, Vec::new(), Vec::new()),
            Action::Remove { pending, running } => ("remove", 0, pending, running),
        })
    }

    /// How carrying out the last step went (`error` None: it worked).
    #[pyo3(signature = (now, error=None))]
    fn report(&mut self, now: f64, error: Option<String>) {
        self.ctrl().report(now, error.map_or(Ok(()), Err));
    }

    /// The workers the policy wants now (None before the first step).
    #[getter]
    fn target(&self) -> Option<usize> {
        self.ctrl().target()
    }

    /// The decision log: dicts with `time`, `kind`, `target`, `requested`,
    /// `running`, `pending`, `reason`.
    fn decisions<'py>(&self, py: Python<'py>) -> PyResult<Vec<Bound<'py, PyDict>>> {
        self.ctrl()
            .decisions()
            .map(|d| {
                let o = PyDict::new(py);
                o.set_item("time", d.time)?;
                o.set_item("kind", &d.kind)?;
                o.set_item("target", d.target)?;
                o.set_item("requested", d.requested)?;
                o.set_item("running", d.running)?;
                o.set_item("pending", d.pending)?;
                o.set_item("reason", &d.reason)?;
                Ok(o)
            })
            .collect()
    }
}
