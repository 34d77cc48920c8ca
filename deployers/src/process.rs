//! Local process helpers: liveness that survives pid reuse, and stopping a
//! process gracefully (SIGTERM, then SIGKILL after a grace period).

use std::time::{Duration, Instant};

/// The process's start time in clock ticks since boot (field 22 of
/// `/proc/PID/stat`), or `None` if it does not exist.
pub fn start_time(pid: u32) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name may contain spaces and parentheses: fields resume after the last ')'.
    let rest = &stat[stat.rfind(')')? + 1..];
    rest.split_whitespace().nth(19)?.parse().ok()
}

/// Whether `pid` runs (and is not a zombie), and is the same process as when
/// `started` was read.
pub fn is_alive(pid: u32, started: Option<u64>) -> bool {
    let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
        return false;
    };
    let Some(close) = stat.rfind(')') else { return false };
    let mut fields = stat[close + 1..].split_whitespace();
    if fields.next() == Some("Z") {
        return false;
    }
    match started {
        Some(s) => start_time(pid) == Some(s),
        None => true,
    }
}

/// Send `signal` to `pid`.
pub fn signal(pid: u32, signal: i32) -> std::io::Result<()> {
    // SAFETY: kill(2) has no memory-safety preconditions.
    let r = unsafe { libc::kill(pid as libc::pid_t, signal) };
    if r == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

/// SIGTERM, wait up to `grace`, then SIGKILL. Succeeds if the process is gone
/// (or was never there).
pub fn terminate(pid: u32, started: Option<u64>, grace: Duration) -> std::io::Result<()> {
    if !is_alive(pid, started) {
        return Ok(());
    }
    signal(pid, libc::SIGTERM)?;
    let deadline = Instant::now() + grace;
    while Instant::now() < deadline {
        if !is_alive(pid, started) {
            return Ok(());
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let _ = signal(pid, libc::SIGKILL);
    let deadline = Instant::now() + Duration::from_secs(5);
    while Instant::now() < deadline {
        if !is_alive(pid, started) {
            return Ok(());
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    Err(std::io::Error::other("still alive after SIGKILL"))
}
