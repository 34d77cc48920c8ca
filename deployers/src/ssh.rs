//! The ssh backend: workers on a list of hosts, started with the system
//! `ssh` (so `~/.ssh/config`, agents and ProxyJump apply).
//!
//! Each worker is one `ssh HOST 'exec python -m dask_rs worker ...'` child of
//! the manager: the worker's output streams back into its log file and the
//! ssh process ends when the worker does, which is how a dead worker is
//! noticed. Workers are stopped, and found again after a manager crash, by
//! their unique `--name` on the remote host (never by pid alone, which the
//! manager may not have learnt yet and the host may have reused).

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::children::{scale_down_result, spawn_logged, ChildWorker, Children};
use crate::{
    last_line, sh_quote, Backend, BackendError, Credentials, Deployer, Owned, WorkerOptions, WorkerRecord, WorkerStatus,
};

/// The line a remote worker's shell prints before it becomes the worker.
const MARKER: &str = "dask-rs: worker pid ";

/// Lists (signal 0) or signals the worker processes named in "$@" and prints
/// "NAME PID" for each; only processes of this user whose environment holds
/// `DASK_RS_CLUSTER_TAG=$2` (an empty tag: any of this user's processes); TERM is followed by CONT so that a stopped worker
/// acts on it. One line, so that any login shell passes it to sh.
const SIGNAL_SCRIPT: &str = r#"sig=$1; tag=$2; shift 2; me=$$; for d in /proc/[0-9]*; do p=${d#/proc/}; [ "$p" = "$me" ] && continue; [ -O "$d" ] || continue; if [ -n "$tag" ]; then tr '\0' '\n' < "$d/environ" 2>/dev/null | grep -qx "DASK_RS_CLUSTER_TAG=$tag" || continue; fi; c=$(tr '\0' ' ' < "$d/cmdline" 2>/dev/null) || continue; for n in "$@"; do case "$c" in *" dask_rs worker "*" --name $n "*) if [ "$sig" = 0 ] || kill -"$sig" "$p" 2>/dev/null; then echo "$n $p"; [ "$sig" = TERM ] && kill -CONT "$p" 2>/dev/null; fi;; esac; done; done"#;

/// The `ssh` command prefix reaching `host`: the user's arguments first (the
/// first value of an option wins), then ours.
pub fn ssh_prefix(options: &WorkerOptions, host: &str) -> Vec<String> {
    let mut argv = vec!["ssh".to_string()];
    argv.extend(options.ssh_args.iter().cloned());
    for o in ["BatchMode=yes", "ConnectTimeout=15", "ServerAliveInterval=15"] {
        argv.push("-o".into());
        argv.push(o.into());
    }
    argv.push(host.to_string());
    argv
}

/// A fresh random cluster tag (32 hex digits).
fn new_tag() -> String {
    cluster::security::Security::nonce().iter().map(|b| format!("{b:02x}")).collect()
}

/// `ssh ... HOST` running `script` under `/bin/sh` with `args` as "$@".
fn remote(ssh: &[String], script: &str, args: &[String]) -> Command {
    let mut line = format!("exec /bin/sh -c {} sh", sh_quote(script));
    for a in args {
        line.push(' ');
        line.push_str(&sh_quote(a));
    }
    let mut cmd = Command::new(&ssh[0]);
    cmd.args(&ssh[1..]).arg(line).stdin(Stdio::null());
    cmd
}

fn host_of(ssh: &[String]) -> &str {
    ssh.last().map_or("?", String::as_str)
}

/// Send `sig` ("TERM", "KILL", or "0" to only look) to the named workers on
/// the host; returns the (name, pid) pairs found.
pub fn signal_remote(ssh: &[String], tag: &str, names: &[String], sig: &str) -> Result<Vec<(String, u32)>, String> {
    let mut args = vec![sig.to_string(), tag.to_string()];
    args.extend(names.iter().cloned());
    let out = remote(ssh, SIGNAL_SCRIPT, &args).output().map_err(|e| format!("cannot run {}: {e}", ssh[0]))?;
    if !out.status.success() {
        return Err(format!(
            "ssh {} failed ({}): {}",
            host_of(ssh),
            out.status,
            last_line(&String::from_utf8_lossy(&out.stderr))
        ));
    }
    Ok(String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| {
            let (n, p) = l.rsplit_once(' ')?;
            Some((n.to_string(), p.parse().ok()?))
        })
        .collect())
}

/// SIGTERM the named workers, wait up to `grace` for them to exit, SIGKILL
/// what is left; fails if any is still there.
pub fn stop_remote(ssh: &[String], tag: &str, names: &[String], grace: Duration) -> Result<(), String> {
    if names.is_empty() {
        return Ok(());
    }
    let mut left = signal_remote(ssh, tag, names, "TERM")?;
    let deadline = Instant::now() + grace;
    while !left.is_empty() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(300));
        left = signal_remote(ssh, tag, names, "0")?;
    }
    if !left.is_empty() {
        signal_remote(ssh, tag, names, "KILL")?;
        std::thread::sleep(Duration::from_millis(300));
        left = signal_remote(ssh, tag, names, "0")?;
    }
    if left.is_empty() {
        Ok(())
    } else {
        let pids: Vec<String> = left.iter().map(|(n, p)| format!("{n} (pid {p})")).collect();
        Err(format!("still running after SIGKILL: {}", pids.join(", ")))
    }
}

/// Check that `host` answers over ssh and that its Python imports dask_rs;
/// returns the host's own name for it. The error says which of the two failed.
pub fn check_host(options: &WorkerOptions, host: &str) -> Result<String, String> {
    let ssh = ssh_prefix(options, host);
    let script = r#"command -v "$1" >/dev/null 2>&1 || { echo "$1: not found" >&2; exit 127; }; exec "$1" -c 'import socket, dask_rs; print(socket.gethostname())'"#;
    let out = remote(&ssh, script, std::slice::from_ref(&options.python))
        .output()
        .map_err(|e| format!("cannot run ssh: {e}"))?;
    let err = last_line(&String::from_utf8_lossy(&out.stderr));
    match out.status.code() {
        Some(0) => Ok(last_line(&String::from_utf8_lossy(&out.stdout))),
        Some(255) => Err(format!("cannot reach host {host} over ssh: {err}")),
        Some(127) => Err(format!("host {host}: python {:?} not found (set --python)", options.python)),
        _ => Err(format!(
            "host {host}: {} cannot import dask_rs ({err}); install dask-rs there or choose another --python",
            options.python
        )),
    }
}

struct RemoteWorker {
    name: String,
    host: String,
    /// The local ssh process that runs the worker.
    child: Child,
    log: PathBuf,
    /// The worker's pid on its host, once its start script said it.
    pid: Option<u32>,
}

impl ChildWorker for RemoteWorker {
    fn name(&self) -> &str {
        &self.name
    }

    fn child(&mut self) -> &mut Child {
        &mut self.child
    }
}

/// Workers on ssh hosts, placed on the host with the fewest of ours.
pub struct SshBackend {
    options: WorkerOptions,
    scheduler: String,
    log_dir: PathBuf,
    workers: Children<RemoteWorker>,
    /// The cluster's credentials, written to each worker's shell on its
    /// standard input (the remote host need not share our files).
    credentials: Credentials,
    /// What the shell reads ([`Credentials::stdin_text`]).
    stdin: Option<String>,
    /// Random per cluster, in every worker's environment, so that `down`
    /// signals this cluster's workers and nothing that merely looks alike.
    tag: String,
}

impl SshBackend {
    /// Workers connect to `scheduler` (or `contact_address`), are named
    /// `PREFIX-N` and log to `log_dir/NAME.log`. When the scheduler listens
    /// on every interface and no contact address is set, each worker uses
    /// the address its ssh connection came from (`$SSH_CONNECTION`).
    pub fn new(options: WorkerOptions, scheduler: &str, prefix: &str, log_dir: PathBuf) -> Result<Self, BackendError> {
        if options.hosts.is_empty() {
            return Err(BackendError::ScaleUp("the ssh backend needs at least one host (--hosts)".into()));
        }
        if let Some(h) = options.hosts.iter().find(|h| h.starts_with('-') || h.is_empty()) {
            return Err(BackendError::ScaleUp(format!("invalid host {h:?}")));
        }
        Ok(SshBackend {
            options,
            scheduler: scheduler.to_string(),
            log_dir,
            workers: Children::new(prefix),
            credentials: Credentials::none(),
            stdin: None,
            tag: new_tag(),
        })
    }

    /// Workers join with `credentials`, read from the files now and sent to
    /// each worker's shell (see [`SshBackend::start_script`]).
    pub fn with_credentials(mut self, credentials: Credentials) -> Result<Self, BackendError> {
        self.stdin = credentials.stdin_text()?;
        self.credentials = credentials;
        Ok(self)
    }

    /// The shell lines that run on the host: prologue, the address to use,
    /// the marker with the pid, then the worker in place of the shell.
    pub fn start_script(&self, name: &str) -> String {
        let mut lines: Vec<String> = Vec::new();
        // Credentials arrive on standard input, never on a command line.
        lines.extend(self.credentials.stdin_script());
        lines.push(format!("export DASK_RS_CLUSTER_TAG={}", self.tag));
        lines.extend(self.options.prologue.iter().cloned());
        if self.options.contact_address.is_none() && cluster::comm::is_wildcard_address(&self.scheduler) {
            let port = crate::port_of(&self.scheduler).unwrap_or(8786);
            lines.push("ip=${SSH_CONNECTION%% *}".into());
            lines.push(r#"case $ip in *:*) ip="[$ip]";; esac"#.into());
            let scheme = if cluster::comm::is_tls_address(&self.scheduler) { "tls" } else { "tcp" };
            lines.push(format!("addr={scheme}://$ip:{port}"));
        } else {
            lines.push(format!("addr={}", sh_quote(&self.options.contact(&self.scheduler))));
        }
        lines.push(format!(r#"echo "{MARKER}$$ on $(hostname)""#));
        let argv = self.options.worker_command("\0", name);
        let words: Vec<String> =
            argv.iter().map(|a| if a == "\0" { r#""$addr""#.to_string() } else { sh_quote(a) }).collect();
        lines.push(format!("exec {}", words.join(" ")));
        lines.join("; ")
    }

    fn spawn(&mut self) -> Result<(), BackendError> {
        let host = self
            .options
            .hosts
            .iter()
            .min_by_key(|h| self.workers.list.iter().filter(|w| &w.host == *h).count())
            .cloned()
            .expect("hosts is not empty");
        let name = self.workers.next_name();
        let ssh = ssh_prefix(&self.options, &host);
        let mut cmd = remote(&ssh, &self.start_script(&name), &[]);
        let (child, log) = spawn_logged(&mut cmd, &self.log_dir, &name, "ssh", self.stdin.as_deref())?;
        tracing::info!("starting worker {name} on {host} (ssh pid {})", child.id());
        self.workers.list.push(RemoteWorker { name, host, child, log, pid: None });
        Ok(())
    }
}

impl Backend for SshBackend {
    fn kind(&self) -> &'static str {
        "ssh"
    }

    fn scale_up(&mut self, n: usize) -> Result<(), BackendError> {
        while self.workers.list.len() < n {
            self.spawn()?;
        }
        Ok(())
    }

    fn scale_down(&mut self, names: &[String]) -> Result<(), BackendError> {
        let gone = self.workers.take(names);
        let mut errors = Vec::new();
        let mut hosts: Vec<&String> = gone.iter().map(|w| &w.host).collect();
        hosts.sort();
        hosts.dedup();
        for host in hosts {
            let on_host: Vec<String> = gone.iter().filter(|w| &w.host == host).map(|w| w.name.clone()).collect();
            if let Err(e) = stop_remote(&ssh_prefix(&self.options, host), &self.tag, &on_host, Duration::from_secs(10))
            {
                errors.push(format!("{host}: {e}"));
            }
        }
        // The ssh processes end with their workers; one that hangs is stopped here.
        for mut w in gone {
            let _ = crate::process::terminate(w.child.id(), None, Duration::from_secs(2));
            let _ = w.child.wait();
        }
        scale_down_result(errors)
    }

    fn workers(&mut self) -> Result<Vec<WorkerRecord>, BackendError> {
        let exited = |w: RemoteWorker, status: std::process::ExitStatus| {
            let log = std::fs::read_to_string(&w.log).unwrap_or_default();
            let why = if status.code() == Some(255) { "ssh failed" } else { "worker exited" };
            WorkerRecord {
                detail: format!("on {}: {why} ({status}): {}", w.host, last_line(&log)),
                name: w.name,
                status: WorkerStatus::Failed,
            }
        };
        let running = |w: &mut RemoteWorker| {
            if w.pid.is_none() {
                let log = std::fs::read_to_string(&w.log).unwrap_or_default();
                w.pid = log.lines().find_map(|l| l.strip_prefix(MARKER)?.split(' ').next()?.parse().ok());
            }
            let name = w.name.clone();
            match w.pid {
                Some(pid) => {
                    WorkerRecord { name, status: WorkerStatus::Running, detail: format!("pid {pid} on {}", w.host) }
                }
                None => {
                    WorkerRecord { name, status: WorkerStatus::Pending, detail: format!("connecting to {}", w.host) }
                }
            }
        };
        Ok(self.workers.records(exited, running))
    }
}

impl Deployer for SshBackend {
    fn owned(&self) -> Vec<Owned> {
        self.workers
            .list
            .iter()
            .map(|w| Owned::Remote {
                name: w.name.clone(),
                host: w.host.clone(),
                ssh: ssh_prefix(&self.options, &w.host),
                tag: self.tag.clone(),
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn start_script_quotes_and_finds_the_scheduler() {
        let opts = WorkerOptions {
            python: "/opt/my env/python".into(),
            nthreads: 2,
            hosts: vec!["a".into()],
            prologue: vec!["module load python".into()],
            worker_extra_args: vec!["--x".into(), "it's".into()],
            ..Default::default()
        };
        let b = SshBackend::new(opts.clone(), "tcp://0.0.0.0:8786", "c", PathBuf::from("/tmp")).unwrap();
        assert_eq!(
            b.start_script("c-0"),
            format!(
                r#"export DASK_RS_CLUSTER_TAG={}; module load python; ip=${{SSH_CONNECTION%% *}}; case $ip in *:*) ip="[$ip]";; esac; addr=tcp://$ip:8786; echo "dask-rs: worker pid $$ on $(hostname)"; exec '/opt/my env/python' -m dask_rs worker "$addr" --name c-0 --nthreads 2 --x 'it'\''s'"#,
                b.tag
            )
        );
        let b = SshBackend::new(
            WorkerOptions { contact_address: Some("10.0.0.1".into()), ..opts.clone() },
            "tcp://0.0.0.0:9000",
            "c",
            PathBuf::from("/tmp"),
        )
        .unwrap();
        assert!(b.start_script("c-1").contains("addr=tcp://10.0.0.1:9000;"), "{}", b.start_script("c-1"));
        let b = SshBackend::new(opts, "tcp://10.1.2.3:9000", "c", PathBuf::from("/tmp")).unwrap();
        assert!(b.start_script("c-1").contains("addr=tcp://10.1.2.3:9000;"));
    }

    #[test]
    fn bad_host_lists_are_refused() {
        for hosts in [vec![], vec!["-oProxyCommand=x".to_string()]] {
            let opts = WorkerOptions { hosts, ..Default::default() };
            assert!(SshBackend::new(opts, "tcp://127.0.0.1:1", "c", PathBuf::from("/tmp")).is_err());
        }
    }

    #[test]
    fn signal_script_runs_under_sh_and_finds_workers_by_name_and_tag() {
        // Run the script locally with sh in place of ssh: a process whose
        // command line looks like a worker's is found by its name, and only
        // with its cluster's tag in its environment.
        let spawn = |name: &str, tag: &str| {
            Command::new("sh")
                .args([
                    "-c",
                    "while :; do sleep 0.1; done",
                    "x",
                    "-m",
                    "dask_rs",
                    "worker",
                    "tcp://h:1",
                    "--name",
                    name,
                ])
                .arg("--nthreads=1")
                .env("DASK_RS_CLUSTER_TAG", tag)
                .spawn()
                .unwrap()
        };
        let mut ours = spawn("zz-3", "t1");
        let mut lookalike = spawn("zz-4", "other");
        let run = |tag: &str, names: &[&str], sig: &str| {
            let mut args = vec![sig.to_string(), tag.to_string()];
            args.extend(names.iter().map(|n| n.to_string()));
            let out = Command::new("sh").arg("-c").arg(SIGNAL_SCRIPT).arg("sh").args(&args).output().unwrap();
            String::from_utf8_lossy(&out.stdout).into_owned()
        };
        let listed = run("t1", &["zz-3", "zz-30"], "0");
        assert_eq!(listed.trim(), format!("zz-3 {}", ours.id()));
        assert_eq!(run("t1", &["zz-"], "0").trim(), "", "names match whole words only");
        assert_eq!(run("t1", &["zz-4"], "0").trim(), "", "another cluster's tag does not match");
        assert_eq!(run("", &["zz-4"], "0").trim(), format!("zz-4 {}", lookalike.id()), "no tag: by name");
        run("t1", &["zz-3", "zz-4"], "TERM");
        assert!(ours.wait().unwrap().code().is_none(), "killed by the signal");
        assert!(lookalike.try_wait().unwrap().is_none(), "the look-alike lives on");
        lookalike.kill().unwrap();
        lookalike.wait().unwrap();
    }

    #[test]
    fn contact_addresses() {
        let o = |c: &str| WorkerOptions { contact_address: Some(c.into()), ..Default::default() };
        assert_eq!(o("10.0.0.1").contact("tcp://0.0.0.0:4000"), "tcp://10.0.0.1:4000");
        assert_eq!(o("tcp://node1:5000").contact("tcp://0.0.0.0:4000"), "tcp://node1:5000");
        assert_eq!(o("[::1]").contact("tcp://[::]:4000"), "tcp://[::1]:4000");
        assert_eq!(WorkerOptions::default().contact("tcp://127.0.0.1:4000"), "tcp://127.0.0.1:4000");
    }
}
