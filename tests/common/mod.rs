//! Processes the integration tests start: `dask-ctl scheduler` and
//! `dask-ctl sim-worker`, each killed by PID when its handle drops.

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};

pub const BIN: &str = env!("CARGO_BIN_EXE_dask-ctl");

/// A child process killed (by PID) when dropped.
pub struct Proc(pub Child);

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// A scheduler on a free port, with `env` added to its environment; its
/// address once it listens.
pub fn start_scheduler_with(env: &[(&str, &str)]) -> (Proc, String) {
    let mut child = Command::new(BIN)
        .args(["scheduler", "--port", "0", "--no-dashboard"])
        .envs(env.iter().copied())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn dask-ctl scheduler");
    let mut line = String::new();
    BufReader::new(child.stdout.take().unwrap()).read_line(&mut line).unwrap();
    let addr = line.trim().strip_prefix("Scheduler at ").expect("address line").to_string();
    (Proc(child), addr)
}

/// A simulated two-thread worker named `name`, with `env` added.
pub fn start_sim_worker_with(addr: &str, name: &str, env: &[(&str, &str)]) -> Proc {
    Proc(
        Command::new(BIN)
            .args(["sim-worker", addr, "--name", name, "--nthreads", "2"])
            .envs(env.iter().copied())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("spawn sim worker"),
    )
}

/// `HOST:PORT` of `tcp://HOST:PORT`.
pub fn hostport(addr: &str) -> &str {
    addr.strip_prefix("tcp://").unwrap_or(addr)
}
