//! The scheduler's whole state, [`SchedulerState`], and the one place a
//! task changes state ([`SchedulerState::set_state`]).
//!
//! This is a pure state machine. Every public method takes an event (a
//! message from a peer, a peer joining or leaving) and pushes the messages
//! it wants sent into [`SchedulerState::take_outgoing`]. No sockets, no
//! clocks: time comes in with the events. The IO shell in `server.rs` and
//! the in-process simulator in `crate::sim` drive the same code. The other
//! files of this folder add `impl SchedulerState` blocks, one concern each.

use super::coord::Coordination;
use super::holders::Client;
use super::replicas::Rebalancing;
use super::retire::Retirement;
use super::shared::SharedBlobs;
use super::task::{Group, Task, TaskId};
use super::workers::Worker;
use crate::protocol::{key_split, Envelope, Key, Priority, TaskStreamRecord, ToClient, ToWorker};
use bytes::Bytes;
use rustc_hash::FxHashMap;
use std::collections::{BTreeSet, VecDeque};
use std::sync::Arc;

/// Identifies a connected peer (worker or client) for the lifetime of its connection.
pub type PeerId = u64;

/// A message the scheduler wants sent to a worker or to a client.
#[derive(Debug, Clone, PartialEq)]
pub enum Outgoing {
    Worker(Envelope<ToWorker>),
    Client(Envelope<ToClient>),
}

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
    pub(super) fn index(self) -> usize {
        self as usize
    }

    /// States in which a task still needs its dependencies.
    pub(super) fn is_active(self) -> bool {
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

impl SchedulerConfig {
    /// Each setting by name (Dask's configuration names where it has the
    /// setting), for people reading a dashboard.
    pub fn describe(&self) -> Vec<(String, String)> {
        let s = |k: &str, v: String| (k.to_string(), v);
        vec![
            s("distributed.scheduler.worker-saturation", self.worker_saturation.to_string()),
            s("distributed.scheduler.work-stealing", self.work_stealing.to_string()),
            s("distributed.scheduler.allowed-failures", self.allowed_failures.to_string()),
            s("distributed.scheduler.worker-ttl", format!("{} s", self.worker_ttl.as_secs_f64())),
            s("distributed.scheduler.bandwidth", format!("{} B/s", self.bandwidth)),
            s("pipeline window (per thread)", format!("{} s", self.pipeline_window)),
            s("task-stream records kept", self.stream_capacity.to_string()),
        ]
    }
}

/// How a process is protected, for people reading a dashboard: the
/// address scheme and which credentials it demands (never their values).
pub fn describe_security(security: &crate::security::Security) -> Vec<(String, String)> {
    let tls = if security.tls().is_some() { "TLS 1.3, mutual, cluster CA" } else { "none (plain TCP)" };
    let token = if security.requires_token() { "required" } else { "none" };
    vec![("encryption".into(), tls.into()), ("cluster token".into(), token.into())]
}

/// How far back among queued messages a FreeKeys looks for an earlier one
/// to the same worker to join.
const FREE_KEYS_LOOKBACK: usize = 16;

/// The scheduler's whole state.
pub struct SchedulerState {
    pub(super) config: SchedulerConfig,
    pub(super) tasks: Vec<Option<Task>>,
    pub(super) free_ids: Vec<TaskId>,
    pub(super) keys: FxHashMap<Arc<str>, TaskId>,
    pub(super) workers: FxHashMap<PeerId, Worker>,
    pub(super) worker_order: Vec<PeerId>,
    pub(super) clients: FxHashMap<PeerId, Client>,
    pub(super) queue: BTreeSet<(Priority, TaskId)>,
    pub(super) no_worker: BTreeSet<(Priority, TaskId)>,
    pub(super) generation: u64,
    /// Task groups by id; a slot with an empty name is free (its group was
    /// forgotten) and listed in `free_groups`.
    pub(super) groups: Vec<Group>,
    pub(super) group_ids: FxHashMap<String, u32>,
    pub(super) free_groups: Vec<u32>,
    /// Groups whose last task was forgotten since the last sweep.
    pub(super) emptied_groups: Vec<u32>,
    /// Names of forgotten groups with the version they went at, for
    /// subscribers (bounded: the oldest go first).
    pub(super) removed_groups: VecDeque<(u64, String)>,
    /// Run times learned by forgotten groups (sum, count), so a group that
    /// comes back starts from them (bounded).
    pub(super) learned: FxHashMap<String, (f64, u64)>,
    pub(super) stream: VecDeque<TaskStreamRecord>,
    pub(super) stream_total: u64,
    pub(super) version: u64,
    pub(super) out: Vec<(PeerId, Outgoing)>,
    /// Published datasets: name -> (keys held, pickled object).
    pub(super) datasets: FxHashMap<String, (Vec<Key>, Bytes)>,
    pub(super) retirements: Vec<Retirement>,
    /// Keys being copied off retiring workers, and where to.
    pub(super) replicating: FxHashMap<TaskId, PeerId>,
    /// Variables, queues, semaphores and events.
    pub(super) coord: Coordination,
    /// Steals asked of a victim and not yet answered: task -> (victim, thief).
    pub(super) steals: FxHashMap<TaskId, (PeerId, PeerId)>,
    /// Tasks moved by stealing, since start.
    pub(super) stolen_total: u64,
    pub(super) rebalances: Vec<Rebalancing>,
    /// Worker plugins: (name, set-up call), in registration order.
    pub(super) plugins: Vec<(String, Bytes)>,
    /// The heartbeat interval workers were last told (ms).
    pub(super) heartbeat_ms: u64,
    /// Functions (and other bytes) many tasks refer to.
    pub(super) shared: SharedBlobs,
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
            free_groups: Vec::new(),
            emptied_groups: Vec::new(),
            removed_groups: VecDeque::new(),
            learned: FxHashMap::default(),
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
            plugins: Vec::new(),
            heartbeat_ms: crate::protocol::DEFAULT_HEARTBEAT_MS,
            shared: SharedBlobs::default(),
        }
    }

    /// Messages produced since the last call, with their destinations.
    pub fn take_outgoing(&mut self) -> Vec<(PeerId, Outgoing)> {
        std::mem::take(&mut self.out)
    }

    /// Messages produced since the last call, appended to `buf`.
    pub fn drain_outgoing_into(&mut self, buf: &mut Vec<(PeerId, Outgoing)>) {
        buf.append(&mut self.out);
    }

    pub(super) fn send_worker(&mut self, peer: PeerId, msg: impl Into<Envelope<ToWorker>>) {
        let mut env = msg.into();
        // Keys freed one after another (a released graph frees thousands)
        // join the worker's last message when that is a FreeKeys: one
        // message, and nothing sent to the worker in between is overtaken.
        if let ToWorker::FreeKeys { keys } = &mut env.msg {
            for (p, o) in self.out.iter_mut().rev().take(FREE_KEYS_LOOKBACK) {
                if *p != peer {
                    continue;
                }
                if let Outgoing::Worker(Envelope { msg: ToWorker::FreeKeys { keys: earlier }, .. }) = o {
                    earlier.append(keys);
                    return;
                }
                break;
            }
        }
        self.out.push((peer, Outgoing::Worker(env)));
    }

    pub(super) fn send_client(&mut self, peer: PeerId, msg: impl Into<Envelope<ToClient>>) {
        self.out.push((peer, Outgoing::Client(msg.into())));
    }

    pub(super) fn t(&self, id: TaskId) -> &Task {
        self.tasks[id as usize].as_ref().expect("live task")
    }

    /// The task `id`, unless it was forgotten.
    pub(super) fn live(&self, id: TaskId) -> Option<&Task> {
        self.tasks.get(id as usize).and_then(Option::as_ref)
    }

    pub(super) fn tm(&mut self, id: TaskId) -> &mut Task {
        self.tasks[id as usize].as_mut().expect("live task")
    }

    pub(super) fn group_id(&mut self, key: &str) -> u32 {
        let name = key_split(key);
        if let Some(&g) = self.group_ids.get(name.as_ref()) {
            return g;
        }
        let name = name.into_owned();
        let (duration_sum, duration_n) = self.learned.remove(&name).unwrap_or((0.0, 0));
        let group = Group {
            name: name.clone(),
            counts: [0; 8],
            live: 0,
            nbytes: 0,
            changed_at: 0,
            duration_sum,
            duration_n,
            deps: Vec::new(),
        };
        let g = match self.free_groups.pop() {
            Some(g) => {
                self.groups[g as usize] = group;
                g
            }
            None => {
                self.groups.push(group);
                (self.groups.len() - 1) as u32
            }
        };
        self.group_ids.insert(name, g);
        g
    }

    /// Forget the groups whose tasks are all forgotten: their slots are
    /// reused, subscribers hear of their removal, and what they learned of
    /// run times is kept by name (bounded) for when they come back.
    pub fn forget_empty_groups(&mut self) {
        const KEEP: usize = 10_000;
        let mut removed = Vec::new();
        for g in std::mem::take(&mut self.emptied_groups) {
            let grp = &mut self.groups[g as usize];
            if grp.live > 0 || grp.name.is_empty() {
                continue;
            }
            let name = std::mem::take(&mut grp.name);
            let learned = (grp.duration_sum, grp.duration_n);
            *grp = Group {
                name: String::new(),
                counts: [0; 8],
                live: 0,
                nbytes: 0,
                changed_at: 0,
                duration_sum: 0.0,
                duration_n: 0,
                deps: Vec::new(),
            };
            self.group_ids.remove(&name);
            if learned.1 > 0 {
                if self.learned.len() >= KEEP {
                    self.learned.clear();
                }
                self.learned.insert(name.clone(), learned);
            }
            self.version += 1;
            self.removed_groups.push_back((self.version, name));
            if self.removed_groups.len() > KEEP {
                self.removed_groups.pop_front();
            }
            self.free_groups.push(g);
            removed.push(g);
        }
        if !removed.is_empty() {
            removed.sort_unstable();
            for grp in &mut self.groups {
                grp.deps.retain(|d| removed.binary_search(d).is_err());
            }
        }
    }

    /// Number of task groups the scheduler holds.
    pub fn ngroups(&self) -> usize {
        self.group_ids.len()
    }

    /// Move `id` to `new`, keeping group counts and dependencies' waiter
    /// counts consistent.
    pub(super) fn set_state(&mut self, id: TaskId, new: TaskState) {
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
        if new == TaskState::Forgotten {
            g.live = g.live.saturating_sub(1);
            if g.live == 0 {
                self.emptied_groups.push(group);
            }
        }
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
}
