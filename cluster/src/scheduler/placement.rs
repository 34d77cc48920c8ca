//! Placement: which worker runs a ready task, and how queued root tasks
//! are handed to workers as their slots free up.

use super::state::{PeerId, SchedulerState, TaskState};
use super::task::TaskId;
use super::workers::Worker;
use crate::protocol::{Blob, DepInfo, Envelope, ToWorker};
use rustc_hash::FxHashMap;
use std::cmp::{Ordering, Reverse};
use std::collections::BinaryHeap;

/// A worker's load, ordered (loads are never NaN).
#[derive(Clone, Copy, PartialEq)]
struct Load(f64);

impl Eq for Load {}

impl PartialOrd for Load {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}

impl Ord for Load {
    fn cmp(&self, other: &Self) -> Ordering {
        self.0.total_cmp(&other.0)
    }
}

/// Cap on root tasks in flight per worker thread from `pipeline_window`.
pub(super) const MAX_PIPELINE_PER_THREAD: usize = 64;

impl SchedulerState {
    pub(super) fn decide_worker(&self, id: TaskId) -> Option<PeerId> {
        let t = self.t(id);
        if self.workers.is_empty() {
            return None;
        }
        // Workers with the resources the task needs (all, without a restriction).
        let fits = |p: &PeerId| {
            let w = &self.workers[p];
            !w.retiring && t.restriction.as_ref().is_none_or(|r| r.has_resources(w))
        };
        if let Some(r) = t.restriction.as_ref().filter(|r| !r.workers.is_empty()) {
            let named = self.worker_order.iter().copied().filter(|p| fits(p) && r.names(&self.workers[p]));
            if let Some(w) = self.least_loaded(named) {
                return Some(w);
            }
            if !r.loose {
                return None;
            }
        }
        if t.deps.is_empty() {
            return self.least_loaded(self.worker_order.iter().copied().filter(fits));
        }
        // Prefer the worker holding the most dependency bytes, then the least loaded.
        let mut held: FxHashMap<PeerId, u64> = FxHashMap::default();
        for &d in &t.deps {
            let dt = self.t(d);
            for &w in &dt.who_has {
                *held.entry(w).or_default() += dt.nbytes.max(1);
            }
        }
        let mut best: Option<(u64, f64, PeerId)> = None;
        for (w, bytes) in held {
            if !self.workers.contains_key(&w) || !fits(&w) {
                continue;
            }
            let load = self.workers[&w].load();
            let better = match best {
                None => true,
                Some((bh, bl, bw)) => bytes > bh || (bytes == bh && (load < bl || (load == bl && w < bw))),
            };
            if better {
                best = Some((bytes, load, w));
            }
        }
        best.map(|b| b.2).or_else(|| self.least_loaded(self.worker_order.iter().copied().filter(fits)))
    }

    pub(super) fn least_loaded(&self, it: impl Iterator<Item = PeerId>) -> Option<PeerId> {
        let mut best: Option<(f64, PeerId)> = None;
        for p in it {
            let w = &self.workers[&p];
            if w.retiring {
                continue;
            }
            let load = w.load();
            if best.is_none_or(|(l, _)| load < l) {
                best = Some((load, p));
            }
        }
        best.map(|b| b.1)
    }

    pub(super) fn assign(&mut self, id: TaskId, w: PeerId) {
        self.set_state(id, TaskState::Processing);
        self.tm(id).processing_on = Some(w);
        self.workers.get_mut(&w).expect("worker").processing.insert(id);
        let t = self.t(id);
        let deps: Vec<DepInfo> = t
            .deps
            .iter()
            .map(|&d| {
                let dt = self.t(d);
                DepInfo { key: dt.key.to_string(), nbytes: dt.nbytes, who_has: self.addresses(&dt.who_has) }
            })
            .collect();
        let mut frames = Vec::new();
        let run_spec = Blob::new(t.run_spec.clone().unwrap_or_default(), &mut frames);
        let resources = t.restriction.as_ref().map(|r| r.resources.clone()).unwrap_or_default();
        let (key, priority, shared) = (t.key.to_string(), t.priority, t.shared);
        let shared = shared.map(|s| self.shared.for_worker(s, w, &mut frames));
        let msg = ToWorker::ComputeTask { key, run_spec, shared, deps, priority, resources };
        self.send_worker(w, Envelope { msg, frames });
    }

    /// Queued root tasks worker `w` may hold: `worker_saturation` per thread,
    /// or more when the next queued task's group is known to be short (see
    /// [`SchedulerConfig::pipeline_window`]). Memory stays bounded: at most
    /// a few milliseconds of work per thread is committed ahead.
    pub(super) fn root_slots(&self, w: &Worker) -> usize {
        let base = w.slots(self.config.worker_saturation);
        let Some(&(_, next)) = self.queue.first() else { return base };
        let g = &self.groups[self.t(next).group as usize];
        if base == usize::MAX || g.duration_n == 0 || self.config.pipeline_window <= 0.0 {
            return base;
        }
        let per_thread = (self.config.pipeline_window / g.duration().max(1e-7)) as usize;
        base.max(w.nthreads as usize * per_thread.min(MAX_PIPELINE_PER_THREAD))
    }

    /// Send queued root tasks to workers with free slots, each to the least
    /// loaded worker that has one (the first in `worker_order` among equals).
    ///
    /// The workers with a free slot wait in a heap by (load, position), so
    /// handing out k tasks over W workers costs O(W + k log W), not O(k W):
    /// only the worker just given a task changes, and slots depend on the
    /// queue's next group too, so a new group at the head rebuilds the heap.
    pub(super) fn fill_all_workers(&mut self) {
        let mut heap: BinaryHeap<Reverse<(Load, usize)>> = BinaryHeap::new();
        let mut head_group = None;
        while let Some(&(_, next)) = self.queue.first() {
            let group = self.t(next).group;
            if head_group != Some(group) {
                head_group = Some(group);
                heap.clear();
                for (pos, w) in self.worker_order.iter().enumerate() {
                    let worker = &self.workers[w];
                    if !worker.retiring && worker.busy() < self.root_slots(worker) {
                        heap.push(Reverse((Load(worker.load()), pos)));
                    }
                }
            }
            let Some(Reverse((_, pos))) = heap.pop() else { return };
            let w = self.worker_order[pos];
            let (_, id) = self.queue.pop_first().expect("non-empty");
            self.assign(id, w);
            let worker = &self.workers[&w];
            if !worker.retiring && worker.busy() < self.root_slots(worker) {
                heap.push(Reverse((Load(worker.load()), pos)));
            }
        }
    }

    pub(super) fn fill_worker(&mut self, w: PeerId) {
        while !self.queue.is_empty() {
            let Some(worker) = self.workers.get(&w) else {
                return;
            };
            if worker.retiring || worker.busy() >= self.root_slots(worker) {
                return;
            }
            let (_, id) = self.queue.pop_first().expect("non-empty");
            self.assign(id, w);
        }
    }
}
