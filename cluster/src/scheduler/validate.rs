//! Internal invariants of [`SchedulerState`], checked by tests after every
//! event (see `tests.rs`).

use rustc_hash::FxHashMap;

use super::holders::Holder;
use super::state::{SchedulerState, TaskState};
use super::task::TaskId;

impl SchedulerState {
    /// Check internal invariants: the key index, group counts, waiters,
    /// dependencies, who holds and who wants each task, the queues, and
    /// every worker's bookkeeping agree with the tasks.
    pub fn validate(&self) -> Result<(), String> {
        let mut counts: FxHashMap<u32, [u64; 8]> = FxHashMap::default();
        let mut blob_refs: FxHashMap<u32, u64> = FxHashMap::default();
        let mut live = 0;
        for (i, slot) in self.tasks.iter().enumerate() {
            let Some(t) = slot else { continue };
            live += 1;
            if let Some(b) = t.shared {
                *blob_refs.entry(b).or_default() += 1;
            }
            let id = i as TaskId;
            let key = &t.key;
            counts.entry(t.group).or_insert([0; 8])[t.state.index()] += 1;
            if self.keys.get(key) != Some(&id) {
                return Err(format!("{key}: key map mismatch"));
            }
            for &d in &t.deps {
                if self.tasks.get(d as usize).and_then(|x| x.as_ref()).is_none() {
                    return Err(format!("{key}: depends on a forgotten task"));
                }
                if !self.t(d).dependents.iter().any(|x| x == id) {
                    return Err(format!("{key}: not a dependent of {}", self.t(d).key));
                }
            }
            let active = t.dependents.iter().filter(|&d| self.t(d).state.is_active()).count() as u32;
            if active != t.waiters {
                return Err(format!("{key}: waiters {} but {} active dependents", t.waiters, active));
            }
            if t.state == TaskState::Waiting {
                let missing = t.deps.iter().filter(|&&d| self.t(d).state != TaskState::Memory).count() as u32;
                if missing != t.waiting_on {
                    return Err(format!("{key}: waiting_on {} but {} deps missing", t.waiting_on, missing));
                }
                if let Some(&d) = t.deps.iter().find(|&&d| {
                    let s = self.t(d).state;
                    s != TaskState::Memory && !s.is_active()
                }) {
                    return Err(format!("{key}: waits for {}, which is {:?}", self.t(d).key, self.t(d).state));
                }
                if missing == 0 {
                    return Err(format!("{key}: waiting with every dependency in memory"));
                }
            }
            if t.state.is_active() && t.deps.iter().any(|&d| self.t(d).state == TaskState::Erred) {
                return Err(format!("{key}: {:?} with an erred dependency", t.state));
            }
            if t.state == TaskState::Memory && t.who_has.is_empty() {
                return Err(format!("{key}: in memory nowhere"));
            }
            if t.state != TaskState::Memory && !t.who_has.is_empty() {
                return Err(format!("{key}: {:?} but held by workers", t.state));
            }
            for w in &t.who_has {
                if !self.workers.get(w).is_some_and(|w| w.has_what.contains(&id)) {
                    return Err(format!("{key}: held by a worker that does not list it"));
                }
            }
            match (t.state, t.processing_on) {
                (TaskState::Processing, Some(w)) => {
                    let listed = self.workers.get(&w).is_some_and(|w| w.processing.contains(&id));
                    if !listed {
                        return Err(format!("{key}: worker does not list it"));
                    }
                }
                (TaskState::Processing, None) => return Err(format!("{key}: processing nowhere")),
                (_, Some(_)) => return Err(format!("{key}: {:?} but assigned to a worker", t.state)),
                _ => {}
            }
            let in_queue = self.queue.contains(&(t.priority, id));
            if in_queue != (t.state == TaskState::Queued) {
                return Err(format!("{key}: {:?}, in the root queue: {in_queue}", t.state));
            }
            let in_no_worker = self.no_worker.contains(&(t.priority, id));
            if in_no_worker != (t.state == TaskState::NoWorker) {
                return Err(format!("{key}: {:?}, in the no-worker set: {in_no_worker}", t.state));
            }
            for h in &t.who_wants {
                if let Holder::Client(c) = h {
                    if !self.clients.get(c).is_some_and(|c| c.wants.contains(&id)) {
                        return Err(format!("{key}: wanted by client {c}, which does not list it"));
                    }
                    if t.who_wants.iter().filter(|x| *x == h).count() > 1 {
                        return Err(format!("{key}: wanted twice by client {c}"));
                    }
                }
            }
            if t.state == TaskState::Released && t.dependents.is_empty() {
                return Err(format!("{key}: released without dependents but not forgotten"));
            }
        }
        if live != self.keys.len() || self.queue.len() + self.no_worker.len() > live {
            return Err(format!("{} tasks but {} keys", live, self.keys.len()));
        }
        let held: Vec<(u32, u64)> = self.shared.refs().collect();
        if held.len() != blob_refs.len() || held.iter().any(|(b, n)| blob_refs.get(b) != Some(n)) {
            return Err(format!("shared blobs hold {held:?} references but tasks make {blob_refs:?}"));
        }
        for (gi, g) in self.groups.iter().enumerate().filter(|(_, g)| !g.name.is_empty()) {
            let c = counts.get(&(gi as u32)).copied().unwrap_or([0; 8]);
            let forgotten = TaskState::Forgotten.index();
            let live: u64 = (0..8).filter(|&s| s != forgotten).map(|s| c[s]).sum();
            if live != g.live {
                return Err(format!("group {}: {} live tasks but it counts {}", g.name, live, g.live));
            }
            if (0..8).any(|s| s != forgotten && c[s] != g.counts[s]) {
                return Err(format!("group {}: counts {:?} but tasks say {:?}", g.name, g.counts, c));
            }
        }
        for (c, client) in &self.clients {
            for &id in &client.wants {
                let held = self.tasks.get(id as usize).and_then(|t| t.as_ref());
                if !held.is_some_and(|t| t.who_wants.contains(&Holder::Client(*c))) {
                    return Err(format!("client {c} lists a task that does not name it"));
                }
            }
        }
        if self.worker_order.len() != self.workers.len() {
            return Err("worker order and worker table differ".into());
        }
        for (p, w) in &self.workers {
            let mut nbytes = 0;
            for &id in &w.has_what {
                let t = self.tasks.get(id as usize).and_then(|t| t.as_ref());
                let Some(t) = t.filter(|t| t.who_has.contains(p)) else {
                    return Err(format!("worker {}: holds a task that does not name it", w.name));
                };
                nbytes += t.nbytes;
            }
            if nbytes != w.nbytes {
                return Err(format!("worker {}: nbytes {} but its keys sum to {nbytes}", w.name, w.nbytes));
            }
            for &id in &w.processing {
                let t = self.tasks.get(id as usize).and_then(|t| t.as_ref());
                if !t.is_some_and(|t| t.state == TaskState::Processing && t.processing_on == Some(*p)) {
                    return Err(format!("worker {}: lists a task not processing there", w.name));
                }
            }
            if !w.long_running.is_subset(&w.processing) {
                return Err(format!("worker {}: a seceded task is not processing there", w.name));
            }
        }
        Ok(())
    }
}
