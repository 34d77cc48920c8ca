//! Work stealing: idle workers take unstarted long tasks from saturated
//! ones, once the victim agrees.

use super::state::{PeerId, SchedulerState, TaskState};
use super::task::TaskId;
use crate::protocol::{Priority, ToWorker};

/// Seconds a steal costs before any data moves (the request's round trip).
pub(super) const STEAL_LATENCY: f64 = 0.005;

impl SchedulerState {
    /// Tasks moved from one worker to another by stealing, since start.
    pub fn stolen_total(&self) -> u64 {
        self.stolen_total
    }

    /// Expected seconds to move `id`'s inputs that `thief` lacks, plus a
    /// fixed latency for the round trip.
    pub(super) fn transfer_cost(&self, id: TaskId, thief: PeerId) -> f64 {
        let bytes: u64 = self
            .t(id)
            .deps
            .iter()
            .map(|&d| self.t(d))
            .filter(|dt| !dt.who_has.contains(&thief))
            .map(|dt| dt.nbytes)
            .sum();
        STEAL_LATENCY + bytes as f64 / self.config.bandwidth.max(1.0)
    }

    /// Work stealing: for every worker with idle threads, ask saturated
    /// workers (more tasks assigned than threads) to give up tasks they have
    /// not started, when a task's expected run time is more than twice the
    /// time to move its inputs. The victim answers before anything moves
    /// (`StealResponse`), so a task never runs twice because of a steal.
    pub fn balance(&mut self) {
        if !self.config.work_stealing || self.workers.len() < 2 {
            return;
        }
        let mut thieves: Vec<(PeerId, usize)> = Vec::new();
        let mut victims: Vec<(PeerId, usize)> = Vec::new();
        for &p in &self.worker_order {
            let w = &self.workers[&p];
            if w.retiring {
                continue;
            }
            let incoming = self.steals.values().filter(|(_, t)| *t == p).count();
            let busy = w.busy() + incoming;
            let threads = w.nthreads as usize;
            if busy < threads {
                // Room for one running and one queued task per thread, so a
                // thief does not wait a balancing round between stolen tasks.
                thieves.push((p, 2 * threads - busy));
            } else if busy > threads {
                victims.push((p, busy - threads));
            }
        }
        if thieves.is_empty() || victims.is_empty() {
            return;
        }
        // Most over-committed victims first.
        victims.sort_by_key(|&(p, extra)| (std::cmp::Reverse(extra), p));
        for (thief, mut room) in thieves {
            for (victim, extra) in victims.iter_mut() {
                if room == 0 {
                    break;
                }
                if *extra == 0 {
                    continue;
                }
                // Candidates: the victim's tasks that will run last.
                let w = &self.workers[victim];
                let mut cands: Vec<(Priority, TaskId)> = w
                    .processing
                    .iter()
                    .filter(|id| !w.long_running.contains(id) && !self.steals.contains_key(id))
                    // Never worth moving: restricted, or shorter than any move.
                    .filter(|&&id| {
                        let t = self.t(id);
                        t.restriction.is_none() && self.groups[t.group as usize].duration() > 2.0 * STEAL_LATENCY
                    })
                    .map(|&id| (self.t(id).priority, id))
                    .collect();
                let want = room.min(*extra);
                if cands.len() > want {
                    let n = cands.len() - want;
                    cands.select_nth_unstable(n);
                    cands.drain(..n);
                }
                cands.sort_unstable_by(|a, b| b.cmp(a));
                for (_, id) in cands {
                    let compute = self.groups[self.t(id).group as usize].duration();
                    if compute <= 2.0 * self.transfer_cost(id, thief) {
                        continue;
                    }
                    self.steals.insert(id, (*victim, thief));
                    let key = self.t(id).key.to_string();
                    self.send_worker(*victim, ToWorker::StealRequest { key });
                    room -= 1;
                    *extra -= 1;
                    if room == 0 || *extra == 0 {
                        break;
                    }
                }
            }
        }
    }

    /// A victim answered a steal request: `stolen` means it dropped the task
    /// without starting it, and the task goes to the thief.
    pub fn steal_response(&mut self, victim: PeerId, key: &str, stolen: bool) {
        let Some(&id) = self.keys.get(key) else { return };
        let Some((v, thief)) = self.steals.remove(&id) else { return };
        if v != victim || !stolen {
            return;
        }
        if self.t(id).state != TaskState::Processing || self.t(id).processing_on != Some(victim) {
            return;
        }
        if let Some(w) = self.workers.get_mut(&victim) {
            w.unprocess(id);
        }
        self.tm(id).processing_on = None;
        self.stolen_total += 1;
        match self.workers.get(&thief) {
            Some(t) if !t.retiring => self.assign(id, thief),
            _ => {
                self.set_state(id, TaskState::Released);
                self.transition_to_waiting(id);
            }
        }
        self.fill_worker(victim);
    }
}
