//! `/metrics`: the cluster in Prometheus' text format, with distributed's
//! metric names where both have the quantity (so Grafana dashboards made
//! for Dask work unchanged) and `dask_rs_` names for the rest.

use std::fmt::Write;

use cluster::monitor::Model;

/// Prometheus' escaping of a label value.
fn label(v: &str) -> String {
    v.replace('\\', "\\\\").replace('"', "\\\"").replace('\n', "\\n")
}

struct Out(String);

impl Out {
    fn family(&mut self, name: &str, kind: &str, help: &str) {
        let _ = writeln!(self.0, "# HELP {name} {help}\n# TYPE {name} {kind}");
    }

    fn value(&mut self, name: &str, labels: &[(&str, &str)], v: f64) {
        self.0.push_str(name);
        if !labels.is_empty() {
            let ls: Vec<String> = labels.iter().map(|(k, v)| format!("{k}=\"{}\"", label(v))).collect();
            let _ = write!(self.0, "{{{}}}", ls.join(","));
        }
        let _ = writeln!(self.0, " {v}");
    }
}

/// Extra gauges from a cluster manager (Adaptive), when there is one.
#[derive(Debug, Clone, Copy, Default)]
pub struct ManagerGauges {
    pub target: u64,
    pub running: u64,
    pub pending: u64,
}

/// The metrics text for `model` (and `manager`'s gauges, if any).
pub fn render(model: &Model, manager: Option<ManagerGauges>) -> String {
    let mut o = Out(String::new());
    o.family("dask_scheduler_clients", "gauge", "Number of clients connected.");
    o.value("dask_scheduler_clients", &[], model.nclients as f64);
    o.family("dask_scheduler_workers", "gauge", "Number of workers known by scheduler.");
    o.value("dask_scheduler_workers", &[], model.workers.len() as f64);
    o.family("dask_scheduler_tasks", "gauge", "Number of tasks known by scheduler.");
    for (state, n) in model.task_states() {
        o.value("dask_scheduler_tasks", &[("state", state)], n as f64);
    }
    o.family(
        "dask_scheduler_tasks_forgotten_total",
        "counter",
        "Total number of processed tasks no longer in memory and already removed from the scheduler.",
    );
    o.value(
        "dask_scheduler_tasks_forgotten_total",
        &[],
        model.groups.values().map(|g| g.forgotten).sum::<u64>() as f64,
    );
    o.family("dask_scheduler_tasks_compute_seconds_total", "counter", "Total time (per prefix) spent computing tasks.");
    for g in model.groups.values() {
        o.value("dask_scheduler_tasks_compute_seconds_total", &[("task_prefix_name", &g.name)], g.compute_seconds);
    }
    o.family("dask_scheduler_tasks_output_bytes", "gauge", "Current size of in memory/spilled tasks (per prefix).");
    for g in model.groups.values() {
        o.value("dask_scheduler_tasks_output_bytes", &[("task_prefix_name", &g.name)], g.nbytes as f64);
    }
    o.family("dask_scheduler_desired_workers", "gauge", "Number of workers scheduler needs for task graph.");
    let desired = manager.map(|m| m.target as f64).unwrap_or(model.workers.len() as f64);
    o.value("dask_scheduler_desired_workers", &[], desired);

    o.family("dask_worker_threads", "gauge", "Number of worker threads.");
    for w in &model.workers {
        o.value("dask_worker_threads", &[("worker", &w.address)], w.nthreads as f64);
    }
    o.family("dask_worker_tasks", "gauge", "Number of tasks at worker.");
    for w in &model.workers {
        for (state, n) in [("executing", w.executing), ("ready", w.ready), ("processing", w.processing)] {
            o.value("dask_worker_tasks", &[("worker", &w.address), ("state", state)], n as f64);
        }
        o.value("dask_worker_tasks", &[("worker", &w.address), ("state", "memory")], w.nkeys as f64);
    }
    o.family("dask_worker_memory_bytes", "gauge", "Memory breakdown.");
    for w in &model.workers {
        let unmanaged = w.rss.saturating_sub(w.managed.saturating_sub(w.spilled)) as f64;
        for (kind, v) in [
            ("managed", w.managed.saturating_sub(w.spilled) as f64),
            ("unmanaged", unmanaged),
            ("spilled", w.spilled as f64),
        ] {
            o.value("dask_worker_memory_bytes", &[("worker", &w.address), ("type", kind)], v);
        }
    }
    o.family("dask_rs_worker_memory_limit_bytes", "gauge", "Memory limit of the worker (0: none).");
    for w in &model.workers {
        o.value("dask_rs_worker_memory_limit_bytes", &[("worker", &w.address)], w.memory_limit as f64);
    }
    o.family("dask_worker_transfer_incoming_bytes_total", "counter", "Bytes received from peers and clients.");
    for w in &model.workers {
        o.value("dask_worker_transfer_incoming_bytes_total", &[("worker", &w.address)], w.bytes_in as f64);
    }
    o.family("dask_worker_transfer_outgoing_bytes_total", "counter", "Bytes sent to peers and clients.");
    for w in &model.workers {
        o.value("dask_worker_transfer_outgoing_bytes_total", &[("worker", &w.address)], w.bytes_out as f64);
    }
    o.family("dask_rs_scheduler_tasks_finished_total", "counter", "Tasks this dashboard saw finish.");
    o.value("dask_rs_scheduler_tasks_finished_total", &[], model.tasks_finished as f64);
    if let Some(m) = manager {
        o.family("dask_rs_adaptive_target_workers", "gauge", "Workers the cluster's policy asks for.");
        o.value("dask_rs_adaptive_target_workers", &[], m.target as f64);
        o.family("dask_rs_adaptive_pending_workers", "gauge", "Workers requested and not running yet.");
        o.value("dask_rs_adaptive_pending_workers", &[], m.pending as f64);
        o.family("dask_rs_adaptive_running_workers", "gauge", "Workers requested and running.");
        o.value("dask_rs_adaptive_running_workers", &[], m.running as f64);
    }
    o.0
}

#[cfg(test)]
mod tests {
    use super::*;
    use cluster::protocol::{EventsUpdate, GroupCounts, WorkerInfo};

    #[test]
    fn counts_tasks_by_state_and_labels_workers() {
        let mut m = Model::default();
        let g =
            GroupCounts { name: "inc".into(), memory: 3, processing: 2, compute_seconds: 1.5, ..Default::default() };
        let mut w = WorkerInfo::new("w\"0", "tcp://h:1", 4, 100);
        w.managed = 30;
        w.rss = 50;
        m.apply(EventsUpdate { time: 1.0, groups: vec![g], workers: vec![w], nclients: 2, ..Default::default() });
        let text = render(&m, None);
        assert!(text.contains("dask_scheduler_tasks{state=\"memory\"} 3\n"), "{text}");
        assert!(text.contains("dask_scheduler_tasks{state=\"processing\"} 2\n"));
        assert!(text.contains("dask_scheduler_clients 2\n"));
        assert!(text.contains("dask_scheduler_tasks_compute_seconds_total{task_prefix_name=\"inc\"} 1.5\n"));
        assert!(text.contains("dask_worker_memory_bytes{worker=\"tcp://h:1\",type=\"unmanaged\"} 20\n"), "{text}");
        assert!(text.lines().all(|l| l.starts_with('#') || l.split(' ').count() == 2), "one value per line");
    }
}
