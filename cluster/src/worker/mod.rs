//! The worker core: its task state machine ([`state`]) and the runtime
//! ([`runtime`]) that talks to the scheduler and peers and drives a
//! [`Runner`](runner::Runner), which owns the data and runs tasks.
//!
//! - `state`: the pure state machine (what to fetch, run, spill, report);
//! - `memory`: the memory policy it consults (spill, pause, terminate);
//! - `runtime`: the scheduler connection and the event loop;
//! - `executors`: the threads that run tasks, `secede` and `rejoin`;
//! - `data_server`: the data port peers and clients fetch from;
//! - `runner`: the [`Runner`] trait and its store helper thread;
//! - `store`: results in memory or spilled to disk, for every runner.

mod data_server;
mod executors;
pub mod memory;
mod runner;
pub mod runtime;
pub mod state;
pub mod store;
#[cfg(test)]
mod tests;

pub use executors::{rejoin, secede};
pub use memory::MemoryConfig;
pub use runner::Runner;
pub use runtime::{process_rss, run_worker, WorkerConfig, WorkerError};
pub use state::{ExecOutcome, Instruction, Recipe, WorkerState};
