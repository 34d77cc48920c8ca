//! Workers joining, reporting metrics and leaving, and what their
//! departure does to the tasks they ran and the results they held.

use super::state::{PeerId, SchedulerState, TaskState};
use super::task::{ErrorInfo, TaskId};
use crate::protocol::{
    heartbeat_interval_ms, Envelope, Heartbeat, Registration, Resources, ToClient, ToWorker, DEFAULT_HEARTBEAT_MS,
};
use rustc_hash::FxHashSet;

#[derive(Debug)]
pub(super) struct Worker {
    pub(super) address: String,
    pub(super) name: String,
    pub(super) nthreads: u32,
    pub(super) memory_limit: u64,
    pub(super) pid: u32,
    pub(super) processing: FxHashSet<TaskId>,
    /// Tasks in `processing` that seceded from their thread (they launch and
    /// wait for other tasks): they take no thread and count toward no limit.
    pub(super) long_running: FxHashSet<TaskId>,
    pub(super) has_what: FxHashSet<TaskId>,
    pub(super) nbytes: u64,
    pub(super) rss: u64,
    pub(super) cpu: f32,
    pub(super) spilled: u64,
    pub(super) executing: u32,
    pub(super) ready: u32,
    pub(super) bytes_in: u64,
    pub(super) bytes_out: u64,
    /// Being retired: no new tasks; closed once its unique data has a copy elsewhere.
    pub(super) retiring: bool,
    pub(super) resources: Resources,
}

impl Worker {
    pub(super) fn slots(&self, saturation: f64) -> usize {
        if saturation.is_infinite() {
            return usize::MAX;
        }
        ((self.nthreads as f64 * saturation).ceil() as usize).max(1)
    }

    /// Tasks assigned here that occupy (or wait for) a thread.
    pub(super) fn busy(&self) -> usize {
        self.processing.len() - self.long_running.len()
    }

    pub(super) fn load(&self) -> f64 {
        self.busy() as f64 / self.nthreads.max(1) as f64
    }

    /// Forget `id` as assigned here.
    pub(super) fn unprocess(&mut self, id: TaskId) {
        self.processing.remove(&id);
        self.long_running.remove(&id);
    }
}

impl Worker {
    /// Whether `name` names this worker: its name, or its address with or
    /// without its scheme.
    pub(super) fn answers_to(&self, name: &str) -> bool {
        use crate::comm::strip_scheme;
        name == self.name || strip_scheme(name) == strip_scheme(&self.address)
    }
}

impl SchedulerState {
    /// The first worker (in joining order) that `name` names (see [`Worker::answers_to`]).
    pub(super) fn find_worker(&self, name: &str) -> Option<PeerId> {
        self.worker_order.iter().copied().find(|p| self.workers[p].answers_to(name))
    }

    /// The worker listening at exactly `address`.
    pub(super) fn worker_by_address(&self, address: &str) -> Option<PeerId> {
        self.workers.iter().find(|(_, w)| w.address == address).map(|(p, _)| *p)
    }

    /// Addresses of the live workers among `peers`, in that order.
    pub(super) fn addresses(&self, peers: &[PeerId]) -> Vec<String> {
        peers.iter().filter_map(|p| self.workers.get(p)).map(|w| w.address.clone()).collect()
    }

    /// A worker registered. Returns an error message if the address or name is taken.
    pub fn add_worker(&mut self, peer: PeerId, reg: Registration) -> Result<(), String> {
        let Registration { name, address, nthreads, memory_limit, pid, resources } = reg;
        if self.workers.values().any(|w| w.address == address) {
            return Err(format!("a worker with address {address} is already registered"));
        }
        if self.workers.values().any(|w| w.name == name) {
            return Err(format!("a worker named {name:?} is already registered"));
        }
        self.workers.insert(
            peer,
            Worker {
                address,
                name,
                nthreads: nthreads.max(1),
                memory_limit,
                pid,
                processing: FxHashSet::default(),
                long_running: FxHashSet::default(),
                has_what: FxHashSet::default(),
                nbytes: 0,
                rss: 0,
                cpu: 0.0,
                spilled: 0,
                executing: 0,
                ready: 0,
                bytes_in: 0,
                bytes_out: 0,
                retiring: false,
                resources,
            },
        );
        self.worker_order.push(peer);
        self.version += 1;
        // Prepared before it gets work: the set-up comes first on its connection.
        self.send_plugins(peer);
        self.space_heartbeats(Some(peer));
        self.worker_available();
        Ok(())
    }

    /// Tell workers a new heartbeat interval when the cluster's size calls
    /// for one (all of them), or a newcomer the current one when it is not
    /// the workers' default.
    fn space_heartbeats(&mut self, newcomer: Option<PeerId>) {
        let want = heartbeat_interval_ms(self.workers.len());
        let to: Vec<PeerId> = if want != self.heartbeat_ms {
            self.heartbeat_ms = want;
            self.worker_order.clone()
        } else {
            newcomer.filter(|_| want != DEFAULT_HEARTBEAT_MS).into_iter().collect()
        };
        for p in to {
            self.send_worker(p, Envelope::new(ToWorker::HeartbeatInterval { ms: want }));
        }
    }

    /// A worker can take work (it joined, or stopped retiring): tasks that
    /// had no worker try again, and queued root tasks are handed out.
    pub(super) fn worker_available(&mut self) {
        let stuck: Vec<TaskId> = std::mem::take(&mut self.no_worker).into_iter().map(|(_, id)| id).collect();
        for id in stuck {
            if self.t(id).state == TaskState::NoWorker {
                self.make_ready(id);
                if self.t(id).state != TaskState::NoWorker {
                    self.tell_wanters(id, None);
                }
            }
        }
        self.fill_all_workers();
    }

    /// A worker left (closed or died): its running tasks are rescheduled
    /// and results held only by it are recomputed when still needed.
    pub fn remove_worker(&mut self, peer: PeerId) {
        self.drop_worker(peer);
        self.check_retirements();
        self.check_rebalances();
    }

    pub(super) fn drop_worker(&mut self, peer: PeerId) {
        let Some(w) = self.workers.remove(&peer) else {
            return;
        };
        self.worker_order.retain(|&p| p != peer);
        self.shared.worker_gone(peer);
        self.version += 1;
        self.space_heartbeats(None);
        let mut lost = Vec::new();
        for id in w.has_what {
            let t = self.tm(id);
            t.who_has.retain(|&p| p != peer);
            if t.who_has.is_empty() && t.state == TaskState::Memory {
                lost.push(id);
            }
        }
        for id in lost {
            // Losing one result can release (and forget) another lost one.
            if self.live(id).is_some_and(|t| t.state == TaskState::Memory && t.who_has.is_empty()) {
                self.lose_data(id);
            }
        }
        // Tasks it ran, unless losing its results already rescheduled or forgot them.
        let mut processing: Vec<TaskId> = w.processing.into_iter().collect();
        processing.sort_by_key(|&id| self.live(id).map(|t| t.priority));
        for id in processing {
            let Some(t) = self.live(id) else { continue };
            if t.state == TaskState::Processing && t.processing_on == Some(peer) {
                self.tm(id).processing_on = None;
                self.tm(id).suspicious += 1;
                let deaths = self.t(id).suspicious;
                if deaths > self.config.allowed_failures {
                    let text = format!(
                        "KilledWorker: attempted to run task {} on {} different workers, but all those workers \
                         died while running it; the last was {} ({})",
                        self.t(id).key,
                        deaths,
                        w.address,
                        w.name
                    );
                    self.set_erred(id, ErrorInfo::scheduler(text));
                } else {
                    self.set_state(id, TaskState::Released);
                    self.transition_to_waiting(id);
                }
            }
        }
        self.fill_all_workers();
    }

    /// `id` was in memory but no replica is left.
    pub(super) fn lose_data(&mut self, id: TaskId) {
        let nbytes = self.t(id).nbytes;
        let g = self.t(id).group as usize;
        self.groups[g].nbytes = self.groups[g].nbytes.saturating_sub(nbytes);
        self.set_state(id, TaskState::Released);
        // Dependents that were counting on this result wait again.
        let dependents = self.t(id).dependents.to_vec();
        for d in &dependents {
            // Rescheduling one dependent can forget another.
            let Some(st) = self.live(*d).map(|t| t.state) else { continue };
            if st == TaskState::Waiting {
                self.tm(*d).waiting_on += 1;
            } else if matches!(st, TaskState::Queued | TaskState::NoWorker | TaskState::Processing) {
                self.unassign(*d);
                self.set_state(*d, TaskState::Released);
                self.transition_to_waiting(*d);
            }
        }
        // Rescheduling a dependent may have brought it back, or forgotten it.
        let Some(t) = self.live(id).filter(|t| t.state == TaskState::Released) else { return };
        let wanted = !t.who_wants.is_empty() || t.waiters > 0;
        if wanted {
            if self.t(id).run_spec.is_some() {
                // Clients waiting on the result learn it is being computed again.
                let key = self.t(id).key.to_string();
                for c in self.clients_of(id) {
                    self.send_client(c, ToClient::KeyLost { key: key.clone() });
                }
                self.transition_to_waiting(id);
            } else {
                let text = format!("data for scattered key {} was lost with its worker", self.t(id).key);
                self.set_erred(id, ErrorInfo::scheduler(text));
            }
        } else {
            self.check_release(id);
        }
    }

    pub(super) fn unassign(&mut self, id: TaskId) {
        let prio = self.t(id).priority;
        match self.t(id).state {
            TaskState::Processing => {
                if let Some(w) = self.tm(id).processing_on.take() {
                    if let Some(worker) = self.workers.get_mut(&w) {
                        worker.unprocess(id);
                    }
                    let key = self.t(id).key.to_string();
                    self.send_worker(w, ToWorker::FreeKeys { keys: vec![key] });
                }
            }
            TaskState::Queued => {
                self.queue.remove(&(prio, id));
            }
            TaskState::NoWorker => {
                self.no_worker.remove(&(prio, id));
            }
            _ => {}
        }
    }

    /// Heartbeat metrics from a worker.
    pub fn worker_metrics(&mut self, peer: PeerId, beat: &Heartbeat) {
        let Heartbeat { rss, cpu, spilled, executing, ready, bytes_in, bytes_out } = *beat;
        if let Some(w) = self.workers.get_mut(&peer) {
            w.rss = rss;
            w.cpu = cpu;
            w.spilled = spilled;
            w.executing = executing;
            w.ready = ready;
            w.bytes_in = bytes_in;
            w.bytes_out = bytes_out;
        }
    }
}
