//! The messages, one enum per direction.
//!
//! | connection (role)       | opener sends    | other side sends |
//! |-------------------------|-----------------|------------------|
//! | any, first batch        | [`Handshake`]   | [`Handshake`]    |
//! | worker -> scheduler     | [`FromWorker`]  | [`ToWorker`]     |
//! | client/monitor -> sched | [`FromClient`]  | [`ToClient`]     |
//! | peer -> worker data port| [`DataRequest`] | [`DataReply`]    |
//!
//! Answers to requests carry the request's `id` and a `Result`: the value,
//! or the reason it could not be given.

use bytes::Bytes;
use serde::{Deserialize, Serialize};

use super::{
    Blob, CoordError, CoordOp, CoordValue, DepInfo, EventsUpdate, Key, Priority, Registration, Resources, Role,
    SharedRef, TaskSpec, TaskStreamRecord, WorkerInfo,
};

/// The first messages on every connection, in both directions: `Hello`,
/// then (when the server demands the cluster's token) `Challenge` and
/// `Proof`, then `Welcome` or `Refused`. See [`crate::security`].
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq)]
pub enum Handshake {
    /// From the side that opened the connection, with a fresh nonce.
    Hello {
        protocol: u32,
        role: Role,
        name: String,
        #[serde(default, with = "serde_bytes")]
        nonce: Vec<u8>,
    },
    /// From a server that demands the cluster's token: its own nonce, and
    /// its proof over both nonces that it holds the token.
    Challenge {
        #[serde(with = "serde_bytes")]
        nonce: Vec<u8>,
        #[serde(with = "serde_bytes")]
        proof: Vec<u8>,
    },
    /// The opener's proof over both nonces that it holds the token.
    Proof {
        #[serde(with = "serde_bytes")]
        proof: Vec<u8>,
    },
    /// Accepted.
    Welcome { protocol: u32, server: String },
    /// Refused (another protocol version, a role this server does not
    /// serve, a missing or wrong credential); the server closes the
    /// connection.
    Refused { reason: String },
}

/// A task a worker finished (stored its result).
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq)]
pub struct TaskFinished {
    pub key: Key,
    /// Size of the result.
    pub nbytes: u64,
    /// Execution start and stop, seconds since the Unix epoch.
    pub start: f64,
    pub stop: f64,
    /// Worker thread that ran it.
    pub thread: u32,
    /// Seconds spent fetching dependencies before it ran.
    pub transfer: f64,
}

impl TaskFinished {
    /// A task that took no time on thread 0 (for simulations and tests).
    pub fn instant(key: impl Into<Key>, nbytes: u64) -> Self {
        TaskFinished { key: key.into(), nbytes, start: 0.0, stop: 0.0, thread: 0, transfer: 0.0 }
    }
}

/// A task that raised on a worker.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq)]
pub struct TaskErred {
    pub key: Key,
    /// Pickled exception object.
    pub exception: Blob,
    /// Pickled traceback (tblib dict) or empty.
    pub traceback: Blob,
    /// `repr` of the exception, for humans and non-Python peers.
    pub text: String,
    pub start: f64,
    pub stop: f64,
    pub thread: u32,
}

/// A worker's periodic report of its own resource use.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Default)]
pub struct Heartbeat {
    /// Resident set size of the worker process.
    pub rss: u64,
    /// CPU the process used since the previous heartbeat, in percent of one core.
    pub cpu: f32,
    /// Bytes of results spilled to disk.
    pub spilled: u64,
    /// Tasks running now.
    pub executing: u32,
    /// Tasks ready to run, waiting for a thread.
    pub ready: u32,
    /// Bytes received from peers and clients so far.
    pub bytes_in: u64,
    /// Bytes sent to peers and clients so far.
    pub bytes_out: u64,
}

/// Worker -> scheduler.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq)]
pub enum FromWorker {
    /// Must come first.
    RegisterWorker(Registration),
    TaskFinished(TaskFinished),
    TaskErred(TaskErred),
    /// Answer to `StealRequest`: `stolen` if the task was dropped unstarted.
    StealResponse {
        key: Key,
        stolen: bool,
    },
    /// A running task left its thread to wait for tasks it launched.
    TaskSeceded {
        key: Key,
    },
    /// Replicas that arrived on the worker (fetched dependencies).
    AddKeys {
        keys: Vec<(Key, u64)>,
    },
    /// The worker could not fetch `key` from any of the listed holders.
    MissingData {
        key: Key,
        workers: Vec<String>,
    },
    Heartbeat(Heartbeat),
    /// Results written to disk to free memory, between `start` and `stop`
    /// (for the task stream).
    Spilled {
        keys: u32,
        start: f64,
        stop: f64,
    },
}

/// Scheduler -> worker.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq)]
pub enum ToWorker {
    ComputeTask {
        key: Key,
        run_spec: Blob,
        shared: Option<SharedRef>,
        deps: Vec<DepInfo>,
        priority: Priority,
        /// Held from the moment the task is handed to a thread until it ends.
        resources: Resources,
    },
    FreeKeys {
        keys: Vec<Key>,
    },
    /// No task refers to these shared blobs any more: drop them.
    FreeShared {
        ids: Vec<u64>,
    },
    /// Exit so that the worker's supervisor starts a fresh process
    /// (`Client.restart`).
    RestartWorker,
    /// Run these set-up calls (worker plugins, opaque to the runtime) in
    /// order before starting any task.
    SetUp {
        calls: Vec<Blob>,
    },
    /// Give up `key` if it has not started (work stealing); answered by
    /// `StealResponse`.
    StealRequest {
        key: Key,
    },
    /// Leave the cluster (retired, or the scheduler is shutting down).
    CloseWorker {
        reason: String,
    },
    /// Fetch copies of these keys from their holders (data moving off a
    /// retiring worker, replication, rebalancing).
    AcquireReplicas {
        keys: Vec<DepInfo>,
    },
    /// Send heartbeats this often from now on: the scheduler spaces them as
    /// the cluster grows, so that a thousand idle workers cost it little.
    HeartbeatInterval {
        ms: u64,
    },
    /// The worker sent something the scheduler refuses; the connection closes.
    Error {
        reason: String,
    },
}

/// How often workers send heartbeats until the scheduler says otherwise.
pub const DEFAULT_HEARTBEAT_MS: u64 = 500;

/// The heartbeat interval for a cluster of `workers` (Dask's steps: 0.5 s up
/// to 10 workers, 1 s below 50, 2 s below 200, then a second more per 200
/// workers, so that heartbeats stay under about 200 a second), at most 15 s
/// so that the scheduler's worker TTL (60 s) still sees four of them.
pub fn heartbeat_interval_ms(workers: usize) -> u64 {
    match workers {
        0..=10 => DEFAULT_HEARTBEAT_MS,
        11..=49 => 1000,
        50..=199 => 2000,
        n => ((n as u64 / 200 + 1) * 1000).min(15_000),
    }
}

/// Client (or monitor) -> scheduler.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq)]
pub enum FromClient {
    UpdateGraph {
        tasks: Vec<TaskSpec>,
        wanted: Vec<Key>,
        /// Blobs the tasks refer to by id (`TaskSpec::shared`), each once.
        shared: Vec<(u64, Blob)>,
    },
    /// Declare interest in keys that already exist (e.g. a second client).
    WantKeys {
        keys: Vec<Key>,
    },
    ReleaseKeys {
        keys: Vec<Key>,
    },
    CancelKeys {
        keys: Vec<Key>,
    },
    /// Data was put on `worker` directly by the client.
    ScatterDone {
        keys: Vec<(Key, u64)>,
        worker: String,
    },
    WhoHas {
        id: u64,
        keys: Vec<Key>,
    },
    /// Task-stream records (of the scheduler's ring) that ended between
    /// `start` and `stop` (seconds since the Unix epoch), at most the last
    /// `count`; answered by `TaskStream`.
    GetTaskStream {
        id: u64,
        start: Option<f64>,
        stop: Option<f64>,
        count: Option<u64>,
    },
    GetInfo {
        id: u64,
    },
    /// Subscribe this connection to [`EventsUpdate`]s every `interval_ms`.
    Subscribe {
        interval_ms: u64,
    },
    /// Ask the scheduler to shut down (used by `LocalCluster.close`).
    Shutdown,
    /// Run erred tasks (and the erred tasks they depend on) again.
    RetryKeys {
        keys: Vec<Key>,
    },
    /// Keep computing `keys` even after this client releases them.
    FireAndForget {
        keys: Vec<Key>,
    },
    /// Hold `keys` under `name` until unpublished; `data` is the pickled
    /// object (futures inside it are rebuilt by whoever gets the dataset).
    PublishDataset {
        id: u64,
        name: String,
        keys: Vec<Key>,
        data: Blob,
        overwrite: bool,
    },
    UnpublishDataset {
        id: u64,
        name: String,
    },
    GetDataset {
        id: u64,
        name: String,
    },
    ListDatasets {
        id: u64,
    },
    /// Retire these workers (names or addresses): no new tasks, their data
    /// copied to other workers, then closed. Answered by `WorkersRetired`.
    RetireWorkers {
        id: u64,
        workers: Vec<String>,
    },
    /// Move results from workers holding more managed memory than the mean
    /// to workers holding less (`keys` empty: any key; `workers` empty: all
    /// workers take part). Answered by `Rebalanced` once the moves are done.
    Rebalance {
        id: u64,
        keys: Vec<Key>,
        workers: Vec<String>,
    },
    /// Forget every task and restart every worker process (`Client.restart`).
    Restart,
    /// Keep a worker plugin's set-up call under `name` for every worker that
    /// registers from now on (replacing one of the same name).
    RegisterPlugin {
        name: String,
        call: Blob,
    },
    /// Forget the worker plugin `name`.
    UnregisterPlugin {
        name: String,
    },
    /// Copy each of `keys` (in memory) to other workers until `n` hold it;
    /// with `workers` (names or addresses), `n` of those.
    Replicate {
        keys: Vec<Key>,
        n: u32,
        workers: Vec<String>,
    },
    /// An operation on a coordination primitive; answered by `CoordReply`.
    Coord {
        id: u64,
        op: CoordOp,
    },
}

/// The cluster as the scheduler sees it (answer to `GetInfo`).
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq)]
pub struct ClusterInfo {
    /// The scheduler's address.
    pub address: String,
    pub workers: Vec<WorkerInfo>,
    /// Tasks the scheduler knows.
    pub ntasks: u64,
    pub nclients: u64,
    /// Bytes the scheduler received and sent.
    pub bytes_in: u64,
    pub bytes_out: u64,
    /// The dashboard's link, when one serves this scheduler.
    pub dashboard: Option<String>,
    /// Messages waiting in the scheduler's outboxes (peers that read slowly
    /// or not at all hold them).
    pub queued: u64,
}

/// What a rebalance moved.
#[derive(Serialize, Deserialize, Debug, Clone, Copy, PartialEq, Default)]
pub struct RebalanceStats {
    /// Keys moved.
    pub moved: u64,
    /// Bytes moved.
    pub bytes: u64,
    /// Keys that could not move (a copy failed, a worker left).
    pub failed: u64,
}

/// Answer to a dataset request.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq)]
pub enum DatasetValue {
    /// Published or unpublished.
    Done,
    /// The pickled dataset (`GetDataset`).
    Data(Blob),
    /// Names of the published datasets (`ListDatasets`).
    Names(Vec<String>),
}

/// Scheduler -> client (or monitor).
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq)]
pub enum ToClient {
    KeyInMemory {
        key: Key,
        nbytes: u64,
        workers: Vec<String>,
    },
    KeyErred {
        key: Key,
        exception: Blob,
        traceback: Blob,
        text: String,
    },
    KeyCancelled {
        key: Key,
        reason: String,
    },
    /// The only copies of `key`'s result died with their workers; the
    /// scheduler computes it again from its lineage (a `KeyInMemory` follows).
    KeyLost {
        key: Key,
    },
    /// `key` cannot run on any current worker (its `workers=` name none, or
    /// there are no workers), and why; `None` means it can again.
    KeyNoWorker {
        key: Key,
        reason: Option<String>,
    },
    WhoHasReply {
        id: u64,
        who_has: Vec<(Key, Vec<String>)>,
    },
    TaskStream {
        id: u64,
        records: Vec<TaskStreamRecord>,
    },
    Info {
        id: u64,
        info: ClusterInfo,
    },
    Events(EventsUpdate),
    /// Answer to `RetireWorkers`: names retired, and names not retired with why.
    WorkersRetired {
        id: u64,
        retired: Vec<String>,
        failed: Vec<(String, String)>,
    },
    /// Answer to `Rebalance`, once the moves are done.
    Rebalanced {
        id: u64,
        result: Result<RebalanceStats, String>,
    },
    /// Answer to the dataset requests.
    DatasetReply {
        id: u64,
        result: Result<DatasetValue, String>,
    },
    /// Answer to `Coord`.
    CoordReply {
        id: u64,
        result: Result<CoordValue, CoordError>,
    },
    /// The client sent something the scheduler refuses; the connection closes.
    Error {
        reason: String,
    },
}

/// Requests to a worker's data port (from other workers and from clients).
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq)]
pub enum DataRequest {
    GetData {
        id: u64,
        keys: Vec<Key>,
    },
    /// Store these values (a client's `scatter`).
    PutData {
        id: u64,
        items: Vec<(Key, Vec<Blob>)>,
    },
    /// Run a pickled function call in the worker process, outside any task
    /// (`Client.run`).
    RunFunction {
        id: u64,
        function: Blob,
    },
}

/// Replies from a worker's data port, one per [`DataRequest`].
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq)]
pub enum DataReply {
    /// Serialized values: each key's frames as produced by the worker's
    /// serializer, and the keys it does not hold.
    Data { id: u64, items: Vec<(Key, Vec<Blob>)>, missing: Vec<Key> },
    /// Sizes of the values stored, in request order.
    PutDataOk { id: u64, nbytes: Vec<u64> },
    /// The pickled result, or the pickled exception.
    RunResult { id: u64, result: Result<Blob, Blob> },
    /// The request could not be served.
    Error { reason: String },
}

/// A message together with the extra frames its [`Blob::Frame`]s point at.
#[derive(Debug, Clone, PartialEq)]
pub struct Envelope<M> {
    pub msg: M,
    pub frames: Vec<Bytes>,
}

impl<M> Envelope<M> {
    /// A message without extra frames.
    pub fn new(msg: M) -> Self {
        Envelope { msg, frames: Vec::new() }
    }
}

impl<M> From<M> for Envelope<M> {
    fn from(msg: M) -> Self {
        Envelope::new(msg)
    }
}
