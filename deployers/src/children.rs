//! What the local and ssh backends share: worker processes started as
//! children of the manager, named `PREFIX-N`, each in its own process group
//! with its output in `LOG_DIR/NAME.log`, and watched until they exit.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus};

use crate::{BackendError, WorkerRecord};

/// A worker whose process is a child of this one.
pub(crate) trait ChildWorker {
    fn name(&self) -> &str;
    fn child(&mut self) -> &mut Child;
}

/// A backend's child workers, and those that exited and are not reported yet.
pub(crate) struct Children<W> {
    pub(crate) list: Vec<W>,
    prefix: String,
    next: u64,
    failed: Vec<WorkerRecord>,
}

impl<W: ChildWorker> Children<W> {
    /// No workers yet; they will be named `PREFIX-0`, `PREFIX-1`, ...
    pub(crate) fn new(prefix: &str) -> Self {
        Children { list: Vec::new(), prefix: prefix.to_string(), next: 0, failed: Vec::new() }
    }

    /// The name of the next worker.
    pub(crate) fn next_name(&mut self) -> String {
        self.next += 1;
        format!("{}-{}", self.prefix, self.next - 1)
    }

    /// Remove the workers named in `names` and return them.
    pub(crate) fn take(&mut self, names: &[String]) -> Vec<W> {
        let (gone, keep) =
            std::mem::take(&mut self.list).into_iter().partition(|w| names.iter().any(|n| n == w.name()));
        self.list = keep;
        gone
    }

    /// Every worker, as `running` describes it, and those that exited since
    /// the last call, as `exited` describes them (reported once, then
    /// forgotten).
    pub(crate) fn records(
        &mut self,
        mut exited: impl FnMut(W, ExitStatus) -> WorkerRecord,
        mut running: impl FnMut(&mut W) -> WorkerRecord,
    ) -> Vec<WorkerRecord> {
        let mut out = Vec::new();
        let mut i = 0;
        while i < self.list.len() {
            if let Ok(Some(status)) = self.list[i].child().try_wait() {
                let w = self.list.remove(i);
                self.failed.push(exited(w, status));
            } else {
                out.push(running(&mut self.list[i]));
                i += 1;
            }
        }
        out.append(&mut self.failed);
        out
    }
}

/// Start `cmd` as worker `name`: in its own process group (so stopping it
/// stops what it started), output to its log file. Returns the child and
/// the log's path; `program` names what could not be run in the error.
///
/// With `stdin`, the child reads those bytes and then end of file (how a
/// secret reaches a remote shell without appearing on any command line).
pub(crate) fn spawn_logged(
    cmd: &mut Command,
    log_dir: &Path,
    name: &str,
    program: &str,
    stdin: Option<&str>,
) -> Result<(Child, PathBuf), BackendError> {
    use std::process::Stdio;
    let (path, log, err) = crate::worker_log(log_dir, name)?;
    cmd.stdin(if stdin.is_some() { Stdio::piped() } else { Stdio::null() }).stdout(log).stderr(err);
    std::os::unix::process::CommandExt::process_group(cmd, 0);
    let mut child = cmd.spawn().map_err(|e| BackendError::ScaleUp(format!("cannot run {program}: {e}")))?;
    if let (Some(text), Some(mut pipe)) = (stdin, child.stdin.take()) {
        use std::io::Write;
        // A small write into an empty pipe does not block; a child that
        // exits at once only makes it fail, which its log will explain.
        let _ = pipe.write_all(text.as_bytes());
    }
    Ok((child, path))
}

/// The result of a scale-down that met `errors`.
pub(crate) fn scale_down_result(errors: Vec<String>) -> Result<(), BackendError> {
    if errors.is_empty() {
        Ok(())
    } else {
        Err(BackendError::ScaleDown(errors.join("; ")))
    }
}
