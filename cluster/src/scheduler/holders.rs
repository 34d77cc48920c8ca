//! Who holds a key: clients, and the pseudo-clients that keep keys alive
//! on the scheduler's own behalf (fire-and-forget, datasets, coordination).
//!
//! One rule for all of them: a task's `who_wants` is a multiset of
//! [`Holder`]s, and every hold is matched by exactly one unhold. A client
//! holds a key at most once (its `wants` set decides whether a hold is new);
//! a pseudo-client holds it once per reason (each dataset, each stored value,
//! each `fire_and_forget` call). Only [`Holder::Client`]s hear about keys.

use rustc_hash::FxHashSet;

use super::state::{PeerId, SchedulerState};
use super::task::TaskId;
use crate::protocol::Key;

/// Something that keeps a key (and what it needs) from being released.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub(super) enum Holder {
    /// A connected client holding futures.
    Client(PeerId),
    /// Keys passed to `fire_and_forget`: held until the task finishes or errs.
    FireAndForget,
    /// Keys of published datasets.
    Datasets,
    /// Keys of futures inside values stored in variables and queues.
    Coordination,
}

impl Holder {
    /// The client to tell about the key, if this holder is one.
    pub(super) fn client(self) -> Option<PeerId> {
        match self {
            Holder::Client(c) => Some(c),
            _ => None,
        }
    }
}

/// A connected client: the tasks it holds.
#[derive(Debug, Default)]
pub(super) struct Client {
    pub(super) wants: FxHashSet<TaskId>,
}

impl SchedulerState {
    /// A client connected.
    pub fn add_client(&mut self, peer: PeerId) {
        self.clients.entry(peer).or_default();
    }

    /// A client disconnected: everything it wanted is released.
    pub fn remove_client(&mut self, peer: PeerId) {
        if let Some(c) = self.clients.remove(&peer) {
            for id in c.wants {
                self.unhold(id, Holder::Client(peer));
            }
        }
        self.coord.peer_gone(peer);
        self.apply_coordination();
    }

    /// `client` holds `id` (once, however often it asks).
    pub(super) fn client_wants(&mut self, client: PeerId, id: TaskId) {
        if self.clients.entry(client).or_default().wants.insert(id) {
            self.tm(id).who_wants.push(Holder::Client(client));
        }
    }

    /// `client` lets go of `id`; released if nothing else needs it.
    pub(super) fn client_releases(&mut self, client: PeerId, id: TaskId) {
        if self.clients.get_mut(&client).is_some_and(|c| c.wants.remove(&id)) {
            self.unhold(id, Holder::Client(client));
        }
    }

    /// One more hold of `id` by a pseudo-client.
    pub(super) fn hold(&mut self, id: TaskId, holder: Holder) {
        self.tm(id).who_wants.push(holder);
    }

    /// Undo one hold of `id` by `holder`; released if nothing else needs it.
    pub(super) fn unhold(&mut self, id: TaskId, holder: Holder) {
        if let Some(pos) = self.t(id).who_wants.iter().position(|&h| h == holder) {
            self.tm(id).who_wants.swap_remove(pos);
            self.check_release(id);
        }
    }

    /// Drop every hold of `id` by `holder`, without releasing (the caller does).
    pub(super) fn unhold_all(&mut self, id: TaskId, holder: Holder) {
        self.tm(id).who_wants.retain(|&h| h != holder);
    }

    /// [`hold`](Self::hold) each known key of `keys`.
    pub(super) fn hold_keys(&mut self, keys: &[Key], holder: Holder) {
        for k in keys {
            if let Some(&id) = self.keys.get(k.as_str()) {
                self.hold(id, holder);
            }
        }
    }

    /// [`unhold`](Self::unhold) each known key of `keys`.
    pub(super) fn unhold_keys(&mut self, keys: &[Key], holder: Holder) {
        for k in keys {
            if let Some(&id) = self.keys.get(k.as_str()) {
                self.unhold(id, holder);
            }
        }
    }

    /// The clients holding `id`, to tell about it.
    pub(super) fn clients_of(&self, id: TaskId) -> Vec<PeerId> {
        self.t(id).who_wants.iter().filter_map(|h| h.client()).collect()
    }
}
