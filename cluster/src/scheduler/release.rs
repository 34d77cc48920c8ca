//! Releasing and forgetting: keys nobody wants any more, cancellation,
//! retries, fire-and-forget, and `restart`, which forgets everything.

use super::holders::Holder;
use super::state::{PeerId, SchedulerState, TaskState};
use super::task::TaskId;
use crate::protocol::{Key, ToClient, ToWorker};

impl SchedulerState {
    /// A client no longer holds futures for `keys`.
    pub fn release_keys(&mut self, client: PeerId, keys: &[Key]) {
        for k in keys {
            let Some(&id) = self.keys.get(k.as_str()) else {
                continue;
            };
            self.client_releases(client, id);
        }
    }

    /// A client cancelled `keys`: released for that client, which is told.
    pub fn cancel_keys(&mut self, client: PeerId, keys: Vec<Key>) {
        self.release_keys(client, &keys);
        for k in keys {
            self.send_client(client, ToClient::KeyCancelled { key: k, reason: "cancelled by the client".into() });
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
                    let nbytes = self.t(id).nbytes;
                    let key = self.t(id).key.to_string();
                    for w in std::mem::take(&mut self.tm(id).who_has) {
                        self.remove_replica(id, w);
                        self.send_worker(w, ToWorker::FreeKeys { keys: vec![key.clone()] });
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
        if let Some((blob, holders)) = t.shared.and_then(|s| self.shared.drop_ref(s)) {
            for w in holders {
                self.send_worker(w, ToWorker::FreeShared { ids: vec![blob] });
            }
        }
        for &d in &t.deps {
            if let Some(Some(dt)) = self.tasks.get_mut(d as usize) {
                dt.dependents.remove(id);
            }
        }
        t.deps
    }

    /// Re-run erred `keys`, together with the erred tasks they depend on.
    pub fn retry_keys(&mut self, keys: &[Key]) {
        let mut released = Vec::new();
        for k in keys {
            let Some(&root) = self.keys.get(k.as_str()) else { continue };
            let mut stack = vec![root];
            while let Some(id) = stack.pop() {
                if self.t(id).state != TaskState::Erred {
                    continue;
                }
                self.tm(id).error = None;
                self.set_state(id, TaskState::Released);
                released.push(id);
                stack.extend(self.t(id).deps.iter().copied());
            }
        }
        // Every released task someone holds runs again (or errs again);
        // the rest are released for good.
        for id in released {
            match self.live(id) {
                Some(t) if t.state == TaskState::Released && !t.who_wants.is_empty() => self.transition_to_waiting(id),
                Some(t) if t.state == TaskState::Released => self.check_release(id),
                _ => {}
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
                _ => self.hold(id, Holder::FireAndForget),
            }
        }
    }

    /// `Client.restart`: every client hears that each of its keys was
    /// cancelled, every task and dataset is forgotten, and every worker is
    /// asked to exit for its supervisor to start a fresh process (which
    /// registers anew). Clients, coordination primitives and the running counters
    /// (task-stream total, tasks stolen) stay.
    pub fn restart(&mut self) {
        let mut cancelled: Vec<(PeerId, Key)> = Vec::new();
        for t in self.tasks.iter().flatten() {
            for c in t.who_wants.iter().filter_map(|h| h.client()) {
                cancelled.push((c, t.key.to_string()));
            }
        }
        for (c, key) in cancelled {
            self.send_client(c, ToClient::KeyCancelled { key, reason: crate::protocol::RESTARTED.into() });
        }
        for r in std::mem::take(&mut self.retirements) {
            // Every worker restarts instead: none was retired, and the
            // requester hears so rather than waiting for an answer that
            // would never come.
            let mut failed = r.failed;
            failed.extend(r.workers.into_iter().map(|(_, n)| (n, crate::protocol::RESTARTED.to_string())));
            self.send_client(r.requester, ToClient::WorkersRetired { id: r.id, retired: Vec::new(), failed });
        }
        for r in std::mem::take(&mut self.rebalances) {
            let result = Err(crate::protocol::RESTARTED.to_string());
            self.send_client(r.requester, ToClient::Rebalanced { id: r.id, result });
        }
        for w in self.worker_order.clone() {
            self.send_worker(w, ToWorker::RestartWorker);
        }
        // Every field is named, so a new one cannot be forgotten here.
        let SchedulerState {
            config: _,
            tasks,
            free_ids,
            keys,
            workers,
            worker_order,
            clients,
            queue,
            no_worker,
            generation,
            groups,
            group_ids,
            free_groups,
            emptied_groups,
            removed_groups,
            learned: _,
            stream,
            stream_total: _,
            version,
            out: _,
            datasets,
            retirements,
            replicating,
            coord: _,
            steals,
            stolen_total: _,
            rebalances,
            plugins: _,
            heartbeat_ms,
            shared,
        } = self;
        // Fresh worker processes start at the default interval.
        *heartbeat_ms = crate::protocol::DEFAULT_HEARTBEAT_MS;
        tasks.clear();
        free_ids.clear();
        keys.clear();
        workers.clear();
        worker_order.clear();
        for c in clients.values_mut() {
            c.wants.clear();
        }
        queue.clear();
        no_worker.clear();
        *generation = 0;
        // Subscribers hear that every group is gone.
        *version += 1;
        for g in groups.drain(..).filter(|g| !g.name.is_empty()) {
            removed_groups.push_back((*version, g.name));
        }
        while removed_groups.len() > 10_000 {
            removed_groups.pop_front();
        }
        group_ids.clear();
        free_groups.clear();
        emptied_groups.clear();
        stream.clear();
        datasets.clear();
        retirements.clear();
        replicating.clear();
        steals.clear();
        rebalances.clear();
        // The workers restart without them.
        shared.clear();
    }
}
