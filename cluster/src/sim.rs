//! Simulated workers: measure the scheduler alone, without Python.
//!
//! [`simulate`] drives [`SchedulerState`] in-process with workers that
//! finish every task the moment it arrives (no sockets), which isolates the
//! scheduler's own cost per task. [`SimRunner`] is a [`Runner`] for real
//! worker processes over TCP whose tasks take a configurable time and
//! produce results of a configurable size, spilling them to disk under
//! memory pressure with the same store as the Python worker's.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use bytes::Bytes;
use rustc_hash::FxHashMap;

use crate::protocol::{
    Envelope, FromClient, FromWorker, Key, Registration, TaskFinished, TaskSpec, ToClient, ToWorker,
};
use crate::scheduler::{Outgoing, PeerId, SchedulerConfig, SchedulerState};
use crate::worker::store::{read_frames, Held, Store};
use crate::worker::{ExecOutcome, Recipe, Runner};

/// Graph shapes used by benchmarks and tests.
pub mod graphs {
    use super::*;

    fn spec(key: String, deps: Vec<Key>, order: u64) -> TaskSpec {
        TaskSpec { order, ..TaskSpec::new(key, deps) }
    }

    /// `n` independent tasks and one task that depends on all of them.
    pub fn merge(n: usize) -> (Vec<TaskSpec>, Vec<Key>) {
        let mut v: Vec<TaskSpec> = (0..n).map(|i| spec(format!("leaf-{i}"), vec![], i as u64)).collect();
        v.push(spec("merge".into(), (0..n).map(|i| format!("leaf-{i}")).collect(), n as u64));
        (v, vec!["merge".into()])
    }

    /// A binary tree reduction with `leaves` leaves (`2 * leaves - 1` tasks).
    pub fn tree(leaves: usize) -> (Vec<TaskSpec>, Vec<Key>) {
        let mut v = Vec::with_capacity(2 * leaves);
        let mut level: Vec<Key> = (0..leaves).map(|i| format!("('leaf', {i})")).collect();
        for (i, k) in level.iter().enumerate() {
            v.push(spec(k.clone(), vec![], i as u64));
        }
        let mut depth = 0;
        let mut order = leaves as u64;
        while level.len() > 1 {
            depth += 1;
            let mut next = Vec::with_capacity(level.len() / 2 + 1);
            for (i, pair) in level.chunks(2).enumerate() {
                let k = format!("('sum-{depth}', {i})");
                v.push(spec(k.clone(), pair.to_vec(), order));
                order += 1;
                next.push(k);
            }
            level = next;
        }
        (v, level)
    }

    /// One shared input and `n` tasks that all depend on it (a broadcast).
    pub fn fan_out(n: usize) -> (Vec<TaskSpec>, Vec<Key>) {
        let mut v = vec![spec("shared".into(), vec![], 0)];
        v.extend((0..n).map(|i| spec(format!("use-{i}"), vec!["shared".into()], i as u64 + 1)));
        (v, (0..n).map(|i| format!("use-{i}")).collect())
    }

    /// `n` tasks, each depending on the previous one.
    pub fn chain(n: usize) -> (Vec<TaskSpec>, Vec<Key>) {
        let v: Vec<TaskSpec> = (0..n)
            .map(|i| {
                spec(format!("chain-{i}"), if i == 0 { vec![] } else { vec![format!("chain-{}", i - 1)] }, i as u64)
            })
            .collect();
        (v, vec![format!("chain-{}", n - 1)])
    }
}

/// How the in-process simulation is shaped.
#[derive(Debug, Clone)]
pub struct SimConfig {
    pub workers: usize,
    pub nthreads: u32,
    /// Size reported for every result.
    pub result_size: u64,
    pub scheduler: SchedulerConfig,
}

impl Default for SimConfig {
    fn default() -> Self {
        SimConfig { workers: 8, nthreads: 4, result_size: 8, scheduler: SchedulerConfig::default() }
    }
}

/// Figures from one simulated run.
#[derive(Debug, Clone)]
pub struct SimReport {
    pub tasks: u64,
    pub elapsed: Duration,
    /// Tasks the scheduler held right after submission.
    pub peak_tasks: usize,
    /// Tasks left after the client released its results (should be 0).
    pub leftover_tasks: usize,
}

impl SimReport {
    pub fn tasks_per_second(&self) -> f64 {
        self.tasks as f64 / self.elapsed.as_secs_f64()
    }
}

const CLIENT: PeerId = 1;

/// Run a graph to completion on instantly-finishing simulated workers, then
/// release its results. The whole scheduler runs; only the network is absent.
pub fn simulate(specs: Vec<TaskSpec>, wanted: Vec<Key>, cfg: &SimConfig) -> SimReport {
    let mut state = SchedulerState::new(cfg.scheduler.clone());
    simulate_on(&mut state, specs, wanted, cfg, |_| {})
}

/// As [`simulate`], on a given state, calling `after_submit` once the graph
/// is in (to measure memory, say).
pub fn simulate_on(
    state: &mut SchedulerState,
    specs: Vec<TaskSpec>,
    wanted: Vec<Key>,
    cfg: &SimConfig,
    after_submit: impl FnOnce(&SchedulerState),
) -> SimReport {
    let workers: Vec<PeerId> = (0..cfg.workers as u64).map(|i| 100 + i).collect();
    for (i, &w) in workers.iter().enumerate() {
        let reg = Registration::new(format!("sim-{i}"), format!("tcp://sim:{i}"), cfg.nthreads, 1 << 32);
        state.handle_worker(w, FromWorker::RegisterWorker(reg).into()).expect("fresh worker");
    }
    let _ = state.take_outgoing();
    let ntasks = specs.len() as u64;
    let started = Instant::now();
    let graph = FromClient::UpdateGraph { tasks: specs, wanted: wanted.clone(), shared: Vec::new() };
    state.handle_client(CLIENT, graph.into(), 0.0).expect("a valid graph");
    let peak = state.ntasks();
    after_submit(state);
    let mut remaining: FxHashMap<Key, ()> = wanted.iter().map(|k| (k.clone(), ())).collect();
    let mut running: VecDeque<(PeerId, Key)> = VecDeque::new();
    let mut out = Vec::new();
    loop {
        state.drain_outgoing_into(&mut out);
        for (peer, msg) in out.drain(..) {
            match msg {
                Outgoing::Worker(Envelope { msg: ToWorker::ComputeTask { key, .. }, .. }) => {
                    running.push_back((peer, key))
                }
                Outgoing::Client(Envelope {
                    msg: ToClient::KeyInMemory { key, .. } | ToClient::KeyCancelled { key, .. },
                    ..
                }) => {
                    remaining.remove(&key);
                }
                Outgoing::Client(Envelope { msg: ToClient::KeyErred { key, text, .. }, .. }) => {
                    panic!("simulated task {key} erred: {text}")
                }
                _ => {}
            }
        }
        if remaining.is_empty() {
            break;
        }
        let Some((w, key)) = running.pop_front() else {
            panic!("simulation stalled with {} keys outstanding", remaining.len());
        };
        let report = FromWorker::TaskFinished(TaskFinished::instant(key, cfg.result_size));
        state.handle_worker(w, report.into()).expect("a valid report");
    }
    state.handle_client(CLIENT, FromClient::ReleaseKeys { keys: wanted }.into(), 0.0).expect("a valid release");
    let elapsed = started.elapsed();
    let _ = state.take_outgoing();
    SimReport { tasks: ntasks, elapsed, peak_tasks: peak, leftover_tasks: state.ntasks() }
}

/// A [`Runner`] for worker processes without Python: each task sleeps for
/// `duration` and produces `result_size` bytes. When there are at least 8,
/// the first 8 hold how many tasks the result depends on, itself included
/// (little-endian), so that a graph's answer can be checked: a merge of `n`
/// leaves gives `n + 1`. Results spill to disk under memory pressure like a
/// Python worker's.
pub struct SimRunner {
    pub duration: Duration,
    pub result_size: u64,
    store: Store<Bytes>,
}

impl SimRunner {
    pub fn new(duration: Duration, result_size: u64) -> Self {
        static N: AtomicU64 = AtomicU64::new(0);
        let n = N.fetch_add(1, Ordering::Relaxed);
        let dir = std::env::temp_dir().join(format!("dask-rs-sim-spill-{}-{n}", std::process::id()));
        SimRunner { duration, result_size, store: Store::new(dir) }
    }

    /// Number of values held (in memory and spilled).
    pub fn len(&self) -> usize {
        self.store.len()
    }

    /// Whether the store is empty.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The values of `keys` (read back from disk when spilled); `None` for
    /// keys not held or unreadable.
    fn values(&self, keys: &[Key]) -> Vec<Option<Bytes>> {
        self.store
            .lookup(keys, Bytes::clone)
            .into_iter()
            .map(|held| match held? {
                Held::Memory(v) => Some(v),
                Held::Disk(path) => read_frames(&path).ok()?.into_iter().next(),
            })
            .collect()
    }
}

/// The task count a [`SimRunner`] result carries (0 for a short one).
pub fn sim_count(result: &[u8]) -> u64 {
    result.get(..8).map_or(0, |h| u64::from_le_bytes(h.try_into().expect("8 bytes")))
}

impl Runner for SimRunner {
    fn execute(&self, key: &str, _recipe: &Recipe, deps: &[Key], _thread: u32) -> ExecOutcome {
        let values = self.values(deps);
        if let Some((d, _)) = deps.iter().zip(&values).find(|(_, v)| v.is_none()) {
            return ExecOutcome::Err {
                exception: Bytes::new(),
                traceback: Bytes::new(),
                text: format!("dependency {d} missing on worker"),
            };
        }
        if !self.duration.is_zero() {
            std::thread::sleep(self.duration);
        }
        let count = values.iter().flatten().fold(1u64, |n, v| n.wrapping_add(sim_count(v)));
        let mut result = vec![0u8; self.result_size as usize];
        if let Some(head) = result.get_mut(..8) {
            head.copy_from_slice(&count.to_le_bytes());
        }
        self.store.insert(key.to_string(), Bytes::from(result));
        ExecOutcome::Ok { nbytes: self.result_size }
    }

    fn serialize(&self, keys: &[Key]) -> Vec<(Key, Option<Vec<Bytes>>)> {
        keys.iter().cloned().zip(self.values(keys).into_iter().map(|v| v.map(|v| vec![v]))).collect()
    }

    fn store(&self, key: &str, frames: Vec<Bytes>) -> Result<u64, String> {
        let v = frames.into_iter().next().unwrap_or_default();
        let n = v.len() as u64;
        self.store.insert(key.to_string(), v);
        Ok(n)
    }

    fn free(&self, keys: &[Key]) {
        self.store.free_older(keys, u64::MAX);
    }

    fn mark(&self) -> u64 {
        self.store.mark()
    }

    fn free_older(&self, keys: &[Key], mark: u64) {
        self.store.free_older(keys, mark);
    }

    fn spill(&self, keys: &[Key]) -> Vec<(Key, bool)> {
        keys.iter().map(|k| (k.clone(), self.store.spill(k, Bytes::clone, |v| Ok(vec![v])))).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn merge_tree_chain_complete_and_release_everything() {
        let cfg = SimConfig::default();
        for (specs, wanted) in [graphs::merge(2000), graphs::tree(1024), graphs::chain(500)] {
            let n = specs.len() as u64;
            let r = simulate(specs, wanted, &cfg);
            assert_eq!(r.tasks, n);
            assert_eq!(r.leftover_tasks, 0, "all tasks forgotten after release");
        }
    }

    #[test]
    fn sim_runner_spills_and_serves_spilled_results() {
        let r = SimRunner::new(Duration::ZERO, 100);
        assert!(matches!(r.execute("a", &Recipe::default(), &[], 0), ExecOutcome::Ok { nbytes: 100 }));
        r.store("b", vec![Bytes::from_static(b"peer copy")]).unwrap();
        assert_eq!(
            r.spill(&["a".into(), "b".into(), "nope".into()]),
            [("a".into(), true), ("b".into(), true), ("nope".into(), false)]
        );
        // Spilled values are still served and still feed tasks.
        let served = r.serialize(&["b".into(), "nope".into()]);
        assert_eq!(served[0].1.as_deref(), Some(&[Bytes::from_static(b"peer copy")][..]));
        assert!(served[1].1.is_none());
        assert!(matches!(r.execute("c", &Recipe::default(), &["a".into(), "b".into()], 0), ExecOutcome::Ok { .. }));
        r.free(&["a".into(), "b".into(), "c".into()]);
        assert!(r.is_empty());
    }

    #[test]
    fn sim_results_count_the_tasks_they_depend_on() {
        let r = SimRunner::new(Duration::ZERO, 8);
        for leaf in ["a", "b", "c"] {
            r.execute(leaf, &Recipe::default(), &[], 0);
        }
        r.execute("ab", &Recipe::default(), &["a".into(), "b".into()], 0);
        r.execute("top", &Recipe::default(), &["ab".into(), "c".into()], 0);
        let top = r.serialize(&["top".into()]).remove(0).1.unwrap();
        assert_eq!(sim_count(&top[0]), 5);
    }
}
