//! A property test: random graphs, worker deaths and joins, releases,
//! cancellations, steals, retirements and restarts, driven through the
//! [`Checked`] scheduler (invariants validated after every event), then run
//! to completion: every wanted key ends in memory or erred, and once every
//! client lets go, nothing is left.
//!
//! `DASK_RS_RANDOM_CASES` (default 150) sets how many cases run;
//! `DASK_RS_RANDOM_SEED` replays one case (its seed is printed on failure);
//! with `DASK_RS_TRACE=1` every event is printed, and `DASK_RS_TRACE_KEYS=a,b`
//! prints those tasks (and their dependencies) after each one.

use std::collections::{BTreeMap, BTreeSet};

use bytes::Bytes;

use super::state::{PeerId, SchedulerConfig, TaskState};
use super::tests::{erred, spec, Checked, Msg};
use crate::protocol::{Key, Registration, TaskErred, TaskFinished, ToWorker};

/// xorshift64*: small, seedable, no dependency.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    fn below(&mut self, n: usize) -> usize {
        (self.next() % n.max(1) as u64) as usize
    }

    fn chance(&mut self, percent: u64) -> bool {
        self.next() % 100 < percent
    }

    fn pick<T: Clone>(&mut self, items: &[T]) -> Option<T> {
        (!items.is_empty()).then(|| items[self.below(items.len())].clone())
    }
}

/// What the test plays: the workers' and clients' side of the protocol.
struct World {
    s: Checked,
    rng: Rng,
    /// Live workers and the tasks each was told to run (and not told to drop).
    running: BTreeMap<PeerId, BTreeSet<Key>>,
    /// Copies each worker was asked to fetch.
    acquiring: BTreeMap<PeerId, BTreeSet<Key>>,
    /// Steal requests to answer: (victim, key).
    steals: Vec<(PeerId, Key)>,
    /// Live clients and the keys each holds.
    clients: BTreeMap<PeerId, BTreeSet<Key>>,
    next_peer: PeerId,
    next_key: u64,
    datasets: Vec<String>,
}

impl World {
    fn new(seed: u64) -> Self {
        let config = SchedulerConfig { allowed_failures: 2, ..SchedulerConfig::default() };
        let mut w = World {
            s: Checked::new(config),
            rng: Rng(seed.max(1)),
            running: BTreeMap::new(),
            acquiring: BTreeMap::new(),
            steals: Vec::new(),
            clients: BTreeMap::new(),
            next_peer: 1,
            next_key: 0,
            datasets: Vec::new(),
        };
        for _ in 0..2 {
            w.add_worker();
        }
        w.add_client();
        w
    }

    fn peer(&mut self) -> PeerId {
        self.next_peer += 1;
        self.next_peer
    }

    fn add_worker(&mut self) {
        let p = self.peer();
        let nthreads = 1 + self.rng.below(2) as u32;
        self.s.add_worker(p, Registration::new(format!("w{p}"), format!("tcp://h:{p}"), nthreads, 1 << 30)).unwrap();
        self.running.insert(p, BTreeSet::new());
        self.acquiring.insert(p, BTreeSet::new());
    }

    fn add_client(&mut self) {
        let p = self.peer();
        self.s.add_client(p);
        self.clients.insert(p, BTreeSet::new());
    }

    /// Read what the scheduler sent, as workers and clients would.
    fn deliver(&mut self) {
        for (peer, env) in self.s.take_outgoing() {
            match env.msg {
                Msg::W(ToWorker::ComputeTask { key, .. }) => {
                    if let Some(r) = self.running.get_mut(&peer) {
                        r.insert(key);
                    }
                }
                Msg::W(ToWorker::FreeKeys { keys }) => {
                    if let Some(r) = self.running.get_mut(&peer) {
                        for k in &keys {
                            r.remove(k);
                        }
                    }
                }
                Msg::W(ToWorker::AcquireReplicas { keys }) => {
                    if let Some(a) = self.acquiring.get_mut(&peer) {
                        a.extend(keys.into_iter().map(|d| d.key));
                    }
                }
                Msg::W(ToWorker::StealRequest { key }) => self.steals.push((peer, key)),
                Msg::W(ToWorker::RestartWorker) | Msg::W(ToWorker::CloseWorker { .. })
                    if self.running.contains_key(&peer) =>
                {
                    self.kill(peer)
                }
                _ => {}
            }
        }
    }

    fn kill(&mut self, w: PeerId) {
        self.running.remove(&w);
        self.acquiring.remove(&w);
        self.steals.retain(|(v, _)| *v != w);
        self.s.remove_worker(w);
    }

    fn known_keys(&self) -> Vec<Key> {
        self.clients.values().flatten().cloned().collect::<BTreeSet<_>>().into_iter().collect()
    }

    fn submit(&mut self) {
        let Some(c) = self.rng.pick(&self.clients.keys().copied().collect::<Vec<_>>()) else { return };
        let held: Vec<Key> = self.clients[&c].iter().cloned().collect();
        let n = 1 + self.rng.below(8);
        let mut keys: Vec<Key> = Vec::new();
        let mut specs = Vec::new();
        for _ in 0..n {
            self.next_key += 1;
            let group = ["inc", "add", "sum"][self.rng.below(3)];
            let key = format!("{group}-{}", self.next_key);
            let mut deps: Vec<String> = Vec::new();
            for _ in 0..self.rng.below(3) {
                let from_graph = !keys.is_empty() && self.rng.chance(70);
                let d = if from_graph { self.rng.pick(&keys) } else { self.rng.pick(&held) };
                if let Some(d) = d.filter(|d| !deps.contains(d)) {
                    deps.push(d);
                }
            }
            let dep_refs: Vec<&str> = deps.iter().map(String::as_str).collect();
            let (mut t, b) = spec(&key, &dep_refs);
            t.retries = if self.rng.chance(10) { 1 } else { 0 };
            // Most tasks call one of two shared functions, as `map` does.
            t.shared = [None, Some(1), Some(2)][self.rng.below(3)];
            specs.push((t, b));
            keys.push(key);
        }
        let wanted: Vec<Key> = keys.iter().filter(|_| self.rng.chance(60)).cloned().collect();
        let wanted = if wanted.is_empty() { vec![keys[keys.len() - 1].clone()] } else { wanted };
        self.clients.get_mut(&c).unwrap().extend(wanted.iter().cloned());
        let shared = (1..=2).map(|id| (id, Bytes::from_static(b"function"))).collect();
        self.s.update_graph_shared(c, specs, wanted, shared);
    }

    fn running_task(&mut self) -> Option<(PeerId, Key)> {
        let all: Vec<(PeerId, Key)> =
            self.running.iter().flat_map(|(w, ks)| ks.iter().map(move |k| (*w, k.clone()))).collect();
        self.rng.pick(&all)
    }

    fn step(&mut self) {
        match self.rng.below(100) {
            0..=14 => self.submit(),
            15..=44 => {
                if let Some((w, k)) = self.running_task() {
                    if self.rng.chance(10) {
                        self.s.task_erred(w, TaskErred { stop: 0.1, ..erred(&k, "ValueError") }, &[]);
                    } else {
                        let stop = if self.rng.chance(50) { 0.001 } else { 0.5 };
                        self.s.task_finished(
                            w,
                            &TaskFinished { stop, ..TaskFinished::instant(k.clone(), 1 + self.rng.below(1000) as u64) },
                        );
                    }
                    self.running.get_mut(&w).unwrap().remove(&k);
                }
            }
            45..=47 => {
                if let Some(w) = self.rng.pick(&self.running.keys().copied().collect::<Vec<_>>()) {
                    self.kill(w);
                }
            }
            48..=51 if self.running.len() < 5 => self.add_worker(),
            52..=57 => {
                let Some(c) = self.rng.pick(&self.clients.keys().copied().collect::<Vec<_>>()) else { return };
                let held: Vec<Key> = self.clients[&c].iter().cloned().collect();
                let Some(k) = self.rng.pick(&held) else { return };
                self.clients.get_mut(&c).unwrap().remove(&k);
                if self.rng.chance(30) {
                    self.s.cancel_keys(c, vec![k]);
                } else {
                    self.s.release_keys(c, &[k]);
                }
            }
            58..=59 => {
                let Some(c) = self.rng.pick(&self.clients.keys().copied().collect::<Vec<_>>()) else { return };
                if self.clients.len() > 1 {
                    self.clients.remove(&c);
                    self.s.remove_client(c);
                }
            }
            60..=61 => self.add_client(),
            62..=64 => {
                let Some(c) = self.rng.pick(&self.clients.keys().copied().collect::<Vec<_>>()) else { return };
                let Some(w) = self.rng.pick(&self.running.keys().copied().collect::<Vec<_>>()) else { return };
                self.next_key += 1;
                let key = format!("data-{}", self.next_key);
                self.clients.get_mut(&c).unwrap().insert(key.clone());
                self.s.scatter_done(c, &format!("tcp://h:{w}"), vec![(key, 100)]);
            }
            65..=69 => {
                self.s.balance();
                self.s.forget_empty_groups();
                self.deliver();
                while let Some((v, k)) = self.steals.pop() {
                    let stolen = self.rng.chance(70) && self.running.get_mut(&v).is_some_and(|r| r.remove(&k));
                    self.s.steal_response(v, &k, stolen);
                }
            }
            70..=71 => {
                if let Some((w, k)) = self.running_task() {
                    self.s.task_seceded(w, &k);
                }
            }
            72..=75 => {
                // Copies asked for arrive, or fail.
                let Some(w) = self.rng.pick(&self.acquiring.keys().copied().collect::<Vec<_>>()) else { return };
                let keys: Vec<Key> = std::mem::take(self.acquiring.get_mut(&w).unwrap()).into_iter().collect();
                for k in keys {
                    if self.rng.chance(80) {
                        self.s.add_keys(w, &[(k, 100)]);
                    } else {
                        self.s.missing_data(w, &k, &[]);
                    }
                }
            }
            76..=77 => {
                if let Some(w) = self.rng.pick(&self.running.keys().copied().collect::<Vec<_>>()) {
                    let c = *self.clients.keys().next().unwrap();
                    self.s.retire_workers(c, 1, vec![format!("w{w}")]);
                }
            }
            78..=79 => {
                let keys = self.known_keys();
                let some: Vec<Key> = keys.into_iter().filter(|_| self.rng.chance(30)).collect();
                self.s.replicate(&some, 2, &[]);
            }
            80..=81 => {
                let c = *self.clients.keys().next().unwrap();
                self.s.rebalance(c, 2, vec![], vec![]);
            }
            82..=83 => {
                let keys = self.known_keys();
                let some: Vec<Key> = keys.into_iter().filter(|_| self.rng.chance(20)).collect();
                self.s.fire_and_forget(&some);
            }
            84..=85 => {
                let c = *self.clients.keys().next().unwrap();
                let keys: Vec<Key> = self.clients[&c].iter().take(3).cloned().collect();
                self.next_key += 1;
                let name = format!("ds-{}", self.next_key);
                self.s.publish_dataset(c, 3, name.clone(), keys, Bytes::from_static(b"x"), false);
                self.datasets.push(name);
            }
            86 => {
                if let Some(name) = self.rng.pick(&self.datasets) {
                    self.datasets.retain(|d| *d != name);
                    let c = *self.clients.keys().next().unwrap();
                    self.s.unpublish_dataset(c, 4, &name);
                }
            }
            87..=88 => {
                let keys = self.known_keys();
                self.s.retry_keys(&keys);
            }
            89 if self.rng.chance(20) => {
                self.s.restart();
                for keys in self.clients.values_mut() {
                    keys.clear();
                }
                self.datasets.clear();
            }
            90..=92 => {
                // A worker reports it could not fetch a dependency of its task.
                if let Some((w, k)) = self.running_task() {
                    let c = *self.clients.keys().next().unwrap();
                    let keys = vec![k.clone()];
                    self.s.who_has_reply(c, 5, keys);
                    self.s.missing_data(w, &k, &[format!("tcp://h:{}", self.rng.below(8))]);
                }
            }
            93..=94 => {
                let c = *self.clients.keys().next().unwrap();
                let keys = self.known_keys();
                self.clients.get_mut(&c).unwrap().extend(keys.iter().cloned());
                self.s.want_keys(c, keys);
            }
            _ => {}
        }
        self.deliver();
    }

    /// Run everything outstanding to the end on healthy workers.
    fn finish(&mut self) {
        if self.running.is_empty() {
            self.add_worker();
        }
        self.deliver();
        for _ in 0..100_000 {
            self.s.balance();
            self.deliver();
            for (v, k) in std::mem::take(&mut self.steals) {
                self.s.steal_response(v, &k, false);
            }
            for w in self.acquiring.keys().copied().collect::<Vec<_>>() {
                let keys: Vec<Key> = std::mem::take(self.acquiring.get_mut(&w).unwrap()).into_iter().collect();
                for k in keys {
                    self.s.add_keys(w, &[(k, 100)]);
                }
            }
            let Some((w, k)) = self.running.iter().find_map(|(w, ks)| ks.iter().next().map(|k| (*w, k.clone()))) else {
                break;
            };
            self.running.get_mut(&w).unwrap().remove(&k);
            self.s.task_finished(w, &TaskFinished { stop: 0.001, ..TaskFinished::instant(k, 10) });
            self.deliver();
        }
        for keys in self.clients.values() {
            for k in keys {
                let state = self.s.task_state(k);
                if !matches!(state, Some(TaskState::Memory | TaskState::Erred)) {
                    eprintln!("{}", self.s.describe(k));
                    eprintln!("model running: {:?}", self.running);
                    eprintln!("workers: {:?}", self.s.worker_infos());
                    eprintln!("queued: {}", self.s.state_counts()["queued"]);
                    eprintln!(
                        "processing: {:?}",
                        self.s
                            .tasks
                            .iter()
                            .flatten()
                            .filter(|t| t.processing_on.is_some())
                            .map(|t| t.key.to_string())
                            .collect::<Vec<_>>()
                    );
                }
                assert!(
                    matches!(state, Some(TaskState::Memory | TaskState::Erred)),
                    "{k} is {state:?} after running everything to the end"
                );
            }
        }
        for name in std::mem::take(&mut self.datasets) {
            self.s.unpublish_dataset(1, 6, &name);
        }
        for c in self.clients.keys().copied().collect::<Vec<_>>() {
            self.s.remove_client(c);
        }
        self.deliver();
        assert_eq!(self.s.ntasks(), 0, "tasks left once no client holds anything");
        assert_eq!(self.s.shared.len(), 0, "shared blobs left once no task refers to them");
    }
}

fn run_case(seed: u64, steps: usize) {
    let mut w = World::new(seed);
    for _ in 0..steps {
        w.step();
    }
    w.finish();
}

#[test]
fn random_histories_keep_the_invariants_and_end_clean() {
    let env = |name: &str| std::env::var(name).ok().and_then(|v| v.parse::<u64>().ok());
    let seeds: Vec<u64> = match env("DASK_RS_RANDOM_SEED") {
        Some(seed) => vec![seed],
        None => {
            (1..=env("DASK_RS_RANDOM_CASES").unwrap_or(150)).map(|i| i.wrapping_mul(0x9e37_79b9_7f4a_7c15)).collect()
        }
    };
    for seed in seeds {
        let outcome = std::panic::catch_unwind(|| run_case(seed, 300));
        if let Err(e) = outcome {
            let msg = e.downcast_ref::<String>().cloned().or_else(|| e.downcast_ref::<&str>().map(|s| s.to_string()));
            panic!("case failed; replay with DASK_RS_RANDOM_SEED={seed}: {}", msg.unwrap_or_default());
        }
    }
}
