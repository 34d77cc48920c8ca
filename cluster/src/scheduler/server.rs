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
use crate::protocol::{CoordOp, Envelope, Msg, Role};

/// Byte counters of everything that crossed the scheduler's sockets.
#[derive(Debug, Default)]
pub struct ByteCounters {
    pub bytes_in: AtomicU64,
    pub bytes_out: Arc<AtomicU64>,
}

enum Event {
    Connected { peer: PeerId, role: Role, outbox: Outbox },
    Batch { peer: PeerId, msgs: Vec<Envelope> },
    Disconnected { peer: PeerId },
}

/// A running scheduler.
pub struct SchedulerHandle {
    /// `tcp://host:port` the scheduler listens on.
    pub address: String,
    shutdown: watch::Sender<bool>,
    finished: watch::Receiver<bool>,
    pub counters: Arc<ByteCounters>,
}

impl SchedulerHandle {
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
pub async fn start(host: &str, port: u16, config: SchedulerConfig) -> Result<SchedulerHandle, CommError> {
    let listener = TcpListener::bind((host, port)).await?;
    let local = listener.local_addr()?;
    let address = format!("tcp://{}:{}", host_for_address(host, &local), local.port());
    let (shutdown_tx, shutdown_rx) = watch::channel(false);
    let (finished_tx, finished_rx) = watch::channel(false);
    let counters = Arc::new(ByteCounters::default());
    let (events_tx, events_rx) = mpsc::unbounded_channel::<Event>();

    let server_name = address.clone();
    let c2 = counters.clone();
    let mut sd = shutdown_rx.clone();
    tokio::spawn(async move {
        let mut next_peer: PeerId = 1;
        loop {
            tokio::select! {
                _ = sd.changed() => break,
                accepted = listener.accept() => {
                    let Ok((stream, from)) = accepted else { continue };
                    let peer = next_peer;
                    next_peer += 1;
                    let tx = events_tx.clone();
                    let name = server_name.clone();
                    let counters = c2.clone();
                    tokio::spawn(async move {
                        if let Err(e) = serve_peer(peer, stream, &name, tx, counters).await {
                            tracing::warn!("connection from {from} rejected: {e}");
                        }
                    });
                }
            }
        }
    });

    let core_address = address.clone();
    let c3 = counters.clone();
    tokio::spawn(async move {
        core_loop(events_rx, shutdown_rx, config, core_address, c3).await;
        let _ = finished_tx.send(true);
    });
    Ok(SchedulerHandle { address, shutdown: shutdown_tx, finished: finished_rx, counters })
}

fn host_for_address(host: &str, local: &std::net::SocketAddr) -> String {
    if host.is_empty() || host == "0.0.0.0" || host == "::" {
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
) -> Result<(), CommError> {
    let (conn, role) = comm::accept(stream, server_name).await?;
    let comm::Connection { mut reader, writer, .. } = conn;
    let (outbox, _writer) = comm::spawn_counting_writer(writer, Some(counters.bytes_out.clone()));
    let _ = events.send(Event::Connected { peer, role, outbox });
    let mut seen = 0;
    let result = loop {
        match reader.read_batch().await {
            Ok(msgs) => {
                counters.bytes_in.fetch_add(reader.bytes_read - seen, Ordering::Relaxed);
                seen = reader.bytes_read;
                if events.send(Event::Batch { peer, msgs }).is_err() {
                    break Ok(());
                }
            }
            Err(CommError::Closed) => break Ok(()),
            Err(e) => break Err(e),
        }
    };
    let _ = events.send(Event::Disconnected { peer });
    result
}

struct Peer {
    role: Role,
    outbox: Outbox,
    registered_worker: bool,
    last_seen: tokio::time::Instant,
}

struct Subscriber {
    cursor: EventCursor,
    interval: Duration,
    next: tokio::time::Instant,
}

async fn core_loop(
    mut events: mpsc::UnboundedReceiver<Event>,
    mut shutdown: watch::Receiver<bool>,
    config: SchedulerConfig,
    address: String,
    counters: Arc<ByteCounters>,
) {
    let worker_ttl = config.worker_ttl;
    let mut state = SchedulerState::new(config);
    let mut peers: FxHashMap<PeerId, Peer> = FxHashMap::default();
    let mut subs: FxHashMap<PeerId, Subscriber> = FxHashMap::default();
    let mut out = Vec::new();
    let mut tick = tokio::time::interval(Duration::from_millis(50));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
    let mut stopping = false;
    loop {
        tokio::select! {
            biased;
            _ = shutdown.changed() => stopping = true,
            ev = events.recv() => {
                let Some(ev) = ev else { break };
                handle(&mut state, &mut peers, &mut subs, ev, &address, &counters, &mut stopping);
                // Drain whatever else is ready before flushing: natural batching.
                for _ in 0..10_000 {
                    match events.try_recv() {
                        Ok(ev) => handle(&mut state, &mut peers, &mut subs, ev, &address, &counters, &mut stopping),
                        Err(_) => break,
                    }
                }
            }
            _ = tick.tick() => {
                let now_i = tokio::time::Instant::now();
                let ttl = worker_ttl;
                let silent: Vec<PeerId> = peers
                    .iter()
                    .filter(|(_, p)| p.role == Role::Worker && now_i.duration_since(p.last_seen) > ttl)
                    .map(|(id, _)| *id)
                    .collect();
                for peer in silent {
                    tracing::warn!("worker {peer} sent nothing for {ttl:?}; removing it");
                    if let Some(p) = peers.remove(&peer) {
                        let reason = format!("no heartbeat for {ttl:?}");
                        let _ = p.outbox.send(Envelope::new(Msg::CloseWorker { reason }));
                    }
                    state.remove_worker(peer);
                    subs.remove(&peer);
                }
                let t = now();
                state.coordination_tick(t);
                state.balance();
                for (peer, sub) in subs.iter_mut() {
                    if now_i >= sub.next {
                        sub.next = now_i + sub.interval;
                        let update = state.events_since(&mut sub.cursor, t);
                        if let Some(p) = peers.get(peer) {
                            let _ = p.outbox.send(Envelope::new(Msg::Events(update)));
                        }
                    }
                }
            }
        }
        state.drain_outgoing_into(&mut out);
        for (peer, env) in out.drain(..) {
            if let Some(p) = peers.get(&peer) {
                let _ = p.outbox.send(env);
            }
        }
        if stopping {
            for p in peers.values() {
                if p.role == Role::Worker {
                    let _ =
                        p.outbox.send(Envelope::new(Msg::CloseWorker { reason: "scheduler is shutting down".into() }));
                }
            }
            // Dropping the outboxes lets writers flush and close.
            peers.clear();
            tokio::time::sleep(Duration::from_millis(50)).await;
            break;
        }
    }
}

#[allow(clippy::too_many_arguments)]
fn handle(
    state: &mut SchedulerState,
    peers: &mut FxHashMap<PeerId, Peer>,
    subs: &mut FxHashMap<PeerId, Subscriber>,
    ev: Event,
    address: &str,
    counters: &ByteCounters,
    stopping: &mut bool,
) {
    match ev {
        Event::Connected { peer, role, outbox } => {
            if role == Role::Client {
                state.add_client(peer);
            }
            peers.insert(peer, Peer { role, outbox, registered_worker: false, last_seen: tokio::time::Instant::now() });
        }
        Event::Disconnected { peer } => {
            if let Some(p) = peers.remove(&peer) {
                match p.role {
                    Role::Worker => state.remove_worker(peer),
                    Role::Client => state.remove_client(peer),
                    _ => {}
                }
            }
            subs.remove(&peer);
        }
        Event::Batch { peer, msgs } => {
            if let Some(p) = peers.get_mut(&peer) {
                p.last_seen = tokio::time::Instant::now();
            }
            for env in msgs {
                let Some(p) = peers.get_mut(&peer) else {
                    return;
                };
                let role = p.role;
                if let Err(reason) = handle_msg(state, p, subs, peer, role, env, address, counters, stopping) {
                    tracing::warn!("peer {peer}: {reason}");
                    let _ = p.outbox.send(Envelope::new(Msg::Error { reason }));
                    // Dropping the outbox closes the writer and so the connection.
                    if let Some(p) = peers.remove(&peer) {
                        if p.role == Role::Worker {
                            state.remove_worker(peer);
                        } else if p.role == Role::Client {
                            state.remove_client(peer);
                        }
                    }
                    return;
                }
            }
        }
    }
}

#[allow(clippy::too_many_arguments)]
fn handle_msg(
    state: &mut SchedulerState,
    p: &mut Peer,
    subs: &mut FxHashMap<PeerId, Subscriber>,
    peer: PeerId,
    role: Role,
    env: Envelope,
    address: &str,
    counters: &ByteCounters,
    stopping: &mut bool,
) -> Result<(), String> {
    let Envelope { msg, frames } = env;
    match (role, msg) {
        (Role::Worker, Msg::RegisterWorker(reg)) => {
            state.add_worker(peer, reg)?;
            p.registered_worker = true;
        }
        (Role::Worker, _) if !p.registered_worker => return Err("a worker must send RegisterWorker first".into()),
        (Role::Worker, Msg::TaskFinished { key, nbytes, start, stop, thread, transfer, .. }) => {
            state.task_finished(peer, &key, nbytes, start, stop, thread, transfer)
        }
        (Role::Worker, Msg::TaskErred { key, exception, traceback, text, start, stop, thread }) => {
            let exception = exception.resolve(&frames).unwrap_or_default();
            let traceback = traceback.resolve(&frames).unwrap_or_default();
            state.task_erred(peer, &key, exception, traceback, text, start, stop, thread)
        }
        (Role::Worker, Msg::AddKeys { keys }) => state.add_keys(peer, &keys),
        (Role::Worker, Msg::TaskSeceded { key }) => state.task_seceded(peer, &key),
        (Role::Worker, Msg::StealResponse { key, stolen }) => state.steal_response(peer, &key, stolen),
        (Role::Worker, Msg::MissingData { key, workers }) => state.missing_data(peer, &key, &workers),
        (Role::Worker, Msg::Heartbeat { rss, spilled, executing, ready, bytes_in, bytes_out, .. }) => {
            state.worker_metrics(peer, rss, spilled, executing, ready, bytes_in, bytes_out)
        }
        (Role::Client, Msg::UpdateGraph { tasks, wanted }) => {
            let mut with_specs = Vec::with_capacity(tasks.len());
            for t in tasks {
                let spec = t.run_spec.resolve(&frames).ok_or("run_spec refers to a missing frame")?;
                with_specs.push((t, Some(spec)));
            }
            state.update_graph(peer, with_specs, wanted)
        }
        (Role::Client, Msg::WantKeys { keys }) => state.want_keys(peer, keys),
        (Role::Client, Msg::ReleaseKeys { keys }) => state.release_keys(peer, &keys),
        (Role::Client, Msg::CancelKeys { keys }) => state.cancel_keys(peer, keys),
        (Role::Client, Msg::ScatterDone { keys, worker }) => state.scatter_done(peer, &worker, keys),
        (Role::Client, Msg::WhoHas { id, keys }) => state.who_has_reply(peer, id, keys),
        (Role::Client | Role::Monitor, Msg::GetInfo { id }) => {
            let _ = p.outbox.send(Envelope::new(Msg::Info {
                id,
                address: address.to_string(),
                workers: state.worker_infos(),
                ntasks: state.ntasks() as u64,
                nclients: state.nclients() as u64,
                bytes_in: counters.bytes_in.load(Ordering::Relaxed),
                bytes_out: counters.bytes_out.load(Ordering::Relaxed),
            }));
        }
        (Role::Client | Role::Monitor, Msg::Subscribe { interval_ms }) => {
            subs.insert(
                peer,
                Subscriber {
                    cursor: EventCursor::default(),
                    interval: Duration::from_millis(interval_ms.max(10)),
                    next: tokio::time::Instant::now(),
                },
            );
        }
        (Role::Client, Msg::Shutdown) => *stopping = true,
        (Role::Client, Msg::RetryKeys { keys }) => state.retry_keys(&keys),
        (Role::Client, Msg::FireAndForget { keys }) => state.fire_and_forget(&keys),
        (Role::Client, Msg::Replicate { keys, n }) => state.replicate(&keys, n as usize),
        (Role::Client, Msg::Restart) => state.restart(),
        (Role::Client, Msg::Rebalance { id, keys, workers }) => state.rebalance(peer, id, keys, workers),
        (Role::Client, Msg::PublishDataset { id, name, keys, data, overwrite }) => {
            let data = data.resolve(&frames).ok_or("dataset refers to a missing frame")?;
            state.publish_dataset(peer, id, name, keys, data, overwrite)
        }
        (Role::Client, Msg::UnpublishDataset { id, name }) => state.unpublish_dataset(peer, id, &name),
        (Role::Client, Msg::GetDataset { id, name }) => state.get_dataset(peer, id, &name),
        (Role::Client, Msg::ListDatasets { id }) => state.list_datasets(peer, id),
        (Role::Client | Role::Monitor, Msg::RetireWorkers { id, workers }) => state.retire_workers(peer, id, workers),
        (Role::Client, Msg::Coord { id, op }) => {
            let value = match &op {
                CoordOp::VariableSet { value, .. } | CoordOp::QueuePut { value, .. } => {
                    Some(value.resolve(&frames).ok_or("coordination value refers to a missing frame")?)
                }
                _ => None,
            };
            state.coordinate(peer, id, op, value, now())
        }
        (_, Msg::Error { reason }) => tracing::warn!("peer {peer} reported: {reason}"),
        (role, other) => {
            return Err(format!("unexpected message from a {role:?}: {}", variant_name(&other)));
        }
    }
    Ok(())
}

fn variant_name(m: &Msg) -> String {
    let s = format!("{m:?}");
    s.split(|c: char| !c.is_alphanumeric()).next().unwrap_or("?").to_string()
}
