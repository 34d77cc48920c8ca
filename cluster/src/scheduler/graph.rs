//! Graph intake: tasks submitted by clients (and data scattered by them)
//! become known, and move from released to waiting to ready.

use super::state::{PeerId, SchedulerState, TaskState};
use super::task::{ErrorInfo, Restriction, Task, TaskId};
use crate::protocol::{Key, Priority, TaskSpec, ToClient};
use bytes::Bytes;

impl SchedulerState {
    /// A client submitted tasks and wants `wanted` of them.
    pub fn update_graph(&mut self, client: PeerId, tasks: Vec<(TaskSpec, Option<Bytes>)>, wanted: Vec<Key>) {
        self.update_graph_shared(client, tasks, wanted, Vec::new())
    }

    /// [`update_graph`](Self::update_graph) with the blobs (functions) its
    /// tasks refer to by id.
    pub fn update_graph_shared(
        &mut self,
        client: PeerId,
        tasks: Vec<(TaskSpec, Option<Bytes>)>,
        wanted: Vec<Key>,
        shared: Vec<(u64, Bytes)>,
    ) {
        self.add_client(client);
        self.generation += 1;
        let generation = self.generation;
        let shared_ids: Vec<u64> = shared.iter().map(|(id, _)| *id).collect();
        for (id, data) in shared {
            self.shared.register(id, data);
        }
        // Room for the whole graph at once: growing the task table and the
        // key index step by step would copy them again and again.
        let new = tasks.len().saturating_sub(self.free_ids.len());
        self.tasks.reserve(new);
        self.keys.reserve(tasks.len());
        let mut fresh: Vec<(TaskId, Vec<Key>)> = Vec::with_capacity(tasks.len());
        let mut unknown_blobs: Vec<(TaskId, u64)> = Vec::new();
        for (spec, run_spec) in tasks {
            if let Some(&id) = self.keys.get(spec.key.as_str()) {
                let t = self.t(id);
                // Same key known already: pure deduplication, unless a
                // released task has lost its recipe.
                if t.run_spec.is_some() || t.state != TaskState::Released {
                    continue;
                }
                self.tm(id).run_spec = run_spec;
                if let (None, Some(blob)) = (self.t(id).shared, spec.shared) {
                    let taken = self.shared.take(blob);
                    self.tm(id).shared = taken;
                    if taken.is_none() {
                        unknown_blobs.push((id, blob));
                    }
                }
                continue;
            }
            let group = self.group_id(&spec.key);
            let restriction = Restriction::from_spec(spec.workers, spec.allow_other_workers, spec.resources);
            let priority = Priority { user: -spec.priority, generation, order: spec.order };
            let shared = spec.shared.and_then(|b| self.shared.take(b));
            let task =
                Task { restriction, retries: spec.retries, shared, ..Task::new(&spec.key, group, run_spec, priority) };
            let id = self.insert_task(task);
            if let (None, Some(blob)) = (shared, spec.shared) {
                unknown_blobs.push((id, blob));
            }
            fresh.push((id, spec.deps));
        }
        self.shared.sweep(shared_ids);
        let mut unknown: Vec<(TaskId, Key)> = Vec::new();
        let mut last_edge = (u32::MAX, u32::MAX);
        for (id, deps) in &fresh {
            let mut ids = Vec::with_capacity(deps.len());
            let group = self.t(*id).group;
            for k in deps {
                let Some(&d) = self.keys.get(k.as_str()) else {
                    unknown.push((*id, k.clone()));
                    continue;
                };
                let dt = self.tm(d);
                // `id` is new, so only this loop has made it a dependent of
                // `d`: already there means `d` is listed twice, which is one
                // dependency.
                if dt.dependents.ends_with(*id) {
                    continue;
                }
                ids.push(d);
                dt.dependents.push(*id);
                let dg = dt.group;
                // Group edges repeat along a graph: check each pair once in a row.
                if dg != group && last_edge != (group, dg) {
                    last_edge = (group, dg);
                    let deps = &mut self.groups[group as usize].deps;
                    if !deps.contains(&dg) {
                        deps.push(dg);
                    }
                }
            }
            self.tm(*id).deps = ids;
        }
        for k in &wanted {
            if let Some(&id) = self.keys.get(k.as_str()) {
                self.client_wants(client, id);
                // Done before this graph: tell the client now (what errs
                // below is reported as it errs).
                if matches!(self.t(id).state, TaskState::Memory | TaskState::Erred) {
                    self.report_to(client, id);
                }
            }
        }
        for (id, blob) in unknown_blobs {
            // A client bug, not a user's: the graph did not carry the blob.
            if self.live(id).is_some_and(|t| t.state == TaskState::Released) {
                let text = format!("the task's function (shared blob {blob:#x}) was not sent with its graph");
                self.set_erred(id, ErrorInfo::scheduler(text));
            }
        }
        for (id, k) in unknown {
            // One error per task (its first unknown dependency); erring it
            // may forget it when nobody wants it.
            if !self.live(id).is_some_and(|t| t.state != TaskState::Erred) {
                continue;
            }
            let text = format!("dependency {k:?} is not known to the scheduler (was its future released?)");
            self.set_erred(id, ErrorInfo::scheduler(text));
        }
        for (id, _) in &fresh {
            // An erred task nobody wants (an unknown dependency) may already
            // be forgotten, and a later `id` with it.
            if self.live(*id).is_some_and(|t| t.state == TaskState::Released) {
                self.transition_to_waiting(*id);
            }
        }
        for k in &wanted {
            if let Some(&id) = self.keys.get(k.as_str()) {
                if self.t(id).state == TaskState::Released {
                    self.transition_to_waiting(id);
                }
            }
        }
        self.fill_all_workers();
    }

    /// A client declared interest in keys it did not submit.
    pub fn want_keys(&mut self, client: PeerId, keys: Vec<Key>) {
        self.add_client(client);
        for k in keys {
            match self.keys.get(k.as_str()) {
                Some(&id) => {
                    self.client_wants(client, id);
                    match self.t(id).state {
                        TaskState::Memory | TaskState::Erred => self.report_to(client, id),
                        TaskState::Released => self.transition_to_waiting(id),
                        _ => {}
                    }
                }
                None => self.send_client(
                    client,
                    ToClient::KeyCancelled { key: k, reason: "key is not known to the scheduler".into() },
                ),
            }
        }
        self.fill_all_workers();
    }

    /// Data a client put on `worker` directly.
    pub fn scatter_done(&mut self, client: PeerId, worker_addr: &str, keys: Vec<(Key, u64)>) {
        self.add_client(client);
        let Some(worker) = self.worker_by_address(worker_addr) else {
            for (k, _) in keys {
                self.send_client(
                    client,
                    ToClient::KeyCancelled { key: k, reason: format!("worker {worker_addr} is gone") },
                );
            }
            return;
        };
        for (k, nbytes) in keys {
            let id = match self.keys.get(k.as_str()) {
                Some(&id) => id,
                None => {
                    let group = self.group_id(&k);
                    let task = Task { nbytes, ..Task::new(&k, group, None, Priority::default()) };
                    self.insert_task(task)
                }
            };
            self.client_wants(client, id);
            if self.t(id).state != TaskState::Memory {
                self.unassign(id);
                self.tm(id).nbytes = nbytes;
                let g = self.t(id).group as usize;
                self.groups[g].nbytes += nbytes;
                self.set_state(id, TaskState::Memory);
                self.add_replica(id, worker);
                self.on_memory(id);
            } else {
                self.add_replica(id, worker);
                self.report_to(client, id);
            }
        }
    }

    /// Add a released task to the table, the key index and its group's counts.
    pub(super) fn insert_task(&mut self, task: Task) -> TaskId {
        let g = &mut self.groups[task.group as usize];
        g.counts[TaskState::Released.index()] += 1;
        g.live += 1;
        let key = task.key.clone();
        let id = match self.free_ids.pop() {
            Some(id) => {
                self.tasks[id as usize] = Some(task);
                id
            }
            None => {
                self.tasks.push(Some(task));
                (self.tasks.len() - 1) as TaskId
            }
        };
        self.keys.insert(key, id);
        id
    }

    /// Released -> waiting, bringing released dependencies back first. A
    /// dependency cycle among them errs the tasks on it (and what depends
    /// on them) with the cycle spelled out.
    pub(super) fn transition_to_waiting(&mut self, root: TaskId) {
        // Iterative post-order walk over released dependencies. A task whose
        // dependencies are being walked has `waiting_on == ON_PATH` (unused
        // while released), so meeting it again below itself is a cycle.
        const ON_PATH: u32 = u32::MAX;
        let mut stack = vec![(root, false)];
        while let Some((id, expanded)) = stack.pop() {
            if expanded && self.live(id).is_some_and(|t| t.waiting_on == ON_PATH) {
                self.tm(id).waiting_on = 0;
            }
            // Erring one task can release and forget another on the stack.
            if self.live(id).is_none_or(|t| t.state != TaskState::Released) {
                continue;
            }
            if !expanded {
                self.tm(id).waiting_on = ON_PATH;
                stack.push((id, true));
                for i in 0..self.t(id).deps.len() {
                    let d = self.t(id).deps[i];
                    if self.t(d).state != TaskState::Released {
                        continue;
                    }
                    if self.t(d).waiting_on == ON_PATH {
                        let mut path: Vec<&str> = stack
                            .iter()
                            .filter(|(_, e)| *e)
                            .map(|(x, _)| &*self.t(*x).key)
                            .skip_while(|k| *k != &*self.t(d).key)
                            .collect();
                        path.push(&*self.t(d).key);
                        let text = format!("dependency cycle: {}", path.join(" -> "));
                        let on_path: Vec<TaskId> = stack.iter().filter(|(_, e)| *e).map(|(x, _)| *x).collect();
                        let start = on_path.iter().position(|x| *x == d).unwrap_or(0);
                        // Every task on the cycle errs (not only those someone
                        // wants), and so does whatever depends on them.
                        let err = ErrorInfo::scheduler(text);
                        for &x in &on_path[start..] {
                            self.set_erred(x, err.clone());
                        }
                        break;
                    }
                    stack.push((d, false));
                }
                continue;
            }
            self.tm(id).waiting_on = 0;
            if self.t(id).run_spec.is_none() {
                let text =
                    format!("key {} cannot be recomputed: it has no recipe (scattered data lost?)", self.t(id).key);
                self.set_erred(id, ErrorInfo::scheduler(text));
                continue;
            }
            let mut missing = 0;
            let mut failed = None;
            for &d in &self.t(id).deps {
                match self.t(d).state {
                    TaskState::Memory => {}
                    TaskState::Erred => failed = self.t(d).error.clone(),
                    // Brought back above unless it could not be: it erred and,
                    // wanted by nothing active yet, was released again.
                    TaskState::Released => {
                        let text = format!("dependency {} was lost and cannot be recomputed", self.t(d).key);
                        failed = Some(ErrorInfo::scheduler(text));
                    }
                    _ => missing += 1,
                }
            }
            if let Some(err) = failed {
                self.set_erred(id, err);
                continue;
            }
            self.tm(id).waiting_on = missing;
            self.set_state(id, TaskState::Waiting);
            if missing == 0 {
                self.make_ready(id);
            }
        }
    }

    /// All dependencies are in memory: queue it or send it to a worker.
    pub(super) fn make_ready(&mut self, id: TaskId) {
        let t = self.t(id);
        let prio = t.priority;
        if t.deps.is_empty() && t.restriction.is_none() && !self.config.worker_saturation.is_infinite() {
            self.set_state(id, TaskState::Queued);
            self.queue.insert((prio, id));
            return;
        }
        match self.decide_worker(id) {
            Some(w) => self.assign(id, w),
            None => {
                self.set_state(id, TaskState::NoWorker);
                self.no_worker.insert((prio, id));
                let reason = match &self.t(id).restriction {
                    Some(r) if !self.workers.is_empty() => r.reason(),
                    _ => "no-worker: there are no workers".to_string(),
                };
                self.tell_wanters(id, Some(reason));
            }
        }
    }

    /// Tell the clients that want `id` whether it can run (see `KeyNoWorker`).
    pub(super) fn tell_wanters(&mut self, id: TaskId, reason: Option<String>) {
        let key = self.t(id).key.to_string();
        for c in self.clients_of(id) {
            self.send_client(c, ToClient::KeyNoWorker { key: key.clone(), reason: reason.clone() });
        }
    }
}
