//! The scheduler: a pure state machine ([`state`]) and its network shell ([`server`]).

pub mod server;
pub mod state;

pub use server::{start, SchedulerHandle};
pub use state::{PeerId, SchedulerConfig, SchedulerState, TaskState};
