//! Tests of the scheduler state machine. Every test drives a [`Checked`]
//! scheduler, whose invariants are validated after every event.

use std::ops::Deref;

use bytes::Bytes;

use super::events::EventCursor;
use super::state::{Outgoing, PeerId, SchedulerConfig, SchedulerState, TaskState};
use crate::protocol::{
    Blob, DatasetValue, Key, RebalanceStats, Registration, Resources, TaskErred, TaskFinished, TaskSpec, ToClient,
    ToWorker,
};
use crate::testing::checked_events;

const C1: PeerId = 1;
const C2: PeerId = 2;
const W1: PeerId = 10;
const W2: PeerId = 11;

/// A message the scheduler sent, to a worker or to a client.
#[derive(Debug, Clone, PartialEq)]
pub(super) enum Msg {
    W(ToWorker),
    C(ToClient),
}

/// A sent message without its frames.
#[derive(Debug, Clone, PartialEq)]
pub(super) struct Sent {
    pub msg: Msg,
}

/// A scheduler that checks [`SchedulerState::validate`] after every event.
/// Queries go through `Deref`; events only through the methods below, so an
/// event cannot reach the state unchecked (`raw` is for setting up internals).
pub(super) struct Checked(SchedulerState);

impl Deref for Checked {
    type Target = SchedulerState;
    fn deref(&self) -> &SchedulerState {
        &self.0
    }
}

checked_events! {
    Checked {
        fn add_client(peer: PeerId);
        fn remove_client(peer: PeerId);
        fn add_worker(peer: PeerId, reg: Registration) -> Result<(), String>;
        fn remove_worker(peer: PeerId);
        fn forget_empty_groups();
        fn update_graph(client: PeerId, tasks: Vec<(TaskSpec, Option<Bytes>)>, wanted: Vec<Key>);
        fn update_graph_shared(client: PeerId, tasks: Vec<(TaskSpec, Option<Bytes>)>, wanted: Vec<Key>, shared: Vec<(u64, Bytes)>);
        fn want_keys(client: PeerId, keys: Vec<Key>);
        fn scatter_done(client: PeerId, worker_addr: &str, keys: Vec<(Key, u64)>);
        fn task_finished(worker: PeerId, report: &TaskFinished);
        fn task_seceded(worker: PeerId, key: &str);
        fn task_erred(worker: PeerId, report: TaskErred, frames: &[Bytes]);
        fn missing_data(worker: PeerId, key: &str, holders: &[String]);
        fn add_keys(worker: PeerId, keys: &[(Key, u64)]);
        fn release_keys(client: PeerId, keys: &[Key]);
        fn cancel_keys(client: PeerId, keys: Vec<Key>);
        fn retry_keys(keys: &[Key]);
        fn fire_and_forget(keys: &[Key]);
        fn restart();
        fn register_plugin(name: String, call: Bytes);
        fn unregister_plugin(name: &str);
        fn publish_dataset(client: PeerId, id: u64, name: String, keys: Vec<Key>, data: Bytes, overwrite: bool);
        fn unpublish_dataset(client: PeerId, id: u64, name: &str);
        fn get_dataset(client: PeerId, id: u64, name: &str);
        fn list_datasets(client: PeerId, id: u64);
        fn replicate(keys: &[Key], n: usize, workers: &[String]);
        fn rebalance(requester: PeerId, id: u64, keys: Vec<Key>, workers: Vec<String>);
        fn retire_workers(requester: PeerId, id: u64, names: Vec<String>);
        fn balance();
        fn steal_response(victim: PeerId, key: &str, stolen: bool);
        fn who_has_reply(client: PeerId, id: u64, keys: Vec<Key>);
        fn task_stream_reply(client: PeerId, id: u64, start: Option<f64>, stop: Option<f64>, count: Option<u64>);
    }
}

impl Checked {
    pub(super) fn new(config: SchedulerConfig) -> Self {
        Checked(SchedulerState::new(config))
    }

    /// What the scheduler sent since the last call, both directions in one
    /// type (extra frames dropped) so that tests can match on any message.
    pub(super) fn take_outgoing(&mut self) -> Vec<(PeerId, Sent)> {
        let sent = |o| match o {
            Outgoing::Worker(e) => Sent { msg: Msg::W(e.msg) },
            Outgoing::Client(e) => Sent { msg: Msg::C(e.msg) },
        };
        self.0.take_outgoing().into_iter().map(|(p, o)| (p, sent(o))).collect()
    }

    /// A task and its dependencies, for failure messages.
    pub(super) fn describe(&self, key: &str) -> String {
        let Some(&id) = self.keys.get(key) else { return format!("{key}: unknown") };
        let mut out = String::new();
        let mut stack = vec![(id, 0)];
        while let Some((id, depth)) = stack.pop() {
            let t = self.t(id);
            out += &format!(
                "{}{} {:?} on {:?} has {:?} waiting_on {}\n",
                "  ".repeat(depth),
                t.key,
                t.state,
                t.processing_on,
                t.who_has,
                t.waiting_on
            );
            stack.extend(t.deps.iter().map(|&d| (d, depth + 1)));
        }
        out
    }

    /// After every event: trace the keys in `DASK_RS_TRACE_KEYS`, then check
    /// the invariants.
    fn after(&self, event: &str) {
        if let Ok(keys) = std::env::var("DASK_RS_TRACE_KEYS") {
            for k in keys.split(',') {
                eprint!("    {}", self.describe(k));
            }
        }
        if let Err(e) = self.0.validate() {
            panic!("invariant broken after {event}: {e}");
        }
    }

    /// The state itself, to set up internals a test needs (learned durations).
    pub(super) fn raw(&mut self) -> &mut SchedulerState {
        &mut self.0
    }
}

pub(super) fn spec(key: &str, deps: &[&str]) -> (TaskSpec, Option<Bytes>) {
    let t = TaskSpec::new(key, deps.iter().map(|d| d.to_string()).collect());
    (t, Some(Bytes::from_static(b"spec")))
}

/// `n` workers with one thread each: peers `W1`, `W1 + 1`, ..., named `w0`,
/// `w1`, ..., at `tcp://h:0`, `tcp://h:1`, ...
pub(super) fn with_workers(n: usize) -> Checked {
    let mut s = Checked::new(SchedulerConfig::default());
    for i in 0..n {
        let w = W1 + i as PeerId;
        s.add_worker(w, Registration::new(format!("w{i}"), format!("tcp://h:{i}"), 1, 1 << 30)).unwrap();
    }
    s
}

/// The `ComputeTask`s sent since the last call, as (worker, key).
pub(super) fn computes(s: &mut Checked) -> Vec<(PeerId, String)> {
    s.take_outgoing()
        .into_iter()
        .filter_map(|(p, e)| match e.msg {
            Msg::W(ToWorker::ComputeTask { key, .. }) => Some((p, key)),
            _ => None,
        })
        .collect()
}

/// `w` reports `key` finished with a result of `nbytes`.
pub(super) fn finish(s: &mut Checked, w: PeerId, key: &str, nbytes: u64) {
    s.task_finished(w, &TaskFinished { stop: 1.0, ..TaskFinished::instant(key, nbytes) });
}

/// A report that `key` raised `text` (without exception or traceback).
pub(super) fn erred(key: &str, text: &str) -> TaskErred {
    let empty = Blob::Inline(Bytes::new());
    let (exception, traceback) = (empty.clone(), empty);
    TaskErred { key: key.into(), exception, traceback, text: text.into(), start: 0.0, stop: 1.0, thread: 0 }
}

/// `w` reports that `key` raised `text`.
pub(super) fn fail(s: &mut Checked, w: PeerId, key: &str, text: &str) {
    s.task_erred(w, erred(key, text), &[]);
}

#[test]
fn places_task_where_most_dependency_bytes_are() {
    let mut s = with_workers(2);
    s.update_graph(C1, vec![spec("a", &[]), spec("b", &[])], vec!["a".into(), "b".into()]);
    let sent = computes(&mut s);
    assert_eq!(sent.len(), 2);
    let wa = sent.iter().find(|(_, k)| k == "a").unwrap().0;
    let wb = sent.iter().find(|(_, k)| k == "b").unwrap().0;
    assert_ne!(wa, wb, "root tasks spread over idle workers");
    finish(&mut s, wa, "a", 1_000);
    finish(&mut s, wb, "b", 10);
    s.update_graph(C1, vec![spec("c", &["a", "b"])], vec!["c".into()]);
    assert_eq!(computes(&mut s), vec![(wa, "c".to_string())]);
}

#[test]
fn root_tasks_are_queued_on_the_scheduler() {
    let mut s = with_workers(1);
    let specs: Vec<_> = (0..10).map(|i| spec(&format!("r-{i}"), &[])).collect();
    let keys = (0..10).map(|i| format!("r-{i}")).collect();
    s.update_graph(C1, specs, keys);
    let sent = computes(&mut s);
    assert_eq!(sent.len(), 2, "ceil(1.1 x 1 thread) in flight");
    assert_eq!(s.state_counts()["queued"], 8);
    finish(&mut s, W1, &sent[0].1, 8);
    assert_eq!(computes(&mut s).len(), 1, "a finished task frees one slot");
}

#[test]
fn queued_root_tasks_go_each_to_the_least_loaded_worker_with_a_free_slot() {
    // Workers of 1 to 4 threads, one retiring: every assignment must pick
    // the lowest busy/threads among workers under ceil(1.1 x threads),
    // the first registered among equals, and no retiring worker.
    let threads = [1u32, 3, 2, 4, 1, 2];
    let mut s = Checked::new(SchedulerConfig::default());
    for (i, &n) in threads.iter().enumerate() {
        let w = W1 + i as PeerId;
        s.add_worker(w, Registration::new(format!("w{i}"), format!("tcp://h:{i}"), n, 1 << 30)).unwrap();
    }
    s.retire_workers(C2, 1, vec!["w4".into()]);
    let _ = s.take_outgoing();
    let specs: Vec<_> = (0..100).map(|i| spec(&format!("r-{i}"), &[])).collect();
    s.update_graph(C1, specs, (0..100).map(|i| format!("r-{i}")).collect());
    let sent = computes(&mut s);
    let slots: Vec<usize> = threads.iter().map(|&n| (n as f64 * 1.1).ceil() as usize).collect();
    let mut busy = vec![0usize; threads.len()];
    for (w, key) in &sent {
        let i = (*w - W1) as usize;
        let eligible = (0..threads.len()).filter(|&j| j != 4 && busy[j] < slots[j]);
        let load = |j: usize| busy[j] as f64 / threads[j] as f64;
        let best = eligible.min_by(|&a, &b| load(a).total_cmp(&load(b)).then(a.cmp(&b))).unwrap();
        assert_eq!(i, best, "{key} went to w{i}, the least loaded was w{best} (busy {busy:?})");
        busy[i] += 1;
    }
    let expected: usize = (0..threads.len()).filter(|&j| j != 4).map(|j| slots[j]).sum();
    assert_eq!(sent.len(), expected, "every free slot filled, no more");
}

#[test]
fn short_root_tasks_are_pipelined_long_ones_are_not() {
    let mut s = with_workers(1);
    let specs: Vec<_> = (0..200).map(|i| spec(&format!("r-{i}"), &[])).collect();
    s.update_graph(C1, specs, (0..200).map(|i| format!("r-{i}")).collect());
    let sent = computes(&mut s);
    assert_eq!(sent.len(), 2, "duration unknown: worker-saturation applies");
    // One finished in 10 us: 2 ms of such tasks is 200, capped at 64 per thread.
    s.task_finished(W1, &TaskFinished { stop: 1e-5, ..TaskFinished::instant(&sent[0].1, 8) });
    assert_eq!(computes(&mut s).len(), 63, "64 in flight");
    // A group of 1 s tasks gets no more than worker-saturation allows.
    let mut s2 = with_workers(1);
    let specs: Vec<_> = (0..10).map(|i| spec(&format!("slow-{i}"), &[])).collect();
    s2.update_graph(C1, specs, (0..10).map(|i| format!("slow-{i}")).collect());
    let sent = computes(&mut s2);
    s2.task_finished(W1, &TaskFinished { stop: 1.0, ..TaskFinished::instant(&sent[0].1, 8) });
    assert_eq!(computes(&mut s2).len(), 1, "long tasks: ceil(1.1 x 1) in flight");
}

#[test]
fn seceded_tasks_free_their_slot_for_the_tasks_they_launch() {
    let mut s = with_workers(1);
    s.add_client(C1);
    s.update_graph(C1, vec![spec("parent", &[])], vec!["parent".into()]);
    s.update_graph(C1, vec![spec("a", &[]), spec("b", &[]), spec("c", &[])], vec!["a".into(), "b".into(), "c".into()]);
    // One thread, saturation 1.1: two root tasks in flight, the rest queued.
    assert_eq!(computes(&mut s).len(), 2);
    assert_eq!(s.task_state("b"), Some(TaskState::Queued));
    s.task_seceded(W1, "parent");
    assert_eq!(computes(&mut s), vec![(W1, "b".to_string())]);
    assert_eq!(s.task_state("parent"), Some(TaskState::Processing));
    // A seceded task lost with its worker is still rescheduled.
    s.remove_worker(W1);
    assert_eq!(s.task_state("parent"), Some(TaskState::Queued));
}

#[test]
fn idle_workers_steal_long_tasks_from_a_saturated_one_after_it_agrees() {
    let mut s = with_workers(2);
    s.add_client(C1);
    // All inputs on W1; known-long tasks that need them.
    s.scatter_done(C1, "tcp://h:0", vec![("x".into(), 1000)]);
    let tasks: Vec<_> = (0..4).map(|i| spec(&format!("slow-{i}"), &["x"])).collect();
    s.update_graph(C1, tasks, (0..4).map(|i| format!("slow-{i}")).collect());
    assert!(computes(&mut s).iter().all(|(w, _)| *w == W1), "placed with their input");
    let g = s.t(s.keys["slow-0"]).group as usize;
    s.raw().groups[g].duration_sum = 1.0;
    s.raw().groups[g].duration_n = 1;
    s.balance();
    let asked: Vec<String> = s
        .take_outgoing()
        .into_iter()
        .filter_map(|(p, e)| match e.msg {
            Msg::W(ToWorker::StealRequest { key }) if p == W1 => Some(key),
            _ => None,
        })
        .collect();
    assert_eq!(asked, ["slow-3", "slow-2"], "one idle thread: one task to run, one queued; those that run last");
    s.balance();
    assert!(s.take_outgoing().is_empty(), "no second request while one is in flight");
    // The victim already started it: nothing moves.
    s.steal_response(W1, "slow-3", false);
    assert_eq!(s.t(s.keys["slow-3"]).processing_on, Some(W1));
    // An answer for a request no longer in flight changes nothing either.
    s.steal_response(W1, "slow-3", true);
    assert_eq!(s.t(s.keys["slow-3"]).processing_on, Some(W1));
    s.steal_response(W1, "slow-2", true);
    assert_eq!(computes(&mut s), [(W2, "slow-2".to_string())]);
    assert_eq!(s.stolen_total(), 1);
}

#[test]
fn short_tasks_with_large_inputs_are_not_stolen() {
    let mut s = with_workers(2);
    s.add_client(C1);
    s.scatter_done(C1, "tcp://h:0", vec![("x".into(), 1 << 30)]);
    let tasks: Vec<_> = (0..4).map(|i| spec(&format!("quick-{i}"), &["x"])).collect();
    s.update_graph(C1, tasks, (0..4).map(|i| format!("quick-{i}")).collect());
    computes(&mut s);
    s.balance();
    assert!(!s.take_outgoing().iter().any(|(_, e)| matches!(e.msg, Msg::W(ToWorker::StealRequest { .. }))));
}

#[test]
fn released_results_are_freed_and_forgotten() {
    let mut s = with_workers(1);
    s.update_graph(C1, vec![spec("a", &[]), spec("b", &["a"])], vec!["b".into()]);
    let sent = computes(&mut s);
    assert_eq!(sent, vec![(W1, "a".to_string())]);
    finish(&mut s, W1, "a", 8);
    assert_eq!(computes(&mut s), vec![(W1, "b".to_string())]);
    finish(&mut s, W1, "b", 8);
    let out = s.take_outgoing();
    let freed: Vec<&Msg> =
        out.iter().map(|(_, e)| &e.msg).filter(|m| matches!(m, Msg::W(ToWorker::FreeKeys { .. }))).collect();
    assert_eq!(freed, vec![&Msg::W(ToWorker::FreeKeys { keys: vec!["a".into()] })], "a is not wanted once b is done");
    assert!(out
        .iter()
        .any(|(p, e)| *p == C1 && matches!(&e.msg, Msg::C(ToClient::KeyInMemory { key, .. }) if key == "b")));
    s.release_keys(C1, &["b".into()]);
    assert_eq!(s.ntasks(), 0, "everything forgotten");
}

#[test]
fn freed_keys_go_to_each_worker_in_one_message_without_overtaking_others() {
    let mut s = with_workers(2);
    let leaves: Vec<String> = (0..10).map(|i| format!("x-{i}")).collect();
    let mut graph: Vec<_> = leaves.iter().map(|k| spec(k, &[])).collect();
    let refs: Vec<&str> = leaves.iter().map(String::as_str).collect();
    graph.push(spec("total", &refs));
    s.update_graph(C1, graph, vec!["total".into()]);
    let mut on: Vec<(PeerId, String)> = Vec::new();
    while on.len() < leaves.len() {
        let sent = computes(&mut s);
        for (w, k) in &sent {
            finish(&mut s, *w, k, 8);
        }
        on.extend(sent);
    }
    let (w, k) = computes(&mut s).pop().expect("the merge runs");
    assert_eq!(k, "total");
    finish(&mut s, w, "total", 8);
    let frees: Vec<(PeerId, Vec<String>)> = s
        .take_outgoing()
        .into_iter()
        .filter_map(|(p, e)| match e.msg {
            Msg::W(ToWorker::FreeKeys { keys }) => Some((p, keys)),
            _ => None,
        })
        .collect();
    for worker in [W1, W1 + 1] {
        let mine: Vec<&(PeerId, Vec<String>)> = frees.iter().filter(|(p, _)| *p == worker).collect();
        let mut expected: Vec<String> = on.iter().filter(|(p, _)| *p == worker).map(|(_, k)| k.clone()).collect();
        assert!(!expected.is_empty(), "both workers ran leaves");
        assert_eq!(mine.len(), 1, "one FreeKeys for {worker}: {mine:?}");
        let mut got = mine[0].1.clone();
        got.sort();
        expected.sort();
        assert_eq!(got, expected);
    }
    // A message to the worker between two frees keeps them apart.
    let raw = s.raw();
    raw.send_worker(W1, ToWorker::FreeKeys { keys: vec!["a".into()] });
    raw.send_worker(W1 + 1, ToWorker::FreeKeys { keys: vec!["b".into()] });
    raw.send_worker(W1, ToWorker::FreeShared { ids: vec![7] });
    raw.send_worker(W1, ToWorker::FreeKeys { keys: vec!["c".into()] });
    raw.send_worker(W1 + 1, ToWorker::FreeKeys { keys: vec!["d".into()] });
    let msgs: Vec<(PeerId, Msg)> = s.take_outgoing().into_iter().map(|(p, e)| (p, e.msg)).collect();
    assert_eq!(
        msgs,
        vec![
            (W1, Msg::W(ToWorker::FreeKeys { keys: vec!["a".into()] })),
            (W1 + 1, Msg::W(ToWorker::FreeKeys { keys: vec!["b".into(), "d".into()] })),
            (W1, Msg::W(ToWorker::FreeShared { ids: vec![7] })),
            (W1, Msg::W(ToWorker::FreeKeys { keys: vec!["c".into()] })),
        ]
    );
}

#[test]
fn errors_propagate_to_dependents_and_reach_the_client() {
    let mut s = with_workers(1);
    s.update_graph(C1, vec![spec("a", &[]), spec("b", &["a"])], vec!["b".into()]);
    computes(&mut s);
    fail(&mut s, W1, "a", "ZeroDivisionError: boom");
    assert_eq!(s.task_state("b"), Some(TaskState::Erred));
    let out = s.take_outgoing();
    assert!(out.iter().any(|(p, e)| *p == C1
        && matches!(&e.msg, Msg::C(ToClient::KeyErred { key, text, .. }) if key == "b" && text.contains("boom"))));
}

#[test]
fn pure_keys_are_computed_once_across_clients() {
    let mut s = with_workers(1);
    s.update_graph(C1, vec![spec("inc-1", &[])], vec!["inc-1".into()]);
    s.update_graph(C2, vec![spec("inc-1", &[])], vec!["inc-1".into()]);
    assert_eq!(computes(&mut s).len(), 1);
    finish(&mut s, W1, "inc-1", 8);
    let told: Vec<PeerId> = s
        .take_outgoing()
        .into_iter()
        .filter(|(_, e)| matches!(e.msg, Msg::C(ToClient::KeyInMemory { .. })))
        .map(|(p, _)| p)
        .collect();
    assert_eq!(told, vec![C1, C2]);
    s.release_keys(C1, &["inc-1".into()]);
    assert_eq!(s.task_state("inc-1"), Some(TaskState::Memory), "C2 still holds it");
    s.release_keys(C2, &["inc-1".into()]);
    assert_eq!(s.ntasks(), 0);
}

#[test]
fn lost_worker_tasks_are_rescheduled_and_lost_results_recomputed() {
    let mut s = with_workers(2);
    s.update_graph(C1, vec![spec("a", &[])], vec!["a".into()]);
    let (wa, _) = computes(&mut s)[0].clone();
    finish(&mut s, wa, "a", 8);
    s.update_graph(C1, vec![spec("b", &["a"])], vec!["b".into()]);
    assert_eq!(computes(&mut s), vec![(wa, "b".to_string())]);
    s.remove_worker(wa);
    let other = if wa == W1 { W2 } else { W1 };
    // a was only on the dead worker: recomputed first, then b.
    assert_eq!(computes(&mut s), vec![(other, "a".to_string())]);
    finish(&mut s, other, "a", 8);
    assert_eq!(computes(&mut s), vec![(other, "b".to_string())]);
}

#[test]
fn a_wanted_result_lost_with_its_worker_is_reported_lost_then_delivered_again() {
    let mut s = with_workers(2);
    s.update_graph(C1, vec![spec("a", &[])], vec!["a".into()]);
    let (wa, _) = computes(&mut s)[0].clone();
    finish(&mut s, wa, "a", 8);
    s.take_outgoing();
    s.remove_worker(wa);
    let out = s.take_outgoing();
    let lost =
        out.iter().position(|(p, e)| *p == C1 && matches!(&e.msg, Msg::C(ToClient::KeyLost { key }) if key == "a"));
    let recompute =
        out.iter().position(|(_, e)| matches!(&e.msg, Msg::W(ToWorker::ComputeTask { key, .. }) if key == "a"));
    assert!(lost.is_some() && recompute.is_some(), "{out:?}");
    let other = if wa == W1 { W2 } else { W1 };
    finish(&mut s, other, "a", 8);
    assert!(s
        .take_outgoing()
        .iter()
        .any(|(p, e)| *p == C1 && matches!(&e.msg, Msg::C(ToClient::KeyInMemory { key, .. }) if key == "a")));
}

#[test]
fn retiring_a_worker_copies_its_data_first_and_gives_it_no_new_work() {
    let mut s = with_workers(2);
    s.update_graph(C1, vec![spec("a", &[]), spec("b", &[])], vec!["a".into(), "b".into()]);
    let placed = computes(&mut s);
    let (w1, k1) = placed[0].clone();
    let (w2, k2) = placed[1].clone();
    assert_ne!(w1, w2);
    finish(&mut s, w2, &k2, 8);
    s.take_outgoing();
    // w1 still runs its task: retirement waits for it.
    let name1 = s.worker_infos().into_iter().find(|w| s.workers[&w1].address == w.address).unwrap().name;
    s.retire_workers(C2, 7, vec![name1.clone()]);
    assert!(s.take_outgoing().is_empty());
    assert!(s.worker_infos().iter().any(|w| w.retiring));
    // New work goes only to the other worker.
    s.update_graph(C1, vec![spec("c", &[])], vec!["c".into()]);
    assert_eq!(computes(&mut s), vec![(w2, "c".to_string())]);
    finish(&mut s, w1, &k1, 16);
    let out = s.take_outgoing();
    let acquire: Vec<_> = out
        .iter()
        .filter_map(|(p, e)| match &e.msg {
            Msg::W(ToWorker::AcquireReplicas { keys }) => Some((*p, keys[0].key.clone(), keys[0].who_has.clone())),
            _ => None,
        })
        .collect();
    assert_eq!(acquire, vec![(w2, k1.clone(), vec![s.workers[&w1].address.clone()])]);
    // The copy arrives: the worker is closed and the requester answered.
    s.add_keys(w2, &[(k1.clone(), 16)]);
    let out = s.take_outgoing();
    assert!(out.iter().any(|(p, e)| *p == w1 && matches!(e.msg, Msg::W(ToWorker::CloseWorker { .. }))));
    assert!(out.iter().any(|(p, e)| *p == C2
        && e.msg == Msg::C(ToClient::WorkersRetired { id: 7, retired: vec![name1.clone()], failed: vec![] })));
    assert_eq!(s.nworkers(), 1);
    assert_eq!(s.who_has(&k1), vec![s.workers[&w2].address.clone()]);
    assert_eq!(s.task_state(&k1), Some(TaskState::Memory));
}

#[test]
fn retiring_the_last_worker_holding_data_is_refused() {
    let mut s = with_workers(1);
    s.update_graph(C1, vec![spec("a", &[])], vec!["a".into()]);
    computes(&mut s);
    finish(&mut s, W1, "a", 8);
    s.retire_workers(C2, 1, vec!["w0".into(), "nope".into()]);
    let out = s.take_outgoing();
    let reply = out.iter().find(|(p, _)| *p == C2).map(|(_, e)| e.msg.clone());
    assert_eq!(
        reply,
        Some(Msg::C(ToClient::WorkersRetired {
            id: 1,
            retired: vec![],
            failed: vec![
                ("nope".into(), "no such worker".into()),
                ("w0".into(), "no other worker can hold its data".into())
            ],
        }))
    );
    assert_eq!(s.nworkers(), 1);
    assert!(!s.worker_infos()[0].retiring);
}

#[test]
fn load_uses_durations_learned_per_group() {
    let mut s = with_workers(1);
    let tasks: Vec<_> = (0..5).map(|i| spec(&format!("x-{i}"), &[])).collect();
    s.update_graph(C1, tasks, (0..5).map(|i| format!("x-{i}")).collect());
    let l = s.load();
    // Unknown durations count 0.5 s each; 2 in flight (saturation 1.1 x 1 thread), 3 queued.
    assert_eq!((l.processing, l.queued), (2, 3));
    assert!((l.occupancy - 1.0).abs() < 1e-9 && (l.queued_occupancy - 1.5).abs() < 1e-9);
    s.task_finished(W1, &TaskFinished { start: 10.0, stop: 12.0, ..TaskFinished::instant("x-0", 8) });
    let l = s.load();
    assert!((l.occupancy - 4.0).abs() < 1e-9, "{l:?}");
    assert!((l.queued_occupancy - 4.0).abs() < 1e-9, "{l:?}");
}

#[test]
fn worker_restrictions_wait_for_the_named_worker() {
    let mut s = with_workers(1);
    let (mut t, spec_bytes) = spec("pinned", &[]);
    t.workers = Some(vec!["gpu-box".into()]);
    s.update_graph(C1, vec![(t, spec_bytes)], vec!["pinned".into()]);
    assert!(computes(&mut s).is_empty());
    assert_eq!(s.task_state("pinned"), Some(TaskState::NoWorker));
    s.add_worker(W2, Registration::new("gpu-box", "tcp://h:9", 1, 0)).unwrap();
    assert_eq!(computes(&mut s), vec![(W2, "pinned".to_string())]);
}

#[test]
fn tasks_needing_resources_go_only_to_workers_declaring_enough() {
    let mut s = with_workers(2);
    s.add_client(C1);
    let gpu = |key: &str, amount: f64| {
        let (mut t, b) = spec(key, &[]);
        t.resources = vec![("GPU".into(), amount)];
        (t, b)
    };
    s.update_graph(C1, vec![gpu("a", 1.0), gpu("b", 1.0), gpu("big", 4.0)], vec!["a".into(), "b".into(), "big".into()]);
    // No worker declares GPU: all three wait, and the client hears why.
    let out = s.take_outgoing();
    let reasons: Vec<String> = out
        .iter()
        .filter_map(|(_, e)| match &e.msg {
            Msg::C(ToClient::KeyNoWorker { reason, .. }) => Some(reason.clone().unwrap_or_default()),
            _ => None,
        })
        .collect();
    assert_eq!(reasons.len(), 3);
    assert!(reasons[0].contains("no worker matches resources {GPU=1}"), "{reasons:?}");
    assert!(!out.iter().any(|(_, e)| matches!(e.msg, Msg::W(ToWorker::ComputeTask { .. }))));
    let mut reg = Registration::new("gpu", "tcp://h:9", 4, 0);
    reg.resources = vec![("GPU".into(), 2.0)];
    s.add_worker(20, reg).unwrap();
    // Both one-GPU tasks go to the GPU worker, whatever the others' load;
    // four GPUs are more than any worker has.
    let out = s.take_outgoing();
    let sent: Vec<(PeerId, String, Resources)> = out
        .into_iter()
        .filter_map(|(p, e)| match e.msg {
            Msg::W(ToWorker::ComputeTask { key, resources, .. }) => Some((p, key, resources)),
            _ => None,
        })
        .collect();
    let gpu1 = vec![("GPU".to_string(), 1.0)];
    assert_eq!(sent, vec![(20, "a".into(), gpu1.clone()), (20, "b".into(), gpu1)]);
    assert_eq!(s.task_state("big"), Some(TaskState::NoWorker));
    // A dependent without resources may run anywhere (here: with its input).
    finish(&mut s, 20, "a", 8);
    s.update_graph(C1, vec![spec("after", &["a"])], vec!["after".into()]);
    assert_eq!(computes(&mut s), vec![(20, "after".to_string())]);
    let info = s.worker_infos_with(&s.load());
    assert_eq!(info.iter().find(|w| w.name == "gpu").unwrap().resources, vec![("GPU".to_string(), 2.0)]);
}

#[test]
fn clients_hear_when_a_task_has_no_worker_and_when_it_has_one_again() {
    let mut s = with_workers(1);
    s.add_client(C1);
    let (mut t, spec_bytes) = spec("pinned", &[]);
    t.workers = Some(vec!["later".into()]);
    s.update_graph(C1, vec![(t, spec_bytes)], vec!["pinned".into()]);
    let told = |s: &mut Checked| -> Vec<String> {
        s.take_outgoing()
            .into_iter()
            .filter_map(|(p, e)| match e.msg {
                Msg::C(ToClient::KeyNoWorker { reason, .. }) if p == C1 => Some(reason.unwrap_or_default()),
                _ => None,
            })
            .collect()
    };
    let r = told(&mut s);
    assert_eq!(r.len(), 1);
    assert!(r[0].contains("no worker matches workers=[\"later\"]"), "{r:?}");
    s.add_worker(W2, Registration::new("later", "tcp://h:9", 1, 1 << 30)).unwrap();
    assert_eq!(told(&mut s), [String::new()]);
    assert_eq!(s.task_state("pinned"), Some(TaskState::Processing));
}

#[test]
fn rebalance_copies_then_frees_the_sender_and_answers_when_done() {
    let mut s = with_workers(3);
    s.add_client(C1);
    let keys: Vec<(Key, u64)> = (0..6).map(|i| (format!("x-{i}"), 100)).collect();
    s.scatter_done(C1, "tcp://h:0", keys);
    // A task running on w0 needs x-0 (largest-first ties go by id: x-0 first).
    s.update_graph(C1, vec![spec("use", &["x-0"])], vec!["use".into()]);
    s.take_outgoing();
    s.rebalance(C1, 7, vec![], vec![]);
    let mut acquire: Vec<(PeerId, Vec<String>)> = s
        .take_outgoing()
        .into_iter()
        .filter_map(|(p, e)| match e.msg {
            Msg::W(ToWorker::AcquireReplicas { keys }) => Some((p, keys.into_iter().map(|d| d.key).collect())),
            _ => None,
        })
        .collect();
    acquire.sort();
    // 600 bytes over three workers: two keys to each of w1 and w2, never x-0.
    assert_eq!(acquire.iter().map(|(_, k)| k.len()).collect::<Vec<_>>(), [2, 2]);
    assert!(acquire.iter().all(|(_, k)| !k.contains(&"x-0".to_string())), "{acquire:?}");
    // w1's copies arrive: w0's are freed; w2's first copy fails.
    let (w1, w1_keys) = acquire[0].clone();
    s.add_keys(w1, &w1_keys.iter().map(|k| (k.clone(), 100)).collect::<Vec<_>>());
    let out = s.take_outgoing();
    let freed: Vec<String> = out
        .iter()
        .filter_map(|(p, e)| match &e.msg {
            Msg::W(ToWorker::FreeKeys { keys }) if *p == W1 => Some(keys.clone()),
            _ => None,
        })
        .flatten()
        .collect();
    assert_eq!(freed, w1_keys);
    assert!(!out.iter().any(|(_, e)| matches!(e.msg, Msg::C(ToClient::Rebalanced { .. }))));
    for k in &w1_keys {
        assert_eq!(s.who_has(k), vec!["tcp://h:1".to_string()]);
    }
    let (w2, w2_keys) = acquire[1].clone();
    s.missing_data(w2, &w2_keys[0], &[]);
    s.add_keys(w2, &[(w2_keys[1].clone(), 100)]);
    let answers: Vec<Msg> = s.take_outgoing().into_iter().filter(|(p, _)| *p == C1).map(|(_, e)| e.msg).collect();
    assert!(
        answers.iter().any(|m| matches!(
            m,
            Msg::C(ToClient::Rebalanced { id: 7, result: Ok(RebalanceStats { moved: 3, bytes: 300, failed: 1 }) })
        )),
        "{answers:?}"
    );
    assert_eq!(s.who_has(&w2_keys[0]), vec!["tcp://h:0".to_string()], "a failed copy keeps the original");
    // Unknown workers are an error; balanced already: answered at once.
    s.rebalance(C1, 8, vec![], vec!["nobody".into()]);
    let out = s.take_outgoing();
    assert!(
        matches!(&out[0].1.msg, Msg::C(ToClient::Rebalanced { id: 8, result: Err(error) }) if error.contains("no such worker: nobody"))
    );
    s.rebalance(C1, 9, vec!["x-1".into()], vec!["w1".into(), "w2".into()]);
    let out = s.take_outgoing();
    assert!(
        matches!(
            &out[0].1.msg,
            Msg::C(ToClient::Rebalanced { id: 9, result: Ok(RebalanceStats { moved: 0, failed: 0, .. }) })
        ),
        "{out:?}"
    );
}

#[test]
fn a_recipient_dying_mid_rebalance_loses_nothing_and_the_request_is_answered() {
    let mut s = with_workers(2);
    s.add_client(C1);
    s.scatter_done(C1, "tcp://h:0", vec![("a".into(), 100), ("b".into(), 100)]);
    s.take_outgoing();
    s.rebalance(C1, 1, vec![], vec![]);
    assert!(s
        .take_outgoing()
        .iter()
        .any(|(p, e)| *p == W2 && matches!(e.msg, Msg::W(ToWorker::AcquireReplicas { .. }))));
    s.remove_worker(W2);
    let out = s.take_outgoing();
    assert!(
        out.iter().any(|(p, e)| *p == C1
            && matches!(
                e.msg,
                Msg::C(ToClient::Rebalanced { id: 1, result: Ok(RebalanceStats { moved: 0, failed: 1, .. }) })
            )),
        "{out:?}"
    );
    assert_eq!(s.who_has("a"), ["tcp://h:0"]);
    assert_eq!(s.who_has("b"), ["tcp://h:0"]);
}

#[test]
fn replicate_copies_to_the_least_loaded_workers_until_n_hold_it() {
    let mut s = with_workers(3);
    s.add_client(C1);
    s.scatter_done(C1, "tcp://h:0", vec![("x".into(), 100)]);
    s.scatter_done(C1, "tcp://h:1", vec![("big".into(), 1000)]);
    s.take_outgoing();
    s.replicate(&["x".into(), "unknown".into()], 2, &[]);
    let sent: Vec<(PeerId, String)> = s
        .take_outgoing()
        .into_iter()
        .filter_map(|(p, e)| match e.msg {
            Msg::W(ToWorker::AcquireReplicas { keys }) => Some((p, keys[0].key.clone())),
            _ => None,
        })
        .collect();
    assert_eq!(sent, [(W1 + 2, "x".to_string())], "the worker holding nothing gets the copy");
    s.add_keys(W1 + 2, &[("x".into(), 100)]);
    assert_eq!(s.who_has("x").len(), 2);
    s.replicate(&["x".into()], 2, &[]);
    assert!(s.take_outgoing().is_empty(), "already on two workers");
    // Restricted to w1 (by name) and w2's address: only w1 lacks it, and
    // w0's copy does not count.
    s.replicate(&["x".into()], 2, &["w1".into(), "tcp://h:2".into()]);
    let sent: Vec<PeerId> = s
        .take_outgoing()
        .into_iter()
        .filter_map(|(p, e)| matches!(e.msg, Msg::W(ToWorker::AcquireReplicas { .. })).then_some(p))
        .collect();
    assert_eq!(sent, [W1 + 1], "big's holder w1 gets x: it is one of the named workers");
}

#[test]
fn workers_that_register_later_get_the_plugins_before_any_task() {
    let mut s = with_workers(0);
    s.register_plugin("a".into(), Bytes::from_static(b"set up a"));
    s.register_plugin("b".into(), Bytes::from_static(b"set up b"));
    s.register_plugin("a".into(), Bytes::from_static(b"set up a again"));
    s.update_graph(C1, vec![spec("x", &[])], vec!["x".into()]);
    s.take_outgoing();
    s.add_worker(W1, Registration::new("w0".to_string(), "tcp://h:0".to_string(), 1, 1 << 30)).unwrap();
    let sent: Vec<Msg> = s.take_outgoing().into_iter().filter(|(p, _)| *p == W1).map(|(_, e)| e.msg).collect();
    assert!(matches!(&sent[0], Msg::W(ToWorker::SetUp { calls }) if calls.len() == 2), "{sent:?}");
    assert!(matches!(&sent[1], Msg::W(ToWorker::ComputeTask { key, .. }) if key == "x"), "{sent:?}");
    // A restart keeps them; a plugin unregistered is no longer handed out.
    s.restart();
    s.unregister_plugin("b");
    s.take_outgoing();
    s.add_worker(W2, Registration::new("w1".to_string(), "tcp://h:1".to_string(), 1, 1 << 30)).unwrap();
    let sent = s.take_outgoing();
    assert!(sent
        .iter()
        .any(|(p, e)| *p == W2 && matches!(&e.msg, Msg::W(ToWorker::SetUp { calls }) if calls.len() == 1)));
}

#[test]
fn restart_cancels_every_key_and_restarts_every_worker() {
    let mut s = with_workers(2);
    s.add_client(C1);
    s.update_graph(C1, vec![spec("a", &[]), spec("b", &["a"])], vec!["b".into()]);
    let (wa, _) = computes(&mut s)[0].clone();
    finish(&mut s, wa, "a", 8);
    // A retirement waiting for its data to move when the restart comes.
    s.retire_workers(C1, 7, vec![if wa == W1 { "w0".into() } else { "w1".into() }]);
    s.take_outgoing();
    s.restart();
    let out = s.take_outgoing();
    assert!(out
        .iter()
        .any(|(p, e)| *p == C1 && matches!(&e.msg, Msg::C(ToClient::KeyCancelled { key, .. }) if key == "b")));
    assert!(
        out.iter().any(|(p, e)| *p == C1
            && matches!(&e.msg, Msg::C(ToClient::WorkersRetired { id: 7, retired, failed })
                if retired.is_empty() && failed.len() == 1 && failed[0].1 == crate::protocol::RESTARTED)),
        "the pending retirement is answered: {out:?}"
    );
    assert_eq!(out.iter().filter(|(_, e)| matches!(e.msg, Msg::W(ToWorker::RestartWorker))).count(), 2);
    assert_eq!((s.ntasks(), s.nworkers(), s.nclients()), (0, 0, 1));
}

#[test]
fn unknown_dependency_errs_with_a_clear_message() {
    let mut s = with_workers(1);
    s.update_graph(C1, vec![spec("b", &["gone"])], vec!["b".into()]);
    let out = s.take_outgoing();
    assert!(out.iter().any(|(_, e)| matches!(&e.msg,
        Msg::C(ToClient::KeyErred { text, .. }) if text.contains("\"gone\" is not known to the scheduler"))));
}

#[test]
fn an_unwanted_task_with_unknown_dependencies_is_forgotten_with_its_leaves() {
    // Found by fuzzing: "m" names two unknown keys and nobody wants it, so
    // erring it forgets it and the leaves it alone needed.
    let mut s = with_workers(1);
    let tasks = vec![spec("l-1", &[]), spec("l-2", &[]), spec("m", &["l-1", "gone-1", "l-2", "gone-2"])];
    s.update_graph(C1, tasks, vec!["other".into()]);
    for k in ["m", "l-1", "l-2"] {
        assert_eq!(s.task_state(k), None, "{k} is forgotten");
    }
    // Wanted, the same graph errs once, naming the first unknown key.
    let tasks = vec![spec("l-1", &[]), spec("m", &["l-1", "gone-1", "gone-2"])];
    s.update_graph(C1, tasks, vec!["m".into()]);
    assert_eq!(s.task_state("m"), Some(TaskState::Erred));
    let out = s.take_outgoing();
    let texts: Vec<&String> = out
        .iter()
        .filter_map(|(_, e)| match &e.msg {
            Msg::C(ToClient::KeyErred { key, text, .. }) if key == "m" => Some(text),
            _ => None,
        })
        .collect();
    assert_eq!(texts.len(), 1, "{texts:?}");
    assert!(texts[0].contains("gone-1"), "{}", texts[0]);
}

#[test]
fn duplicate_worker_names_are_refused() {
    let mut s = with_workers(1);
    let err = s.add_worker(W2, Registration::new("w0", "tcp://h:77", 1, 0)).unwrap_err();
    assert!(err.contains("already registered"));
}

#[test]
fn events_give_a_snapshot_then_only_changes() {
    let mut s = with_workers(1);
    s.update_graph(C1, vec![spec("x-1", &[]), spec("y-1", &[])], vec!["x-1".into(), "y-1".into()]);
    let mut cur = EventCursor::default();
    let snap = s.events_since(&mut cur, 0.0);
    assert_eq!(snap.groups.len(), 2);
    assert!(snap.stream.is_empty());
    let sent = computes(&mut s);
    let x_worker = sent.iter().find(|(_, k)| k == "x-1").unwrap().0;
    finish(&mut s, x_worker, "x-1", 8);
    let delta = s.events_since(&mut cur, 1.0);
    assert_eq!(delta.stream.len(), 1);
    assert_eq!(delta.groups.len(), 1, "only the x group changed");
    assert_eq!(delta.groups[0].memory, 1);
    assert!(s.events_since(&mut cur, 2.0).stream.is_empty());
}

#[test]
fn retries_rerun_a_failing_task() {
    let mut s = with_workers(1);
    let (mut t, b) = spec("flaky", &[]);
    t.retries = 2;
    s.update_graph(C1, vec![(t, b)], vec!["flaky".into()]);
    for _ in 0..2 {
        assert_eq!(computes(&mut s).len(), 1);
        fail(&mut s, W1, "flaky", "OSError");
        assert_ne!(s.task_state("flaky"), Some(TaskState::Erred));
    }
    assert_eq!(computes(&mut s).len(), 1, "third attempt");
    fail(&mut s, W1, "flaky", "OSError");
    assert_eq!(s.task_state("flaky"), Some(TaskState::Erred));
}

#[test]
fn a_task_that_keeps_killing_workers_errs_with_killed_worker() {
    let mut s = Checked::new(SchedulerConfig { allowed_failures: 1, ..Default::default() });
    s.add_worker(W1, Registration::new("a", "tcp://h:1", 1, 0)).unwrap();
    s.update_graph(C1, vec![spec("bomb", &[])], vec!["bomb".into()]);
    assert_eq!(computes(&mut s), vec![(W1, "bomb".to_string())]);
    s.remove_worker(W1);
    s.add_worker(W2, Registration::new("b", "tcp://h:2", 1, 0)).unwrap();
    assert_eq!(computes(&mut s), vec![(W2, "bomb".to_string())], "first death is forgiven");
    s.remove_worker(W2);
    assert_eq!(s.task_state("bomb"), Some(TaskState::Erred));
    assert!(s.take_outgoing().iter().any(|(_, e)| matches!(&e.msg,
        Msg::C(ToClient::KeyErred { text, .. }) if text.starts_with("KilledWorker:") && text.contains("tcp://h:2"))));
}

#[test]
fn retry_reruns_the_erred_chain() {
    let mut s = with_workers(1);
    s.update_graph(C1, vec![spec("a", &[]), spec("b", &["a"])], vec!["b".into()]);
    computes(&mut s);
    fail(&mut s, W1, "a", "boom");
    assert_eq!(s.task_state("b"), Some(TaskState::Erred));
    s.take_outgoing();
    s.retry_keys(&["b".into()]);
    assert_eq!(computes(&mut s), vec![(W1, "a".to_string())]);
    finish(&mut s, W1, "a", 8);
    assert_eq!(computes(&mut s), vec![(W1, "b".to_string())]);
}

#[test]
fn fire_and_forget_runs_after_release_then_forgets() {
    let mut s = with_workers(1);
    s.update_graph(C1, vec![spec("side-effect", &[])], vec!["side-effect".into()]);
    s.fire_and_forget(&["side-effect".into()]);
    s.release_keys(C1, &["side-effect".into()]);
    assert_eq!(computes(&mut s).len(), 1, "still computed");
    finish(&mut s, W1, "side-effect", 8);
    assert_eq!(s.ntasks(), 0, "forgotten once done");
}

#[test]
fn datasets_hold_keys_until_unpublished() {
    let mut s = with_workers(1);
    s.update_graph(C1, vec![spec("x", &[])], vec!["x".into()]);
    computes(&mut s);
    finish(&mut s, W1, "x", 8);
    s.publish_dataset(C1, 1, "mine".into(), vec!["x".into()], Bytes::from_static(b"pickled"), false);
    s.publish_dataset(C1, 2, "mine".into(), vec!["x".into()], Bytes::new(), false);
    let out = s.take_outgoing();
    assert!(out
        .iter()
        .any(|(_, e)| matches!(&e.msg, Msg::C(ToClient::DatasetReply { id: 2, result: Err(error) }) if error.contains("already exists"))));
    s.release_keys(C1, &["x".into()]);
    assert_eq!(s.task_state("x"), Some(TaskState::Memory), "held by the dataset");
    s.get_dataset(C2, 3, "mine");
    s.list_datasets(C2, 4);
    let out = s.take_outgoing();
    assert!(out.iter().any(
        |(_, e)| matches!(&e.msg, Msg::C(ToClient::DatasetReply { id: 3, result: Ok(DatasetValue::Data(Blob::Inline(b))) }) if &b[..] == b"pickled")
    ));
    assert!(out
        .iter()
        .any(|(_, e)| matches!(&e.msg, Msg::C(ToClient::DatasetReply { id: 4, result: Ok(DatasetValue::Names(names)) }) if names == &vec!["mine".to_string()])));
    s.unpublish_dataset(C2, 5, "mine");
    assert_eq!(s.ntasks(), 0);
}

#[test]
fn retrying_a_task_whose_scattered_input_was_lost_errs_again() {
    let mut s = with_workers(2);
    s.add_client(C1);
    s.scatter_done(C1, "tcp://h:0", vec![("data".into(), 100)]);
    s.update_graph(C1, vec![spec("b", &["data"]), spec("a", &["b"])], vec!["a".into()]);
    s.release_keys(C1, &["data".into()]);
    s.remove_worker(W1);
    assert_eq!(s.task_state("a"), Some(TaskState::Erred));
    s.take_outgoing();
    s.retry_keys(&["a".into()]);
    assert_eq!(s.task_state("a"), Some(TaskState::Erred), "{}", s.describe("a"));
    assert!(s
        .take_outgoing()
        .iter()
        .any(|(p, e)| *p == C1 && matches!(&e.msg, Msg::C(ToClient::KeyErred { key, .. }) if key == "a")));
}

#[test]
fn the_task_stream_is_answered_by_time_window_and_count() {
    let mut s = with_workers(1);
    s.update_graph(C1, vec![spec("a", &[]), spec("b", &[]), spec("c", &[])], vec!["a".into(), "b".into(), "c".into()]);
    for (k, stop) in [("a", 10.0), ("b", 20.0), ("c", 30.0)] {
        s.task_finished(W1, &TaskFinished { start: stop - 1.0, stop, ..TaskFinished::instant(k, 8) });
    }
    s.take_outgoing();
    let mut ask = |start, stop, count| {
        s.task_stream_reply(C1, 1, start, stop, count);
        match &s.take_outgoing()[..] {
            [(C1, Sent { msg: Msg::C(ToClient::TaskStream { id: 1, records }) })] => {
                records.iter().map(|r| r.key.clone()).collect::<Vec<_>>()
            }
            other => panic!("{other:?}"),
        }
    };
    assert_eq!(ask(None, None, None), ["a", "b", "c"]);
    assert_eq!(ask(Some(15.0), None, None), ["b", "c"]);
    assert_eq!(ask(None, Some(25.0), None), ["a", "b"]);
    assert_eq!(ask(None, None, Some(1)), ["c"]);
}

#[test]
fn dependency_cycles_err_with_the_cycle_named_instead_of_hanging() {
    let mut s = with_workers(1);
    // a -> b -> c -> a, plus d depending on the cycle and a healthy e.
    let tasks = vec![spec("a", &["c"]), spec("b", &["a"]), spec("c", &["b"]), spec("d", &["a"]), spec("e", &[])];
    s.update_graph(C1, tasks, vec!["d".into(), "e".into()]);
    assert_eq!(s.task_state("d"), Some(TaskState::Erred));
    // The cycle erred; nobody wants its tasks themselves, so they are released.
    for k in ["a", "b", "c"] {
        let st = s.task_state(k);
        assert!(matches!(st, Some(TaskState::Erred | TaskState::Released) | None), "{k}: {st:?}");
    }
    let out = s.take_outgoing();
    let told = out.iter().find_map(|(p, e)| match &e.msg {
        Msg::C(ToClient::KeyErred { key, text, .. }) if *p == C1 && key == "d" => Some(text.clone()),
        _ => None,
    });
    let text = told.expect("the client hears about d");
    assert!(text.contains("dependency cycle") && text.contains("->"), "{text}");
    // The healthy task still runs, and the scheduler stays usable.
    assert_eq!(s.task_state("e"), Some(TaskState::Processing));
    finish(&mut s, W1, "e", 8);
    s.release_keys(C1, &["d".into(), "e".into()]);
    // What is left is the cycle's own three tasks, released (each is the
    // dependent of another, so none is forgotten).
    assert_eq!(s.ntasks(), 3);
    for k in ["a", "b", "c"] {
        assert_eq!(s.task_state(k), Some(TaskState::Released), "{k}");
    }
    // Wanting one of them again errs it again, at once.
    s.update_graph(C2, vec![], vec!["b".into()]);
    assert_eq!(s.task_state("b"), Some(TaskState::Erred));
    // A task depending on itself.
    s.update_graph(C1, vec![spec("self", &["self"])], vec!["self".into()]);
    assert_eq!(s.task_state("self"), Some(TaskState::Erred));
}

#[test]
fn a_dependency_listed_twice_is_one_dependency() {
    let mut s = with_workers(1);
    s.update_graph(C1, vec![spec("a", &[]), spec("b", &["a", "a"])], vec!["b".into()]);
    assert_eq!(computes(&mut s), vec![(W1, "a".to_string())]);
    finish(&mut s, W1, "a", 8);
    assert_eq!(computes(&mut s), vec![(W1, "b".to_string())]);
    finish(&mut s, W1, "b", 8);
    assert_eq!(s.task_state("b"), Some(TaskState::Memory));
    s.release_keys(C1, &["b".into()]);
    assert_eq!(s.ntasks(), 0, "both forgotten once released");
}

#[test]
fn groups_without_tasks_are_forgotten_and_subscribers_told() {
    let mut s = with_workers(1);
    let mut cursor = crate::scheduler::EventCursor::default();
    let _ = s.events_since(&mut cursor, 0.0);
    let keys: Vec<String> = (0..50).map(|i| format!("grp{i}x")).collect();
    let specs = keys.iter().map(|k| spec(k, &[])).collect();
    s.update_graph(C1, specs, keys.clone());
    assert_eq!(s.ngroups(), 50);
    for _ in 0..50 {
        for (w, k) in computes(&mut s) {
            finish(&mut s, w, &k, 8);
        }
    }
    s.release_keys(C1, &keys);
    assert_eq!(s.ntasks(), 0);
    s.forget_empty_groups();
    assert_eq!(s.ngroups(), 0, "no group is left once its tasks are forgotten");
    let u = s.events_since(&mut cursor, 1.0);
    assert_eq!(u.groups_removed.len(), 50);
    assert!(u.groups.is_empty());
    // A group that comes back reuses a slot and starts from what it learned.
    s.update_graph(C1, vec![spec("grp7x", &[])], vec!["grp7x".into()]);
    assert_eq!(s.ngroups(), 1);
    assert!(s.groups.len() <= 50, "slots are reused");
    let g = &s.groups[s.group_ids["grp7x"] as usize];
    assert_eq!(g.duration_n, 1, "learned run times survive");
    let u = s.events_since(&mut cursor, 2.0);
    assert_eq!(u.groups.iter().map(|g| g.name.as_str()).collect::<Vec<_>>(), ["grp7x"]);
}

#[test]
fn heartbeats_are_spaced_as_the_cluster_grows_and_shrinks() {
    let mut s = with_workers(0);
    let told = |s: &mut Checked| -> Vec<(PeerId, u64)> {
        s.take_outgoing()
            .into_iter()
            .filter_map(|(p, e)| match e.msg {
                Msg::W(ToWorker::HeartbeatInterval { ms }) => Some((p, ms)),
                _ => None,
            })
            .collect()
    };
    for i in 0..10u64 {
        s.add_worker(W1 + i, Registration::new(format!("w{i}"), format!("tcp://h:{i}"), 1, 1 << 30)).unwrap();
    }
    assert!(told(&mut s).is_empty(), "ten workers keep the default");
    s.add_worker(W1 + 10, Registration::new("w10".to_string(), "tcp://h:10".to_string(), 1, 1 << 30)).unwrap();
    let t = told(&mut s);
    assert_eq!(t.len(), 11, "all eleven are told: {t:?}");
    assert!(t.iter().all(|(_, ms)| *ms == 1000));
    s.add_worker(W1 + 11, Registration::new("w11".to_string(), "tcp://h:11".to_string(), 1, 1 << 30)).unwrap();
    assert_eq!(told(&mut s), [(W1 + 11, 1000)], "a newcomer hears the current interval");
    s.remove_worker(W1 + 11);
    s.remove_worker(W1 + 10);
    let t = told(&mut s);
    assert_eq!(t.len(), 10);
    assert!(t.iter().all(|(_, ms)| *ms == 500), "{t:?}");
    assert_eq!(crate::protocol::heartbeat_interval_ms(1000), 6000);
    assert_eq!(crate::protocol::heartbeat_interval_ms(100_000), 15_000);
}

/// A task calling shared blob `blob` (a `client.map` task).
fn call(key: &str, blob: u64) -> (TaskSpec, Option<Bytes>) {
    let (mut t, spec) = spec(key, &[]);
    t.shared = Some(blob);
    (t, spec)
}

#[test]
fn shared_blobs_go_once_to_each_worker_and_leave_with_their_last_task() {
    let mut s = with_workers(2);
    let f = Bytes::from_static(b"function");
    let keys: Vec<Key> = (0..6).map(|i| format!("m-{i}")).collect();
    let tasks = keys.iter().map(|k| call(k, 7)).collect();
    s.update_graph_shared(C1, tasks, keys.clone(), vec![(7, f.clone())]);
    let mut firsts = std::collections::BTreeMap::new();
    let mut sent = Vec::new();
    loop {
        let out: Vec<_> = s.take_outgoing();
        let mut any = false;
        for (w, e) in out {
            if let Msg::W(ToWorker::ComputeTask { key, shared: Some(r), .. }) = e.msg {
                assert_eq!(r.id, 7);
                // The bytes come with the first task a worker gets, never again.
                let first = !firsts.contains_key(&w);
                assert_eq!(r.data.is_some(), first, "{key} on {w}");
                if first {
                    assert_eq!(r.data, Some(Blob::Inline(f.clone())));
                    firsts.insert(w, key.clone());
                }
                sent.push((w, key));
                any = true;
            }
        }
        if !any {
            break;
        }
        for (w, k) in std::mem::take(&mut sent) {
            finish(&mut s, w, &k, 8);
        }
    }
    assert_eq!(firsts.len(), 2, "both workers ran some");
    assert_eq!(s.shared.len(), 1);
    // Sent again with tasks the scheduler has (deduplicated) and a blob no
    // new task takes: nothing is kept twice, nothing kept for nobody.
    let again = vec![call("m-0", 7), call("m-1", 8)];
    s.update_graph_shared(C1, again, vec![], vec![(7, f.clone()), (8, Bytes::from_static(b"other"))]);
    assert_eq!(s.shared.len(), 1);
    s.release_keys(C1, &keys);
    let freed: Vec<PeerId> = s
        .take_outgoing()
        .into_iter()
        .filter_map(|(w, e)| matches!(&e.msg, Msg::W(ToWorker::FreeShared { ids }) if ids == &[7]).then_some(w))
        .collect();
    assert_eq!(freed.len(), 2, "each worker that got it is told to drop it: {freed:?}");
    assert_eq!(s.shared.len(), 0);
}

#[test]
fn a_task_whose_shared_blob_never_came_errs() {
    let mut s = with_workers(1);
    s.update_graph_shared(C1, vec![call("m", 9)], vec!["m".into()], vec![]);
    let out = s.take_outgoing();
    assert!(
        out.iter().any(|(c, e)| *c == C1
            && matches!(&e.msg, Msg::C(ToClient::KeyErred { key, text, .. })
                if key == "m" && text.contains("shared blob 0x9") && text.contains("not sent"))),
        "{out:?}"
    );
    assert!(!out.iter().any(|(_, e)| matches!(e.msg, Msg::W(ToWorker::ComputeTask { .. }))));
}

#[test]
fn a_worker_that_joins_again_gets_the_shared_blob_again() {
    let mut s = with_workers(1);
    s.update_graph_shared(
        C1,
        vec![call("a", 3), call("b", 3)],
        vec!["a".into(), "b".into()],
        vec![(3, Bytes::from_static(b"f"))],
    );
    let has_data = |s: &mut Checked| -> Vec<bool> {
        s.take_outgoing()
            .into_iter()
            .filter_map(|(_, e)| match e.msg {
                Msg::W(ToWorker::ComputeTask { shared: Some(r), .. }) => Some(r.data.is_some()),
                _ => None,
            })
            .collect()
    };
    assert_eq!(has_data(&mut s), vec![true, false], "bytes with the first task only");
    s.remove_worker(W1);
    s.add_worker(W2, Registration::new("w9", "tcp://h:9", 1, 1 << 30)).unwrap();
    assert_eq!(has_data(&mut s), vec![true, false], "a new connection has none of the old one's blobs");
}
