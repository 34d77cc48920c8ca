//! Graph intake: tasks submitted by clients (and data scattered by them)
//! become known, and move from released to waiting to ready.

use std::sync::Arc;
use bytes::Bytes;
use crate::protocol::{Key, Msg, Priority, TaskSpec};
use super::state::{PeerId, SchedulerState, TaskState};
use super::task::{Dependents, ErrorInfo, Restriction, Task, TaskId};

impl SchedulerState {
    /// A client submitted tasks and wants `wanted` of them.
    pub fn update_graph(&mut self, client: PeerId, tasks: Vec<(TaskSpec, Option<Bytes>)>, wanted: Vec<Key>) {
        self.add_client(client);
        self.generation += 1;
        let generation = self.generation;
        let mut fresh: Vec<(TaskId, Vec<Key>)> = Vec::with_capacity(tasks.len());
        for (spec, run_spec) in tasks {
            if let Some(&id) = self.keys.get(spec.key.as_str()) {
                let t = self.t(id);
                // Same key known already: pure deduplication, unless a
                // released task has lost its recipe.
                if t.run_spec.is_some() || t.state != TaskState::Released {
                    continue;
                }
                self.tm(id).run_spec = run_spec;
                continue;
            }
            let group = self.group_id(&spec.key);
            let restriction = Restriction::from_spec(spec.workers, spec.allow_other_workers, spec.resources);
            let task = Task {
                key: spec.key.clone().into_boxed_str(),
                state: TaskState::Released,
                run_spec,
                deps: Vec::new(),
                dependents: Dependents::new(),
                waiting_on: 0,
                waiters: 0,
                who_wants: Vec::new(),
                who_has: Vec::new(),
                processing_on: None,
                nbytes: 0,
                priority: Priority { user: -spec.priority, generation, order: spec.order },
                group,
                restriction,
                error: None,
                retries: spec.retries,
                suspicious: 0,
            };
            let id = self.insert_task(task);
            self.groups[group as usize].counts[TaskState::Released.index()] += 1;
            fresh.push((id, spec.deps));
        }
        let mut unknown: Vec<(TaskId, Key)> = Vec::new();
        for (id, deps) in &fresh {
            let mut ids = Vec::with_capacity(deps.len());
            for k in deps {
                match self.keys.get(k.as_str()) {
                    Some(&d) => ids.push(d),
                    None => unknown.push((*id, k.clone())),
                }
            }
            for &d in &ids {
                self.tm(d).dependents.push(*id);
            }
            self.tm(*id).deps = ids;
        }
        for k in &wanted {
            if let Some(&id) = self.keys.get(k.as_str()) {
                let t = self.tm(id);
                if !t.who_wants.contains(&client) {
                    t.who_wants.push(client);
                }
                self.clients.get_mut(&client).expect("client").wants.insert(id);
            }
        }
        for (id, k) in unknown {
            let err = Arc::new(ErrorInfo {
                exception: Bytes::new(),
                traceback: Bytes::new(),
                text: format!("dependency {k:?} is not known to the scheduler (was its future released?)"),
            });
            self.set_erred(id, err);
        }
        for (id, _) in &fresh {
            if self.t(*id).state == TaskState::Released {
                self.transition_to_waiting(*id);
            }
        }
        for k in &wanted {
            if let Some(&id) = self.keys.get(k.as_str()) {
                match self.t(id).state {
                    TaskState::Released => self.transition_to_waiting(id),
                    TaskState::Memory | TaskState::Erred => self.report_to(client, id),
                    _ => {}
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
                    if !self.t(id).who_wants.contains(&client) {
                        self.tm(id).who_wants.push(client);
                    }
                    self.clients.get_mut(&client).expect("client").wants.insert(id);
                    match self.t(id).state {
                        TaskState::Memory | TaskState::Erred => self.report_to(client, id),
                        TaskState::Released => self.transition_to_waiting(id),
                        _ => {}
                    }
                }
                None => {
                    self.send(client, Msg::KeyCancelled { key: k, reason: "key is not known to the scheduler".into() })
                }
            }
        }
        self.fill_all_workers();
    }

    /// Data a client put on `worker` directly.
    pub fn scatter_done(&mut self, client: PeerId, worker_addr: &str, keys: Vec<(Key, u64)>) {
        self.add_client(client);
        let worker = self.workers.iter().find(|(_, w)| w.address == worker_addr).map(|(p, _)| *p);
        let Some(worker) = worker else {
            for (k, _) in keys {
                self.send(client, Msg::KeyCancelled { key: k, reason: format!("worker {worker_addr} is gone") });
            }
            return;
        };
        for (k, nbytes) in keys {
            let id = match self.keys.get(k.as_str()) {
                Some(&id) => id,
                None => {
                    let group = self.group_id(&k);
                    let task = Task {
                        key: k.clone().into_boxed_str(),
                        state: TaskState::Released,
                        run_spec: None,
                        deps: Vec::new(),
                        dependents: Dependents::new(),
                        waiting_on: 0,
                        waiters: 0,
                        who_wants: Vec::new(),
                        who_has: Vec::new(),
                        processing_on: None,
                        nbytes,
                        priority: Priority::default(),
                        group,
                        restriction: None,
                        error: None,
                        retries: 0,
                        suspicious: 0,
                    };
                    let id = self.insert_task(task);
                    self.groups[group as usize].counts[TaskState::Released.index()] += 1;
                    id
                }
            };
            if !self.t(id).who_wants.contains(&client) {
                self.tm(id).who_wants.push(client);
            }
            self.clients.get_mut(&client).expect("client").wants.insert(id);
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

    pub(super) fn insert_task(&mut self, task: Task) -> TaskId {
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

    /// Released -> waiting, bringing released dependencies back first.
    pub(super) fn transition_to_waiting(&mut self, root: TaskId) {
        // Iterative post-order walk over released dependencies.
        let mut stack = vec![(root, false)];
        while let Some((id, expanded)) = stack.pop() {
            if self.t(id).state != TaskState::Released {
                continue;
            }
            if !expanded {
                stack.push((id, true));
                for i in 0..self.t(id).deps.len() {
                    let d = self.t(id).deps[i];
                    if self.t(d).state == TaskState::Released {
                        stack.push((d, false));
                    }
                }
                continue;
            }
            if self.t(id).run_spec.is_none() {
                let err = Arc::new(ErrorInfo {
                    exception: Bytes::new(),
                    traceback: Bytes::new(),
                    text: format!(
                        "key {} cannot be recomputed: it has no recipe (scattered data lost?)",
                        self.t(id).key
                    ),
                });
                self.set_erred(id, err);
                continue;
            }
            let mut missing = 0;
            let mut failed = None;
            for &d in &self.t(id).deps {
                match self.t(d).state {
                    TaskState::Memory => {}
                    TaskState::Erred => failed = self.t(d).error.clone(),
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
                self.tell_wanters(id, reason);
            }
        }
    }

    /// Tell the clients that want `id` whether it can run (see `KeyNoWorker`).
    pub(super) fn tell_wanters(&mut self, id: TaskId, reason: String) {
        let key = self.t(id).key.to_string();
        let clients: Vec<PeerId> =
            self.t(id).who_wants.iter().copied().filter(|c| self.clients.contains_key(c)).collect();
        for c in clients {
            self.send(c, Msg::KeyNoWorker { key: key.clone(), reason: reason.clone() });
        }
    }
}
