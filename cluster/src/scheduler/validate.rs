//! Internal invariants of [`SchedulerState`], checked by tests.

use super::state::{SchedulerState, TaskState};
use super::task::TaskId;

impl SchedulerState {
    /// Check internal invariants (used by tests): counts, waiters and
    /// worker bookkeeping agree with the tasks.
    pub fn validate(&self) -> Result<(), String> {
        for (i, slot) in self.tasks.iter().enumerate() {
            let Some(t) = slot else { continue };
            let id = i as TaskId;
            if self.keys.get(&t.key) != Some(&id) {
                return Err(format!("{}: key map mismatch", t.key));
            }
            let active = t.dependents.iter().filter(|&d| self.t(d).state.is_active()).count() as u32;
            if active != t.waiters {
                return Err(format!("{}: waiters {} but {} active dependents", t.key, t.waiters, active));
            }
            if t.state == TaskState::Waiting {
                let missing = t.deps.iter().filter(|&&d| self.t(d).state != TaskState::Memory).count() as u32;
                if missing != t.waiting_on {
                    return Err(format!("{}: waiting_on {} but {} deps missing", t.key, t.waiting_on, missing));
                }
            }
            if t.state == TaskState::Memory && t.who_has.is_empty() {
                return Err(format!("{}: in memory nowhere", t.key));
            }
            if t.state == TaskState::Processing {
                let w = t.processing_on.ok_or_else(|| format!("{}: processing nowhere", t.key))?;
                if !self.workers[&w].processing.contains(&id) {
                    return Err(format!("{}: worker does not list it", t.key));
                }
            }
        }
        Ok(())
    }
}
