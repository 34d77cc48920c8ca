//! Worker plugins: set-up calls the scheduler keeps and hands to every
//! worker that registers, so that workers joining (or restarting) later are
//! prepared as the ones there when the plugin was registered. Registering
//! client runs the set-up on the workers present itself (it wants their
//! answers); the scheduler only remembers.

use super::state::{PeerId, SchedulerState};
use crate::protocol::{Blob, Envelope, ToWorker};
use bytes::Bytes;

impl SchedulerState {
    /// Keep `call` (an opaque set-up call for the workers' runner) under
    /// `name`, replacing a plugin of the same name in its place.
    pub fn register_plugin(&mut self, name: String, call: Bytes) {
        match self.plugins.iter_mut().find(|(n, _)| *n == name) {
            Some(p) => p.1 = call,
            None => self.plugins.push((name, call)),
        }
    }

    /// Forget the plugin `name` (workers joining later do not get it).
    pub fn unregister_plugin(&mut self, name: &str) {
        self.plugins.retain(|(n, _)| n != name);
    }

    /// The registered plugins' set-up calls, in registration order, for a
    /// worker that just registered (before it is given any task).
    pub(super) fn send_plugins(&mut self, worker: PeerId) {
        if self.plugins.is_empty() {
            return;
        }
        let mut frames = Vec::new();
        let calls = self.plugins.iter().map(|(_, c)| Blob::new(c.clone(), &mut frames)).collect();
        self.send_worker(worker, Envelope { msg: ToWorker::SetUp { calls }, frames });
    }
}
