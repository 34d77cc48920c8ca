//! The controller: turns a policy's target into backend calls.
//!
//! Rules, beyond Dask's Adaptive:
//! - requested = pending + running; it scales up only when the target
//!   exceeds what is requested, so queued batch jobs are never duplicated,
//!   and at most `max_pending` workers wait at once;
//! - it scales down pending workers first, and removes running ones only
//!   when nothing is pending; a worker goes only after being proposed
//!   `wait_count` checks in a row, and only when idle;
//! - running workers are retired through the scheduler (data moved off)
//!   before the backend stops them;
//! - a failing backend (or workers that die before connecting) backs off
//!   exponentially.
//!
//! Every action and every change of target is kept as a [`Decision`].

use std::collections::{HashMap, HashSet, VecDeque};

use serde::{Deserialize, Serialize};

use crate::{Backend, ClusterView, Policy, WorkerRecord, WorkerStatus};

/// Controller settings.
#[derive(Debug, Clone)]
pub struct ControllerConfig {
    /// Seconds between checks (the manager's loop period).
    pub interval: f64,
    /// Consecutive checks a worker must be proposed for removal before it goes.
    pub wait_count: u32,
    /// Most workers pending (requested, not connected) at once.
    pub max_pending: usize,
    /// First back-off after a failure, doubling up to `backoff_max` (seconds).
    pub backoff_initial: f64,
    pub backoff_max: f64,
    /// Decisions kept.
    pub history: usize,
}

impl Default for ControllerConfig {
    fn default() -> Self {
        ControllerConfig {
            interval: 1.0,
            wait_count: 3,
            max_pending: 64,
            backoff_initial: 1.0,
            backoff_max: 60.0,
            history: 1000,
        }
    }
}

/// What the controller wants done now.
#[derive(Debug, Clone, PartialEq)]
pub enum Action {
    Hold,
    /// Bring the requested total to this many workers.
    ScaleUp(usize),
    /// Cancel these pending workers and retire these running ones.
    Remove {
        pending: Vec<String>,
        running: Vec<String>,
    },
}

/// One entry of the decision log.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Decision {
    /// Seconds (the caller's clock; the manager uses Unix time).
    pub time: f64,
    /// `target`, `scale_up`, `scale_down`, `retire`, `backend_error`, `worker_failed`.
    pub kind: String,
    pub target: usize,
    pub requested: usize,
    pub running: usize,
    pub pending: usize,
    pub reason: String,
}

/// Removes running workers safely: the scheduler moves their data off and
/// closes them. Returns the names actually retired.
pub trait Retirer {
    fn retire(&mut self, workers: &[String]) -> Result<Vec<String>, String>;
}

/// The controller's state.
pub struct Controller {
    policy: Box<dyn Policy>,
    config: ControllerConfig,
    proposals: HashMap<String, u32>,
    ever_connected: HashSet<String>,
    failures: u32,
    retry_at: f64,
    last_target: Option<usize>,
    decisions: VecDeque<Decision>,
    counts: (usize, usize, usize),
}

impl Controller {
    pub fn new(policy: Box<dyn Policy>, config: ControllerConfig) -> Self {
        Controller {
            policy,
            config,
            proposals: HashMap::new(),
            ever_connected: HashSet::new(),
            failures: 0,
            retry_at: f64::NEG_INFINITY,
            last_target: None,
            decisions: VecDeque::new(),
            counts: (0, 0, 0),
        }
    }

    /// Replace the policy (`scale` and `adapt` at run time).
    pub fn set_policy(&mut self, policy: Box<dyn Policy>) {
        self.policy = policy;
        self.proposals.clear();
        self.last_target = None;
    }

    pub fn policy(&self) -> &dyn Policy {
        &*self.policy
    }

    /// The policy's latest target, once it set one.
    pub fn target(&self) -> Option<usize> {
        self.last_target
    }

    pub fn config(&self) -> &ControllerConfig {
        &self.config
    }

    /// The decision log, oldest first.
    pub fn decisions(&self) -> impl Iterator<Item = &Decision> {
        self.decisions.iter()
    }

    /// Consecutive failures behind the current back-off.
    pub fn failures(&self) -> u32 {
        self.failures
    }

    fn record(&mut self, now: f64, kind: &str, target: usize, reason: String) {
        let (requested, running, pending) = self.counts;
        if self.decisions.len() >= self.config.history {
            self.decisions.pop_front();
        }
        self.decisions.push_back(Decision {
            time: now,
            kind: kind.to_string(),
            target,
            requested,
            running,
            pending,
            reason,
        });
    }

    fn fail(&mut self, now: f64, kind: &str, reason: String) {
        self.failures += 1;
        let delay = (self.config.backoff_initial * 2f64.powi(self.failures as i32 - 1)).min(self.config.backoff_max);
        self.retry_at = now + delay;
        let target = self.last_target.unwrap_or(0);
        self.record(now, kind, target, format!("{reason}; retrying in {delay:.0} s"));
    }

    /// Log (and back off for) the `Failed` records among `records`. `step`
    /// does this itself; call it for records read outside `step`, since a
    /// backend reports each failure only once.
    pub fn note_failures(&mut self, now: f64, records: &[WorkerRecord]) {
        for r in records.iter().filter(|r| r.status == WorkerStatus::Failed) {
            if self.ever_connected.contains(&r.name) {
                self.record(
                    now,
                    "worker_failed",
                    self.last_target.unwrap_or(0),
                    format!("{} ended: {}", r.name, r.detail),
                );
            } else {
                self.fail(now, "worker_failed", format!("{} ended before connecting: {}", r.name, r.detail));
            }
            self.ever_connected.remove(&r.name);
        }
    }

    /// Decide what to do given the scheduler's view and the backend's workers.
    pub fn step(&mut self, now: f64, view: &ClusterView, records: &[WorkerRecord]) -> Action {
        self.note_failures(now, records);
        let connected: HashSet<&str> = view.workers.iter().map(|w| w.name.as_str()).collect();
        let live: Vec<&WorkerRecord> = records.iter().filter(|r| r.status != WorkerStatus::Failed).collect();
        let mut running = Vec::new();
        let mut pending = Vec::new();
        for r in &live {
            if connected.contains(r.name.as_str()) {
                if self.ever_connected.insert(r.name.clone()) {
                    // A worker made it: whatever failed before works now.
                    self.failures = 0;
                }
                running.push(r.name.clone());
            } else {
                pending.push(r.name.clone());
            }
        }
        let requested = live.len();
        self.counts = (requested, running.len(), pending.len());

        let t = self.policy.target(view);
        let (lo, hi) = self.policy.bounds();
        let target = t.workers.clamp(lo, hi.max(lo));
        if self.last_target != Some(target) {
            self.last_target = Some(target);
            self.record(now, "target", target, t.reason.clone());
        }

        if target > requested {
            self.proposals.clear();
            if now < self.retry_at {
                return Action::Hold;
            }
            let room = self.config.max_pending.saturating_sub(pending.len());
            let n = target.min(requested + room);
            if n <= requested {
                return Action::Hold;
            }
            self.record(now, "scale_up", target, format!("{} -> {n} requested: {}", requested, t.reason));
            return Action::ScaleUp(n);
        }
        if target == requested {
            self.proposals.clear();
            return Action::Hold;
        }

        // Too many: pending ones first; running ones only when none is pending.
        let excess = requested - target;
        let candidates: Vec<String> = if !pending.is_empty() {
            pending.iter().rev().take(excess).cloned().collect()
        } else {
            let ours: HashSet<&str> = running.iter().map(|s| s.as_str()).collect();
            let mut idle: Vec<_> = view
                .workers
                .iter()
                .filter(|w| ours.contains(w.name.as_str()) && w.processing == 0 && !w.retiring)
                .collect();
            idle.sort_by(|a, b| a.managed.cmp(&b.managed).then_with(|| b.name.cmp(&a.name)));
            idle.into_iter().take(excess).map(|w| w.name.clone()).collect()
        };
        let mut next = HashMap::new();
        for c in &candidates {
            next.insert(c.clone(), self.proposals.get(c).copied().unwrap_or(0) + 1);
        }
        self.proposals = next;
        let mut chosen: Vec<String> =
            candidates.into_iter().filter(|c| self.proposals[c] >= self.config.wait_count).collect();
        if chosen.is_empty() {
            return Action::Hold;
        }
        chosen.sort();
        for c in &chosen {
            self.proposals.remove(c);
        }
        let (p, r): (Vec<String>, Vec<String>) = chosen.into_iter().partition(|c| pending.contains(c));
        let what = if r.is_empty() { "scale_down" } else { "retire" };
        let names: Vec<&str> = p.iter().chain(r.iter()).map(|s| s.as_str()).collect();
        self.record(now, what, target, format!("{}: {}", names.join(", "), t.reason));
        Action::Remove { pending: p, running: r }
    }

    /// How carrying out the last action went. Success does not end a
    /// back-off: only a worker that connects does.
    pub fn report(&mut self, now: f64, result: Result<(), String>) {
        if let Err(e) = result {
            self.fail(now, "backend_error", e);
        }
    }
}

/// One check: read the backend's workers, decide, act, report.
pub fn tick(
    ctrl: &mut Controller,
    now: f64,
    view: &ClusterView,
    backend: &mut dyn Backend,
    retirer: &mut dyn Retirer,
) -> Action {
    let records = match backend.workers() {
        Ok(r) => r,
        Err(e) => {
            ctrl.report(now, Err(e.to_string()));
            return Action::Hold;
        }
    };
    let action = ctrl.step(now, view, &records);
    let result = match &action {
        Action::Hold => return action,
        Action::ScaleUp(n) => backend.scale_up(*n).map_err(|e| e.to_string()),
        Action::Remove { pending, running } => {
            let mut result = Ok(());
            if !pending.is_empty() {
                result = backend.scale_down(pending).map_err(|e| e.to_string());
            }
            if !running.is_empty() {
                let retired = retirer.retire(running);
                result = result.and(match retired {
                    Ok(names) => backend.scale_down(&names).map_err(|e| e.to_string()),
                    Err(e) => Err(format!("retiring {}: {e}", running.join(", "))),
                });
            }
            result
        }
    };
    ctrl.report(now, result);
    action
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{BackendError, DaskAdaptive, Fixed};
    use cluster::protocol::{LoadSummary, WorkerInfo};

    /// A backend whose workers connect `delay` seconds after being requested.
    struct FakeBackend {
        now: f64,
        delay: f64,
        workers: Vec<(String, f64)>,
        next: usize,
        fail_scale_up: bool,
        die_before_connecting: bool,
        failed: Vec<String>,
        scale_ups: usize,
        scale_downs: usize,
    }

    impl FakeBackend {
        fn new(delay: f64) -> Self {
            FakeBackend {
                now: 0.0,
                delay,
                workers: Vec::new(),
                next: 0,
                fail_scale_up: false,
                die_before_connecting: false,
                failed: Vec::new(),
                scale_ups: 0,
                scale_downs: 0,
            }
        }
        fn connected(&self) -> Vec<String> {
            self.workers.iter().filter(|(_, t)| self.now >= t + self.delay).map(|(n, _)| n.clone()).collect()
        }
    }

    impl Backend for FakeBackend {
        fn kind(&self) -> &'static str {
            "fake"
        }
        fn scale_up(&mut self, n: usize) -> Result<(), BackendError> {
            self.scale_ups += 1;
            if self.fail_scale_up {
                return Err(BackendError::ScaleUp("sbatch: error: invalid partition specified: nope".into()));
            }
            while self.workers.len() < n {
                self.workers.push((format!("w{}", self.next), self.now));
                self.next += 1;
            }
            Ok(())
        }
        fn scale_down(&mut self, names: &[String]) -> Result<(), BackendError> {
            self.scale_downs += 1;
            self.workers.retain(|(n, _)| !names.contains(n));
            Ok(())
        }
        fn workers(&mut self) -> Result<Vec<WorkerRecord>, BackendError> {
            if self.die_before_connecting {
                let now = self.now;
                let delay = self.delay;
                let dying: Vec<String> =
                    self.workers.iter().filter(|(_, t)| now >= t + delay / 2.0).map(|(n, _)| n.clone()).collect();
                self.workers.retain(|(n, _)| !dying.contains(n));
                self.failed.extend(dying);
            }
            let mut out: Vec<WorkerRecord> = self
                .workers
                .iter()
                .map(|(n, t)| WorkerRecord {
                    name: n.clone(),
                    status: if self.now >= t + self.delay / 2.0 {
                        WorkerStatus::Running
                    } else {
                        WorkerStatus::Pending
                    },
                    detail: String::new(),
                })
                .collect();
            out.extend(self.failed.drain(..).map(|n| WorkerRecord {
                name: n,
                status: WorkerStatus::Failed,
                detail: "exit status 1".into(),
            }));
            Ok(out)
        }
    }

    #[derive(Default)]
    struct FakeScheduler {
        retired: Vec<String>,
    }

    impl Retirer for FakeScheduler {
        fn retire(&mut self, workers: &[String]) -> Result<Vec<String>, String> {
            self.retired.extend(workers.iter().cloned());
            Ok(workers.to_vec())
        }
    }

    fn view(names: &[String], queued_tasks: u64) -> ClusterView {
        let workers = names.iter().map(|n| WorkerInfo::new(n.clone(), format!("tcp://h/{n}"), 1, 1 << 30)).collect();
        let load =
            LoadSummary { queued: queued_tasks, queued_occupancy: queued_tasks as f64 * 0.5, ..Default::default() };
        ClusterView { workers, load }
    }

    /// Run checks once a second from `from` to `to` with `queued` tasks waiting.
    fn run(
        c: &mut Controller,
        b: &mut FakeBackend,
        s: &mut FakeScheduler,
        from: u32,
        to: u32,
        queued: u64,
    ) -> Vec<Action> {
        let mut acts = Vec::new();
        for t in from..to {
            b.now = t as f64;
            let v = view(&b.connected(), queued);
            let a = tick(c, t as f64, &v, b, s);
            if a != Action::Hold {
                acts.push(a);
            }
        }
        acts
    }

    fn adaptive(min: usize, max: usize) -> Controller {
        Controller::new(Box::new(DaskAdaptive::new(min, max, 1)), ControllerConfig::default())
    }

    #[test]
    fn burst_scales_to_maximum_once_then_idle_returns_to_minimum() {
        let mut c = adaptive(1, 4);
        let mut b = FakeBackend::new(2.0);
        let mut s = FakeScheduler::default();
        assert_eq!(run(&mut c, &mut b, &mut s, 0, 5, 0), vec![Action::ScaleUp(1)]);
        // A burst: 200 half-second tasks want 20 workers, bounded to 4, asked for once.
        assert_eq!(run(&mut c, &mut b, &mut s, 5, 30, 200), vec![Action::ScaleUp(4)]);
        assert_eq!(b.connected().len(), 4);
        // Idle: three checks in a row propose the same workers, then they are retired.
        let acts = run(&mut c, &mut b, &mut s, 30, 60, 0);
        assert_eq!(acts.len(), 1, "{acts:?}");
        let Action::Remove { pending, running } = &acts[0] else { panic!("{acts:?}") };
        assert!(pending.is_empty());
        assert_eq!(running.len(), 3);
        assert_eq!(s.retired, *running);
        assert_eq!(b.workers.len(), 1);
        assert_eq!((b.scale_ups, b.scale_downs), (2, 1));
        let kinds: Vec<&str> = c.decisions().map(|d| d.kind.as_str()).filter(|k| *k != "target").collect();
        assert_eq!(kinds, ["scale_up", "scale_up", "retire"]);
    }

    #[test]
    fn pending_workers_are_counted_and_cancelled_before_running_ones_are_removed() {
        let mut c = adaptive(1, 6);
        let mut b = FakeBackend::new(60.0); // a slow batch queue
        b.workers.push(("w-first".into(), -100.0)); // connected long ago
        let mut s = FakeScheduler::default();
        // Burst while the queue is slow: one request, never repeated while pending.
        assert_eq!(run(&mut c, &mut b, &mut s, 0, 20, 1000), vec![Action::ScaleUp(6)]);
        assert_eq!(b.scale_ups, 1);
        // The burst ends before they start: the pending ones are cancelled and
        // the running one is left alone.
        let acts = run(&mut c, &mut b, &mut s, 20, 30, 0);
        assert_eq!(acts.len(), 1, "{acts:?}");
        let Action::Remove { pending, running } = &acts[0] else { panic!() };
        assert_eq!((pending.len(), running.len()), (5, 0));
        assert!(s.retired.is_empty());
        assert_eq!(b.workers.len(), 1);
    }

    #[test]
    fn at_most_max_pending_workers_wait_at_once() {
        let config = ControllerConfig { max_pending: 2, ..Default::default() };
        let mut c = Controller::new(Box::new(Fixed(5)), config);
        let mut b = FakeBackend::new(10.0);
        let mut s = FakeScheduler::default();
        let acts = run(&mut c, &mut b, &mut s, 0, 40, 0);
        assert_eq!(acts, vec![Action::ScaleUp(2), Action::ScaleUp(4), Action::ScaleUp(5)]);
    }

    #[test]
    fn a_failing_backend_backs_off_exponentially_and_recovers() {
        let mut c = Controller::new(Box::new(Fixed(2)), ControllerConfig::default());
        let mut b = FakeBackend::new(1.0);
        b.fail_scale_up = true;
        let mut s = FakeScheduler::default();
        run(&mut c, &mut b, &mut s, 0, 60, 0);
        // Attempts at 0, 1, 3, 7, 15, 31: six in a minute, not sixty.
        assert_eq!(b.scale_ups, 6);
        let last = c.decisions().filter(|d| d.kind == "backend_error").last().unwrap().clone();
        assert!(last.reason.contains("invalid partition"), "{last:?}");
        assert_eq!(c.failures(), 6);
        b.fail_scale_up = false;
        run(&mut c, &mut b, &mut s, 60, 130, 0);
        assert_eq!(b.connected().len(), 2);
        assert_eq!(c.failures(), 0);
    }

    #[test]
    fn workers_dying_before_connecting_back_off() {
        let mut c = Controller::new(Box::new(Fixed(1)), ControllerConfig::default());
        let mut b = FakeBackend::new(4.0);
        b.die_before_connecting = true;
        let mut s = FakeScheduler::default();
        run(&mut c, &mut b, &mut s, 0, 60, 0);
        // Without back-off it would resubmit every 2 s (30 times).
        assert!(b.scale_ups <= 7, "{} submissions", b.scale_ups);
        assert!(c.decisions().any(|d| d.kind == "worker_failed" && d.reason.contains("before connecting")));
    }

    #[test]
    fn failures_read_outside_a_step_still_count() {
        // A status display reads the backend between checks; the failure it
        // consumed must still reach the controller.
        let mut c = Controller::new(Box::new(Fixed(1)), ControllerConfig::default());
        let rec = WorkerRecord { name: "w0".into(), status: WorkerStatus::Failed, detail: "exit status 1".into() };
        c.note_failures(5.0, &[rec]);
        assert_eq!(c.failures(), 1);
        // Backing off: no scale-up until 6 s.
        assert_eq!(c.step(5.5, &ClusterView::default(), &[]), Action::Hold);
        assert_eq!(c.step(6.0, &ClusterView::default(), &[]), Action::ScaleUp(1));
    }

    #[test]
    fn flapping_load_does_not_thrash() {
        let mut c = adaptive(1, 3);
        let mut b = FakeBackend::new(0.0);
        let mut s = FakeScheduler::default();
        run(&mut c, &mut b, &mut s, 0, 3, 100);
        // Busy two checks, idle two checks, repeatedly: nobody is removed.
        for i in 0..20 {
            let t = 3 + i * 4;
            run(&mut c, &mut b, &mut s, t, t + 2, 100);
            run(&mut c, &mut b, &mut s, t + 2, t + 4, 0);
        }
        assert_eq!((b.scale_ups, b.scale_downs), (1, 0));
        assert!(s.retired.is_empty());
    }
}
