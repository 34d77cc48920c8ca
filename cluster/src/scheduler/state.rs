//! The scheduler's state: tasks, workers, clients and the transitions
//! between task states.
//!
//! This is a pure state machine. Every public method takes an event (a
//! message from a peer, a peer joining or leaving) and pushes the messages
//! it wants sent into [`SchedulerState::take_outgoing`]. No sockets, no
//! clocks: time comes in with the events. The IO shell in `server.rs` and
//! the in-process simulator in `crate::sim` drive the same code.

use std::collections::{BTreeSet, VecDeque};
use std::sync::Arc;

use bytes::Bytes;
use rustc_hash::{FxHashMap, FxHashSet};

use super::coord::{CoordOutput, Coordination};
use super::rebalance::{self, Candidate};
use crate::protocol::{
    key_split, Blob, CoordOp, DepInfo, Envelope, EventsUpdate, GroupCounts, Key, LoadSummary, Msg, Priority,
    Registration, Resources, TaskSpec, TaskStreamRecord, WorkerInfo,
};

/// Identifies a connected peer (worker or client) for the lifetime of its connection.
pub type PeerId = u64;

/// Pseudo-client that holds fire-and-forget keys until they finish.
const FIRE_AND_FORGET: PeerId = u64::MAX;
/// Pseudo-client that holds the keys of published datasets.
const DATASETS: PeerId = u64::MAX - 1;
/// Pseudo-client that holds the keys of values in variables and queues.
const COORDINATION: PeerId = u64::MAX - 2;

type TaskId = u32;

/// Expected duration of a task whose group has not finished one yet
/// (Dask's `unknown-task-duration`).
const UNKNOWN_TASK_DURATION: f64 = 0.5;

/// Dask's scheduler task states.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum TaskState {
    Released,
    Waiting,
    Queued,
    NoWorker,
    Processing,
    Memory,
    Erred,
    Forgotten,
}

impl TaskState {
    fn index(self) -> usize {
        self as usize
    }

    /// States in which a task still needs its dependencies.
    fn is_active(self) -> bool {
        matches!(self, TaskState::Waiting | TaskState::Queued | TaskState::NoWorker | TaskState::Processing)
    }

    /// Lower-case name as Dask prints it.
    pub fn name(self) -> &'static str {
        match self {
            TaskState::Released => "released",
            TaskState::Waiting => "waiting",
            TaskState::Queued => "queued",
            TaskState::NoWorker => "no-worker",
            TaskState::Processing => "processing",
            TaskState::Memory => "memory",
            TaskState::Erred => "erred",
            TaskState::Forgotten => "forgotten",
        }
    }
}

/// Tuning knobs of the scheduler.
#[derive(Debug, Clone)]
pub struct SchedulerConfig {
    /// Root tasks in flight per worker thread (Dask's `worker-saturation`);
    /// `f64::INFINITY` disables queuing.
    pub worker_saturation: f64,
    /// Capacity of the task-stream ring.
    pub stream_capacity: usize,
    /// A task whose workers die this many times while running it errs with
    /// `KilledWorker` on the next death (Dask's `allowed-failures`).
    pub allowed_failures: u32,
    /// A worker silent for this long is removed (checked by the IO shell).
    pub worker_ttl: std::time::Duration,
    /// Once the queued root tasks' group is known to be short, a worker may
    /// hold up to this many seconds of their expected run time per thread
    /// (beyond `worker_saturation`), so the round trip to the scheduler does
    /// not leave its threads idle between tiny tasks. 0 turns it off.
    pub pipeline_window: f64,
    /// Move waiting tasks from saturated workers to idle ones when their
    /// expected run time outweighs the cost of moving their inputs
    /// (Dask's `work-stealing`).
    pub work_stealing: bool,
    /// Bytes per second assumed for moving a task's inputs to another worker
    /// when deciding whether to steal it (Dask's `bandwidth`, 100 MB/s).
    pub bandwidth: f64,
}

/// Seconds a steal costs before any data moves (the request's round trip).
const STEAL_LATENCY: f64 = 0.005;

/// Cap on root tasks in flight per worker thread from `pipeline_window`.
const MAX_PIPELINE_PER_THREAD: usize = 64;

impl Default for SchedulerConfig {
    fn default() -> Self {
        SchedulerConfig {
            worker_saturation: 1.1,
            stream_capacity: 100_000,
            allowed_failures: 3,
            worker_ttl: std::time::Duration::from_secs(60),
            pipeline_window: 0.002,
            work_stealing: true,
            bandwidth: 100e6,
        }
    }
}

/// Why a task erred, shared by the task and every dependent it took down.
#[derive(Debug)]
struct ErrorInfo {
    exception: Bytes,
    traceback: Bytes,
    text: String,
}

/// Where a task may run.
#[derive(Debug)]
struct Restriction {
    /// Worker names or addresses; empty: any worker.
    workers: Vec<String>,
    /// With `workers`: others may run it when none of those can.
    loose: bool,
    /// Amounts the worker must declare (always strict, as in Dask).
    resources: Resources,
}

impl Restriction {
    fn from_spec(workers: Option<Vec<String>>, loose: bool, resources: Resources) -> Option<Box<Self>> {
        let workers = workers.unwrap_or_default();
        if workers.is_empty() && resources.is_empty() {
            return None;
        }
        Some(Box::new(Restriction { workers, loose, resources }))
    }

    fn names(&self, w: &Worker) -> bool {
        self.workers
            .iter()
            .any(|n| *n == w.name || *n == w.address || n.strip_prefix("tcp://") == w.address.strip_prefix("tcp://"))
    }

    fn has_resources(&self, w: &Worker) -> bool {
        self.resources.iter().all(|(name, need)| w.resources.iter().any(|(n, have)| n == name && have >= need))
    }

    /// Why no current worker qualifies.
    fn reason(&self) -> String {
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
enum Dependents {
    Small(Vec<TaskId>),
    Large(FxHashSet<TaskId>),
}

impl Dependents {
    const SMALL_MAX: usize = 32;

    fn new() -> Self {
        Dependents::Small(Vec::new())
    }

    fn push(&mut self, id: TaskId) {
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

    fn remove(&mut self, id: TaskId) {
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

    fn is_empty(&self) -> bool {
        match self {
            Dependents::Small(v) => v.is_empty(),
            Dependents::Large(s) => s.is_empty(),
        }
    }

    fn iter(&self) -> impl Iterator<Item = TaskId> + '_ {
        let (small, large) = match self {
            Dependents::Small(v) => (Some(v.iter().copied()), None),
            Dependents::Large(s) => (None, Some(s.iter().copied())),
        };
        small.into_iter().flatten().chain(large.into_iter().flatten())
    }

    fn to_vec(&self) -> Vec<TaskId> {
        self.iter().collect()
    }
}

#[derive(Debug)]
struct Task {
    key: Box<str>,
    state: TaskState,
    run_spec: Option<Bytes>,
    deps: Vec<TaskId>,
    dependents: Dependents,
    /// Dependencies not yet in memory (meaningful while waiting).
    waiting_on: u32,
    /// Dependents in an active state: while non-zero the result must stay.
    waiters: u32,
    who_wants: Vec<PeerId>,
    who_has: Vec<PeerId>,
    processing_on: Option<PeerId>,
    nbytes: u64,
    priority: Priority,
    group: u32,
    restriction: Option<Box<Restriction>>,
    error: Option<Arc<ErrorInfo>>,
    /// Re-runs left if the task raises.
    retries: u32,
    /// Workers that died while running this task.
    suspicious: u32,
}

#[derive(Debug)]
struct Worker {
    address: String,
    name: String,
    nthreads: u32,
    memory_limit: u64,
    pid: u32,
    processing: FxHashSet<TaskId>,
    /// Tasks in `processing` that seceded from their thread (they launch and
    /// wait for other tasks): they take no thread and count toward no limit.
    long_running: FxHashSet<TaskId>,
    has_what: FxHashSet<TaskId>,
    nbytes: u64,
    rss: u64,
    spilled: u64,
    executing: u32,
    ready: u32,
    bytes_in: u64,
    bytes_out: u64,
    /// Being retired: no new tasks; closed once its unique data has a copy elsewhere.
    retiring: bool,
    resources: Resources,
}

impl Worker {
    fn slots(&self, saturation: f64) -> usize {
        if saturation.is_infinite() {
            return usize::MAX;
        }
        ((self.nthreads as f64 * saturation).ceil() as usize).max(1)
    }

    /// Tasks assigned here that occupy (or wait for) a thread.
    fn busy(&self) -> usize {
        self.processing.len() - self.long_running.len()
    }

    fn load(&self) -> f64 {
        self.busy() as f64 / self.nthreads.max(1) as f64
    }

    /// Forget `id` as assigned here.
    fn unprocess(&mut self, id: TaskId) {
        self.processing.remove(&id);
        self.long_running.remove(&id);
    }
}

#[derive(Debug, Default)]
struct Client {
    wants: FxHashSet<TaskId>,
}

#[derive(Debug)]
struct Group {
    name: String,
    counts: [u64; 8],
    nbytes: u64,
    changed_at: u64,
    /// Sum and number of observed run times, for the mean duration.
    duration_sum: f64,
    duration_n: u64,
}

impl Group {
    fn duration(&self) -> f64 {
        if self.duration_n == 0 {
            UNKNOWN_TASK_DURATION
        } else {
            self.duration_sum / self.duration_n as f64
        }
    }
}

/// A pending `RetireWorkers` request.
#[derive(Debug)]
struct Retirement {
    requester: PeerId,
    id: u64,
    workers: Vec<(PeerId, String)>,
    failed: Vec<(String, String)>,
}

/// A pending `Rebalance` request: moves not yet done, key -> (from, to).
#[derive(Debug)]
struct Rebalancing {
    requester: PeerId,
    id: u64,
    pending: FxHashMap<Key, (PeerId, PeerId)>,
    moved: u64,
    bytes: u64,
    failed: u64,
}

/// Where a subscriber is in the event stream.
#[derive(Debug, Default, Clone)]
pub struct EventCursor {
    stream_seen: u64,
    version_seen: u64,
    started: bool,
}

/// The scheduler's whole state.
pub struct SchedulerState {
    config: SchedulerConfig,
    tasks: Vec<Option<Task>>,
    free_ids: Vec<TaskId>,
    keys: FxHashMap<Box<str>, TaskId>,
    workers: FxHashMap<PeerId, Worker>,
    worker_order: Vec<PeerId>,
    clients: FxHashMap<PeerId, Client>,
    queue: BTreeSet<(Priority, TaskId)>,
    no_worker: BTreeSet<(Priority, TaskId)>,
    generation: u64,
    groups: Vec<Group>,
    group_ids: FxHashMap<String, u32>,
    stream: VecDeque<TaskStreamRecord>,
    stream_total: u64,
    version: u64,
    out: Vec<(PeerId, Envelope)>,
    /// Published datasets: name -> (keys held, pickled object).
    datasets: FxHashMap<String, (Vec<Key>, Bytes)>,
    retirements: Vec<Retirement>,
    /// Keys being copied off retiring workers, and where to.
    replicating: FxHashMap<TaskId, PeerId>,
    /// Variables, queues, semaphores and events.
    coord: Coordination,
    /// Steals asked of a victim and not yet answered: task -> (victim, thief).
    steals: FxHashMap<TaskId, (PeerId, PeerId)>,
    /// Tasks moved by stealing, since start.
    stolen_total: u64,
    rebalances: Vec<Rebalancing>,
}

impl SchedulerState {
    pub fn new(config: SchedulerConfig) -> Self {
        SchedulerState {
            config,
            tasks: Vec::new(),
            free_ids: Vec::new(),
            keys: FxHashMap::default(),
            workers: FxHashMap::default(),
            worker_order: Vec::new(),
            clients: FxHashMap::default(),
            queue: BTreeSet::new(),
            no_worker: BTreeSet::new(),
            generation: 0,
            groups: Vec::new(),
            group_ids: FxHashMap::default(),
            stream: VecDeque::new(),
            stream_total: 0,
            version: 0,
            out: Vec::new(),
            datasets: FxHashMap::default(),
            retirements: Vec::new(),
            replicating: FxHashMap::default(),
            coord: Coordination::default(),
            steals: FxHashMap::default(),
            stolen_total: 0,
            rebalances: Vec::new(),
        }
    }

    /// Messages produced since the last call, with their destinations.
    pub fn take_outgoing(&mut self) -> Vec<(PeerId, Envelope)> {
        std::mem::take(&mut self.out)
    }

    /// Messages produced since the last call, appended to `buf`.
    pub fn drain_outgoing_into(&mut self, buf: &mut Vec<(PeerId, Envelope)>) {
        buf.append(&mut self.out);
    }

    fn send(&mut self, peer: PeerId, msg: Msg) {
        self.out.push((peer, Envelope::new(msg)));
    }

    // ---- lookups --------------------------------------------------------

    fn t(&self, id: TaskId) -> &Task {
        self.tasks[id as usize].as_ref().expect("live task")
    }

    fn tm(&mut self, id: TaskId) -> &mut Task {
        self.tasks[id as usize].as_mut().expect("live task")
    }

    /// The state of `key`, if the scheduler knows it.
    pub fn task_state(&self, key: &str) -> Option<TaskState> {
        self.keys.get(key).map(|&id| self.t(id).state)
    }

    /// Addresses of workers holding `key`.
    pub fn who_has(&self, key: &str) -> Vec<String> {
        match self.keys.get(key) {
            Some(&id) => {
                self.t(id).who_has.iter().filter_map(|w| self.workers.get(w)).map(|w| w.address.clone()).collect()
            }
            None => Vec::new(),
        }
    }

    /// Number of tasks the scheduler holds (not forgotten).
    pub fn ntasks(&self) -> usize {
        self.keys.len()
    }

    /// Number of connected workers.
    pub fn nworkers(&self) -> usize {
        self.workers.len()
    }

    /// Number of connected clients.
    pub fn nclients(&self) -> usize {
        self.clients.len()
    }

    /// Counts of tasks per state, over all groups.
    pub fn state_counts(&self) -> FxHashMap<&'static str, u64> {
        let all = [
            TaskState::Released,
            TaskState::Waiting,
            TaskState::Queued,
            TaskState::NoWorker,
            TaskState::Processing,
            TaskState::Memory,
            TaskState::Erred,
        ];
        let mut m = FxHashMap::default();
        for s in all {
            m.insert(s.name(), self.groups.iter().map(|g| g.counts[s.index()]).sum());
        }
        m
    }

    // ---- state bookkeeping ----------------------------------------------

    fn group_id(&mut self, key: &str) -> u32 {
        let name = key_split(key);
        if let Some(&g) = self.group_ids.get(&name) {
            return g;
        }
        let g = self.groups.len() as u32;
        self.groups.push(Group {
            name: name.clone(),
            counts: [0; 8],
            nbytes: 0,
            changed_at: 0,
            duration_sum: 0.0,
            duration_n: 0,
        });
        self.group_ids.insert(name, g);
        g
    }

    /// Move `id` to `new`, keeping group counts and dependencies' waiter
    /// counts consistent.
    fn set_state(&mut self, id: TaskId, new: TaskState) {
        let (old, group) = {
            let t = self.t(id);
            (t.state, t.group)
        };
        if old == new {
            return;
        }
        self.version += 1;
        let version = self.version;
        let g = &mut self.groups[group as usize];
        g.counts[old.index()] = g.counts[old.index()].saturating_sub(1);
        g.counts[new.index()] += 1;
        g.changed_at = version;
        self.tm(id).state = new;
        match (old.is_active(), new.is_active()) {
            (false, true) => {
                for i in 0..self.t(id).deps.len() {
                    let d = self.t(id).deps[i];
                    self.tm(d).waiters += 1;
                }
            }
            (true, false) => {
                for i in 0..self.t(id).deps.len() {
                    let d = self.t(id).deps[i];
                    let t = self.tm(d);
                    t.waiters = t.waiters.saturating_sub(1);
                }
            }
            _ => {}
        }
    }

    // ---- peers ------------------------------------------------------------

    /// A client connected.
    pub fn add_client(&mut self, peer: PeerId) {
        self.clients.entry(peer).or_default();
    }

    /// A client disconnected: everything it wanted is released.
    pub fn remove_client(&mut self, peer: PeerId) {
        if let Some(c) = self.clients.remove(&peer) {
            let ids: Vec<TaskId> = c.wants.into_iter().collect();
            for id in ids {
                self.tm(id).who_wants.retain(|&p| p != peer);
                self.check_release(id);
            }
        }
        self.coord.peer_gone(peer);
        self.apply_coordination();
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
        let stuck: Vec<TaskId> = std::mem::take(&mut self.no_worker).into_iter().map(|(_, id)| id).collect();
        for id in stuck {
            if self.t(id).state == TaskState::NoWorker {
                self.make_ready(id);
                if self.t(id).state != TaskState::NoWorker {
                    self.tell_wanters(id, String::new());
                }
            }
        }
        self.fill_all_workers();
        Ok(())
    }

    /// A worker left (closed or died): its running tasks are rescheduled
    /// and results held only by it are recomputed when still needed.
    pub fn remove_worker(&mut self, peer: PeerId) {
        self.drop_worker(peer);
        self.check_retirements();
        self.check_rebalances();
    }

    fn drop_worker(&mut self, peer: PeerId) {
        let Some(w) = self.workers.remove(&peer) else {
            return;
        };
        self.worker_order.retain(|&p| p != peer);
        self.version += 1;
        let mut lost = Vec::new();
        for id in w.has_what {
            let t = self.tm(id);
            t.who_has.retain(|&p| p != peer);
            if t.who_has.is_empty() && t.state == TaskState::Memory {
                lost.push(id);
            }
        }
        for id in lost {
            self.lose_data(id);
        }
        let mut processing: Vec<TaskId> = w.processing.into_iter().collect();
        processing.sort_by_key(|&id| self.t(id).priority);
        for id in processing {
            let t = self.t(id);
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
                    let err = Arc::new(ErrorInfo { exception: Bytes::new(), traceback: Bytes::new(), text });
                    self.set_erred(id, err);
                } else {
                    self.set_state(id, TaskState::Released);
                    self.transition_to_waiting(id);
                }
            }
        }
        self.fill_all_workers();
    }

    /// `id` was in memory but no replica is left.
    fn lose_data(&mut self, id: TaskId) {
        let nbytes = self.t(id).nbytes;
        let g = self.t(id).group as usize;
        self.groups[g].nbytes = self.groups[g].nbytes.saturating_sub(nbytes);
        self.set_state(id, TaskState::Released);
        // Dependents that were counting on this result wait again.
        let dependents = self.t(id).dependents.to_vec();
        for d in &dependents {
            let st = self.t(*d).state;
            if st == TaskState::Waiting {
                self.tm(*d).waiting_on += 1;
            } else if matches!(st, TaskState::Queued | TaskState::NoWorker | TaskState::Processing) {
                self.unassign(*d);
                self.set_state(*d, TaskState::Released);
                self.transition_to_waiting(*d);
            }
        }
        let wanted = !self.t(id).who_wants.is_empty() || self.t(id).waiters > 0;
        if wanted {
            if self.t(id).run_spec.is_some() {
                self.transition_to_waiting(id);
            } else {
                let err = Arc::new(ErrorInfo {
                    exception: Bytes::new(),
                    traceback: Bytes::new(),
                    text: format!("data for scattered key {} was lost with its worker", self.t(id).key),
                });
                self.set_erred(id, err);
            }
        } else {
            self.check_release(id);
        }
    }

    fn unassign(&mut self, id: TaskId) {
        let prio = self.t(id).priority;
        match self.t(id).state {
            TaskState::Processing => {
                if let Some(w) = self.tm(id).processing_on.take() {
                    if let Some(worker) = self.workers.get_mut(&w) {
                        worker.unprocess(id);
                    }
                    let key = self.t(id).key.to_string();
                    self.send(w, Msg::FreeKeys { keys: vec![key] });
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
    #[allow(clippy::too_many_arguments)]
    pub fn worker_metrics(
        &mut self,
        peer: PeerId,
        rss: u64,
        spilled: u64,
        executing: u32,
        ready: u32,
        bytes_in: u64,
        bytes_out: u64,
    ) {
        if let Some(w) = self.workers.get_mut(&peer) {
            w.rss = rss;
            w.spilled = spilled;
            w.executing = executing;
            w.ready = ready;
            w.bytes_in = bytes_in;
            w.bytes_out = bytes_out;
        }
    }

    // ---- graph submission -------------------------------------------------

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

    fn insert_task(&mut self, task: Task) -> TaskId {
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
    fn transition_to_waiting(&mut self, root: TaskId) {
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
    fn make_ready(&mut self, id: TaskId) {
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
    fn tell_wanters(&mut self, id: TaskId, reason: String) {
        let key = self.t(id).key.to_string();
        let clients: Vec<PeerId> =
            self.t(id).who_wants.iter().copied().filter(|c| self.clients.contains_key(c)).collect();
        for c in clients {
            self.send(c, Msg::KeyNoWorker { key: key.clone(), reason: reason.clone() });
        }
    }

    fn decide_worker(&self, id: TaskId) -> Option<PeerId> {
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

    fn least_loaded(&self, it: impl Iterator<Item = PeerId>) -> Option<PeerId> {
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

    fn assign(&mut self, id: TaskId, w: PeerId) {
        self.set_state(id, TaskState::Processing);
        self.tm(id).processing_on = Some(w);
        self.workers.get_mut(&w).expect("worker").processing.insert(id);
        let t = self.t(id);
        let deps: Vec<DepInfo> = t
            .deps
            .iter()
            .map(|&d| {
                let dt = self.t(d);
                DepInfo {
                    key: dt.key.to_string(),
                    nbytes: dt.nbytes,
                    who_has: dt.who_has.iter().filter_map(|p| self.workers.get(p)).map(|w| w.address.clone()).collect(),
                }
            })
            .collect();
        let mut frames = Vec::new();
        let run_spec = Blob::new(t.run_spec.clone().unwrap_or_default(), &mut frames);
        let resources = t.restriction.as_ref().map(|r| r.resources.clone()).unwrap_or_default();
        let msg = Msg::ComputeTask { key: t.key.to_string(), run_spec, deps, priority: t.priority, resources };
        self.out.push((w, Envelope { msg, frames }));
    }

    /// Queued root tasks worker `w` may hold: `worker_saturation` per thread,
    /// or more when the next queued task's group is known to be short (see
    /// [`SchedulerConfig::pipeline_window`]). Memory stays bounded: at most
    /// a few milliseconds of work per thread is committed ahead.
    fn root_slots(&self, w: &Worker) -> usize {
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
    /// loaded worker that has one.
    fn fill_all_workers(&mut self) {
        while !self.queue.is_empty() {
            let mut best: Option<(f64, PeerId)> = None;
            for &w in &self.worker_order {
                let worker = &self.workers[&w];
                if !worker.retiring && worker.busy() < self.root_slots(worker) {
                    let load = worker.load();
                    if best.is_none_or(|(l, _)| load < l) {
                        best = Some((load, w));
                    }
                }
            }
            let Some((_, w)) = best else { return };
            let (_, id) = self.queue.pop_first().expect("non-empty");
            self.assign(id, w);
        }
    }

    fn fill_worker(&mut self, w: PeerId) {
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

    // ---- worker reports ---------------------------------------------------

    /// A worker finished a task.
    #[allow(clippy::too_many_arguments)]
    pub fn task_finished(
        &mut self,
        worker: PeerId,
        key: &str,
        nbytes: u64,
        start: f64,
        stop: f64,
        thread: u32,
        transfer: f64,
    ) {
        let Some(&id) = self.keys.get(key) else {
            self.send(worker, Msg::FreeKeys { keys: vec![key.to_string()] });
            return;
        };
        let (state, on) = (self.t(id).state, self.t(id).processing_on);
        if state != TaskState::Processing || on != Some(worker) {
            let t = self.t(id);
            if t.state == TaskState::Memory && !t.who_has.contains(&worker) {
                self.add_replica(id, worker);
            } else if !t.who_has.contains(&worker) {
                self.send(worker, Msg::FreeKeys { keys: vec![key.to_string()] });
            }
            return;
        }
        let group = self.t(id).group;
        if let Some(w) = self.workers.get_mut(&worker) {
            w.unprocess(id);
            let rec = TaskStreamRecord {
                key: key.to_string(),
                group: self.groups[group as usize].name.clone(),
                worker: w.address.clone(),
                thread,
                start,
                stop,
                transfer,
                erred: false,
            };
            self.push_stream(rec);
        }
        {
            let t = self.tm(id);
            t.processing_on = None;
            t.nbytes = nbytes;
        }
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

    fn add_replica(&mut self, id: TaskId, worker: PeerId) {
        let nbytes = self.t(id).nbytes;
        if let Some(w) = self.workers.get_mut(&worker) {
            if w.has_what.insert(id) {
                w.nbytes += nbytes;
                self.tm(id).who_has.push(worker);
            }
        }
    }

    fn on_memory(&mut self, id: TaskId) {
        self.tm(id).who_wants.retain(|&c| c != FIRE_AND_FORGET);
        let wants = self.t(id).who_wants.clone();
        for c in wants {
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

    fn report_to(&mut self, client: PeerId, id: TaskId) {
        if client == FIRE_AND_FORGET || client == DATASETS {
            return;
        }
        let t = self.t(id);
        let msg = match t.state {
            TaskState::Memory => Msg::KeyInMemory {
                key: t.key.to_string(),
                nbytes: t.nbytes,
                type_name: String::new(),
                workers: t.who_has.iter().filter_map(|p| self.workers.get(p)).map(|w| w.address.clone()).collect(),
            },
            TaskState::Erred => {
                let e = t.error.as_ref().expect("erred task has error");
                let mut frames = Vec::new();
                let exception = Blob::new(e.exception.clone(), &mut frames);
                let traceback = Blob::new(e.traceback.clone(), &mut frames);
                let msg = Msg::KeyErred { key: t.key.to_string(), exception, traceback, text: e.text.clone() };
                self.out.push((client, Envelope { msg, frames }));
                return;
            }
            _ => return,
        };
        self.send(client, msg);
    }

    /// A task raised on a worker.
    #[allow(clippy::too_many_arguments)]
    pub fn task_erred(
        &mut self,
        worker: PeerId,
        key: &str,
        exception: Bytes,
        traceback: Bytes,
        text: String,
        start: f64,
        stop: f64,
        thread: u32,
    ) {
        let Some(&id) = self.keys.get(key) else {
            return;
        };
        let (state, on, group) = (self.t(id).state, self.t(id).processing_on, self.t(id).group);
        if state != TaskState::Processing || on != Some(worker) {
            return;
        }
        if let Some(w) = self.workers.get_mut(&worker) {
            w.unprocess(id);
            let rec = TaskStreamRecord {
                key: key.to_string(),
                group: self.groups[group as usize].name.clone(),
                worker: w.address.clone(),
                thread,
                start,
                stop,
                transfer: 0.0,
                erred: true,
            };
            self.push_stream(rec);
        }
        self.tm(id).processing_on = None;
        if self.t(id).retries > 0 {
            self.tm(id).retries -= 1;
            self.set_state(id, TaskState::Released);
            self.transition_to_waiting(id);
        } else {
            self.set_erred(id, Arc::new(ErrorInfo { exception, traceback, text }));
        }
        self.fill_worker(worker);
        self.check_retirements();
    }

    /// Mark `root` and every dependent that waits on it as erred.
    fn set_erred(&mut self, root: TaskId, err: Arc<ErrorInfo>) {
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
            self.tm(id).who_wants.retain(|&c| c != FIRE_AND_FORGET);
            let wants = self.t(id).who_wants.clone();
            for c in wants {
                self.report_to(c, id);
            }
        }
        for id in touched {
            let deps = self.t(id).deps.clone();
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
            let peer = self.workers.iter().find(|(_, w)| &w.address == h).map(|(p, _)| *p);
            if let Some(p) = peer {
                let nbytes = self.t(id).nbytes;
                if let Some(w) = self.workers.get_mut(&p) {
                    if w.has_what.remove(&id) {
                        w.nbytes = w.nbytes.saturating_sub(nbytes);
                    }
                }
                self.tm(id).who_has.retain(|&x| x != p);
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
                _ => unknown.push(k.clone()),
            }
        }
        if !unknown.is_empty() {
            self.send(worker, Msg::FreeKeys { keys: unknown });
        }
        self.check_retirements();
        self.check_rebalances();
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

    // ---- releasing --------------------------------------------------------

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
    fn check_release(&mut self, root: TaskId) {
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
    fn forget(&mut self, id: TaskId) -> Vec<TaskId> {
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

    fn dataset_reply(&mut self, client: PeerId, id: u64, error: String, data: Option<Bytes>, names: Vec<String>) {
        let mut frames = Vec::new();
        let data = data.map(|d| Blob::new(d, &mut frames));
        self.out.push((client, Envelope { msg: Msg::DatasetReply { id, error, data, names }, frames }));
    }

    /// Publish `keys` and a pickled object under `name`.
    pub fn publish_dataset(
        &mut self,
        client: PeerId,
        id: u64,
        name: String,
        keys: Vec<Key>,
        data: Bytes,
        overwrite: bool,
    ) {
        if self.datasets.contains_key(&name) && !overwrite {
            let err = format!("Dataset {name:?} already exists");
            return self.dataset_reply(client, id, err, None, Vec::new());
        }
        if let Some(k) = keys.iter().find(|k| !self.keys.contains_key(k.as_str())) {
            let err = format!("cannot publish {name:?}: key {k:?} is not known to the scheduler");
            return self.dataset_reply(client, id, err, None, Vec::new());
        }
        if let Some((old, _)) = self.datasets.remove(&name) {
            self.unhold_keys(&old, DATASETS);
        }
        self.hold_keys(&keys, DATASETS);
        self.datasets.insert(name, (keys, data));
        self.dataset_reply(client, id, String::new(), None, Vec::new());
    }

    /// Keep `keys` alive on behalf of a pseudo-client (`DATASETS`,
    /// `COORDINATION`); each call holds once more.
    fn hold_keys(&mut self, keys: &[Key], holder: PeerId) {
        for k in keys {
            if let Some(&tid) = self.keys.get(k.as_str()) {
                self.tm(tid).who_wants.push(holder);
            }
        }
    }

    /// Undo one [`hold_keys`](Self::hold_keys) of `keys` by `holder`.
    fn unhold_keys(&mut self, keys: &[Key], holder: PeerId) {
        for k in keys {
            let Some(&tid) = self.keys.get(k.as_str()) else { continue };
            if let Some(pos) = self.t(tid).who_wants.iter().position(|&c| c == holder) {
                self.tm(tid).who_wants.swap_remove(pos);
                self.check_release(tid);
            }
        }
    }

    /// Remove a published dataset.
    pub fn unpublish_dataset(&mut self, client: PeerId, id: u64, name: &str) {
        match self.datasets.remove(name) {
            Some((keys, _)) => {
                self.unhold_keys(&keys, DATASETS);
                self.dataset_reply(client, id, String::new(), None, Vec::new());
            }
            None => self.dataset_reply(client, id, format!("Dataset {name:?} not found"), None, Vec::new()),
        }
    }

    /// Send a published dataset's pickled object.
    pub fn get_dataset(&mut self, client: PeerId, id: u64, name: &str) {
        match self.datasets.get(name) {
            Some((_, data)) => {
                let data = data.clone();
                self.dataset_reply(client, id, String::new(), Some(data), Vec::new());
            }
            None => self.dataset_reply(client, id, format!("Dataset {name:?} not found"), None, Vec::new()),
        }
    }

    /// Names of the published datasets.
    pub fn list_datasets(&mut self, client: PeerId, id: u64) {
        let mut names: Vec<String> = self.datasets.keys().cloned().collect();
        names.sort();
        self.dataset_reply(client, id, String::new(), None, names);
    }

    /// Copy each of `keys` that is in memory to more workers until `n` (at
    /// most every non-retiring worker) hold it; the workers holding the
    /// fewest bytes receive the copies. Copies are reported by `AddKeys`.
    pub fn replicate(&mut self, keys: &[Key], n: usize) {
        let mut by_dest: FxHashMap<PeerId, Vec<DepInfo>> = FxHashMap::default();
        for k in keys {
            let Some(&id) = self.keys.get(k.as_str()) else { continue };
            let t = self.t(id);
            if t.state != TaskState::Memory || t.who_has.len() >= n {
                continue;
            }
            let mut cands: Vec<(u64, PeerId)> = self
                .worker_order
                .iter()
                .copied()
                .filter(|p| !t.who_has.contains(p))
                .filter_map(|p| self.workers.get(&p).filter(|w| !w.retiring).map(|w| (w.nbytes, p)))
                .collect();
            cands.sort_unstable();
            let holders: Vec<String> =
                t.who_has.iter().filter_map(|p| self.workers.get(p)).map(|w| w.address.clone()).collect();
            for (_, dest) in cands.into_iter().take(n - t.who_has.len()) {
                by_dest.entry(dest).or_default().push(DepInfo {
                    key: k.clone(),
                    nbytes: t.nbytes,
                    who_has: holders.clone(),
                });
            }
        }
        let mut dests: Vec<_> = by_dest.into_iter().collect();
        dests.sort_by_key(|(p, _)| *p);
        for (dest, keys) in dests {
            self.send(dest, Msg::AcquireReplicas { keys });
        }
    }

    /// `Client.rebalance`: move results (`keys`, or all) among `workers` (or
    /// all non-retiring ones) from those holding more managed memory than
    /// the mean to those holding less (plan in [`rebalance::plan`]). Each
    /// move copies the key to its recipient; when the copy arrives the
    /// sender's is freed, unless a task running there needs it. Keys that a
    /// running task needs are not moved. `requester` gets `Rebalanced` once
    /// every move is done or abandoned.
    pub fn rebalance(&mut self, requester: PeerId, id: u64, keys: Vec<Key>, workers: Vec<String>) {
        let mut participants: Vec<PeerId> = Vec::new();
        let mut unknown: Vec<String> = Vec::new();
        if workers.is_empty() {
            participants.extend(self.worker_order.iter().copied().filter(|p| !self.workers[p].retiring));
        }
        for n in &workers {
            let found = self.worker_order.iter().copied().find(|p| {
                let w = &self.workers[p];
                w.name == *n || w.address == *n || n.strip_prefix("tcp://") == w.address.strip_prefix("tcp://")
            });
            match found {
                Some(p) if !participants.contains(&p) => participants.push(p),
                Some(_) => {}
                None => unknown.push(n.clone()),
            }
        }
        if !unknown.is_empty() {
            let error = format!("rebalance: no such worker: {}", unknown.join(", "));
            self.send(requester, Msg::Rebalanced { id, moved: 0, bytes: 0, failed: 0, error });
            return;
        }
        let loads: Vec<(PeerId, u64)> = participants
            .iter()
            .map(|p| {
                let w = &self.workers[p];
                (*p, w.nbytes.saturating_sub(w.spilled))
            })
            .collect();
        let mut ids: Vec<TaskId> = if keys.is_empty() {
            participants.iter().flat_map(|p| self.workers[p].has_what.iter().copied()).collect()
        } else {
            keys.iter().filter_map(|k| self.keys.get(k.as_str()).copied()).collect()
        };
        ids.sort_unstable();
        ids.dedup();
        let candidates: Vec<Candidate<TaskId>> = ids
            .into_iter()
            .filter(|&t| self.t(t).state == TaskState::Memory && !self.needed_by_running(t, None))
            .map(|t| Candidate { id: t, nbytes: self.t(t).nbytes, holders: self.t(t).who_has.clone() })
            .collect();
        let moves = rebalance::plan(&loads, &candidates);
        let mut by_dest: FxHashMap<PeerId, Vec<DepInfo>> = FxHashMap::default();
        let mut pending = FxHashMap::default();
        for (t, from, to) in moves {
            let task = self.t(t);
            let key = task.key.to_string();
            by_dest.entry(to).or_default().push(DepInfo {
                key: key.clone(),
                nbytes: task.nbytes,
                who_has: vec![self.workers[&from].address.clone()],
            });
            pending.insert(key, (from, to));
        }
        let mut dests: Vec<(PeerId, Vec<DepInfo>)> = by_dest.into_iter().collect();
        dests.sort_by_key(|d| d.0);
        for (dest, keys) in dests {
            self.send(dest, Msg::AcquireReplicas { keys });
        }
        self.rebalances.push(Rebalancing { requester, id, pending, moved: 0, bytes: 0, failed: 0 });
        self.check_rebalances();
    }

    /// Whether a task processing (on `on`, or anywhere) needs `id` as input.
    fn needed_by_running(&self, id: TaskId, on: Option<PeerId>) -> bool {
        self.t(id).dependents.iter().any(|d| {
            let dt = self.t(d);
            dt.state == TaskState::Processing && on.is_none_or(|w| dt.processing_on == Some(w))
        })
    }

    /// A copy of `id` reached `worker`: finish a rebalancing move to it by
    /// freeing the sender's copy (kept if a task running there needs it).
    fn rebalance_arrived(&mut self, id: TaskId, worker: PeerId) {
        let key = self.t(id).key.to_string();
        let mut senders = Vec::new();
        for r in &mut self.rebalances {
            if let Some(&(from, to)) = r.pending.get(&key) {
                if to == worker {
                    r.pending.remove(&key);
                    r.moved += 1;
                    r.bytes += self.tasks[id as usize].as_ref().map_or(0, |t| t.nbytes);
                    senders.push(from);
                }
            }
        }
        for from in senders {
            if from == worker || !self.t(id).who_has.contains(&from) || self.needed_by_running(id, Some(from)) {
                continue;
            }
            let nbytes = self.t(id).nbytes;
            if let Some(w) = self.workers.get_mut(&from) {
                if w.has_what.remove(&id) {
                    w.nbytes = w.nbytes.saturating_sub(nbytes);
                }
            }
            self.tm(id).who_has.retain(|&p| p != from);
            self.send(from, Msg::FreeKeys { keys: vec![key.clone()] });
        }
    }

    /// Abandon moves whose key or workers are gone; answer finished requests.
    fn check_rebalances(&mut self) {
        if self.rebalances.is_empty() {
            return;
        }
        let mut answers = Vec::new();
        let (keys, tasks, workers) = (&self.keys, &self.tasks, &self.workers);
        self.rebalances.retain_mut(|r| {
            r.pending.retain(|key, (from, to)| {
                let alive = workers.contains_key(from) && workers.contains_key(to);
                let in_memory = keys
                    .get(key.as_str())
                    .and_then(|&id| tasks[id as usize].as_ref())
                    .is_some_and(|t| t.state == TaskState::Memory);
                if !(alive && in_memory) {
                    r.failed += 1;
                }
                alive && in_memory
            });
            if !r.pending.is_empty() {
                return true;
            }
            let msg =
                Msg::Rebalanced { id: r.id, moved: r.moved, bytes: r.bytes, failed: r.failed, error: String::new() };
            answers.push((r.requester, msg));
            false
        });
        for (peer, msg) in answers {
            self.send(peer, msg);
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

    // ---- work stealing -------------------------------------------------------

    /// Tasks moved from one worker to another by stealing, since start.
    pub fn stolen_total(&self) -> u64 {
        self.stolen_total
    }

    /// Expected seconds to move `id`'s inputs that `thief` lacks, plus a
    /// fixed latency for the round trip.
    fn transfer_cost(&self, id: TaskId, thief: PeerId) -> f64 {
        let bytes: u64 = self
            .t(id)
            .deps
            .iter()
            .map(|&d| self.t(d))
            .filter(|dt| !dt.who_has.contains(&thief))
            .map(|dt| dt.nbytes)
            .sum();
        STEAL_LATENCY + bytes as f64 / self.config.bandwidth.max(1.0)
    }

    /// Work stealing: for every worker with idle threads, ask saturated
    /// workers (more tasks assigned than threads) to give up tasks they have
    /// not started, when a task's expected run time is more than twice the
    /// time to move its inputs. The victim answers before anything moves
    /// (`StealResponse`), so a task never runs twice because of a steal.
    pub fn balance(&mut self) {
        if !self.config.work_stealing || self.workers.len() < 2 {
            return;
        }
        let mut thieves: Vec<(PeerId, usize)> = Vec::new();
        let mut victims: Vec<(PeerId, usize)> = Vec::new();
        for &p in &self.worker_order {
            let w = &self.workers[&p];
            if w.retiring {
                continue;
            }
            let incoming = self.steals.values().filter(|(_, t)| *t == p).count();
            let busy = w.busy() + incoming;
            let threads = w.nthreads as usize;
            if busy < threads {
                // Room for one running and one queued task per thread, so a
                // thief does not wait a balancing round between stolen tasks.
                thieves.push((p, 2 * threads - busy));
            } else if busy > threads {
                victims.push((p, busy - threads));
            }
        }
        if thieves.is_empty() || victims.is_empty() {
            return;
        }
        // Most over-committed victims first.
        victims.sort_by_key(|&(p, extra)| (std::cmp::Reverse(extra), p));
        for (thief, mut room) in thieves {
            for (victim, extra) in victims.iter_mut() {
                if room == 0 {
                    break;
                }
                if *extra == 0 {
                    continue;
                }
                // Candidates: the victim's tasks that will run last.
                let w = &self.workers[victim];
                let mut cands: Vec<(Priority, TaskId)> = w
                    .processing
                    .iter()
                    .filter(|id| !w.long_running.contains(id) && !self.steals.contains_key(id))
                    // Never worth moving: restricted, or shorter than any move.
                    .filter(|&&id| {
                        let t = self.t(id);
                        t.restriction.is_none() && self.groups[t.group as usize].duration() > 2.0 * STEAL_LATENCY
                    })
                    .map(|&id| (self.t(id).priority, id))
                    .collect();
                let want = room.min(*extra);
                if cands.len() > want {
                    let n = cands.len() - want;
                    cands.select_nth_unstable(n);
                    cands.drain(..n);
                }
                cands.sort_unstable_by(|a, b| b.cmp(a));
                for (_, id) in cands {
                    let compute = self.groups[self.t(id).group as usize].duration();
                    if compute <= 2.0 * self.transfer_cost(id, thief) {
                        continue;
                    }
                    self.steals.insert(id, (*victim, thief));
                    let key = self.t(id).key.to_string();
                    self.send(*victim, Msg::StealRequest { key });
                    room -= 1;
                    *extra -= 1;
                    if room == 0 || *extra == 0 {
                        break;
                    }
                }
            }
        }
    }

    /// A victim answered a steal request: `stolen` means it dropped the task
    /// without starting it, and the task goes to the thief.
    pub fn steal_response(&mut self, victim: PeerId, key: &str, stolen: bool) {
        let Some(&id) = self.keys.get(key) else { return };
        let Some((v, thief)) = self.steals.remove(&id) else { return };
        if v != victim || !stolen {
            return;
        }
        if self.t(id).state != TaskState::Processing || self.t(id).processing_on != Some(victim) {
            return;
        }
        if let Some(w) = self.workers.get_mut(&victim) {
            w.unprocess(id);
        }
        self.tm(id).processing_on = None;
        self.stolen_total += 1;
        match self.workers.get(&thief) {
            Some(t) if !t.retiring => self.assign(id, thief),
            _ => {
                self.set_state(id, TaskState::Released);
                self.transition_to_waiting(id);
            }
        }
        self.fill_worker(victim);
    }

    // ---- coordination primitives -------------------------------------------

    /// An operation on a variable, queue, semaphore or event.
    pub fn coordinate(&mut self, peer: PeerId, id: u64, op: CoordOp, value: Option<Bytes>, now: f64) {
        self.coord.handle(peer, id, op, value, now);
        self.apply_coordination();
    }

    /// Answer coordination waits whose timeout passed.
    pub fn coordination_tick(&mut self, now: f64) {
        if self.coord.has_waiters() {
            self.coord.tick(now);
            self.apply_coordination();
        }
    }

    fn apply_coordination(&mut self) {
        for o in self.coord.take_output() {
            match o {
                CoordOutput::Reply(peer, env) => self.out.push((peer, env)),
                CoordOutput::Hold(keys) => self.hold_keys(&keys, COORDINATION),
                CoordOutput::Unhold(keys) => self.unhold_keys(&keys, COORDINATION),
                CoordOutput::Transfer(client, keys) => {
                    self.want_keys(client, keys.clone());
                    self.unhold_keys(&keys, COORDINATION);
                }
            }
        }
    }

    // ---- queries ----------------------------------------------------------

    /// Answer a client's `WhoHas`.
    pub fn who_has_reply(&mut self, client: PeerId, id: u64, keys: Vec<Key>) {
        let who_has = keys.into_iter().map(|k| {
            let holders = self.who_has(&k);
            (k, holders)
        });
        let who_has = who_has.collect();
        self.send(client, Msg::WhoHasReply { id, who_has });
    }

    /// Every worker, as clients and monitors see it.
    pub fn worker_infos(&self) -> Vec<WorkerInfo> {
        self.worker_infos_with(&self.load())
    }

    /// Per-worker occupancy uses the cluster-wide mean of processing work
    /// (`load`), which costs O(groups) instead of O(processing tasks).
    fn worker_infos_with(&self, load: &LoadSummary) -> Vec<WorkerInfo> {
        let per_task = if load.processing > 0 { load.occupancy / load.processing as f64 } else { 0.0 };
        self.worker_order
            .iter()
            .map(|p| {
                let w = &self.workers[p];
                WorkerInfo {
                    address: w.address.clone(),
                    name: w.name.clone(),
                    nthreads: w.nthreads,
                    memory_limit: w.memory_limit,
                    pid: w.pid,
                    managed: w.nbytes.saturating_sub(w.spilled),
                    rss: w.rss,
                    spilled: w.spilled,
                    executing: w.executing,
                    ready: w.ready,
                    processing: w.processing.len() as u32,
                    nkeys: w.has_what.len() as u64,
                    bytes_in: w.bytes_in,
                    bytes_out: w.bytes_out,
                    retiring: w.retiring,
                    occupancy: w.processing.len() as f64 * per_task,
                    resources: w.resources.clone(),
                }
            })
            .collect()
    }

    /// Queued and running work, with expected durations learned per task group.
    pub fn load(&self) -> LoadSummary {
        let mut l = LoadSummary::default();
        for g in &self.groups {
            let d = g.duration();
            let processing = g.counts[TaskState::Processing.index()];
            let waiting = g.counts[TaskState::Queued.index()] + g.counts[TaskState::NoWorker.index()];
            l.queued += g.counts[TaskState::Queued.index()];
            l.no_worker += g.counts[TaskState::NoWorker.index()];
            l.processing += processing;
            l.occupancy += processing as f64 * d;
            l.queued_occupancy += waiting as f64 * d;
        }
        l
    }

    // ---- retiring workers -------------------------------------------------

    /// Retire workers by name or address: they get no new tasks, results
    /// only they hold are copied to other workers, then they are closed.
    /// `requester` gets `WorkersRetired { id, .. }` once every one is done.
    pub fn retire_workers(&mut self, requester: PeerId, id: u64, names: Vec<String>) {
        let mut r = Retirement { requester, id, workers: Vec::new(), failed: Vec::new() };
        for n in names {
            let found = self.worker_order.iter().copied().find(|p| {
                let w = &self.workers[p];
                w.name == n || w.address == n || n.strip_prefix("tcp://") == w.address.strip_prefix("tcp://")
            });
            match found {
                Some(p) => {
                    let w = self.workers.get_mut(&p).expect("listed worker");
                    w.retiring = true;
                    r.workers.push((p, w.name.clone()));
                }
                None => r.failed.push((n, "no such worker".into())),
            }
        }
        self.version += 1;
        self.retirements.push(r);
        self.check_retirements();
    }

    /// Move retirements forward: copy unique data off idle retiring workers,
    /// close those with nothing left to copy, answer finished requests.
    fn check_retirements(&mut self) {
        if self.retirements.is_empty() {
            return;
        }
        let retiring: Vec<PeerId> = self.worker_order.iter().copied().filter(|p| self.workers[p].retiring).collect();
        let mut acquire: FxHashMap<PeerId, Vec<DepInfo>> = FxHashMap::default();
        let mut stuck: Vec<(PeerId, String)> = Vec::new();
        let mut close = Vec::new();
        for p in retiring {
            let w = &self.workers[&p];
            if !w.processing.is_empty() {
                continue;
            }
            let mut unique: Vec<TaskId> =
                w.has_what.iter().copied().filter(|&id| self.t(id).who_has.len() == 1).collect();
            if unique.is_empty() {
                close.push(p);
                continue;
            }
            unique.sort_unstable();
            for id in unique {
                let target = self.replicating.get(&id).copied();
                if target.is_some_and(|t| self.workers.get(&t).is_some_and(|w| !w.retiring)) {
                    continue;
                }
                let dest = self.worker_order.iter().copied().filter(|q| !self.workers[q].retiring).min_by_key(|q| {
                    let planned: u64 = acquire.get(q).map_or(0, |v| v.iter().map(|d| d.nbytes).sum());
                    (self.workers[q].nbytes + planned, *q)
                });
                let Some(dest) = dest else {
                    stuck.push((p, "no other worker can hold its data".into()));
                    break;
                };
                self.replicating.insert(id, dest);
                let t = self.t(id);
                acquire.entry(dest).or_default().push(DepInfo {
                    key: t.key.to_string(),
                    nbytes: t.nbytes,
                    who_has: vec![self.workers[&p].address.clone()],
                });
            }
        }
        let mut dests: Vec<(PeerId, Vec<DepInfo>)> = acquire.into_iter().collect();
        dests.sort_by_key(|d| d.0);
        for (dest, keys) in dests {
            self.send(dest, Msg::AcquireReplicas { keys });
        }
        for (p, why) in stuck {
            if let Some(w) = self.workers.get_mut(&p) {
                w.retiring = false;
            }
            for r in &mut self.retirements {
                if let Some(i) = r.workers.iter().position(|(q, _)| *q == p) {
                    let (_, name) = r.workers.remove(i);
                    r.failed.push((name, why.clone()));
                }
            }
        }
        for p in close {
            self.send(p, Msg::CloseWorker { reason: "retired".into() });
            self.drop_worker(p);
        }
        let tasks = &self.tasks;
        self.replicating
            .retain(|id, _| tasks.get(*id as usize).and_then(|t| t.as_ref()).is_some_and(|t| t.who_has.len() == 1));
        let workers = &self.workers;
        let mut answered = Vec::new();
        self.retirements.retain(|r| {
            if r.workers.iter().any(|(p, _)| workers.contains_key(p)) {
                return true;
            }
            answered.push((
                r.requester,
                Msg::WorkersRetired {
                    id: r.id,
                    retired: r.workers.iter().map(|(_, n)| n.clone()).collect(),
                    failed: r.failed.clone(),
                },
            ));
            false
        });
        for (peer, msg) in answered {
            self.send(peer, msg);
        }
    }

    // ---- events -----------------------------------------------------------

    fn push_stream(&mut self, rec: TaskStreamRecord) {
        if self.stream.len() >= self.config.stream_capacity {
            self.stream.pop_front();
        }
        self.stream.push_back(rec);
        self.stream_total += 1;
    }

    /// What a subscriber at `cursor` has not seen yet: a snapshot the first
    /// time, then only new stream records and changed groups.
    pub fn events_since(&self, cursor: &mut EventCursor, now: f64) -> EventsUpdate {
        let oldest = self.stream_total - self.stream.len() as u64;
        let from = cursor.stream_seen.max(oldest);
        let dropped = from - cursor.stream_seen;
        let skip = (from - oldest) as usize;
        let stream: Vec<TaskStreamRecord> = self.stream.iter().skip(skip).cloned().collect();
        let groups = self
            .groups
            .iter()
            .filter(|g| !cursor.started || g.changed_at > cursor.version_seen)
            .map(|g| GroupCounts {
                name: g.name.clone(),
                released: g.counts[TaskState::Released.index()],
                waiting: g.counts[TaskState::Waiting.index()],
                queued: g.counts[TaskState::Queued.index()],
                no_worker: g.counts[TaskState::NoWorker.index()],
                processing: g.counts[TaskState::Processing.index()],
                memory: g.counts[TaskState::Memory.index()],
                erred: g.counts[TaskState::Erred.index()],
                forgotten: g.counts[TaskState::Forgotten.index()],
                nbytes: g.nbytes,
            })
            .collect();
        let load = self.load();
        cursor.stream_seen = self.stream_total;
        cursor.version_seen = self.version;
        cursor.started = true;
        EventsUpdate {
            time: now,
            stream,
            stream_dropped: dropped,
            groups,
            workers: self.worker_infos_with(&load),
            ntasks: self.keys.len() as u64,
            load,
        }
    }

    /// Check internal invariants (used by tests): counts, waiters and
    /// worker bookkeeping agree with the tasks.
    pub fn validate(&self) -> Result<(), String> {
        for (i, slot) in self.tasks.iter().enumerate() {
            let Some(t) = slot else { continue };
            let id = i as TaskId;
            if self.keys.get(&t.key) != Some(&id) {
                return Err(format!("{}: key map mismatch", t.key));
            }
            let active = t.dependents.iter().filter(|&d| self.t(d).state.is_active()).count() as u32;
            if active != t.waiters {
                return Err(format!("{}: waiters {} but {} active dependents", t.key, t.waiters, active));
            }
            if t.state == TaskState::Waiting {
                let missing = t.deps.iter().filter(|&&d| self.t(d).state != TaskState::Memory).count() as u32;
                if missing != t.waiting_on {
                    return Err(format!("{}: waiting_on {} but {} deps missing", t.key, t.waiting_on, missing));
                }
            }
            if t.state == TaskState::Memory && t.who_has.is_empty() {
                return Err(format!("{}: in memory nowhere", t.key));
            }
            if t.state == TaskState::Processing {
                let w = t.processing_on.ok_or_else(|| format!("{}: processing nowhere", t.key))?;
                if !self.workers[&w].processing.contains(&id) {
                    return Err(format!("{}: worker does not list it", t.key));
                }
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const C1: PeerId = 1;
    const C2: PeerId = 2;
    const W1: PeerId = 10;
    const W2: PeerId = 11;

    fn spec(key: &str, deps: &[&str]) -> (TaskSpec, Option<Bytes>) {
        let t = TaskSpec::new(key, deps.iter().map(|d| d.to_string()).collect());
        (t, Some(Bytes::from_static(b"spec")))
    }

    fn with_workers(n: usize) -> SchedulerState {
        let mut s = SchedulerState::new(SchedulerConfig::default());
        for i in 0..n {
            let w = W1 + i as PeerId;
            s.add_worker(w, Registration::new(format!("w{i}"), format!("tcp://h:{i}"), 1, 1 << 30)).unwrap();
        }
        s
    }

    fn computes(s: &mut SchedulerState) -> Vec<(PeerId, String)> {
        s.take_outgoing()
            .into_iter()
            .filter_map(|(p, e)| match e.msg {
                Msg::ComputeTask { key, .. } => Some((p, key)),
                _ => None,
            })
            .collect()
    }

    fn finish(s: &mut SchedulerState, w: PeerId, key: &str, nbytes: u64) {
        s.task_finished(w, key, nbytes, 0.0, 1.0, 0, 0.0);
        s.validate().unwrap();
    }

    #[test]
    fn places_task_where_most_dependency_bytes_are() {
        let mut s = with_workers(2);
        s.update_graph(C1, vec![spec("a", &[]), spec("b", &[])], vec!["a".into(), "b".into()]);
        let sent = computes(&mut s);
        assert_eq!(sent.len(), 2);
        let wa = sent.iter().find(|(_, k)| k == "a").unwrap().0;
        let wb = sent.iter().find(|(_, k)| k == "b").unwrap().0;
        assert_ne!(wa, wb, "root tasks spread over idle workers");
        finish(&mut s, wa, "a", 1_000);
        finish(&mut s, wb, "b", 10);
        s.update_graph(C1, vec![spec("c", &["a", "b"])], vec!["c".into()]);
        assert_eq!(computes(&mut s), vec![(wa, "c".to_string())]);
    }

    #[test]
    fn root_tasks_are_queued_on_the_scheduler() {
        let mut s = with_workers(1);
        let specs: Vec<_> = (0..10).map(|i| spec(&format!("r-{i}"), &[])).collect();
        let keys = (0..10).map(|i| format!("r-{i}")).collect();
        s.update_graph(C1, specs, keys);
        let sent = computes(&mut s);
        assert_eq!(sent.len(), 2, "ceil(1.1 x 1 thread) in flight");
        assert_eq!(s.state_counts()["queued"], 8);
        finish(&mut s, W1, &sent[0].1, 8);
        assert_eq!(computes(&mut s).len(), 1, "a finished task frees one slot");
    }

    #[test]
    fn short_root_tasks_are_pipelined_long_ones_are_not() {
        let mut s = with_workers(1);
        let specs: Vec<_> = (0..200).map(|i| spec(&format!("r-{i}"), &[])).collect();
        s.update_graph(C1, specs, (0..200).map(|i| format!("r-{i}")).collect());
        let sent = computes(&mut s);
        assert_eq!(sent.len(), 2, "duration unknown: worker-saturation applies");
        // One finished in 10 us: 2 ms of such tasks is 200, capped at 64 per thread.
        s.task_finished(W1, &sent[0].1, 8, 0.0, 1e-5, 0, 0.0);
        assert_eq!(computes(&mut s).len(), 63, "64 in flight");
        s.validate().unwrap();
        // A group of 1 s tasks gets no more than worker-saturation allows.
        let mut s2 = with_workers(1);
        let specs: Vec<_> = (0..10).map(|i| spec(&format!("slow-{i}"), &[])).collect();
        s2.update_graph(C1, specs, (0..10).map(|i| format!("slow-{i}")).collect());
        let sent = computes(&mut s2);
        s2.task_finished(W1, &sent[0].1, 8, 0.0, 1.0, 0, 0.0);
        assert_eq!(computes(&mut s2).len(), 1, "long tasks: ceil(1.1 x 1) in flight");
    }

    #[test]
    fn seceded_tasks_free_their_slot_for_the_tasks_they_launch() {
        let mut s = with_workers(1);
        s.add_client(C1);
        s.update_graph(C1, vec![spec("parent", &[])], vec!["parent".into()]);
        s.update_graph(
            C1,
            vec![spec("a", &[]), spec("b", &[]), spec("c", &[])],
            vec!["a".into(), "b".into(), "c".into()],
        );
        // One thread, saturation 1.1: two root tasks in flight, the rest queued.
        assert_eq!(computes(&mut s).len(), 2);
        assert_eq!(s.task_state("b"), Some(TaskState::Queued));
        s.task_seceded(W1, "parent");
        assert_eq!(computes(&mut s), vec![(W1, "b".to_string())]);
        assert_eq!(s.task_state("parent"), Some(TaskState::Processing));
        // A seceded task lost with its worker is still rescheduled.
        s.remove_worker(W1);
        assert_eq!(s.task_state("parent"), Some(TaskState::Queued));
        s.validate().unwrap();
    }

    #[test]
    fn idle_workers_steal_long_tasks_from_a_saturated_one_after_it_agrees() {
        let mut s = with_workers(2);
        s.add_client(C1);
        // All inputs on W1; known-long tasks that need them.
        s.scatter_done(C1, "tcp://h:0", vec![("x".into(), 1000)]);
        let tasks: Vec<_> = (0..4).map(|i| spec(&format!("slow-{i}"), &["x"])).collect();
        s.update_graph(C1, tasks, (0..4).map(|i| format!("slow-{i}")).collect());
        assert!(computes(&mut s).iter().all(|(w, _)| *w == W1), "placed with their input");
        let g = s.t(s.keys["slow-0"]).group as usize;
        s.groups[g].duration_sum = 1.0;
        s.groups[g].duration_n = 1;
        s.balance();
        let asked: Vec<String> = s
            .take_outgoing()
            .into_iter()
            .filter_map(|(p, e)| match e.msg {
                Msg::StealRequest { key } if p == W1 => Some(key),
                _ => None,
            })
            .collect();
        assert_eq!(asked, ["slow-3", "slow-2"], "one idle thread: one task to run, one queued; those that run last");
        s.balance();
        assert!(s.take_outgoing().is_empty(), "no second request while one is in flight");
        // The victim already started it: nothing moves.
        s.steal_response(W1, "slow-3", false);
        assert_eq!(s.t(s.keys["slow-3"]).processing_on, Some(W1));
        // An answer for a request no longer in flight changes nothing either.
        s.steal_response(W1, "slow-3", true);
        assert_eq!(s.t(s.keys["slow-3"]).processing_on, Some(W1));
        s.steal_response(W1, "slow-2", true);
        assert_eq!(computes(&mut s), [(W2, "slow-2".to_string())]);
        assert_eq!(s.stolen_total(), 1);
        s.validate().unwrap();
    }

    #[test]
    fn short_tasks_with_large_inputs_are_not_stolen() {
        let mut s = with_workers(2);
        s.add_client(C1);
        s.scatter_done(C1, "tcp://h:0", vec![("x".into(), 1 << 30)]);
        let tasks: Vec<_> = (0..4).map(|i| spec(&format!("quick-{i}"), &["x"])).collect();
        s.update_graph(C1, tasks, (0..4).map(|i| format!("quick-{i}")).collect());
        computes(&mut s);
        s.balance();
        assert!(!s.take_outgoing().iter().any(|(_, e)| matches!(e.msg, Msg::StealRequest { .. })));
    }

    #[test]
    fn released_results_are_freed_and_forgotten() {
        let mut s = with_workers(1);
        s.update_graph(C1, vec![spec("a", &[]), spec("b", &["a"])], vec!["b".into()]);
        let sent = computes(&mut s);
        assert_eq!(sent, vec![(W1, "a".to_string())]);
        finish(&mut s, W1, "a", 8);
        assert_eq!(computes(&mut s), vec![(W1, "b".to_string())]);
        finish(&mut s, W1, "b", 8);
        let out = s.take_outgoing();
        let freed: Vec<&Msg> = out.iter().map(|(_, e)| &e.msg).filter(|m| matches!(m, Msg::FreeKeys { .. })).collect();
        assert_eq!(freed, vec![&Msg::FreeKeys { keys: vec!["a".into()] }], "a is not wanted once b is done");
        assert!(out.iter().any(|(p, e)| *p == C1 && matches!(&e.msg, Msg::KeyInMemory { key, .. } if key == "b")));
        s.release_keys(C1, &["b".into()]);
        s.validate().unwrap();
        assert_eq!(s.ntasks(), 0, "everything forgotten");
    }

    #[test]
    fn errors_propagate_to_dependents_and_reach_the_client() {
        let mut s = with_workers(1);
        s.update_graph(C1, vec![spec("a", &[]), spec("b", &["a"])], vec!["b".into()]);
        computes(&mut s);
        s.task_erred(W1, "a", Bytes::new(), Bytes::new(), "ZeroDivisionError: boom".into(), 0.0, 1.0, 0);
        s.validate().unwrap();
        assert_eq!(s.task_state("b"), Some(TaskState::Erred));
        let out = s.take_outgoing();
        assert!(out.iter().any(|(p, e)| *p == C1
            && matches!(&e.msg, Msg::KeyErred { key, text, .. } if key == "b" && text.contains("boom"))));
    }

    #[test]
    fn pure_keys_are_computed_once_across_clients() {
        let mut s = with_workers(1);
        s.update_graph(C1, vec![spec("inc-1", &[])], vec!["inc-1".into()]);
        s.update_graph(C2, vec![spec("inc-1", &[])], vec!["inc-1".into()]);
        assert_eq!(computes(&mut s).len(), 1);
        s.task_finished(W1, "inc-1", 8, 0.0, 1.0, 0, 0.0);
        let told: Vec<PeerId> = s
            .take_outgoing()
            .into_iter()
            .filter(|(_, e)| matches!(e.msg, Msg::KeyInMemory { .. }))
            .map(|(p, _)| p)
            .collect();
        assert_eq!(told, vec![C1, C2]);
        s.release_keys(C1, &["inc-1".into()]);
        assert_eq!(s.task_state("inc-1"), Some(TaskState::Memory), "C2 still holds it");
        s.release_keys(C2, &["inc-1".into()]);
        assert_eq!(s.ntasks(), 0);
    }

    #[test]
    fn lost_worker_tasks_are_rescheduled_and_lost_results_recomputed() {
        let mut s = with_workers(2);
        s.update_graph(C1, vec![spec("a", &[])], vec!["a".into()]);
        let (wa, _) = computes(&mut s)[0].clone();
        finish(&mut s, wa, "a", 8);
        s.update_graph(C1, vec![spec("b", &["a"])], vec!["b".into()]);
        assert_eq!(computes(&mut s), vec![(wa, "b".to_string())]);
        s.remove_worker(wa);
        s.validate().unwrap();
        let other = if wa == W1 { W2 } else { W1 };
        // a was only on the dead worker: recomputed first, then b.
        assert_eq!(computes(&mut s), vec![(other, "a".to_string())]);
        finish(&mut s, other, "a", 8);
        assert_eq!(computes(&mut s), vec![(other, "b".to_string())]);
    }

    #[test]
    fn retiring_a_worker_copies_its_data_first_and_gives_it_no_new_work() {
        let mut s = with_workers(2);
        s.update_graph(C1, vec![spec("a", &[]), spec("b", &[])], vec!["a".into(), "b".into()]);
        let placed = computes(&mut s);
        let (w1, k1) = placed[0].clone();
        let (w2, k2) = placed[1].clone();
        assert_ne!(w1, w2);
        finish(&mut s, w2, &k2, 8);
        s.take_outgoing();
        // w1 still runs its task: retirement waits for it.
        let name1 = s.worker_infos().into_iter().find(|w| s.workers[&w1].address == w.address).unwrap().name;
        s.retire_workers(C2, 7, vec![name1.clone()]);
        assert!(s.take_outgoing().is_empty());
        assert!(s.worker_infos().iter().any(|w| w.retiring));
        // New work goes only to the other worker.
        s.update_graph(C1, vec![spec("c", &[])], vec!["c".into()]);
        assert_eq!(computes(&mut s), vec![(w2, "c".to_string())]);
        finish(&mut s, w1, &k1, 16);
        let out = s.take_outgoing();
        let acquire: Vec<_> = out
            .iter()
            .filter_map(|(p, e)| match &e.msg {
                Msg::AcquireReplicas { keys } => Some((*p, keys[0].key.clone(), keys[0].who_has.clone())),
                _ => None,
            })
            .collect();
        assert_eq!(acquire, vec![(w2, k1.clone(), vec![s.workers[&w1].address.clone()])]);
        // The copy arrives: the worker is closed and the requester answered.
        s.add_keys(w2, &[(k1.clone(), 16)]);
        s.validate().unwrap();
        let out = s.take_outgoing();
        assert!(out.iter().any(|(p, e)| *p == w1 && matches!(e.msg, Msg::CloseWorker { .. })));
        assert!(out
            .iter()
            .any(|(p, e)| *p == C2
                && e.msg == Msg::WorkersRetired { id: 7, retired: vec![name1.clone()], failed: vec![] }));
        assert_eq!(s.nworkers(), 1);
        assert_eq!(s.who_has(&k1), vec![s.workers[&w2].address.clone()]);
        assert_eq!(s.task_state(&k1), Some(TaskState::Memory));
    }

    #[test]
    fn retiring_the_last_worker_holding_data_is_refused() {
        let mut s = with_workers(1);
        s.update_graph(C1, vec![spec("a", &[])], vec!["a".into()]);
        computes(&mut s);
        finish(&mut s, W1, "a", 8);
        s.retire_workers(C2, 1, vec!["w0".into(), "nope".into()]);
        let out = s.take_outgoing();
        let reply = out.iter().find(|(p, _)| *p == C2).map(|(_, e)| e.msg.clone());
        assert_eq!(
            reply,
            Some(Msg::WorkersRetired {
                id: 1,
                retired: vec![],
                failed: vec![
                    ("nope".into(), "no such worker".into()),
                    ("w0".into(), "no other worker can hold its data".into())
                ],
            })
        );
        assert_eq!(s.nworkers(), 1);
        assert!(!s.worker_infos()[0].retiring);
    }

    #[test]
    fn load_uses_durations_learned_per_group() {
        let mut s = with_workers(1);
        let tasks: Vec<_> = (0..5).map(|i| spec(&format!("x-{i}"), &[])).collect();
        s.update_graph(C1, tasks, (0..5).map(|i| format!("x-{i}")).collect());
        let l = s.load();
        // Unknown durations count 0.5 s each; 2 in flight (saturation 1.1 x 1 thread), 3 queued.
        assert_eq!((l.processing, l.queued), (2, 3));
        assert!((l.occupancy - 1.0).abs() < 1e-9 && (l.queued_occupancy - 1.5).abs() < 1e-9);
        s.task_finished(W1, "x-0", 8, 10.0, 12.0, 0, 0.0);
        let l = s.load();
        assert!((l.occupancy - 4.0).abs() < 1e-9, "{l:?}");
        assert!((l.queued_occupancy - 4.0).abs() < 1e-9, "{l:?}");
    }

    #[test]
    fn worker_restrictions_wait_for_the_named_worker() {
        let mut s = with_workers(1);
        let (mut t, spec_bytes) = spec("pinned", &[]);
        t.workers = Some(vec!["gpu-box".into()]);
        s.update_graph(C1, vec![(t, spec_bytes)], vec!["pinned".into()]);
        assert!(computes(&mut s).is_empty());
        assert_eq!(s.task_state("pinned"), Some(TaskState::NoWorker));
        s.add_worker(W2, Registration::new("gpu-box", "tcp://h:9", 1, 0)).unwrap();
        assert_eq!(computes(&mut s), vec![(W2, "pinned".to_string())]);
    }

    #[test]
    fn tasks_needing_resources_go_only_to_workers_declaring_enough() {
        let mut s = with_workers(2);
        s.add_client(C1);
        let gpu = |key: &str, amount: f64| {
            let (mut t, b) = spec(key, &[]);
            t.resources = vec![("GPU".into(), amount)];
            (t, b)
        };
        s.update_graph(
            C1,
            vec![gpu("a", 1.0), gpu("b", 1.0), gpu("big", 4.0)],
            vec!["a".into(), "b".into(), "big".into()],
        );
        // No worker declares GPU: all three wait, and the client hears why.
        let out = s.take_outgoing();
        let reasons: Vec<String> = out
            .iter()
            .filter_map(|(_, e)| match &e.msg {
                Msg::KeyNoWorker { reason, .. } => Some(reason.clone()),
                _ => None,
            })
            .collect();
        assert_eq!(reasons.len(), 3);
        assert!(reasons[0].contains("no worker matches resources {GPU=1}"), "{reasons:?}");
        assert!(!out.iter().any(|(_, e)| matches!(e.msg, Msg::ComputeTask { .. })));
        let mut reg = Registration::new("gpu", "tcp://h:9", 4, 0);
        reg.resources = vec![("GPU".into(), 2.0)];
        s.add_worker(20, reg).unwrap();
        // Both one-GPU tasks go to the GPU worker, whatever the others' load;
        // four GPUs are more than any worker has.
        let out = s.take_outgoing();
        let sent: Vec<(PeerId, String, Resources)> = out
            .into_iter()
            .filter_map(|(p, e)| match e.msg {
                Msg::ComputeTask { key, resources, .. } => Some((p, key, resources)),
                _ => None,
            })
            .collect();
        let gpu1 = vec![("GPU".to_string(), 1.0)];
        assert_eq!(sent, vec![(20, "a".into(), gpu1.clone()), (20, "b".into(), gpu1)]);
        assert_eq!(s.task_state("big"), Some(TaskState::NoWorker));
        s.validate().unwrap();
        // A dependent without resources may run anywhere (here: with its input).
        finish(&mut s, 20, "a", 8);
        s.update_graph(C1, vec![spec("after", &["a"])], vec!["after".into()]);
        assert_eq!(computes(&mut s), vec![(20, "after".to_string())]);
        let info = s.worker_infos_with(&s.load());
        assert_eq!(info.iter().find(|w| w.name == "gpu").unwrap().resources, vec![("GPU".to_string(), 2.0)]);
    }

    #[test]
    fn clients_hear_when_a_task_has_no_worker_and_when_it_has_one_again() {
        let mut s = with_workers(1);
        s.add_client(C1);
        let (mut t, spec_bytes) = spec("pinned", &[]);
        t.workers = Some(vec!["later".into()]);
        s.update_graph(C1, vec![(t, spec_bytes)], vec!["pinned".into()]);
        let told = |s: &mut SchedulerState| -> Vec<String> {
            s.take_outgoing()
                .into_iter()
                .filter_map(|(p, e)| match e.msg {
                    Msg::KeyNoWorker { reason, .. } if p == C1 => Some(reason),
                    _ => None,
                })
                .collect()
        };
        let r = told(&mut s);
        assert_eq!(r.len(), 1);
        assert!(r[0].contains("no worker matches workers=[\"later\"]"), "{r:?}");
        s.add_worker(W2, Registration::new("later", "tcp://h:9", 1, 1 << 30)).unwrap();
        assert_eq!(told(&mut s), [String::new()]);
        assert_eq!(s.task_state("pinned"), Some(TaskState::Processing));
    }

    #[test]
    fn rebalance_copies_then_frees_the_sender_and_answers_when_done() {
        let mut s = with_workers(3);
        s.add_client(C1);
        let keys: Vec<(Key, u64)> = (0..6).map(|i| (format!("x-{i}"), 100)).collect();
        s.scatter_done(C1, "tcp://h:0", keys);
        // A task running on w0 needs x-0 (largest-first ties go by id: x-0 first).
        s.update_graph(C1, vec![spec("use", &["x-0"])], vec!["use".into()]);
        s.take_outgoing();
        s.rebalance(C1, 7, vec![], vec![]);
        let mut acquire: Vec<(PeerId, Vec<String>)> = s
            .take_outgoing()
            .into_iter()
            .filter_map(|(p, e)| match e.msg {
                Msg::AcquireReplicas { keys } => Some((p, keys.into_iter().map(|d| d.key).collect())),
                _ => None,
            })
            .collect();
        acquire.sort();
        // 600 bytes over three workers: two keys to each of w1 and w2, never x-0.
        assert_eq!(acquire.iter().map(|(_, k)| k.len()).collect::<Vec<_>>(), [2, 2]);
        assert!(acquire.iter().all(|(_, k)| !k.contains(&"x-0".to_string())), "{acquire:?}");
        // w1's copies arrive: w0's are freed; w2's first copy fails.
        let (w1, w1_keys) = acquire[0].clone();
        s.add_keys(w1, &w1_keys.iter().map(|k| (k.clone(), 100)).collect::<Vec<_>>());
        let out = s.take_outgoing();
        let freed: Vec<String> = out
            .iter()
            .filter_map(|(p, e)| match &e.msg {
                Msg::FreeKeys { keys } if *p == W1 => Some(keys.clone()),
                _ => None,
            })
            .flatten()
            .collect();
        assert_eq!(freed, w1_keys);
        assert!(!out.iter().any(|(_, e)| matches!(e.msg, Msg::Rebalanced { .. })));
        for k in &w1_keys {
            assert_eq!(s.who_has(k), vec!["tcp://h:1".to_string()]);
        }
        let (w2, w2_keys) = acquire[1].clone();
        s.missing_data(w2, &w2_keys[0], &[]);
        s.add_keys(w2, &[(w2_keys[1].clone(), 100)]);
        let answers: Vec<Msg> = s.take_outgoing().into_iter().filter(|(p, _)| *p == C1).map(|(_, e)| e.msg).collect();
        assert!(
            answers.iter().any(|m| matches!(m, Msg::Rebalanced { id: 7, moved: 3, bytes: 300, failed: 1, error }
                if error.is_empty())),
            "{answers:?}"
        );
        assert_eq!(s.who_has(&w2_keys[0]), vec!["tcp://h:0".to_string()], "a failed copy keeps the original");
        s.validate().unwrap();
        // Unknown workers are an error; balanced already: answered at once.
        s.rebalance(C1, 8, vec![], vec!["nobody".into()]);
        let out = s.take_outgoing();
        assert!(
            matches!(&out[0].1.msg, Msg::Rebalanced { id: 8, error, .. } if error.contains("no such worker: nobody"))
        );
        s.rebalance(C1, 9, vec!["x-1".into()], vec!["w1".into(), "w2".into()]);
        let out = s.take_outgoing();
        assert!(matches!(&out[0].1.msg, Msg::Rebalanced { id: 9, moved: 0, failed: 0, .. }), "{out:?}");
    }

    #[test]
    fn a_recipient_dying_mid_rebalance_loses_nothing_and_the_request_is_answered() {
        let mut s = with_workers(2);
        s.add_client(C1);
        s.scatter_done(C1, "tcp://h:0", vec![("a".into(), 100), ("b".into(), 100)]);
        s.take_outgoing();
        s.rebalance(C1, 1, vec![], vec![]);
        assert!(s.take_outgoing().iter().any(|(p, e)| *p == W2 && matches!(e.msg, Msg::AcquireReplicas { .. })));
        s.remove_worker(W2);
        let out = s.take_outgoing();
        assert!(
            out.iter().any(|(p, e)| *p == C1 && matches!(e.msg, Msg::Rebalanced { id: 1, moved: 0, failed: 1, .. })),
            "{out:?}"
        );
        assert_eq!(s.who_has("a"), ["tcp://h:0"]);
        assert_eq!(s.who_has("b"), ["tcp://h:0"]);
        s.validate().unwrap();
    }

    #[test]
    fn replicate_copies_to_the_least_loaded_workers_until_n_hold_it() {
        let mut s = with_workers(3);
        s.add_client(C1);
        s.scatter_done(C1, "tcp://h:0", vec![("x".into(), 100)]);
        s.scatter_done(C1, "tcp://h:1", vec![("big".into(), 1000)]);
        s.take_outgoing();
        s.replicate(&["x".into(), "unknown".into()], 2);
        let sent: Vec<(PeerId, String)> = s
            .take_outgoing()
            .into_iter()
            .filter_map(|(p, e)| match e.msg {
                Msg::AcquireReplicas { keys } => Some((p, keys[0].key.clone())),
                _ => None,
            })
            .collect();
        assert_eq!(sent, [(W1 + 2, "x".to_string())], "the worker holding nothing gets the copy");
        s.add_keys(W1 + 2, &[("x".into(), 100)]);
        assert_eq!(s.who_has("x").len(), 2);
        s.replicate(&["x".into()], 2);
        assert!(s.take_outgoing().is_empty(), "already on two workers");
    }

    #[test]
    fn restart_cancels_every_key_and_restarts_every_worker() {
        let mut s = with_workers(2);
        s.add_client(C1);
        s.update_graph(C1, vec![spec("a", &[]), spec("b", &["a"])], vec!["b".into()]);
        s.take_outgoing();
        s.restart();
        let out = s.take_outgoing();
        assert!(out.iter().any(|(p, e)| *p == C1 && matches!(&e.msg, Msg::KeyCancelled { key, .. } if key == "b")));
        assert_eq!(out.iter().filter(|(_, e)| matches!(e.msg, Msg::RestartWorker)).count(), 2);
        assert_eq!((s.ntasks(), s.nworkers(), s.nclients()), (0, 0, 1));
        s.validate().unwrap();
    }

    #[test]
    fn unknown_dependency_errs_with_a_clear_message() {
        let mut s = with_workers(1);
        s.update_graph(C1, vec![spec("b", &["gone"])], vec!["b".into()]);
        let out = s.take_outgoing();
        assert!(out.iter().any(|(_, e)| matches!(&e.msg,
            Msg::KeyErred { text, .. } if text.contains("\"gone\" is not known to the scheduler"))));
    }

    #[test]
    fn duplicate_worker_names_are_refused() {
        let mut s = with_workers(1);
        let err = s.add_worker(W2, Registration::new("w0", "tcp://h:77", 1, 0)).unwrap_err();
        assert!(err.contains("already registered"));
    }

    #[test]
    fn events_give_a_snapshot_then_only_changes() {
        let mut s = with_workers(1);
        s.update_graph(C1, vec![spec("x-1", &[]), spec("y-1", &[])], vec!["x-1".into(), "y-1".into()]);
        let mut cur = EventCursor::default();
        let snap = s.events_since(&mut cur, 0.0);
        assert_eq!(snap.groups.len(), 2);
        assert!(snap.stream.is_empty());
        let sent = computes(&mut s);
        let x_worker = sent.iter().find(|(_, k)| k == "x-1").unwrap().0;
        finish(&mut s, x_worker, "x-1", 8);
        let delta = s.events_since(&mut cur, 1.0);
        assert_eq!(delta.stream.len(), 1);
        assert_eq!(delta.groups.len(), 1, "only the x group changed");
        assert_eq!(delta.groups[0].memory, 1);
        assert!(s.events_since(&mut cur, 2.0).stream.is_empty());
    }

    #[test]
    fn retries_rerun_a_failing_task() {
        let mut s = with_workers(1);
        let (mut t, b) = spec("flaky", &[]);
        t.retries = 2;
        s.update_graph(C1, vec![(t, b)], vec!["flaky".into()]);
        for _ in 0..2 {
            assert_eq!(computes(&mut s).len(), 1);
            s.task_erred(W1, "flaky", Bytes::new(), Bytes::new(), "OSError".into(), 0.0, 1.0, 0);
            s.validate().unwrap();
            assert_ne!(s.task_state("flaky"), Some(TaskState::Erred));
        }
        assert_eq!(computes(&mut s).len(), 1, "third attempt");
        s.task_erred(W1, "flaky", Bytes::new(), Bytes::new(), "OSError".into(), 0.0, 1.0, 0);
        assert_eq!(s.task_state("flaky"), Some(TaskState::Erred));
    }

    #[test]
    fn a_task_that_keeps_killing_workers_errs_with_killed_worker() {
        let mut s = SchedulerState::new(SchedulerConfig { allowed_failures: 1, ..Default::default() });
        s.add_worker(W1, Registration::new("a", "tcp://h:1", 1, 0)).unwrap();
        s.update_graph(C1, vec![spec("bomb", &[])], vec!["bomb".into()]);
        assert_eq!(computes(&mut s), vec![(W1, "bomb".to_string())]);
        s.remove_worker(W1);
        s.add_worker(W2, Registration::new("b", "tcp://h:2", 1, 0)).unwrap();
        assert_eq!(computes(&mut s), vec![(W2, "bomb".to_string())], "first death is forgiven");
        s.remove_worker(W2);
        s.validate().unwrap();
        assert_eq!(s.task_state("bomb"), Some(TaskState::Erred));
        assert!(s.take_outgoing().iter().any(|(_, e)| matches!(&e.msg,
            Msg::KeyErred { text, .. } if text.starts_with("KilledWorker:") && text.contains("tcp://h:2"))));
    }

    #[test]
    fn retry_reruns_the_erred_chain() {
        let mut s = with_workers(1);
        s.update_graph(C1, vec![spec("a", &[]), spec("b", &["a"])], vec!["b".into()]);
        computes(&mut s);
        s.task_erred(W1, "a", Bytes::new(), Bytes::new(), "boom".into(), 0.0, 1.0, 0);
        assert_eq!(s.task_state("b"), Some(TaskState::Erred));
        s.take_outgoing();
        s.retry_keys(&["b".into()]);
        s.validate().unwrap();
        assert_eq!(computes(&mut s), vec![(W1, "a".to_string())]);
        finish(&mut s, W1, "a", 8);
        assert_eq!(computes(&mut s), vec![(W1, "b".to_string())]);
    }

    #[test]
    fn fire_and_forget_runs_after_release_then_forgets() {
        let mut s = with_workers(1);
        s.update_graph(C1, vec![spec("side-effect", &[])], vec!["side-effect".into()]);
        s.fire_and_forget(&["side-effect".into()]);
        s.release_keys(C1, &["side-effect".into()]);
        assert_eq!(computes(&mut s).len(), 1, "still computed");
        finish(&mut s, W1, "side-effect", 8);
        assert_eq!(s.ntasks(), 0, "forgotten once done");
    }

    #[test]
    fn datasets_hold_keys_until_unpublished() {
        let mut s = with_workers(1);
        s.update_graph(C1, vec![spec("x", &[])], vec!["x".into()]);
        computes(&mut s);
        finish(&mut s, W1, "x", 8);
        s.publish_dataset(C1, 1, "mine".into(), vec!["x".into()], Bytes::from_static(b"pickled"), false);
        s.publish_dataset(C1, 2, "mine".into(), vec!["x".into()], Bytes::new(), false);
        let out = s.take_outgoing();
        assert!(out.iter().any(
            |(_, e)| matches!(&e.msg, Msg::DatasetReply { id: 2, error, .. } if error.contains("already exists"))
        ));
        s.release_keys(C1, &["x".into()]);
        assert_eq!(s.task_state("x"), Some(TaskState::Memory), "held by the dataset");
        s.get_dataset(C2, 3, "mine");
        s.list_datasets(C2, 4);
        let out = s.take_outgoing();
        assert!(out.iter().any(|(_, e)| matches!(&e.msg, Msg::DatasetReply { id: 3, data: Some(Blob::Inline(b)), .. } if &b[..] == b"pickled")));
        assert!(out.iter().any(
            |(_, e)| matches!(&e.msg, Msg::DatasetReply { id: 4, names, .. } if names == &vec!["mine".to_string()])
        ));
        s.unpublish_dataset(C2, 5, "mine");
        assert_eq!(s.ntasks(), 0);
    }
}
