//! The scheduler: a pure state machine, [`SchedulerState`], and its network
//! shell ([`server`]).
//!
//! The state machine is one struct ([`state`]) whose methods live in one
//! file per concern: tasks and groups (`task`), who holds a key (`holders`),
//! workers (`workers`), graph intake (`graph`), placement (`placement`),
//! worker reports (`reports`), releasing and forgetting (`release`),
//! datasets (`datasets`), worker plugins (`plugins`), coordination primitives (`coordination`, with the
//! pure machine in [`coord`]), replicas and rebalancing (`replicas`, with the
//! pure plan in `rebalance`), retirement (`retire`), shared blobs (`shared`), work stealing
//! (`stealing`), what observers read (`events`) and invariants (`validate`).

pub mod coord;
mod coordination;
mod datasets;
mod events;
mod graph;
mod holders;
mod inbox;
mod placement;
mod plugins;
mod rebalance;
mod release;
mod replicas;
mod reports;
mod retire;
pub mod server;
mod shared;
mod state;
mod stealing;
mod task;
mod validate;
mod workers;

#[cfg(test)]
mod random_test;
#[cfg(test)]
mod tests;

pub use events::EventCursor;
pub use server::{start, SchedulerHandle};
pub use state::{describe_security, Outgoing, PeerId, SchedulerConfig, SchedulerState, TaskState};
