//! The worker's task state machine (after distributed's `WorkerState`).
//!
//! Pure: events in, [`Instruction`]s out. It knows which tasks are waiting
//! for dependencies, which are being fetched from which peer, which are
//! ready, and which run; it never touches data or sockets. The runtime in
//! `runtime.rs` carries out the instructions.

use std::cmp::Reverse;
use std::collections::BinaryHeap;

use bytes::Bytes;
use rustc_hash::{FxHashMap, FxHashSet};

use super::memory::{MemoryConfig, MemoryManager, Verdict};
use crate::protocol::{Blob, DepInfo, Envelope, FromWorker, Key, Priority, Resources, TaskErred, TaskFinished};

/// What the runtime must do.
#[derive(Debug, Clone, PartialEq)]
pub enum Instruction {
    /// Run `key` on an executor thread, with `deps` already in the store.
    Execute { key: Key, recipe: Recipe, deps: Vec<Key> },
    /// Fetch `keys` from the worker at `worker`.
    Fetch { worker: String, keys: Vec<Key> },
    /// Send a message to the scheduler.
    Send(Envelope<FromWorker>),
    /// Drop these keys from the data store.
    Free { keys: Vec<Key> },
    /// Write these results to disk and drop them from memory; report with
    /// [`WorkerState::spill_done`].
    Spill { keys: Vec<Key> },
    /// Run these set-up calls (worker plugins) in order, off the runtime
    /// loop; report with [`WorkerState::set_up_done`].
    SetUp { calls: Vec<Bytes> },
}

/// What a task runs, opaque to the worker: its serialized call and, when
/// the call refers to one, the shared blob (its function) with the blob's id.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Recipe {
    pub spec: Bytes,
    pub shared: Option<(u64, Bytes)>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum WState {
    Waiting,
    Ready,
    Executing,
    /// Released by the scheduler while executing: the result is discarded.
    Cancelled,
}

#[derive(Debug)]
struct WTask {
    state: WState,
    recipe: Recipe,
    deps: Vec<Key>,
    priority: Priority,
    missing: u32,
    fetch_started: Option<f64>,
    transfer: f64,
    /// Left its thread (`secede`) and does not count as executing.
    seceded: bool,
    /// Held from hand-over to an executor thread until the task ends.
    resources: Resources,
}

#[derive(Debug)]
struct Fetching {
    holders: Vec<String>,
    tried: Vec<String>,
    in_flight: bool,
}

/// Result of running a task, as the runtime reports it.
#[derive(Debug, Clone)]
pub enum ExecOutcome {
    Ok { nbytes: u64 },
    Err { exception: Bytes, traceback: Bytes, text: String },
}

/// The worker's bookkeeping.
#[derive(Debug)]
pub struct WorkerState {
    nthreads: usize,
    tasks: FxHashMap<Key, WTask>,
    ready: BinaryHeap<Reverse<(Priority, Key)>>,
    /// Ready tasks that need resources; the first runs once they are free.
    constrained: BinaryHeap<Reverse<(Priority, Key)>>,
    /// Resources declared, and what is not held by running tasks.
    resources: Resources,
    available: Resources,
    /// Tasks handed to the executor: running, or queued behind a running one.
    executing: usize,
    data: FxHashMap<Key, u64>,
    managed: u64,
    fetching: FxHashMap<Key, Fetching>,
    dep_waiters: FxHashMap<Key, FxHashSet<Key>>,
    out: Vec<Instruction>,
    /// Fetches held back while paused.
    deferred_fetches: Vec<(String, Vec<Key>)>,
    mem: MemoryManager,
    mem_config: MemoryConfig,
    /// Set-ups running: no task starts until they are done.
    setting_up: usize,
    /// Recent task run time (seconds, moving average), once one ran.
    recent_duration: Option<f64>,
}

/// Tasks shorter than this on average are handed to executor threads
/// `SHORT_PER_THREAD` at a time rather than two.
const SHORT_TASK: f64 = 0.000_5;
const SHORT_PER_THREAD: usize = 16;

impl WorkerState {
    /// A worker with no memory limit.
    pub fn new(nthreads: usize) -> Self {
        Self::with_memory(nthreads, MemoryConfig::new(0))
    }

    /// A worker whose results are spilled, and which pauses, by `memory`.
    pub fn with_memory(nthreads: usize, memory: MemoryConfig) -> Self {
        WorkerState {
            nthreads: nthreads.max(1),
            tasks: FxHashMap::default(),
            ready: BinaryHeap::new(),
            constrained: BinaryHeap::new(),
            resources: Vec::new(),
            available: Vec::new(),
            executing: 0,
            data: FxHashMap::default(),
            managed: 0,
            fetching: FxHashMap::default(),
            dep_waiters: FxHashMap::default(),
            out: Vec::new(),
            deferred_fetches: Vec::new(),
            mem: MemoryManager::new(memory.clone()),
            mem_config: memory,
            setting_up: 0,
            recent_duration: None,
        }
    }

    /// Offer `resources` to tasks that need them (`--resources`).
    pub fn with_resources(mut self, resources: Resources) -> Self {
        self.available = resources.clone();
        self.resources = resources;
        self
    }

    /// Instructions produced since the last call.
    pub fn take_instructions(&mut self) -> Vec<Instruction> {
        std::mem::take(&mut self.out)
    }

    /// Bytes of results held (in memory and spilled).
    pub fn managed(&self) -> u64 {
        self.managed
    }

    /// Bytes of results held in memory.
    pub fn managed_in_memory(&self) -> u64 {
        self.mem.memory()
    }

    /// Bytes of results spilled to disk.
    pub fn spilled(&self) -> u64 {
        self.mem.spilled()
    }

    /// Whether the memory policy paused task execution.
    pub fn paused(&self) -> bool {
        self.mem.paused()
    }

    /// Hold `key`'s result of `nbytes` bytes, just stored (a copy held
    /// before is replaced, its size no longer counted).
    fn hold(&mut self, key: &Key, nbytes: u64) {
        if let Some(old) = self.data.insert(key.clone(), nbytes) {
            self.managed -= old;
        }
        self.managed += nbytes;
        self.mem.add(key, nbytes);
        let keys = self.mem.spill_for_target();
        if !keys.is_empty() {
            self.out.push(Instruction::Spill { keys });
        }
    }

    /// The process uses `rss` bytes at time `now`: spill, pause or resume
    /// per the memory policy. Returns why the process must exit, if it must.
    pub fn memory_tick(&mut self, rss: u64, now: f64) -> Option<String> {
        let was_paused = self.mem.paused();
        let (keys, verdict) = self.mem.check(rss, now);
        if !keys.is_empty() {
            self.out.push(Instruction::Spill { keys });
        }
        match verdict {
            Verdict::Terminate(why) => return Some(why),
            Verdict::Pause if !was_paused => tracing::warn!(
                "pausing: process memory {} MiB is above the pause threshold; {} MiB of results in memory",
                rss >> 20,
                self.mem.memory() >> 20
            ),
            Verdict::Run if was_paused => {
                tracing::info!("resuming: process memory {} MiB", rss >> 20);
                for (worker, mut keys) in std::mem::take(&mut self.deferred_fetches) {
                    keys.retain(|k| self.fetching.contains_key(k));
                    if !keys.is_empty() {
                        self.out.push(Instruction::Fetch { worker, keys });
                    }
                }
                self.schedule();
            }
            _ => {}
        }
        None
    }

    /// The store wrote results to disk (`true`) or failed to (`false`),
    /// between `start` and `stop`; the scheduler hears of what was written.
    /// The scheduler sent worker plugins' set-up calls: run them before
    /// any task starts (tasks arriving meanwhile wait, ready).
    pub fn set_up(&mut self, calls: Vec<Bytes>) {
        self.setting_up += 1;
        self.out.push(Instruction::SetUp { calls });
    }

    /// A set-up finished (whatever its outcome): tasks may start.
    pub fn set_up_done(&mut self) {
        self.setting_up = self.setting_up.saturating_sub(1);
        self.schedule();
    }

    pub fn spill_done(&mut self, results: Vec<(Key, bool)>, start: f64, stop: f64) {
        let written = results.iter().filter(|(_, ok)| *ok).count() as u32;
        for (key, ok) in results {
            self.mem.spill_done(&key, ok);
        }
        if written > 0 {
            self.send(FromWorker::Spilled { keys: written, start, stop });
        }
        self.schedule();
    }

    /// Number of keys in the store.
    pub fn nkeys(&self) -> usize {
        self.data.len()
    }

    /// Tasks running now.
    pub fn executing(&self) -> usize {
        self.executing.min(self.nthreads)
    }

    /// Whether tasks are running or ready to run: more results will follow
    /// shortly without anything from the scheduler.
    pub fn busy(&self) -> bool {
        self.executing > 0 || !self.ready.is_empty() || !self.constrained.is_empty()
    }

    /// Tasks ready to run and waiting for a thread.
    pub fn nready(&self) -> usize {
        self.tasks.values().filter(|t| t.state == WState::Ready).count()
    }

    fn send(&mut self, msg: FromWorker) {
        self.out.push(Instruction::Send(Envelope::new(msg)));
    }

    /// The scheduler assigned a task.
    pub fn compute_task(
        &mut self,
        key: Key,
        recipe: Recipe,
        deps: Vec<DepInfo>,
        priority: Priority,
        resources: Resources,
        now: f64,
    ) {
        if let Some(t) = self.tasks.get_mut(&key) {
            if t.state == WState::Cancelled {
                t.state = WState::Executing;
            }
            return;
        }
        if let Some(&nbytes) = self.data.get(&key) {
            self.send(FromWorker::TaskFinished(TaskFinished {
                key,
                nbytes,
                start: now,
                stop: now,
                thread: 0,
                transfer: 0.0,
            }));
            return;
        }
        let mut missing = 0;
        let mut by_worker: FxHashMap<String, Vec<Key>> = FxHashMap::default();
        for d in &deps {
            if self.data.contains_key(&d.key) {
                continue;
            }
            // A dependency listed twice is awaited once.
            if self.dep_waiters.entry(d.key.clone()).or_default().insert(key.clone()) {
                missing += 1;
            }
            self.plan_fetch(&d.key, &d.who_has, &mut by_worker);
        }
        let task = WTask {
            state: if missing == 0 { WState::Ready } else { WState::Waiting },
            recipe,
            deps: deps.into_iter().map(|d| d.key).collect(),
            priority,
            missing,
            fetch_started: if missing > 0 { Some(now) } else { None },
            transfer: 0.0,
            seceded: false,
            resources,
        };
        let ready = task.state == WState::Ready;
        self.tasks.insert(key.clone(), task);
        if ready {
            self.enqueue(priority, key);
        }
        self.push_fetches(by_worker);
        self.schedule();
    }

    /// Note where `key` can come from and, unless a fetch is in flight,
    /// add it to the batch for the first holder not tried yet.
    fn plan_fetch(&mut self, key: &Key, who_has: &[String], by_worker: &mut FxHashMap<String, Vec<Key>>) {
        let f = self.fetching.entry(key.clone()).or_insert_with(|| Fetching {
            holders: Vec::new(),
            tried: Vec::new(),
            in_flight: false,
        });
        for h in who_has {
            if !f.holders.contains(h) {
                f.holders.push(h.clone());
            }
        }
        if !f.in_flight {
            if let Some(h) = f.holders.iter().find(|h| !f.tried.contains(h)).cloned() {
                f.in_flight = true;
                by_worker.entry(h).or_default().push(key.clone());
            }
        }
    }

    /// One `Fetch` per peer, in a stable order.
    fn push_fetches(&mut self, by_worker: FxHashMap<String, Vec<Key>>) {
        let mut fetches: Vec<(String, Vec<Key>)> = by_worker.into_iter().collect();
        fetches.sort();
        for (worker, keys) in fetches {
            self.fetch(worker, keys);
        }
    }

    /// Fetch now, or once the worker resumes if it is paused (a paused worker
    /// takes in no more data).
    fn fetch(&mut self, worker: String, keys: Vec<Key>) {
        if self.mem.paused() {
            self.deferred_fetches.push((worker, keys));
        } else {
            self.out.push(Instruction::Fetch { worker, keys });
        }
    }

    /// Queue a ready task: with the others, or apart if it needs resources.
    fn enqueue(&mut self, priority: Priority, key: Key) {
        let constrained = self.tasks.get(&key).is_some_and(|t| !t.resources.is_empty());
        let heap = if constrained { &mut self.constrained } else { &mut self.ready };
        heap.push(Reverse((priority, key)));
    }

    fn resources_free(&self, need: &Resources) -> bool {
        need.iter().all(|(name, amount)| self.available.iter().any(|(n, have)| n == name && *have + 1e-9 >= *amount))
    }

    /// Take (`sign` -1) or give back (`sign` 1) a task's resources.
    fn move_resources(&mut self, need: &Resources, sign: f64) {
        for (name, amount) in need {
            if let Some((_, have)) = self.available.iter_mut().find(|(n, _)| n == name) {
                *have += sign * amount;
            }
        }
    }

    /// Priority of the first constrained task, if its resources are free
    /// (dropping entries for tasks no longer ready).
    fn next_constrained(&mut self) -> Option<Priority> {
        while let Some(Reverse((priority, key))) = self.constrained.peek() {
            match self.tasks.get(key) {
                Some(t) if t.state == WState::Ready => {
                    return self.resources_free(&t.resources).then_some(*priority);
                }
                _ => {
                    self.constrained.pop();
                }
            }
        }
        None
    }

    /// Hand ready tasks to the executor: one running and one queued per
    /// thread (16 per thread while tasks are short), so a thread starts its
    /// next task as soon as one ends instead of waiting for the runtime loop
    /// to hear of it. Tasks that need
    /// resources go in priority order with the rest once theirs are free.
    fn schedule(&mut self) {
        if self.mem.paused() || self.mem.throttled() || self.setting_up > 0 {
            return;
        }
        // Short tasks queue deeper, so a thread runs them back to back; a
        // task still queued here, not handed over, can be stolen.
        let per_thread = match self.recent_duration {
            Some(d) if d < SHORT_TASK => SHORT_PER_THREAD,
            _ => 2,
        };
        while self.executing < per_thread * self.nthreads {
            let constrained = self.next_constrained();
            let heap = match (constrained, self.ready.peek()) {
                (Some(c), Some(Reverse((r, _)))) if c > *r => &mut self.ready,
                (Some(_), _) => &mut self.constrained,
                (None, _) => &mut self.ready,
            };
            let Some(Reverse((_, key))) = heap.pop() else {
                return;
            };
            let Some(t) = self.tasks.get_mut(&key) else {
                continue;
            };
            if t.state != WState::Ready {
                continue;
            }
            t.state = WState::Executing;
            self.executing += 1;
            let instr = Instruction::Execute { key, recipe: t.recipe.clone(), deps: t.deps.clone() };
            let need = if t.resources.is_empty() { None } else { Some(t.resources.clone()) };
            for d in &t.deps {
                self.mem.touch(d);
            }
            if let Some(need) = need {
                self.move_resources(&need, -1.0);
            }
            self.out.push(instr);
        }
    }

    /// Keys arrived from a peer and are now in the store.
    pub fn fetch_done(&mut self, stored: Vec<(Key, u64)>, now: f64) {
        let mut added = Vec::with_capacity(stored.len());
        for (key, nbytes) in stored {
            self.fetching.remove(&key);
            self.hold(&key, nbytes);
            added.push((key.clone(), nbytes));
            if let Some(waiters) = self.dep_waiters.remove(&key) {
                for w in waiters {
                    if let Some(t) = self.tasks.get_mut(&w) {
                        if t.state == WState::Waiting {
                            t.missing = t.missing.saturating_sub(1);
                            if t.missing == 0 {
                                t.state = WState::Ready;
                                if let Some(s) = t.fetch_started {
                                    t.transfer = now - s;
                                }
                                let priority = t.priority;
                                self.enqueue(priority, w);
                            }
                        }
                    }
                }
            }
        }
        if !added.is_empty() {
            self.send(FromWorker::AddKeys { keys: added });
        }
        self.schedule();
    }

    /// A fetch from `worker` failed (or the peer lacked `keys`).
    pub fn fetch_failed(&mut self, worker: &str, keys: Vec<Key>) {
        let mut retry: FxHashMap<String, Vec<Key>> = FxHashMap::default();
        for key in keys {
            let Some(f) = self.fetching.get_mut(&key) else {
                continue;
            };
            f.in_flight = false;
            f.tried.push(worker.to_string());
            match f.holders.iter().find(|h| !f.tried.contains(h)).cloned() {
                Some(h) => {
                    f.in_flight = true;
                    retry.entry(h).or_default().push(key);
                }
                None => {
                    let f = self.fetching.remove(&key).expect("present");
                    self.send(FromWorker::MissingData { key, workers: f.tried });
                }
            }
        }
        for (worker, keys) in retry {
            self.fetch(worker, keys);
        }
    }

    /// A task finished running on an executor thread.
    pub fn execute_done(&mut self, key: Key, outcome: ExecOutcome, start: f64, stop: f64, thread: u32) {
        let Some(t) = self.tasks.remove(&key) else {
            // Unknown: assigned before a reset. Its result is not wanted.
            if matches!(outcome, ExecOutcome::Ok { .. }) && !self.data.contains_key(&key) {
                self.out.push(Instruction::Free { keys: vec![key] });
            }
            return;
        };
        if !t.seceded {
            self.executing = self.executing.saturating_sub(1);
        }
        if stop >= start {
            let d = stop - start;
            self.recent_duration = Some(self.recent_duration.map_or(d, |r| 0.8 * r + 0.2 * d));
        }
        self.move_resources(&t.resources, 1.0);
        match (t.state, outcome) {
            (WState::Cancelled, ExecOutcome::Ok { .. }) => {
                self.out.push(Instruction::Free { keys: vec![key] });
            }
            (WState::Cancelled, ExecOutcome::Err { .. }) => {}
            (_, ExecOutcome::Ok { nbytes }) => {
                self.hold(&key, nbytes);
                self.send(FromWorker::TaskFinished(TaskFinished {
                    key,
                    nbytes,
                    start,
                    stop,
                    thread,
                    transfer: t.transfer,
                }));
            }
            (_, ExecOutcome::Err { exception, traceback, text }) => {
                let mut frames = Vec::new();
                let exception = Blob::new(exception, &mut frames);
                let traceback = Blob::new(traceback, &mut frames);
                let msg = FromWorker::TaskErred(TaskErred { key, exception, traceback, text, start, stop, thread });
                self.out.push(Instruction::Send(Envelope { msg, frames }));
            }
        }
        self.schedule();
    }

    /// Forget every task and result (the scheduler was lost; a new one knows
    /// none of them). Returns the keys to drop from the store. Tasks still
    /// running finish into the void: their results are dropped as unknown.
    pub fn reset(&mut self) -> Vec<Key> {
        let keys: Vec<Key> = self.data.keys().cloned().collect();
        *self = WorkerState::with_memory(self.nthreads, self.mem_config.clone()).with_resources(self.resources.clone());
        keys
    }

    /// A running task left its thread to wait for tasks it launched: its
    /// thread no longer counts (the runtime starts another in its place) and
    /// the scheduler hears of it, so the launched tasks can run here.
    pub fn secede(&mut self, key: &str) {
        let Some(t) = self.tasks.get_mut(key) else { return };
        if t.seceded || !matches!(t.state, WState::Executing | WState::Cancelled) {
            return;
        }
        t.seceded = true;
        self.executing = self.executing.saturating_sub(1);
        self.send(FromWorker::TaskSeceded { key: key.to_string() });
        self.schedule();
    }

    /// A seceded task takes a thread again: it counts as executing until it
    /// ends, so no new task is handed out in its place meanwhile.
    pub fn rejoin(&mut self, key: &str) {
        let Some(t) = self.tasks.get_mut(key) else { return };
        if t.seceded {
            t.seceded = false;
            self.executing += 1;
        }
    }

    /// Forget a task that has not started, and its interest in dependencies.
    fn drop_unstarted(&mut self, key: &str) {
        let Some(t) = self.tasks.remove(key) else { return };
        for d in t.deps {
            if let Some(ws) = self.dep_waiters.get_mut(&d) {
                ws.remove(key);
                if ws.is_empty() {
                    self.dep_waiters.remove(&d);
                    if self.fetching.get(&d).is_some_and(|f| !f.in_flight) {
                        self.fetching.remove(&d);
                    }
                }
            }
        }
    }

    /// The scheduler wants to move `key` to another worker: give it up if
    /// it has not started (it will not run here), else keep it.
    pub fn steal_request(&mut self, key: Key) {
        let stolen = self.tasks.get(&key).is_some_and(|t| matches!(t.state, WState::Waiting | WState::Ready));
        if stolen {
            self.drop_unstarted(&key);
        }
        self.send(FromWorker::StealResponse { key, stolen });
    }

    /// The scheduler released keys: drop data and forget tasks.
    pub fn free_keys(&mut self, keys: Vec<Key>) {
        let mut drop = Vec::new();
        for key in keys {
            if let Some(t) = self.tasks.get_mut(&key) {
                match t.state {
                    WState::Executing => t.state = WState::Cancelled,
                    WState::Cancelled => {}
                    WState::Waiting | WState::Ready => self.drop_unstarted(&key),
                }
            }
            if let Some(n) = self.data.remove(&key) {
                self.managed = self.managed.saturating_sub(n);
                self.mem.remove(&key);
                drop.push(key);
            }
        }
        if !drop.is_empty() {
            self.out.push(Instruction::Free { keys: drop });
        }
    }

    /// Fetch copies of keys that no task here needs (data moving off a
    /// retiring worker); they are reported with `AddKeys` like dependencies.
    pub fn acquire_replicas(&mut self, keys: Vec<DepInfo>) {
        let mut by_worker: FxHashMap<String, Vec<Key>> = FxHashMap::default();
        for d in keys {
            if self.data.contains_key(&d.key) {
                self.send(FromWorker::AddKeys { keys: vec![(d.key, d.nbytes)] });
                continue;
            }
            self.plan_fetch(&d.key, &d.who_has, &mut by_worker);
        }
        self.push_fetches(by_worker);
    }

    /// A client put data here directly.
    pub fn data_put(&mut self, items: Vec<(Key, u64)>) {
        for (key, nbytes) in items {
            self.hold(&key, nbytes);
        }
    }
}

impl WorkerState {
    /// Check the bookkeeping's invariants; `Err` names the first one broken.
    /// Tests call it after every event.
    pub fn validate(&self) -> Result<(), String> {
        let held: u64 = self.data.values().sum();
        if held != self.managed {
            return Err(format!("managed is {} but the results held add up to {held}", self.managed));
        }
        let running = self
            .tasks
            .values()
            .filter(|t| matches!(t.state, WState::Executing | WState::Cancelled) && !t.seceded)
            .count();
        if running != self.executing {
            return Err(format!("executing is {} but {running} tasks hold a thread", self.executing));
        }
        for (key, t) in &self.tasks {
            let mut deps: Vec<&Key> = t.deps.iter().collect();
            deps.sort();
            deps.dedup();
            let waited: Vec<&Key> =
                deps.iter().copied().filter(|d| self.dep_waiters.get(*d).is_some_and(|w| w.contains(key))).collect();
            match t.state {
                WState::Waiting => {
                    if t.missing as usize != waited.len() || t.missing == 0 {
                        return Err(format!("{key} waits for {} dependencies, registered for {waited:?}", t.missing));
                    }
                    if let Some(d) = deps.iter().find(|d| !self.data.contains_key(**d) && !waited.contains(d)) {
                        return Err(format!("{key} is missing {d} but does not wait for it"));
                    }
                }
                _ if !waited.is_empty() => {
                    return Err(format!("{key} is {:?} but still waits for {waited:?}", t.state))
                }
                _ => {}
            }
        }
        for (d, waiters) in &self.dep_waiters {
            if waiters.is_empty() {
                return Err(format!("nobody waits for {d} but it is listed"));
            }
            if let Some(w) = waiters.iter().find(|w| !self.tasks.get(*w).is_some_and(|t| t.state == WState::Waiting)) {
                return Err(format!("{w} is listed as waiting for {d} but is not waiting"));
            }
        }
        for (name, declared) in &self.resources {
            let held: f64 = self
                .tasks
                .values()
                .filter(|t| matches!(t.state, WState::Executing | WState::Cancelled))
                .flat_map(|t| t.resources.iter().filter(|(n, _)| n == name).map(|(_, a)| *a))
                .sum();
            let free = self.available.iter().find(|(n, _)| n == name).map_or(0.0, |(_, a)| *a);
            if (free + held - declared).abs() > 1e-6 {
                return Err(format!("resource {name}: {free} free and {held} held of {declared}"));
            }
        }
        Ok(())
    }
}
