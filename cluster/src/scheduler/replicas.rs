//! Copies of results: `replicate` (more copies) and `rebalance` (moving
//! results from workers above the mean managed memory to those below).

use super::rebalance;
use super::rebalance::Candidate;
use super::state::{PeerId, SchedulerState, TaskState};
use super::task::TaskId;
use crate::protocol::{DepInfo, Key, RebalanceStats, ToClient, ToWorker};
use rustc_hash::FxHashMap;

/// A pending `Rebalance` request: moves not yet done, key -> (from, to).
#[derive(Debug)]
pub(super) struct Rebalancing {
    pub(super) requester: PeerId,
    pub(super) id: u64,
    pub(super) pending: FxHashMap<Key, (PeerId, PeerId)>,
    pub(super) moved: u64,
    pub(super) bytes: u64,
    pub(super) failed: u64,
}

impl SchedulerState {
    /// Copy each of `keys` that is in memory to more workers until `n` (at
    /// most every non-retiring worker) hold it; the workers holding the
    /// fewest bytes receive the copies. Copies are reported by `AddKeys`.
    /// With `workers` (names or addresses), only those count and receive.
    pub fn replicate(&mut self, keys: &[Key], n: usize, workers: &[String]) {
        let allowed = |p: &PeerId| {
            workers.is_empty()
                || self.workers.get(p).is_some_and(|w| workers.iter().any(|x| *x == w.name || *x == w.address))
        };
        let mut by_dest: FxHashMap<PeerId, Vec<DepInfo>> = FxHashMap::default();
        for k in keys {
            let Some(&id) = self.keys.get(k.as_str()) else { continue };
            let t = self.t(id);
            let have = t.who_has.iter().filter(|p| allowed(p)).count();
            if t.state != TaskState::Memory || have >= n {
                continue;
            }
            let mut cands: Vec<(u64, PeerId)> = self
                .worker_order
                .iter()
                .copied()
                .filter(|p| !t.who_has.contains(p) && allowed(p))
                .filter_map(|p| self.workers.get(&p).filter(|w| !w.retiring).map(|w| (w.nbytes, p)))
                .collect();
            cands.sort_unstable();
            let holders = self.addresses(&t.who_has);
            for (_, dest) in cands.into_iter().take(n - have) {
                by_dest.entry(dest).or_default().push(DepInfo {
                    key: k.clone(),
                    nbytes: t.nbytes,
                    who_has: holders.clone(),
                });
            }
        }
        self.send_acquire(by_dest);
    }

    /// Ask each destination to fetch its keys (`AcquireReplicas`), in a
    /// fixed order of destinations.
    pub(super) fn send_acquire(&mut self, by_dest: FxHashMap<PeerId, Vec<DepInfo>>) {
        let mut dests: Vec<(PeerId, Vec<DepInfo>)> = by_dest.into_iter().collect();
        dests.sort_by_key(|d| d.0);
        for (dest, keys) in dests {
            self.send_worker(dest, ToWorker::AcquireReplicas { keys });
        }
    }

    /// `Client.rebalance`: move results (`keys`, or all) among `workers` (or
    /// all non-retiring ones) from those holding more managed memory than
    /// the mean to those holding less (plan in [`rebalance::plan`]). Each
    /// move copies the key to its recipient; when the copy arrives the
    /// sender's is freed, unless a task running there needs it. Keys that a
    /// running task needs are not moved. `requester` gets `Rebalanced` once
    /// every move is done or abandoned.
    pub fn rebalance(&mut self, requester: PeerId, id: u64, keys: Vec<Key>, workers: Vec<String>) {
        let mut participants: Vec<PeerId> = Vec::new();
        let mut unknown: Vec<String> = Vec::new();
        if workers.is_empty() {
            participants.extend(self.worker_order.iter().copied().filter(|p| !self.workers[p].retiring));
        }
        for n in &workers {
            match self.find_worker(n) {
                Some(p) if !participants.contains(&p) => participants.push(p),
                Some(_) => {}
                None => unknown.push(n.clone()),
            }
        }
        if !unknown.is_empty() {
            let error = format!("rebalance: no such worker: {}", unknown.join(", "));
            self.send_client(requester, ToClient::Rebalanced { id, result: Err(error) });
            return;
        }
        let loads: Vec<(PeerId, u64)> = participants
            .iter()
            .map(|p| {
                let w = &self.workers[p];
                (*p, w.nbytes.saturating_sub(w.spilled))
            })
            .collect();
        let mut ids: Vec<TaskId> = if keys.is_empty() {
            participants.iter().flat_map(|p| self.workers[p].has_what.iter().copied()).collect()
        } else {
            keys.iter().filter_map(|k| self.keys.get(k.as_str()).copied()).collect()
        };
        ids.sort_unstable();
        ids.dedup();
        let candidates: Vec<Candidate<TaskId>> = ids
            .into_iter()
            .filter(|&t| self.t(t).state == TaskState::Memory && !self.needed_by_running(t, None))
            .map(|t| Candidate { id: t, nbytes: self.t(t).nbytes, holders: self.t(t).who_has.clone() })
            .collect();
        let moves = rebalance::plan(&loads, &candidates);
        let mut by_dest: FxHashMap<PeerId, Vec<DepInfo>> = FxHashMap::default();
        let mut pending = FxHashMap::default();
        for (t, from, to) in moves {
            let task = self.t(t);
            let key = task.key.to_string();
            by_dest.entry(to).or_default().push(DepInfo {
                key: key.clone(),
                nbytes: task.nbytes,
                who_has: vec![self.workers[&from].address.clone()],
            });
            pending.insert(key, (from, to));
        }
        self.send_acquire(by_dest);
        self.rebalances.push(Rebalancing { requester, id, pending, moved: 0, bytes: 0, failed: 0 });
        self.check_rebalances();
    }

    /// Whether a task processing (on `on`, or anywhere) needs `id` as input.
    pub(super) fn needed_by_running(&self, id: TaskId, on: Option<PeerId>) -> bool {
        self.t(id).dependents.iter().any(|d| {
            let dt = self.t(d);
            dt.state == TaskState::Processing && on.is_none_or(|w| dt.processing_on == Some(w))
        })
    }

    /// A copy of `id` reached `worker`: finish a rebalancing move to it by
    /// freeing the sender's copy (kept if a task running there needs it).
    pub(super) fn rebalance_arrived(&mut self, id: TaskId, worker: PeerId) {
        let key = self.t(id).key.to_string();
        let mut senders = Vec::new();
        for r in &mut self.rebalances {
            if let Some(&(from, to)) = r.pending.get(&key) {
                if to == worker {
                    r.pending.remove(&key);
                    r.moved += 1;
                    r.bytes += self.tasks[id as usize].as_ref().map_or(0, |t| t.nbytes);
                    senders.push(from);
                }
            }
        }
        for from in senders {
            if from == worker || !self.t(id).who_has.contains(&from) || self.needed_by_running(id, Some(from)) {
                continue;
            }
            self.remove_replica(id, from);
            self.send_worker(from, ToWorker::FreeKeys { keys: vec![key.clone()] });
        }
    }

    /// Abandon moves whose key or workers are gone; answer finished requests.
    pub(super) fn check_rebalances(&mut self) {
        if self.rebalances.is_empty() {
            return;
        }
        let mut answers = Vec::new();
        let (keys, tasks, workers) = (&self.keys, &self.tasks, &self.workers);
        self.rebalances.retain_mut(|r| {
            r.pending.retain(|key, (from, to)| {
                let alive = workers.contains_key(from) && workers.contains_key(to);
                let in_memory = keys
                    .get(key.as_str())
                    .and_then(|&id| tasks[id as usize].as_ref())
                    .is_some_and(|t| t.state == TaskState::Memory);
                if !(alive && in_memory) {
                    r.failed += 1;
                }
                alive && in_memory
            });
            if !r.pending.is_empty() {
                return true;
            }
            let stats = RebalanceStats { moved: r.moved, bytes: r.bytes, failed: r.failed };
            let msg = ToClient::Rebalanced { id: r.id, result: Ok(stats) };
            answers.push((r.requester, msg));
            false
        });
        for (peer, msg) in answers {
            self.send_client(peer, msg);
        }
    }
}
