//! `dask-ctl`: the operator's command line for dask-rs.
//!
//! A thin binary: argument parsing and process lifecycle. The runtime lives in
//! the `cluster` crate, scaling in `adaptive`, backends in `deployers`; this
//! crate adds the cluster registry, the config merge, the detached manager and
//! the lifecycle commands (`up`, `list`, `status`, `scale`, `adapt`, `down`...).

/// Rust-side allocations (scheduler state, messages, frames) use mimalloc:
/// glibc's per-thread arenas kept growing and trimming their heaps under a
/// stream of short tasks, and the page faults cost a third of throughput.
#[global_allocator]
static ALLOC: mimalloc::MiMalloc = mimalloc::MiMalloc;

mod config;
mod console;
mod control;
mod ctl;
mod manager;
mod registry;

use std::io::Write;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result};
use clap::{CommandFactory, Parser, Subcommand};
use cluster::scheduler::{self, SchedulerConfig};

#[derive(Parser)]
#[command(
    name = "dask-ctl",
    version,
    about = "Run and manage dask-rs clusters",
    long_about = "Run and manage dask-rs clusters.\n\n`dask-ctl up` starts a cluster that outlives the shell; `list`, `status`, \
                  `scale`, `adapt`, `logs`, `snippet` and `down` manage it by name from any shell. Python clients \
                  connect with `Client(\"NAME\")`."
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Start a cluster (scheduler, workers and scaling) that outlives this shell.
    Up(Box<ctl::UpArgs>),
    /// List registered clusters.
    List {
        /// Print a JSON array instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Show a cluster's workers, scaling policy and recent decisions.
    Status {
        name: String,
        #[arg(long)]
        json: bool,
    },
    /// Set a fixed number of workers (turns adaptive scaling off).
    Scale { name: String, workers: usize },
    /// Scale with the load between a minimum and a maximum.
    Adapt {
        name: String,
        #[arg(long, default_value_t = 0)]
        minimum: usize,
        #[arg(long, default_value_t = ctl::DEFAULT_MAXIMUM)]
        maximum: usize,
    },
    /// Stop a cluster: every worker, the scheduler and its manager.
    Down { name: String },
    /// Print the manager's log, or one worker's.
    Logs { name: String, worker: Option<String> },
    /// Print Python code that connects to a cluster.
    Snippet { name: String },
    /// The terminal console: every cluster, or one (NAME or tcp://HOST:PORT),
    /// live. Keys: ? help, : command (:scale N, :adapt MIN MAX, :retire
    /// WORKER, :down, :clusters), / filter, j/k, Enter, Esc, s sort, q quit.
    /// NO_COLOR turns colours off.
    Tui {
        /// A registered cluster's name or a scheduler address to open at once.
        target: Option<String>,
        /// Refuse every command that changes a cluster.
        #[arg(long)]
        readonly: bool,
        /// For a scheduler address: a private directory holding the cluster's
        /// `token` (and `ca.pem`, `cert.pem`, `key.pem` for TLS), as `dask-ctl up`
        /// keeps them and Python's `Security.to_directory` writes them
        /// (default: `DASK_RS_TOKEN*`/`DASK_RS_TLS_*`).
        #[arg(long, value_name = "DIR")]
        credentials: Option<std::path::PathBuf>,
    },
    /// Print what `up` would create for one worker: the batch job script
    /// (slurm, sge), the app definition (marathon) or the manifests (kubernetes).
    JobScript(Box<ctl::UpArgs>),
    /// Show backend options merged from the config file, DASK_RS_* variables and flags.
    Config {
        #[command(subcommand)]
        command: ConfigCommand,
    },
    /// Print shell completions (bash, zsh, fish, elvish, powershell).
    Completions { shell: clap_complete::Shell },
    /// Run a cluster's manager (started by `up`; not for direct use).
    #[command(hide = true)]
    Manager { dir: std::path::PathBuf },
    /// Run a scheduler in the foreground (pure Rust, no Python needed).
    Scheduler {
        /// Interface to listen on.
        #[arg(long, default_value = "127.0.0.1")]
        host: String,
        /// Port to listen on (0 picks a free port).
        #[arg(long, default_value_t = 8786)]
        port: u16,
        /// Root tasks in flight per worker thread; "inf" disables queuing.
        #[arg(long, default_value = "1.1")]
        worker_saturation: f64,
        /// A worker silent this long is removed, e.g. 60s, 5m.
        #[arg(long, default_value = "60s", value_parser = humantime::parse_duration)]
        worker_ttl: Duration,
        /// Worker deaths a task may cause before it errs with KilledWorker.
        #[arg(long, default_value_t = 3)]
        allowed_failures: u32,
        /// Do not move waiting tasks from saturated workers to idle ones.
        #[arg(long)]
        no_work_stealing: bool,
        /// Where the web dashboard listens: HOST:PORT or :PORT (the
        /// scheduler's interface); a taken port is replaced by a free one.
        #[arg(long, default_value = ":8787")]
        dashboard_address: String,
        /// Serve no dashboard.
        #[arg(long)]
        no_dashboard: bool,
        #[command(flatten)]
        tls: TlsArgs,
    },
    /// Run a worker without Python whose tasks sleep and return zero bytes
    /// (measures the runtime alone).
    SimWorker {
        /// Scheduler address, tcp://HOST:PORT or tls://HOST:PORT.
        scheduler: String,
        #[arg(long, default_value_t = 1)]
        nthreads: usize,
        #[arg(long)]
        name: Option<String>,
        /// How long each task takes, e.g. 0ms, 10ms, 1s.
        #[arg(long, default_value = "0ms", value_parser = humantime::parse_duration)]
        duration: Duration,
        /// Bytes each task returns.
        #[arg(long, default_value_t = 8)]
        result_size: u64,
        /// Simulated workers in this process, each with its own connections
        /// and data port (named NAME-0, NAME-1, ...).
        #[arg(long, default_value_t = 1)]
        count: usize,
        #[command(flatten)]
        tls: TlsArgs,
    },
}

/// TLS files, as distributed's CLI names them (or `DASK_RS_TLS_CA_FILE`,
/// `DASK_RS_TLS_CERT`, `DASK_RS_TLS_KEY`). With them, the process listens on
/// `tls://` and opens only TLS connections.
#[derive(clap::Args)]
struct TlsArgs {
    /// The cluster's CA certificate (PEM).
    #[arg(long, requires = "tls_cert")]
    tls_ca_file: Option<std::path::PathBuf>,
    /// This process's certificate (PEM).
    #[arg(long, requires = "tls_ca_file")]
    tls_cert: Option<std::path::PathBuf>,
    /// This process's private key (PEM, readable by its owner only); default: the certificate file.
    #[arg(long, requires = "tls_cert")]
    tls_key: Option<std::path::PathBuf>,
}

impl TlsArgs {
    /// The credentials from the environment, with these files' TLS on top.
    fn security(self) -> Result<cluster::security::Security> {
        let security = cluster::security::Security::from_env()?;
        let (Some(ca), Some(cert)) = (self.tls_ca_file, self.tls_cert) else { return Ok(security) };
        let key = self.tls_key.unwrap_or_else(|| cert.clone());
        let tls = cluster::tls::Tls::load(cluster::tls::TlsFiles { ca, cert, key })?;
        Ok(security.with_tls(tls))
    }
}

#[derive(Subcommand)]
enum ConfigCommand {
    /// Print the merged options and where each value came from.
    Show {
        #[arg(long, default_value = "local")]
        backend: deployers::BackendKind,
        /// YAML file with a section per backend (default: ~/.config/dask-rs/cluster.yaml if present).
        #[arg(long)]
        config: Option<std::path::PathBuf>,
    },
}

fn main() -> Result<()> {
    {
        use tracing_subscriber::prelude::*;
        let filter = tracing_subscriber::EnvFilter::try_from_env("DASK_RS_LOG").unwrap_or_else(|_| "warn".into());
        tracing_subscriber::registry()
            .with(tracing_subscriber::fmt::layer().with_writer(std::io::stderr).with_filter(filter))
            .with(dashboard::logbook::layer())
            .init();
    }
    let cli = Cli::parse();
    let rt = || tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build();
    match cli.command {
        Command::Up(args) => ctl::up(*args),
        Command::List { json } => ctl::list(json),
        Command::Status { name, json } => ctl::status(&name, json),
        Command::Scale { name, workers } => ctl::scale(&name, workers),
        Command::Adapt { name, minimum, maximum } => ctl::adapt(&name, minimum, maximum),
        Command::Down { name } => ctl::down(&name),
        Command::Logs { name, worker } => ctl::logs(&name, worker.as_deref()),
        Command::Snippet { name } => ctl::snippet(&name),
        Command::Tui { target, readonly, credentials } => {
            let no_color = std::env::var_os("NO_COLOR").is_some_and(|v| !v.is_empty());
            let options = tui::Options { open: target, readonly, no_color };
            Ok(tui::run(options, Box::new(console::Registry { credentials }))?)
        }
        Command::JobScript(args) => ctl::job_script(*args),
        Command::Config { command: ConfigCommand::Show { backend, config } } => {
            let file = config.or_else(config::default_file);
            let merged = config::merge(backend, file.as_deref(), &Default::default())?;
            print!("{}", config::render(backend, &merged));
            Ok(())
        }
        Command::Completions { shell } => {
            clap_complete::generate(shell, &mut Cli::command(), "dask-ctl", &mut std::io::stdout());
            Ok(())
        }
        Command::Manager { dir } => {
            // Its log is read by `up` and by people: the error, without a backtrace.
            if let Err(e) = manager::run(dir) {
                eprintln!("Error: {e:#}");
                std::process::exit(1);
            }
            Ok(())
        }
        Command::Scheduler {
            host,
            port,
            worker_saturation,
            worker_ttl,
            allowed_failures,
            no_work_stealing,
            dashboard_address,
            no_dashboard,
            tls,
        } => {
            let config = SchedulerConfig {
                worker_saturation,
                worker_ttl,
                allowed_failures,
                work_stealing: !no_work_stealing,
                ..Default::default()
            };
            let dashboard = (!no_dashboard).then_some(dashboard_address);
            let security = tls.security()?;
            rt()?.block_on(run_scheduler(host, port, config, dashboard, security))
        }
        Command::SimWorker { scheduler, nthreads, name, duration, result_size, count, tls } => {
            let security = tls.security()?;
            let sim = SimWorkers { scheduler, nthreads, name, duration, result_size, count };
            rt()?.block_on(run_sim_workers(sim, security))
        }
    }
}

async fn run_scheduler(
    host: String,
    port: u16,
    config: SchedulerConfig,
    dashboard: Option<String>,
    security: cluster::security::Security,
) -> Result<()> {
    let mut facts = config.describe();
    facts.extend(scheduler::describe_security(&security));
    let handle = scheduler::start(&host, port, config, security.clone())
        .await
        .with_context(|| format!("cannot listen on {host}:{port}"))?;
    let stop = shutdown_signal();
    println!("Scheduler at {}", handle.address);
    let _dashboard = match dashboard {
        Some(at) => {
            let address = handle.address.clone();
            let d = tokio::task::spawn_blocking(move || dashboard::Dashboard::start(&address, &at, &host, &security))
                .await??;
            if let Some(w) = d.warning() {
                eprintln!("warning: {w}");
            }
            d.set_config(facts);
            // Not println!: whoever read the first line may have closed stdout.
            let _ = writeln!(std::io::stdout(), "Dashboard at {}", d.url());
            Some(d)
        }
        None => None,
    };
    tokio::select! {
        _ = stop => {
            eprintln!("shutting down");
            handle.stop();
            handle.wait().await;
        }
        _ = handle.wait() => {}
    }
    Ok(())
}

/// What `dask-ctl sim-worker` runs.
struct SimWorkers {
    scheduler: String,
    nthreads: usize,
    name: Option<String>,
    duration: Duration,
    result_size: u64,
    count: usize,
}

/// `count` simulated workers until SIGTERM; the first one to fail stops them all.
async fn run_sim_workers(sim: SimWorkers, security: cluster::security::Security) -> Result<()> {
    if sim.count == 0 {
        anyhow::bail!("--count must be at least 1");
    }
    cluster::comm::raise_open_file_limit();
    let base = sim.name.unwrap_or_else(|| format!("sim-{}", std::process::id()));
    let (tx, rx) = tokio::sync::watch::channel(false);
    let mut workers = tokio::task::JoinSet::new();
    for i in 0..sim.count {
        let name = if sim.count == 1 { base.clone() } else { format!("{base}-{i}") };
        let mut config = cluster::worker::WorkerConfig::new(&sim.scheduler, &name, sim.nthreads);
        config.security = security.clone();
        // Each worker has its own store, as separate processes would.
        let runner = Arc::new(cluster::sim::SimRunner::new(sim.duration, sim.result_size));
        workers.spawn(cluster::worker::run_worker(config, runner, rx.clone(), None));
    }
    let stop = shutdown_signal();
    tokio::pin!(stop);
    loop {
        tokio::select! {
            _ = &mut stop => {
                let _ = tx.send(true);
                while let Some(r) = workers.join_next().await {
                    r??;
                }
                return Ok(());
            }
            r = workers.join_next() => match r {
                None => return Ok(()),
                Some(r) => {
                    if let Err(e) = r? {
                        let _ = tx.send(true);
                        return Err(e.into());
                    }
                }
            },
        }
    }
}

/// Resolves on SIGTERM or SIGINT. The handlers are installed when this is
/// called (not when first awaited), so a signal that arrives while the
/// caller still starts things is not lost.
fn shutdown_signal() -> impl std::future::Future<Output = ()> {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = signal(SignalKind::terminate()).expect("SIGTERM handler");
    let mut int = signal(SignalKind::interrupt()).expect("SIGINT handler");
    async move {
        tokio::select! {
            _ = int.recv() => {}
            _ = term.recv() => {}
        }
    }
}
