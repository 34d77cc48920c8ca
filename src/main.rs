//! `dask-ctl`: the operator's command line for dask-rs.
//!
//! A thin binary: argument parsing and process lifecycle only. The runtime
//! lives in the `cluster` crate.

use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result};
use clap::{Parser, Subcommand};
use cluster::scheduler::{self, SchedulerConfig};

#[derive(Parser)]
#[command(name = "dask-ctl", version, about = "Run and manage dask-rs clusters")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
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
        #[arg(long, default_value = "60s", value_parser = parse_duration)]
        worker_ttl: Duration,
        /// Worker deaths a task may cause before it errs with KilledWorker.
        #[arg(long, default_value_t = 3)]
        allowed_failures: u32,
    },
    /// Run a worker without Python whose tasks sleep and return zero bytes
    /// (measures the runtime alone).
    SimWorker {
        /// Scheduler address, tcp://HOST:PORT.
        scheduler: String,
        #[arg(long, default_value_t = 1)]
        nthreads: usize,
        #[arg(long)]
        name: Option<String>,
        /// How long each task takes, e.g. 0, 10ms, 1s.
        #[arg(long, default_value = "0ms", value_parser = parse_duration)]
        duration: Duration,
        /// Bytes each task returns.
        #[arg(long, default_value_t = 8)]
        result_size: u64,
    },
}

fn parse_duration(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    let (num, unit) = s.split_at(s.find(|c: char| !c.is_ascii_digit() && c != '.').unwrap_or(s.len()));
    let v: f64 = num.parse().map_err(|_| format!("invalid duration {s:?}"))?;
    let secs = match unit {
        "" | "s" => v,
        "ms" => v / 1e3,
        "us" => v / 1e6,
        "m" => v * 60.0,
        _ => return Err(format!("invalid duration unit in {s:?} (use us, ms, s, m)")),
    };
    Ok(Duration::from_secs_f64(secs))
}

fn main() -> Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::try_from_env("DASK_RS_LOG").unwrap_or_else(|_| "warn".into()))
        .with_writer(std::io::stderr)
        .init();
    let cli = Cli::parse();
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build()?;
    match cli.command {
        Command::Scheduler { host, port, worker_saturation, worker_ttl, allowed_failures } => {
            let config = SchedulerConfig { worker_saturation, worker_ttl, allowed_failures, ..Default::default() };
            rt.block_on(run_scheduler(host, port, config))
        }
        Command::SimWorker { scheduler, nthreads, name, duration, result_size } => {
            rt.block_on(run_sim_worker(scheduler, nthreads, name, duration, result_size))
        }
    }
}

async fn run_scheduler(host: String, port: u16, config: SchedulerConfig) -> Result<()> {
    let handle =
        scheduler::start(&host, port, config).await.with_context(|| format!("cannot listen on {host}:{port}"))?;
    println!("Scheduler at {}", handle.address);
    tokio::select! {
        _ = shutdown_signal() => {
            eprintln!("shutting down");
            handle.stop();
            handle.wait().await;
        }
        _ = handle.wait() => {}
    }
    Ok(())
}

async fn run_sim_worker(
    scheduler: String,
    nthreads: usize,
    name: Option<String>,
    duration: Duration,
    result_size: u64,
) -> Result<()> {
    let name = name.unwrap_or_else(|| format!("sim-{}", std::process::id()));
    let config = cluster::worker::WorkerConfig::new(&scheduler, &name, nthreads);
    let runner = Arc::new(cluster::sim::SimRunner::new(duration, result_size));
    let (tx, rx) = tokio::sync::watch::channel(false);
    let mut worker = tokio::spawn(cluster::worker::run_worker(config, runner, rx, None));
    tokio::select! {
        _ = shutdown_signal() => {
            let _ = tx.send(true);
            (&mut worker).await??;
        }
        r = &mut worker => r??,
    }
    Ok(())
}

async fn shutdown_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = signal(SignalKind::terminate()).expect("SIGTERM handler");
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
}
