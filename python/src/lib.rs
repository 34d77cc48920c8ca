//! `dask_rs._core`: the Rust runtime exposed to Python.
//!
//! This crate is bindings only. It hosts the `cluster` crate's worker
//! runtime with a [`PyRunner`] that keeps results as live Python objects,
//! wraps the client core for the `dask_rs.Client`, and can run a scheduler
//! inside the Python process (for `LocalCluster`). Serialization policy
//! (pickle protocol 5, out-of-band buffers) lives in `dask_rs/_serialize.py`;
//! this crate only moves the resulting buffers without copying them.

/// Rust-side allocations (scheduler state, messages, frames) use mimalloc:
/// glibc's per-thread arenas kept growing and trimming their heaps under a
/// stream of short tasks, and the page faults cost a third of throughput.
#[global_allocator]
static ALLOC: mimalloc::MiMalloc = mimalloc::MiMalloc;

mod adapt;
mod buffers;

use buffers::{frame, frames_to_py, to_bytes};

use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use pyo3::create_exception;
use pyo3::exceptions::{PyOSError, PyPermissionError, PyRuntimeError, PyTimeoutError, PyValueError};
use pyo3::prelude::*;
use pyo3::types::{PyDict, PyList, PyTuple};
use tokio::sync::watch;

use cluster::client::{BackgroundRuntime, ClientCore as Core, ClientError, DatasetRequest, KeyStatus};
use cluster::protocol::{Blob, ClusterInfo, CoordError, CoordOp, CoordValue, EventsUpdate, Key, TaskSpec, WorkerInfo};
use cluster::scheduler::SchedulerConfig;
use cluster::security::{Security, SecurityError};
use cluster::tls::{Tls, TlsFiles};
use cluster::worker::store::{read_frames, Held, Store};
use cluster::worker::{ExecOutcome, Recipe, Runner, WorkerConfig};

create_exception!(_core, CommError, PyOSError, "A connection to a dask-rs peer failed or was refused.");

fn client_err(e: ClientError) -> PyErr {
    match e {
        ClientError::Timeout(_) => PyTimeoutError::new_err(e.to_string()),
        other => CommError::new_err(other.to_string()),
    }
}

/// A two-thread tokio runtime that shuts down in the background when dropped.
fn background_runtime(thread_name: &str) -> PyResult<BackgroundRuntime> {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .thread_name(thread_name)
        .enable_all()
        .build()
        .map(BackgroundRuntime::new)
        .map_err(|e| PyRuntimeError::new_err(e.to_string()))
}

// ---- the worker ----------------------------------------------------------

/// Runs tasks by calling into `dask_rs._worker`, keeping results as live
/// Python objects, or spilled to files when the memory policy says so.
/// Lock order: the GIL first, then `store`.
struct PyRunner {
    execute: Py<PyAny>,
    run_function: Py<PyAny>,
    dumps: Py<PyAny>,
    loads: Py<PyAny>,
    store: Store<Py<PyAny>>,
}

impl PyRunner {
    /// Stored values as Python objects (one store lock for all of them),
    /// spilled ones read back from disk (the store keeps them on disk).
    /// Errs naming the first key not held.
    fn values(&self, py: Python<'_>, keys: &[Key]) -> PyResult<Vec<Py<PyAny>>> {
        keys.iter()
            .zip(self.lookup(py, keys))
            .map(|(k, g)| match g {
                None => Err(PyRuntimeError::new_err(format!("dependency {k} is not on this worker"))),
                Some(Held::Memory(o)) => Ok(o),
                Some(Held::Disk(path)) => {
                    let frames =
                        read_frames(&path).map_err(|e| PyOSError::new_err(format!("reading spilled {k}: {e}")))?;
                    let out = self.loads.bind(py).call1((frames_to_py(py, frames)?,))?;
                    Ok(out.cast::<PyTuple>()?.get_item(0)?.unbind())
                }
            })
            .collect()
    }

    /// Where each of `keys` is, under one store lock (`None`: not held).
    fn lookup(&self, py: Python<'_>, keys: &[Key]) -> Vec<Option<Held<Py<PyAny>>>> {
        self.store.lookup(keys, |o| o.clone_ref(py))
    }

    fn dumps_frames(&self, py: Python<'_>, o: Py<PyAny>) -> PyResult<Vec<Bytes>> {
        let parts = self.dumps.bind(py).call1((o,))?;
        parts.try_iter()?.map(|p| to_bytes(&p?)).collect()
    }
}

impl Runner for PyRunner {
    fn execute(&self, key: &str, recipe: &Recipe, deps: &[Key], thread: u32) -> ExecOutcome {
        Python::attach(|py| {
            let r = (|| -> PyResult<ExecOutcome> {
                let values = self.values(py, deps)?;
                let spec = frame(py, recipe.spec.clone())?;
                let shared = match &recipe.shared {
                    Some((id, data)) => Some((*id, frame(py, data.clone())?)),
                    None => None,
                };
                let out = self.execute.bind(py).call1((spec, PyList::new(py, values)?, key, thread, shared))?;
                let t = out.cast::<PyTuple>()?;
                if t.get_item(0)?.is_truthy()? {
                    let value = t.get_item(1)?.unbind();
                    let nbytes: u64 = t.get_item(2)?.extract()?;
                    self.store.insert(key.to_string(), value);
                    Ok(ExecOutcome::Ok { nbytes })
                } else {
                    Ok(ExecOutcome::Err {
                        exception: t.get_item(1)?.extract::<Vec<u8>>()?.into(),
                        traceback: t.get_item(2)?.extract::<Vec<u8>>()?.into(),
                        text: t.get_item(3)?.extract()?,
                    })
                }
            })();
            r.unwrap_or_else(|e| ExecOutcome::Err {
                exception: Bytes::new(),
                traceback: Bytes::new(),
                text: format!("worker failed to run the task: {e}"),
            })
        })
    }

    fn serialize(&self, keys: &[Key]) -> Vec<(Key, Option<Vec<Bytes>>)> {
        Python::attach(|py| {
            keys.iter()
                .zip(self.lookup(py, keys))
                .map(|(k, g)| {
                    let frames = match g {
                        None => None,
                        // Spilled data goes out as it lies on disk, never unpickled.
                        Some(Held::Disk(p)) => {
                            read_frames(&p).map_err(|e| tracing::warn!("cannot read spilled {k}: {e}")).ok()
                        }
                        Some(Held::Memory(o)) => {
                            self.dumps_frames(py, o).map_err(|e| tracing::warn!("cannot serialize {k}: {e}")).ok()
                        }
                    };
                    (k.clone(), frames)
                })
                .collect()
        })
    }

    fn store(&self, key: &str, frames: Vec<Bytes>) -> Result<u64, String> {
        Python::attach(|py| {
            let r = (|| -> PyResult<u64> {
                let parts = frames_to_py(py, frames)?;
                let out = self.loads.bind(py).call1((parts,))?;
                let t = out.cast::<PyTuple>()?;
                let value = t.get_item(0)?.unbind();
                let nbytes: u64 = t.get_item(1)?.extract()?;
                self.store.insert(key.to_string(), value);
                Ok(nbytes)
            })();
            r.map_err(|e| e.to_string())
        })
    }

    fn free(&self, keys: &[Key]) {
        self.free_older(keys, u64::MAX)
    }

    fn mark(&self) -> u64 {
        self.store.mark()
    }

    fn free_older(&self, keys: &[Key], mark: u64) {
        // Dropping Python objects needs the GIL; take it before the store's lock.
        Python::attach(|_py| self.store.free_older(keys, mark))
    }

    fn spill(&self, keys: &[Key]) -> Vec<(Key, bool)> {
        Python::attach(|py| {
            keys.iter()
                .map(|k| {
                    let Some(obj) = self.store.in_memory(k, |o| o.clone_ref(py)) else {
                        return (k.clone(), false);
                    };
                    let frames = match self.dumps_frames(py, obj) {
                        Ok(f) => f,
                        Err(e) => {
                            tracing::warn!("cannot spill {k}: {e}");
                            return (k.clone(), false);
                        }
                    };
                    // Other threads run Python while this one writes.
                    let path = py.detach(|| self.store.write_spill(k, &frames));
                    drop(frames);
                    (k.clone(), path.is_some_and(|p| self.store.commit_spill(k, p)))
                })
                .collect()
        })
    }

    fn run_function(&self, call: Bytes) -> Result<Bytes, Bytes> {
        Python::attach(|py| {
            let r = (|| -> PyResult<(bool, Bytes)> {
                let arg = frame(py, call)?;
                let out = self.run_function.bind(py).call1((arg,))?;
                let (ok, data): (bool, Bound<'_, PyAny>) = out.extract()?;
                Ok((ok, to_bytes(&data)?))
            })();
            match r {
                Ok((true, d)) => Ok(d),
                Ok((false, d)) => Err(d),
                Err(e) => Err(Bytes::from(format!("worker failed to run the function: {e}"))),
            }
        })
    }

    /// Attach once for the thread's life and detach around the body: the
    /// calls inside then reuse this thread state instead of creating and
    /// destroying one (and its frame stack mapping) per call.
    fn thread_main(&self, body: &mut (dyn FnMut() + Send)) {
        Python::attach(|py| py.detach(body))
    }
}

/// `name` with anything but letters, digits, `-` and `_` replaced.
fn sanitize(name: &str) -> String {
    name.chars().map(|c| if c.is_ascii_alphanumeric() || c == '-' || c == '_' { c } else { '_' }).collect()
}

/// A worker running on background threads of this process.
#[pyclass(module = "dask_rs._core")]
pub struct WorkerHandle {
    rt: BackgroundRuntime,
    stop: watch::Sender<bool>,
    done: Arc<Mutex<Option<Result<(), String>>>>,
    finished: watch::Receiver<bool>,
    #[pyo3(get)]
    address: String,
    runner: Arc<PyRunner>,
}

#[pymethods]
impl WorkerHandle {
    /// Wait up to `timeout` seconds (forever if None); True once the worker stopped.
    #[pyo3(signature = (timeout=None))]
    fn wait(&self, py: Python<'_>, timeout: Option<f64>) -> bool {
        let mut f = self.finished.clone();
        py.detach(|| {
            self.rt.block_on(async {
                let fut = async {
                    while !*f.borrow() {
                        if f.changed().await.is_err() {
                            break;
                        }
                    }
                };
                match timeout {
                    Some(t) => tokio::time::timeout(Duration::from_secs_f64(t), fut).await.is_ok(),
                    None => {
                        fut.await;
                        true
                    }
                }
            })
        })
    }

    /// Ask the worker to stop.
    fn stop(&self) {
        let _ = self.stop.send(true);
    }

    /// None while running; raises the worker's error once it failed.
    fn result(&self) -> PyResult<Option<bool>> {
        match &*self.done.lock().expect("done") {
            None => Ok(None),
            Some(Ok(())) => Ok(Some(true)),
            Some(Err(e)) => Err(CommError::new_err(e.clone())),
        }
    }

    /// Number of values held.
    fn nkeys(&self) -> usize {
        self.runner.store.len()
    }

    /// The keys of the values held (`get_worker().data`).
    fn data_keys(&self) -> Vec<String> {
        self.runner.store.keys()
    }

    /// The value held under `key` (read back from disk if spilled); KeyError if none.
    fn data_get(&self, py: Python<'_>, key: String) -> PyResult<Py<PyAny>> {
        if !self.runner.store.keys().contains(&key) {
            return Err(pyo3::exceptions::PyKeyError::new_err(key));
        }
        Ok(self.runner.values(py, std::slice::from_ref(&key))?.remove(0))
    }
}

/// Parse a `--resources` value, `"GPU=2,MEM=10e9"`, into `[(name, amount)]`.
#[pyfunction]
fn parse_resources(text: &str) -> PyResult<Vec<(String, f64)>> {
    cluster::protocol::parse_resources(text).map_err(PyValueError::new_err)
}

/// Start a worker in this process. `execute`, `dumps`, `loads` and `run_function` come from
/// `dask_rs._worker`. Spilled results go under `local_directory` (made if
/// missing; default the system temporary directory). Returns once the
/// worker registered with the scheduler.
#[pyfunction]
#[pyo3(signature = (scheduler, name, nthreads, memory_limit, host, execute, dumps, loads, run_function, timeout=10.0, death_timeout=60.0, resources=None, local_directory=None, token=None, tls=None, require_encryption=false))]
#[allow(clippy::too_many_arguments)]
fn start_worker(
    py: Python<'_>,
    scheduler: String,
    name: String,
    nthreads: usize,
    memory_limit: u64,
    host: String,
    execute: Py<PyAny>,
    dumps: Py<PyAny>,
    loads: Py<PyAny>,
    run_function: Py<PyAny>,
    timeout: f64,
    death_timeout: f64,
    resources: Option<String>,
    local_directory: Option<std::path::PathBuf>,
    token: Option<String>,
    tls: Option<TlsPaths>,
    require_encryption: bool,
) -> PyResult<WorkerHandle> {
    let given = credentials(token, tls, require_encryption)?;
    let explicit = given.is_some();
    let security = security_for(&scheduler, given)?;
    let resources = cluster::protocol::parse_resources(resources.as_deref().unwrap_or(""))
        .map_err(|e| PyValueError::new_err(format!("--resources: {e}")))?;
    let local_directory = match local_directory {
        Some(dir) => {
            // Fail now, not at the first spill under memory pressure.
            std::fs::create_dir_all(&dir)
                .and_then(|_| tempfile_probe(&dir))
                .map_err(|e| PyOSError::new_err(format!("--local-directory {}: {e}", dir.display())))?;
            dir
        }
        None => std::env::temp_dir(),
    };
    let rt = background_runtime("dask-rs-worker")?;
    let mut config = WorkerConfig::new(&scheduler, &name, nthreads);
    config.memory_limit = memory_limit;
    config.host = host;
    config.connect_timeout = Duration::from_secs_f64(timeout);
    config.death_timeout = Duration::from_secs_f64(death_timeout.max(0.0));
    config.resources = resources;
    config.security = security.clone();
    let spill_dir = local_directory.join(format!("dask-rs-spill-{}-{}", std::process::id(), sanitize(&name)));
    let runner = Arc::new(PyRunner { execute, run_function, dumps, loads, store: Store::new(spill_dir) });
    let (stop_tx, stop_rx) = watch::channel(false);
    let (fin_tx, fin_rx) = watch::channel(false);
    let done = Arc::new(Mutex::new(None));
    let (started_tx, started_rx) = tokio::sync::oneshot::channel();
    let done2 = done.clone();
    let r2 = runner.clone();
    let spill_dir = runner.store.dir().to_path_buf();
    rt.spawn(async move {
        let res = cluster::worker::run_worker(config, r2, stop_rx, Some(started_tx)).await;
        // Spilled results die with the worker: do not leave them on disk.
        let _ = std::fs::remove_dir_all(&spill_dir);
        *done2.lock().expect("done") = Some(res.map_err(|e| e.to_string()));
        let _ = fin_tx.send(true);
    });
    let started = py.detach(|| rt.block_on(started_rx));
    match started {
        Ok(address) => {
            if explicit {
                remember(&scheduler, &security);
            }
            Ok(WorkerHandle { rt, stop: stop_tx, done, finished: fin_rx, address, runner })
        }
        Err(_) => {
            // The worker stopped before registering: wait until its error is recorded.
            let mut fin = fin_rx.clone();
            py.detach(|| {
                rt.block_on(async {
                    while !*fin.borrow() {
                        if fin.changed().await.is_err() {
                            break;
                        }
                    }
                })
            });
            let why = done.lock().expect("done").clone();
            let msg = match why {
                Some(Err(e)) => e,
                _ => "worker stopped before registering".to_string(),
            };
            Err(CommError::new_err(msg))
        }
    }
}

// ---- credentials ---------------------------------------------------------

/// Credentials this process was given, by scheduler address, so that every
/// connection it opens to a cluster it started or joined proves the right
/// token (`Client(cluster.scheduler_address)` works in the process that made
/// the `LocalCluster`).
static KNOWN: Mutex<Vec<(String, Security)>> = Mutex::new(Vec::new());

fn address_key(address: &str) -> &str {
    cluster::comm::strip_scheme(address)
}

/// The credential for the cluster at `address`: the one given, else one
/// remembered for that address (callers remember given credentials once
/// they connected with them, so a failed attempt with wrong ones changes
/// nothing), else the environment's, else none.
fn security_for(address: &str, given: Option<Security>) -> PyResult<Security> {
    if let Some(s) = given {
        return Ok(s);
    }
    let known = KNOWN.lock().expect("credentials");
    if let Some((_, s)) = known.iter().find(|(a, _)| a == address_key(address)) {
        return Ok(s.clone());
    }
    py_security(Security::from_env())
}

/// (CA file, certificate file, key file) as Python passes them.
type TlsPaths = (std::path::PathBuf, std::path::PathBuf, std::path::PathBuf);

/// The credentials given explicitly (a token, TLS files, or a demand for
/// encryption), or `None` when none was.
fn credentials(token: Option<String>, tls: Option<TlsPaths>, require_encryption: bool) -> PyResult<Option<Security>> {
    if token.is_none() && tls.is_none() && !require_encryption {
        return Ok(None);
    }
    let mut s = match token {
        Some(t) => py_security(Security::with_token(&t))?,
        None => Security::open(),
    };
    if let Some((ca, cert, key)) = tls {
        s = s.with_tls(py_security(Tls::load(TlsFiles { ca, cert, key }))?);
    }
    let require = require_encryption || s.tls().is_some();
    Ok(Some(s.require_encryption(require)))
}

/// Make a cluster CA and one certificate for all its processes in `dir`;
/// returns the (CA, certificate, key) paths.
/// Priorities for a graph's tasks (`keys[i]` depending on `deps[i]`; the
/// indices in `data` are data, not tasks), ordered as Dask's `dask.order`
/// does. A cycle raises RuntimeError naming its keys.
#[pyfunction]
#[pyo3(signature = (keys, deps, data=Vec::new()))]
fn order(py: Python<'_>, keys: Vec<String>, deps: Vec<Vec<String>>, data: Vec<usize>) -> PyResult<Vec<u64>> {
    if keys.len() != deps.len() {
        return Err(PyValueError::new_err("keys and deps differ in length"));
    }
    py.detach(|| {
        let mut nodes: Vec<cluster::order::Node<'_>> =
            keys.iter().zip(&deps).map(|(key, deps)| cluster::order::Node { key, deps, is_task: true }).collect();
        for i in data {
            if let Some(n) = nodes.get_mut(i) {
                n.is_task = false;
            }
        }
        cluster::order::order(&nodes)
    })
    .map_err(|e| PyRuntimeError::new_err(e.to_string()))
}

#[pyfunction]
fn generate_tls(dir: std::path::PathBuf) -> PyResult<(String, String, String)> {
    let f = py_security(TlsFiles::generate(&dir))?;
    let s = |p: std::path::PathBuf| p.display().to_string();
    Ok((s(f.ca), s(f.cert), s(f.key)))
}

/// A credential, or the Python exception for why there is none.
fn py_security<T>(r: Result<T, SecurityError>) -> PyResult<T> {
    r.map_err(|e| match e {
        SecurityError::Exposed(_) | SecurityError::Owner(_) => PyPermissionError::new_err(e.to_string()),
        SecurityError::Read { .. } | SecurityError::Random => PyOSError::new_err(e.to_string()),
        SecurityError::Invalid(_) | SecurityError::Tls(_) => PyValueError::new_err(e.to_string()),
    })
}

/// `token` checked (64 hex digits) and in its usual form.
#[pyfunction]
fn check_token(token: &str) -> PyResult<String> {
    Ok(py_security(Security::with_token(token))?.token().expect("a token").to_string())
}

/// The token in the file at `path`, which must be its owner's alone.
#[pyfunction]
fn read_token_file(path: std::path::PathBuf) -> PyResult<String> {
    Ok(py_security(Security::from_file(&path))?.token().expect("a token").to_string())
}

/// Use `security` for every later connection of this process to `address`.
fn remember(address: &str, security: &Security) {
    let mut known = KNOWN.lock().expect("credentials");
    known.retain(|(a, _)| a != address_key(address));
    known.push((address_key(address).to_string(), security.clone()));
}

/// A fresh random cluster token (64 hex digits).
#[pyfunction]
fn generate_token() -> PyResult<String> {
    let s = py_security(Security::generate())?;
    Ok(s.token().expect("a generated token").to_string())
}

// ---- the scheduler -------------------------------------------------------

/// A scheduler running on background threads of this process.
#[pyclass(module = "dask_rs._core")]
pub struct SchedulerHandle {
    rt: BackgroundRuntime,
    inner: cluster::scheduler::SchedulerHandle,
    #[pyo3(get)]
    address: String,
    dashboard: Mutex<Option<dashboard::Dashboard>>,
    /// The dashboard's link (None without a dashboard).
    #[pyo3(get)]
    dashboard_link: Option<String>,
    /// Why the dashboard is not on the port asked for, if it is not.
    #[pyo3(get)]
    dashboard_warning: Option<String>,
}

#[pymethods]
impl SchedulerHandle {
    fn stop(&self, py: Python<'_>) {
        // Its port may serve another cluster next.
        KNOWN.lock().expect("credentials").retain(|(a, _)| a != address_key(&self.address));
        let board = self.dashboard.lock().expect("dashboard").take();
        py.detach(|| drop(board));
        self.inner.stop();
        py.detach(|| self.rt.block_on(async { tokio::time::timeout(Duration::from_secs(5), self.inner.wait()).await }))
            .ok();
    }

    /// Wait up to `timeout` seconds; True once the scheduler stopped.
    #[pyo3(signature = (timeout=None))]
    fn wait(&self, py: Python<'_>, timeout: Option<f64>) -> bool {
        py.detach(|| {
            self.rt.block_on(async {
                match timeout {
                    Some(t) => tokio::time::timeout(Duration::from_secs_f64(t), self.inner.wait()).await.is_ok(),
                    None => {
                        self.inner.wait().await;
                        true
                    }
                }
            })
        })
    }
}

/// Start a scheduler in this process. With `dashboard_address` (`HOST:PORT`, `:PORT`), it also serves the web
/// dashboard there (another port when that one is taken).
/// With `token` (see `generate_token`), every connection must prove it; without,
/// the environment's token applies (`DASK_RS_TOKEN`), if any.
#[pyfunction]
#[pyo3(signature = (host="127.0.0.1".to_string(), port=0, worker_saturation=1.1, work_stealing=true, dashboard_address=None, token=None, tls=None, require_encryption=false))]
#[allow(clippy::too_many_arguments)]
fn start_scheduler(
    py: Python<'_>,
    host: String,
    port: u16,
    worker_saturation: f64,
    work_stealing: bool,
    dashboard_address: Option<String>,
    token: Option<String>,
    tls: Option<TlsPaths>,
    require_encryption: bool,
) -> PyResult<SchedulerHandle> {
    let rt = background_runtime("dask-rs-scheduler")?;
    let config = SchedulerConfig { worker_saturation, work_stealing, ..Default::default() };
    let security = match credentials(token, tls, require_encryption)? {
        Some(s) => s,
        None => py_security(Security::from_env())?,
    };
    let mut facts = config.describe();
    facts.extend(cluster::scheduler::describe_security(&security));
    let inner = py
        .detach(|| rt.block_on(cluster::scheduler::start(&host, port, config, security.clone())))
        .map_err(|e| PyOSError::new_err(format!("cannot start scheduler on {host}:{port}: {e}")))?;
    let address = inner.address.clone();
    remember(&address, &security);
    let board = match dashboard_address {
        Some(at) => match py.detach(|| dashboard::Dashboard::start(&address, &at, &host, &security)) {
            Ok(d) => {
                d.set_config(facts);
                Some(d)
            }
            Err(e) => {
                inner.stop();
                return Err(PyOSError::new_err(format!("cannot start the dashboard: {e}")));
            }
        },
        None => None,
    };
    let dashboard_link = board.as_ref().map(|d| d.url().to_string());
    let dashboard_warning = board.as_ref().and_then(|d| d.warning().map(String::from));
    inner.set_dashboard(dashboard_link.clone());
    Ok(SchedulerHandle { rt, inner, address, dashboard: Mutex::new(board), dashboard_link, dashboard_warning })
}

/// The first events update from the scheduler at `address`: a snapshot
/// with the whole task-stream ring.
fn snapshot(address: &str, name: &str) -> PyResult<EventsUpdate> {
    let security = security_for(address, None)?;
    let core = Core::connect_monitor(address, name, Duration::from_secs(10), &security).map_err(client_err)?;
    core.subscribe(Duration::from_millis(50)).map_err(client_err)?;
    core.take_events(Duration::from_secs(10))
        .into_iter()
        .next()
        .ok_or_else(|| CommError::new_err("the scheduler sent no events within 10 s"))
}

/// The HTML of a performance report of the work between `start` and `stop`
/// (Unix seconds) on the scheduler at `address`, with `facts` listed first.
#[pyfunction]
fn performance_report_html(
    py: Python<'_>,
    address: String,
    start: f64,
    stop: f64,
    title: String,
    facts: Vec<(String, String)>,
) -> PyResult<String> {
    py.detach(|| Ok(dashboard::report_html(snapshot(&address, "performance-report")?, start, stop, &title, &facts)))
}

/// The task stream between `start` and `stop` on the scheduler at
/// `address`, as SVG.
#[pyfunction]
#[pyo3(signature = (address, start, stop, width=1000, height=400))]
fn task_stream_svg(
    py: Python<'_>,
    address: String,
    start: f64,
    stop: f64,
    width: u32,
    height: u32,
) -> PyResult<String> {
    py.detach(|| Ok(dashboard::task_stream_svg(snapshot(&address, "task-stream")?, start, stop, width, height)))
}

// ---- the client ----------------------------------------------------------

/// The client's connection to a scheduler (see `dask_rs.Client`).
#[pyclass(module = "dask_rs._core")]
pub struct ClientCore {
    core: Core,
}

/// A placeholder for a value that travels as the request's payload.
fn empty_blob() -> Blob {
    Blob::Inline(Bytes::new())
}

impl ClientCore {
    /// Send a coordination operation (with `value` serialized as its
    /// payload) and turn the answer into Python.
    fn coord<'py>(
        &self,
        py: Python<'py>,
        op: CoordOp,
        value: Option<Bound<'py, PyAny>>,
    ) -> PyResult<Bound<'py, PyAny>> {
        let payload = value.map(|v| to_bytes(&v)).transpose()?;
        match py.detach(|| self.core.coordinate(op, payload)).map_err(client_err)? {
            Ok((CoordValue::Unit, _)) => Ok(py.None().into_bound(py)),
            Ok((CoordValue::Bool(b), _)) => Ok(pyo3::types::PyBool::new(py, b).to_owned().into_any()),
            Ok((CoordValue::Int(n), _)) => Ok(n.into_pyobject(py)?.into_any()),
            Ok((CoordValue::Values(_), values)) => {
                let items = PyList::empty(py);
                for (data, keys) in values {
                    items.append((frame(py, data)?, keys))?;
                }
                Ok(items.into_any())
            }
            Err(CoordError::TimedOut(msg)) => Err(PyTimeoutError::new_err(msg)),
            Err(CoordError::Refused(msg)) => Err(PyRuntimeError::new_err(msg)),
        }
    }
}

fn status_to_py<'py>(py: Python<'py>, st: Option<KeyStatus>) -> PyResult<Bound<'py, PyAny>> {
    Ok(match st {
        None => py.None().into_bound(py),
        Some(KeyStatus::Pending) => ("pending",).into_pyobject(py)?.into_any(),
        Some(KeyStatus::Finished { nbytes, workers }) => ("finished", nbytes, workers).into_pyobject(py)?.into_any(),
        Some(KeyStatus::Erred { exception, traceback, text }) => {
            ("error", frame(py, exception)?, frame(py, traceback)?, text).into_pyobject(py)?.into_any()
        }
        Some(KeyStatus::Cancelled { reason }) => ("cancelled", reason).into_pyobject(py)?.into_any(),
    })
}

fn worker_to_py<'py>(py: Python<'py>, w: &WorkerInfo) -> PyResult<Bound<'py, PyDict>> {
    let d = PyDict::new(py);
    d.set_item("address", &w.address)?;
    d.set_item("name", &w.name)?;
    d.set_item("nthreads", w.nthreads)?;
    d.set_item("memory_limit", w.memory_limit)?;
    d.set_item("pid", w.pid)?;
    d.set_item("managed", w.managed)?;
    d.set_item("rss", w.rss)?;
    d.set_item("cpu", w.cpu)?;
    d.set_item("spilled", w.spilled)?;
    d.set_item("executing", w.executing)?;
    d.set_item("ready", w.ready)?;
    d.set_item("processing", w.processing)?;
    d.set_item("nkeys", w.nkeys)?;
    d.set_item("bytes_in", w.bytes_in)?;
    d.set_item("bytes_out", w.bytes_out)?;
    d.set_item("retiring", w.retiring)?;
    d.set_item("occupancy", w.occupancy)?;
    let resources = PyDict::new(py);
    for (name, amount) in &w.resources {
        resources.set_item(name, amount)?;
    }
    d.set_item("resources", resources)?;
    Ok(d)
}

/// A task-stream record as a dict.
fn record_to_py<'py>(py: Python<'py>, r: &cluster::protocol::TaskStreamRecord) -> PyResult<Bound<'py, PyDict>> {
    let e = PyDict::new(py);
    e.set_item("key", &r.key)?;
    e.set_item("group", &r.group)?;
    e.set_item("worker", &r.worker)?;
    e.set_item("thread", r.thread)?;
    e.set_item("start", r.start)?;
    e.set_item("stop", r.stop)?;
    e.set_item("transfer", r.transfer)?;
    e.set_item("erred", r.erred)?;
    Ok(e)
}

fn events_to_py<'py>(py: Python<'py>, u: &EventsUpdate) -> PyResult<Bound<'py, PyDict>> {
    let d = PyDict::new(py);
    d.set_item("time", u.time)?;
    d.set_item("ntasks", u.ntasks)?;
    d.set_item("stream_dropped", u.stream_dropped)?;
    d.set_item("groups_removed", &u.groups_removed)?;
    let stream = PyList::empty(py);
    for r in &u.stream {
        stream.append(record_to_py(py, r)?)?;
    }
    d.set_item("stream", stream)?;
    let groups = PyDict::new(py);
    for g in &u.groups {
        let e = PyDict::new(py);
        for (k, v) in [
            ("released", g.released),
            ("waiting", g.waiting),
            ("queued", g.queued),
            ("no-worker", g.no_worker),
            ("processing", g.processing),
            ("memory", g.memory),
            ("erred", g.erred),
            ("forgotten", g.forgotten),
            ("nbytes", g.nbytes),
        ] {
            e.set_item(k, v)?;
        }
        groups.set_item(&g.name, e)?;
    }
    d.set_item("groups", groups)?;
    let workers = PyList::empty(py);
    for w in &u.workers {
        workers.append(worker_to_py(py, w)?)?;
    }
    d.set_item("workers", workers)?;
    Ok(d)
}

type PyTask<'py> =
    (String, Bound<'py, PyAny>, Vec<String>, i32, u64, Option<Vec<String>>, bool, u32, Vec<(String, f64)>, Option<u64>);

#[pymethods]
impl ClientCore {
    #[new]
    #[pyo3(signature = (address, name, timeout=10.0, token=None, tls=None, require_encryption=false))]
    fn new(
        py: Python<'_>,
        address: String,
        name: String,
        timeout: f64,
        token: Option<String>,
        tls: Option<TlsPaths>,
        require_encryption: bool,
    ) -> PyResult<Self> {
        let given = credentials(token, tls, require_encryption)?;
        let explicit = given.is_some();
        let security = security_for(&address, given)?;
        let timeout = Duration::from_secs_f64(timeout);
        let core = py.detach(|| Core::connect(&address, &name, timeout, &security)).map_err(|e| match e {
            ClientError::Connect { source: cluster::comm::CommError::Timeout(..), .. } => {
                PyTimeoutError::new_err(e.to_string())
            }
            ClientError::Connect { source: cluster::comm::CommError::Address(_), .. } => {
                PyValueError::new_err(e.to_string())
            }
            other => client_err(other),
        })?;
        if explicit {
            remember(&address, &security);
        }
        Ok(ClientCore { core })
    }

    #[getter]
    fn address(&self) -> String {
        self.core.address.clone()
    }

    /// Submit tasks `(key, run_spec, deps, priority, order, workers, allow_other_workers, retries,
    /// resources, shared)` with the blobs `(id, bytes)` their `shared` ids name;
    /// `orders`, when given, replaces each task's `order`.
    #[pyo3(signature = (tasks, wanted, shared=Vec::new(), orders=None))]
    fn submit(
        &self,
        py: Python<'_>,
        tasks: Vec<PyTask<'_>>,
        wanted: Vec<String>,
        shared: Vec<(u64, Bound<'_, PyAny>)>,
        orders: Option<Vec<u64>>,
    ) -> PyResult<()> {
        if orders.as_ref().is_some_and(|o| o.len() != tasks.len()) {
            return Err(PyValueError::new_err("orders and tasks differ in length"));
        }
        let mut frames = Vec::new();
        let shared = shared
            .into_iter()
            .map(|(id, data)| Ok((id, Blob::new(to_bytes(&data)?, &mut frames))))
            .collect::<PyResult<Vec<_>>>()?;
        let mut specs = Vec::with_capacity(tasks.len());
        for (i, (key, run_spec, deps, priority, order, workers, allow_other_workers, retries, resources, blob)) in
            tasks.into_iter().enumerate()
        {
            let order = orders.as_ref().map_or(order, |o| o[i]);
            let data = to_bytes(&run_spec)?;
            let run_spec = Blob::new(data, &mut frames);
            specs.push(TaskSpec {
                key,
                run_spec,
                shared: blob,
                deps,
                priority,
                order,
                workers,
                allow_other_workers,
                retries,
                resources,
            });
        }
        py.detach(|| self.core.submit(specs, shared, frames, wanted)).map_err(client_err)
    }

    fn want(&self, keys: Vec<String>) -> PyResult<()> {
        self.core.want(keys).map_err(client_err)
    }

    fn release(&self, keys: Vec<String>) -> PyResult<()> {
        // Releasing during interpreter shutdown or after close is harmless.
        let _ = self.core.release(keys);
        Ok(())
    }

    fn cancel(&self, keys: Vec<String>) -> PyResult<()> {
        self.core.cancel(keys).map_err(client_err)
    }

    /// `None`, `("pending",)`, `("finished", nbytes, workers)`,
    /// `("error", exception, traceback, text)` or `("cancelled", reason)`.
    fn status<'py>(&self, py: Python<'py>, key: &str) -> PyResult<Bound<'py, PyAny>> {
        status_to_py(py, self.core.status(key))
    }

    /// Wait for all (or `any`) of `keys`; False on timeout.
    #[pyo3(signature = (keys, timeout=None, any=false))]
    fn wait(&self, py: Python<'_>, keys: Vec<String>, timeout: Option<f64>, any: bool) -> PyResult<bool> {
        let t = timeout.map(Duration::from_secs_f64);
        py.detach(|| self.core.wait(&keys, t, any)).map_err(client_err)
    }

    fn watch_done(&self) {
        self.core.watch_done()
    }

    fn take_done(&self, py: Python<'_>, timeout: f64) -> Vec<String> {
        py.detach(|| self.core.take_done(Duration::from_secs_f64(timeout)))
    }

    /// Fetch `keys` from `worker`: `([(key, [Frame, ...]), ...], missing)`.
    fn get_data<'py>(
        &self,
        py: Python<'py>,
        worker: String,
        keys: Vec<String>,
    ) -> PyResult<(Bound<'py, PyList>, Vec<String>)> {
        let (items, missing) = py.detach(|| self.core.get_data(&worker, keys)).map_err(client_err)?;
        let out = PyList::empty(py);
        for (k, parts) in items {
            out.append((k, frames_to_py(py, parts)?))?;
        }
        Ok((out, missing))
    }

    /// Run a pickled call in the worker process at `worker`; returns
    /// `(ok, pickled result or exception)`.
    fn run_on<'py>(
        &self,
        py: Python<'py>,
        worker: String,
        call: Bound<'py, PyAny>,
    ) -> PyResult<(bool, Bound<'py, PyAny>)> {
        let call = to_bytes(&call)?;
        let r = py.detach(|| self.core.run_on(&worker, call)).map_err(client_err)?;
        let (ok, data) = match r {
            Ok(d) => (true, d),
            Err(d) => (false, d),
        };
        Ok((ok, frame(py, data)?))
    }

    /// Put `[(key, [buffer, ...]), ...]` on `worker`.
    fn scatter(&self, py: Python<'_>, worker: String, items: Vec<(String, Vec<Bound<'_, PyAny>>)>) -> PyResult<()> {
        let mut conv = Vec::with_capacity(items.len());
        for (k, parts) in items {
            conv.push((k, parts.iter().map(to_bytes).collect::<PyResult<Vec<Bytes>>>()?));
        }
        py.detach(|| self.core.scatter(&worker, conv)).map_err(client_err)
    }

    /// Task-stream records that ended between `start` and `stop` (Unix
    /// seconds), at most the last `count`, as dicts.
    #[pyo3(signature = (start=None, stop=None, count=None))]
    fn task_stream<'py>(
        &self,
        py: Python<'py>,
        start: Option<f64>,
        stop: Option<f64>,
        count: Option<u64>,
    ) -> PyResult<Bound<'py, PyList>> {
        let records = py.detach(|| self.core.task_stream(start, stop, count)).map_err(client_err)?;
        let out = PyList::empty(py);
        for r in &records {
            out.append(record_to_py(py, r)?)?;
        }
        Ok(out)
    }

    fn who_has<'py>(&self, py: Python<'py>, keys: Vec<String>) -> PyResult<Bound<'py, PyDict>> {
        let v = py.detach(|| self.core.who_has(keys)).map_err(client_err)?;
        let d = PyDict::new(py);
        for (k, ws) in v {
            d.set_item(k, ws)?;
        }
        Ok(d)
    }

    /// Retire workers by name or address; returns (retired, [(name, why)]).
    #[allow(clippy::type_complexity)]
    fn retire_workers(
        &self,
        py: Python<'_>,
        workers: Vec<String>,
        timeout: f64,
    ) -> PyResult<(Vec<String>, Vec<(String, String)>)> {
        let timeout = Duration::from_secs_f64(timeout.max(0.0));
        py.detach(|| self.core.retire_workers(workers, timeout)).map_err(client_err)
    }

    /// Rebalance results among workers; returns (keys moved, bytes moved,
    /// keys that could not move). An unknown worker raises `ValueError`.
    fn rebalance(
        &self,
        py: Python<'_>,
        keys: Vec<String>,
        workers: Vec<String>,
        timeout: f64,
    ) -> PyResult<(u64, u64, u64)> {
        let timeout = Duration::from_secs_f64(timeout.max(0.0));
        py.detach(|| self.core.rebalance(keys, workers, timeout)).map_err(client_err)?.map_err(PyValueError::new_err)
    }

    fn info<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyDict>> {
        let info = py.detach(|| self.core.info()).map_err(client_err)?;
        let ClusterInfo { address, workers, ntasks, nclients, bytes_in, bytes_out, dashboard, queued } = info;
        let d = PyDict::new(py);
        d.set_item("address", address)?;
        d.set_item("ntasks", ntasks)?;
        d.set_item("nclients", nclients)?;
        d.set_item("bytes_in", bytes_in)?;
        d.set_item("bytes_out", bytes_out)?;
        d.set_item("queued", queued)?;
        d.set_item("dashboard", dashboard)?;
        let ws = PyList::empty(py);
        for w in &workers {
            ws.append(worker_to_py(py, w)?)?;
        }
        d.set_item("workers", ws)?;
        Ok(d)
    }

    fn retry(&self, keys: Vec<String>) -> PyResult<()> {
        self.core.retry(keys).map_err(client_err)
    }

    fn fire_and_forget(&self, keys: Vec<String>) -> PyResult<()> {
        self.core.fire_and_forget(keys).map_err(client_err)
    }

    /// Dataset requests: `op` is "publish", "unpublish", "get" or "list".
    /// Returns `(data, names)`; raises KeyError with the scheduler's message.
    #[pyo3(signature = (op, name=String::new(), keys=Vec::new(), data=None, overwrite=false))]
    fn dataset<'py>(
        &self,
        py: Python<'py>,
        op: &str,
        name: String,
        keys: Vec<String>,
        data: Option<Bound<'py, PyAny>>,
        overwrite: bool,
    ) -> PyResult<(Option<Bound<'py, PyAny>>, Vec<String>)> {
        let req = match op {
            "publish" => {
                let data = data.map(|d| to_bytes(&d)).transpose()?.unwrap_or_default();
                DatasetRequest::Publish { name, keys, data, overwrite }
            }
            "unpublish" => DatasetRequest::Unpublish { name },
            "get" => DatasetRequest::Get { name },
            "list" => DatasetRequest::List,
            other => return Err(PyValueError::new_err(format!("unknown dataset operation {other:?}"))),
        };
        match py.detach(|| self.core.dataset(req)).map_err(client_err)? {
            Ok((data, names)) => Ok((data.map(|d| frame(py, d)).transpose()?, names)),
            Err(msg) => Err(pyo3::exceptions::PyKeyError::new_err(msg)),
        }
    }

    // Coordination primitives (see `CoordOp`): each returns None, a bool,
    // an int, or a list of `(frame, keys)` values; raises TimeoutError when
    // a wait timed out and RuntimeError with the scheduler's words when the
    // operation is refused.

    fn variable_set<'py>(
        &self,
        py: Python<'py>,
        name: String,
        value: Bound<'py, PyAny>,
        keys: Vec<String>,
    ) -> PyResult<Bound<'py, PyAny>> {
        self.coord(py, CoordOp::VariableSet { name, value: empty_blob(), keys }, Some(value))
    }

    #[pyo3(signature = (name, timeout=None))]
    fn variable_get<'py>(&self, py: Python<'py>, name: String, timeout: Option<f64>) -> PyResult<Bound<'py, PyAny>> {
        self.coord(py, CoordOp::VariableGet { name, timeout }, None)
    }

    fn variable_delete<'py>(&self, py: Python<'py>, name: String) -> PyResult<Bound<'py, PyAny>> {
        self.coord(py, CoordOp::VariableDelete { name }, None)
    }

    #[pyo3(signature = (name, value, keys, maxsize=0, timeout=None))]
    fn queue_put<'py>(
        &self,
        py: Python<'py>,
        name: String,
        value: Bound<'py, PyAny>,
        keys: Vec<String>,
        maxsize: u64,
        timeout: Option<f64>,
    ) -> PyResult<Bound<'py, PyAny>> {
        self.coord(py, CoordOp::QueuePut { name, value: empty_blob(), keys, maxsize, timeout }, Some(value))
    }

    #[pyo3(signature = (name, batch=None, timeout=None))]
    fn queue_get<'py>(
        &self,
        py: Python<'py>,
        name: String,
        batch: Option<u64>,
        timeout: Option<f64>,
    ) -> PyResult<Bound<'py, PyAny>> {
        self.coord(py, CoordOp::QueueGet { name, batch, timeout }, None)
    }

    fn queue_size<'py>(&self, py: Python<'py>, name: String) -> PyResult<Bound<'py, PyAny>> {
        self.coord(py, CoordOp::QueueSize { name }, None)
    }

    #[pyo3(signature = (name, lease, max_leases=1, timeout=None))]
    fn sem_acquire<'py>(
        &self,
        py: Python<'py>,
        name: String,
        lease: String,
        max_leases: u32,
        timeout: Option<f64>,
    ) -> PyResult<Bound<'py, PyAny>> {
        self.coord(py, CoordOp::SemAcquire { name, max_leases, lease, timeout }, None)
    }

    fn sem_release<'py>(&self, py: Python<'py>, name: String, lease: String) -> PyResult<Bound<'py, PyAny>> {
        self.coord(py, CoordOp::SemRelease { name, lease }, None)
    }

    fn sem_value<'py>(&self, py: Python<'py>, name: String) -> PyResult<Bound<'py, PyAny>> {
        self.coord(py, CoordOp::SemValue { name }, None)
    }

    fn event_set<'py>(&self, py: Python<'py>, name: String) -> PyResult<Bound<'py, PyAny>> {
        self.coord(py, CoordOp::EventSet { name }, None)
    }

    fn event_clear<'py>(&self, py: Python<'py>, name: String) -> PyResult<Bound<'py, PyAny>> {
        self.coord(py, CoordOp::EventClear { name }, None)
    }

    #[pyo3(signature = (name, timeout=None))]
    fn event_wait<'py>(&self, py: Python<'py>, name: String, timeout: Option<f64>) -> PyResult<Bound<'py, PyAny>> {
        self.coord(py, CoordOp::EventWait { name, timeout }, None)
    }

    fn event_is_set<'py>(&self, py: Python<'py>, name: String) -> PyResult<Bound<'py, PyAny>> {
        self.coord(py, CoordOp::EventIsSet { name }, None)
    }

    fn subscribe(&self, interval: f64) -> PyResult<()> {
        self.core.subscribe(Duration::from_secs_f64(interval)).map_err(client_err)
    }

    fn take_events<'py>(&self, py: Python<'py>, timeout: f64) -> PyResult<Bound<'py, PyList>> {
        let evs = py.detach(|| self.core.take_events(Duration::from_secs_f64(timeout)));
        let out = PyList::empty(py);
        for e in &evs {
            out.append(events_to_py(py, e)?)?;
        }
        Ok(out)
    }

    fn shutdown_scheduler(&self) -> PyResult<()> {
        self.core.shutdown_scheduler().map_err(client_err)
    }

    /// Forget every task and restart every worker process.
    fn restart(&self) -> PyResult<()> {
        self.core.restart().map_err(client_err)
    }

    /// Keep a worker plugin's set-up call for workers that register later.
    fn register_plugin(&self, name: String, call: Vec<u8>) -> PyResult<()> {
        self.core.register_plugin(name, Bytes::from(call)).map_err(client_err)
    }

    /// Forget a worker plugin on the scheduler.
    fn unregister_plugin(&self, name: String) -> PyResult<()> {
        self.core.unregister_plugin(name).map_err(client_err)
    }

    /// Copy each of `keys` to more workers until `n` hold it (`n` of
    /// `workers`, names or addresses, when given).
    #[pyo3(signature = (keys, n, workers=Vec::new()))]
    fn replicate(&self, keys: Vec<String>, n: u32, workers: Vec<String>) -> PyResult<()> {
        self.core.replicate(keys, n, workers).map_err(client_err)
    }

    /// Why no current worker can run `key` (None when one can, or it is done).
    fn no_worker_reason(&self, key: &str) -> Option<String> {
        self.core.no_worker_reason(key)
    }

    fn closed_reason(&self) -> Option<String> {
        self.core.closed_reason()
    }
}

/// The protocol version this build speaks.
/// Check that files can be made in `dir` (the worker's spill location).
fn tempfile_probe(dir: &std::path::Path) -> std::io::Result<()> {
    let probe = dir.join(format!(".dask-rs-probe-{}", std::process::id()));
    std::fs::write(&probe, b"")?;
    std::fs::remove_file(&probe)
}

#[pyfunction]
fn protocol_version() -> u32 {
    cluster::protocol::PROTOCOL_VERSION
}

/// Leave the worker's thread pool for the rest of the running task (the
/// worker starts another thread in its place). False outside a task.
#[pyfunction]
fn secede() -> bool {
    cluster::worker::secede()
}

/// Take a place in the worker's thread pool again after `secede`, waiting
/// (without the GIL) for a pool thread to be free. False outside a task.
#[pyfunction]
fn rejoin(py: Python<'_>) -> bool {
    py.detach(cluster::worker::rejoin)
}

/// Log the runtime's warnings (or what `DASK_RS_LOG` asks for) to standard
/// error, and keep recent lines for the dashboard's `/info`; once per
/// process, and not where the host already installed a subscriber.
fn init_logging() {
    use tracing_subscriber::prelude::*;
    let filter = tracing_subscriber::EnvFilter::try_from_env("DASK_RS_LOG").unwrap_or_else(|_| "warn".into());
    let _ = tracing_subscriber::registry()
        .with(tracing_subscriber::fmt::layer().with_writer(std::io::stderr).with_filter(filter))
        .with(dashboard::logbook::layer())
        .try_init();
}

#[pymodule]
fn _core(m: &Bound<'_, PyModule>) -> PyResult<()> {
    init_logging();
    m.add("CommError", m.py().get_type::<CommError>())?;
    buffers::register(m)?;
    m.add_class::<ClientCore>()?;
    m.add_class::<WorkerHandle>()?;
    m.add_class::<SchedulerHandle>()?;
    m.add_class::<adapt::Adaptive>()?;
    m.add_function(wrap_pyfunction!(parse_resources, m)?)?;
    m.add_function(wrap_pyfunction!(performance_report_html, m)?)?;
    m.add_function(wrap_pyfunction!(task_stream_svg, m)?)?;
    m.add_function(wrap_pyfunction!(start_worker, m)?)?;
    m.add_function(wrap_pyfunction!(secede, m)?)?;
    m.add_function(wrap_pyfunction!(rejoin, m)?)?;
    m.add_function(wrap_pyfunction!(start_scheduler, m)?)?;
    m.add_function(wrap_pyfunction!(generate_token, m)?)?;
    m.add_function(wrap_pyfunction!(generate_tls, m)?)?;
    m.add_function(wrap_pyfunction!(order, m)?)?;
    m.add_function(wrap_pyfunction!(check_token, m)?)?;
    m.add_function(wrap_pyfunction!(read_token_file, m)?)?;
    m.add_function(wrap_pyfunction!(protocol_version, m)?)?;
    Ok(())
}
