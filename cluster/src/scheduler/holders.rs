//! Who holds a key: clients, and the pseudo-clients that keep keys alive
//! on the scheduler's own behalf (fire-and-forget, datasets, coordination).

use rustc_hash::FxHashSet;
use crate::protocol::Key;
use super::state::{PeerId, SchedulerState};
use super::task::TaskId;

/// Pseudo-client that holds fire-and-forget keys until they finish.
pub(super) const FIRE_AND_FORGET: PeerId = u64::MAX;

/// Pseudo-client that holds the keys of published datasets.
pub(super) const DATASETS: PeerId = u64::MAX - 1;

/// Pseudo-client that holds the keys of values in variables and queues.
pub(super) const COORDINATION: PeerId = u64::MAX - 2;

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
            let ids: Vec<TaskId> = c.wants.into_iter().collect();
            for id in ids {
                self.tm(id).who_wants.retain(|&p| p != peer);
                self.check_release(id);
            }
        }
        self.coord.peer_gone(peer);
        self.apply_coordination();
    }

    /// Keep `keys` alive on behalf of a pseudo-client (`DATASETS`,
    /// `COORDINATION`); each call holds once more.
    pub(super) fn hold_keys(&mut self, keys: &[Key], holder: PeerId) {
        for k in keys {
            if let Some(&tid) = self.keys.get(k.as_str()) {
                self.tm(tid).who_wants.push(holder);
            }
        }
    }

    /// Undo one [`hold_keys`](Self::hold_keys) of `keys` by `holder`.
    pub(super) fn unhold_keys(&mut self, keys: &[Key], holder: PeerId) {
        for k in keys {
            let Some(&tid) = self.keys.get(k.as_str()) else { continue };
            if let Some(pos) = self.t(tid).who_wants.iter().position(|&c| c == holder) {
                self.tm(tid).who_wants.swap_remove(pos);
                self.check_release(tid);
            }
        }
    }
}
