//! Fuzzing with mutations of real captured traffic: a client's session with
//! the scheduler, a worker's, and a peer's requests to a worker's data port,
//! recorded through proxies from live processes.
//!
//! - Structured, in process: mutated streams go through the frame reader (no
//!   allocation sized by what a peer merely declares) and whatever decodes is
//!   fed to a scheduler state machine, whose invariants are checked after
//!   every batch. A failure prints the stream that caused it.
//! - Network: for `DASK_RS_FUZZ_SECS` (default 60) seconds, peers send random
//!   bytes and mutated streams to a live scheduler and a live worker while a
//!   legitimate client keeps computing and checking its answers. Nothing may
//!   crash, memory must stay bounded, every legitimate answer must be right.
//!
//! `DASK_RS_FUZZ_SEED` replays a run (the seed is printed); `make fuzz` runs
//! both for longer.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use cluster::client::{ClientCore, KeyStatus};
use cluster::comm::{FrameReader, Limits};
use cluster::protocol::{DataRequest, Envelope, FromClient, FromWorker, Handshake, Role};
use cluster::scheduler::{SchedulerConfig, SchedulerState};
use cluster::security::Security;
use cluster::sim::{graphs, sim_count};

#[allow(dead_code)]
mod common;
#[path = "common/fuzz.rs"]
mod fuzz;
use common::{hostport, Proc, BIN};
use fuzz::Rng;

/// Counts each thread's live heap bytes and their peak, so the decoder's
/// allocations can be bounded by what actually arrived.
struct Counting;

thread_local! {
    static LIVE: std::cell::Cell<isize> = const { std::cell::Cell::new(0) };
    static PEAK: std::cell::Cell<isize> = const { std::cell::Cell::new(0) };
}

fn track(delta: isize) {
    let _ = LIVE.try_with(|live| {
        let now = live.get() + delta;
        live.set(now);
        let _ = PEAK.try_with(|peak| peak.set(peak.get().max(now)));
    });
}

// SAFETY: every call forwards to the system allocator unchanged; the
// bookkeeping touches only const-initialised thread-locals.
unsafe impl std::alloc::GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: std::alloc::Layout) -> *mut u8 {
        let p = unsafe { std::alloc::System.alloc(layout) };
        if !p.is_null() {
            track(layout.size() as isize);
        }
        p
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: std::alloc::Layout) {
        unsafe { std::alloc::System.dealloc(ptr, layout) };
        track(-(layout.size() as isize));
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: std::alloc::Layout, new_size: usize) -> *mut u8 {
        let p = unsafe { std::alloc::System.realloc(ptr, layout, new_size) };
        if !p.is_null() {
            track(new_size as isize - layout.size() as isize);
        }
        p
    }
}

#[global_allocator]
static ALLOC: Counting = Counting;

/// Run `f`, returning its result and the most heap it held at once on
/// this thread beyond what was live before.
fn peak_of<T>(f: impl FnOnce() -> T) -> (T, usize) {
    let base = LIVE.with(|l| l.get());
    PEAK.with(|p| p.set(base));
    let out = f();
    (out, (PEAK.with(|p| p.get()) - base).max(0) as usize)
}

fn client(addr: &str, name: &str) -> ClientCore {
    ClientCore::connect(addr, name, Duration::from_secs(5), &Security::open()).expect("connect")
}

fn rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .unwrap_or(0)
}

fn worker_address(c: &ClientCore, name: &str) -> String {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        if let Some(w) = c.info().ok().and_then(|i| i.workers.into_iter().find(|w| w.name == name)) {
            return w.address;
        }
        assert!(Instant::now() < deadline, "worker {name} did not join");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// A merge of `n` leaves under `prefix`, its answer fetched from the worker
/// holding it: the simulated tasks count what they depend on, so it is `n + 1`.
fn merge_answer(c: &ClientCore, prefix: &str, n: usize) -> Result<u64, String> {
    let (mut tasks, _) = graphs::merge(n);
    for t in &mut tasks {
        t.key = format!("{prefix}-{}", t.key);
        for d in &mut t.deps {
            *d = format!("{prefix}-{d}");
        }
    }
    let total = tasks.last().unwrap().key.clone();
    c.submit(tasks, vec![], vec![], vec![total.clone()]).map_err(|e| e.to_string())?;
    if !c.wait(std::slice::from_ref(&total), Some(Duration::from_secs(60)), false).map_err(|e| e.to_string())? {
        return Err(format!("{total} not done within 60 s"));
    }
    let Some(KeyStatus::Finished { workers, .. }) = c.status(&total) else { return Err("no status".into()) };
    let (items, missing) = c.get_data(&workers[0], vec![total.clone()]).map_err(|e| e.to_string())?;
    c.release(vec![total]).map_err(|e| e.to_string())?;
    if !missing.is_empty() {
        return Err(format!("missing {missing:?}"));
    }
    Ok(sim_count(&items[0].1[0]))
}

/// Whether the server, reading `stream`, would act on a command that is
/// destructive by design (shut down, restart, retire workers, run a
/// function). Such a stream is a legitimate request of an open cluster, not
/// malformed input, so the fuzzer leaves it out.
async fn destructive(stream: &[u8]) -> bool {
    let mut r = FrameReader::new(stream);
    if r.read_magic().await.is_err() {
        return false;
    }
    let role = match r.read_batch_within::<Handshake>(Limits::HANDSHAKE).await.ok().and_then(|b| b.into_iter().next()) {
        Some(e) => match e.msg {
            Handshake::Hello { role, .. } => role,
            _ => return false,
        },
        None => return false,
    };
    loop {
        let bad = match role {
            Role::Client | Role::Monitor => match r.read_batch::<FromClient>().await {
                Ok(b) => b.iter().any(|e| {
                    matches!(e.msg, FromClient::Shutdown | FromClient::Restart | FromClient::RetireWorkers { .. })
                }),
                Err(_) => return false,
            },
            Role::Peer => match r.read_batch::<DataRequest>().await {
                Ok(b) => b.iter().any(|e| matches!(e.msg, DataRequest::RunFunction { .. })),
                Err(_) => return false,
            },
            Role::Worker => return false,
        };
        if bad {
            return true;
        }
    }
}

/// What a server would read from `stream`: the role declared in its
/// `Hello`, then every batch it decodes before the first error.
enum Decoded {
    Nothing,
    Worker(Vec<Vec<Envelope<FromWorker>>>),
    Client(Role, Vec<Vec<Envelope<FromClient>>>),
    Peer,
}

async fn decode(stream: &[u8]) -> Decoded {
    let mut r = FrameReader::new(stream);
    if r.read_magic().await.is_err() {
        return Decoded::Nothing;
    }
    let role = match r.read_batch_within::<Handshake>(Limits::HANDSHAKE).await.ok().and_then(|b| b.into_iter().next()) {
        Some(Envelope { msg: Handshake::Hello { role, .. }, .. }) => role,
        _ => return Decoded::Nothing,
    };
    match role {
        Role::Worker => {
            let mut batches = Vec::new();
            while let Ok(b) = r.read_batch::<FromWorker>().await {
                batches.push(b);
            }
            Decoded::Worker(batches)
        }
        Role::Client | Role::Monitor => {
            let mut batches = Vec::new();
            while let Ok(b) = r.read_batch::<FromClient>().await {
                batches.push(b);
            }
            Decoded::Client(role, batches)
        }
        Role::Peer => {
            while r.read_batch::<DataRequest>().await.is_ok() {}
            Decoded::Peer
        }
    }
}

/// Feed what a peer sent to the scheduler's state machine as the server
/// would (a worker must register first; connection-level requests are the
/// server's), checking every invariant after each batch. `Err` describes a
/// broken invariant.
fn feed(state: &mut SchedulerState, peer: u64, decoded: Decoded, disconnect: bool) -> Result<usize, String> {
    let mut handled = 0;
    let mut out = Vec::new();
    match decoded {
        Decoded::Worker(batches) => {
            let mut registered = false;
            'conn: for batch in batches {
                for env in batch {
                    let first = matches!(env.msg, FromWorker::RegisterWorker(_));
                    if first == registered || state.handle_worker(peer, env).is_err() {
                        break 'conn;
                    }
                    registered = true;
                    handled += 1;
                }
                state.validate()?;
                state.drain_outgoing_into(&mut out);
            }
            if registered && disconnect {
                state.remove_worker(peer);
            }
        }
        Decoded::Client(Role::Client, batches) => {
            state.add_client(peer);
            'conn: for batch in batches {
                for env in batch {
                    if matches!(
                        env.msg,
                        FromClient::GetInfo { .. } | FromClient::Subscribe { .. } | FromClient::Shutdown
                    ) {
                        continue;
                    }
                    if state.handle_client(peer, env, cluster::now()).is_err() {
                        break 'conn;
                    }
                    handled += 1;
                }
                state.validate()?;
                state.drain_outgoing_into(&mut out);
            }
            if disconnect {
                state.remove_client(peer);
            }
        }
        _ => {}
    }
    state.coordination_tick(cluster::now());
    state.balance();
    state.forget_empty_groups();
    state.validate()?;
    state.drain_outgoing_into(&mut out);
    Ok(handled)
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Where the handshake (magic and `Hello`) ends in a captured stream.
async fn handshake_len(stream: &[u8]) -> usize {
    let mut r = FrameReader::new(stream);
    r.read_magic().await.expect("captured magic");
    r.read_batch_within::<Handshake>(Limits::HANDSHAKE).await.expect("captured hello");
    4 + r.bytes_read as usize
}

/// One fuzz connection: send `bytes` to `target`, read a little of the
/// answer (or, now and then, none of it while holding the connection).
fn poke(target: &str, bytes: &[u8], rng: &mut Rng) {
    let Ok(mut s) = TcpStream::connect(hostport(target)) else { return };
    let _ = s.set_write_timeout(Some(Duration::from_secs(1)));
    let _ = s.set_read_timeout(Some(Duration::from_millis(30)));
    if rng.chance(30) && bytes.len() > 8 {
        // In pieces, as a slow network delivers them.
        let cut = 1 + rng.below(bytes.len() - 1);
        let _ = s.write_all(&bytes[..cut]);
        std::thread::sleep(Duration::from_millis(rng.below(20) as u64));
        let _ = s.write_all(&bytes[cut..]);
    } else {
        let _ = s.write_all(bytes);
    }
    if rng.chance(5) {
        std::thread::sleep(Duration::from_millis(500));
        return;
    }
    let mut buf = [0u8; 16 * 1024];
    let until = Instant::now() + Duration::from_millis(30);
    while Instant::now() < until {
        match s.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(_) => {}
        }
    }
}

/// A live scheduler and worker, a legitimate client, and the traffic
/// captured from real sessions with them.
struct Cluster {
    dir: std::path::PathBuf,
    sched: Proc,
    worker: Proc,
    addr: String,
    legit: ClientCore,
    /// (target address, captured bytes, where the handshake ends)
    streams: Vec<(String, Vec<u8>, usize)>,
}

fn capture(tag: &str) -> Cluster {
    let dir = std::env::temp_dir().join(format!("dask-rs-fuzz-{}-{tag}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let log = |name: &str| std::fs::File::create(dir.join(name)).unwrap();
    let mut sched = Command::new(BIN)
        .args(["scheduler", "--port", "0", "--no-dashboard"])
        .stdout(Stdio::piped())
        .stderr(log("scheduler.log"))
        .spawn()
        .unwrap();
    let mut line = String::new();
    std::io::BufRead::read_line(&mut std::io::BufReader::new(sched.stdout.take().unwrap()), &mut line).unwrap();
    let addr = line.trim().strip_prefix("Scheduler at ").expect("address line").to_string();
    let sched = Proc(sched);
    let spawn_worker = |to: &str, name: &str| {
        Proc(
            Command::new(BIN)
                .args(["sim-worker", to, "--name", name, "--nthreads", "2"])
                .stdout(Stdio::null())
                .stderr(log(&format!("{name}.log")))
                .spawn()
                .unwrap(),
        )
    };
    let worker = spawn_worker(&addr, "w");
    let legit = client(&addr, "legit");
    let data_addr = worker_address(&legit, "w");

    // Capture real traffic through recording proxies.
    let (proxy, client_stream) = fuzz::recording_proxy(&addr);
    {
        let c = client(&proxy, "captured");
        assert_eq!(merge_answer(&c, "cap", 20), Ok(21));
        c.subscribe(Duration::from_millis(20)).unwrap();
        let _ = c.take_events(Duration::from_millis(100));
        c.who_has(vec!["cap-x".into()]).unwrap();
        c.cancel(vec!["cap-nothing".into()]).unwrap();
    }
    let (proxy, worker_stream) = fuzz::recording_proxy(&addr);
    {
        let capw = spawn_worker(&proxy, "cap");
        worker_address(&legit, "cap");
        assert_eq!(merge_answer(&legit, "warm", 30), Ok(31));
        drop(capw);
    }
    let (proxy, peer_stream) = fuzz::recording_proxy(&data_addr);
    {
        let c = client(&addr, "peer");
        c.scatter(&proxy, vec![("cap-scattered".into(), vec![bytes::Bytes::from_static(b"hello")])]).unwrap();
        let _ = c.get_data(&proxy, vec!["cap-scattered".into(), "cap-none".into()]);
    }
    std::thread::sleep(Duration::from_millis(300));
    let rt = tokio::runtime::Builder::new_current_thread().build().unwrap();
    let captured = [(&addr, client_stream), (&addr, worker_stream), (&data_addr, peer_stream)];
    let streams = captured
        .into_iter()
        .map(|(target, s)| {
            let s = s.lock().unwrap().clone();
            let hello = rt.block_on(handshake_len(&s));
            assert!(s.len() > hello + 64, "captured {} bytes for {target}", s.len());
            (target.clone(), s, hello)
        })
        .collect();

    Cluster { dir, sched, worker, addr, legit, streams }
}

#[test]
fn mutated_traffic_cannot_overallocate_the_decoder_or_break_the_scheduler_state() {
    let Cluster { dir, streams, .. } = capture("state");
    let seed = fuzz::seed();
    let run_for = fuzz::duration(60) / 4;
    println!("structured fuzz: seed {seed} (DASK_RS_FUZZ_SEED), {run_for:?}");
    let mut rng = Rng(seed);
    let rt = tokio::runtime::Builder::new_current_thread().build().unwrap();
    let started = Instant::now();
    let (mut inputs, mut messages, mut peak_max) = (0u64, 0usize, (0usize, 0usize));
    let mut state = SchedulerState::new(SchedulerConfig::default());
    let mut peer = 0u64;
    while started.elapsed() < run_for {
        if rng.chance(2) {
            state = SchedulerState::new(SchedulerConfig::default());
        }
        let (_, base, hello) = &streams[rng.below(streams.len())];
        let other = &streams[rng.below(streams.len())].1;
        let bytes = fuzz::mutate(&mut rng, base, *hello, other);
        let (decoded, peak) = peak_of(|| rt.block_on(decode(&bytes)));
        // Frame buffers start at most 1 MiB before bytes arrive, then grow
        // with what arrives; decoded values are proportional to the input.
        let bound = (4 << 20) + 32 * bytes.len();
        assert!(peak <= bound, "decoding {} bytes held {peak} bytes (seed {seed}): {}", bytes.len(), hex(&bytes));
        peak_max = peak_max.max((peak, bytes.len()));
        peer += 1;
        let disconnect = rng.chance(70);
        let fed =
            std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| feed(&mut state, peer, decoded, disconnect)));
        match fed {
            Ok(Ok(n)) => messages += n,
            Ok(Err(broken)) => panic!("invariant broken: {broken} (seed {seed}) after stream {}", hex(&bytes)),
            Err(_) => {
                let text = match rt.block_on(decode(&bytes)) {
                    Decoded::Worker(b) => format!("{b:?}"),
                    Decoded::Client(_, b) => format!("{b:?}"),
                    _ => String::new(),
                };
                panic!("the scheduler state panicked (seed {seed}) on stream {}\nmessages: {text:.6000}", hex(&bytes))
            }
        }
        inputs += 1;
    }
    println!(
        "structured fuzz: {inputs} mutated streams, {messages} messages handled by the state machine, \
         most heap held while decoding one: {} bytes (for {} bytes of input)",
        peak_max.0, peak_max.1
    );
    assert!(inputs > 1000 && messages > 1000, "{inputs} streams, {messages} messages");
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn fuzzed_peers_cannot_crash_or_bloat_a_live_cluster() {
    let Cluster { dir, sched, worker, addr, legit, streams } = capture("net");
    let seed = fuzz::seed();
    let run_for = fuzz::duration(60);
    println!("network fuzz: seed {seed} (DASK_RS_FUZZ_SEED), {run_for:?}");
    let rss_start = (rss_kib(sched.0.id()), rss_kib(worker.0.id()));
    let stop = Arc::new(AtomicBool::new(false));
    let sent = Arc::new(AtomicU64::new(0));
    let skipped = Arc::new(AtomicU64::new(0));
    let peak = Arc::new(AtomicU64::new(0));
    let threads: u64 = std::env::var("DASK_RS_FUZZ_THREADS").ok().and_then(|s| s.parse().ok()).unwrap_or(2);
    let fuzzers: Vec<_> = (0..threads)
        .map(|t| {
            let (stop, sent, skipped, streams) = (stop.clone(), sent.clone(), skipped.clone(), streams.clone());
            std::thread::spawn(move || {
                let mut rng = Rng(seed ^ (t + 1).wrapping_mul(0x2545_f491_4f6c_dd1d));
                let rt = tokio::runtime::Builder::new_current_thread().build().unwrap();
                while !stop.load(Ordering::Relaxed) {
                    let (target, base, hello) = &streams[rng.below(streams.len())];
                    let other = &streams[rng.below(streams.len())].1;
                    let bytes = if rng.chance(5) {
                        (0..rng.below(4096)).map(|_| rng.next() as u8).collect()
                    } else {
                        // Mostly past an intact handshake, to reach the messages.
                        fuzz::mutate(&mut rng, base, *hello, other)
                    };
                    if rt.block_on(destructive(&bytes)) {
                        skipped.fetch_add(1, Ordering::Relaxed);
                        continue;
                    }
                    poke(target, &bytes, &mut rng);
                    sent.fetch_add(1, Ordering::Relaxed);
                }
            })
        })
        .collect();
    let sampler = {
        let (stop, peak) = (stop.clone(), peak.clone());
        let pids = (sched.0.id(), worker.0.id());
        std::thread::spawn(move || {
            while !stop.load(Ordering::Relaxed) {
                peak.fetch_max(rss_kib(pids.0).max(rss_kib(pids.1)), Ordering::Relaxed);
                std::thread::sleep(Duration::from_millis(100));
            }
        })
    };

    let started = Instant::now();
    let mut rounds = 0;
    let mut slowest = Duration::ZERO;
    while started.elapsed() < run_for {
        let t = Instant::now();
        let n = 50 + rounds % 50;
        let answer = merge_answer(&legit, &format!("legit{rounds}"), n);
        assert_eq!(answer, Ok(n as u64 + 1), "round {rounds} of the legitimate client (seed {seed})");
        slowest = slowest.max(t.elapsed());
        rounds += 1;
    }
    stop.store(true, Ordering::Relaxed);
    for f in fuzzers {
        f.join().unwrap();
    }
    sampler.join().unwrap();
    std::thread::sleep(Duration::from_millis(500));
    let rss_end = (rss_kib(sched.0.id()), rss_kib(worker.0.id()));
    let sent = sent.load(Ordering::Relaxed);
    println!(
        "network fuzz: {sent} connections ({} destructive ones left out), {rounds} legitimate rounds \
         (slowest {slowest:?}); RSS KiB scheduler {} -> {}, worker {} -> {}, peak {}",
        skipped.load(Ordering::Relaxed),
        rss_start.0,
        rss_end.0,
        rss_start.1,
        rss_end.1,
        peak.load(Ordering::Relaxed)
    );
    let mut sched = sched;
    let mut worker = worker;
    assert!(sched.0.try_wait().unwrap().is_none(), "the scheduler died (seed {seed})");
    assert!(worker.0.try_wait().unwrap().is_none(), "the worker died (seed {seed})");
    assert!(sent > 50 * threads, "only {sent} fuzz connections");
    assert!(rounds > 5, "only {rounds} legitimate rounds");
    assert!(peak.load(Ordering::Relaxed) < 512 * 1024, "RSS peaked at {} KiB", peak.load(Ordering::Relaxed));
    assert!(rss_end.0 < rss_start.0 + 128 * 1024, "scheduler RSS grew {rss_start:?} -> {rss_end:?}");
    assert!(rss_end.1 < rss_start.1 + 128 * 1024, "worker RSS grew {rss_start:?} -> {rss_end:?}");
    for name in ["scheduler.log", "w.log"] {
        let text = std::fs::read_to_string(dir.join(name)).unwrap_or_default();
        assert!(!text.contains("panicked"), "{name}:\n{text}");
    }
    // A fresh client still gets in and computes.
    assert_eq!(merge_answer(&client(&addr, "after"), "after", 10), Ok(11));
    if std::env::var_os("DASK_RS_FUZZ_KEEP_LOGS").is_none() {
        let _ = std::fs::remove_dir_all(&dir);
    }
}
