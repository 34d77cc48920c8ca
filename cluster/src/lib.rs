//! dask-rs runtime: the wire protocol, framed transport, the scheduler and
//! worker state machines with their IO shells, the client core and the
//! simulator.
//!
//! This crate knows nothing of Python, deployers or the console; they build
//! on it. See ARCHITECTURE.md at the repository root for the map.

pub mod client;
pub mod comm;
pub mod human;
pub mod monitor;
pub mod order;
pub mod protocol;
pub mod scheduler;
pub mod security;
pub mod sim;
#[cfg(test)]
mod testing;
pub mod tls;
pub mod worker;

/// Seconds since the Unix epoch, as the protocol carries times.
pub fn now() -> f64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs_f64()).unwrap_or(0.0)
}
