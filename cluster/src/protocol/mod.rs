//! Wire messages exchanged by the scheduler, workers and clients.
//!
//! This module owns the message vocabulary and nothing else: how messages are
//! framed on a socket lives in [`crate::comm`]. Every message travels inside an
//! envelope (see `comm`): frame 0 is msgpack (rmp-serde) of a batch of
//! messages; large byte payloads ([`Blob::Frame`]) travel as their own frames
//! so they are never copied into frame 0.
//!
//! The messages themselves live in [`messages`]: one enum per direction
//! (the handshake, worker -> scheduler, scheduler -> worker, client ->
//! scheduler, scheduler -> client, and requests to a worker's data port with
//! their replies). A connection's role, declared in the handshake, fixes
//! which enums travel on it, so a peer cannot send what its role may not.

mod messages;
pub use messages::*;

use bytes::Bytes;
use serde::{Deserialize, Serialize};
use std::borrow::Cow;

/// Version of this protocol; peers that speak another version are refused
/// during the handshake with a clear error.
pub const PROTOCOL_VERSION: u32 = 11;

/// Four bytes every connection starts with, so a stranger (an HTTP client,
/// random bytes) is recognised before any frame is parsed.
pub const MAGIC: [u8; 4] = *b"DRS\x01";

/// Payloads at least this large go into their own frame instead of frame 0.
pub const INLINE_LIMIT: usize = 16 * 1024;

/// Reason given with `KeyCancelled` for every key when the cluster restarts.
pub const RESTARTED: &str = "the cluster restarted";

/// A task key as it travels on the wire (clients stringify tuple keys).
pub type Key = String;

/// What kind of peer opened a connection.
#[derive(Serialize, Deserialize, Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    /// A worker registering with the scheduler.
    Worker,
    /// A client submitting work.
    Client,
    /// A worker or client fetching data from a worker.
    Peer,
    /// A read-only observer (dashboard, TUI) subscribing to events.
    Monitor,
}

/// A byte payload: inline in frame 0 when small, else a separate frame.
///
/// `Frame(i)` indexes the frames that belong to the message carrying it.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq)]
pub enum Blob {
    /// Small payload serialized inside the msgpack frame.
    Inline(#[serde(with = "bytes_serde")] Bytes),
    /// Index into the message's own extra frames.
    Frame(u32),
}

impl Blob {
    /// Wrap `data`, moving it into `frames` when it is large.
    pub fn new(data: Bytes, frames: &mut Vec<Bytes>) -> Blob {
        if data.len() < INLINE_LIMIT {
            Blob::Inline(data)
        } else {
            frames.push(data);
            Blob::Frame((frames.len() - 1) as u32)
        }
    }

    /// The payload, moved out of the message's frames (so a large frame
    /// stays uniquely owned, and writable for whoever receives it).
    pub fn take(&self, frames: &mut [Bytes]) -> Option<Bytes> {
        match self {
            Blob::Inline(b) => Some(b.clone()),
            Blob::Frame(i) => frames.get_mut(*i as usize).map(std::mem::take),
        }
    }

    /// The payload, looked up in the frames that came with the message.
    pub fn resolve(&self, frames: &[Bytes]) -> Option<Bytes> {
        match self {
            Blob::Inline(b) => Some(b.clone()),
            Blob::Frame(i) => frames.get(*i as usize).cloned(),
        }
    }
}

mod bytes_serde {
    use bytes::Bytes;
    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(b: &Bytes, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_bytes(b)
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Bytes, D::Error> {
        let v = serde_bytes::ByteBuf::deserialize(d)?;
        Ok(Bytes::from(v.into_vec()))
    }
}

/// Scheduling priority; smaller runs first. Mirrors Dask's tuple
/// `(-user_priority, generation, graph_order)`.
#[derive(Serialize, Deserialize, Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct Priority {
    /// Negated user priority (higher user priority sorts first).
    pub user: i32,
    /// Submission batch number on the scheduler.
    pub generation: u64,
    /// Order inside the batch (graph order from `dask.order`, or submit order).
    pub order: u64,
}

/// A task as a client submits it.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq)]
pub struct TaskSpec {
    pub key: Key,
    /// Opaque serialized function call; only workers interpret it.
    pub run_spec: Blob,
    /// A shared blob the recipe refers to (its function, sent once per
    /// graph in `UpdateGraph::shared` rather than in every task).
    pub shared: Option<u64>,
    /// Keys this task needs, in the order the worker will receive them.
    pub deps: Vec<Key>,
    /// User priority (higher runs earlier).
    pub priority: i32,
    /// Position inside this graph (graph order).
    pub order: u64,
    /// Restrict to these workers (names or addresses).
    pub workers: Option<Vec<String>>,
    /// With `workers`, whether other workers may run it when those are absent.
    pub allow_other_workers: bool,
    /// How many times to re-run the task if it raises.
    pub retries: u32,
    /// Abstract resources the task holds while it runs (`{"GPU": 1}`); only
    /// workers declaring at least these amounts may run it.
    pub resources: Resources,
}

impl TaskSpec {
    /// A task with an empty recipe and default priority and restrictions
    /// (for simulated workers and tests; clients fill in the rest).
    pub fn new(key: impl Into<Key>, deps: Vec<Key>) -> Self {
        TaskSpec {
            key: key.into(),
            run_spec: Blob::Inline(Bytes::new()),
            shared: None,
            deps,
            priority: 0,
            order: 0,
            workers: None,
            allow_other_workers: false,
            retries: 0,
            resources: Vec::new(),
        }
    }
}

/// A shared blob as a task sent to a worker refers to it: its bytes come
/// with the first task that needs it on that worker, only its id after.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq)]
pub struct SharedRef {
    pub id: u64,
    pub data: Option<Blob>,
}

/// Where a dependency can be fetched from.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq)]
pub struct DepInfo {
    pub key: Key,
    pub nbytes: u64,
    /// Addresses of workers holding it.
    pub who_has: Vec<String>,
}

/// Named amounts of abstract resources (`GPU=2,MEM=10e9`), as a worker
/// declares them or a task needs them. Names are unique within one list.
pub type Resources = Vec<(String, f64)>;

/// Parse `"GPU=2,MEM=10e9"` (also space-separated) into [`Resources`].
pub fn parse_resources(text: &str) -> Result<Resources, String> {
    let mut out: Resources = Vec::new();
    for item in text.split([',', ' ']).map(str::trim).filter(|s| !s.is_empty()) {
        let (name, amount) = item.split_once('=').ok_or_else(|| format!("resource {item:?} is not NAME=AMOUNT"))?;
        let name = name.trim();
        if name.is_empty() {
            return Err(format!("resource {item:?} has no name"));
        }
        let amount: f64 =
            amount.trim().parse().map_err(|_| format!("resource {name}: {:?} is not a number", amount.trim()))?;
        if !amount.is_finite() || amount < 0.0 {
            return Err(format!("resource {name}: amount {amount} must be a finite number >= 0"));
        }
        if out.iter().any(|(n, _)| n == name) {
            return Err(format!("resource {name} is given twice"));
        }
        out.push((name.to_string(), amount));
    }
    Ok(out)
}

/// What a worker tells the scheduler when it joins.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq)]
pub struct Registration {
    pub name: String,
    /// Address peers fetch data from, `tcp://host:port`.
    pub address: String,
    pub nthreads: u32,
    pub memory_limit: u64,
    pub pid: u32,
    /// Resources the worker offers to tasks that ask for them.
    pub resources: Resources,
}

impl Registration {
    /// A worker without resources, with pid 0 (for simulations and tests).
    pub fn new(name: impl Into<String>, address: impl Into<String>, nthreads: u32, memory_limit: u64) -> Self {
        Registration {
            name: name.into(),
            address: address.into(),
            nthreads,
            memory_limit,
            pid: 0,
            resources: Vec::new(),
        }
    }
}

/// One worker as the scheduler describes it.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq)]
pub struct WorkerInfo {
    pub address: String,
    pub name: String,
    pub nthreads: u32,
    pub memory_limit: u64,
    pub pid: u32,
    /// Bytes of results held (managed memory).
    pub managed: u64,
    /// Resident set size of the worker process.
    pub rss: u64,
    /// CPU the worker process used between its last two heartbeats, in
    /// percent of one core (distributed's `cpu`; above 100 with threads).
    pub cpu: f32,
    pub spilled: u64,
    pub executing: u32,
    pub ready: u32,
    /// Tasks the scheduler has assigned and not yet seen finish.
    pub processing: u32,
    /// Keys held in memory.
    pub nkeys: u64,
    /// Bytes received from peers and clients.
    pub bytes_in: u64,
    /// Bytes sent to peers and clients.
    pub bytes_out: u64,
    /// Being retired: gets no new tasks, its data is moving to other workers.
    pub retiring: bool,
    /// Expected seconds of work assigned to it (task durations learned per group).
    pub occupancy: f64,
    /// Resources it declared.
    #[serde(default)]
    pub resources: Resources,
}

impl WorkerInfo {
    /// An idle worker with nothing in memory (for simulations and tests;
    /// the scheduler fills in every field).
    pub fn new(name: impl Into<String>, address: impl Into<String>, nthreads: u32, memory_limit: u64) -> Self {
        WorkerInfo {
            address: address.into(),
            name: name.into(),
            nthreads,
            memory_limit,
            pid: 0,
            managed: 0,
            rss: 0,
            cpu: 0.0,
            spilled: 0,
            executing: 0,
            ready: 0,
            processing: 0,
            nkeys: 0,
            bytes_in: 0,
            bytes_out: 0,
            retiring: false,
            occupancy: 0.0,
            resources: Vec::new(),
        }
    }
}

/// The `thread` of task-stream records that are a worker's spills to disk
/// rather than a task (their group is [`SPILL_GROUP`]).
pub const SPILL_THREAD: u32 = u32::MAX;
/// The group of spill records in the task stream (distributed's action name).
pub const SPILL_GROUP: &str = "disk-write";

/// One finished task, for the task stream.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq)]
pub struct TaskStreamRecord {
    pub key: Key,
    pub group: String,
    pub worker: String,
    pub thread: u32,
    /// Start of execution, seconds since the Unix epoch.
    pub start: f64,
    pub stop: f64,
    /// Seconds spent fetching dependencies before the task ran.
    pub transfer: f64,
    /// Whether the task raised.
    pub erred: bool,
}

/// Counts of a task group's tasks by state.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Default)]
pub struct GroupCounts {
    pub name: String,
    pub released: u64,
    pub waiting: u64,
    pub queued: u64,
    pub no_worker: u64,
    pub processing: u64,
    pub memory: u64,
    pub erred: u64,
    pub forgotten: u64,
    /// Bytes held in memory by this group's results.
    pub nbytes: u64,
    /// Seconds its finished tasks ran, in all.
    pub compute_seconds: f64,
    /// Groups some task of this one depends on.
    pub dependencies: Vec<String>,
}

/// How much work the cluster has, for scaling decisions.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Default)]
pub struct LoadSummary {
    /// Root tasks queued on the scheduler, waiting for a worker slot.
    pub queued: u64,
    /// Tasks no current worker can run (no workers, or restrictions).
    pub no_worker: u64,
    /// Tasks assigned to workers and not finished.
    pub processing: u64,
    /// Expected seconds of work in `processing`.
    pub occupancy: f64,
    /// Expected seconds of work in `queued` and `no_worker`.
    pub queued_occupancy: f64,
}

/// A view of scheduler state pushed to subscribers: the first is a snapshot,
/// the rest are deltas.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Default)]
pub struct EventsUpdate {
    /// Scheduler clock (seconds since the Unix epoch).
    pub time: f64,
    /// New task-stream records since the previous update.
    pub stream: Vec<TaskStreamRecord>,
    /// Records that were dropped from the ring before this subscriber read them.
    pub stream_dropped: u64,
    /// Task groups whose counts changed (all groups in a snapshot).
    pub groups: Vec<GroupCounts>,
    /// Task groups forgotten since the previous update (all their tasks
    /// were forgotten); applied before `groups`, which may bring one back.
    #[serde(default)]
    pub groups_removed: Vec<String>,
    /// Current state of every worker.
    pub workers: Vec<WorkerInfo>,
    /// Total tasks known to the scheduler.
    pub ntasks: u64,
    /// Clients connected now.
    pub nclients: u64,
    /// Work waiting and running now.
    pub load: LoadSummary,
}

/// An operation on a coordination primitive kept on the scheduler
/// (`Variable`, `Queue`, `Lock`/`Semaphore`, `Event`). Timeouts are seconds;
/// `None` waits as long as it takes.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq)]
pub enum CoordOp {
    VariableSet {
        name: String,
        value: Blob,
        keys: Vec<Key>,
    },
    VariableGet {
        name: String,
        timeout: Option<f64>,
    },
    VariableDelete {
        name: String,
    },
    /// Append; waits while the queue holds `maxsize` items (0: unbounded).
    QueuePut {
        name: String,
        value: Blob,
        keys: Vec<Key>,
        maxsize: u64,
        timeout: Option<f64>,
    },
    /// Take one item (`batch: None`, waiting for it), `n` items (waiting for
    /// all of them), or every item there is (`Some(0)`, never waits).
    QueueGet {
        name: String,
        batch: Option<u64>,
        timeout: Option<f64>,
    },
    QueueSize {
        name: String,
    },
    /// Take a lease on semaphore `name` (created with `max_leases` on first use).
    SemAcquire {
        name: String,
        max_leases: u32,
        lease: String,
        timeout: Option<f64>,
    },
    SemRelease {
        name: String,
        lease: String,
    },
    /// Leases held now.
    SemValue {
        name: String,
    },
    EventSet {
        name: String,
    },
    EventClear {
        name: String,
    },
    EventWait {
        name: String,
        timeout: Option<f64>,
    },
    EventIsSet {
        name: String,
    },
}

/// Why a [`CoordOp`] was not carried out.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, thiserror::Error)]
pub enum CoordError {
    /// A wait (`get`, `put` on a full queue, `acquire`) ran out of time.
    #[error("{0}")]
    TimedOut(String),
    /// The operation is not allowed (releasing a lease not held, a
    /// semaphore with another size).
    #[error("{0}")]
    Refused(String),
}

/// Answer to a [`CoordOp`].
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq)]
pub enum CoordValue {
    Unit,
    Bool(bool),
    Int(u64),
    /// Pickled values and the keys of the futures inside each.
    Values(Vec<(Blob, Vec<Key>)>),
}

/// `value`'s debug form cut to at most 200 characters, for logs and error
/// messages about unexpected messages (whose payloads can be large).
pub fn brief(value: &impl std::fmt::Debug) -> String {
    const MAX: usize = 200;
    let text = format!("{value:?}");
    if text.len() <= MAX {
        return text;
    }
    let mut end = MAX;
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}... ({} characters)", &text[..end], text.len())
}

/// Dask's `key_split`: the task-group name of a key
/// (`"('sum-aggregate-1f2e...', 0, 1)"` -> `"sum-aggregate"`).
pub fn key_split(key: &str) -> Cow<'_, str> {
    let mut s = key;
    if s.starts_with('(') {
        // A stringified tuple: take its first element.
        s = s.trim_start_matches('(');
        s = s.split(',').next().unwrap_or(s);
        s = s.trim_matches(|c| c == '\'' || c == '"' || c == ' ' || c == ')');
    }
    let quote = |c| c == '_' || c == '\'' || c == '"';
    let first_len = s.find('-').unwrap_or(s.len());
    let first = &s[..first_len];
    let head_start = first.len() - first.trim_start_matches(quote).len();
    let head = first.trim_matches(quote);
    // Words after the first that are alphabetic (and not 8 hex digits) belong to the name.
    let mut end = first_len;
    let mut rest = &s[first_len..];
    while let Some(r) = rest.strip_prefix('-') {
        let w = &r[..r.find('-').unwrap_or(r.len())];
        let alpha = !w.is_empty() && w.chars().all(|c| c.is_ascii_alphabetic());
        let hex8 = w.len() == 8 && w.chars().all(|c| c.is_ascii_hexdigit());
        if !alpha || hex8 {
            break;
        }
        end += 1 + w.len();
        rest = &r[w.len()..];
    }
    let words = &s[first_len..end];
    // Usually a slice of the key; a copy only when trimming broke it apart.
    let out: Cow<'_, str> = if words.is_empty() || head_start + head.len() == first_len {
        Cow::Borrowed(&s[head_start..head_start + head.len() + words.len()])
    } else {
        Cow::Owned(format!("{head}{words}"))
    };
    if out.len() == 32 && out.chars().all(|c| c.is_ascii_hexdigit()) {
        return Cow::Borrowed("data");
    }
    if out.starts_with('<') {
        let inner = out.trim_matches(|c| c == '<' || c == '>');
        let head = inner.split_whitespace().next().unwrap_or(inner);
        return Cow::Owned(head.rsplit('.').next().unwrap_or(head).to_string());
    }
    if out.is_empty() {
        return Cow::Borrowed(key);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn key_split_matches_dask() {
        assert_eq!(key_split("inc-1a2b3c4d5e6f7a8b9c0d1e2f3a4b5c6d"), "inc");
        assert_eq!(key_split("('sum-aggregate-abcdef0123456789abcdef0123456789', 0, 1)"), "sum-aggregate");
        assert_eq!(key_split("x"), "x");
        assert_eq!(key_split("('random_sample-1f2e3d4c5b6a79881f2e3d4c5b6a7988', 3)"), "random_sample");
        assert_eq!(key_split("my-task-12"), "my-task");
        assert_eq!(key_split("0123456789abcdef0123456789abcdef"), "data");
        assert_eq!(key_split("hello-world-deadbeef"), "hello-world");
        assert_eq!(key_split("_inc_-abc-1"), "inc-abc");
        assert_eq!(key_split("'x'"), "x");
        assert_eq!(key_split("<lambda>-1f2e3d4c"), "lambda");
        assert_eq!(key_split("<function f at 0x7f>"), "function");
        assert_eq!(key_split("-"), "-");
        assert!(matches!(key_split("inc-5a7b3c9d2e1f40718293a4b5c6d7e8f9-12"), Cow::Borrowed("inc")));
    }

    #[test]
    fn brief_cuts_long_messages() {
        let big = Blob::Inline(Bytes::from(vec![b'x'; 100_000]));
        let text = brief(&big);
        assert!(text.len() < 260 && text.ends_with("characters)"), "{text}");
        assert_eq!(brief(&Role::Peer), "Peer");
    }

    #[test]
    fn blob_inline_or_frame() {
        let mut frames = Vec::new();
        let small = Blob::new(Bytes::from_static(b"abc"), &mut frames);
        assert!(matches!(small, Blob::Inline(_)));
        let big = Blob::new(Bytes::from(vec![7u8; INLINE_LIMIT]), &mut frames);
        assert_eq!(big, Blob::Frame(0));
        assert_eq!(big.resolve(&frames).unwrap().len(), INLINE_LIMIT);
        assert_eq!(small.resolve(&frames).unwrap(), Bytes::from_static(b"abc"));
    }
}
