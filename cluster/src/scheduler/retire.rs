//! Retiring workers: no new tasks, results only they hold copied
//! elsewhere, then closed.

use super::state::{PeerId, SchedulerState};
use super::task::TaskId;
use crate::protocol::{DepInfo, ToClient, ToWorker};
use rustc_hash::FxHashMap;

/// A pending `RetireWorkers` request.
#[derive(Debug)]
pub(super) struct Retirement {
    pub(super) requester: PeerId,
    pub(super) id: u64,
    pub(super) workers: Vec<(PeerId, String)>,
    pub(super) failed: Vec<(String, String)>,
}

impl SchedulerState {
    /// Retire workers by name or address: they get no new tasks, results
    /// only they hold are copied to other workers, then they are closed.
    /// `requester` gets `WorkersRetired { id, .. }` once every one is done.
    pub fn retire_workers(&mut self, requester: PeerId, id: u64, names: Vec<String>) {
        let mut r = Retirement { requester, id, workers: Vec::new(), failed: Vec::new() };
        for n in names {
            match self.find_worker(&n) {
                Some(p) => {
                    let w = self.workers.get_mut(&p).expect("listed worker");
                    w.retiring = true;
                    r.workers.push((p, w.name.clone()));
                }
                None => r.failed.push((n, "no such worker".into())),
            }
        }
        self.version += 1;
        self.retirements.push(r);
        self.check_retirements();
    }

    /// Move retirements forward: copy unique data off idle retiring workers,
    /// close those with nothing left to copy, answer finished requests.
    pub(super) fn check_retirements(&mut self) {
        if self.retirements.is_empty() {
            return;
        }
        let retiring: Vec<PeerId> = self.worker_order.iter().copied().filter(|p| self.workers[p].retiring).collect();
        let mut acquire: FxHashMap<PeerId, Vec<DepInfo>> = FxHashMap::default();
        let mut stuck: Vec<(PeerId, String)> = Vec::new();
        let mut close = Vec::new();
        for p in retiring {
            let w = &self.workers[&p];
            if !w.processing.is_empty() {
                continue;
            }
            let mut unique: Vec<TaskId> =
                w.has_what.iter().copied().filter(|&id| self.t(id).who_has.len() == 1).collect();
            if unique.is_empty() {
                close.push(p);
                continue;
            }
            unique.sort_unstable();
            for id in unique {
                let target = self.replicating.get(&id).copied();
                if target.is_some_and(|t| self.workers.get(&t).is_some_and(|w| !w.retiring)) {
                    continue;
                }
                let dest = self.worker_order.iter().copied().filter(|q| !self.workers[q].retiring).min_by_key(|q| {
                    let planned: u64 = acquire.get(q).map_or(0, |v| v.iter().map(|d| d.nbytes).sum());
                    (self.workers[q].nbytes + planned, *q)
                });
                let Some(dest) = dest else {
                    stuck.push((p, "no other worker can hold its data".into()));
                    break;
                };
                self.replicating.insert(id, dest);
                let t = self.t(id);
                acquire.entry(dest).or_default().push(DepInfo {
                    key: t.key.to_string(),
                    nbytes: t.nbytes,
                    who_has: vec![self.workers[&p].address.clone()],
                });
            }
        }
        self.send_acquire(acquire);
        let back_in_service = !stuck.is_empty();
        for (p, why) in stuck {
            if let Some(w) = self.workers.get_mut(&p) {
                w.retiring = false;
            }
            for r in &mut self.retirements {
                if let Some(i) = r.workers.iter().position(|(q, _)| *q == p) {
                    let (_, name) = r.workers.remove(i);
                    r.failed.push((name, why.clone()));
                }
            }
        }
        if back_in_service {
            self.worker_available();
        }
        for p in close {
            self.send_worker(p, ToWorker::CloseWorker { reason: "retired".into() });
            self.drop_worker(p);
        }
        let tasks = &self.tasks;
        self.replicating
            .retain(|id, _| tasks.get(*id as usize).and_then(|t| t.as_ref()).is_some_and(|t| t.who_has.len() == 1));
        let workers = &self.workers;
        let mut answered = Vec::new();
        self.retirements.retain(|r| {
            if r.workers.iter().any(|(p, _)| workers.contains_key(p)) {
                return true;
            }
            answered.push((
                r.requester,
                ToClient::WorkersRetired {
                    id: r.id,
                    retired: r.workers.iter().map(|(_, n)| n.clone()).collect(),
                    failed: r.failed.clone(),
                },
            ));
            false
        });
        for (peer, msg) in answered {
            self.send_client(peer, msg);
        }
    }
}
