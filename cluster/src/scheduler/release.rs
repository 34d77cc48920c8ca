//! Releasing and forgetting: keys nobody wants any more, cancellation,
//! retries, fire-and-forget, and `restart`, which forgets everything.

use crate::protocol::{Envelope, Key, Msg};
use super::holders::FIRE_AND_FORGET;
use super::state::{PeerId, SchedulerState, TaskState};
use super::task::TaskId;

impl SchedulerState {
    /// A client no longer holds futures for `keys`.
    pub fn release_keys(&mut self, client: PeerId, keys: &[Key]) {
        for k in keys {
            let Some(&id) = self.keys.get(k.as_str()) else {
                continue;
            };
            self.tm(id).who_wants.retain(|&p| p != client);
            if let Some(c) = self.clients.get_mut(&client) {
                c.wants.remove(&id);
            }
            self.check_release(id);
        }
    }

    /// A client cancelled `keys`: released for that client, which is told.
    pub fn cancel_keys(&mut self, client: PeerId, keys: Vec<Key>) {
        self.release_keys(client, &keys);
        for k in keys {
            self.send(client, Msg::KeyCancelled { key: k, reason: "cancelled by the client".into() });
        }
    }

    /// Release `id` if nothing needs it any more, cascading to its dependencies.
    pub(super) fn check_release(&mut self, root: TaskId) {
        let mut stack = vec![root];
        while let Some(id) = stack.pop() {
            let Some(Some(t)) = self.tasks.get(id as usize) else {
                continue;
            };
            if t.state == TaskState::Forgotten || !t.who_wants.is_empty() || t.waiters > 0 {
                continue;
            }
            match t.state {
                TaskState::Memory => {
                    let holders = std::mem::take(&mut self.tm(id).who_has);
                    let nbytes = self.t(id).nbytes;
                    let key = self.t(id).key.to_string();
                    for w in holders {
                        if let Some(worker) = self.workers.get_mut(&w) {
                            worker.has_what.remove(&id);
                            worker.nbytes = worker.nbytes.saturating_sub(nbytes);
                        }
                        self.send(w, Msg::FreeKeys { keys: vec![key.clone()] });
                    }
                    let g = self.t(id).group as usize;
                    self.groups[g].nbytes = self.groups[g].nbytes.saturating_sub(nbytes);
                    self.set_state(id, TaskState::Released);
                }
                TaskState::Waiting | TaskState::Queued | TaskState::NoWorker | TaskState::Processing => {
                    self.unassign(id);
                    self.set_state(id, TaskState::Released);
                    stack.extend(self.t(id).deps.iter().copied());
                }
                TaskState::Erred => {
                    self.set_state(id, TaskState::Released);
                    self.tm(id).error = None;
                }
                _ => {}
            }
            // Forget once no dependent remains that may need recomputing it.
            if self.t(id).state == TaskState::Released && self.t(id).dependents.is_empty() {
                let deps = self.forget(id);
                stack.extend(deps);
            }
        }
    }

    /// Remove a released task with no dependents; returns its dependencies.
    pub(super) fn forget(&mut self, id: TaskId) -> Vec<TaskId> {
        self.set_state(id, TaskState::Forgotten);
        let t = self.tasks[id as usize].take().expect("live task");
        self.keys.remove(&t.key);
        self.steals.remove(&id);
        self.free_ids.push(id);
        for &d in &t.deps {
            if let Some(Some(dt)) = self.tasks.get_mut(d as usize) {
                dt.dependents.remove(id);
            }
        }
        t.deps
    }

    /// Re-run erred `keys`, together with the erred tasks they depend on.
    pub fn retry_keys(&mut self, keys: &[Key]) {
        for k in keys {
            let Some(&root) = self.keys.get(k.as_str()) else { continue };
            let mut stack = vec![root];
            while let Some(id) = stack.pop() {
                if self.t(id).state != TaskState::Erred {
                    continue;
                }
                self.tm(id).error = None;
                self.set_state(id, TaskState::Released);
                stack.extend(self.t(id).deps.iter().copied());
            }
            if self.t(root).state == TaskState::Released {
                self.transition_to_waiting(root);
            }
        }
        self.fill_all_workers();
    }

    /// Keep computing `keys` after their clients let go; forget them once done.
    pub fn fire_and_forget(&mut self, keys: &[Key]) {
        for k in keys {
            let Some(&id) = self.keys.get(k.as_str()) else { continue };
            match self.t(id).state {
                TaskState::Memory | TaskState::Erred => {}
                _ => {
                    if !self.t(id).who_wants.contains(&FIRE_AND_FORGET) {
                        self.tm(id).who_wants.push(FIRE_AND_FORGET);
                    }
                }
            }
        }
    }

    /// `Client.restart`: every client hears that each of its keys was
    /// cancelled, every task and dataset is forgotten, and every worker is
    /// asked to exit for its supervisor to start a fresh process (which
    /// registers anew). Clients and coordination primitives stay.
    pub fn restart(&mut self) {
        let mut cancelled: Vec<(PeerId, Key)> = Vec::new();
        for t in self.tasks.iter().flatten() {
            for &c in &t.who_wants {
                if self.clients.contains_key(&c) {
                    cancelled.push((c, t.key.to_string()));
                }
            }
        }
        for (c, key) in cancelled {
            self.send(c, Msg::KeyCancelled { key, reason: crate::protocol::RESTARTED.into() });
        }
        for r in std::mem::take(&mut self.rebalances) {
            let (moved, bytes, failed) = (r.moved, r.bytes, r.failed + r.pending.len() as u64);
            let error = crate::protocol::RESTARTED.to_string();
            self.send(r.requester, Msg::Rebalanced { id: r.id, moved, bytes, failed, error });
        }
        for &w in &self.worker_order {
            self.out.push((w, Envelope::new(Msg::RestartWorker)));
        }
        let out = std::mem::take(&mut self.out);
        let coord = std::mem::take(&mut self.coord);
        let clients: Vec<PeerId> = self.clients.keys().copied().collect();
        let stream_total = self.stream_total;
        let version = self.version;
        *self = SchedulerState::new(self.config.clone());
        self.out = out;
        self.coord = coord;
        self.stream_total = stream_total;
        self.version = version + 1;
        for c in clients {
            self.add_client(c);
        }
    }
}
