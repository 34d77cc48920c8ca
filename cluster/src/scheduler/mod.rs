//! The scheduler: a pure state machine ([`state`], with the coordination
//! primitives in [`coord`]) and its network shell ([`server`]).

pub mod coord;
pub mod server;
pub mod state;

pub use server::{start, SchedulerHandle};
pub use state::{PeerId, SchedulerConfig, SchedulerState, TaskState};
