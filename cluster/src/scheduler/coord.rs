//! Coordination primitives kept on the scheduler: named `Variable`s,
//! `Queue`s, `Semaphore`s (a `Lock` is a semaphore of one lease under its own
//! name space) and `Event`s, as distributed offers them to clients and tasks.
//!
//! Pure: requests and the clock come in; replies and the keys to hold or
//! let go come out as [`CoordOutput`]. Values are opaque pickled bytes plus
//! the keys of the futures inside them; while a variable or queue holds a
//! value its keys are held too (like a client's futures), so a future put in
//! a queue survives until someone takes it.

use std::collections::VecDeque;

use bytes::Bytes;
use rustc_hash::FxHashMap;

use super::state::PeerId;
use crate::protocol::{Blob, CoordError, CoordOp, CoordValue, Envelope, Key, ToClient};

/// What the scheduler must do after a coordination call.
#[derive(Debug)]
pub enum CoordOutput {
    /// Send this reply to the peer.
    Reply(PeerId, Envelope<ToClient>),
    /// Keep these keys alive on behalf of a stored value.
    Hold(Vec<Key>),
    /// A stored value is gone: its keys may be released.
    Unhold(Vec<Key>),
    /// Hand these keys to `peer` (a client that took a value containing
    /// futures), then let go of the stored value's hold on them.
    Transfer(PeerId, Vec<Key>),
}

#[derive(Debug, Clone)]
struct Stored {
    data: Bytes,
    keys: Vec<Key>,
}

#[derive(Debug, Clone, Copy)]
struct Waiter {
    peer: PeerId,
    id: u64,
    deadline: Option<f64>,
}

impl Waiter {
    fn expired(&self, now: f64) -> bool {
        self.deadline.is_some_and(|d| now >= d)
    }
}

#[derive(Debug, Default)]
struct Queue {
    items: VecDeque<Stored>,
    maxsize: u64,
    /// Waiting for `n` items (1 for a plain `get`).
    getters: VecDeque<(Waiter, u64)>,
    /// Waiting for room.
    putters: VecDeque<(Waiter, Stored)>,
}

#[derive(Debug)]
struct Semaphore {
    max_leases: u32,
    leases: Vec<(PeerId, String)>,
    waiters: VecDeque<(Waiter, String)>,
}

#[derive(Debug, Default)]
struct Event {
    set: bool,
    waiters: Vec<Waiter>,
}

/// Every coordination primitive, by name.
#[derive(Debug, Default)]
pub struct Coordination {
    variables: FxHashMap<String, Stored>,
    variable_waiters: FxHashMap<String, Vec<Waiter>>,
    queues: FxHashMap<String, Queue>,
    semaphores: FxHashMap<String, Semaphore>,
    events: FxHashMap<String, Event>,
    out: Vec<CoordOutput>,
}

fn deadline(now: f64, timeout: Option<f64>) -> Option<f64> {
    timeout.map(|t| now + t.max(0.0))
}

impl Coordination {
    /// Outputs produced since the last call.
    pub fn take_output(&mut self) -> Vec<CoordOutput> {
        std::mem::take(&mut self.out)
    }

    fn reply(&mut self, w: Waiter, result: Result<CoordValue, CoordError>) {
        self.out.push(CoordOutput::Reply(w.peer, Envelope::new(ToClient::CoordReply { id: w.id, result })));
    }

    fn reply_values(&mut self, w: Waiter, items: Vec<Stored>, transfer: bool) {
        let mut frames = Vec::new();
        let mut values = Vec::with_capacity(items.len());
        for it in items {
            if transfer && !it.keys.is_empty() {
                self.out.push(CoordOutput::Transfer(w.peer, it.keys.clone()));
            }
            values.push((Blob::new(it.data, &mut frames), it.keys));
        }
        let msg = ToClient::CoordReply { id: w.id, result: Ok(CoordValue::Values(values)) };
        self.out.push(CoordOutput::Reply(w.peer, Envelope { msg, frames }));
    }

    /// Handle one request from `peer`; `value` is the resolved payload of a
    /// set or put.
    pub fn handle(&mut self, peer: PeerId, id: u64, op: CoordOp, value: Option<Bytes>, now: f64) {
        let mut w = Waiter { peer, id, deadline: None };
        match op {
            CoordOp::VariableSet { name, keys, .. } => {
                let new = Stored { data: value.unwrap_or_default(), keys };
                self.out.push(CoordOutput::Hold(new.keys.clone()));
                if let Some(old) = self.variables.insert(name.clone(), new.clone()) {
                    self.out.push(CoordOutput::Unhold(old.keys));
                }
                for waiter in self.variable_waiters.remove(&name).unwrap_or_default() {
                    self.reply_values(waiter, vec![new.clone()], false);
                }
                self.reply(w, Ok(CoordValue::Unit));
            }
            CoordOp::VariableGet { name, timeout } => match self.variables.get(&name) {
                Some(v) => {
                    let v = v.clone();
                    self.reply_values(w, vec![v], false);
                }
                None => {
                    w.deadline = deadline(now, timeout);
                    if w.expired(now) {
                        self.reply(
                            w,
                            Err(CoordError::TimedOut(format!("timed out waiting for Variable {name:?} to be set"))),
                        );
                    } else {
                        self.variable_waiters.entry(name).or_default().push(w);
                    }
                }
            },
            CoordOp::VariableDelete { name } => {
                if let Some(old) = self.variables.remove(&name) {
                    self.out.push(CoordOutput::Unhold(old.keys));
                }
                self.reply(w, Ok(CoordValue::Unit));
            }
            CoordOp::QueuePut { name, keys, maxsize, timeout, .. } => {
                let item = Stored { data: value.unwrap_or_default(), keys };
                self.out.push(CoordOutput::Hold(item.keys.clone()));
                let q = self.queues.entry(name.clone()).or_default();
                if q.maxsize == 0 {
                    q.maxsize = maxsize;
                }
                if q.maxsize > 0 && q.items.len() as u64 >= q.maxsize {
                    w.deadline = deadline(now, timeout);
                    if w.expired(now) {
                        self.out.push(CoordOutput::Unhold(item.keys));
                        self.reply(
                            w,
                            Err(CoordError::TimedOut(format!("timed out waiting for room in Queue {name:?}"))),
                        );
                    } else {
                        q.putters.push_back((w, item));
                    }
                    return;
                }
                q.items.push_back(item);
                self.reply(w, Ok(CoordValue::Unit));
                self.serve_queue(&name);
            }
            CoordOp::QueueGet { name, batch, timeout } => {
                let q = self.queues.entry(name.clone()).or_default();
                if batch == Some(0) {
                    let items: Vec<Stored> = q.items.drain(..).collect();
                    self.reply_values(w, items, true);
                    self.serve_queue(&name);
                    return;
                }
                w.deadline = deadline(now, timeout);
                q.getters.push_back((w, batch.unwrap_or(1)));
                self.serve_queue(&name);
                self.expire_queue(&name, now);
            }
            CoordOp::QueueSize { name } => {
                let n = self.queues.get(&name).map_or(0, |q| q.items.len() as u64);
                self.reply(w, Ok(CoordValue::Int(n)));
            }
            CoordOp::SemAcquire { name, max_leases, lease, timeout } => {
                let sem = self.semaphores.entry(name.clone()).or_insert_with(|| Semaphore {
                    max_leases: max_leases.max(1),
                    leases: Vec::new(),
                    waiters: VecDeque::new(),
                });
                if sem.max_leases != max_leases.max(1) {
                    let have = sem.max_leases;
                    return self.reply(
                        w,
                        Err(CoordError::Refused(format!(
                            "Semaphore {name:?} exists with max_leases={have}, not {max_leases}"
                        ))),
                    );
                }
                if sem.waiters.is_empty() && (sem.leases.len() as u32) < sem.max_leases {
                    sem.leases.push((peer, lease));
                    return self.reply(w, Ok(CoordValue::Bool(true)));
                }
                w.deadline = deadline(now, timeout);
                if w.expired(now) {
                    return self.reply(w, Ok(CoordValue::Bool(false)));
                }
                sem.waiters.push_back((w, lease));
            }
            CoordOp::SemRelease { name, lease } => {
                let held = self.semaphores.get_mut(&name).and_then(|s| {
                    let pos = s.leases.iter().position(|(p, l)| *p == peer && *l == lease)?;
                    s.leases.swap_remove(pos);
                    Some(())
                });
                match held {
                    Some(()) => {
                        self.reply(w, Ok(CoordValue::Unit));
                        self.serve_semaphore(&name);
                    }
                    None => self.reply(
                        w,
                        Err(CoordError::Refused(format!("{name:?} released too often: this lease is not held"))),
                    ),
                }
            }
            CoordOp::SemValue { name } => {
                let n = self.semaphores.get(&name).map_or(0, |s| s.leases.len() as u64);
                self.reply(w, Ok(CoordValue::Int(n)));
            }
            CoordOp::EventSet { name } => {
                let ev = self.events.entry(name).or_default();
                ev.set = true;
                let waiters = std::mem::take(&mut ev.waiters);
                for waiter in waiters {
                    self.reply(waiter, Ok(CoordValue::Bool(true)));
                }
                self.reply(w, Ok(CoordValue::Unit));
            }
            CoordOp::EventClear { name } => {
                self.events.entry(name).or_default().set = false;
                self.reply(w, Ok(CoordValue::Unit));
            }
            CoordOp::EventWait { name, timeout } => {
                let ev = self.events.entry(name).or_default();
                w.deadline = deadline(now, timeout);
                if ev.set {
                    self.reply(w, Ok(CoordValue::Bool(true)));
                } else if w.expired(now) {
                    self.reply(w, Ok(CoordValue::Bool(false)));
                } else {
                    ev.waiters.push(w);
                }
            }
            CoordOp::EventIsSet { name } => {
                let set = self.events.get(&name).is_some_and(|e| e.set);
                self.reply(w, Ok(CoordValue::Bool(set)));
            }
        }
    }

    /// Hand queued items to waiting getters in order, then admit waiting putters.
    fn serve_queue(&mut self, name: &str) {
        loop {
            let Some(q) = self.queues.get_mut(name) else { return };
            let mut progressed = false;
            if let Some(&(w, n)) = q.getters.front() {
                if q.items.len() as u64 >= n {
                    q.getters.pop_front();
                    let items: Vec<Stored> = q.items.drain(..n as usize).collect();
                    self.reply_values(w, items, true);
                    progressed = true;
                }
            }
            let Some(q) = self.queues.get_mut(name) else { return };
            if q.maxsize == 0 || (q.items.len() as u64) < q.maxsize {
                if let Some((w, item)) = q.putters.pop_front() {
                    q.items.push_back(item);
                    self.reply(w, Ok(CoordValue::Unit));
                    progressed = true;
                }
            }
            if !progressed {
                return;
            }
        }
    }

    fn expire_queue(&mut self, name: &str, now: f64) {
        let Some(q) = self.queues.get_mut(name) else { return };
        let (gone, kept): (Vec<_>, Vec<_>) = q.getters.drain(..).partition(|(w, _)| w.expired(now));
        q.getters = kept.into();
        let (gone_put, kept_put): (Vec<_>, Vec<_>) = q.putters.drain(..).partition(|(w, _)| w.expired(now));
        q.putters = kept_put.into();
        for (w, _) in gone {
            self.reply(w, Err(CoordError::TimedOut(format!("timed out waiting for an item of Queue {name:?}"))));
        }
        for (w, item) in gone_put {
            self.out.push(CoordOutput::Unhold(item.keys));
            self.reply(w, Err(CoordError::TimedOut(format!("timed out waiting for room in Queue {name:?}"))));
        }
    }

    /// Grant free leases to waiters in arrival order.
    fn serve_semaphore(&mut self, name: &str) {
        let Some(sem) = self.semaphores.get_mut(name) else { return };
        let mut granted = Vec::new();
        while (sem.leases.len() as u32) < sem.max_leases {
            let Some((w, lease)) = sem.waiters.pop_front() else { break };
            sem.leases.push((w.peer, lease));
            granted.push(w);
        }
        for w in granted {
            self.reply(w, Ok(CoordValue::Bool(true)));
        }
    }

    /// Answer every wait whose timeout has passed.
    pub fn tick(&mut self, now: f64) {
        let names: Vec<String> = self.variable_waiters.keys().cloned().collect();
        for name in names {
            let ws = self.variable_waiters.get_mut(&name).expect("present");
            let (gone, kept): (Vec<_>, Vec<_>) = ws.drain(..).partition(|w| w.expired(now));
            *ws = kept;
            if ws.is_empty() {
                self.variable_waiters.remove(&name);
            }
            for w in gone {
                self.reply(w, Err(CoordError::TimedOut(format!("timed out waiting for Variable {name:?} to be set"))));
            }
        }
        let names: Vec<String> = self.queues.keys().cloned().collect();
        for name in names {
            self.expire_queue(&name, now);
        }
        let mut expired = Vec::new();
        for sem in self.semaphores.values_mut() {
            let (gone, kept): (Vec<_>, Vec<_>) = sem.waiters.drain(..).partition(|(w, _)| w.expired(now));
            sem.waiters = kept.into();
            expired.extend(gone.into_iter().map(|(w, _)| w));
        }
        for ev in self.events.values_mut() {
            let (gone, kept): (Vec<_>, Vec<_>) = ev.waiters.drain(..).partition(|w| w.expired(now));
            ev.waiters = kept;
            expired.extend(gone);
        }
        for w in expired {
            self.reply(w, Ok(CoordValue::Bool(false)));
        }
    }

    /// Whether any wait has a deadline (so the scheduler must call [`tick`](Self::tick)).
    pub fn has_waiters(&self) -> bool {
        !self.variable_waiters.is_empty()
            || self.queues.values().any(|q| !q.getters.is_empty() || !q.putters.is_empty())
            || self.semaphores.values().any(|s| !s.waiters.is_empty())
            || self.events.values().any(|e| !e.waiters.is_empty())
    }

    /// A client left: its waits are dropped and its leases returned.
    pub fn peer_gone(&mut self, peer: PeerId) {
        for ws in self.variable_waiters.values_mut() {
            ws.retain(|w| w.peer != peer);
        }
        self.variable_waiters.retain(|_, ws| !ws.is_empty());
        let mut unhold = Vec::new();
        for q in self.queues.values_mut() {
            q.getters.retain(|(w, _)| w.peer != peer);
            q.putters.retain(|(w, item)| {
                if w.peer == peer {
                    unhold.extend(item.keys.iter().cloned());
                }
                w.peer != peer
            });
        }
        if !unhold.is_empty() {
            self.out.push(CoordOutput::Unhold(unhold));
        }
        let names: Vec<String> = self.queues.keys().cloned().collect();
        for name in names {
            self.serve_queue(&name);
        }
        let mut freed = Vec::new();
        for (name, sem) in self.semaphores.iter_mut() {
            sem.waiters.retain(|(w, _)| w.peer != peer);
            let before = sem.leases.len();
            sem.leases.retain(|(p, _)| *p != peer);
            if sem.leases.len() != before {
                freed.push(name.clone());
            }
        }
        for name in freed {
            self.serve_semaphore(&name);
        }
        for ev in self.events.values_mut() {
            ev.waiters.retain(|w| w.peer != peer);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn replies(c: &mut Coordination) -> Vec<(PeerId, u64, String, CoordValue)> {
        c.take_output()
            .into_iter()
            .filter_map(|o| match o {
                CoordOutput::Reply(p, Envelope { msg: ToClient::CoordReply { id, result }, .. }) => match result {
                    Ok(value) => Some((p, id, String::new(), value)),
                    Err(error) => Some((p, id, error.to_string(), CoordValue::Unit)),
                },
                _ => None,
            })
            .collect()
    }

    fn acquire(name: &str, lease: &str, timeout: Option<f64>) -> CoordOp {
        CoordOp::SemAcquire { name: name.into(), max_leases: 1, lease: lease.into(), timeout }
    }

    #[test]
    fn lock_waiters_are_granted_in_order_and_time_out() {
        let mut c = Coordination::default();
        c.handle(1, 1, acquire("l", "a", None), None, 0.0);
        c.handle(2, 2, acquire("l", "b", None), None, 0.0);
        c.handle(3, 3, acquire("l", "c", Some(1.0)), None, 0.0);
        assert_eq!(replies(&mut c), vec![(1, 1, String::new(), CoordValue::Bool(true))]);
        c.tick(1.5);
        assert_eq!(replies(&mut c), vec![(3, 3, String::new(), CoordValue::Bool(false))]);
        c.handle(1, 4, CoordOp::SemRelease { name: "l".into(), lease: "a".into() }, None, 2.0);
        let r = replies(&mut c);
        assert_eq!(r[1], (2, 2, String::new(), CoordValue::Bool(true)), "{r:?}");
        // Releasing a lease you do not hold is an error, and changes nothing.
        c.handle(1, 5, CoordOp::SemRelease { name: "l".into(), lease: "a".into() }, None, 2.0);
        assert!(replies(&mut c)[0].2.contains("released too often"));
        c.handle(1, 6, CoordOp::SemValue { name: "l".into() }, None, 2.0);
        assert_eq!(replies(&mut c)[0].3, CoordValue::Int(1));
        // A client that leaves returns its leases.
        c.handle(1, 7, acquire("l", "d", None), None, 2.0);
        c.peer_gone(2);
        assert_eq!(replies(&mut c), vec![(1, 7, String::new(), CoordValue::Bool(true))]);
    }

    #[test]
    fn queue_get_waits_for_a_put_and_holds_keys_meanwhile() {
        let mut c = Coordination::default();
        c.handle(1, 1, CoordOp::QueueGet { name: "q".into(), batch: None, timeout: None }, None, 0.0);
        assert!(replies(&mut c).is_empty());
        let put = CoordOp::QueuePut {
            name: "q".into(),
            value: Blob::Inline(Bytes::new()),
            keys: vec!["k".into()],
            maxsize: 0,
            timeout: None,
        };
        c.handle(2, 2, put, Some(Bytes::from_static(b"v")), 0.0);
        let out = c.take_output();
        assert!(matches!(&out[0], CoordOutput::Hold(k) if k == &["k".to_string()]));
        assert!(out.iter().any(|o| matches!(o, CoordOutput::Transfer(1, k) if k == &["k".to_string()])));
        let got = out.iter().find_map(|o| match o {
            CoordOutput::Reply(
                1,
                Envelope { msg: ToClient::CoordReply { result: Ok(CoordValue::Values(v)), .. }, .. },
            ) => Some(v.clone()),
            _ => None,
        });
        assert_eq!(got.unwrap()[0].0, Blob::Inline(Bytes::from_static(b"v")));
        c.handle(1, 3, CoordOp::QueueSize { name: "q".into() }, None, 0.0);
        assert_eq!(replies(&mut c)[0].3, CoordValue::Int(0));
    }

    #[test]
    fn variable_get_waits_until_set_or_times_out() {
        let mut c = Coordination::default();
        c.handle(1, 1, CoordOp::VariableGet { name: "v".into(), timeout: Some(0.5) }, None, 0.0);
        c.tick(0.6);
        assert!(replies(&mut c)[0].2.contains("timed out"));
        c.handle(1, 2, CoordOp::VariableGet { name: "v".into(), timeout: None }, None, 1.0);
        let set = CoordOp::VariableSet { name: "v".into(), value: Blob::Inline(Bytes::new()), keys: vec![] };
        c.handle(2, 3, set, Some(Bytes::from_static(b"x")), 1.0);
        let r = replies(&mut c);
        assert!(r
            .iter()
            .any(|(p, id, e, v)| *p == 1 && *id == 2 && e.is_empty() && matches!(v, CoordValue::Values(_))));
        assert!(!c.has_waiters());
    }

    #[test]
    fn event_wakes_every_waiter() {
        let mut c = Coordination::default();
        c.handle(1, 1, CoordOp::EventWait { name: "e".into(), timeout: None }, None, 0.0);
        c.handle(2, 2, CoordOp::EventWait { name: "e".into(), timeout: None }, None, 0.0);
        c.handle(3, 3, CoordOp::EventSet { name: "e".into() }, None, 0.0);
        let r = replies(&mut c);
        assert_eq!(r.iter().filter(|x| x.3 == CoordValue::Bool(true)).count(), 2);
        c.handle(3, 4, CoordOp::EventClear { name: "e".into() }, None, 0.0);
        c.handle(3, 5, CoordOp::EventIsSet { name: "e".into() }, None, 0.0);
        assert_eq!(replies(&mut c)[1].3, CoordValue::Bool(false));
    }
}
