//! Shared blobs: bytes that many tasks refer to (a `client.map`'s
//! function), received once per graph and sent to each worker once.
//!
//! A blob lives while some task refers to it: the count goes up as a task
//! takes it, down as the task is forgotten; at zero the blob goes, and the
//! workers that received it are told to drop it. Blob ids are chosen by
//! clients (a hash of the bytes), so two clients mapping the same function
//! share one blob.

use super::state::PeerId;
use crate::protocol::{Blob, SharedRef};
use bytes::Bytes;
use rustc_hash::{FxHashMap, FxHashSet};

/// A task's handle on a blob: an index into [`SharedBlobs`]' slots.
pub(super) type SharedIdx = u32;

#[derive(Debug)]
struct SharedBlob {
    id: u64,
    data: Bytes,
    /// Tasks referring to it.
    refs: u64,
    /// Workers it was sent to (they keep it until told otherwise).
    sent_to: FxHashSet<PeerId>,
}

/// Every shared blob some task refers to.
#[derive(Debug, Default)]
pub(super) struct SharedBlobs {
    slots: Vec<Option<SharedBlob>>,
    free: Vec<SharedIdx>,
    by_id: FxHashMap<u64, SharedIdx>,
}

impl SharedBlobs {
    /// Make `id` known with its bytes (kept as they are if known already).
    /// It stays only if a task takes it before the next [`sweep`](Self::sweep).
    pub(super) fn register(&mut self, id: u64, data: Bytes) {
        if self.by_id.contains_key(&id) {
            return;
        }
        let blob = Some(SharedBlob { id, data, refs: 0, sent_to: FxHashSet::default() });
        let idx = match self.free.pop() {
            Some(i) => {
                self.slots[i as usize] = blob;
                i
            }
            None => {
                self.slots.push(blob);
                (self.slots.len() - 1) as SharedIdx
            }
        };
        self.by_id.insert(id, idx);
    }

    /// A task refers to `id`; `None` if no such blob is known.
    pub(super) fn take(&mut self, id: u64) -> Option<SharedIdx> {
        let idx = *self.by_id.get(&id)?;
        self.blob_mut(idx).refs += 1;
        Some(idx)
    }

    /// A task referring to `idx` was forgotten. At the last reference the
    /// blob goes: returns its id and the workers that hold it.
    pub(super) fn drop_ref(&mut self, idx: SharedIdx) -> Option<(u64, Vec<PeerId>)> {
        let b = self.blob_mut(idx);
        b.refs = b.refs.saturating_sub(1);
        if b.refs > 0 {
            return None;
        }
        Some(self.remove(idx))
    }

    /// Drop the blobs of `ids` that no task took (registered with a graph
    /// whose tasks were all known already). Nobody was sent them.
    pub(super) fn sweep(&mut self, ids: impl IntoIterator<Item = u64>) {
        for id in ids {
            if let Some(&idx) = self.by_id.get(&id) {
                if self.blob_mut(idx).refs == 0 {
                    self.remove(idx);
                }
            }
        }
    }

    /// How a task sent to `worker` refers to blob `idx`: with its bytes the
    /// first time that worker needs it.
    pub(super) fn for_worker(&mut self, idx: SharedIdx, worker: PeerId, frames: &mut Vec<Bytes>) -> SharedRef {
        let b = self.blob_mut(idx);
        let data = b.sent_to.insert(worker).then(|| Blob::new(b.data.clone(), frames));
        SharedRef { id: b.id, data }
    }

    /// `worker` left: a worker that joins under a new connection gets the bytes again.
    pub(super) fn worker_gone(&mut self, worker: PeerId) {
        for b in self.slots.iter_mut().flatten() {
            b.sent_to.remove(&worker);
        }
    }

    /// Number of blobs held.
    #[cfg(test)]
    pub(super) fn len(&self) -> usize {
        self.by_id.len()
    }

    /// References held on each blob, by id (for the invariant checks).
    pub(super) fn refs(&self) -> impl Iterator<Item = (SharedIdx, u64)> + '_ {
        self.slots.iter().enumerate().filter_map(|(i, b)| b.as_ref().map(|b| (i as SharedIdx, b.refs)))
    }

    pub(super) fn clear(&mut self) {
        *self = SharedBlobs::default();
    }

    fn remove(&mut self, idx: SharedIdx) -> (u64, Vec<PeerId>) {
        let b = self.slots[idx as usize].take().expect("live blob");
        self.by_id.remove(&b.id);
        self.free.push(idx);
        (b.id, b.sent_to.into_iter().collect())
    }

    fn blob_mut(&mut self, idx: SharedIdx) -> &mut SharedBlob {
        self.slots[idx as usize].as_mut().expect("live blob")
    }
}
