//! The local backend: worker processes on this machine, children of the
//! cluster's manager, each in its own process group, logging to a file.

use std::path::PathBuf;
use std::process::{Child, Command};
use std::time::Duration;

use crate::children::{scale_down_result, spawn_logged, ChildWorker, Children};
use crate::{process, Backend, BackendError, Credentials, Deployer, Owned, WorkerOptions, WorkerRecord, WorkerStatus};

struct Worker {
    name: String,
    child: Child,
    start_time: u64,
}

impl ChildWorker for Worker {
    fn name(&self) -> &str {
        &self.name
    }

    fn child(&mut self) -> &mut Child {
        &mut self.child
    }
}

/// Worker processes on this machine.
pub struct LocalBackend {
    options: WorkerOptions,
    scheduler: String,
    log_dir: PathBuf,
    workers: Children<Worker>,
    credentials: Credentials,
}

impl LocalBackend {
    /// Workers connect to `scheduler`, are named `PREFIX-N` and log to `log_dir/NAME.log`.
    pub fn new(options: WorkerOptions, scheduler: &str, prefix: &str, log_dir: PathBuf) -> Self {
        LocalBackend {
            options,
            scheduler: scheduler.to_string(),
            log_dir,
            workers: Children::new(prefix),
            credentials: Credentials::none(),
        }
    }

    /// Workers find the cluster's credential files through their
    /// environment ([`Credentials::env`]).
    pub fn with_credentials(mut self, credentials: Credentials) -> Self {
        self.credentials = credentials;
        self
    }

    fn spawn(&mut self) -> Result<(), BackendError> {
        let name = self.workers.next_name();
        let contact = self.options.contact(&self.scheduler);
        let argv = self.options.worker_command(&contact, &name);
        let mut cmd = Command::new(&argv[0]);
        cmd.args(&argv[1..]);
        if !self.credentials.is_empty() {
            for v in Credentials::shadowed() {
                cmd.env_remove(v);
            }
            cmd.envs(self.credentials.env());
        }
        let (child, _) = spawn_logged(&mut cmd, &self.log_dir, &name, &argv[0], None)?;
        let start_time = process::start_time(child.id()).unwrap_or(0);
        tracing::info!("started worker {name} (pid {})", child.id());
        self.workers.list.push(Worker { name, child, start_time });
        Ok(())
    }
}

impl Backend for LocalBackend {
    fn kind(&self) -> &'static str {
        "local"
    }

    fn scale_up(&mut self, n: usize) -> Result<(), BackendError> {
        while self.workers.list.len() < n {
            self.spawn()?;
        }
        Ok(())
    }

    fn scale_down(&mut self, names: &[String]) -> Result<(), BackendError> {
        let mut errors = Vec::new();
        for mut w in self.workers.take(names) {
            if let Err(e) = process::terminate(w.child.id(), Some(w.start_time), Duration::from_secs(10)) {
                errors.push(format!("{}: {e}", w.name));
            }
            let _ = w.child.wait();
        }
        scale_down_result(errors)
    }

    fn workers(&mut self) -> Result<Vec<WorkerRecord>, BackendError> {
        Ok(self.workers.records(
            |w, status| WorkerRecord {
                detail: format!("pid {} {status}", w.child.id()),
                name: w.name,
                status: WorkerStatus::Failed,
            },
            |w| WorkerRecord {
                name: w.name.clone(),
                status: WorkerStatus::Running,
                detail: format!("pid {}", w.child.id()),
            },
        ))
    }
}

impl Deployer for LocalBackend {
    fn owned(&self) -> Vec<Owned> {
        self.workers
            .list
            .iter()
            .map(|w| Owned::Process { name: w.name.clone(), pid: w.child.id(), start_time: w.start_time })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    /// A stand-in for Python: a script that ignores its arguments (the real
    /// worker is exercised by the end-to-end tests).
    fn fake_python(dir: &std::path::Path, body: &str) -> String {
        std::fs::create_dir_all(dir).unwrap();
        let draft = dir.join("python.draft");
        std::fs::write(&draft, format!("#!/bin/sh\n{body}\n")).unwrap();
        // The script itself is written by a child process: a process that
        // another test thread forks while this one holds a file open for
        // writing inherits that descriptor until it execs, and running the
        // file meanwhile fails with "Text file busy".
        let path = dir.join("python");
        let cp = std::process::Command::new("cp").arg(&draft).arg(&path).status().unwrap();
        assert!(cp.success());
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).unwrap();
        path.to_string_lossy().into_owned()
    }

    #[test]
    fn starts_watches_and_stops_processes() {
        let dir = std::env::temp_dir().join(format!("dask-rs-local-{}", std::process::id()));
        let python = fake_python(&dir, "echo \"$@\"; exec sleep 30");
        let opts = WorkerOptions { python, nthreads: 2, ..Default::default() };
        let mut b = LocalBackend::new(opts, "tcp://127.0.0.1:1", "t", dir.join("logs"));
        b.scale_up(2).unwrap();
        b.scale_up(2).unwrap();
        let recs = b.workers().unwrap();
        let names: Vec<&str> = recs.iter().map(|r| r.name.as_str()).collect();
        assert_eq!(names, ["t-0", "t-1"]);
        assert!(recs.iter().all(|r| r.status == WorkerStatus::Running));
        let owned = b.owned();
        assert_eq!(owned.len(), 2);
        // The worker gets its name and the scheduler address; output goes to its log.
        std::thread::sleep(Duration::from_millis(200));
        let log = std::fs::read_to_string(dir.join("logs/t-0.log")).unwrap();
        assert_eq!(log.trim(), "-m dask_rs worker tcp://127.0.0.1:1 --name t-0 --nthreads 2");
        b.scale_down(&["t-0".to_string()]).unwrap();
        assert_eq!(b.workers().unwrap().len(), 1);
        assert_eq!(crate::any_alive(&owned), vec![format!("t-1 (pid {})", b.workers.list[0].child.id())]);
        // What is left is cleaned up from the records alone, as after a crash.
        assert!(crate::cleanup(&b.owned()).is_empty());
        assert!(crate::any_alive(&owned).is_empty());
        // A killed worker is reported failed once, then forgotten.
        let recs = b.workers().unwrap();
        assert_eq!(recs.len(), 1);
        assert_eq!(recs[0].status, WorkerStatus::Failed);
        assert!(b.workers().unwrap().is_empty());
        let _ = std::fs::remove_dir_all(&dir);
    }
}
