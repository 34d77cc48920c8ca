//! What the scheduler keeps per task and per task group.

use super::holders::Holder;
use super::shared::SharedIdx;
use super::state::{PeerId, TaskState};
use super::workers::Worker;
use crate::protocol::{Priority, Resources};
use bytes::Bytes;
use rustc_hash::FxHashSet;
use std::sync::Arc;

pub(super) type TaskId = u32;

/// Expected duration of a task whose group has not finished one yet
/// (Dask's `unknown-task-duration`).
pub(super) const UNKNOWN_TASK_DURATION: f64 = 0.5;

/// Why a task erred, shared by the task and every dependent it took down.
#[derive(Debug)]
pub(super) struct ErrorInfo {
    pub(super) exception: Bytes,
    pub(super) traceback: Bytes,
    pub(super) text: String,
}

impl ErrorInfo {
    /// An error the scheduler itself raises (no Python exception to carry).
    pub(super) fn scheduler(text: String) -> Arc<Self> {
        Arc::new(ErrorInfo { exception: Bytes::new(), traceback: Bytes::new(), text })
    }
}

/// Where a task may run.
#[derive(Debug)]
pub(super) struct Restriction {
    /// Worker names or addresses; empty: any worker.
    pub(super) workers: Vec<String>,
    /// With `workers`: others may run it when none of those can.
    pub(super) loose: bool,
    /// Amounts the worker must declare (always strict, as in Dask).
    pub(super) resources: Resources,
}

impl Restriction {
    pub(super) fn from_spec(workers: Option<Vec<String>>, loose: bool, resources: Resources) -> Option<Box<Self>> {
        let workers = workers.unwrap_or_default();
        if workers.is_empty() && resources.is_empty() {
            return None;
        }
        Some(Box::new(Restriction { workers, loose, resources }))
    }

    pub(super) fn names(&self, w: &Worker) -> bool {
        self.workers.iter().any(|n| w.answers_to(n))
    }

    pub(super) fn has_resources(&self, w: &Worker) -> bool {
        self.resources.iter().all(|(name, need)| w.resources.iter().any(|(n, have)| n == name && have >= need))
    }

    /// Why no current worker qualifies.
    pub(super) fn reason(&self) -> String {
        let mut parts = Vec::new();
        if !self.workers.is_empty() && !self.loose {
            parts.push(format!("workers={:?}", self.workers));
        }
        if !self.resources.is_empty() {
            let r: Vec<String> = self.resources.iter().map(|(n, a)| format!("{n}={a}")).collect();
            parts.push(format!("resources {{{}}}", r.join(", ")));
        }
        format!("no-worker: no worker matches {}", parts.join(" and "))
    }
}

/// A task's dependents: a vector while small, a hash set once large, so
/// forgetting the many dependents of a shared input stays linear overall.
#[derive(Debug)]
pub(super) enum Dependents {
    Small(Vec<TaskId>),
    Large(FxHashSet<TaskId>),
}

impl Dependents {
    const SMALL_MAX: usize = 32;

    pub(super) fn new() -> Self {
        Dependents::Small(Vec::new())
    }

    pub(super) fn push(&mut self, id: TaskId) {
        match self {
            Dependents::Small(v) => {
                v.push(id);
                if v.len() > Self::SMALL_MAX {
                    *self = Dependents::Large(v.drain(..).collect());
                }
            }
            Dependents::Large(s) => {
                s.insert(id);
            }
        }
    }

    pub(super) fn remove(&mut self, id: TaskId) {
        match self {
            Dependents::Small(v) => {
                if let Some(pos) = v.iter().position(|&x| x == id) {
                    v.swap_remove(pos);
                }
            }
            Dependents::Large(s) => {
                s.remove(&id);
            }
        }
    }

    /// Whether `id` is the dependent added last (for a large set: whether
    /// it is one at all).
    pub(super) fn ends_with(&self, id: TaskId) -> bool {
        match self {
            Dependents::Small(v) => v.last() == Some(&id),
            Dependents::Large(s) => s.contains(&id),
        }
    }

    pub(super) fn is_empty(&self) -> bool {
        match self {
            Dependents::Small(v) => v.is_empty(),
            Dependents::Large(s) => s.is_empty(),
        }
    }

    pub(super) fn iter(&self) -> impl Iterator<Item = TaskId> + '_ {
        let (small, large) = match self {
            Dependents::Small(v) => (Some(v.iter().copied()), None),
            Dependents::Large(s) => (None, Some(s.iter().copied())),
        };
        small.into_iter().flatten().chain(large.into_iter().flatten())
    }

    pub(super) fn to_vec(&self) -> Vec<TaskId> {
        self.iter().collect()
    }
}

#[derive(Debug)]
pub(super) struct Task {
    pub(super) key: Arc<str>,
    pub(super) state: TaskState,
    pub(super) run_spec: Option<Bytes>,
    /// The shared blob (function) the recipe refers to.
    pub(super) shared: Option<SharedIdx>,
    pub(super) deps: Vec<TaskId>,
    pub(super) dependents: Dependents,
    /// Dependencies not yet in memory (meaningful while waiting).
    pub(super) waiting_on: u32,
    /// Dependents in an active state: while non-zero the result must stay.
    pub(super) waiters: u32,
    /// Clients and pseudo-clients holding it (see `holders`).
    pub(super) who_wants: Vec<Holder>,
    pub(super) who_has: Vec<PeerId>,
    pub(super) processing_on: Option<PeerId>,
    pub(super) nbytes: u64,
    pub(super) priority: Priority,
    pub(super) group: u32,
    pub(super) restriction: Option<Box<Restriction>>,
    pub(super) error: Option<Arc<ErrorInfo>>,
    /// Re-runs left if the task raises.
    pub(super) retries: u32,
    /// Workers that died while running this task.
    pub(super) suspicious: u32,
}

impl Task {
    /// A released task without dependencies, restrictions or retries.
    pub(super) fn new(key: &str, group: u32, run_spec: Option<Bytes>, priority: Priority) -> Self {
        Task {
            key: key.into(),
            state: TaskState::Released,
            run_spec,
            shared: None,
            deps: Vec::new(),
            dependents: Dependents::new(),
            waiting_on: 0,
            waiters: 0,
            who_wants: Vec::new(),
            who_has: Vec::new(),
            processing_on: None,
            nbytes: 0,
            priority,
            group,
            restriction: None,
            error: None,
            retries: 0,
            suspicious: 0,
        }
    }
}

#[derive(Debug)]
pub(super) struct Group {
    pub(super) name: String,
    pub(super) counts: [u64; 8],
    /// Tasks of the group not yet forgotten.
    pub(super) live: u64,
    pub(super) nbytes: u64,
    pub(super) changed_at: u64,
    /// Sum and number of observed run times, for the mean duration.
    pub(super) duration_sum: f64,
    pub(super) duration_n: u64,
    /// Other groups some task of this one depends on (few: a linear scan).
    pub(super) deps: Vec<u32>,
}

impl Group {
    pub(super) fn duration(&self) -> f64 {
        if self.duration_n == 0 {
            UNKNOWN_TASK_DURATION
        } else {
            self.duration_sum / self.duration_n as f64
        }
    }
}
