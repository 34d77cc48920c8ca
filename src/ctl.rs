//! The lifecycle commands: `up`, `list`, `status`, `scale`, `adapt`, `down`,
//! `logs`, `snippet`. They talk to a cluster's manager over its control
//! socket and fall back to the registry when the manager is gone.

use std::collections::BTreeMap;
use std::io::Write;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{anyhow, bail, Context, Result};
use cluster::human::{age as fmt_age, bytes as fmt_bytes};
use serde_yaml_ng::Value;

use deployers::batch::{BatchBackend, System};
use deployers::BackendKind;

use crate::config;
use crate::control::{self, Request, Status};
use crate::registry::{self, ClusterRecord};

/// Adaptive maximum when `--maximum` is not given: scaling is always bounded.
pub const DEFAULT_MAXIMUM: usize = 16;

/// `dask-ctl up`.
#[derive(clap::Args, Debug)]
pub struct UpArgs {
    /// Where workers run: local, ssh, slurm, sge, kubernetes or marathon.
    #[arg(long, default_value = "local")]
    backend: BackendKind,
    /// Cluster name (default: BACKEND-XXXX).
    #[arg(long)]
    name: Option<String>,
    /// Fixed number of workers (default for local: one per core).
    #[arg(long, conflicts_with = "adapt")]
    workers: Option<usize>,
    /// Scale with the load between --minimum and --maximum.
    #[arg(long)]
    adapt: bool,
    #[arg(long, default_value_t = 0, requires = "adapt")]
    minimum: usize,
    #[arg(long, default_value_t = DEFAULT_MAXIMUM, requires = "adapt")]
    maximum: usize,
    /// YAML file with a section per backend (default: ~/.config/dask-rs/cluster.yaml if present).
    #[arg(long)]
    config: Option<PathBuf>,
    /// Interface the scheduler listens on (default: 127.0.0.1; 0.0.0.0 for ssh, slurm, sge).
    #[arg(long)]
    host: Option<String>,
    /// Scheduler port (0 picks a free one).
    #[arg(long, default_value_t = 0)]
    port: u16,
    /// Where the web dashboard listens: HOST:PORT or :PORT (the scheduler's
    /// interface); a taken port is replaced by a free one.
    #[arg(long, default_value = ":8787")]
    dashboard_address: String,
    /// Serve no dashboard.
    #[arg(long)]
    no_dashboard: bool,
    /// Most workers (batch jobs) waiting to start at once (default 64).
    #[arg(long)]
    max_pending: Option<usize>,
    /// How long to wait for the workers to connect, e.g. 60s, 5m.
    #[arg(long, default_value = "120s", value_parser = humantime::parse_duration)]
    timeout: Duration,
    /// The Python that runs workers (default: python3 on PATH).
    #[arg(long)]
    python: Option<String>,
    /// Threads per worker process.
    #[arg(long)]
    nthreads: Option<u32>,
    /// Memory limit per worker process, e.g. 4GiB.
    #[arg(long)]
    memory_limit: Option<String>,
    /// Worker processes per job or host.
    #[arg(long)]
    processes: Option<u32>,
    /// Cores per job (batch backends).
    #[arg(long)]
    cores: Option<u32>,
    /// Memory per job (batch backends).
    #[arg(long)]
    memory: Option<String>,
    /// Wall-clock limit per job (batch backends).
    #[arg(long)]
    walltime: Option<String>,
    /// Queue or partition (batch backends).
    #[arg(long)]
    queue: Option<String>,
    /// Account or project (batch backends).
    #[arg(long)]
    account: Option<String>,
    /// Extra batch directive, e.g. --job-extra=--exclusive (repeatable).
    #[arg(long, allow_hyphen_values = true)]
    job_extra: Vec<String>,
    /// Shell line run before each worker starts (repeatable).
    #[arg(long)]
    prologue: Vec<String>,
    /// Extra arguments for the worker command, e.g. "--resources GPU=1".
    #[arg(long, allow_hyphen_values = true)]
    worker_extra_args: Option<String>,
    /// Scheduler address workers should connect to, if not the listening one
    /// (HOST or tcp://HOST:PORT; ssh default: the address each host sees us from;
    /// slurm/sge default: this machine's hostname).
    #[arg(long)]
    contact_address: Option<String>,
    /// Shell line run after the worker exits, in batch jobs (repeatable).
    #[arg(long)]
    epilogue: Vec<String>,
    /// Run without credentials (no token, no TLS): anyone who can reach the
    /// scheduler or a worker can then run code as you.
    #[arg(long)]
    insecure: bool,
    /// Keep the cluster's token but leave TLS off: connections are
    /// authenticated, not encrypted (faster for large transfers on a
    /// trusted network).
    #[arg(long, conflicts_with = "insecure")]
    no_tls: bool,
    /// Leave out generated batch directives containing this text (repeatable).
    #[arg(long, allow_hyphen_values = true)]
    job_directives_skip: Vec<String>,
    /// Where batch jobs write their output (default: the cluster's log directory).
    #[arg(long)]
    log_directory: Option<String>,
    /// Hosts for the ssh backend, comma-separated (ssh destinations: host, user@host, aliases).
    #[arg(long, value_delimiter = ',')]
    hosts: Vec<String>,
    /// Extra argument for every ssh call, e.g. --ssh-arg=-F --ssh-arg=~/.ssh/cluster_config (repeatable).
    #[arg(long = "ssh-arg", allow_hyphen_values = true)]
    ssh_args: Vec<String>,
    /// CPUs per worker, may be fractional (kubernetes request, marathon cpus).
    #[arg(long)]
    cpus: Option<f64>,
    /// Container image of the workers (kubernetes; marathon: optional Docker image).
    #[arg(long)]
    image: Option<String>,
    /// NAME=VALUE in every worker's environment (kubernetes, marathon; repeatable).
    #[arg(long)]
    env: Vec<String>,
    /// Kubernetes namespace (default: the context's, else default).
    #[arg(long)]
    namespace: Option<String>,
    /// Kubeconfig file (default: $KUBECONFIG, ~/.kube/config, or in-cluster).
    #[arg(long)]
    kubeconfig: Option<String>,
    /// Kubeconfig context (default: the current one).
    #[arg(long)]
    context: Option<String>,
    /// Service account of the worker pods.
    #[arg(long)]
    service_account: Option<String>,
    /// Pod CPU limit, e.g. 2 or 1500m (default: --cpus).
    #[arg(long)]
    cpu_limit: Option<String>,
    /// Pod memory limit (default: --memory).
    #[arg(long)]
    pod_memory_limit: Option<String>,
    /// KEY=VALUE node label the worker pods need (repeatable).
    #[arg(long = "node-selector")]
    node_selector: Vec<String>,
    /// Taint the worker pods tolerate: KEY=VALUE:EFFECT, KEY:EFFECT or KEY (repeatable).
    #[arg(long = "toleration")]
    tolerations: Vec<String>,
    /// Pod manifest (YAML or JSON) merged under the generated one.
    #[arg(long)]
    pod_template: Option<String>,
    /// Secret with registry credentials for the image (repeatable).
    #[arg(long = "image-pull-secret")]
    image_pull_secrets: Vec<String>,
    /// Marathon's URL, e.g. http://marathon.mesos:8080.
    #[arg(long)]
    marathon_url: Option<String>,
    /// Marathon app id of the workers (default: /dask-rs/NAME).
    #[arg(long)]
    app_id: Option<String>,
    /// File with USER:PASSWORD (basic auth) or a token, for Marathon.
    #[arg(long)]
    marathon_auth_file: Option<String>,
    /// Marathon constraint FIELD:OPERATOR[:VALUE], e.g. hostname:UNIQUE (repeatable).
    #[arg(long = "constraint")]
    constraints: Vec<String>,
}

impl UpArgs {
    fn flags(&self) -> BTreeMap<String, Value> {
        let mut m = BTreeMap::new();
        let mut s = |k: &str, v: &Option<String>| {
            if let Some(v) = v {
                m.insert(k.to_string(), Value::String(v.clone()));
            }
        };
        s("python", &self.python);
        s("memory_limit", &self.memory_limit);
        s("memory", &self.memory);
        s("walltime", &self.walltime);
        s("queue", &self.queue);
        s("account", &self.account);
        s("contact_address", &self.contact_address);
        s("log_directory", &self.log_directory);
        s("image", &self.image);
        s("namespace", &self.namespace);
        s("kubeconfig", &self.kubeconfig);
        s("context", &self.context);
        s("service_account", &self.service_account);
        s("cpu_limit", &self.cpu_limit);
        s("pod_memory_limit", &self.pod_memory_limit);
        s("pod_template", &self.pod_template);
        s("marathon_url", &self.marathon_url);
        s("app_id", &self.app_id);
        s("marathon_auth_file", &self.marathon_auth_file);
        if let Some(c) = self.cpus {
            m.insert("cpus".into(), Value::Number(c.into()));
        }
        for (k, v) in [("nthreads", self.nthreads), ("processes", self.processes), ("cores", self.cores)] {
            if let Some(v) = v {
                m.insert(k.to_string(), Value::Number(v.into()));
            }
        }
        let list = |v: &[String]| Value::Sequence(v.iter().cloned().map(Value::String).collect());
        if !self.job_extra.is_empty() {
            m.insert("job_extra".into(), list(&self.job_extra));
        }
        if !self.prologue.is_empty() {
            m.insert("prologue".into(), list(&self.prologue));
        }
        if !self.epilogue.is_empty() {
            m.insert("epilogue".into(), list(&self.epilogue));
        }
        if !self.job_directives_skip.is_empty() {
            m.insert("job_directives_skip".into(), list(&self.job_directives_skip));
        }
        if !self.hosts.is_empty() {
            m.insert("hosts".into(), list(&self.hosts));
        }
        for (k, v) in [
            ("ssh_args", &self.ssh_args),
            ("env", &self.env),
            ("node_selector", &self.node_selector),
            ("tolerations", &self.tolerations),
            ("image_pull_secrets", &self.image_pull_secrets),
            ("constraints", &self.constraints),
        ] {
            if !v.is_empty() {
                m.insert(k.into(), list(v));
            }
        }
        if let Some(a) = &self.worker_extra_args {
            let words: Vec<String> = a.split_whitespace().map(String::from).collect();
            m.insert("worker_extra_args".into(), list(&words));
        }
        m
    }
}

/// The Python must exist and import dask_rs.
fn check_python(python: &str) -> Result<String> {
    let path = config::which(python).ok_or_else(|| anyhow!("python {python:?} not found (set --python)"))?;
    let out = Command::new(&path)
        .args(["-c", "import dask_rs"])
        .stdin(Stdio::null())
        .output()
        .with_context(|| format!("cannot run {}", path.display()))?;
    if !out.status.success() {
        let err = String::from_utf8_lossy(&out.stderr);
        let last = err.lines().last().unwrap_or("").trim();
        bail!("{} cannot import dask_rs ({last}); install dask-rs into it or choose another --python", path.display());
    }
    Ok(path.to_string_lossy().into_owned())
}

/// Where the scheduler listens: `--host`, or every interface when workers
/// run on other machines.
fn listen_host(args: &UpArgs) -> String {
    match &args.host {
        Some(h) => h.clone(),
        None if args.backend.remote_workers() => "0.0.0.0".to_string(),
        None => "127.0.0.1".to_string(),
    }
}

fn hostname() -> String {
    let mut buf = [0u8; 256];
    // SAFETY: the buffer is valid for its length; gethostname NUL-terminates within it.
    let r = unsafe { libc::gethostname(buf.as_mut_ptr().cast(), buf.len()) };
    let end = buf.iter().position(|b| *b == 0).unwrap_or(buf.len());
    if r == 0 {
        String::from_utf8_lossy(&buf[..end]).into_owned()
    } else {
        "localhost".into()
    }
}

/// Batch commands on PATH, the Python checked (a warning only: compute nodes
/// may see another one), and the address jobs connect to.
fn prepare_batch(system: System, host: &str, options: &mut deployers::WorkerOptions) -> Result<()> {
    for c in system.commands() {
        if config::which(c).is_none() {
            bail!("the {} backend needs `{c}` on PATH (is {} installed here?)", system.name(), system.name());
        }
    }
    match check_python(&options.python) {
        Ok(p) => options.python = p,
        Err(e) => eprintln!("warning: {e} (here; jobs run it on their nodes)"),
    }
    default_contact(host, options);
    Ok(())
}

/// Batch jobs on other nodes reach a scheduler listening everywhere at this
/// machine's hostname, unless a contact address is set.
fn default_contact(host: &str, options: &mut deployers::WorkerOptions) {
    if options.contact_address.is_none() && cluster::comm::is_wildcard_host(host) {
        options.contact_address = Some(hostname());
    }
}

/// Marathon answers with the given credentials; the Python is checked here
/// only as a warning (agents may have another one).
fn prepare_marathon(host: &str, options: &mut deployers::WorkerOptions) -> Result<()> {
    let url = options.marathon_url.as_deref().ok_or_else(|| {
        anyhow!("the marathon backend needs --marathon-url (or marathon_url in the config file's marathon section)")
    })?;
    let m = deployers::marathon::Marathon::new(url, options.marathon_auth_file.as_deref())?;
    let version = m.info().map_err(|e| anyhow!("{e}"))?;
    tracing::debug!("{version} at {url}");
    if options.image.is_none() {
        match check_python(&options.python) {
            Ok(p) => options.python = p,
            Err(e) => eprintln!("warning: {e} (here; Marathon tasks run it on their agents)"),
        }
    }
    default_contact(host, options);
    Ok(())
}

/// The cluster's name can name Kubernetes objects and an image is given;
/// pods reach the scheduler at this pod's IP (`POD_IP`, from the downward
/// API) when `up` runs inside the cluster, else at this machine's hostname.
fn prepare_kubernetes(name: &str, host: &str, merged: &mut config::Merged) -> Result<()> {
    deployers::kubernetes::check_name(name).map_err(|e| anyhow!("{e}"))?;
    // A path on this machine means nothing inside the image.
    if merged.sources.get("python").is_none_or(|(_, source)| *source == config::Source::Default) {
        merged.options.python = "python3".into();
    }
    let options = &mut merged.options;
    if options.image.as_deref().unwrap_or("").is_empty() {
        bail!("the kubernetes backend needs --image: an image with Python and dask-rs installed");
    }
    if options.contact_address.is_none() && cluster::comm::is_wildcard_host(host) {
        if let Some(ip) = std::env::var("POD_IP").ok().filter(|v| !v.is_empty()) {
            options.contact_address = Some(ip);
        }
    }
    default_contact(host, options);
    Ok(())
}

/// Ask the batch system whether it accepts this cluster's jobs (bad
/// partition, queue or account) before anything starts.
fn verify_batch(system: System, options: &deployers::WorkerOptions) -> Result<()> {
    let tmp = std::env::temp_dir().join(format!("dask-ctl-verify-{}", std::process::id()));
    let b = BatchBackend::new(system, options.clone(), "tcp://127.0.0.1:8786", "verify", tmp.clone(), tmp.clone())?;
    let r = b.verify();
    let _ = std::fs::remove_dir_all(&tmp);
    r.map_err(|e| anyhow!("{e}"))
}

/// `dask-ctl job-script`: the script `up` would submit for one worker.
pub fn job_script(args: UpArgs) -> Result<()> {
    if args.backend == BackendKind::Marathon {
        return marathon_app(args);
    }
    if args.backend == BackendKind::Kubernetes {
        return kubernetes_manifests(args);
    }
    let Some(system) = args.backend.batch_system() else {
        bail!("job-script is for batch backends (slurm, sge) and marathon, not {}", args.backend);
    };
    let file = args.config.clone().or_else(config::default_file);
    let mut merged = config::merge(args.backend, file.as_deref(), &args.flags())?;
    let host = listen_host(&args);
    default_contact(&host, &mut merged.options);
    let name = args.name.clone().unwrap_or_else(|| format!("{}-XXXX", args.backend));
    let port = if args.port == 0 { 8786 } else { args.port };
    let dir = registry::dir(&name)?;
    let logs = registry::log_dir(&dir);
    let (scheme, credentials) = match (args.insecure, args.no_tls) {
        (true, _) => ("tcp", deployers::Credentials::none()),
        (false, no_tls) => {
            let tls = (!no_tls).then(|| registry::tls_files(&dir));
            let scheme = if tls.is_some() { "tls" } else { "tcp" };
            (scheme, deployers::Credentials { token_file: Some(registry::token_file(&dir)), tls })
        }
    };
    let b = BatchBackend::new(system, merged.options, &format!("{scheme}://{host}:{port}"), &name, logs.clone(), logs)?
        .with_credentials(credentials);
    print!("{}", b.script(&format!("{name}-0")));
    if args.port == 0 {
        eprintln!("(the scheduler port is chosen by `up`; pass --port to fix it)");
    }
    Ok(())
}

/// The scheduler address and credentials `up` would give workers, for
/// `job-script` (the port is `--port` or the default 8786).
fn planned_credentials(args: &UpArgs, dir: &Path) -> (String, deployers::Credentials) {
    let host = listen_host(args);
    let port = if args.port == 0 { 8786 } else { args.port };
    let (scheme, credentials) = match (args.insecure, args.no_tls) {
        (true, _) => ("tcp", deployers::Credentials::none()),
        (false, no_tls) => {
            let tls = (!no_tls).then(|| registry::tls_files(dir));
            let scheme = if tls.is_some() { "tls" } else { "tcp" };
            (scheme, deployers::Credentials { token_file: Some(registry::token_file(dir)), tls })
        }
    };
    (format!("{scheme}://{host}:{port}"), credentials)
}

/// `dask-ctl job-script --backend kubernetes`: the manifests `up` creates
/// (the Secret's contents are made by `up`).
fn kubernetes_manifests(args: UpArgs) -> Result<()> {
    let file = args.config.clone().or_else(config::default_file);
    let mut merged = config::merge(args.backend, file.as_deref(), &args.flags())?;
    let name = args.name.clone().unwrap_or_else(|| "kubernetes-xxxx".into());
    prepare_kubernetes(&name, &listen_host(&args), &mut merged)?;
    let (address, credentials) = planned_credentials(&args, &registry::dir(&name)?);
    print!("{}", deployers::kubernetes::render(&name, &merged.options, &address, !credentials.is_empty())?);
    if args.port == 0 {
        eprintln!("(the scheduler port is chosen by `up`; pass --port to fix it)");
    }
    Ok(())
}

/// `dask-ctl job-script --backend marathon`: the app definition `up` creates.
fn marathon_app(args: UpArgs) -> Result<()> {
    let file = args.config.clone().or_else(config::default_file);
    let mut merged = config::merge(args.backend, file.as_deref(), &args.flags())?;
    default_contact(&listen_host(&args), &mut merged.options);
    let name = args.name.clone().unwrap_or_else(|| format!("{}-XXXX", args.backend));
    let (address, credentials) = planned_credentials(&args, &registry::dir(&name)?);
    let opts = &merged.options;
    let app_id = opts.app_id.clone().unwrap_or_else(|| deployers::marathon::default_app_id(&name));
    let app = deployers::marathon::app_definition(opts, &app_id, &name, &opts.contact(&address), &credentials)?;
    println!("{}", serde_json::to_string_pretty(&app)?);
    if args.port == 0 {
        eprintln!("(the scheduler port is chosen by `up`; pass --port to fix it)");
    }
    Ok(())
}

/// Every ssh host answers and imports dask_rs with the configured Python
/// (checked in parallel; all failures are reported together).
fn check_ssh_hosts(options: &deployers::WorkerOptions) -> Result<()> {
    if options.hosts.is_empty() {
        bail!("the ssh backend needs hosts: --hosts HOST1,HOST2 or `hosts:` in the ssh section of the config");
    }
    if let Some(h) = options.hosts.iter().find(|h| h.starts_with('-') || h.trim().is_empty()) {
        bail!("invalid host {h:?}");
    }
    if config::which("ssh").is_none() {
        bail!("the ssh backend needs the `ssh` command on PATH");
    }
    let results: Vec<(String, Result<String, String>)> = std::thread::scope(|s| {
        let handles: Vec<_> = options
            .hosts
            .iter()
            .map(|h| (h.clone(), s.spawn(move || deployers::ssh::check_host(options, h))))
            .collect();
        handles.into_iter().map(|(h, t)| (h, t.join().unwrap_or_else(|_| Err("check panicked".into())))).collect()
    });
    let errors: Vec<String> = results.iter().filter_map(|(_, r)| r.clone().err()).collect();
    if !errors.is_empty() {
        bail!("{}", errors.join("\n"));
    }
    for (h, r) in results {
        tracing::debug!("ssh host {h} ok ({})", r.unwrap_or_default());
    }
    Ok(())
}

fn random_suffix() -> String {
    let n = SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.subsec_nanos()).unwrap_or(0) ^ std::process::id();
    format!("{:04x}", n & 0xffff)
}

fn tail(path: &Path, lines: usize) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let v: Vec<&str> = text.lines().collect();
    v[v.len().saturating_sub(lines)..].join("\n")
}

/// `dask-ctl up`.
pub fn up(args: UpArgs) -> Result<()> {
    let name = args.name.clone().unwrap_or_else(|| format!("{}-{}", args.backend, random_suffix()));
    let dir = registry::dir(&name)?;
    if dir.join("cluster.json").exists() {
        let rec = ClusterRecord::load(&dir)?;
        if rec.manager_alive() {
            bail!(
                "a cluster named {name:?} already exists ({}); choose another --name or run `dask-ctl down {name}`",
                rec.address.unwrap_or_default()
            );
        }
        bail!(
            "a cluster named {name:?} is registered but its manager is not running; run `dask-ctl down {name}` first"
        );
    }
    let file = args.config.clone().or_else(config::default_file);
    let mut merged = config::merge(args.backend, file.as_deref(), &args.flags())?;
    let host = listen_host(&args);
    match args.backend.batch_system() {
        Some(system) => {
            prepare_batch(system, &host, &mut merged.options)?;
            verify_batch(system, &merged.options)?;
        }
        None if args.backend == BackendKind::Ssh => check_ssh_hosts(&merged.options)?,
        None if args.backend == BackendKind::Marathon => prepare_marathon(&host, &mut merged.options)?,
        None if args.backend == BackendKind::Kubernetes => prepare_kubernetes(&name, &host, &mut merged)?,
        None => merged.options.python = check_python(&merged.options.python)?,
    }
    if args.port != 0 {
        std::net::TcpListener::bind((host.as_str(), args.port))
            .map_err(|e| anyhow!("port {} on {host} is not available: {e}", args.port))?;
    }
    let (workers, adapt) = if args.adapt {
        if args.maximum < args.minimum {
            bail!("--maximum {} is below --minimum {}", args.maximum, args.minimum);
        }
        (None, Some((args.minimum, args.maximum)))
    } else {
        let default = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1);
        (Some(args.workers.unwrap_or(default)), None)
    };
    let rec = ClusterRecord {
        name: name.clone(),
        backend: args.backend,
        created: cluster::now(),
        options: merged.options,
        workers,
        adapt,
        host,
        port: args.port,
        address: None,
        dashboard: None,
        dashboard_address: (!args.no_dashboard).then(|| args.dashboard_address.clone()),
        manager_pid: None,
        manager_start: None,
        max_pending: args.max_pending,
    };
    // A Unix socket's path has at most 107 bytes: say so now (after the
    // other checks), not from the manager.
    let socket = registry::socket(&dir);
    if socket.as_os_str().len() > 107 {
        bail!(
            "the control socket {} would be {} bytes long, and Unix sockets allow 107: choose a shorter --name \
             or set XDG_STATE_HOME to a shorter directory",
            socket.display(),
            socket.as_os_str().len()
        );
    }
    registry::create_private(&dir)?;
    std::fs::create_dir_all(registry::log_dir(&dir)).with_context(|| format!("creating {}", dir.display()))?;
    if args.insecure {
        eprintln!(
            "warning: {name} runs without credentials (--insecure): anyone who can reach its scheduler or \
             workers can run code as you"
        );
    } else {
        let token = cluster::security::Security::generate()?;
        token.write_token_file(&registry::token_file(&dir)).context("writing the cluster's token")?;
        if !args.no_tls {
            // Named as registry::tls_files expects.
            cluster::tls::TlsFiles::generate(&dir).context("making the cluster's certificates")?;
        }
    }
    rec.save(&dir)?;

    // The manager runs detached in its own session, so closing this shell
    // (or Ctrl-C here) does not stop the cluster.
    let log_path = registry::log_dir(&dir).join("manager.log");
    let log = std::fs::File::create(&log_path)?;
    let mut cmd = Command::new(std::env::current_exe()?);
    cmd.arg("manager").arg(&dir).stdin(Stdio::null()).stdout(log.try_clone()?).stderr(log);
    // SAFETY: setsid is async-signal-safe and touches no memory of this process.
    unsafe {
        cmd.pre_exec(|| {
            libc::setsid();
            Ok(())
        });
    }
    let mut child = cmd.spawn().context("cannot start the cluster manager")?;

    let deadline = Instant::now() + Duration::from_secs(30);
    let address = loop {
        if let Some(status) = child.try_wait()? {
            let log = tail(&log_path, 20);
            let _ = std::fs::remove_dir_all(&dir);
            bail!("the cluster manager exited ({status}):\n{log}");
        }
        if let Some(a) = ClusterRecord::load(&dir).ok().and_then(|r| r.address) {
            break a;
        }
        if Instant::now() > deadline {
            bail!("the cluster manager did not start its scheduler within 30 s; see {}", log_path.display());
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    if let Some(n) = workers.filter(|n| *n > 0) {
        wait_for_workers(&dir, &name, n, args.timeout)?;
    }
    println!("Cluster {name} is up ({} backend)", rec.backend);
    println!("  scheduler: {address}");
    match ClusterRecord::load(&dir).ok().and_then(|r| r.dashboard) {
        Some(url) => println!("  dashboard: {url}"),
        None => println!("  dashboard: none (--no-dashboard)"),
    }
    match (workers, adapt) {
        (Some(n), _) => println!("  workers:   {n} (fixed; `dask-ctl scale {name} N` to change)"),
        (_, Some((lo, hi))) => println!("  workers:   adaptive, {lo} to {hi}"),
        _ => {}
    }
    println!();
    print!("{}", snippet_text(&name, &address, &dir));
    Ok(())
}

/// Wait for `n` workers to connect, showing progress and why workers fail;
/// gives up early when every attempt fails three times over.
fn wait_for_workers(dir: &Path, name: &str, n: usize, timeout: Duration) -> Result<()> {
    let deadline = Instant::now() + timeout;
    let tty = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let mut last = usize::MAX;
    let mut seen_failures = 0;
    let give_up = |msg: String| -> Result<()> {
        if tty {
            eprintln!();
        }
        bail!("{msg}; the cluster stays up: see `dask-ctl status {name}` and `dask-ctl logs {name}`")
    };
    loop {
        let st = control::request(dir, &Request::Status, Duration::from_secs(10))?
            .status
            .ok_or_else(|| anyhow!("the manager of {name} did not answer"))?;
        let failures: Vec<&str> = st
            .decisions
            .iter()
            .filter(|d| d.kind == "worker_failed" || d.kind == "backend_error")
            .map(|d| d.reason.as_str())
            .collect();
        for f in failures.iter().skip(seen_failures) {
            if tty {
                eprintln!();
            }
            eprintln!("warning: {f}");
            last = usize::MAX;
        }
        seen_failures = failures.len();
        let have = st.running;
        if have != last {
            if tty {
                eprint!("\rworkers connected: {have}/{n}");
            } else {
                eprintln!("workers connected: {have}/{n}");
            }
            let _ = std::io::stderr().flush();
            last = have;
        }
        if have >= n {
            if tty {
                eprintln!();
            }
            return Ok(());
        }
        if have == 0 {
            if let Some(d) = st.decisions.iter().rev().find(|d| d.kind == "backend_error") {
                return give_up(d.reason.clone());
            }
        }
        if have == 0 && failures.len() >= 3 * n {
            return give_up(format!("workers keep failing before they connect ({} attempts)", failures.len()));
        }
        if Instant::now() > deadline {
            return give_up(format!(
                "only {have} of {n} workers connected within {}",
                humantime::format_duration(timeout)
            ));
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// How to connect, here and (for a protected cluster in `dir`) elsewhere.
fn snippet_text(name: &str, address: &str, dir: &Path) -> String {
    let mut s = format!("    from dask_rs import Client\n    client = Client(\"{name}\")\n");
    let creds = registry::credentials(dir);
    if creds.is_empty() {
        s += &format!("    # or from anywhere: Client(\"{address}\")\n");
    } else {
        let files = if creds.tls.is_some() { "token, ca.pem, cert.pem and key.pem" } else { "token" };
        s += &format!(
            "    # from another machine, with a private copy of {files} from {}:\n    \
             #   from dask_rs import Security\n    \
             #   client = Client(\"{address}\", security=Security.from_directory(\"COPY\"))\n",
            dir.display()
        );
    }
    s
}

/// A live cluster's status, or why there is none.
/// The manager's answer to `status`, or why there is none.
pub fn live_status(dir: &Path, rec: &ClusterRecord) -> Result<Status> {
    if !rec.manager_alive() {
        bail!(
            "the manager of {} is not running (pid {:?}); `dask-ctl down {}` cleans up",
            rec.name,
            rec.manager_pid,
            rec.name
        );
    }
    let r = control::request(dir, &Request::Status, Duration::from_secs(5))?;
    r.status.ok_or_else(|| anyhow!("{}", r.error))
}

/// `dask-ctl list`.
pub fn list(json: bool) -> Result<()> {
    let mut rows = Vec::new();
    for (dir, rec) in registry::list() {
        let st = live_status(&dir, &rec);
        let status = match (&st, rec.manager_alive()) {
            (Ok(_), _) => "running".to_string(),
            (Err(_), true) => "unresponsive".to_string(),
            (Err(_), false) => "dead".to_string(),
        };
        rows.push((rec, st.ok(), status));
    }
    if json {
        let v: Vec<serde_json::Value> = rows
            .iter()
            .map(|(rec, st, status)| {
                serde_json::json!({
                    "name": rec.name,
                    "backend": rec.backend,
                    "address": rec.address,
                    "dashboard": rec.dashboard,
                    "workers": st.as_ref().map_or(0, |s| s.running),
                    "pending": st.as_ref().map_or(0, |s| s.pending),
                    "threads": st.as_ref().map_or(0, |s| s.threads),
                    "memory": st.as_ref().map_or(0, |s| s.memory_limit),
                    "tasks": st.as_ref().map_or(0, |s| s.tasks),
                    "policy": st.as_ref().map(|s| s.policy.clone()),
                    "created": rec.created,
                    "status": status,
                })
            })
            .collect();
        println!("{}", serde_json::to_string_pretty(&v)?);
        return Ok(());
    }
    if rows.is_empty() {
        println!("No clusters. Start one with `dask-ctl up`.");
        return Ok(());
    }
    println!(
        "{:<20} {:<8} {:<24} {:>9} {:>7} {:>10} {:>7} {:>6}  {:<32} STATUS",
        "NAME", "BACKEND", "ADDRESS", "WORKERS", "THREADS", "MEMORY", "TASKS", "AGE", "DASHBOARD"
    );
    let now = cluster::now();
    for (rec, st, status) in rows {
        let (workers, threads, memory, tasks) = match &st {
            Some(s) => (
                format!("{}/{}", s.running, s.pending),
                s.threads.to_string(),
                fmt_bytes(s.memory_limit),
                s.tasks.to_string(),
            ),
            None => ("-".into(), "-".into(), "-".into(), "-".into()),
        };
        println!(
            "{:<20} {:<8} {:<24} {:>9} {:>7} {:>10} {:>7} {:>6}  {:<32} {status}",
            rec.name,
            rec.backend,
            rec.address.clone().unwrap_or_else(|| "-".into()),
            workers,
            threads,
            memory,
            tasks,
            fmt_age(now - rec.created),
            rec.dashboard.clone().unwrap_or_else(|| "-".into()),
        );
    }
    println!("(WORKERS = running/pending)");
    Ok(())
}

/// `dask-ctl status NAME`.
pub fn status(name: &str, json: bool) -> Result<()> {
    let (dir, rec) = registry::find(name)?;
    let st = live_status(&dir, &rec)?;
    if json {
        println!("{}", serde_json::to_string_pretty(&st)?);
        return Ok(());
    }
    println!("Cluster {} ({} backend), up {}", st.name, st.backend, fmt_age(cluster::now() - rec.created));
    println!("  scheduler: {}", st.address);
    println!("  dashboard: {}", st.dashboard.as_deref().unwrap_or("-"));
    println!("  scaling:   {}", st.policy);
    println!(
        "  workers:   {} running, {} pending; {} threads, {} memory limit, {} managed",
        st.running,
        st.pending,
        st.threads,
        fmt_bytes(st.memory_limit),
        fmt_bytes(st.managed)
    );
    println!("  tasks:     {}", st.tasks);
    println!();
    println!(
        "{:<24} {:<9} {:<24} {:>7} {:>10} {:>10} {:>10}  DETAIL",
        "WORKER", "STATE", "ADDRESS", "THREADS", "MEMORY", "MANAGED", "PROCESSING"
    );
    for w in &st.workers {
        println!(
            "{:<24} {:<9} {:<24} {:>7} {:>10} {:>10} {:>10}  {}",
            w.name,
            w.state,
            if w.address.is_empty() { "-" } else { &w.address },
            w.nthreads,
            fmt_bytes(w.memory_limit),
            fmt_bytes(w.managed),
            w.processing,
            w.detail
        );
    }
    if !st.decisions.is_empty() {
        println!();
        println!("Recent scaling decisions:");
        for d in st.decisions.iter().rev().take(10).rev() {
            println!(
                "  {:>6} ago  {:<14} target {:<3} requested {:<3} running {:<3} pending {:<3} {}",
                fmt_age(cluster::now() - d.time),
                d.kind,
                d.target,
                d.requested,
                d.running,
                d.pending,
                d.reason
            );
        }
    }
    Ok(())
}

/// Send `req` to the manager of cluster `name`.
pub fn send(name: &str, req: Request) -> Result<()> {
    let (dir, rec) = registry::find(name)?;
    if !rec.manager_alive() {
        bail!("the manager of {name} is not running; `dask-ctl down {name}` cleans up");
    }
    let r = control::request(&dir, &req, Duration::from_secs(30))?;
    if !r.ok {
        bail!("{}", r.error);
    }
    Ok(())
}

/// `dask-ctl scale NAME N`.
pub fn scale(name: &str, n: usize) -> Result<()> {
    send(name, Request::Scale { n })?;
    println!("Scaling {name} to {n} workers");
    Ok(())
}

/// `dask-ctl adapt NAME --minimum A --maximum B`.
pub fn adapt(name: &str, minimum: usize, maximum: usize) -> Result<()> {
    if maximum < minimum {
        bail!("--maximum {maximum} is below --minimum {minimum}");
    }
    send(name, Request::Adapt { minimum, maximum })?;
    println!("Scaling {name} adaptively between {minimum} and {maximum} workers");
    Ok(())
}

/// `dask-ctl down NAME`: through the manager when it runs, from the
/// registry's records when it does not; then checks nothing is left.
pub fn down(name: &str) -> Result<()> {
    if registry::find(name).is_ok_and(|(_, rec)| !rec.manager_alive()) {
        println!("The manager of {name} is not running; removing what it started");
    }
    let (summary, notes) = stop_cluster(name)?;
    for n in &notes {
        eprintln!("warning: {n}");
    }
    println!("{summary}");
    Ok(())
}

/// Stop cluster `name` (see [`down`]) without printing: the summary line and
/// the warnings met on the way.
pub fn stop_cluster(name: &str) -> Result<(String, Vec<String>)> {
    let (dir, rec) = registry::find(name)?;
    let owned = registry::load_owned(&dir);
    let mut notes = Vec::new();
    if rec.manager_alive() {
        let pid = rec.manager_pid.expect("alive implies a pid");
        match control::request(&dir, &Request::Down, Duration::from_secs(120)) {
            Ok(r) if !r.ok => notes.push(r.error),
            Ok(_) => {}
            Err(e) => notes.push(format!("manager did not answer ({e}); stopping it")),
        }
        if deployers::process::terminate(pid, rec.manager_start, Duration::from_secs(30)).is_err() {
            notes.push(format!("manager pid {pid} would not stop"));
        }
    }
    for e in deployers::cleanup(&owned) {
        notes.push(e);
    }
    let alive = deployers::any_alive(&owned);
    if dir.exists() {
        std::fs::remove_dir_all(&dir).with_context(|| format!("removing {}", dir.display()))?;
    }
    if !alive.is_empty() {
        bail!("still running after down: {}", alive.join(", "));
    }
    let jobs = owned.iter().filter(|o| matches!(o, deployers::Owned::Job { .. })).count();
    let what =
        if jobs > 0 { format!("{jobs} batch job(s) cancelled") } else { format!("{} worker(s) stopped", owned.len()) };
    Ok((format!("Cluster {name} is down ({what}, scheduler stopped)"), notes))
}

/// `dask-ctl logs NAME [WORKER]`.
pub fn logs(name: &str, worker: Option<&str>) -> Result<()> {
    let (dir, _) = registry::find(name)?;
    let logs = registry::log_dir(&dir);
    let file = logs.join(format!("{}.log", worker.unwrap_or("manager")));
    match std::fs::read_to_string(&file) {
        Ok(text) => {
            print!("{text}");
            Ok(())
        }
        Err(_) => {
            let mut known: Vec<String> = std::fs::read_dir(&logs)
                .map(|rd| {
                    rd.flatten()
                        .filter_map(|e| e.file_name().to_str().and_then(|n| n.strip_suffix(".log")).map(String::from))
                        .filter(|n| n != "manager")
                        .collect()
                })
                .unwrap_or_default();
            known.sort();
            bail!("no log for {:?} in {name} (workers with logs: {})", worker.unwrap_or("manager"), known.join(", "))
        }
    }
}

/// `dask-ctl snippet NAME`.
pub fn snippet(name: &str) -> Result<()> {
    let (dir, rec) = registry::find(name)?;
    let address = rec.address.ok_or_else(|| anyhow!("{name} has no scheduler address yet"))?;
    print!("{}", snippet_text(name, &address, &dir));
    Ok(())
}
