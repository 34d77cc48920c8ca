//! The worker core: its task state machine ([`state`]) and the runtime
//! ([`runtime`]) that talks to the scheduler and peers and drives a
//! [`Runner`](runtime::Runner), which owns the data and runs tasks.

pub mod memory;
pub mod runtime;
pub mod state;

pub use memory::MemoryConfig;
pub use runtime::{rejoin, run_worker, secede, Runner, WorkerConfig, WorkerError};
pub use state::{ExecOutcome, Instruction, WorkerState};
