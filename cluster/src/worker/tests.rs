//! Tests of the worker state machine. Every test drives a [`Checked`]
//! worker, whose invariants are validated after every event.

use std::ops::Deref;

use bytes::Bytes;

use super::memory::MemoryConfig;
use super::state::{ExecOutcome, Instruction, Recipe, WorkerState};
use crate::protocol::{DepInfo, Envelope, FromWorker, Key, Priority, Resources};
use crate::testing::checked_events;

/// A worker that checks [`WorkerState::validate`] after every event.
struct Checked(WorkerState);

impl Deref for Checked {
    type Target = WorkerState;
    fn deref(&self) -> &WorkerState {
        &self.0
    }
}

checked_events! {
    Checked {
        fn compute_task(key: Key, recipe: Recipe, deps: Vec<DepInfo>, priority: Priority, resources: Resources, now: f64);
        fn fetch_done(stored: Vec<(Key, u64)>, now: f64);
        fn fetch_failed(worker: &str, keys: Vec<Key>);
        fn execute_done(key: Key, outcome: ExecOutcome, start: f64, stop: f64, thread: u32);
        fn reset() -> Vec<Key>;
        fn secede(key: &str);
        fn rejoin(key: &str);
        fn steal_request(key: Key);
        fn free_keys(keys: Vec<Key>);
        fn acquire_replicas(keys: Vec<DepInfo>);
        fn data_put(items: Vec<(Key, u64)>);
        fn memory_tick(rss: u64, now: f64) -> Option<String>;
        fn spill_done(results: Vec<(Key, bool)>, start: f64, stop: f64);
        fn set_up(calls: Vec<Bytes>);
        fn set_up_done();
    }
}

impl Checked {
    fn new(w: WorkerState) -> Self {
        Checked(w)
    }

    fn after(&self, event: &str) {
        if let Err(e) = self.0.validate() {
            panic!("invariant broken after {event}: {e}");
        }
    }

    fn take_instructions(&mut self) -> Vec<Instruction> {
        self.0.take_instructions()
    }

    /// The scheduler assigns `key`, without dependencies, at position `order`.
    fn assign(&mut self, key: &str, order: u64) {
        self.compute_task(key.into(), Recipe::default(), vec![], prio(order), vec![], 0.0);
    }

    /// `key` ran and produced `nbytes`.
    fn ran(&mut self, key: &str, nbytes: u64) {
        self.execute_done(key.into(), ExecOutcome::Ok { nbytes }, 0.0, 1.0, 0);
    }

    /// Keys handed to the executor since the last call (other instructions dropped).
    fn executed(&mut self) -> Vec<String> {
        self.take_instructions()
            .into_iter()
            .filter_map(|i| match i {
                Instruction::Execute { key, .. } => Some(key),
                _ => None,
            })
            .collect()
    }
}

fn prio(order: u64) -> Priority {
    Priority { user: 0, generation: 0, order }
}

fn dep(k: &str, on: &str) -> DepInfo {
    DepInfo { key: k.into(), nbytes: 8, who_has: vec![on.into()] }
}

#[test]
fn tasks_needing_resources_wait_until_theirs_are_free() {
    let mut w = Checked::new(WorkerState::new(4).with_resources(vec![("GPU".into(), 1.0)]));
    let gpu = vec![("GPU".to_string(), 1.0)];
    for (k, order, res) in [("g1", 0, gpu.clone()), ("g2", 1, gpu.clone()), ("cpu", 2, vec![])] {
        w.compute_task(k.to_string(), Recipe::default(), vec![], prio(order), res, 0.0);
    }
    // One GPU: the second GPU task waits although threads are free; the
    // CPU task behind it in priority does not wait for it.
    assert_eq!(w.executed(), ["g1", "cpu"]);
    assert!(w.busy());
    w.ran("cpu", 1);
    assert!(w.executed().is_empty());
    w.ran("g1", 1);
    assert_eq!(w.executed(), ["g2"]);
    // A released waiting task does not block the queue, and a reset
    // gives every resource back.
    w.compute_task("g3".into(), Recipe::default(), vec![], prio(9), gpu.clone(), 0.0);
    w.free_keys(vec!["g3".into()]);
    w.reset();
    w.compute_task("g4".into(), Recipe::default(), vec![], prio(9), gpu, 0.0);
    assert_eq!(w.executed(), ["g4"]);
}

#[test]
fn a_paused_worker_fetches_nothing_until_it_resumes() {
    let mut w = Checked::new(WorkerState::with_memory(1, MemoryConfig::new(1000)));
    assert_eq!(w.memory_tick(900, 0.0), None);
    assert!(w.paused());
    w.take_instructions();
    w.compute_task("t".into(), Recipe::default(), vec![dep("x", "tcp://a:1")], Priority::default(), vec![], 0.0);
    w.acquire_replicas(vec![dep("y", "tcp://b:1")]);
    assert!(!w.take_instructions().iter().any(|i| matches!(i, Instruction::Fetch { .. })));
    assert_eq!(w.memory_tick(100, 1.0), None);
    assert!(!w.paused());
    let fetches: Vec<Instruction> =
        w.take_instructions().into_iter().filter(|i| matches!(i, Instruction::Fetch { .. })).collect();
    assert_eq!(
        fetches,
        [
            Instruction::Fetch { worker: "tcp://a:1".into(), keys: vec!["x".into()] },
            Instruction::Fetch { worker: "tcp://b:1".into(), keys: vec!["y".into()] },
        ]
    );
}

#[test]
fn no_task_starts_until_the_plugins_are_set_up() {
    let mut w = Checked::new(WorkerState::new(2));
    w.set_up(vec![Bytes::from_static(b"plugin")]);
    w.assign("a", 1);
    let ins = w.take_instructions();
    assert_eq!(ins, [Instruction::SetUp { calls: vec![Bytes::from_static(b"plugin")] }]);
    w.set_up_done();
    let ins = w.take_instructions();
    assert!(matches!(&ins[..], [Instruction::Execute { key, .. }] if key == "a"), "{ins:?}");
}

#[test]
fn hands_two_tasks_per_thread_to_the_executor_in_priority_order() {
    let mut w = Checked::new(WorkerState::new(1));
    for (k, order) in [("c", 3), ("a", 1), ("b", 2), ("d", 0)] {
        w.assign(k, order);
    }
    // One running and one queued behind it; the rest wait in priority order.
    let ins = w.take_instructions();
    let keys: Vec<&str> = ins
        .iter()
        .map(|i| match i {
            Instruction::Execute { key, .. } => key.as_str(),
            other => panic!("unexpected {other:?}"),
        })
        .collect();
    assert_eq!(keys, ["c", "a"]);
    assert_eq!(w.executing(), 1, "reported as running: at most one per thread");
    assert!(w.busy());
    w.ran("c", 8);
    let ins = w.take_instructions();
    assert!(matches!(&ins[0], Instruction::Send(_)));
    assert!(matches!(&ins[1], Instruction::Execute { key, .. } if key == "d"), "{ins:?}");
    for k in ["a", "d", "b"] {
        w.ran(k, 8);
    }
    assert!(!w.busy());
}

#[test]
fn fetches_missing_deps_batched_per_peer_then_runs() {
    let mut w = Checked::new(WorkerState::new(2));
    let deps = vec![dep("x", "tcp://a:1"), dep("y", "tcp://a:1"), dep("z", "tcp://b:1")];
    w.compute_task("t".into(), Recipe::default(), deps, Priority::default(), vec![], 0.0);
    let ins = w.take_instructions();
    assert_eq!(
        ins,
        vec![
            Instruction::Fetch { worker: "tcp://a:1".into(), keys: vec!["x".into(), "y".into()] },
            Instruction::Fetch { worker: "tcp://b:1".into(), keys: vec!["z".into()] },
        ]
    );
    w.fetch_done(vec![("x".into(), 8), ("y".into(), 8)], 0.5);
    assert!(!w.take_instructions().iter().any(|i| matches!(i, Instruction::Execute { .. })));
    w.fetch_done(vec![("z".into(), 8)], 1.0);
    let ins = w.take_instructions();
    assert!(ins.iter().any(|i| matches!(i, Instruction::Execute { key, deps, .. } if key == "t" && deps.len() == 3)));
}

#[test]
fn failed_fetch_tries_other_holder_then_reports_missing() {
    let mut w = Checked::new(WorkerState::new(1));
    let d = DepInfo { key: "x".into(), nbytes: 8, who_has: vec!["tcp://a:1".into(), "tcp://b:1".into()] };
    w.compute_task("t".into(), Recipe::default(), vec![d], Priority::default(), vec![], 0.0);
    w.take_instructions();
    w.fetch_failed("tcp://a:1", vec!["x".into()]);
    assert_eq!(w.take_instructions(), vec![Instruction::Fetch { worker: "tcp://b:1".into(), keys: vec!["x".into()] }]);
    w.fetch_failed("tcp://b:1", vec!["x".into()]);
    let ins = w.take_instructions();
    assert!(
        matches!(&ins[0], Instruction::Send(e) if matches!(&e.msg, FromWorker::MissingData { key, workers } if key == "x" && workers.len() == 2))
    );
}

#[test]
fn seceded_task_frees_its_thread_until_it_rejoins() {
    let mut w = Checked::new(WorkerState::new(1));
    for (order, k) in ["a", "b", "c", "d"].iter().enumerate() {
        w.assign(k, order as u64);
    }
    assert_eq!(w.take_instructions().len(), 2, "a runs, b queued behind it");
    w.secede("a");
    let ins = w.take_instructions();
    assert!(matches!(&ins[0], Instruction::Send(e) if matches!(&e.msg, FromWorker::TaskSeceded { key } if key == "a")));
    assert!(matches!(&ins[1], Instruction::Execute { key, .. } if key == "c"), "{ins:?}");
    w.secede("a");
    assert!(w.take_instructions().is_empty(), "seceding twice changes nothing");
    w.rejoin("a");
    w.ran("b", 8);
    let ins = w.take_instructions();
    assert!(!ins.iter().any(|i| matches!(i, Instruction::Execute { .. })), "a holds a thread again: {ins:?}");
    w.ran("a", 8);
    assert!(w.take_instructions().iter().any(|i| matches!(i, Instruction::Execute { key, .. } if key == "d")));
}

#[test]
fn steal_request_gives_up_only_unstarted_tasks() {
    let mut w = Checked::new(WorkerState::new(1));
    for (order, k) in ["a", "b", "c"].iter().enumerate() {
        w.assign(k, order as u64);
    }
    w.take_instructions();
    let answer = |w: &mut Checked| match &w.take_instructions()[..] {
        [Instruction::Send(Envelope { msg: FromWorker::StealResponse { stolen, .. }, .. })] => *stolen,
        other => panic!("{other:?}"),
    };
    w.steal_request("a".into());
    assert!(!answer(&mut w), "a is running");
    w.steal_request("c".into());
    assert!(answer(&mut w), "c was only ready");
    w.steal_request("zzz".into());
    assert!(!answer(&mut w), "unknown task");
    for k in ["a", "b"] {
        w.ran(k, 8);
    }
    let ran: Vec<Instruction> = w.take_instructions();
    assert!(!ran.iter().any(|i| matches!(i, Instruction::Execute { key, .. } if key == "c")), "{ran:?}");
    assert!(!w.busy());
}

#[test]
fn cancelled_while_executing_discards_result() {
    let mut w = Checked::new(WorkerState::new(1));
    w.assign("t", 0);
    w.take_instructions();
    w.free_keys(vec!["t".into()]);
    w.ran("t", 8);
    assert_eq!(w.take_instructions(), vec![Instruction::Free { keys: vec!["t".into()] }]);
    assert_eq!(w.nkeys(), 0);
    assert_eq!(w.managed(), 0);
}

#[test]
fn a_result_stored_twice_is_counted_once_at_its_latest_size() {
    let mut w = Checked::new(WorkerState::new(1));
    // A client scatters `x`, then a copy of another size arrives from a peer.
    w.data_put(vec![("x".into(), 100)]);
    w.acquire_replicas(vec![dep("x", "tcp://a:1")]);
    w.fetch_done(vec![("x".into(), 40)], 1.0);
    assert_eq!(w.managed(), 40);
    // The same for a task whose key a client scattered while it ran.
    w.assign("y", 0);
    w.data_put(vec![("y".into(), 10)]);
    w.ran("y", 5);
    assert_eq!((w.managed(), w.nkeys()), (45, 2));
}

#[test]
fn a_task_needing_the_same_dependency_twice_runs_once_it_arrives() {
    let mut w = Checked::new(WorkerState::new(1));
    let deps = vec![dep("x", "tcp://a:1"), dep("x", "tcp://a:1")];
    w.compute_task("t".into(), Recipe::default(), deps, Priority::default(), vec![], 0.0);
    assert_eq!(w.take_instructions(), vec![Instruction::Fetch { worker: "tcp://a:1".into(), keys: vec!["x".into()] }]);
    w.fetch_done(vec![("x".into(), 8)], 1.0);
    assert_eq!(w.executed(), ["t"]);
}

#[test]
fn written_spills_are_reported_for_the_task_stream() {
    let mut w = Checked::new(WorkerState::new(1));
    w.assign("a", 0);
    w.ran("a", 8);
    w.take_instructions();
    w.spill_done(vec![("a".into(), true), ("gone".into(), false)], 10.0, 10.5);
    let ins = w.take_instructions();
    let reported = ins.iter().any(
        |i| matches!(i, Instruction::Send(e) if e.msg == FromWorker::Spilled { keys: 1, start: 10.0, stop: 10.5 }),
    );
    assert!(reported, "{ins:?}");
    w.spill_done(vec![("a".into(), false)], 11.0, 11.1);
    assert!(w.take_instructions().is_empty(), "a failed spill is not a spill");
}

#[test]
fn short_tasks_are_handed_to_the_executor_more_at_a_time() {
    let mut w = Checked::new(WorkerState::new(1));
    for i in 0..40 {
        w.assign(&format!("t-{i}"), i);
    }
    // Nothing known of run times: one running and one queued.
    assert_eq!(w.executed(), ["t-0", "t-1"]);
    // Tasks turn out to take 10 us: the thread gets a run of them.
    w.execute_done("t-0".into(), ExecOutcome::Ok { nbytes: 8 }, 1.0, 1.000_01, 0);
    assert_eq!(w.executed().len(), 15, "16 handed over at a time");
    // Long ones bring it back to two (some finish first, none is handed over).
    for i in 1..12 {
        w.execute_done(format!("t-{i}"), ExecOutcome::Ok { nbytes: 8 }, 2.0, 3.0, 0);
    }
    assert!(w.executed().is_empty(), "{} still handed over", w.executing());
}
