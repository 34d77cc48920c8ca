//! The client core: one connection to the scheduler, the status of every key
//! the client holds, and direct data transfers to and from workers.
//!
//! It is synchronous on the outside (callers block on a condition variable,
//! with the GIL released by the Python binding) and async inside: a small
//! tokio runtime runs the reader and writer tasks.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use rustc_hash::FxHashMap;
use tokio::sync::oneshot;

use crate::comm::{self, CommError, ConnectionPool, Outbox};
use crate::protocol::{
    brief, Blob, ClusterInfo, CoordError, CoordOp, CoordValue, DataReply, DataRequest, DatasetValue, Envelope,
    EventsUpdate, FromClient, Key, RebalanceStats, Role, TaskSpec, TaskStreamRecord, ToClient,
};
use crate::security::Security;

/// Errors of the client core.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("cannot connect to scheduler at {addr}: {source}")]
    Connect { addr: String, source: CommError },
    #[error("the connection to the scheduler is closed: {0}")]
    Closed(String),
    #[error("timed out after {0:?}")]
    Timeout(Duration),
    #[error("worker {worker}: {source}")]
    Worker { worker: String, source: CommError },
    #[error("worker {worker} answered: {reason}")]
    WorkerRefused { worker: String, reason: String },
    #[error("cannot start the client runtime: {0}")]
    Runtime(#[from] std::io::Error),
}

/// A request about published datasets.
#[derive(Debug)]
pub enum DatasetRequest {
    Publish { name: String, keys: Vec<Key>, data: Bytes, overwrite: bool },
    Unpublish { name: String },
    Get { name: String },
    List,
}

/// What the client knows about one key.
#[derive(Debug, Clone, PartialEq)]
pub enum KeyStatus {
    Pending,
    Finished { nbytes: u64, workers: Vec<String> },
    Erred { exception: Bytes, traceback: Bytes, text: String },
    Cancelled { reason: String },
}

impl KeyStatus {
    /// Whether the key reached a final state.
    pub fn is_done(&self) -> bool {
        !matches!(self, KeyStatus::Pending)
    }
}

/// Reply to a scheduler query.
#[derive(Debug)]
pub enum Reply {
    WhoHas(Vec<(Key, Vec<String>)>),
    TaskStream(Vec<TaskStreamRecord>),
    Info(ClusterInfo),
    /// A dataset request's answer: the dataset's bytes, or the names of the
    /// datasets, or the scheduler's error text.
    Dataset(Result<(Option<Bytes>, Vec<String>), String>),
    Retired {
        retired: Vec<String>,
        failed: Vec<(String, String)>,
    },
    Rebalanced(Result<RebalanceStats, String>),
    /// Answer to a coordination operation, with the payloads of
    /// `CoordValue::Values` resolved from their frames.
    Coord(CoordResult),
}

/// A coordination answer: the value and any payloads, or why not.
pub type CoordResult = Result<(CoordValue, Vec<(Bytes, Vec<Key>)>), CoordError>;

#[derive(Default)]
struct Shared {
    keys: FxHashMap<Key, KeyStatus>,
    /// Keys that reached a final state, for callbacks (only when watched).
    done: Vec<Key>,
    watch_all: bool,
    events: Vec<EventsUpdate>,
    /// Set for good once the connection is gone and will not come back.
    closed: Option<String>,
    /// Set while the connection is down and being re-established.
    reconnecting: Option<String>,
    /// Interval of the events subscription, renewed after a reconnect.
    subscribed: Option<u64>,
    /// Pending keys no current worker can run, and why.
    no_worker: FxHashMap<Key, String>,
    pending_replies: FxHashMap<u64, oneshot::Sender<Reply>>,
}

struct Inner {
    shared: Mutex<Shared>,
    cv: Condvar,
}

/// A tokio runtime that shuts down in the background when dropped, so
/// dropping it never blocks (nor waits on threads that may need a lock the
/// dropping thread holds, such as Python's GIL).
pub struct BackgroundRuntime(Option<tokio::runtime::Runtime>);

impl BackgroundRuntime {
    pub fn new(rt: tokio::runtime::Runtime) -> Self {
        BackgroundRuntime(Some(rt))
    }
}

impl std::ops::Deref for BackgroundRuntime {
    type Target = tokio::runtime::Runtime;
    fn deref(&self) -> &Self::Target {
        self.0.as_ref().expect("runtime present until drop")
    }
}

impl Drop for BackgroundRuntime {
    fn drop(&mut self) {
        if let Some(rt) = self.0.take() {
            rt.shutdown_background();
        }
    }
}

/// A connected client.
pub struct ClientCore {
    rt: BackgroundRuntime,
    outbox: Arc<Mutex<Outbox<FromClient>>>,
    inner: Arc<Inner>,
    pool: Arc<ConnectionPool>,
    next_id: AtomicU64,
    /// The scheduler's address.
    pub address: String,
    /// Timeout for connections to workers.
    pub timeout: Duration,
}

impl ClientCore {
    /// Connect to the scheduler at `address` within `timeout`, proving
    /// `security`'s credential (to the scheduler and to every worker).
    pub fn connect(
        address: &str,
        name: &str,
        timeout: Duration,
        security: &Security,
    ) -> Result<ClientCore, ClientError> {
        Self::connect_as(address, name, Role::Client, timeout, security)
    }

    /// Connect as a read-only [`Role::Monitor`] (a dashboard, a console):
    /// it may subscribe to events, ask for the cluster's state and retire
    /// workers, and does not count as a client.
    pub fn connect_monitor(
        address: &str,
        name: &str,
        timeout: Duration,
        security: &Security,
    ) -> Result<ClientCore, ClientError> {
        Self::connect_as(address, name, Role::Monitor, timeout, security)
    }

    fn connect_as(
        address: &str,
        name: &str,
        role: Role,
        timeout: Duration,
        security: &Security,
    ) -> Result<ClientCore, ClientError> {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .thread_name("dask-rs-client")
            .enable_all()
            .build()?;
        let conn = rt
            .block_on(comm::connect(address, role, name, timeout, security))
            .map_err(|e| ClientError::Connect { addr: address.to_string(), source: e })?;
        let comm::Connection { reader, writer, .. } = conn;
        let inner = Arc::new(Inner { shared: Mutex::new(Shared::default()), cv: Condvar::new() });
        let outbox = {
            let _g = rt.enter();
            Arc::new(Mutex::new(comm::spawn_writer(writer).0))
        };
        rt.spawn(read_loop(
            inner.clone(),
            outbox.clone(),
            reader,
            address.to_string(),
            name.to_string(),
            role,
            security.clone(),
        ));
        Ok(ClientCore {
            rt: BackgroundRuntime::new(rt),
            outbox,
            inner,
            pool: Arc::new(ConnectionPool::new(Role::Client, name, timeout, security.clone())),
            next_id: AtomicU64::new(1),
            address: address.to_string(),
            timeout,
        })
    }

    fn check_open(&self) -> Result<(), ClientError> {
        let s = self.inner.shared.lock().expect("client lock");
        if let Some(why) = &s.closed {
            return Err(ClientError::Closed(why.clone()));
        }
        if let Some(why) = &s.reconnecting {
            return Err(ClientError::Closed(format!("{why}; reconnecting, try again shortly")));
        }
        Ok(())
    }

    fn send(&self, env: Envelope<FromClient>) -> Result<(), ClientError> {
        self.check_open()?;
        self.outbox.lock().expect("outbox").send(env).map_err(|_| ClientError::Closed("writer stopped".into()))
    }

    /// Submit tasks and the blobs they refer to (their `Blob::Frame`s index
    /// `frames`), and mark `wanted` pending.
    pub fn submit(
        &self,
        tasks: Vec<TaskSpec>,
        shared: Vec<(u64, Blob)>,
        frames: Vec<Bytes>,
        wanted: Vec<Key>,
    ) -> Result<(), ClientError> {
        self.mark_pending(&wanted);
        self.send(Envelope { msg: FromClient::UpdateGraph { tasks, wanted, shared }, frames })
    }

    fn mark_pending(&self, keys: &[Key]) {
        let mut s = self.inner.shared.lock().expect("client lock");
        for k in keys {
            let st = s.keys.entry(k.clone()).or_insert(KeyStatus::Pending);
            if matches!(st, KeyStatus::Cancelled { .. }) {
                *st = KeyStatus::Pending;
            }
        }
    }

    /// Hold futures for keys submitted elsewhere.
    pub fn want(&self, keys: Vec<Key>) -> Result<(), ClientError> {
        self.mark_pending(&keys);
        self.send(Envelope::new(FromClient::WantKeys { keys }))
    }

    /// Release keys: the scheduler may free their results.
    pub fn release(&self, keys: Vec<Key>) -> Result<(), ClientError> {
        {
            let mut s = self.inner.shared.lock().expect("client lock");
            for k in &keys {
                s.keys.remove(k);
            }
        }
        self.send(Envelope::new(FromClient::ReleaseKeys { keys }))
    }

    /// Cancel keys for this client.
    pub fn cancel(&self, keys: Vec<Key>) -> Result<(), ClientError> {
        {
            let mut s = self.inner.shared.lock().expect("client lock");
            for k in &keys {
                s.keys.insert(k.clone(), KeyStatus::Cancelled { reason: "cancelled".into() });
                if s.watch_all {
                    s.done.push(k.clone());
                }
            }
        }
        self.inner.cv.notify_all();
        self.send(Envelope::new(FromClient::CancelKeys { keys }))
    }

    /// Current status of `key` (`None` if the client does not hold it).
    pub fn status(&self, key: &str) -> Option<KeyStatus> {
        self.inner.shared.lock().expect("client lock").keys.get(key).cloned()
    }

    /// Block until all (or, with `any`, at least one) of `keys` are done.
    /// Returns false on timeout. Errors if the connection closes first.
    pub fn wait(&self, keys: &[Key], timeout: Option<Duration>, any: bool) -> Result<bool, ClientError> {
        let deadline = timeout.map(|t| Instant::now() + t);
        let mut s = self.inner.shared.lock().expect("client lock");
        // For "all", keys before `checked` were seen done and are not looked
        // at again: one pass over the keys in total, not one per wake-up.
        let mut checked = 0;
        loop {
            let done = |k: &Key| s.keys.get(k).is_none_or(|st| st.is_done());
            let satisfied = if any {
                keys.is_empty() || keys.iter().any(done)
            } else {
                checked += keys[checked..].iter().take_while(|k| done(k)).count();
                checked == keys.len()
            };
            if satisfied {
                return Ok(true);
            }
            if let Some(why) = &s.closed {
                return Err(ClientError::Closed(why.clone()));
            }
            match deadline {
                Some(d) => {
                    let now = Instant::now();
                    if now >= d {
                        return Ok(false);
                    }
                    s = self.inner.cv.wait_timeout(s, d - now).expect("client lock").0;
                }
                None => s = self.inner.cv.wait(s).expect("client lock"),
            }
        }
    }

    /// Record every key that reaches a final state from now on, for
    /// [`take_done`](Self::take_done).
    pub fn watch_done(&self) {
        self.inner.shared.lock().expect("client lock").watch_all = true;
    }

    /// Keys that finished since the last call; waits up to `timeout` for one.
    pub fn take_done(&self, timeout: Duration) -> Vec<Key> {
        let mut s = self.wait_for(timeout, |s| !s.done.is_empty());
        std::mem::take(&mut s.done)
    }

    /// Lock the shared state once `ready` holds, the connection closed, or
    /// `timeout` passed.
    fn wait_for(&self, timeout: Duration, ready: impl Fn(&Shared) -> bool) -> std::sync::MutexGuard<'_, Shared> {
        let deadline = Instant::now() + timeout;
        let mut s = self.inner.shared.lock().expect("client lock");
        while !ready(&s) && s.closed.is_none() {
            let now = Instant::now();
            if now >= deadline {
                break;
            }
            s = self.inner.cv.wait_timeout(s, deadline - now).expect("client lock").0;
        }
        s
    }

    /// Fetch serialized values of `keys` from the worker at `worker`.
    #[allow(clippy::type_complexity)]
    pub fn get_data(&self, worker: &str, keys: Vec<Key>) -> Result<(Vec<(Key, Vec<Bytes>)>, Vec<Key>), ClientError> {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let pool = self.pool.clone();
        let reply = self
            .rt
            .block_on(async move { pool.request(worker, Envelope::new(DataRequest::GetData { id, keys })).await })
            .map_err(|e| {
                self.pool.forget(worker);
                ClientError::Worker { worker: worker.to_string(), source: e }
            })?;
        match reply {
            Envelope { msg: DataReply::Data { items, missing, .. }, mut frames } => {
                let mut out = Vec::with_capacity(items.len());
                let mut missing = missing;
                for (k, blobs) in items {
                    match blobs.iter().map(|b| b.take(&mut frames)).collect::<Option<Vec<Bytes>>>() {
                        Some(parts) => out.push((k, parts)),
                        None => missing.push(k),
                    }
                }
                Ok((out, missing))
            }
            Envelope { msg: DataReply::Error { reason }, .. } => {
                Err(ClientError::WorkerRefused { worker: worker.to_string(), reason })
            }
            other => Err(ClientError::WorkerRefused {
                worker: worker.to_string(),
                reason: format!("unexpected reply {}", brief(&other.msg)),
            }),
        }
    }

    /// Run a serialized function call in the worker process at `worker`:
    /// `Ok(result)` or `Err(exception)`, both serialized.
    pub fn run_on(&self, worker: &str, call: Bytes) -> Result<Result<Bytes, Bytes>, ClientError> {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let pool = self.pool.clone();
        let mut frames = Vec::new();
        let function = Blob::new(call, &mut frames);
        let env = Envelope { msg: DataRequest::RunFunction { id, function }, frames };
        let reply = self.rt.block_on(async move { pool.request(worker, env).await }).map_err(|e| {
            self.pool.forget(worker);
            ClientError::Worker { worker: worker.to_string(), source: e }
        })?;
        match reply {
            Envelope { msg: DataReply::RunResult { result, .. }, frames } => Ok(match result {
                Ok(b) => Ok(b.resolve(&frames).unwrap_or_default()),
                Err(b) => Err(b.resolve(&frames).unwrap_or_default()),
            }),
            Envelope { msg: DataReply::Error { reason }, .. } => {
                Err(ClientError::WorkerRefused { worker: worker.to_string(), reason })
            }
            other => Err(ClientError::WorkerRefused {
                worker: worker.to_string(),
                reason: format!("unexpected reply {}", brief(&other.msg)),
            }),
        }
    }

    /// Put serialized values on `worker` and register them with the scheduler
    /// as held by this client.
    pub fn scatter(&self, worker: &str, items: Vec<(Key, Vec<Bytes>)>) -> Result<(), ClientError> {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let mut frames = Vec::new();
        let keys: Vec<Key> = items.iter().map(|(k, _)| k.clone()).collect();
        let items: Vec<(Key, Vec<Blob>)> = items
            .into_iter()
            .map(|(k, parts)| (k, parts.into_iter().map(|p| Blob::new(p, &mut frames)).collect()))
            .collect();
        let pool = self.pool.clone();
        let reply = self
            .rt
            .block_on(async move {
                pool.request(worker, Envelope { msg: DataRequest::PutData { id, items }, frames }).await
            })
            .map_err(|e| ClientError::Worker { worker: worker.to_string(), source: e })?;
        match reply.msg {
            DataReply::PutDataOk { nbytes, .. } => {
                self.mark_pending(&keys);
                let keys = keys.into_iter().zip(nbytes).collect();
                self.send(Envelope::new(FromClient::ScatterDone { keys, worker: worker.to_string() }))
            }
            DataReply::Error { reason } => Err(ClientError::WorkerRefused { worker: worker.to_string(), reason }),
            other => Err(ClientError::WorkerRefused {
                worker: worker.to_string(),
                reason: format!("unexpected reply {}", brief(&other)),
            }),
        }
    }

    fn query(&self, msg_for: impl FnOnce(u64) -> FromClient, timeout: Duration) -> Result<Reply, ClientError> {
        self.query_with_frames(|id| Envelope::new(msg_for(id)), timeout)
    }

    fn query_with_frames(
        &self,
        env_for: impl FnOnce(u64) -> Envelope<FromClient>,
        timeout: Duration,
    ) -> Result<Reply, ClientError> {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let (tx, rx) = oneshot::channel();
        self.inner.shared.lock().expect("client lock").pending_replies.insert(id, tx);
        if let Err(e) = self.send(env_for(id)) {
            self.inner.shared.lock().expect("client lock").pending_replies.remove(&id);
            return Err(e);
        }
        match self.rt.block_on(async { tokio::time::timeout(timeout, rx).await }) {
            Ok(Ok(r)) => Ok(r),
            Ok(Err(_)) => Err(ClientError::Closed("connection closed while waiting for a reply".into())),
            Err(_) => Err(ClientError::Timeout(timeout)),
        }
    }

    /// Which workers hold `keys`.
    pub fn who_has(&self, keys: Vec<Key>) -> Result<Vec<(Key, Vec<String>)>, ClientError> {
        match self.query(|id| FromClient::WhoHas { id, keys }, self.timeout)? {
            Reply::WhoHas(v) => Ok(v),
            other => Err(ClientError::Closed(format!("unexpected reply {}", brief(&other)))),
        }
    }

    /// Task-stream records that ended between `start` and `stop` (Unix
    /// seconds), at most the last `count`, from the scheduler's ring.
    pub fn task_stream(
        &self,
        start: Option<f64>,
        stop: Option<f64>,
        count: Option<u64>,
    ) -> Result<Vec<TaskStreamRecord>, ClientError> {
        match self.query(|id| FromClient::GetTaskStream { id, start, stop, count }, self.timeout)? {
            Reply::TaskStream(v) => Ok(v),
            other => Err(ClientError::Closed(format!("unexpected reply {}", brief(&other)))),
        }
    }

    /// The scheduler's view of the cluster.
    pub fn info(&self) -> Result<ClusterInfo, ClientError> {
        match self.query(|id| FromClient::GetInfo { id }, self.timeout)? {
            Reply::Info(info) => Ok(info),
            other => Err(ClientError::Closed(format!("unexpected reply {}", brief(&other)))),
        }
    }

    /// Run erred keys (and the erred tasks they depend on) again.
    pub fn retry(&self, keys: Vec<Key>) -> Result<(), ClientError> {
        {
            let mut st = self.inner.shared.lock().expect("client lock");
            for k in &keys {
                if let Some(v) = st.keys.get_mut(k) {
                    *v = KeyStatus::Pending;
                }
            }
        }
        self.send(Envelope::new(FromClient::RetryKeys { keys }))
    }

    /// Forget every task and restart every worker process.
    pub fn restart(&self) -> Result<(), ClientError> {
        self.send(Envelope::new(FromClient::Restart))
    }

    /// Keep a worker plugin's set-up `call` under `name`: the scheduler hands
    /// it to every worker that registers from now on.
    pub fn register_plugin(&self, name: String, call: Bytes) -> Result<(), ClientError> {
        let mut frames = Vec::new();
        let call = Blob::new(call, &mut frames);
        self.send(Envelope { msg: FromClient::RegisterPlugin { name, call }, frames })
    }

    /// Forget the worker plugin `name` on the scheduler.
    pub fn unregister_plugin(&self, name: String) -> Result<(), ClientError> {
        self.send(Envelope::new(FromClient::UnregisterPlugin { name }))
    }

    /// Copy each of `keys` to more workers until `n` hold it (see `who_has`);
    /// with `workers` (names or addresses), until `n` of those hold it.
    pub fn replicate(&self, keys: Vec<Key>, n: u32, workers: Vec<String>) -> Result<(), ClientError> {
        self.send(Envelope::new(FromClient::Replicate { keys, n, workers }))
    }

    /// Keep computing `keys` even once this client releases them.
    pub fn fire_and_forget(&self, keys: Vec<Key>) -> Result<(), ClientError> {
        self.send(Envelope::new(FromClient::FireAndForget { keys }))
    }

    /// A dataset request: `Ok((data, names))`, or the scheduler's error text.
    #[allow(clippy::type_complexity)]
    pub fn dataset(
        &self,
        request: DatasetRequest,
    ) -> Result<Result<(Option<Bytes>, Vec<String>), String>, ClientError> {
        let reply = self.query(
            |id| match request {
                DatasetRequest::Publish { name, keys, data, overwrite } => {
                    FromClient::PublishDataset { id, name, keys, data: Blob::Inline(data), overwrite }
                }
                DatasetRequest::Unpublish { name } => FromClient::UnpublishDataset { id, name },
                DatasetRequest::Get { name } => FromClient::GetDataset { id, name },
                DatasetRequest::List => FromClient::ListDatasets { id },
            },
            self.timeout,
        )?;
        match reply {
            Reply::Dataset(result) => Ok(result),
            other => Err(ClientError::Closed(format!("unexpected reply {}", brief(&other)))),
        }
    }

    /// Retire workers (names or addresses), their data moved to other
    /// workers first; waits up to `timeout`. Returns the names retired and
    /// the names that were not, with why.
    #[allow(clippy::type_complexity)]
    pub fn retire_workers(
        &self,
        workers: Vec<String>,
        timeout: Duration,
    ) -> Result<(Vec<String>, Vec<(String, String)>), ClientError> {
        match self.query(|id| FromClient::RetireWorkers { id, workers }, timeout)? {
            Reply::Retired { retired, failed } => Ok((retired, failed)),
            other => Err(ClientError::Closed(format!("unexpected reply {}", brief(&other)))),
        }
    }

    /// Move results from workers holding more managed memory than the mean
    /// to workers holding less (`keys`/`workers` empty: all); waits up to
    /// `timeout` for the moves. Returns keys moved, bytes moved and keys
    /// that could not move, or the scheduler's error text.
    #[allow(clippy::type_complexity)]
    pub fn rebalance(
        &self,
        keys: Vec<Key>,
        workers: Vec<String>,
        timeout: Duration,
    ) -> Result<Result<(u64, u64, u64), String>, ClientError> {
        match self.query(|id| FromClient::Rebalance { id, keys, workers }, timeout)? {
            Reply::Rebalanced(result) => Ok(result.map(|r| (r.moved, r.bytes, r.failed))),
            other => Err(ClientError::Closed(format!("unexpected reply {}", brief(&other)))),
        }
    }

    /// An operation on a coordination primitive. `payload` is the value of a
    /// set or put (sent as its own frame when large); the operation's own
    /// timeout is enforced by the scheduler, so this waits that long plus the
    /// client's timeout (forever when the operation has none). Returns the
    /// answer, or the scheduler's error text.
    pub fn coordinate(&self, op: CoordOp, payload: Option<Bytes>) -> Result<CoordResult, ClientError> {
        let op_timeout = match &op {
            CoordOp::VariableGet { timeout, .. }
            | CoordOp::QueuePut { timeout, .. }
            | CoordOp::QueueGet { timeout, .. }
            | CoordOp::SemAcquire { timeout, .. }
            | CoordOp::EventWait { timeout, .. } => Some(*timeout),
            _ => None,
        };
        let wait = match op_timeout {
            Some(None) => Duration::from_secs(10 * 365 * 86400),
            Some(Some(t)) => Duration::from_secs_f64(t.max(0.0)) + self.timeout,
            None => self.timeout,
        };
        let mut op = op;
        let mut frames = Vec::new();
        if let Some(p) = payload {
            match &mut op {
                CoordOp::VariableSet { value, .. } | CoordOp::QueuePut { value, .. } => {
                    *value = Blob::new(p, &mut frames)
                }
                _ => {}
            }
        }
        match self.query_with_frames(|id| Envelope { msg: FromClient::Coord { id, op }, frames }, wait)? {
            Reply::Coord(result) => Ok(result),
            other => Err(ClientError::Closed(format!("unexpected reply {}", brief(&other)))),
        }
    }

    /// Subscribe to the scheduler's events every `interval`.
    pub fn subscribe(&self, interval: Duration) -> Result<(), ClientError> {
        let interval_ms = interval.as_millis() as u64;
        self.inner.shared.lock().expect("client lock").subscribed = Some(interval_ms);
        self.send(Envelope::new(FromClient::Subscribe { interval_ms }))
    }

    /// Event updates received since the last call, waiting up to `timeout` for one.
    pub fn take_events(&self, timeout: Duration) -> Vec<EventsUpdate> {
        let mut s = self.wait_for(timeout, |s| !s.events.is_empty());
        std::mem::take(&mut s.events)
    }

    /// Ask the scheduler to shut down with its workers.
    pub fn shutdown_scheduler(&self) -> Result<(), ClientError> {
        self.send(Envelope::new(FromClient::Shutdown))
    }

    /// Why no current worker can run `key`, while that is so.
    pub fn no_worker_reason(&self, key: &str) -> Option<String> {
        let s = self.inner.shared.lock().expect("client lock");
        s.no_worker.get(key).filter(|_| matches!(s.keys.get(key), Some(KeyStatus::Pending))).cloned()
    }

    /// Why the connection is down, if it is (for good, or while reconnecting).
    pub fn closed_reason(&self) -> Option<String> {
        let s = self.inner.shared.lock().expect("client lock");
        s.closed.clone().or_else(|| s.reconnecting.clone())
    }
}

/// How long a client keeps trying to reach a scheduler that went away.
pub const RECONNECT_PATIENCE: Duration = Duration::from_secs(60);

/// Read the scheduler's messages; when the connection drops (not when the
/// scheduler refused us), mark every key lost, reconnect to the same
/// address and carry on with the new connection.
async fn read_loop(
    inner: Arc<Inner>,
    outbox: Arc<Mutex<Outbox<FromClient>>>,
    mut reader: comm::FrameReader<comm::ReadHalf>,
    address: String,
    name: String,
    role: Role,
    security: Security,
) {
    loop {
        let why = loop {
            match reader.read_batch().await {
                Ok(batch) => on_batch(&inner, batch),
                Err(CommError::Closed) => break "scheduler closed the connection".to_string(),
                Err(e) => break e.to_string(),
            }
        };
        {
            let mut s = inner.shared.lock().expect("client lock");
            s.pending_replies.clear();
            if s.closed.is_some() {
                drop(s);
                inner.cv.notify_all();
                return;
            }
            let lost = format!("lost: the connection to the scheduler at {address} dropped ({why})");
            for st in s.keys.values_mut() {
                *st = KeyStatus::Cancelled { reason: lost.clone() };
            }
            s.reconnecting = Some(format!("the connection to the scheduler at {address} dropped ({why})"));
        }
        inner.cv.notify_all();
        tracing::warn!("lost the scheduler at {address} ({why}); reconnecting");
        match comm::connect_retrying(&address, role, &name, RECONNECT_PATIENCE, &security).await {
            Ok(conn) => {
                let comm::Connection { reader: r, writer, .. } = conn;
                reader = r;
                let new_outbox = comm::spawn_writer(writer).0;
                let mut s = inner.shared.lock().expect("client lock");
                if let Some(interval_ms) = s.subscribed {
                    let _ = new_outbox.send(Envelope::new(FromClient::Subscribe { interval_ms }));
                }
                *outbox.lock().expect("outbox") = new_outbox;
                s.reconnecting = None;
                tracing::info!("reconnected to the scheduler at {address}");
            }
            Err(e) => {
                let mut s = inner.shared.lock().expect("client lock");
                s.reconnecting = None;
                s.closed = Some(format!("lost the scheduler at {address} ({why}) and could not reconnect: {e}"));
                drop(s);
                inner.cv.notify_all();
                return;
            }
        }
    }
}

fn on_batch(inner: &Inner, batch: Vec<Envelope<ToClient>>) {
    let mut s = inner.shared.lock().expect("client lock");
    for Envelope { msg, frames } in batch {
        let (key, status) = match msg {
            ToClient::KeyInMemory { key, nbytes, workers } => (key, KeyStatus::Finished { nbytes, workers }),
            ToClient::KeyErred { key, exception, traceback, text } => (
                key,
                KeyStatus::Erred {
                    exception: exception.resolve(&frames).unwrap_or_default(),
                    traceback: traceback.resolve(&frames).unwrap_or_default(),
                    text,
                },
            ),
            ToClient::KeyCancelled { key, reason } => (key, KeyStatus::Cancelled { reason }),
            // Back to pending until the recomputed result arrives.
            ToClient::KeyLost { key } => (key, KeyStatus::Pending),
            ToClient::KeyNoWorker { key, reason } => {
                match reason {
                    None => drop(s.no_worker.remove(&key)),
                    Some(reason) if s.keys.contains_key(&key) => drop(s.no_worker.insert(key, reason)),
                    Some(_) => {}
                }
                continue;
            }
            ToClient::WhoHasReply { id, who_has } => {
                if let Some(tx) = s.pending_replies.remove(&id) {
                    let _ = tx.send(Reply::WhoHas(who_has));
                }
                continue;
            }
            ToClient::TaskStream { id, records } => {
                if let Some(tx) = s.pending_replies.remove(&id) {
                    let _ = tx.send(Reply::TaskStream(records));
                }
                continue;
            }
            ToClient::Info { id, info } => {
                if let Some(tx) = s.pending_replies.remove(&id) {
                    let _ = tx.send(Reply::Info(info));
                }
                continue;
            }
            ToClient::DatasetReply { id, result } => {
                if let Some(tx) = s.pending_replies.remove(&id) {
                    let result = result.map(|v| match v {
                        DatasetValue::Done => (None, Vec::new()),
                        DatasetValue::Data(d) => (d.resolve(&frames), Vec::new()),
                        DatasetValue::Names(names) => (None, names),
                    });
                    let _ = tx.send(Reply::Dataset(result));
                }
                continue;
            }
            ToClient::CoordReply { id, result } => {
                if let Some(tx) = s.pending_replies.remove(&id) {
                    let result = result.map(|value| {
                        let values = match &value {
                            CoordValue::Values(v) => v
                                .iter()
                                .map(|(b, keys)| (b.resolve(&frames).unwrap_or_default(), keys.clone()))
                                .collect(),
                            _ => Vec::new(),
                        };
                        (value, values)
                    });
                    let _ = tx.send(Reply::Coord(result));
                }
                continue;
            }
            ToClient::WorkersRetired { id, retired, failed } => {
                if let Some(tx) = s.pending_replies.remove(&id) {
                    let _ = tx.send(Reply::Retired { retired, failed });
                }
                continue;
            }
            ToClient::Rebalanced { id, result } => {
                if let Some(tx) = s.pending_replies.remove(&id) {
                    let _ = tx.send(Reply::Rebalanced(result));
                }
                continue;
            }
            ToClient::Events(u) => {
                s.events.push(u);
                if s.events.len() > 1000 {
                    s.events.remove(0);
                }
                continue;
            }
            ToClient::Error { reason } => {
                s.closed = Some(reason);
                continue;
            }
        };
        // Only keys the client still holds are updated.
        if let Some(st) = s.keys.get_mut(&key) {
            let was_done = st.is_done();
            // A finished key may still be reported erred/lost later; a
            // cancellation never overrides a result the client already has.
            // (Except after a restart: then the result is gone.)
            let gone = matches!(&status, KeyStatus::Cancelled { reason } if reason == crate::protocol::RESTARTED);
            if gone || !(matches!(status, KeyStatus::Cancelled { .. }) && was_done) {
                *st = status;
            }
            if s.watch_all && !was_done {
                s.done.push(key);
            }
        }
    }
    drop(s);
    inner.cv.notify_all();
}
