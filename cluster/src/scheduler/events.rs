//! What observers read: the task stream, counts per group, worker infos,
//! the load summary, and point queries (`who_has`, state counts).

use super::state::{PeerId, SchedulerState, TaskState};
use crate::protocol::{EventsUpdate, GroupCounts, Key, LoadSummary, TaskStreamRecord, ToClient, WorkerInfo};
use rustc_hash::FxHashMap;

/// Where a subscriber is in the event stream.
#[derive(Debug, Default, Clone)]
pub struct EventCursor {
    pub(super) stream_seen: u64,
    pub(super) version_seen: u64,
    pub(super) started: bool,
}

impl SchedulerState {
    /// The state of `key`, if the scheduler knows it.
    pub fn task_state(&self, key: &str) -> Option<TaskState> {
        self.keys.get(key).map(|&id| self.t(id).state)
    }

    /// Addresses of workers holding `key`.
    pub fn who_has(&self, key: &str) -> Vec<String> {
        self.keys.get(key).map(|&id| self.addresses(&self.t(id).who_has)).unwrap_or_default()
    }

    /// Number of tasks the scheduler holds (not forgotten).
    pub fn ntasks(&self) -> usize {
        self.keys.len()
    }

    /// Number of connected workers.
    pub fn nworkers(&self) -> usize {
        self.workers.len()
    }

    /// Number of connected clients.
    pub fn nclients(&self) -> usize {
        self.clients.len()
    }

    /// Counts of tasks per state, over all groups.
    pub fn state_counts(&self) -> FxHashMap<&'static str, u64> {
        let all = [
            TaskState::Released,
            TaskState::Waiting,
            TaskState::Queued,
            TaskState::NoWorker,
            TaskState::Processing,
            TaskState::Memory,
            TaskState::Erred,
        ];
        let mut m = FxHashMap::default();
        for s in all {
            m.insert(s.name(), self.groups.iter().map(|g| g.counts[s.index()]).sum());
        }
        m
    }

    /// Answer a client's `GetTaskStream`.
    pub fn task_stream_reply(
        &mut self,
        client: PeerId,
        id: u64,
        start: Option<f64>,
        stop: Option<f64>,
        count: Option<u64>,
    ) {
        let chosen =
            self.stream.iter().filter(|r| start.is_none_or(|s| r.stop >= s) && stop.is_none_or(|s| r.stop <= s));
        let mut records: Vec<TaskStreamRecord> = chosen.cloned().collect();
        if let Some(n) = count {
            let skip = records.len().saturating_sub(n as usize);
            records.drain(..skip);
        }
        self.send_client(client, ToClient::TaskStream { id, records });
    }

    /// Answer a client's `WhoHas`.
    pub fn who_has_reply(&mut self, client: PeerId, id: u64, keys: Vec<Key>) {
        let who_has = keys.into_iter().map(|k| {
            let holders = self.who_has(&k);
            (k, holders)
        });
        let who_has = who_has.collect();
        self.send_client(client, ToClient::WhoHasReply { id, who_has });
    }

    /// Every worker, as clients and monitors see it.
    pub fn worker_infos(&self) -> Vec<WorkerInfo> {
        self.worker_infos_with(&self.load())
    }

    /// Per-worker occupancy uses the cluster-wide mean of processing work
    /// (`load`), which costs O(groups) instead of O(processing tasks).
    pub(super) fn worker_infos_with(&self, load: &LoadSummary) -> Vec<WorkerInfo> {
        let per_task = if load.processing > 0 { load.occupancy / load.processing as f64 } else { 0.0 };
        self.worker_order
            .iter()
            .map(|p| {
                let w = &self.workers[p];
                WorkerInfo {
                    address: w.address.clone(),
                    name: w.name.clone(),
                    nthreads: w.nthreads,
                    memory_limit: w.memory_limit,
                    pid: w.pid,
                    managed: w.nbytes.saturating_sub(w.spilled),
                    rss: w.rss,
                    cpu: w.cpu,
                    spilled: w.spilled,
                    executing: w.executing,
                    ready: w.ready,
                    processing: w.processing.len() as u32,
                    nkeys: w.has_what.len() as u64,
                    bytes_in: w.bytes_in,
                    bytes_out: w.bytes_out,
                    retiring: w.retiring,
                    occupancy: w.processing.len() as f64 * per_task,
                    resources: w.resources.clone(),
                }
            })
            .collect()
    }

    /// Queued and running work, with expected durations learned per task group.
    pub fn load(&self) -> LoadSummary {
        let mut l = LoadSummary::default();
        for g in &self.groups {
            let d = g.duration();
            let processing = g.counts[TaskState::Processing.index()];
            let waiting = g.counts[TaskState::Queued.index()] + g.counts[TaskState::NoWorker.index()];
            l.queued += g.counts[TaskState::Queued.index()];
            l.no_worker += g.counts[TaskState::NoWorker.index()];
            l.processing += processing;
            l.occupancy += processing as f64 * d;
            l.queued_occupancy += waiting as f64 * d;
        }
        l
    }

    pub(super) fn push_stream(&mut self, rec: TaskStreamRecord) {
        if self.stream.len() >= self.config.stream_capacity {
            self.stream.pop_front();
        }
        self.stream.push_back(rec);
        self.stream_total += 1;
    }

    /// What a subscriber at `cursor` has not seen yet: a snapshot the first
    /// time, then only new stream records and changed groups.
    pub fn events_since(&self, cursor: &mut EventCursor, now: f64) -> EventsUpdate {
        let oldest = self.stream_total - self.stream.len() as u64;
        let from = cursor.stream_seen.max(oldest);
        let dropped = from - cursor.stream_seen;
        let skip = (from - oldest) as usize;
        let stream: Vec<TaskStreamRecord> = self.stream.iter().skip(skip).cloned().collect();
        let groups = self
            .groups
            .iter()
            .filter(|g| !g.name.is_empty() && (!cursor.started || g.changed_at > cursor.version_seen))
            .map(|g| GroupCounts {
                name: g.name.clone(),
                released: g.counts[TaskState::Released.index()],
                waiting: g.counts[TaskState::Waiting.index()],
                queued: g.counts[TaskState::Queued.index()],
                no_worker: g.counts[TaskState::NoWorker.index()],
                processing: g.counts[TaskState::Processing.index()],
                memory: g.counts[TaskState::Memory.index()],
                erred: g.counts[TaskState::Erred.index()],
                forgotten: g.counts[TaskState::Forgotten.index()],
                nbytes: g.nbytes,
                compute_seconds: g.duration_sum,
                dependencies: g.deps.iter().map(|&d| self.groups[d as usize].name.clone()).collect(),
            })
            .collect();
        let groups_removed = if cursor.started {
            // Oldest first: only the tail is new to this subscriber.
            let from = self.removed_groups.partition_point(|(v, _)| *v <= cursor.version_seen);
            self.removed_groups.range(from..).map(|(_, n)| n.clone()).collect()
        } else {
            Vec::new()
        };
        let load = self.load();
        cursor.stream_seen = self.stream_total;
        cursor.version_seen = self.version;
        cursor.started = true;
        EventsUpdate {
            time: now,
            stream,
            stream_dropped: dropped,
            groups,
            groups_removed,
            workers: self.worker_infos_with(&load),
            ntasks: self.keys.len() as u64,
            nclients: self.nclients() as u64,
            load,
        }
    }
}
