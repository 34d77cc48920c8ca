//! Scheduler throughput and memory with simulated workers (no Python, no
//! sockets): the cost of scheduling alone.
//!
//! `cargo bench --bench scheduler_sim [-- quick]` prints tasks/s per
//! workload and the scheduler's resident memory per task for the largest
//! graph, as a table and one JSON line.

use cluster::scheduler::{SchedulerConfig, SchedulerState};
use cluster::sim::{graphs, simulate_on, SimConfig};
use cluster::worker::runtime::process_rss as rss;

/// The same allocator as the scheduler in `dask-ctl` and `dask_rs._core`.
#[global_allocator]
static ALLOC: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() {
    let quick = std::env::args().any(|a| a == "quick");
    let cfg = SimConfig { workers: 2, nthreads: 1, result_size: 8, scheduler: SchedulerConfig::default() };
    let mut rows = Vec::new();
    // merge-N and a 32,767-task tree are the workloads RSDS and HyperQueue
    // reported; chain and fan-out cover the other shapes.
    let mut workloads: Vec<(&str, usize)> =
        vec![("merge", 10_000), ("merge", 100_000), ("tree", 16_384), ("chain", 1_000), ("fan_out", 100_000)];
    if !quick {
        // First, so the resident-memory baseline is a fresh process's.
        workloads.insert(0, ("merge", 1_000_000));
    }
    // Each workload runs REPEATS times on a fresh state; the median rate is
    // reported (page-fault costs on this kind of machine vary run to run).
    const REPEATS: usize = 3;
    for (name, n) in workloads {
        let mut rates = Vec::with_capacity(REPEATS);
        let mut per_task = None;
        let mut ntasks = 0;
        for rep in 0..REPEATS {
            let (specs, wanted) = match name {
                "merge" => graphs::merge(n),
                "tree" => graphs::tree(n),
                "fan_out" => graphs::fan_out(n),
                _ => graphs::chain(n),
            };
            ntasks = specs.len();
            let mut state = SchedulerState::new(cfg.scheduler.clone());
            let before = rss();
            let mut held = 0u64;
            let report = simulate_on(&mut state, specs, wanted, &cfg, |_| held = rss().saturating_sub(before));
            assert_eq!(report.leftover_tasks, 0);
            rates.push(report.tasks_per_second());
            // RSS growth says little for small graphs or later repetitions
            // (freed memory is reused): only the first 1M-task run counts.
            if rep == 0 && ntasks >= 1_000_000 {
                per_task = Some(held as f64 / ntasks as f64);
            }
        }
        rates.sort_by(f64::total_cmp);
        let label = if name == "tree" { format!("tree-{ntasks}") } else { format!("{name}-{n}") };
        rows.push((label, ntasks, rates[REPEATS / 2], per_task));
    }
    println!("| workload | tasks | tasks/s | scheduler RSS growth per task (bytes) |");
    println!("|---|---:|---:|---:|");
    for (w, n, tps, bpt) in &rows {
        let bpt = bpt.map_or("-".to_string(), |b| format!("{b:.0}"));
        println!("| {w} | {n} | {tps:.0} | {bpt} |");
    }
    let json: Vec<String> = rows
        .iter()
        .map(|(w, n, tps, bpt)| {
            let bpt = bpt.map_or("null".to_string(), |b| format!("{b:.0}"));
            format!("{{\"workload\":\"{w}\",\"tasks\":{n},\"tasks_per_s\":{tps:.0},\"bytes_per_task\":{bpt}}}")
        })
        .collect();
    println!("JSON [{}]", json.join(","));
}
