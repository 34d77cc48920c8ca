//! `dask-rs-test-server`: control planes that cannot run on a test machine,
//! behaving like the real ones for everything dask-rs's backends use, with
//! their containers run as local processes. The end-to-end tests of the
//! Marathon and Kubernetes backends start one, point `dask-ctl` at it, and
//! stop it by its pid.

mod kube;
mod marathon;
mod procs;

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(about = "Stand-in control planes for dask-rs's end-to-end tests")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Marathon's /v2 API; tasks are local processes.
    Marathon(marathon::Args),
    /// A kube-apiserver with one node; pods are local processes.
    Kube(kube::Args),
}

/// Flush stdout (the first line tells the test where we listen).
pub(crate) fn flush() {
    use std::io::Write;
    let _ = std::io::stdout().flush();
}

/// Serve `app`, print `banner` (the address the test reads), and return at
/// SIGTERM or SIGINT without waiting for open requests (watches are long).
pub(crate) async fn serve_until_signal(
    listener: tokio::net::TcpListener,
    app: axum::Router,
    banner: &str,
) -> anyhow::Result<()> {
    println!("{banner}");
    flush();
    tokio::select! {
        r = axum::serve(listener, app) => r?,
        _ = shutdown_signal() => {}
    }
    Ok(())
}

/// Resolves on SIGTERM or SIGINT.
pub(crate) async fn shutdown_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = signal(SignalKind::terminate()).expect("SIGTERM handler");
    let mut int = signal(SignalKind::interrupt()).expect("SIGINT handler");
    tokio::select! { _ = term.recv() => {}, _ = int.recv() => {} }
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build()?;
    match cli.command {
        Command::Marathon(args) => rt.block_on(marathon::serve(args)),
        Command::Kube(args) => rt.block_on(kube::serve(args)),
    }
}
