//! Scheduler throughput and memory with simulated workers (no Python, no
//! sockets): the cost of scheduling alone.
//!
//! `cargo bench --bench scheduler_sim [-- quick] [merge-100000 ...]` prints
//! tasks/s per workload (or the named ones) and the scheduler's memory per
//! task for the largest graph, as a table and one JSON line.

use std::alloc::{GlobalAlloc, Layout};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering::Relaxed};

use cluster::scheduler::{SchedulerConfig, SchedulerState};
use cluster::sim::{graphs, simulate_on, SimConfig};

/// The same allocator as the scheduler in `dask-ctl` and `dask_rs._core`,
/// counting, while `COUNTING` is on, the bytes it hands out and gets back
/// (off otherwise: the counter would slow the throughput runs). The growth
/// of resident memory, measured before, varied from 107 to 443 bytes per
/// task between runs of one build, with how much freed memory was reused.
struct Counting;

static LIVE: AtomicUsize = AtomicUsize::new(0);
static COUNTING: AtomicBool = AtomicBool::new(false);

fn counting() -> bool {
    COUNTING.load(Relaxed)
}

// SAFETY: every call is passed on to mimalloc unchanged; only a counter is added.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        let p = mimalloc::MiMalloc.alloc(layout);
        if !p.is_null() && counting() {
            LIVE.fetch_add(layout.size(), Relaxed);
        }
        p
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        let p = mimalloc::MiMalloc.alloc_zeroed(layout);
        if !p.is_null() && counting() {
            LIVE.fetch_add(layout.size(), Relaxed);
        }
        p
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        mimalloc::MiMalloc.dealloc(ptr, layout);
        if counting() {
            LIVE.fetch_sub(layout.size(), Relaxed);
        }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        let p = mimalloc::MiMalloc.realloc(ptr, layout, new_size);
        if !p.is_null() && counting() {
            LIVE.fetch_add(new_size, Relaxed);
            LIVE.fetch_sub(layout.size(), Relaxed);
        }
        p
    }
}

#[global_allocator]
static ALLOC: Counting = Counting;

/// Bytes handed out and not given back since counting started (negative
/// when more was given back than handed out).
fn live() -> isize {
    LIVE.load(Relaxed) as isize
}

fn main() {
    let quick = std::env::args().any(|a| a == "quick");
    let cfg = SimConfig { workers: 2, nthreads: 1, result_size: 8, scheduler: SchedulerConfig::default() };
    let mut rows = Vec::new();
    // merge-N and a 32,767-task tree are the workloads RSDS and HyperQueue
    // reported; chain and fan-out cover the other shapes.
    let mut workloads: Vec<(&str, usize)> =
        vec![("merge", 10_000), ("merge", 100_000), ("tree", 16_384), ("chain", 1_000), ("fan_out", 100_000)];
    if !quick {
        workloads.insert(0, ("merge", 1_000_000));
    }
    // Named workloads only (`merge-100000`, `tree`...), to profile one.
    let only: Vec<String> = std::env::args().skip(1).filter(|a| a != "quick" && !a.starts_with('-')).collect();
    if !only.is_empty() {
        workloads.retain(|(name, n)| only.iter().any(|o| o == name || *o == format!("{name}-{n}")));
    }
    // Each workload runs REPEATS times on a fresh state; the median rate is
    // reported (page-fault costs on this kind of machine vary run to run).
    const REPEATS: usize = 3;
    for (name, n) in workloads {
        let mut rates = Vec::with_capacity(REPEATS);
        let mut per_task = None;
        let mut ntasks = 0;
        for rep in 0..REPEATS {
            // The graph is consumed by the scheduler: what is live once it
            // took it, beyond what was live before the graph was made, is
            // the scheduler's (and the few messages it queued).
            let measure = rep == 0 && n >= 1_000_000;
            COUNTING.store(measure, Relaxed);
            let before = live();
            let (specs, wanted) = match name {
                "merge" => graphs::merge(n),
                "tree" => graphs::tree(n),
                "fan_out" => graphs::fan_out(n),
                _ => graphs::chain(n),
            };
            ntasks = specs.len();
            let mut state = SchedulerState::new(cfg.scheduler.clone());
            let mut held = 0isize;
            let report = simulate_on(&mut state, specs, wanted, &cfg, |_| {
                held = live() - before;
                COUNTING.store(false, Relaxed);
            });
            assert_eq!(report.leftover_tasks, 0);
            rates.push(report.tasks_per_second());
            if measure {
                per_task = Some(held as f64 / ntasks as f64);
            }
        }
        rates.sort_by(f64::total_cmp);
        let label = if name == "tree" { format!("tree-{ntasks}") } else { format!("{name}-{n}") };
        rows.push((label, ntasks, rates[REPEATS / 2], per_task));
    }
    println!("| workload | tasks | tasks/s | scheduler memory per task (bytes) |");
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
