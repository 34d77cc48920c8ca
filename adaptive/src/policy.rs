//! Scaling policies: how many workers the cluster should have now.

use crate::ClusterView;

/// A policy's answer: the number of workers wanted, and why (shown in the
/// decision log).
#[derive(Debug, Clone, PartialEq)]
pub struct Target {
    pub workers: usize,
    pub reason: String,
}

/// Decides how many workers a cluster wants. Implement it to write your own.
pub trait Policy: Send {
    /// Called once per controller check (every second by default).
    fn target(&mut self, view: &ClusterView) -> Target;
    /// Bounds the controller enforces whatever the policy says.
    fn bounds(&self) -> (usize, usize);
    /// For status displays, e.g. `fixed(4)` or `adaptive(1..10)`.
    fn describe(&self) -> String;
}

/// Always the same number of workers (`dask-ctl scale NAME N`).
#[derive(Debug, Clone)]
pub struct Fixed(pub usize);

impl Policy for Fixed {
    fn target(&mut self, _: &ClusterView) -> Target {
        Target { workers: self.0, reason: format!("fixed size {}", self.0) }
    }
    fn bounds(&self) -> (usize, usize) {
        (self.0, self.0)
    }
    fn describe(&self) -> String {
        format!("fixed({})", self.0)
    }
}

/// Dask's adaptive target: enough threads to finish the known work (running
/// plus queued, with durations learned per task group) in `target_duration`
/// seconds, no more threads than there are tasks, twice the workers when
/// managed memory passes `memory_fraction` of the limits, clamped to
/// `minimum..=maximum`.
#[derive(Debug, Clone)]
pub struct DaskAdaptive {
    pub minimum: usize,
    pub maximum: usize,
    /// Seconds the work in hand should take (Dask's default: 5 s).
    pub target_duration: f64,
    /// Managed memory above this fraction of the workers' limits asks for more.
    pub memory_fraction: f64,
    /// Threads a new worker brings, used before any worker has connected.
    pub threads_per_worker: u32,
}

impl DaskAdaptive {
    /// Dask's defaults between `minimum` and `maximum`.
    pub fn new(minimum: usize, maximum: usize, threads_per_worker: u32) -> Self {
        DaskAdaptive {
            minimum,
            maximum: maximum.max(minimum),
            target_duration: 5.0,
            memory_fraction: 0.6,
            threads_per_worker: threads_per_worker.max(1),
        }
    }
}

impl Policy for DaskAdaptive {
    fn target(&mut self, view: &ClusterView) -> Target {
        let l = &view.load;
        let seconds = l.occupancy + l.queued_occupancy;
        let tasks = l.processing + l.queued + l.no_worker;
        let mut threads = (seconds / self.target_duration.max(1e-3)).ceil() as u64;
        // A few long tasks do not ask for more threads than there are tasks.
        threads = threads.min(tasks);
        if tasks > 0 {
            threads = threads.max(1);
        }
        let per_worker = if view.workers.is_empty() {
            self.threads_per_worker as u64
        } else {
            (view.workers.iter().map(|w| w.nthreads as u64).sum::<u64>() / view.workers.len() as u64).max(1)
        };
        let cpu = threads.div_ceil(per_worker) as usize;
        let limit: u64 = view.workers.iter().map(|w| w.memory_limit).sum();
        let managed: u64 = view.workers.iter().map(|w| w.managed).sum();
        let memory =
            if limit > 0 && managed as f64 > self.memory_fraction * limit as f64 { 2 * view.workers.len() } else { 0 };
        let want = cpu.max(memory);
        let workers = want.clamp(self.minimum, self.maximum);
        let reason = if memory > cpu {
            format!("memory: {managed} of {limit} bytes managed")
        } else if tasks == 0 {
            "idle".to_string()
        } else {
            format!("{seconds:.1} s of work in {tasks} tasks")
        };
        let reason = if workers != want { format!("{reason} (wants {want}, bounded)") } else { reason };
        Target { workers, reason }
    }
    fn bounds(&self) -> (usize, usize) {
        (self.minimum, self.maximum)
    }
    fn describe(&self) -> String {
        format!("adaptive({}..{})", self.minimum, self.maximum)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use cluster::protocol::{LoadSummary, WorkerInfo};

    fn worker(name: &str, nthreads: u32, managed: u64, limit: u64) -> WorkerInfo {
        WorkerInfo { managed, ..WorkerInfo::new(name, format!("tcp://h/{name}"), nthreads, limit) }
    }

    #[test]
    fn adaptive_target_follows_work_memory_and_bounds() {
        let mut p = DaskAdaptive::new(1, 10, 2);
        let idle = ClusterView::default();
        assert_eq!(p.target(&idle).workers, 1);
        // 100 queued half-second tasks = 50 s of work: 10 threads for 5 s = 5 two-thread workers.
        let busy = ClusterView {
            workers: vec![],
            load: LoadSummary { queued: 100, queued_occupancy: 50.0, ..Default::default() },
        };
        assert_eq!(p.target(&busy).workers, 5);
        // Three long tasks never ask for more than three threads.
        let long = ClusterView {
            workers: vec![worker("a", 1, 0, 0)],
            load: LoadSummary { processing: 3, occupancy: 3000.0, ..Default::default() },
        };
        assert_eq!(p.target(&long).workers, 3);
        // Memory past 60% of the limits doubles the workers.
        let full = ClusterView {
            workers: vec![worker("a", 1, 70, 100), worker("b", 1, 70, 100)],
            load: LoadSummary::default(),
        };
        let t = p.target(&full);
        assert_eq!(t.workers, 4);
        assert!(t.reason.starts_with("memory"), "{}", t.reason);
        // Clamped to the maximum.
        let huge = ClusterView {
            workers: vec![],
            load: LoadSummary { queued: 10_000, queued_occupancy: 5_000.0, ..Default::default() },
        };
        let t = p.target(&huge);
        assert_eq!(t.workers, 10);
        assert!(t.reason.contains("bounded"), "{}", t.reason);
    }
}
