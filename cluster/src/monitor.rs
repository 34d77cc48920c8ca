//! What a monitor (the dashboard, the console) knows of a cluster: a pure
//! state built from the scheduler's event updates (a snapshot, then deltas),
//! bounded in memory whatever the cluster does.

use std::collections::{BTreeMap, VecDeque};

use crate::protocol::{EventsUpdate, GroupCounts, LoadSummary, TaskStreamRecord, WorkerInfo};

/// Task-stream records kept (the `/tasks` page shows all of them).
pub const STREAM_CAPACITY: usize = 100_000;
/// Samples of cluster history kept (one per update, at most twice a second:
/// about an hour).
pub const HISTORY_CAPACITY: usize = 7_200;
/// Samples of each worker's memory kept.
pub const WORKER_HISTORY_CAPACITY: usize = 600;
/// Cluster events kept (workers joining and leaving, tasks erring).
pub const EVENTS_CAPACITY: usize = 200;

/// The cluster at one moment, for plots over time.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct Sample {
    pub time: f64,
    /// Tasks finished per second since the previous sample.
    pub tasks_per_second: f64,
    pub workers: usize,
    pub threads: u64,
    pub managed: u64,
    pub rss: u64,
    pub spilled: u64,
    pub processing: u64,
    pub queued: u64,
}

/// One worker's memory at one moment.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct MemorySample {
    pub time: f64,
    pub managed: u64,
    pub rss: u64,
    pub spilled: u64,
}

/// A monitor's view of the cluster.
#[derive(Debug, Default)]
pub struct Model {
    /// Scheduler time of the latest update (seconds since the Unix epoch).
    pub time: f64,
    /// Scheduler time of the first update.
    pub first_seen: f64,
    /// Finished tasks, oldest first (at most [`STREAM_CAPACITY`]).
    pub stream: VecDeque<TaskStreamRecord>,
    /// Records the dashboard never saw (dropped by the scheduler's ring or ours).
    pub stream_dropped: u64,
    /// Tasks seen finishing since the dashboard started.
    pub tasks_finished: u64,
    /// Task groups by name.
    pub groups: BTreeMap<String, GroupCounts>,
    /// Workers as of the latest update, sorted by name.
    pub workers: Vec<WorkerInfo>,
    pub ntasks: u64,
    pub nclients: u64,
    pub load: LoadSummary,
    /// Cluster totals over time.
    pub history: VecDeque<Sample>,
    /// Each worker's memory over time, by address.
    pub worker_history: BTreeMap<String, VecDeque<MemorySample>>,
    /// Updates applied.
    pub updates: u64,
    /// A cluster manager's figures over time: (time, target, running, pending).
    pub manager: VecDeque<(f64, u64, u64, u64)>,
    /// The manager's recent scaling decisions, newest last.
    pub decisions: Vec<Decision>,
    /// What happened, newest last: (time, text).
    pub events: VecDeque<(f64, String)>,
}

/// One scaling decision of a cluster manager (as monitors show them).
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Decision {
    pub time: f64,
    /// `target`, `scale_up`, `scale_down`, `retire`, `backend_error`, `worker_failed`.
    pub kind: String,
    pub target: usize,
    pub running: usize,
    pub pending: usize,
    pub reason: String,
}

impl Model {
    /// Apply one update from the scheduler.
    pub fn apply(&mut self, u: EventsUpdate) {
        if self.updates == 0 {
            self.first_seen = u.time;
        }
        let previous = self.history.back().copied();
        self.updates += 1;
        self.time = u.time;
        self.stream_dropped += u.stream_dropped;
        let finished = u.stream.len() as u64;
        self.tasks_finished += finished;
        for r in u.stream {
            if r.erred {
                self.event(r.stop, format!("task {} erred on {}", r.key, r.worker));
            }
            if self.stream.len() == STREAM_CAPACITY {
                self.stream.pop_front();
                self.stream_dropped += 1;
            }
            self.stream.push_back(r);
        }
        for name in &u.groups_removed {
            self.groups.remove(name);
        }
        for g in u.groups {
            self.groups.insert(g.name.clone(), g);
        }
        let mut workers = u.workers;
        workers.sort_by(|a, b| a.name.cmp(&b.name));
        if self.updates > 1 {
            let was: std::collections::BTreeSet<&str> = self.workers.iter().map(|w| w.name.as_str()).collect();
            let now: std::collections::BTreeSet<&str> = workers.iter().map(|w| w.name.as_str()).collect();
            let joined: Vec<String> = now.difference(&was).map(|n| format!("worker {n} joined")).collect();
            let left: Vec<String> = was.difference(&now).map(|n| format!("worker {n} left")).collect();
            for text in joined.into_iter().chain(left) {
                self.event(u.time, text);
            }
        }
        let live: std::collections::BTreeSet<&str> = workers.iter().map(|w| w.address.as_str()).collect();
        self.worker_history.retain(|a, _| live.contains(a.as_str()));
        for w in &workers {
            let h = self.worker_history.entry(w.address.clone()).or_default();
            if h.len() == WORKER_HISTORY_CAPACITY {
                h.pop_front();
            }
            h.push_back(MemorySample { time: u.time, managed: w.managed, rss: w.rss, spilled: w.spilled });
        }
        self.workers = workers;
        self.ntasks = u.ntasks;
        self.nclients = u.nclients;
        self.load = u.load;
        let rate = match previous {
            Some(p) if u.time > p.time => finished as f64 / (u.time - p.time),
            _ => 0.0,
        };
        if self.history.len() == HISTORY_CAPACITY {
            self.history.pop_front();
        }
        let sample = Sample {
            time: u.time,
            tasks_per_second: rate,
            workers: self.workers.len(),
            threads: self.workers.iter().map(|w| w.nthreads as u64).sum(),
            managed: self.workers.iter().map(|w| w.managed).sum(),
            rss: self.workers.iter().map(|w| w.rss).sum(),
            spilled: self.workers.iter().map(|w| w.spilled).sum(),
            processing: self.load.processing,
            queued: self.load.queued + self.load.no_worker,
        };
        self.history.push_back(sample);
    }

    fn event(&mut self, time: f64, text: String) {
        if self.events.len() == EVENTS_CAPACITY {
            self.events.pop_front();
        }
        self.events.push_back((time, text));
    }

    /// A cluster manager's figures now, and its decisions so far.
    pub fn set_manager(&mut self, time: f64, target: u64, running: u64, pending: u64, decisions: Vec<Decision>) {
        if self.manager.len() == HISTORY_CAPACITY {
            self.manager.pop_front();
        }
        self.manager.push_back((time, target, running, pending));
        self.decisions = decisions;
        // A page that shows the manager changes with it.
        self.updates += 1;
    }

    /// Task counts over every group, by Dask's state names (forgotten
    /// tasks are not counted: the scheduler no longer knows them).
    pub fn task_states(&self) -> [(&'static str, u64); 7] {
        let mut c = [0u64; 7];
        for g in self.groups.values() {
            for (i, n) in
                [g.released, g.waiting, g.queued, g.no_worker, g.processing, g.memory, g.erred].into_iter().enumerate()
            {
                c[i] += n;
            }
        }
        [
            ("released", c[0]),
            ("waiting", c[1]),
            ("queued", c[2]),
            ("no-worker", c[3]),
            ("processing", c[4]),
            ("memory", c[5]),
            ("erred", c[6]),
        ]
    }

    /// The stream records that ended in the last `seconds`.
    pub fn recent(&self, seconds: f64) -> impl Iterator<Item = &TaskStreamRecord> {
        let since = self.time - seconds;
        let first = self.stream.partition_point(|r| r.stop < since);
        self.stream.range(first..)
    }

    /// A worker by name or address.
    pub fn worker(&self, name: &str) -> Option<&WorkerInfo> {
        self.workers.iter().find(|w| w.name == name || w.address == name)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rec(key: &str, worker: &str, start: f64, stop: f64) -> TaskStreamRecord {
        TaskStreamRecord {
            key: key.into(),
            group: crate::protocol::key_split(key).into_owned(),
            worker: worker.into(),
            thread: 0,
            start,
            stop,
            transfer: 0.0,
            erred: false,
        }
    }

    fn update(time: f64, stream: Vec<TaskStreamRecord>) -> EventsUpdate {
        let mut w = WorkerInfo::new("w0", "tcp://h:1", 2, 1000);
        w.managed = 10 * time as u64;
        EventsUpdate { time, stream, workers: vec![w], ..Default::default() }
    }

    #[test]
    fn keeps_a_bounded_stream_and_computes_rates() {
        let mut m = Model::default();
        m.apply(update(100.0, vec![rec("inc-1", "tcp://h:1", 99.0, 99.5)]));
        m.apply(update(101.0, (0..10).map(|i| rec(&format!("inc-{i}"), "tcp://h:1", 100.0, 100.9)).collect()));
        assert_eq!(m.tasks_finished, 11);
        assert_eq!(m.history.back().unwrap().tasks_per_second, 10.0);
        assert_eq!(m.recent(0.5).count(), 10, "the first record ended earlier");
        assert_eq!(m.worker_history["tcp://h:1"].len(), 2);
        let many = (0..STREAM_CAPACITY + 5).map(|i| rec(&format!("x-{i}"), "tcp://h:1", 101.0, 101.5)).collect();
        m.apply(update(102.0, many));
        assert_eq!(m.stream.len(), STREAM_CAPACITY);
        assert_eq!(m.stream_dropped, 16);
        // A worker that left is forgotten, history and all, and said so.
        m.apply(EventsUpdate { time: 103.0, ..Default::default() });
        assert!(m.workers.is_empty() && m.worker_history.is_empty());
        assert_eq!(m.events.back().unwrap(), &(103.0, "worker w0 left".to_string()));
        m.apply(update(104.0, vec![TaskStreamRecord { erred: true, ..rec("boom-1", "tcp://h:1", 103.5, 103.9) }]));
        let texts: Vec<&str> = m.events.iter().map(|e| e.1.as_str()).collect();
        assert_eq!(texts[texts.len() - 2..], ["task boom-1 erred on tcp://h:1", "worker w0 joined"]);
    }
}
