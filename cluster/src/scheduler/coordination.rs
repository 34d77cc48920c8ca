//! Glue between the scheduler and [`Coordination`](super::coord::Coordination):
//! operations in, replies out, and the keys held by stored values.

use super::coord::CoordOutput;
use super::holders::Holder;
use super::state::{PeerId, SchedulerState};
use crate::protocol::CoordOp;
use bytes::Bytes;

impl SchedulerState {
    /// An operation on a variable, queue, semaphore or event.
    pub fn coordinate(&mut self, peer: PeerId, id: u64, op: CoordOp, value: Option<Bytes>, now: f64) {
        self.coord.handle(peer, id, op, value, now);
        self.apply_coordination();
    }

    /// Answer coordination waits whose timeout passed.
    pub fn coordination_tick(&mut self, now: f64) {
        if self.coord.has_waiters() {
            self.coord.tick(now);
            self.apply_coordination();
        }
    }

    pub(super) fn apply_coordination(&mut self) {
        for o in self.coord.take_output() {
            match o {
                CoordOutput::Reply(peer, env) => self.send_client(peer, env),
                CoordOutput::Hold(keys) => self.hold_keys(&keys, Holder::Coordination),
                CoordOutput::Unhold(keys) => self.unhold_keys(&keys, Holder::Coordination),
                CoordOutput::Transfer(client, keys) => {
                    self.want_keys(client, keys.clone());
                    self.unhold_keys(&keys, Holder::Coordination);
                }
            }
        }
    }
}
