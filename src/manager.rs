//! The cluster manager: the detached process `dask-ctl up` starts. It runs
//! the scheduler, the backend and the Adaptive controller, answers the
//! control socket, and on `down` (or SIGTERM) removes every worker it owns,
//! stops the scheduler and deletes the cluster's registry entry.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixListener;
use std::path::{Path, PathBuf};
use std::sync::mpsc::{sync_channel, Receiver, RecvTimeoutError, SyncSender};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use adaptive::{tick, ClusterView, Controller, ControllerConfig, DaskAdaptive, Fixed, Policy, Retirer, WorkerStatus};
use anyhow::{Context, Result};
use cluster::client::ClientCore;
use cluster::protocol::{ClusterInfo, EventsUpdate};
use cluster::scheduler::{self, SchedulerConfig};
use deployers::batch::BatchBackend;
use deployers::kubernetes::KubernetesBackend;
use deployers::local::LocalBackend;
use deployers::marathon::MarathonBackend;
use deployers::ssh::SshBackend;
use deployers::{BackendKind, Deployer};

use crate::control::{Request, Response, Status, WorkerRow};
use crate::registry::{self, ClusterRecord};

type Command = (Request, SyncSender<Response>);

/// Retires through the scheduler, so data moves off first.
struct SchedulerRetirer<'a>(&'a ClientCore);

impl Retirer for SchedulerRetirer<'_> {
    fn retire(&mut self, workers: &[String]) -> Result<Vec<String>, String> {
        let (retired, failed) =
            self.0.retire_workers(workers.to_vec(), Duration::from_secs(120)).map_err(|e| e.to_string())?;
        for (name, why) in &failed {
            tracing::warn!("could not retire {name}: {why}");
        }
        if retired.is_empty() && !failed.is_empty() {
            return Err(failed.into_iter().map(|(n, w)| format!("{n}: {w}")).collect::<Vec<_>>().join("; "));
        }
        Ok(retired)
    }
}

fn policy_for(rec: &ClusterRecord) -> Box<dyn Policy> {
    match rec.adapt {
        Some((lo, hi)) => Box::new(DaskAdaptive::new(lo, hi, rec.options.threads())),
        None => Box::new(Fixed(rec.workers.unwrap_or(0))),
    }
}

/// How the cluster was set up, for the dashboard's `/info`: the scheduler's
/// settings, its protection, the backend and every worker option `up` was
/// given (defaults left out).
fn manager_facts(rec: &ClusterRecord, security: &cluster::security::Security) -> Vec<(String, String)> {
    let mut facts = vec![("cluster".to_string(), rec.name.clone()), ("backend".into(), rec.backend.to_string())];
    facts.push(match (rec.workers, rec.adapt) {
        (_, Some((lo, hi))) => ("scaling".into(), format!("adaptive, {lo} to {hi} workers")),
        (n, None) => ("scaling".into(), format!("fixed, {} workers", n.unwrap_or(0))),
    });
    facts.extend(SchedulerConfig::default().describe());
    facts.extend(scheduler::describe_security(security));
    let defaults = serde_json::to_value(deployers::WorkerOptions::default()).unwrap_or_default();
    if let Ok(serde_json::Value::Object(options)) = serde_json::to_value(&rec.options) {
        for (k, v) in options {
            let empty = v.is_null() || v.as_array().is_some_and(|a| a.is_empty()) || v.as_str() == Some("");
            if !empty && defaults.get(&k) != Some(&v) {
                let shown = v.as_str().map(String::from).unwrap_or_else(|| v.to_string());
                facts.push((format!("worker {k}"), shown));
            }
        }
    }
    facts
}

/// Run the manager of the cluster registered in `dir` until `down`.
pub fn run(dir: PathBuf) -> Result<()> {
    let mut rec = ClusterRecord::load(&dir)?;
    let security = registry::security(&dir)?;
    let credentials = registry::credentials(&dir);
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(1).enable_all().build()?;
    let sched = rt
        .block_on(scheduler::start(&rec.host, rec.port, SchedulerConfig::default(), security.clone()))
        .with_context(|| format!("cannot listen on {}:{}", rec.host, rec.port))?;
    let address = sched.address.clone();
    let (tx, rx) = sync_channel::<Command>(16);
    serve_control(&dir, tx.clone())?;
    {
        let tx = tx.clone();
        rt.spawn(async move {
            use tokio::signal::unix::{signal, SignalKind};
            let mut term = signal(SignalKind::terminate()).expect("SIGTERM handler");
            let mut int = signal(SignalKind::interrupt()).expect("SIGINT handler");
            tokio::select! { _ = term.recv() => {}, _ = int.recv() => {} }
            let (reply, _) = sync_channel(1);
            let _ = tx.try_send((Request::Down, reply));
        });
    }
    let core = ClientCore::connect(&address, "dask-ctl-manager", Duration::from_secs(10), &security)?;
    core.subscribe(Duration::from_millis(250))?;
    let board = match &rec.dashboard_address {
        Some(at) => {
            let d = dashboard::Dashboard::start(&address, at, &rec.host, &security)?;
            if let Some(w) = d.warning() {
                eprintln!("warning: {w}");
            }
            rec.dashboard = Some(d.url().to_string());
            d.set_config(manager_facts(&rec, &security));
            Some(d)
        }
        None => None,
    };
    let logs = registry::log_dir(&dir);
    let mut backend: Box<dyn Deployer> = match rec.backend {
        BackendKind::Local => {
            Box::new(LocalBackend::new(rec.options.clone(), &address, &rec.name, logs).with_credentials(credentials))
        }
        BackendKind::Ssh => {
            // Workers on other hosts cannot use the loopback form of a wildcard address.
            let listen = if cluster::comm::is_wildcard_host(&rec.host) {
                format!("{}://{}:{}", security.scheme(), rec.host, deployers::port_of(&address).unwrap_or(0))
            } else {
                address.clone()
            };
            Box::new(SshBackend::new(rec.options.clone(), &listen, &rec.name, logs)?.with_credentials(credentials)?)
        }
        BackendKind::Slurm | BackendKind::Sge => {
            let system = rec.backend.batch_system().expect("a batch backend");
            let b = BatchBackend::new(system, rec.options.clone(), &address, &rec.name, logs, dir.join("jobs"))?;
            Box::new(b.with_credentials(credentials))
        }
        BackendKind::Kubernetes => {
            let mut b = KubernetesBackend::new(&rec.options, &rec.name, &address, credentials)?;
            // The API server checks the namespace and permissions now.
            b.create()?;
            Box::new(b)
        }
        BackendKind::Marathon => {
            let mut b = MarathonBackend::new(&rec.options, &rec.name, &address, &credentials)?;
            // Marathon checks the app now: a refusal stops `up` with its words.
            b.create()?;
            Box::new(b)
        }
    };
    rec.address = Some(address.clone());
    rec.manager_pid = Some(std::process::id());
    rec.manager_start = deployers::process::start_time(std::process::id());
    rec.save(&dir)?;
    println!("manager of {} ({} backend): scheduler at {address}", rec.name, rec.backend);

    let mut config = ControllerConfig::default();
    if let Some(m) = rec.max_pending {
        config.max_pending = m.max(1);
    }
    let mut ctrl = Controller::new(policy_for(&rec), config);
    let mut latest = EventsUpdate::default();
    let mut owned_saved = Vec::new();
    let interval = Duration::from_secs_f64(ctrl.config().interval);
    let mut next_tick = Instant::now();
    let down_reply = loop {
        match rx.recv_timeout(next_tick.saturating_duration_since(Instant::now())) {
            Ok((req, reply)) => match req {
                Request::Down => break Some(reply),
                Request::Status => {
                    // Ask the scheduler now rather than use the last event update.
                    let mut fresh = latest.clone();
                    if let Ok(ClusterInfo { workers, ntasks, .. }) = core.info() {
                        fresh.workers = workers;
                        fresh.ntasks = ntasks;
                    }
                    let _ = reply.send(Response::ok(Some(status(&rec, &mut ctrl, &mut *backend, &fresh))));
                }
                Request::Scale { n } => {
                    rec.workers = Some(n);
                    rec.adapt = None;
                    ctrl.set_policy(policy_for(&rec));
                    let _ = rec.save(&dir);
                    next_tick = Instant::now();
                    let _ = reply.send(Response::ok(None));
                }
                Request::Adapt { minimum, maximum } => {
                    if maximum < minimum {
                        let _ = reply.send(Response::err(format!("maximum {maximum} is below minimum {minimum}")));
                        continue;
                    }
                    rec.workers = None;
                    rec.adapt = Some((minimum, maximum));
                    ctrl.set_policy(policy_for(&rec));
                    let _ = rec.save(&dir);
                    next_tick = Instant::now();
                    let _ = reply.send(Response::ok(None));
                }
            },
            Err(RecvTimeoutError::Timeout) => {
                next_tick = Instant::now() + interval;
                if let Some(u) = core.take_events(Duration::ZERO).pop() {
                    latest = u;
                }
                let view = ClusterView::from(&latest);
                tick(&mut ctrl, cluster::now(), &view, &mut *backend, &mut SchedulerRetirer(&core));
                let owned = backend.owned();
                if let Some(d) = &board {
                    let running = view.workers.len() as u64;
                    let pending = (owned.len() as u64).saturating_sub(running);
                    let target = ctrl.target().unwrap_or(0) as u64;
                    let decisions = ctrl
                        .decisions()
                        .map(|d| dashboard::Decision {
                            time: d.time,
                            kind: d.kind.clone(),
                            target: d.target,
                            running: d.running,
                            pending: d.pending,
                            reason: d.reason.clone(),
                        })
                        .collect();
                    d.set_manager(dashboard::ManagerGauges { target, running, pending }, decisions);
                }
                if owned != owned_saved {
                    let _ = registry::save_owned(&dir, &owned);
                    owned_saved = owned;
                }
            }
            Err(RecvTimeoutError::Disconnected) => break None,
        }
    };
    println!("shutting down {}", rec.name);
    if let Err(e) = backend.close() {
        eprintln!("{e}");
    }
    let leftovers = deployers::cleanup(&backend.owned());
    for l in &leftovers {
        eprintln!("could not stop {l}");
    }
    drop(board);
    sched.stop();
    rt.block_on(sched.wait());
    drop(core);
    let _ = std::fs::remove_dir_all(&dir);
    if let Some(reply) = down_reply {
        let _ = reply.send(if leftovers.is_empty() { Response::ok(None) } else { Response::err(leftovers.join("; ")) });
    }
    // Give the control thread a moment to write the answer.
    std::thread::sleep(Duration::from_millis(100));
    Ok(())
}

fn status(rec: &ClusterRecord, ctrl: &mut Controller, backend: &mut dyn Deployer, latest: &EventsUpdate) -> Status {
    let records = backend.workers().unwrap_or_default();
    // The backend reports a failure once: the controller must still see it.
    ctrl.note_failures(cluster::now(), &records);
    let mut rows = Vec::new();
    let mut running = 0;
    let mut pending = 0;
    for r in records.iter().filter(|r| r.status != WorkerStatus::Failed) {
        let w = latest.workers.iter().find(|w| w.name == r.name);
        let state = match w {
            Some(w) if w.retiring => "retiring",
            Some(_) => "running",
            None => "pending",
        };
        if w.is_some() {
            running += 1;
        } else {
            pending += 1;
        }
        rows.push(WorkerRow {
            name: r.name.clone(),
            state: state.into(),
            detail: r.detail.clone(),
            address: w.map(|w| w.address.clone()).unwrap_or_default(),
            nthreads: w.map_or(rec.options.threads(), |w| w.nthreads),
            memory_limit: w.map_or(0, |w| w.memory_limit),
            managed: w.map_or(0, |w| w.managed),
            processing: w.map_or(0, |w| w.processing),
        });
    }
    for w in latest.workers.iter().filter(|w| !records.iter().any(|r| r.name == w.name)) {
        rows.push(WorkerRow {
            name: w.name.clone(),
            state: "external".into(),
            detail: format!("pid {}", w.pid),
            address: w.address.clone(),
            nthreads: w.nthreads,
            memory_limit: w.memory_limit,
            managed: w.managed,
            processing: w.processing,
        });
    }
    let decisions: Vec<_> = ctrl.decisions().cloned().collect();
    Status {
        name: rec.name.clone(),
        backend: rec.backend,
        address: rec.address.clone().unwrap_or_default(),
        dashboard: rec.dashboard.clone(),
        policy: ctrl.policy().describe(),
        requested: running + pending,
        running,
        pending,
        threads: latest.workers.iter().map(|w| w.nthreads as u64).sum(),
        memory_limit: latest.workers.iter().map(|w| w.memory_limit).sum(),
        managed: latest.workers.iter().map(|w| w.managed).sum(),
        tasks: latest.ntasks,
        workers: rows,
        decisions: decisions[decisions.len().saturating_sub(50)..].to_vec(),
    }
}

/// Accept control connections on a thread; each request goes to the
/// controller loop, which answers through a channel.
/// Whether the process at the other end of `conn` runs as this user
/// (`SO_PEERCRED`); the socket's directory is private too, this is the
/// second lock.
fn same_user(conn: &std::os::unix::net::UnixStream) -> bool {
    use std::os::fd::AsRawFd;
    let mut cred = libc::ucred { pid: 0, uid: u32::MAX, gid: u32::MAX };
    let mut len = std::mem::size_of::<libc::ucred>() as libc::socklen_t;
    // SAFETY: getsockopt writes at most `len` bytes into `cred`.
    let rc = unsafe {
        libc::getsockopt(
            conn.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_PEERCRED,
            (&mut cred as *mut libc::ucred).cast(),
            &mut len,
        )
    };
    rc == 0 && cred.uid == cluster::security::my_uid()
}

fn serve_control(dir: &Path, tx: SyncSender<Command>) -> Result<()> {
    let path = registry::socket(dir);
    let _ = std::fs::remove_file(&path);
    let listener = UnixListener::bind(&path).with_context(|| format!("cannot listen on {}", path.display()))?;
    let tx = Arc::new(Mutex::new(tx));
    std::thread::Builder::new().name("dask-ctl-control".into()).spawn(move || {
        for conn in listener.incoming().flatten() {
            let tx = tx.clone();
            std::thread::spawn(move || {
                if !same_user(&conn) {
                    tracing::warn!("refused a control connection from another user");
                    let _ = (&conn).write_all(b"{\"ok\":false,\"error\":\"refused: not the cluster's owner\"}\n");
                    return;
                }
                let mut line = String::new();
                if BufReader::new(&conn).read_line(&mut line).is_err() {
                    return;
                }
                let response = match serde_json::from_str::<Request>(&line) {
                    Ok(req) => {
                        let (reply_tx, reply_rx): (SyncSender<Response>, Receiver<Response>) = sync_channel(1);
                        let sent = tx.lock().map(|t| t.send((req, reply_tx)).is_ok()).unwrap_or(false);
                        if !sent {
                            Response::err("the manager is shutting down")
                        } else {
                            reply_rx
                                .recv_timeout(Duration::from_secs(300))
                                .unwrap_or_else(|_| Response::err("no answer"))
                        }
                    }
                    Err(e) => Response::err(format!("bad request: {e}")),
                };
                let mut out = serde_json::to_string(&response).unwrap_or_default();
                out.push('\n');
                let _ = (&conn).write_all(out.as_bytes());
            });
        }
    })?;
    Ok(())
}
