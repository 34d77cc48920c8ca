//! What workers report about tasks: finished, erred, seceded, replicas
//! that arrived, data they could not fetch; and telling clients.

use super::holders::Holder;
use super::state::{PeerId, SchedulerState, TaskState};
use super::task::{ErrorInfo, TaskId};
use crate::protocol::{
    Blob, Envelope, Key, TaskErred, TaskFinished, TaskStreamRecord, ToClient, ToWorker, SPILL_GROUP, SPILL_THREAD,
};
use bytes::Bytes;
use std::sync::Arc;

/// How one execution of a task went, for the task stream.
struct TaskRun {
    thread: u32,
    start: f64,
    stop: f64,
    transfer: f64,
    erred: bool,
}

impl SchedulerState {
    /// A worker finished a task.
    pub fn task_finished(&mut self, worker: PeerId, report: &TaskFinished) {
        let TaskFinished { ref key, nbytes, start, stop, thread, transfer } = *report;
        let Some(&id) = self.keys.get(key.as_str()) else {
            self.send_worker(worker, ToWorker::FreeKeys { keys: vec![key.to_string()] });
            return;
        };
        let (state, on) = (self.t(id).state, self.t(id).processing_on);
        if state != TaskState::Processing || on != Some(worker) {
            let t = self.t(id);
            if t.state == TaskState::Memory && !t.who_has.contains(&worker) {
                self.add_replica(id, worker);
            } else if !t.who_has.contains(&worker) {
                self.send_worker(worker, ToWorker::FreeKeys { keys: vec![key.to_string()] });
            }
            return;
        }
        let group = self.t(id).group;
        self.ran_on(id, worker, TaskRun { thread, start, stop, transfer, erred: false });
        self.tm(id).nbytes = nbytes;
        let g = &mut self.groups[group as usize];
        g.nbytes += nbytes;
        if stop >= start {
            g.duration_sum += stop - start;
            g.duration_n += 1;
        }
        self.set_state(id, TaskState::Memory);
        self.add_replica(id, worker);
        self.on_memory(id);
        self.fill_worker(worker);
        self.check_retirements();
    }

    /// `id`, processing on `worker`, ran there and ended: no longer
    /// assigned, and recorded in the task stream.
    fn ran_on(&mut self, id: TaskId, worker: PeerId, run: TaskRun) {
        self.tm(id).processing_on = None;
        let Some(w) = self.workers.get_mut(&worker) else { return };
        w.unprocess(id);
        let worker = w.address.clone();
        let TaskRun { thread, start, stop, transfer, erred } = run;
        let t = self.t(id);
        let rec = TaskStreamRecord {
            key: t.key.to_string(),
            group: self.groups[t.group as usize].name.clone(),
            worker,
            thread,
            start,
            stop,
            transfer,
            erred,
        };
        self.push_stream(rec);
    }

    /// Worker `worker` wrote `keys` results to disk between `start` and
    /// `stop`: a record of its own in the task stream.
    pub fn worker_spilled(&mut self, worker: PeerId, keys: u32, start: f64, stop: f64) {
        let Some(w) = self.workers.get(&worker) else { return };
        let rec = TaskStreamRecord {
            key: format!("{SPILL_GROUP} ({keys} results)"),
            group: SPILL_GROUP.to_string(),
            worker: w.address.clone(),
            thread: SPILL_THREAD,
            start,
            stop,
            transfer: 0.0,
            erred: false,
        };
        self.push_stream(rec);
    }

    /// A task left its thread to wait for tasks it launched (`secede`): it
    /// stays assigned to `worker` (and is rescheduled if the worker dies) but
    /// no longer holds a slot, so the tasks it waits for can run there.
    pub fn task_seceded(&mut self, worker: PeerId, key: &str) {
        let Some(&id) = self.keys.get(key) else { return };
        if self.t(id).state != TaskState::Processing || self.t(id).processing_on != Some(worker) {
            return;
        }
        if let Some(w) = self.workers.get_mut(&worker) {
            w.long_running.insert(id);
        }
        self.fill_worker(worker);
    }

    pub(super) fn add_replica(&mut self, id: TaskId, worker: PeerId) {
        let nbytes = self.t(id).nbytes;
        if let Some(w) = self.workers.get_mut(&worker) {
            if w.has_what.insert(id) {
                w.nbytes += nbytes;
                self.tm(id).who_has.push(worker);
            }
        }
    }

    /// `worker` no longer holds `id`.
    pub(super) fn remove_replica(&mut self, id: TaskId, worker: PeerId) {
        let nbytes = self.t(id).nbytes;
        if let Some(w) = self.workers.get_mut(&worker) {
            if w.has_what.remove(&id) {
                w.nbytes = w.nbytes.saturating_sub(nbytes);
            }
        }
        self.tm(id).who_has.retain(|&p| p != worker);
    }

    pub(super) fn on_memory(&mut self, id: TaskId) {
        self.unhold_all(id, Holder::FireAndForget);
        for c in self.clients_of(id) {
            self.report_to(c, id);
        }
        for d in self.t(id).dependents.to_vec() {
            if self.t(d).state == TaskState::Waiting {
                let dt = self.tm(d);
                dt.waiting_on = dt.waiting_on.saturating_sub(1);
                if dt.waiting_on == 0 {
                    self.make_ready(d);
                }
            }
        }
        // Processing finished: dependencies this task held are released if unwanted.
        let deps = self.t(id).deps.clone();
        for d in deps {
            self.check_release(d);
        }
        self.check_release(id);
    }

    pub(super) fn report_to(&mut self, client: PeerId, id: TaskId) {
        let t = self.t(id);
        let msg = match t.state {
            TaskState::Memory => {
                ToClient::KeyInMemory { key: t.key.to_string(), nbytes: t.nbytes, workers: self.addresses(&t.who_has) }
            }
            TaskState::Erred => {
                let e = t.error.as_ref().expect("erred task has error");
                let mut frames = Vec::new();
                let exception = Blob::new(e.exception.clone(), &mut frames);
                let traceback = Blob::new(e.traceback.clone(), &mut frames);
                let msg = ToClient::KeyErred { key: t.key.to_string(), exception, traceback, text: e.text.clone() };
                self.send_client(client, Envelope { msg, frames });
                return;
            }
            _ => return,
        };
        self.send_client(client, msg);
    }

    /// A task raised on a worker; `frames` came with the report.
    pub fn task_erred(&mut self, worker: PeerId, report: TaskErred, frames: &[Bytes]) {
        let TaskErred { key, exception, traceback, text, start, stop, thread } = report;
        let Some(&id) = self.keys.get(key.as_str()) else {
            return;
        };
        let (state, on) = (self.t(id).state, self.t(id).processing_on);
        if state != TaskState::Processing || on != Some(worker) {
            return;
        }
        self.ran_on(id, worker, TaskRun { thread, start, stop, transfer: 0.0, erred: true });
        if self.t(id).retries > 0 {
            self.tm(id).retries -= 1;
            self.set_state(id, TaskState::Released);
            self.transition_to_waiting(id);
        } else {
            let exception = exception.resolve(frames).unwrap_or_default();
            let traceback = traceback.resolve(frames).unwrap_or_default();
            self.set_erred(id, Arc::new(ErrorInfo { exception, traceback, text }));
        }
        self.fill_worker(worker);
        self.check_retirements();
    }

    /// Mark `root` and every dependent that waits on it as erred.
    pub(super) fn set_erred(&mut self, root: TaskId, err: Arc<ErrorInfo>) {
        let mut stack = vec![root];
        let mut touched = Vec::new();
        while let Some(id) = stack.pop() {
            let st = self.t(id).state;
            if st == TaskState::Erred || st == TaskState::Memory || st == TaskState::Forgotten {
                continue;
            }
            if id != root && st == TaskState::Released && self.t(id).who_wants.is_empty() {
                continue;
            }
            self.unassign(id);
            self.tm(id).error = Some(err.clone());
            self.set_state(id, TaskState::Erred);
            touched.push(id);
            stack.extend(self.t(id).dependents.iter());
        }
        for &id in &touched {
            self.unhold_all(id, Holder::FireAndForget);
            for c in self.clients_of(id) {
                self.report_to(c, id);
            }
        }
        for id in touched {
            // Releasing one erred task can forget another.
            let Some(t) = self.live(id) else { continue };
            let deps = t.deps.clone();
            for d in deps {
                self.check_release(d);
            }
            self.check_release(id);
        }
    }

    /// A worker reports that it could not get `key` from `holders`.
    pub fn missing_data(&mut self, worker: PeerId, key: &str, holders: &[String]) {
        let Some(&id) = self.keys.get(key) else {
            return;
        };
        for h in holders {
            if let Some(p) = self.worker_by_address(h) {
                self.remove_replica(id, p);
            }
        }
        // Tasks on the reporting worker that needed it are rescheduled.
        let stuck: Vec<TaskId> =
            self.t(id).dependents.iter().filter(|&d| self.t(d).processing_on == Some(worker)).collect();
        if self.t(id).state == TaskState::Memory && self.t(id).who_has.is_empty() {
            self.lose_data(id);
        }
        for d in stuck {
            if self.t(d).state == TaskState::Processing {
                self.unassign(d);
                self.set_state(d, TaskState::Released);
                self.transition_to_waiting(d);
            }
        }
        self.replicating.remove(&id);
        for r in &mut self.rebalances {
            if r.pending.get(key).is_some_and(|&(_, to)| to == worker) {
                r.pending.remove(key);
                r.failed += 1;
            }
        }
        self.fill_all_workers();
        self.check_retirements();
        self.check_rebalances();
    }

    /// A worker received replicas of keys (fetched dependencies).
    pub fn add_keys(&mut self, worker: PeerId, keys: &[(Key, u64)]) {
        let mut unknown = Vec::new();
        for (k, _) in keys {
            match self.keys.get(k.as_str()) {
                Some(&id) if self.t(id).state == TaskState::Memory => {
                    self.add_replica(id, worker);
                    self.rebalance_arrived(id, worker);
                }
                // A copy that arrived where the task is being recomputed: the
                // task's own result follows; freeing the key would cancel it.
                Some(&id) if self.t(id).processing_on == Some(worker) => {}
                _ => unknown.push(k.clone()),
            }
        }
        if !unknown.is_empty() {
            self.send_worker(worker, ToWorker::FreeKeys { keys: unknown });
        }
        self.check_retirements();
        self.check_rebalances();
    }
}
