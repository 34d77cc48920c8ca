//! The batch backends: SLURM and Grid Engine. One batch job per worker; the
//! worker is the job's foreground process, so the job ends with it and the
//! batch system's cancel stops it.
//!
//! This module owns the job scripts (rendered from [`WorkerOptions`]), the
//! batch commands (`sbatch`/`qsub`, `squeue`/`qstat -xml`, `scancel`/`qdel`)
//! and the mapping of batch states to pending / running / ended. Jobs are
//! polled in one batched command per check.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use crate::{
    last_line, parse_bytes, sh_quote, Backend, BackendError, Credentials, Deployer, Owned, WorkerOptions, WorkerRecord,
    WorkerStatus,
};

/// A batch system (stored in records by its lowercase name).
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum System {
    Slurm,
    Sge,
}

/// A job's state, with the batch system's own word for it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum JobState {
    /// Queued (or held, suspended): no worker yet.
    Pending(String),
    /// Its script runs.
    Running(String),
    /// Finished, cancelled, failed, or no longer known to the batch system.
    Ended(String),
}

impl JobState {
    /// The batch system's word (`PENDING`, `qw`, `RUNNING`, `r`, `COMPLETED`...).
    pub fn batch_state(&self) -> &str {
        match self {
            JobState::Pending(s) | JobState::Running(s) | JobState::Ended(s) => s,
        }
    }
}

/// What differs between the jobs of one cluster.
pub struct JobSpec<'a> {
    /// The worker's name, also the job's name.
    pub name: &'a str,
    /// The scheduler address the worker connects to.
    pub scheduler: &'a str,
    /// Where the job writes its output (`NAME.log`).
    pub log_dir: &'a Path,
    /// The cluster's credential files (private, on a file system the job
    /// sees); the script names them, the secrets are never in the script.
    pub credentials: &'a Credentials,
}

/// Seconds in a walltime: `D-HH:MM:SS`, `HH:MM:SS`, `MM:SS`, or a bare number
/// (minutes for SLURM, seconds for Grid Engine, as each reads it).
pub fn walltime_seconds(system: System, text: &str) -> Option<u64> {
    let t = text.trim();
    let (days, rest) = match t.split_once('-') {
        Some((d, r)) => (d.parse::<u64>().ok()?, r),
        None => (0, t),
    };
    let parts: Vec<u64> = rest.split(':').map(|p| p.parse().ok()).collect::<Option<_>>()?;
    let secs = match (parts.as_slice(), days > 0) {
        ([h], true) => h * 3600,
        ([n], false) => match system {
            System::Slurm => n * 60,
            System::Sge => *n,
        },
        ([m, s], false) => m * 60 + s,
        ([h, m], true) => h * 3600 + m * 60,
        ([h, m, s], _) => h * 3600 + m * 60 + s,
        _ => return None,
    };
    Some(days * 86400 + secs)
}

/// `--lifetime` and `--lifetime-stagger` (seconds) for a walltime: workers
/// retire before the batch system kills them, staggered so that they do not
/// all leave at once. The margin is a tenth of the walltime, between 10 s and
/// 5 minutes; the stagger is half of it.
pub fn lifetime_for(walltime: u64) -> (u64, u64) {
    let margin = (walltime / 10).clamp(10, 300).min(walltime / 2);
    (walltime - margin, margin / 2)
}

fn hms(secs: u64) -> String {
    format!("{:02}:{:02}:{:02}", secs / 3600, secs / 60 % 60, secs % 60)
}

fn run(cmd: &mut Command) -> Result<std::process::Output, String> {
    let prog = format!("{:?}", cmd.get_program());
    cmd.stdin(Stdio::null()).output().map_err(|e| format!("cannot run {}: {e}", prog.trim_matches('"')))
}

fn failure(out: &std::process::Output) -> String {
    let err = String::from_utf8_lossy(&out.stderr);
    let text = if err.trim().is_empty() { String::from_utf8_lossy(&out.stdout).into_owned() } else { err.into_owned() };
    let lines: Vec<&str> = text.lines().map(str::trim).filter(|l| !l.is_empty()).collect();
    format!("{} ({})", lines.join(" / "), out.status)
}

impl System {
    pub fn name(self) -> &'static str {
        match self {
            System::Slurm => "slurm",
            System::Sge => "sge",
        }
    }

    /// The commands this backend runs (checked by `dask-ctl up`).
    pub fn commands(self) -> [&'static str; 3] {
        match self {
            System::Slurm => ["sbatch", "squeue", "scancel"],
            System::Sge => ["qsub", "qstat", "qdel"],
        }
    }

    /// The job script for one worker.
    pub fn render(self, opts: &WorkerOptions, job: &JobSpec) -> String {
        let prefix = match self {
            System::Slurm => "#SBATCH",
            System::Sge => "#$",
        };
        let log = job.log_dir.join(format!("{}.log", job.name));
        let log = log.to_string_lossy();
        let walltime = opts.walltime.as_deref().and_then(|w| walltime_seconds(self, w));
        let mut d: Vec<String> = Vec::new();
        match self {
            System::Slurm => {
                d.push(format!("-J {}", job.name));
                d.push(format!("-o {log}"));
                d.push(format!("-e {log}"));
                if let Some(q) = &opts.queue {
                    d.push(format!("-p {q}"));
                }
                if let Some(a) = &opts.account {
                    d.push(format!("-A {a}"));
                }
                d.push("-n 1".into());
                if let Some(c) = opts.cores {
                    d.push(format!("--cpus-per-task={c}"));
                }
                if let Some(m) = opts.memory.as_deref().and_then(parse_bytes) {
                    d.push(format!("--mem={}M", m.div_ceil(1 << 20)));
                }
                if let Some(w) = &opts.walltime {
                    d.push(format!("-t {w}"));
                }
            }
            System::Sge => {
                d.push(format!("-N {}", job.name));
                d.push("-S /bin/bash".into());
                d.push(format!("-o {log}"));
                d.push("-j y".into());
                if let Some(q) = &opts.queue {
                    d.push(format!("-q {q}"));
                }
                if let Some(a) = &opts.account {
                    d.push(format!("-P {a}"));
                }
                if let Some(c) = opts.cores.filter(|c| *c > 1) {
                    d.push(format!("-pe smp {c}"));
                }
                if let Some(w) = walltime {
                    d.push(format!("-l h_rt={}", hms(w)));
                }
            }
        }
        let mut lines = vec!["#!/usr/bin/env bash".to_string()];
        let generated = d.into_iter().map(|x| format!("{prefix} {x}"));
        let extra = opts.job_extra.iter().map(|x| if x.starts_with('#') { x.clone() } else { format!("{prefix} {x}") });
        lines.extend(generated.filter(|l| !opts.job_directives_skip.iter().any(|s| !s.is_empty() && l.contains(s))));
        lines.extend(extra);
        lines.push(String::new());
        for (var, path) in job.credentials.env() {
            lines.push(format!("export {var}={}", sh_quote(&path.display().to_string())));
        }
        lines.extend(opts.prologue.iter().cloned());

        let mut argv = opts.worker_command(job.scheduler, job.name);
        if opts.memory_limit.is_none() {
            if let Some(m) = opts.memory.as_deref().and_then(parse_bytes) {
                argv.insert(argv.len() - opts.worker_extra_args.len(), "--memory-limit".into());
                argv.insert(argv.len() - opts.worker_extra_args.len(), (m / opts.processes.max(1) as u64).to_string());
            }
        }
        if let Some(w) = walltime.filter(|_| !opts.worker_extra_args.iter().any(|a| a.starts_with("--lifetime"))) {
            let (life, stagger) = lifetime_for(w);
            argv.extend(["--lifetime".into(), format!("{life}s"), "--lifetime-stagger".into(), format!("{stagger}s")]);
        }
        let cmd: Vec<String> = argv.iter().map(|a| sh_quote(a)).collect();
        if opts.epilogue.is_empty() {
            lines.push(format!("exec {}", cmd.join(" ")));
        } else {
            lines.push(cmd.join(" "));
            lines.extend(opts.epilogue.iter().cloned());
        }
        lines.push(String::new());
        lines.join("\n")
    }

    /// Submit a job script; returns the job id.
    pub fn submit(self, script: &Path) -> Result<String, String> {
        let out = match self {
            System::Slurm => run(Command::new("sbatch").arg("--parsable").arg(script))?,
            System::Sge => run(Command::new("qsub").arg("-terse").arg(script))?,
        };
        if !out.status.success() {
            return Err(failure(&out));
        }
        let text = String::from_utf8_lossy(&out.stdout);
        let id = text.lines().map(str::trim).rfind(|l| !l.is_empty()).unwrap_or("");
        // `--parsable` prints `ID;CLUSTER` on multi-cluster sites.
        let id = id.split(';').next().unwrap_or("");
        if id.is_empty() || !id.bytes().all(|b| b.is_ascii_digit()) {
            return Err(format!("unexpected answer to the submission: {:?}", text.trim()));
        }
        Ok(id.to_string())
    }

    /// Ask the batch system whether it would accept the script, without
    /// queueing it (`sbatch --test-only`, `qsub -w v`).
    pub fn verify(self, script: &Path) -> Result<(), String> {
        let out = match self {
            System::Slurm => run(Command::new("sbatch").arg("--test-only").arg(script))?,
            System::Sge => run(Command::new("qsub").args(["-w", "v"]).arg(script))?,
        };
        if out.status.success() {
            Ok(())
        } else {
            Err(failure(&out))
        }
    }

    /// Cancel jobs; ids the batch system no longer knows are not an error.
    pub fn cancel(self, ids: &[String]) -> Result<(), String> {
        if ids.is_empty() {
            return Ok(());
        }
        let out = match self {
            System::Slurm => run(Command::new("scancel").args(ids))?,
            System::Sge => run(Command::new("qdel").args(ids))?,
        };
        if out.status.success() {
            return Ok(());
        }
        // qdel fails for an id that is already gone; only jobs still queued matter.
        let left: Vec<String> = self
            .poll(ids)?
            .into_iter()
            .filter(|(_, s)| !matches!(s, JobState::Ended(_)) && !s.batch_state().contains('d'))
            .map(|(id, _)| id)
            .collect();
        if left.is_empty() {
            Ok(())
        } else {
            Err(format!("jobs {} not cancelled: {}", left.join(", "), failure(&out)))
        }
    }

    /// Wait until none of `ids` is queued, running or being deleted (Grid
    /// Engine's `dr`: its processes may still run).
    pub fn wait_settled(self, ids: &[String], timeout: std::time::Duration) -> Result<(), String> {
        let deadline = std::time::Instant::now() + timeout;
        loop {
            let busy: Vec<String> = self
                .poll(ids)?
                .into_iter()
                .filter(|(_, s)| {
                    !matches!(s, JobState::Ended(_)) || (self == System::Sge && s.batch_state().contains('d'))
                })
                .map(|(id, s)| format!("{id} ({})", s.batch_state()))
                .collect();
            if busy.is_empty() {
                return Ok(());
            }
            if std::time::Instant::now() > deadline {
                return Err(format!("still in the queue after cancelling: {}", busy.join(", ")));
            }
            std::thread::sleep(std::time::Duration::from_millis(250));
        }
    }

    /// The state of each job in `ids`, in one batch command. Jobs the batch
    /// system does not list are `Ended("gone")`.
    pub fn poll(self, ids: &[String]) -> Result<Vec<(String, JobState)>, String> {
        if ids.is_empty() {
            return Ok(Vec::new());
        }
        let listed = match self {
            System::Slurm => {
                let out = run(Command::new("squeue").args(["--me", "-h", "-t", "all", "-o", "%i|%T|%r|%N"]))?;
                if !out.status.success() {
                    return Err(failure(&out));
                }
                parse_squeue(&String::from_utf8_lossy(&out.stdout))
            }
            System::Sge => {
                let out = run(Command::new("qstat").arg("-xml"))?;
                if !out.status.success() {
                    return Err(failure(&out));
                }
                parse_qstat_xml(&String::from_utf8_lossy(&out.stdout))
            }
        };
        Ok(ids
            .iter()
            .map(|id| {
                let st = listed.iter().find(|(i, _)| i == id).map(|(_, s)| s.clone());
                (id.clone(), st.unwrap_or_else(|| JobState::Ended("gone".into())))
            })
            .collect())
    }
}

/// `squeue -h -t all -o '%i|%T|%r|%N'` lines.
pub fn parse_squeue(text: &str) -> Vec<(String, JobState)> {
    text.lines()
        .filter_map(|l| {
            let mut f = l.trim().split('|');
            let id = f.next()?.to_string();
            let state = f.next()?.to_string();
            let reason = f.next().unwrap_or("");
            let node = f.next().unwrap_or("");
            let st = match state.as_str() {
                "PENDING" | "CONFIGURING" | "REQUEUED" | "REQUEUE_HOLD" | "REQUEUE_FED" | "RESIZING" | "SUSPENDED"
                | "STOPPED" => JobState::Pending(if reason.is_empty() || reason == "None" {
                    state
                } else {
                    format!("{state} ({reason})")
                }),
                "RUNNING" | "COMPLETING" | "SIGNALING" | "STAGE_OUT" => {
                    JobState::Running(if node.is_empty() { state } else { format!("{state} on {node}") })
                }
                _ => JobState::Ended(state),
            };
            Some((id, st))
        })
        .collect()
}

/// The text inside `<tag>...</tag>` in `block`.
fn xml_field<'a>(block: &'a str, tag: &str) -> Option<&'a str> {
    let open = format!("<{tag}>");
    let start = block.find(&open)? + open.len();
    let end = block[start..].find(&format!("</{tag}>"))? + start;
    Some(block[start..end].trim())
}

/// `qstat -xml`: every `<job_list>` (running ones under `queue_info`,
/// pending ones under `job_info`); array tasks are not used.
pub fn parse_qstat_xml(text: &str) -> Vec<(String, JobState)> {
    text.split("<job_list")
        .skip(1)
        .filter_map(|block| {
            let block = &block[..block.find("</job_list>").unwrap_or(block.len())];
            let id = xml_field(block, "JB_job_number")?.to_string();
            let state = xml_field(block, "state")?.to_string();
            let queue = xml_field(block, "queue_name").unwrap_or("");
            let st = if state.contains('E') || state.contains('d') {
                JobState::Ended(state)
            } else if state.contains('r') || state.contains('t') {
                JobState::Running(if queue.is_empty() { state } else { format!("{state} on {queue}") })
            } else {
                JobState::Pending(state)
            };
            Some((id, st))
        })
        .collect()
}

struct Job {
    name: String,
    id: String,
    state: JobState,
    log: PathBuf,
}

/// Workers as batch jobs.
pub struct BatchBackend {
    system: System,
    options: WorkerOptions,
    scheduler: String,
    prefix: String,
    log_dir: PathBuf,
    script_dir: PathBuf,
    jobs: Vec<Job>,
    failed: Vec<WorkerRecord>,
    next: u64,
    credentials: Credentials,
}

impl BatchBackend {
    /// Jobs run workers named `PREFIX-N` that connect to `scheduler` (or
    /// `contact_address`); scripts are kept in `script_dir`, output goes to
    /// `log_directory` or `log_dir`.
    pub fn new(
        system: System,
        options: WorkerOptions,
        scheduler: &str,
        prefix: &str,
        log_dir: PathBuf,
        script_dir: PathBuf,
    ) -> Result<Self, BackendError> {
        if options.processes > 1 {
            return Err(BackendError::ScaleUp(format!(
                "the {} backend runs one worker process per job; use --nthreads (or --cores) instead of --processes {}",
                system.name(),
                options.processes
            )));
        }
        let log_dir = options.log_directory.as_ref().map(PathBuf::from).unwrap_or(log_dir);
        Ok(BatchBackend {
            system,
            scheduler: options.contact(scheduler),
            options,
            prefix: prefix.to_string(),
            log_dir,
            script_dir,
            jobs: Vec::new(),
            failed: Vec::new(),
            next: 0,
            credentials: Credentials::none(),
        })
    }

    /// Jobs find the cluster's credential files through variables their
    /// script exports ([`Credentials::env`]).
    pub fn with_credentials(mut self, credentials: Credentials) -> Self {
        self.credentials = credentials;
        self
    }

    /// The script for the next job (what `dask-ctl job-script` prints).
    pub fn script(&self, name: &str) -> String {
        let job = JobSpec { name, scheduler: &self.scheduler, log_dir: &self.log_dir, credentials: &self.credentials };
        self.system.render(&self.options, &job)
    }

    fn write_script(&self, name: &str) -> Result<PathBuf, BackendError> {
        let io = |e: std::io::Error| BackendError::ScaleUp(e.to_string());
        std::fs::create_dir_all(&self.script_dir).map_err(io)?;
        std::fs::create_dir_all(&self.log_dir).map_err(io)?;
        let path = self.script_dir.join(format!("{name}.sh"));
        std::fs::write(&path, self.script(name)).map_err(io)?;
        Ok(path)
    }

    /// Check that the batch system would accept this cluster's jobs.
    pub fn verify(&self) -> Result<(), BackendError> {
        let name = format!("{}-check", self.prefix);
        let path = self.write_script(&name)?;
        let r = self.system.verify(&path);
        let _ = std::fs::remove_file(&path);
        r.map_err(|e| BackendError::ScaleUp(format!("{} refuses the job: {e}", self.system.name())))
    }

    fn last_log_line(path: &Path) -> String {
        let line = last_line(&std::fs::read_to_string(path).unwrap_or_default());
        if line.is_empty() {
            "no output".into()
        } else {
            line
        }
    }
}

impl Backend for BatchBackend {
    fn kind(&self) -> &'static str {
        self.system.name()
    }

    fn scale_up(&mut self, n: usize) -> Result<(), BackendError> {
        while self.jobs.len() < n {
            let name = format!("{}-{}", self.prefix, self.next);
            self.next += 1;
            let path = self.write_script(&name)?;
            let id = self
                .system
                .submit(&path)
                .map_err(|e| BackendError::ScaleUp(format!("{} refused job {name}: {e}", self.system.name())))?;
            tracing::info!("submitted {} job {id} for worker {name}", self.system.name());
            let log = self.log_dir.join(format!("{name}.log"));
            self.jobs.push(Job { name, id, state: JobState::Pending("submitted".into()), log });
        }
        Ok(())
    }

    fn scale_down(&mut self, names: &[String]) -> Result<(), BackendError> {
        let (gone, keep): (Vec<Job>, Vec<Job>) =
            std::mem::take(&mut self.jobs).into_iter().partition(|j| names.contains(&j.name));
        let ids: Vec<String> = gone.iter().map(|j| j.id.clone()).collect();
        match self.system.cancel(&ids) {
            Ok(()) => {
                self.jobs = keep;
                Ok(())
            }
            Err(e) => {
                // Keep them: they are still ours to cancel.
                self.jobs = keep.into_iter().chain(gone).collect();
                Err(BackendError::ScaleDown(e))
            }
        }
    }

    fn workers(&mut self) -> Result<Vec<WorkerRecord>, BackendError> {
        let ids: Vec<String> = self.jobs.iter().map(|j| j.id.clone()).collect();
        let states = self.system.poll(&ids).map_err(BackendError::Status)?;
        for (id, st) in states {
            if let Some(j) = self.jobs.iter_mut().find(|j| j.id == id) {
                j.state = st;
            }
        }
        let mut out = Vec::new();
        let mut errored = Vec::new();
        for j in std::mem::take(&mut self.jobs) {
            let status = match &j.state {
                JobState::Pending(_) => WorkerStatus::Pending,
                JobState::Running(_) => WorkerStatus::Running,
                JobState::Ended(s) => {
                    if s.contains('E') {
                        errored.push(j.id.clone());
                    }
                    self.failed.push(WorkerRecord {
                        name: j.name.clone(),
                        status: WorkerStatus::Failed,
                        detail: format!("job {} {s}: {}", j.id, Self::last_log_line(&j.log)),
                    });
                    continue;
                }
            };
            out.push(WorkerRecord {
                name: j.name.clone(),
                status,
                detail: format!("job {} {}", j.id, j.state.batch_state()),
            });
            self.jobs.push(j);
        }
        // A job in Grid Engine's error state stays queued until deleted.
        let _ = self.system.cancel(&errored);
        out.append(&mut self.failed);
        Ok(out)
    }
}

impl Deployer for BatchBackend {
    fn owned(&self) -> Vec<Owned> {
        self.jobs.iter().map(|j| Owned::Job { name: j.name.clone(), system: self.system, id: j.id.clone() }).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use cluster::tls::TlsFiles;

    /// Job scripts for a table of option combinations, compared with the files
    /// under `tests/snapshots/` (`UPDATE_SNAPSHOTS=1` rewrites them).
    #[test]
    fn job_scripts_match_snapshots() {
        let base = WorkerOptions { python: "/opt/venv/bin/python".into(), processes: 1, ..Default::default() };
        let cases: Vec<(&str, WorkerOptions)> = vec![
            ("minimal", base.clone()),
            (
                "full",
                WorkerOptions {
                    nthreads: 0,
                    cores: Some(8),
                    memory: Some("16GiB".into()),
                    walltime: Some("01:00:00".into()),
                    queue: Some("gpu".into()),
                    account: Some("proj42".into()),
                    job_extra: vec!["--exclusive".into(), "#SBATCH --constraint=\"a b\"".into()],
                    prologue: vec!["module load python/3.11".into(), "source /opt/venv/bin/activate".into()],
                    worker_extra_args: vec!["--resources".into(), "GPU=2".into()],
                    ..base.clone()
                },
            ),
            (
                "skip-epilogue-limit",
                WorkerOptions {
                    nthreads: 4,
                    memory: Some("8GB".into()),
                    memory_limit: Some("6GB".into()),
                    walltime: Some("2-00:00:00".into()),
                    queue: Some("long".into()),
                    job_directives_skip: vec!["--mem".into(), "-q long".into()],
                    epilogue: vec!["echo done".into()],
                    log_directory: Some("/scratch/logs".into()),
                    worker_extra_args: vec!["--lifetime".into(), "1h".into()],
                    ..base.clone()
                },
            ),
        ];
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/snapshots");
        let update = std::env::var_os("UPDATE_SNAPSHOTS").is_some();
        let mut mismatches = Vec::new();
        for system in [System::Slurm, System::Sge] {
            for (case, opts) in &cases {
                let mut opts = opts.clone();
                if system == System::Sge && !opts.job_extra.is_empty() {
                    opts.job_extra = vec!["-l gpu=1".into(), "#$ -R y".into()];
                }
                // The full case is a protected cluster: its script names the credential files.
                let (address, credentials) = if *case == "full" {
                    let d = Path::new("/home/u/.local/state/dask-rs/clusters/c");
                    let tls = TlsFiles { ca: d.join("ca.pem"), cert: d.join("cert.pem"), key: d.join("key.pem") };
                    ("tls://10.0.0.1:8786", Credentials { token_file: Some(d.join("token")), tls: Some(tls) })
                } else {
                    ("tcp://10.0.0.1:8786", Credentials::none())
                };
                let b = BatchBackend::new(system, opts, address, "c", "/logs".into(), "/s".into())
                    .unwrap()
                    .with_credentials(credentials);
                let got = b.script("c-0");
                let path = dir.join(format!("{}-{case}.sh", system.name()));
                if update {
                    std::fs::create_dir_all(&dir).unwrap();
                    std::fs::write(&path, &got).unwrap();
                } else if std::fs::read_to_string(&path).ok().as_deref() != Some(got.as_str()) {
                    mismatches.push(format!("{}:\n{got}", path.display()));
                }
            }
        }
        assert!(mismatches.is_empty(), "job scripts differ from their snapshots:\n{}", mismatches.join("\n"));
    }

    #[test]
    fn walltimes_and_lifetimes() {
        assert_eq!(walltime_seconds(System::Slurm, "01:00:00"), Some(3600));
        assert_eq!(walltime_seconds(System::Slurm, "30"), Some(1800));
        assert_eq!(walltime_seconds(System::Sge, "30"), Some(30));
        assert_eq!(walltime_seconds(System::Slurm, "1-12"), Some(36 * 3600));
        assert_eq!(walltime_seconds(System::Slurm, "10:30"), Some(630));
        assert_eq!(walltime_seconds(System::Slurm, "soon"), None);
        assert_eq!(lifetime_for(3600), (3300, 150));
        assert_eq!(lifetime_for(60), (50, 5));
        assert_eq!(lifetime_for(12), (6, 3));
    }

    #[test]
    fn batch_states_map_to_worker_states() {
        let sq = "38|PENDING|Resources|\n39|RUNNING|None|vm\n40|COMPLETED|None|vm\n41|CANCELLED|None|vm\n";
        let got = parse_squeue(sq);
        assert_eq!(got[0], ("38".into(), JobState::Pending("PENDING (Resources)".into())));
        assert_eq!(got[1], ("39".into(), JobState::Running("RUNNING on vm".into())));
        assert!(matches!(got[2].1, JobState::Ended(_)) && matches!(got[3].1, JobState::Ended(_)));
        let xml = r#"<?xml version='1.0'?>
<job_info  xmlns:xsd="http://arc.liv.ac.uk/repos/darcs/sge/source/dist/util/resources/schemas/qstat/qstat.xsd">
  <queue_info>
    <job_list state="running">
      <JB_job_number>21</JB_job_number>
      <JB_name>c-0</JB_name>
      <state>r</state>
      <queue_name>all.q@vm</queue_name>
    </job_list>
  </queue_info>
  <job_info>
    <job_list state="pending">
      <JB_job_number>22</JB_job_number>
      <state>qw</state>
    </job_list>
    <job_list state="pending">
      <JB_job_number>23</JB_job_number>
      <state>Eqw</state>
    </job_list>
  </job_info>
</job_info>"#;
        let got = parse_qstat_xml(xml);
        assert_eq!(got[0], ("21".into(), JobState::Running("r on all.q@vm".into())));
        assert_eq!(got[1], ("22".into(), JobState::Pending("qw".into())));
        assert_eq!(got[2], ("23".into(), JobState::Ended("Eqw".into())));
    }

    #[test]
    fn several_processes_per_job_are_refused_clearly() {
        let opts = WorkerOptions { processes: 4, ..Default::default() };
        let err = BatchBackend::new(System::Slurm, opts, "tcp://h:1", "c", "/l".into(), "/s".into()).err().unwrap();
        assert!(err.to_string().contains("one worker process per job"), "{err}");
    }
}
