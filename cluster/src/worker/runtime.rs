//! The worker runtime: scheduler connection, data server for peers and
//! clients, executor threads, and the loop that feeds events to
//! [`WorkerState`] and carries out its instructions.
//!
//! What a task *is* and how data is stored and serialized belongs to the
//! [`Runner`]: the Python extension implements it with live Python objects,
//! the simulator with plain bytes.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use tokio::net::TcpListener;
use tokio::sync::{mpsc, watch};

use super::memory::{self, MemoryConfig};
use super::state::{ExecOutcome, Instruction, WorkerState};
use crate::comm::{self, CommError, ConnectionPool};
use crate::now;
use crate::protocol::{
    Blob, DataReply, DataRequest, Envelope, FromWorker, Heartbeat, Key, Registration, Resources, Role, ToWorker,
};

/// Owns a worker's data and runs its tasks. Methods are called from
/// blocking threads, never from the async runtime's threads.
pub trait Runner: Send + Sync + 'static {
    /// Run a task whose dependencies `deps` are in the store; on success the
    /// result is stored under `key`.
    fn execute(&self, key: &str, run_spec: &Bytes, deps: &[Key], thread: u32) -> ExecOutcome;
    /// Serialize stored values into frames; `None` for keys not held.
    fn serialize(&self, keys: &[Key]) -> Vec<(Key, Option<Vec<Bytes>>)>;
    /// Deserialize frames and store the value; returns its size in bytes.
    fn store(&self, key: &str, frames: Vec<Bytes>) -> Result<u64, String>;
    /// Drop values.
    fn free(&self, keys: &[Key]);
    /// A mark of the store's state now: [`free_older`](Self::free_older)
    /// with it spares values stored after this call.
    fn mark(&self) -> u64 {
        0
    }
    /// Drop values stored before `mark` (a free is carried out after other
    /// threads may have stored the same key again: those stay).
    fn free_older(&self, keys: &[Key], _mark: u64) {
        self.free(keys)
    }
    /// Write stored values to disk and drop them from memory; they stay
    /// readable (by `execute` and `serialize`) until freed. Returns for each
    /// key whether it was spilled. The default cannot spill.
    fn spill(&self, keys: &[Key]) -> Vec<(Key, bool)> {
        keys.iter().map(|k| (k.clone(), false)).collect()
    }
    /// Run a serialized function call in the worker process (`Client.run`):
    /// `Ok` with the serialized result, or `Err` with the serialized exception.
    fn run_function(&self, _call: Bytes) -> Result<Bytes, Bytes> {
        Err(Bytes::from_static(b"this worker cannot run functions"))
    }
    /// Run `body`, the whole life of one of the worker's threads that call
    /// the methods above, so per-thread context (a Python thread state) is
    /// set up once per thread rather than once per call.
    fn thread_main(&self, body: &mut (dyn FnMut() + Send)) {
        body()
    }
}

/// One thread that runs the runner's data-store work (free, serialize,
/// store) in order, off the async runtime.
#[derive(Clone)]
struct Helper {
    tx: std::sync::mpsc::Sender<Box<dyn FnOnce() + Send>>,
}

impl Helper {
    fn spawn<R: Runner>(runner: Arc<R>) -> std::io::Result<Helper> {
        let (tx, rx) = std::sync::mpsc::channel::<Box<dyn FnOnce() + Send>>();
        std::thread::Builder::new().name("dask-rs-store".into()).spawn(move || {
            let mut body = move || {
                while let Ok(job) = rx.recv() {
                    job();
                }
            };
            runner.thread_main(&mut body)
        })?;
        Ok(Helper { tx })
    }

    /// Queue `f` and do not wait for it.
    fn submit(&self, f: impl FnOnce() + Send + 'static) {
        let _ = self.tx.send(Box::new(f));
    }

    /// Run `f` on the helper thread and wait for its result (None if the
    /// helper is gone).
    async fn run<T: Send + 'static>(&self, f: impl FnOnce() -> T + Send + 'static) -> Option<T> {
        let (tx, rx) = tokio::sync::oneshot::channel();
        self.submit(move || {
            let _ = tx.send(f());
        });
        rx.await.ok()
    }
}

/// How to start a worker.
#[derive(Debug, Clone)]
pub struct WorkerConfig {
    /// Scheduler address, `tcp://host:port`.
    pub scheduler: String,
    pub name: String,
    pub nthreads: usize,
    pub memory_limit: u64,
    /// Interface the data server listens on.
    pub host: String,
    pub heartbeat: Duration,
    pub connect_timeout: Duration,
    /// After losing the scheduler, how long to keep trying to reconnect
    /// before closing (Dask's `--death-timeout`); zero closes at once.
    pub death_timeout: Duration,
    /// Resources offered to tasks that ask for them (`--resources`).
    pub resources: Resources,
}

impl WorkerConfig {
    /// Defaults for a worker of `nthreads` threads joining `scheduler`.
    pub fn new(scheduler: &str, name: &str, nthreads: usize) -> Self {
        WorkerConfig {
            scheduler: scheduler.to_string(),
            name: name.to_string(),
            nthreads,
            memory_limit: 0,
            host: "127.0.0.1".into(),
            heartbeat: Duration::from_millis(500),
            connect_timeout: Duration::from_secs(10),
            death_timeout: Duration::from_secs(60),
            resources: Vec::new(),
        }
    }
}

/// Why a worker stopped.
#[derive(Debug, thiserror::Error)]
pub enum WorkerError {
    #[error("cannot reach the scheduler at {addr}: {source}")]
    Connect { addr: String, source: CommError },
    #[error("the scheduler refused this worker: {0}")]
    Refused(String),
    #[error("lost the connection to the scheduler: {0}")]
    SchedulerLost(String),
    #[error("closing to free memory: {0}")]
    Memory(String),
    #[error("restart requested by the scheduler")]
    Restart,
    #[error("i/o error: {0}")]
    Io(#[from] std::io::Error),
}

enum Event {
    FromScheduler(Vec<Envelope<ToWorker>>),
    SchedulerClosed(Option<CommError>),
    Executed {
        key: Key,
        outcome: ExecOutcome,
        start: f64,
        stop: f64,
        thread: u32,
    },
    Fetched {
        worker: String,
        stored: Vec<(Key, u64)>,
        failed: Vec<Key>,
    },
    DataPut(Vec<(Key, u64)>),
    Seceded(Key),
    /// A seceded task asks for a place in the pool; the sender hears the
    /// number of the thread that gave its place up.
    Rejoined(Key, std::sync::mpsc::SyncSender<u32>),
    Spilled(Vec<(Key, bool)>),
}

enum Job {
    /// Run a task.
    Task { key: Key, run_spec: Bytes, deps: Vec<Key> },
    /// Leave the pool, handing this thread's place (and number) to a
    /// seceded task that rejoins.
    Yield(std::sync::mpsc::SyncSender<u32>),
}

/// The executor threads: each takes one job at a time from the shared queue.
struct Executors<R: Runner> {
    jobs: Mutex<std::sync::mpsc::Receiver<Job>>,
    events: mpsc::UnboundedSender<Event>,
    runner: Arc<R>,
}

impl<R: Runner> Executors<R> {
    fn spawn(self: &Arc<Self>, thread: u32) -> std::io::Result<()> {
        let me = self.clone();
        std::thread::Builder::new().name(format!("dask-rs-exec-{thread}")).spawn(move || {
            let runner = me.runner.clone();
            runner.thread_main(&mut || me.run(thread))
        })?;
        Ok(())
    }

    fn run(self: &Arc<Self>, mut thread: u32) {
        // The secede/rejoin hooks are made once per thread; a task only sets its key.
        let me = self.clone();
        let on_secede: SecedeHook = Arc::new(move |key: &Key, replace: Option<u32>| {
            // Another thread takes this one's place; this one leaves the
            // pool with its task unless the task rejoins.
            if let Some(number) = replace {
                if let Err(e) = me.spawn(number) {
                    tracing::error!("cannot start an executor thread in place of a seceded task: {e}");
                }
            }
            let _ = me.events.send(Event::Seceded(key.clone()));
        });
        let events = self.events.clone();
        let on_rejoin: RejoinHook = Arc::new(move |key: &Key| {
            // Wait for a pool thread to give its place up (at once when one
            // is idle, else when one finishes its task), as Dask's rejoin.
            let (tx, rx) = std::sync::mpsc::sync_channel(1);
            if events.send(Event::Rejoined(key.clone(), tx)).is_err() {
                return None;
            }
            rx.recv().ok()
        });
        loop {
            let job = match self.jobs.lock().expect("job queue").recv() {
                Ok(j) => j,
                Err(_) => return,
            };
            let (key, run_spec, deps) = match job {
                Job::Task { key, run_spec, deps } => (key, run_spec, deps),
                Job::Yield(to) => {
                    let _ = to.send(thread);
                    return;
                }
            };
            let ctx = TaskContext {
                key: key.clone(),
                thread,
                replaced: false,
                detached: false,
                on_secede: on_secede.clone(),
                on_rejoin: on_rejoin.clone(),
            };
            TASK.with(|t| *t.borrow_mut() = Some(ctx));
            let start = now();
            let outcome = self.runner.execute(&key, &run_spec, &deps, thread);
            let stop = now();
            let ctx = TASK.with(|t| t.borrow_mut().take());
            let seceded = ctx.as_ref().is_some_and(|c| c.replaced);
            let done = Event::Executed { key, outcome, start, stop, thread };
            if self.events.send(done).is_err() || seceded {
                return;
            }
            // A task that rejoined took another thread's place and number.
            if let Some(c) = ctx {
                thread = c.thread;
            }
        }
    }
}

/// Called when a task secedes, with the number for the thread to start in
/// its place (none when it already left the pool once and rejoined not).
type SecedeHook = Arc<dyn Fn(&Key, Option<u32>) + Send + Sync>;
/// Called when a seceded task rejoins; blocks until a pool thread gives its
/// place up and returns that thread's number (none when the worker is closing).
type RejoinHook = Arc<dyn Fn(&Key) -> Option<u32> + Send + Sync>;

/// The task running on this executor thread.
struct TaskContext {
    key: Key,
    /// The number this thread shows in the task stream.
    thread: u32,
    /// Another thread was started in this one's place: this one ends with
    /// the task (unless it rejoins and takes a pool thread's place).
    replaced: bool,
    /// Seceded and not rejoined: the task does not count as running.
    detached: bool,
    on_secede: SecedeHook,
    on_rejoin: RejoinHook,
}

thread_local! {
    static TASK: std::cell::RefCell<Option<TaskContext>> = const { std::cell::RefCell::new(None) };
}

/// Leave the worker's thread pool for the rest of the calling task (Dask's
/// `secede`): another thread starts in its place and the scheduler stops
/// counting the task against the worker, so tasks it launches and waits for
/// can run. Returns false when not called from a task.
pub fn secede() -> bool {
    let ctx = TASK.with(|t| {
        let mut t = t.borrow_mut();
        let c = t.as_mut()?;
        if c.detached {
            return Some(None);
        }
        c.detached = true;
        let replace = (!std::mem::replace(&mut c.replaced, true)).then_some(c.thread);
        Some(Some((c.key.clone(), replace, c.on_secede.clone())))
    });
    match ctx {
        Some(Some((key, replace, f))) => {
            f(&key, replace);
            true
        }
        Some(None) => true,
        None => false,
    }
}

/// Take a place in the worker's thread pool again after [`secede`] (Dask's
/// `rejoin`): blocks until a pool thread is free, which then leaves the pool,
/// so the worker never runs more tasks at once than it has threads. The
/// task counts as running from the call on. Returns false when not called
/// from a task.
pub fn rejoin() -> bool {
    let ctx = TASK.with(|t| {
        let mut t = t.borrow_mut();
        let c = t.as_mut()?;
        Some(std::mem::replace(&mut c.detached, false).then(|| (c.key.clone(), c.on_rejoin.clone())))
    });
    match ctx {
        Some(Some((key, f))) => {
            // Not under the borrow: the hook blocks.
            if let Some(number) = f(&key) {
                TASK.with(|t| {
                    if let Some(c) = t.borrow_mut().as_mut() {
                        c.replaced = false;
                        c.thread = number;
                    }
                });
            }
            true
        }
        Some(None) => true,
        None => false,
    }
}

#[derive(Default)]
struct Traffic {
    bytes_in: AtomicU64,
    bytes_out: AtomicU64,
}

/// Resident set size of this process in bytes (0 where unknown).
pub fn process_rss() -> u64 {
    std::fs::read_to_string("/proc/self/statm")
        .ok()
        .and_then(|s| s.split_whitespace().nth(1).and_then(|v| v.parse::<u64>().ok()))
        .map(|pages| pages * 4096)
        .unwrap_or(0)
}

/// Run a worker until the scheduler closes it, the connection is lost for
/// longer than `death_timeout`, or `shutdown` turns true. Returns the
/// worker's address through `started` once it has registered.
///
/// When the connection to the scheduler drops, the worker forgets every
/// task and result (a restarted scheduler knows none of them) and connects
/// again to the same address, registering under the same name.
pub async fn run_worker<R: Runner>(
    config: WorkerConfig,
    runner: Arc<R>,
    mut shutdown: watch::Receiver<bool>,
    started: Option<tokio::sync::oneshot::Sender<String>>,
) -> Result<(), WorkerError> {
    let listener = TcpListener::bind((config.host.as_str(), 0)).await?;
    let local = listener.local_addr()?;
    let address = format!("tcp://{}:{}", local.ip(), local.port());

    let (events_tx, mut events) = mpsc::unbounded_channel::<Event>();
    // Executor threads: each takes one job at a time.
    let (job_tx, job_rx) = std::sync::mpsc::channel::<Job>();
    let pool = Arc::new(Executors { jobs: Mutex::new(job_rx), events: events_tx.clone(), runner: runner.clone() });
    for thread in 0..config.nthreads.max(1) {
        pool.spawn(thread as u32)?;
    }
    let helper = Helper::spawn(runner.clone())?;
    let traffic = Arc::new(Traffic::default());
    spawn_data_server(listener, address.clone(), runner.clone(), helper.clone(), events_tx.clone(), traffic.clone());
    let peers = Arc::new(ConnectionPool::new(Role::Peer, &config.name, config.connect_timeout));

    let mut started = started;
    let mem_config = MemoryConfig::new(config.memory_limit);
    let spill_at = mem_config.spill_bytes();
    // Tune the allocator for giving memory back once memory gets scarce.
    let mut tune_allocator_at = mem_config.target_bytes();
    let mut last_trim = tokio::time::Instant::now();
    let mut state = WorkerState::with_memory(config.nthreads, mem_config).with_resources(config.resources.clone());
    let mut memory_tick = tokio::time::interval(Duration::from_millis(100));
    memory_tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
    let mut first = true;
    let result = 'sessions: loop {
        let conn = if first {
            comm::connect(&config.scheduler, Role::Worker, &config.name, config.connect_timeout).await
        } else {
            tracing::warn!(
                "lost the scheduler at {}; reconnecting for up to {:?}",
                config.scheduler,
                config.death_timeout
            );
            let patience = config.death_timeout;
            tokio::select! {
                _ = shutdown.changed() => break 'sessions Ok(()),
                c = comm::connect_retrying(&config.scheduler, Role::Worker, &config.name, patience) => c,
            }
        };
        let conn = match conn {
            Ok(c) => c,
            Err(e) if first => break Err(WorkerError::Connect { addr: config.scheduler.clone(), source: e }),
            Err(e) => break Err(WorkerError::SchedulerLost(format!("could not reconnect: {e}"))),
        };
        first = false;
        let comm::Connection { mut reader, writer, .. } = conn;
        let (outbox, _writer) = comm::spawn_writer(writer);
        let _ = outbox.send(Envelope::new(FromWorker::RegisterWorker(Registration {
            name: config.name.clone(),
            address: address.clone(),
            nthreads: config.nthreads as u32,
            memory_limit: config.memory_limit,
            pid: std::process::id(),
            resources: config.resources.clone(),
        })));
        {
            let tx = events_tx.clone();
            tokio::spawn(async move {
                loop {
                    match reader.read_batch().await {
                        Ok(b) => {
                            if tx.send(Event::FromScheduler(b)).is_err() {
                                return;
                            }
                        }
                        Err(CommError::Closed) => {
                            let _ = tx.send(Event::SchedulerClosed(None));
                            return;
                        }
                        Err(e) => {
                            let _ = tx.send(Event::SchedulerClosed(Some(e)));
                            return;
                        }
                    }
                }
            });
        }
        let mut heartbeat = tokio::time::interval(config.heartbeat);
        heartbeat.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
        let mut registered = false;
        let mut held = Held::default();
        let outcome = loop {
            tokio::select! {
                _ = shutdown.changed() => break Some(Ok(())),
                _ = heartbeat.tick() => {
                    let _ = outbox.send(Envelope::new(FromWorker::Heartbeat(Heartbeat {
                        rss: process_rss(),
                        spilled: state.spilled(),
                        executing: state.executing() as u32,
                        ready: state.nready() as u32,
                        bytes_in: traffic.bytes_in.load(Ordering::Relaxed) + peers.bytes_in.load(Ordering::Relaxed),
                        bytes_out: traffic.bytes_out.load(Ordering::Relaxed) + peers.bytes_out.load(Ordering::Relaxed),
                    })));
                    if !registered {
                        // The scheduler answers a bad registration with an error
                        // at once; no error by the first heartbeat means we are in.
                        registered = true;
                        if let Some(s) = started.take() {
                            let _ = s.send(address.clone());
                        }
                    }
                }
                _ = memory_tick.tick(), if config.memory_limit > 0 => {
                    let mut rss = process_rss();
                    if tune_allocator_at.is_some_and(|t| rss > t) {
                        memory::configure_allocator();
                        tune_allocator_at = None;
                    }
                    if spill_at.is_some_and(|s| rss > s) && last_trim.elapsed() > Duration::from_millis(500) {
                        // Freed buffers may still sit in the heap: give them back first.
                        memory::trim_heap();
                        last_trim = tokio::time::Instant::now();
                        rss = process_rss();
                    }
                    if let Some(why) = state.memory_tick(rss, now()) {
                        tracing::error!("{why}; closing");
                        break Some(Err(WorkerError::Memory(why)));
                    }
                    for ins in state.take_instructions() {
                        match ins {
                            Instruction::Send(env) => {
                                held.flush(&outbox);
                                let _ = outbox.send(env);
                            }
                            ins => carry_out(ins, &job_tx, &runner, &helper, &peers, &events_tx),
                        }
                    }
                }
                _ = tokio::time::sleep_until(held.deadline()), if held.is_holding() => held.flush(&outbox),
                ev = events.recv() => {
                    let Some(ev) = ev else { break Some(Ok(())) };
                    let mut stop = None;
                    apply(&mut state, ev, &mut stop, &job_tx);
                    while let Ok(ev) = events.try_recv() {
                        apply(&mut state, ev, &mut stop, &job_tx);
                    }
                    for ins in state.take_instructions() {
                        match ins {
                            Instruction::Send(env) if is_result(&env.msg) => held.push(env),
                            Instruction::Send(env) => {
                                held.flush(&outbox);
                                let _ = outbox.send(env);
                            }
                            ins => carry_out(ins, &job_tx, &runner, &helper, &peers, &events_tx),
                        }
                    }
                    if !state.busy() || held.full() {
                        held.flush(&outbox);
                    }
                    if let Some(r) = stop {
                        held.flush(&outbox);
                        break Some(r);
                    }
                }
            }
        };
        match outcome {
            Some(Err(WorkerError::SchedulerLost(why))) if registered && !config.death_timeout.is_zero() => {
                tracing::warn!("connection to the scheduler lost: {why}");
                // A restarted scheduler knows none of this worker's tasks or data.
                let keys = state.reset();
                if !keys.is_empty() {
                    let r = runner.clone();
                    helper.submit(move || r.free(&keys));
                }
                continue 'sessions;
            }
            Some(r) => break r,
            None => break Ok(()),
        }
    };
    drop(job_tx);
    result
}

fn apply(
    state: &mut WorkerState,
    ev: Event,
    stop: &mut Option<Result<(), WorkerError>>,
    jobs: &std::sync::mpsc::Sender<Job>,
) {
    match ev {
        Event::FromScheduler(batch) => {
            for env in batch {
                let Envelope { msg, frames } = env;
                match msg {
                    ToWorker::ComputeTask { key, run_spec, deps, priority, resources } => {
                        let spec = run_spec.resolve(&frames).unwrap_or_default();
                        state.compute_task(key, spec, deps, priority, resources, now());
                    }
                    ToWorker::FreeKeys { keys } => state.free_keys(keys),
                    ToWorker::StealRequest { key } => state.steal_request(key),
                    ToWorker::AcquireReplicas { keys } => state.acquire_replicas(keys),
                    ToWorker::CloseWorker { reason } => {
                        tracing::info!("scheduler closed this worker: {reason}");
                        *stop = Some(Ok(()));
                    }
                    ToWorker::RestartWorker => *stop = Some(Err(WorkerError::Restart)),
                    ToWorker::Error { reason } => *stop = Some(Err(WorkerError::Refused(reason))),
                }
            }
        }
        Event::SchedulerClosed(err) => {
            if stop.is_none() {
                let why = err.map(|e| e.to_string()).unwrap_or_else(|| "connection closed".into());
                *stop = Some(Err(WorkerError::SchedulerLost(why)));
            }
        }
        Event::Executed { key, outcome, start, stop: end, thread } => {
            state.execute_done(key, outcome, start, end, thread)
        }
        Event::Fetched { worker, stored, failed } => {
            if !stored.is_empty() {
                state.fetch_done(stored, now());
            }
            if !failed.is_empty() {
                state.fetch_failed(&worker, failed);
            }
        }
        Event::DataPut(items) => state.data_put(items),
        Event::Seceded(key) => state.secede(&key),
        Event::Spilled(results) => state.spill_done(results),
        Event::Rejoined(key, waiter) => {
            state.rejoin(&key);
            let _ = jobs.send(Job::Yield(waiter));
        }
    }
}

/// Results held back while this worker is busy, so that a stream of short
/// tasks reports to the scheduler in batches instead of one message (and
/// one wake-up on each side) per task. Sent at once when the worker has
/// nothing left to run, so an idle worker never sits on a result.
#[derive(Default)]
struct Held {
    msgs: Vec<Envelope<FromWorker>>,
    since: Option<tokio::time::Instant>,
}

/// Most results held at once.
const HOLD_MAX: usize = 16;
/// Longest a result is held.
const HOLD_FOR: Duration = Duration::from_micros(1000);

fn is_result(msg: &FromWorker) -> bool {
    matches!(msg, FromWorker::TaskFinished(_) | FromWorker::TaskErred(_))
}

impl Held {
    fn push(&mut self, env: Envelope<FromWorker>) {
        self.since.get_or_insert_with(tokio::time::Instant::now);
        self.msgs.push(env);
    }

    fn is_holding(&self) -> bool {
        !self.msgs.is_empty()
    }

    fn full(&self) -> bool {
        self.msgs.len() >= HOLD_MAX
    }

    fn deadline(&self) -> tokio::time::Instant {
        self.since.map_or_else(tokio::time::Instant::now, |t| t + HOLD_FOR)
    }

    fn flush(&mut self, outbox: &comm::Outbox<FromWorker>) {
        self.since = None;
        for env in self.msgs.drain(..) {
            let _ = outbox.send(env);
        }
    }
}

static REQUEST_ID: AtomicU64 = AtomicU64::new(1);

fn carry_out<R: Runner>(
    ins: Instruction,
    jobs: &std::sync::mpsc::Sender<Job>,
    runner: &Arc<R>,
    helper: &Helper,
    pool: &Arc<ConnectionPool>,
    events: &mpsc::UnboundedSender<Event>,
) {
    match ins {
        Instruction::Send(_) => unreachable!("sent by the runtime loop"),
        Instruction::Execute { key, run_spec, deps } => {
            let _ = jobs.send(Job::Task { key, run_spec, deps });
        }
        Instruction::Free { keys } => {
            // Executor threads store results without the helper: a result
            // computed again after this free was issued must survive it.
            let mark = runner.mark();
            let runner = runner.clone();
            helper.submit(move || runner.free_older(&keys, mark));
        }
        Instruction::Spill { keys } => {
            let runner = runner.clone();
            let events = events.clone();
            helper.submit(move || {
                let _ = events.send(Event::Spilled(runner.spill(&keys)));
            });
        }
        Instruction::Fetch { worker, keys } => {
            let runner = runner.clone();
            let helper = helper.clone();
            let pool = pool.clone();
            let events = events.clone();
            tokio::spawn(async move {
                let id = REQUEST_ID.fetch_add(1, Ordering::Relaxed);
                let reply = pool.request(&worker, Envelope::new(DataRequest::GetData { id, keys: keys.clone() })).await;
                let (stored, failed) = match reply {
                    Ok(Envelope { msg: DataReply::Data { items, missing, .. }, frames }) => {
                        match helper.run(move || store_items(&*runner, items, frames)).await {
                            Some((stored, mut failed)) => {
                                failed.extend(missing);
                                (stored, failed)
                            }
                            None => (Vec::new(), keys),
                        }
                    }
                    Ok(other) => {
                        tracing::warn!("unexpected reply from {worker}: {:?}", other.msg);
                        (Vec::new(), keys)
                    }
                    Err(e) => {
                        tracing::warn!("fetch from {worker} failed: {e}");
                        pool.forget(&worker);
                        (Vec::new(), keys)
                    }
                };
                let _ = events.send(Event::Fetched { worker, stored, failed });
            });
        }
    }
}

/// Deserialize and store received items; returns stored sizes and failures.
fn store_items<R: Runner + ?Sized>(
    runner: &R,
    items: Vec<(Key, Vec<Blob>)>,
    mut frames: Vec<Bytes>,
) -> (Vec<(Key, u64)>, Vec<Key>) {
    let mut stored = Vec::with_capacity(items.len());
    let mut failed = Vec::new();
    for (key, blobs) in items {
        let parts: Option<Vec<Bytes>> = blobs.iter().map(|b| b.take(&mut frames)).collect();
        match parts.ok_or_else(|| "missing frame".to_string()).and_then(|p| runner.store(&key, p)) {
            Ok(n) => stored.push((key, n)),
            Err(e) => {
                tracing::warn!("could not store {key}: {e}");
                failed.push(key);
            }
        }
    }
    (stored, failed)
}

/// Serve `GetData` and `PutData` to peers and clients.
fn spawn_data_server<R: Runner>(
    listener: TcpListener,
    address: String,
    runner: Arc<R>,
    helper: Helper,
    events: mpsc::UnboundedSender<Event>,
    traffic: Arc<Traffic>,
) {
    tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                continue;
            };
            let runner = runner.clone();
            let helper = helper.clone();
            let events = events.clone();
            let address = address.clone();
            let traffic = traffic.clone();
            tokio::spawn(async move {
                let wrong_role = |_| format!("{address} is a dask-rs worker's data port, not a scheduler");
                let conn = match comm::accept(stream, &address, &[Role::Peer, Role::Client], wrong_role).await {
                    Ok((c, _)) => c,
                    Err(e) => {
                        tracing::debug!("data connection rejected: {e}");
                        return;
                    }
                };
                let comm::Connection { mut reader, mut writer, .. } = conn;
                let mut last_in = 0;
                while let Ok(batch) = reader.read_batch::<DataRequest>().await {
                    traffic.bytes_in.fetch_add(reader.bytes_read - last_in, Ordering::Relaxed);
                    last_in = reader.bytes_read;
                    for env in batch {
                        let reply = serve(&runner, &helper, env, &events).await;
                        let before = writer.bytes_written;
                        if writer.write_batch(std::slice::from_ref(&reply)).await.is_err() {
                            return;
                        }
                        traffic.bytes_out.fetch_add(writer.bytes_written - before, Ordering::Relaxed);
                    }
                }
            });
        }
    });
}

async fn serve<R: Runner>(
    runner: &Arc<R>,
    helper: &Helper,
    env: Envelope<DataRequest>,
    events: &mpsc::UnboundedSender<Event>,
) -> Envelope<DataReply> {
    let Envelope { msg, frames } = env;
    match msg {
        DataRequest::GetData { id, keys } => {
            let r = runner.clone();
            let values = helper.run(move || r.serialize(&keys)).await.unwrap_or_default();
            let mut out_frames = Vec::new();
            let mut items = Vec::with_capacity(values.len());
            let mut missing = Vec::new();
            for (key, v) in values {
                match v {
                    Some(parts) => {
                        let blobs = parts.into_iter().map(|p| Blob::new(p, &mut out_frames)).collect();
                        items.push((key, blobs));
                    }
                    None => missing.push(key),
                }
            }
            Envelope { msg: DataReply::Data { id, items, missing }, frames: out_frames }
        }
        DataRequest::PutData { id, items } => {
            let r = runner.clone();
            let (stored, failed) = helper.run(move || store_items(&*r, items, frames)).await.unwrap_or_default();
            if !failed.is_empty() {
                return Envelope::new(DataReply::Error { reason: format!("could not store keys {failed:?}") });
            }
            let nbytes = stored.iter().map(|(_, n)| *n).collect();
            let _ = events.send(Event::DataPut(stored));
            Envelope::new(DataReply::PutDataOk { id, nbytes })
        }
        DataRequest::RunFunction { id, function } => {
            let Some(call) = function.resolve(&frames) else {
                return Envelope::new(DataReply::Error { reason: "function refers to a missing frame".into() });
            };
            let r = runner.clone();
            let outcome = tokio::task::spawn_blocking(move || r.run_function(call))
                .await
                .unwrap_or_else(|e| Err(Bytes::from(format!("the function panicked: {e}"))));
            let mut out_frames = Vec::new();
            let result = match outcome {
                Ok(b) => Ok(Blob::new(b, &mut out_frames)),
                Err(b) => Err(Blob::new(b, &mut out_frames)),
            };
            Envelope { msg: DataReply::RunResult { id, result }, frames: out_frames }
        }
    }
}
