//! The scheduler: a pure state machine ([`state`], with the coordination
//! primitives in [`coord`] and the rebalancing plan in `rebalance`) and its
//! network shell ([`server`]).

pub mod coord;
mod rebalance;
pub mod server;
pub mod state;

pub use server::{start, SchedulerHandle};
pub use state::{PeerId, SchedulerConfig, SchedulerState, TaskState};
