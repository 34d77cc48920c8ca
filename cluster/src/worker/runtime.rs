//! The worker runtime: the connection to the scheduler (and reconnecting),
//! and the loop that feeds events to [`WorkerState`] and carries out its
//! instructions. The executor threads live in `executors`, the data port in
//! `data_server`; what a task *is* belongs to the [`Runner`].

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use rustc_hash::FxHashMap;
use tokio::net::TcpListener;
use tokio::sync::{mpsc, watch};

use super::data_server::{spawn_data_server, store_items, Traffic};
use super::executors::{Executors, Job};
use super::memory::{self, MemoryConfig};
use super::runner::{Helper, Runner};
use super::state::{ExecOutcome, Instruction, Recipe, WorkerState};
use crate::comm::{self, CommError, ConnectionPool};
use crate::now;
use crate::protocol::{
    DataReply, DataRequest, Envelope, FromWorker, Heartbeat, Key, Registration, Resources, Role, ToWorker,
};
use crate::security::Security;

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
    /// The cluster's credential, proved to the scheduler and to peers and
    /// demanded from whoever connects to the data port.
    pub security: Security,
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
            heartbeat: Duration::from_millis(crate::protocol::DEFAULT_HEARTBEAT_MS),
            connect_timeout: Duration::from_secs(10),
            death_timeout: Duration::from_secs(60),
            resources: Vec::new(),
            security: Security::default(),
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

/// Results an executor thread held back this long are collected by the
/// runtime loop (it looks this often while tasks run).
const HELD_RESULTS_AGE: Duration = Duration::from_millis(5);

/// What the runtime loop hears: from the scheduler, the executor threads,
/// the data port and the helper thread.
pub(super) enum Event {
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
    /// The store's spill results, and when it started and stopped.
    Spilled(Vec<(Key, bool)>, f64, f64),
    /// The set-up calls of an `Instruction::SetUp` ran.
    SetUpDone,
}

/// Resident set size of this process in bytes (0 where unknown).
pub fn process_rss() -> u64 {
    std::fs::read_to_string("/proc/self/statm")
        .ok()
        .and_then(|s| s.split_whitespace().nth(1).and_then(|v| v.parse::<u64>().ok()))
        .map(|pages| pages * 4096)
        .unwrap_or(0)
}

/// CPU seconds this process used so far (user and system; 0 where unknown).
pub fn process_cpu_seconds() -> f64 {
    let Ok(stat) = std::fs::read_to_string("/proc/self/stat") else { return 0.0 };
    // Fields after the command name (which may hold spaces) in parentheses.
    let fields: Vec<&str> = stat.rsplit_once(')').map(|(_, r)| r.split_whitespace().collect()).unwrap_or_default();
    let ticks = |i: usize| fields.get(i).and_then(|v| v.parse::<f64>().ok()).unwrap_or(0.0);
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as f64;
    (ticks(11) + ticks(12)) / hz
}

/// Run a worker until the scheduler closes it, the connection is lost for
/// longer than `death_timeout`, or `shutdown` turns true. Returns the
/// reason it stopped. `started` hears the worker's data address once the
/// scheduler accepted it.
///
/// When the connection to the scheduler drops, the worker forgets every
/// task and result (a restarted scheduler knows none of them) and connects
/// again to the same address, registering under the same name.
pub async fn run_worker<R: Runner>(
    config: WorkerConfig,
    runner: Arc<R>,
    shutdown: watch::Receiver<bool>,
    started: Option<tokio::sync::oneshot::Sender<String>>,
) -> Result<(), WorkerError> {
    let listener = TcpListener::bind((config.host.as_str(), 0)).await?;
    let local = listener.local_addr()?;
    let address = format!("{}://{}:{}", config.security.scheme(), local.ip(), local.port());

    let (events_tx, events) = mpsc::unbounded_channel::<Event>();
    // Executor threads: each takes one job at a time.
    let (jobs, job_rx) = std::sync::mpsc::channel::<Job>();
    let pool = Arc::new(Executors::new(job_rx, events_tx.clone(), runner.clone()));
    for thread in 0..config.nthreads.max(1) {
        pool.spawn(thread as u32)?;
    }
    let helper = Helper::spawn(runner.clone())?;
    let traffic = Arc::new(Traffic::default());
    spawn_data_server(
        listener,
        address.clone(),
        runner.clone(),
        helper.clone(),
        events_tx.clone(),
        traffic.clone(),
        config.security.clone(),
    );
    let mem_config = MemoryConfig::new(config.memory_limit);
    let mut worker = Worker {
        peers: Arc::new(ConnectionPool::new(Role::Peer, &config.name, config.connect_timeout, config.security.clone())),
        spill_at: mem_config.spill_bytes(),
        // Tune the allocator for giving memory back once memory gets scarce.
        tune_allocator_at: mem_config.target_bytes(),
        last_trim: tokio::time::Instant::now(),
        cpu_mark: (std::time::Instant::now(), process_cpu_seconds()),
        state: WorkerState::with_memory(config.nthreads, mem_config).with_resources(config.resources.clone()),
        shared: FxHashMap::default(),
        executors: pool,
        config,
        runner,
        address,
        events,
        events_tx,
        jobs,
        helper,
        traffic,
        shutdown,
        started,
    };
    worker.run().await
}

/// Everything a running worker owns, across connections to the scheduler.
struct Worker<R: Runner> {
    config: WorkerConfig,
    runner: Arc<R>,
    /// This worker's data address.
    address: String,
    state: WorkerState,
    /// Shared blobs (functions) tasks refer to by id, as the scheduler sent them.
    shared: FxHashMap<u64, Bytes>,
    executors: Arc<Executors<R>>,
    events: mpsc::UnboundedReceiver<Event>,
    events_tx: mpsc::UnboundedSender<Event>,
    jobs: std::sync::mpsc::Sender<Job>,
    helper: Helper,
    /// Connections to other workers' data ports.
    peers: Arc<ConnectionPool>,
    traffic: Arc<Traffic>,
    shutdown: watch::Receiver<bool>,
    started: Option<tokio::sync::oneshot::Sender<String>>,
    spill_at: Option<u64>,
    tune_allocator_at: Option<u64>,
    last_trim: tokio::time::Instant,
    /// When and at what process CPU time the last heartbeat measured.
    cpu_mark: (std::time::Instant, f64),
}

/// How one connection to the scheduler ended.
enum SessionEnd {
    /// The worker stops, for this reason.
    Stop(Result<(), WorkerError>),
    /// The connection broke after registration: connect again.
    Reconnect(String),
}

impl<R: Runner> Worker<R> {
    /// Connect, serve, and reconnect after a lost connection while
    /// `death_timeout` allows.
    async fn run(&mut self) -> Result<(), WorkerError> {
        let config = self.config.clone();
        let mut conn =
            comm::connect(&config.scheduler, Role::Worker, &config.name, config.connect_timeout, &config.security)
                .await
                .map_err(|e| WorkerError::Connect { addr: config.scheduler.clone(), source: e })?;
        loop {
            match self.session(conn).await {
                SessionEnd::Stop(r) => return r,
                SessionEnd::Reconnect(why) => {
                    tracing::warn!("connection to the scheduler lost: {why}");
                    // A restarted scheduler knows none of this worker's tasks or data.
                    let keys = self.state.reset();
                    // It sends shared blobs again to the new connection.
                    self.shared.clear();
                    if !keys.is_empty() {
                        let r = self.runner.clone();
                        self.helper.submit(move || r.free(&keys));
                    }
                }
            }
            tracing::warn!(
                "lost the scheduler at {}; reconnecting for up to {:?}",
                config.scheduler,
                config.death_timeout
            );
            let patience = config.death_timeout;
            conn = tokio::select! {
                _ = self.shutdown.changed() => return Ok(()),
                c = comm::connect_retrying(&config.scheduler, Role::Worker, &config.name, patience, &config.security) => {
                    c.map_err(|e| WorkerError::SchedulerLost(format!("could not reconnect: {e}")))?
                }
            };
        }
    }

    /// Serve one connection to the scheduler: register, then feed events to
    /// the state machine and carry out its instructions until it ends.
    async fn session(&mut self, conn: comm::Connection) -> SessionEnd {
        let comm::Connection { reader, writer, .. } = conn;
        let (outbox, _writer) = comm::spawn_writer(writer);
        let config = &self.config;
        let _ = outbox.send(Envelope::new(FromWorker::RegisterWorker(Registration {
            name: config.name.clone(),
            address: self.address.clone(),
            nthreads: config.nthreads as u32,
            memory_limit: config.memory_limit,
            pid: std::process::id(),
            resources: config.resources.clone(),
        })));
        tokio::spawn(read_scheduler(reader, self.events_tx.clone()));
        let mut heartbeat = tokio::time::interval(config.heartbeat);
        heartbeat.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
        let mut memory_tick = tokio::time::interval(Duration::from_millis(100));
        memory_tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
        let watch_memory = config.memory_limit > 0;
        // While tasks run: collect results an executor thread held back
        // before a task that turned out long.
        let mut held_tick = tokio::time::interval(HELD_RESULTS_AGE);
        held_tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
        let mut registered = false;
        let mut held = Held::default();
        let outcome = loop {
            tokio::select! {
                _ = self.shutdown.changed() => break Ok(()),
                _ = heartbeat.tick() => {
                    let _ = outbox.send(Envelope::new(FromWorker::Heartbeat(self.heartbeat())));
                    if !registered {
                        // The scheduler answers a bad registration with an error
                        // at once; no error by the first heartbeat means we are in.
                        registered = true;
                        if let Some(s) = self.started.take() {
                            let _ = s.send(self.address.clone());
                        }
                    }
                }
                _ = held_tick.tick(), if self.state.executing() > 0 => {
                    self.executors.report_older_than(HELD_RESULTS_AGE);
                }
                _ = memory_tick.tick(), if watch_memory => {
                    if let Err(e) = self.check_memory() {
                        break Err(e);
                    }
                    self.dispatch(&outbox, &mut held, false);
                }
                _ = tokio::time::sleep_until(held.deadline()), if held.is_holding() => held.flush(&outbox),
                ev = self.events.recv() => {
                    let Some(ev) = ev else { break Ok(()) };
                    let mut stop = None;
                    let mut every = None;
                    apply(&mut self.state, &mut self.shared, ev, &mut stop, &mut every, &self.jobs);
                    while let Ok(ev) = self.events.try_recv() {
                        apply(&mut self.state, &mut self.shared, ev, &mut stop, &mut every, &self.jobs);
                    }
                    if let Some(every) = every {
                        heartbeat = tokio::time::interval_at(tokio::time::Instant::now() + every, every);
                        heartbeat.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
                    }
                    self.dispatch(&outbox, &mut held, true);
                    if let Some(r) = stop {
                        held.flush(&outbox);
                        break r;
                    }
                }
            }
        };
        match outcome {
            Err(WorkerError::SchedulerLost(why)) if registered && !self.config.death_timeout.is_zero() => {
                SessionEnd::Reconnect(why)
            }
            r => SessionEnd::Stop(r),
        }
    }

    fn heartbeat(&mut self) -> Heartbeat {
        let (now, cpu_now) = (std::time::Instant::now(), process_cpu_seconds());
        let (then, cpu_then) = std::mem::replace(&mut self.cpu_mark, (now, cpu_now));
        let wall = now.duration_since(then).as_secs_f64();
        let cpu = if wall > 0.0 { ((cpu_now - cpu_then) / wall * 100.0).max(0.0) as f32 } else { 0.0 };
        let (traffic, peers) = (&self.traffic, &self.peers);
        Heartbeat {
            rss: process_rss(),
            cpu,
            spilled: self.state.spilled(),
            executing: self.state.executing() as u32,
            ready: self.state.nready() as u32,
            bytes_in: traffic.bytes_in.load(Ordering::Relaxed) + peers.bytes_in.load(Ordering::Relaxed),
            bytes_out: traffic.bytes_out.load(Ordering::Relaxed) + peers.bytes_out.load(Ordering::Relaxed),
        }
    }

    /// Measure the process and let the state machine spill, pause or give
    /// up; `Err` when the worker must close to free memory.
    fn check_memory(&mut self) -> Result<(), WorkerError> {
        let mut rss = process_rss();
        if self.tune_allocator_at.is_some_and(|t| rss > t) {
            memory::configure_allocator();
            self.tune_allocator_at = None;
        }
        if self.spill_at.is_some_and(|s| rss > s) && self.last_trim.elapsed() > Duration::from_millis(500) {
            // Freed buffers may still sit in the heap: give them back first.
            memory::trim_heap();
            self.last_trim = tokio::time::Instant::now();
            rss = process_rss();
        }
        match self.state.memory_tick(rss, now()) {
            Some(why) => {
                tracing::error!("{why}; closing");
                Err(WorkerError::Memory(why))
            }
            None => Ok(()),
        }
    }

    /// Carry out the state machine's instructions. With `hold_results`,
    /// task results wait in `held` while the worker is busy (see [`Held`]).
    fn dispatch(&mut self, outbox: &comm::Outbox<FromWorker>, held: &mut Held, hold_results: bool) {
        for ins in self.state.take_instructions() {
            match ins {
                Instruction::Send(env) if hold_results && is_result(&env.msg) => held.push(env),
                Instruction::Send(env) => {
                    held.flush(outbox);
                    let _ = outbox.send(env);
                }
                ins => carry_out(ins, &self.jobs, &self.runner, &self.helper, &self.peers, &self.events_tx),
            }
        }
        if hold_results && (!self.state.busy() || held.full()) {
            held.flush(outbox);
        }
    }
}

/// Forward what the scheduler sends to the runtime loop until the
/// connection ends.
async fn read_scheduler(mut reader: comm::FrameReader<comm::ReadHalf>, events: mpsc::UnboundedSender<Event>) {
    loop {
        match reader.read_batch().await {
            Ok(b) => {
                if events.send(Event::FromScheduler(b)).is_err() {
                    return;
                }
            }
            Err(CommError::Closed) => {
                let _ = events.send(Event::SchedulerClosed(None));
                return;
            }
            Err(e) => {
                let _ = events.send(Event::SchedulerClosed(Some(e)));
                return;
            }
        }
    }
}

fn apply(
    state: &mut WorkerState,
    shared: &mut FxHashMap<u64, Bytes>,
    ev: Event,
    stop: &mut Option<Result<(), WorkerError>>,
    heartbeat: &mut Option<Duration>,
    jobs: &std::sync::mpsc::Sender<Job>,
) {
    match ev {
        Event::FromScheduler(batch) => {
            for env in batch {
                let Envelope { msg, frames } = env;
                match msg {
                    ToWorker::ComputeTask { key, run_spec, shared: sref, deps, priority, resources } => {
                        let spec = run_spec.resolve(&frames).unwrap_or_default();
                        let shared = sref.map(|r| {
                            if let Some(data) = r.data.and_then(|d| d.resolve(&frames)) {
                                shared.insert(r.id, data);
                            }
                            // Unknown, the task's runner reports the missing blob.
                            (r.id, shared.get(&r.id).cloned().unwrap_or_default())
                        });
                        state.compute_task(key, Recipe { spec, shared }, deps, priority, resources, now());
                    }
                    ToWorker::FreeShared { ids } => {
                        for id in ids {
                            shared.remove(&id);
                        }
                    }
                    ToWorker::FreeKeys { keys } => state.free_keys(keys),
                    ToWorker::StealRequest { key } => state.steal_request(key),
                    ToWorker::AcquireReplicas { keys } => state.acquire_replicas(keys),
                    ToWorker::CloseWorker { reason } => {
                        tracing::info!("scheduler closed this worker: {reason}");
                        *stop = Some(Ok(()));
                    }
                    ToWorker::RestartWorker => *stop = Some(Err(WorkerError::Restart)),
                    ToWorker::SetUp { calls } => {
                        state.set_up(calls.into_iter().filter_map(|c| c.resolve(&frames)).collect())
                    }
                    ToWorker::HeartbeatInterval { ms } => *heartbeat = Some(Duration::from_millis(ms.max(50))),
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
        Event::Spilled(results, start, end) => state.spill_done(results, start, end),
        Event::SetUpDone => state.set_up_done(),
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
        Instruction::Execute { key, recipe, deps } => {
            let _ = jobs.send(Job::Task { key, recipe, deps });
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
                let start = now();
                let results = runner.spill(&keys);
                let _ = events.send(Event::Spilled(results, start, now()));
            });
        }
        Instruction::SetUp { calls } => {
            // Its own thread: a set-up may take minutes (a pip install)
            // while the worker keeps answering the scheduler and its peers.
            let runner = runner.clone();
            let events = events.clone();
            std::thread::spawn(move || {
                for call in calls {
                    if let Err(e) = runner.run_function(call) {
                        tracing::error!("a worker plugin's set-up failed: {}", String::from_utf8_lossy(&e));
                    }
                }
                let _ = events.send(Event::SetUpDone);
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
                        tracing::warn!("unexpected reply from {worker}: {}", crate::protocol::brief(&other.msg));
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
