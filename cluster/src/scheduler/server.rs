//! The scheduler's IO shell: accepts connections, runs the handshake, and
//! feeds decoded messages to the single task that owns [`SchedulerState`].
//!
//! Readers and writers run as their own tokio tasks; the core task drains
//! every event that is ready before flushing outgoing messages, so a busy
//! scheduler batches naturally and an idle one answers at once.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use rustc_hash::FxHashMap;
use tokio::net::TcpListener;
use tokio::sync::{mpsc, watch};

use super::events::EventCursor;
use super::state::{PeerId, SchedulerConfig, SchedulerState};
use crate::comm::{self, CommError, Outbox};
use crate::now;
use crate::protocol::{ClusterInfo, Envelope, FromClient, FromWorker, Role, ToClient, ToWorker};
use crate::scheduler::Outgoing;
use crate::security::Security;
use serde::de::DeserializeOwned;

/// Byte counters of everything that crossed the scheduler's sockets.
#[derive(Debug, Default)]
pub struct ByteCounters {
    pub bytes_in: AtomicU64,
    pub bytes_out: Arc<AtomicU64>,
}

/// The sending side of a connection, typed by the peer's role.
enum Link {
    /// A worker, and once it registered, how it is known (for the log).
    Worker { outbox: Outbox<ToWorker>, registered: Option<String> },
    /// A client or a monitor.
    Client { outbox: Outbox<ToClient>, role: Role },
}

impl Link {
    /// Messages queued for this peer and not yet written.
    fn backlog(&self) -> usize {
        match self {
            Link::Worker { outbox, .. } => outbox.backlog(),
            Link::Client { outbox, .. } => outbox.backlog(),
        }
    }
}

/// A subscriber with more than this many messages still unwritten is skipped
/// until it catches up: its next update then covers everything since its
/// last one (bounded by the scheduler's rings), so a subscriber that stops
/// reading costs the scheduler at most this many queued updates.
const SUBSCRIBER_BACKLOG: usize = 2;

/// Messages read from one connection.
enum Inbound {
    Worker(Vec<Envelope<FromWorker>>),
    Client(Vec<Envelope<FromClient>>),
}

enum Event {
    Connected { peer: PeerId, link: Link },
    Batch { peer: PeerId, msgs: Inbound },
    Disconnected { peer: PeerId },
}

/// A running scheduler.
pub struct SchedulerHandle {
    /// `tcp://host:port` the scheduler listens on.
    pub address: String,
    shutdown: watch::Sender<bool>,
    finished: watch::Receiver<bool>,
    pub counters: Arc<ByteCounters>,
    dashboard: Arc<std::sync::Mutex<Option<String>>>,
}

impl SchedulerHandle {
    /// Tell clients where this scheduler's dashboard is (`GetInfo`).
    pub fn set_dashboard(&self, url: Option<String>) {
        *self.dashboard.lock().expect("dashboard") = url;
    }

    /// Ask the scheduler to stop (closes every connection).
    pub fn stop(&self) {
        let _ = self.shutdown.send(true);
    }

    /// Wait until the scheduler has stopped, by itself or after [`stop`](Self::stop).
    pub async fn wait(&self) {
        let mut f = self.finished.clone();
        while !*f.borrow() {
            if f.changed().await.is_err() {
                return;
            }
        }
    }
}

/// Bind `host:port` (port 0 picks a free one) and serve in the current tokio runtime.
/// Every connection must prove `security`'s token (none for an open cluster).
pub async fn start(
    host: &str,
    port: u16,
    config: SchedulerConfig,
    security: Security,
) -> Result<SchedulerHandle, CommError> {
    comm::raise_open_file_limit();
    let listener = TcpListener::bind((host, port)).await?;
    let local = listener.local_addr()?;
    let address = format!("{}://{}:{}", security.scheme(), host_for_address(host, &local), local.port());
    let (shutdown_tx, shutdown_rx) = watch::channel(false);
    let (finished_tx, finished_rx) = watch::channel(false);
    let counters = Arc::new(ByteCounters::default());
    let (events_tx, events_rx) = mpsc::unbounded_channel::<Event>();

    let server_name = address.clone();
    let c2 = counters.clone();
    let mut sd = shutdown_rx.clone();
    tokio::spawn(async move {
        let mut next_peer: PeerId = 1;
        let mut acceptor = comm::Acceptor::new(listener);
        loop {
            tokio::select! {
                _ = sd.changed() => break,
                (stream, from) = acceptor.next() => {
                    let peer = next_peer;
                    next_peer += 1;
                    let tx = events_tx.clone();
                    let name = server_name.clone();
                    let counters = c2.clone();
                    let security = security.clone();
                    tokio::spawn(async move {
                        if let Err(e) = serve_peer(peer, stream, &name, tx, counters, &security).await {
                            tracing::warn!("connection from {from} rejected: {e}");
                        }
                    });
                }
            }
        }
    });

    let core_address = address.clone();
    let c3 = counters.clone();
    let dashboard = Arc::new(std::sync::Mutex::new(None));
    let d2 = dashboard.clone();
    tokio::spawn(async move {
        core_loop(events_rx, shutdown_rx, config, core_address, c3, d2).await;
        let _ = finished_tx.send(true);
    });
    Ok(SchedulerHandle { address, shutdown: shutdown_tx, finished: finished_rx, counters, dashboard })
}

fn host_for_address(host: &str, local: &std::net::SocketAddr) -> String {
    if comm::is_wildcard_host(host) {
        "127.0.0.1".to_string()
    } else {
        local.ip().to_string()
    }
}

async fn serve_peer(
    peer: PeerId,
    stream: tokio::net::TcpStream,
    server_name: &str,
    events: mpsc::UnboundedSender<Event>,
    counters: Arc<ByteCounters>,
    security: &Security,
) -> Result<(), CommError> {
    let serves = [Role::Worker, Role::Client, Role::Monitor];
    let wrong_role = |_| format!("{server_name} is a dask-rs scheduler; data is served by the workers' own addresses");
    let (conn, role) = comm::accept(stream, server_name, &serves, wrong_role, security).await?;
    let comm::Connection { reader, writer, .. } = conn;
    let bytes_out = Some(counters.bytes_out.clone());
    let result = if role == Role::Worker {
        let (outbox, _writer) = comm::spawn_counting_writer(writer, bytes_out);
        let _ = events.send(Event::Connected { peer, link: Link::Worker { outbox, registered: None } });
        read_loop(peer, reader, &events, &counters, Inbound::Worker).await
    } else {
        let (outbox, _writer) = comm::spawn_counting_writer(writer, bytes_out);
        let _ = events.send(Event::Connected { peer, link: Link::Client { outbox, role } });
        read_loop(peer, reader, &events, &counters, Inbound::Client).await
    };
    let _ = events.send(Event::Disconnected { peer });
    result
}

/// Forward every batch `peer` sends to the core task until the connection ends.
async fn read_loop<M: DeserializeOwned>(
    peer: PeerId,
    mut reader: comm::FrameReader<comm::ReadHalf>,
    events: &mpsc::UnboundedSender<Event>,
    counters: &ByteCounters,
    wrap: fn(Vec<Envelope<M>>) -> Inbound,
) -> Result<(), CommError> {
    let mut seen = 0;
    loop {
        match reader.read_batch::<M>().await {
            Ok(msgs) => {
                counters.bytes_in.fetch_add(reader.bytes_read - seen, Ordering::Relaxed);
                seen = reader.bytes_read;
                if events.send(Event::Batch { peer, msgs: wrap(msgs) }).is_err() {
                    return Ok(());
                }
            }
            Err(CommError::Closed) => return Ok(()),
            Err(e) => return Err(e),
        }
    }
}

struct Peer {
    link: Link,
    last_seen: tokio::time::Instant,
}

struct Subscriber {
    cursor: EventCursor,
    interval: Duration,
    next: tokio::time::Instant,
}

/// Everything the core task owns: the state machine and the connections.
struct Core {
    state: SchedulerState,
    peers: FxHashMap<PeerId, Peer>,
    subs: FxHashMap<PeerId, Subscriber>,
    /// The scheduler's own address (for `GetInfo`).
    address: String,
    counters: Arc<ByteCounters>,
    /// The dashboard's link, once one serves this scheduler.
    dashboard: Arc<std::sync::Mutex<Option<String>>>,
    /// A client asked the scheduler to shut down.
    stopping: bool,
    worker_ttl: Duration,
}

async fn core_loop(
    mut events: mpsc::UnboundedReceiver<Event>,
    mut shutdown: watch::Receiver<bool>,
    config: SchedulerConfig,
    address: String,
    counters: Arc<ByteCounters>,
    dashboard: Arc<std::sync::Mutex<Option<String>>>,
) {
    let mut core = Core {
        dashboard,
        worker_ttl: config.worker_ttl,
        state: SchedulerState::new(config),
        peers: FxHashMap::default(),
        subs: FxHashMap::default(),
        address,
        counters,
        stopping: false,
    };
    let mut out = Vec::new();
    let mut tick = tokio::time::interval(Duration::from_millis(50));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
    loop {
        tokio::select! {
            biased;
            _ = shutdown.changed() => core.stopping = true,
            ev = events.recv() => {
                let Some(ev) = ev else { break };
                core.handle(ev);
                // Drain whatever else is ready before flushing: natural batching.
                for _ in 0..10_000 {
                    match events.try_recv() {
                        Ok(ev) => core.handle(ev),
                        Err(_) => break,
                    }
                }
            }
            _ = tick.tick() => core.tick(),
        }
        core.state.drain_outgoing_into(&mut out);
        for (peer, msg) in out.drain(..) {
            core.send(peer, msg);
        }
        if core.stopping {
            core.close_workers("scheduler is shutting down");
            // Dropping the outboxes lets writers flush and close.
            core.peers.clear();
            tokio::time::sleep(Duration::from_millis(50)).await;
            break;
        }
    }
}

impl Core {
    fn handle(&mut self, ev: Event) {
        match ev {
            Event::Connected { peer, link } => {
                if matches!(link, Link::Client { role: Role::Client, .. }) {
                    self.state.add_client(peer);
                }
                self.peers.insert(peer, Peer { link, last_seen: tokio::time::Instant::now() });
            }
            Event::Disconnected { peer } => self.drop_peer(peer),
            Event::Batch { peer, msgs } => {
                let Some(p) = self.peers.get_mut(&peer) else { return };
                p.last_seen = tokio::time::Instant::now();
                let result = match msgs {
                    Inbound::Worker(msgs) => msgs.into_iter().try_for_each(|env| self.on_worker(peer, env)),
                    Inbound::Client(msgs) => msgs.into_iter().try_for_each(|env| self.on_client(peer, env)),
                };
                if let Err(reason) = result {
                    tracing::warn!("peer {peer}: {reason}");
                    if let Some(p) = self.peers.get(&peer) {
                        match &p.link {
                            Link::Worker { outbox, .. } => drop(outbox.send(ToWorker::Error { reason }.into())),
                            Link::Client { outbox, .. } => drop(outbox.send(ToClient::Error { reason }.into())),
                        }
                    }
                    // Dropping the outbox closes the writer and so the connection.
                    self.drop_peer(peer);
                }
            }
        }
    }

    /// Forget a peer whose connection ended (or that broke the protocol).
    fn drop_peer(&mut self, peer: PeerId) {
        if let Some(p) = self.peers.remove(&peer) {
            match p.link {
                Link::Worker { registered, .. } => {
                    if let Some(who) = registered {
                        tracing::info!("worker {who} left");
                    }
                    self.state.remove_worker(peer)
                }
                Link::Client { role: Role::Client, .. } => self.state.remove_client(peer),
                Link::Client { .. } => {}
            }
        }
        self.subs.remove(&peer);
    }

    fn on_worker(&mut self, peer: PeerId, env: Envelope<FromWorker>) -> Result<(), String> {
        let Some(Peer { link: Link::Worker { registered, .. }, .. }) = self.peers.get_mut(&peer) else {
            return Ok(());
        };
        let joining = match (&env.msg, registered.is_some()) {
            (FromWorker::RegisterWorker(r), false) => Some(format!("{} at {}", r.name, r.address)),
            (FromWorker::RegisterWorker(_), true) => return Err("a worker registers only once".into()),
            (_, false) => return Err("a worker must send RegisterWorker first".into()),
            _ => None,
        };
        let threads = match &env.msg {
            FromWorker::RegisterWorker(r) => r.nthreads,
            _ => 0,
        };
        self.state.handle_worker(peer, env)?;
        if let Some(who) = joining {
            tracing::info!("worker {who} joined ({threads} threads)");
            *registered = Some(who);
        }
        Ok(())
    }

    fn on_client(&mut self, peer: PeerId, env: Envelope<FromClient>) -> Result<(), String> {
        let role = match self.peers.get(&peer) {
            Some(Peer { link: Link::Client { role, .. }, .. }) => *role,
            _ => return Ok(()),
        };
        match env.msg {
            FromClient::GetInfo { id } => {
                let info = ClusterInfo {
                    address: self.address.clone(),
                    workers: self.state.worker_infos(),
                    ntasks: self.state.ntasks() as u64,
                    nclients: self.state.nclients() as u64,
                    bytes_in: self.counters.bytes_in.load(Ordering::Relaxed),
                    bytes_out: self.counters.bytes_out.load(Ordering::Relaxed),
                    dashboard: self.dashboard.lock().expect("dashboard").clone(),
                    queued: self.peers.values().map(|p| p.link.backlog() as u64).sum(),
                };
                self.send(peer, Outgoing::Client(ToClient::Info { id, info }.into()));
            }
            FromClient::Subscribe { interval_ms } => {
                let sub = Subscriber {
                    cursor: EventCursor::default(),
                    interval: Duration::from_millis(interval_ms.max(10)),
                    next: tokio::time::Instant::now(),
                };
                self.subs.insert(peer, sub);
            }
            // A monitor observes and may retire workers (the console's
            // scale-down); everything else needs a client.
            FromClient::RetireWorkers { .. } => self.state.handle_client(peer, env, now())?,
            ref other if role == Role::Monitor => {
                return Err(format!("a monitor may not send {}", variant_name(other)));
            }
            FromClient::Shutdown => self.stopping = true,
            _ => self.state.handle_client(peer, env, now())?,
        }
        Ok(())
    }

    /// Hand `msg` to `peer`'s writer, if the peer is still there and of the
    /// kind the message is for.
    fn send(&self, peer: PeerId, msg: Outgoing) {
        match (self.peers.get(&peer).map(|p| &p.link), msg) {
            (Some(Link::Worker { outbox, .. }), Outgoing::Worker(env)) => drop(outbox.send(env)),
            (Some(Link::Client { outbox, .. }), Outgoing::Client(env)) => drop(outbox.send(env)),
            (Some(_), msg) => tracing::error!("scheduler addressed {msg:?} to peer {peer} of the other kind"),
            (None, _) => {}
        }
    }

    fn close_workers(&self, reason: &str) {
        for p in self.peers.values() {
            if let Link::Worker { outbox, .. } = &p.link {
                let _ = outbox.send(ToWorker::CloseWorker { reason: reason.into() }.into());
            }
        }
    }

    /// Periodic work: silent workers, coordination timeouts, balancing and
    /// the subscribers' updates.
    fn tick(&mut self) {
        let now_i = tokio::time::Instant::now();
        let ttl = self.worker_ttl;
        let silent: Vec<PeerId> = self
            .peers
            .iter()
            .filter(|(_, p)| matches!(p.link, Link::Worker { .. }) && now_i.duration_since(p.last_seen) > ttl)
            .map(|(id, _)| *id)
            .collect();
        for peer in silent {
            tracing::warn!("worker {peer} sent nothing for {ttl:?}; removing it");
            let reason = format!("no heartbeat for {ttl:?}");
            self.send(peer, Outgoing::Worker(ToWorker::CloseWorker { reason }.into()));
            self.drop_peer(peer);
        }
        let t = now();
        self.state.coordination_tick(t);
        self.state.balance();
        self.state.forget_empty_groups();
        let mut due = Vec::new();
        for (&peer, sub) in self.subs.iter_mut() {
            let backlog = self.peers.get(&peer).map_or(0, |p| p.link.backlog());
            if now_i >= sub.next && backlog <= SUBSCRIBER_BACKLOG {
                sub.next = now_i + sub.interval;
                due.push((peer, self.state.events_since(&mut sub.cursor, t)));
            }
        }
        for (peer, update) in due {
            self.send(peer, Outgoing::Client(ToClient::Events(update).into()));
        }
    }
}

fn variant_name(m: &FromClient) -> String {
    let s = format!("{m:?}");
    s.split(|c: char| !c.is_alphanumeric()).next().unwrap_or("?").to_string()
}
