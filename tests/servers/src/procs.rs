//! Containers as local processes: each runs `sh -c` or an argv in its own
//! process group, with its environment and working directory, writing to
//! `stdout` and `stderr` files in its sandbox directory. Also the small
//! encodings both stand-ins write (RFC 3339 times, base64).

use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::path::Path;
use std::process::{Child, Command, ExitStatus, Stdio};

/// A running container process.
pub struct Proc {
    pub child: Child,
}

impl Proc {
    /// Start `argv` in `cwd` with `env` added to ours; its output goes to
    /// `stdout` and `stderr` in `dir` (created).
    pub fn spawn(argv: &[String], env: &[(String, String)], dir: &Path, cwd: &Path) -> std::io::Result<Proc> {
        std::fs::create_dir_all(dir)?;
        let out = std::fs::File::create(dir.join("stdout"))?;
        let err = std::fs::File::create(dir.join("stderr"))?;
        let Some((prog, args)) = argv.split_first() else {
            return Err(std::io::Error::new(std::io::ErrorKind::InvalidInput, "no command"));
        };
        let child = Command::new(prog)
            .args(args)
            .envs(env.iter().map(|(k, v)| (k, v)))
            .current_dir(cwd)
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err)
            .process_group(0)
            .spawn()?;
        Ok(Proc { child })
    }

    /// Send `sig` to the process group.
    pub fn signal(&self, sig: i32) {
        // SAFETY: kill has no memory effects; the group is the child's own.
        unsafe {
            libc::kill(-(self.child.id() as i32), sig);
        }
    }

    /// The exit status, if it ended.
    pub fn try_wait(&mut self) -> Option<ExitStatus> {
        self.child.try_wait().ok().flatten()
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        if self.try_wait().is_none() {
            self.signal(libc::SIGKILL);
            let _ = self.child.wait();
        }
    }
}

/// "exit status 3" / "signal 9" as Mesos and the kubelet word it.
pub fn describe(status: ExitStatus) -> (i32, String) {
    match (status.code(), status.signal()) {
        (Some(c), _) => (c, format!("Command exited with status {c}")),
        (None, Some(s)) => (128 + s, format!("Command terminated with signal {s}")),
        _ => (-1, "Command ended".into()),
    }
}

/// Standard base64 with padding (Secret data, HTTP basic auth).
pub fn base64(data: &[u8]) -> String {
    const A: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::with_capacity(data.len().div_ceil(3) * 4);
    for chunk in data.chunks(3) {
        let b = [chunk[0], *chunk.get(1).unwrap_or(&0), *chunk.get(2).unwrap_or(&0)];
        let n = (b[0] as u32) << 16 | (b[1] as u32) << 8 | b[2] as u32;
        for i in 0..4 {
            out.push(if i <= chunk.len() { A[(n >> (18 - 6 * i) & 63) as usize] as char } else { '=' });
        }
    }
    out
}

/// Seconds since the epoch as RFC 3339 (UTC), as both APIs write times.
pub fn rfc3339(t: std::time::SystemTime) -> String {
    let secs = t.duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0);
    let days = secs / 86400;
    let rem = secs % 86400;
    // Civil date from days since 1970-01-01 (Howard Hinnant's algorithm).
    let z = days as i64 + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36524 - doe / 146_096) / 365;
    let y = yoe + era * 400;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = if m <= 2 { y + 1 } else { y };
    format!("{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}Z", rem / 3600, rem / 60 % 60, rem % 60)
}

#[cfg(test)]
mod tests {
    #[test]
    fn rfc3339_dates() {
        let t = std::time::UNIX_EPOCH + std::time::Duration::from_secs(1_795_000_000);
        assert_eq!(super::rfc3339(t), "2026-11-18T11:06:40Z");
        assert_eq!(super::rfc3339(std::time::UNIX_EPOCH), "1970-01-01T00:00:00Z");
    }
}
