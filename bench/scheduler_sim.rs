//! Scheduler throughput and memory with simulated workers (no Python, no
//! sockets): the cost of scheduling alone.
//!
//! `cargo bench --bench scheduler_sim [-- quick]` prints tasks/s per
//! workload and the scheduler's resident memory per task for the largest
//! graph, as a table and one JSON line.

use cluster::scheduler::{SchedulerConfig, SchedulerState};
use cluster::sim::{graphs, simulate_on, SimConfig};
use cluster::worker::runtime::process_rss as rss;

fn main() {
    let quick = std::env::args().any(|a| a == "quick");
    let cfg = SimConfig { workers: 2, nthreads: 1, result_size: 8, scheduler: SchedulerConfig::default() };
    let mut rows = Vec::new();
    let mut workloads: Vec<(&str, usize)> =
        vec![("merge", 10_000), ("merge", 100_000), ("tree", 16_384), ("chain", 1_000), ("fan_out", 100_000)];
    if !quick {
        workloads.push(("merge", 1_000_000));
    }
    for (name, n) in workloads {
        let (specs, wanted) = match name {
            "merge" => graphs::merge(n),
            "tree" => graphs::tree(n),
            "fan_out" => graphs::fan_out(n),
            _ => graphs::chain(n),
        };
        let ntasks = specs.len();
        let mut state = SchedulerState::new(cfg.scheduler.clone());
        let before = rss();
        let mut held = 0u64;
        let report = simulate_on(&mut state, specs, wanted, &cfg, |_| held = rss().saturating_sub(before));
        assert_eq!(report.leftover_tasks, 0);
        rows.push((format!("{name}-{n}"), ntasks, report.tasks_per_second(), held as f64 / ntasks as f64));
    }
    println!("| workload | tasks | tasks/s | scheduler RSS growth per task (bytes) |");
    println!("|---|---:|---:|---:|");
    for (w, n, tps, bpt) in &rows {
        println!("| {w} | {n} | {tps:.0} | {bpt:.0} |");
    }
    let json: Vec<String> = rows
        .iter()
        .map(|(w, n, tps, bpt)| {
            format!("{{\"workload\":\"{w}\",\"tasks\":{n},\"tasks_per_s\":{tps:.0},\"bytes_per_task\":{bpt:.0}}}")
        })
        .collect();
    println!("JSON [{}]", json.join(","));
}
