"""dask-rs at scale, side by side with Dask distributed where it can run.

Two families of measurements (``make bench`` runs this after suite.py):

* Many workers: one scheduler process and N workers hosted in one other
  process (``dask-ctl sim-worker --count N`` for dask-rs: Rust workers whose
  tasks return at once; for Dask, N ``distributed.Worker`` objects on one
  event loop, no nannies), N = 1, 10, 100, 1000. For each: seconds until all
  N registered, scheduler CPU while the cluster idles (heartbeats only, % of
  one core over 5 s) and no-op tasks/s (``client.map`` + ``wait``).
* Cost growth: no-op ``client.map`` + ``gather`` of 1k, 10k, 100k, 1M tasks on a
  scheduler process and 2 Python worker processes: tasks/s, the scheduler's
  peak resident memory per task (VmHWM over its idle size) and the client's
  peak. Dask runs the sizes that finish within its time limit.
* A large dask.array graph: the sum of a 1-chunk-per-element array (about
  100,000 and 500,000 tasks) on the same cluster shape: seconds Dask spends
  building and optimizing the graph (the same code for both systems), then
  seconds from ``client.get`` to the result, peak RSS of scheduler and client.
  Dask runs the larger size if the smaller one projects it under 10 minutes.

Results go to ``bench/results/scale.{json,md}``; ``bench-plot`` draws
``bench/results/*.png`` from the JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results"
DASK_CTL = ROOT / "target" / "release" / "dask-ctl"
PY = sys.executable
TICK = os.sysconf("SC_CLK_TCK")


def inc(x):
    return x + 1


def cpu_seconds(pid):
    fields = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICK


def status_kib(pid, field):
    for line in open(f"/proc/{pid}/status"):
        if line.startswith(field + ":"):
            return int(line.split()[1])
    return 0


class Procs:
    def __init__(self):
        self.procs = []

    def start(self, cmd, **kw):
        p = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True, **kw)
        self.procs.append(p)
        return p

    def stop(self):
        for p in reversed(self.procs):
            if p.poll() is None:
                p.terminate()
        for p in self.procs:
            try:
                p.wait(30)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()


def first_line_address(p, prefix):
    """The address a process prints on its first line starting with `prefix`."""
    for line in p.stdout:
        if prefix in line:
            return line.split()[-1]
    raise RuntimeError(f"no line with {prefix!r}")


# ---------------------------------------------------------------- dask-rs


def dask_rs_scheduler(procs):
    p = procs.start([str(DASK_CTL), "scheduler", "--port", "0", "--no-dashboard"])
    return p, first_line_address(p, "Scheduler at")


def dask_scheduler(procs):
    code = (
        "import asyncio, distributed\n"
        "async def main():\n"
        "    async with distributed.Scheduler(port=0, dashboard=False) as s:\n"
        "        print('Scheduler at', s.address, flush=True)\n"
        "        await s.finished()\n"
        "asyncio.run(main())\n"
    )
    p = procs.start([PY, "-c", code], stderr=subprocess.DEVNULL)
    return p, first_line_address(p, "Scheduler at")


DASK_WORKERS = (
    "import asyncio, sys, distributed\n"
    "async def main():\n"
    "    ws = [distributed.Worker(sys.argv[1], nthreads=1, dashboard=False, name=f'w{i}')"
    " for i in range(int(sys.argv[2]))]\n"
    "    await asyncio.gather(*ws)\n"
    "    await asyncio.Event().wait()\n"
    "asyncio.run(main())\n"
)


def many_workers(system, n, tasks, limit):
    """Register n workers hosted in one process; idle CPU; no-op tasks/s."""
    procs = Procs()
    try:
        if system == "dask-rs":
            from dask_rs import Client, wait

            sched, address = dask_rs_scheduler(procs)
            t = time.perf_counter()
            procs.start([str(DASK_CTL), "sim-worker", address, "--count", str(n), "--name", "w"],
                        stderr=subprocess.DEVNULL)
        else:
            from distributed import Client, wait

            sched, address = dask_scheduler(procs)
            t = time.perf_counter()
            procs.start([PY, "-c", DASK_WORKERS, address, str(n)], stderr=subprocess.DEVNULL)
        client = Client(address)
        try:
            client.wait_for_workers(n, timeout=limit)
        except Exception:
            client.close()
            return {"registered": None}
        registered = time.perf_counter() - t
        time.sleep(2)
        c0 = cpu_seconds(sched.pid)
        time.sleep(5)
        idle = (cpu_seconds(sched.pid) - c0) / 5 * 100
        t = time.perf_counter()
        futs = client.map(inc, range(tasks), pure=False)
        try:
            wait(futs, timeout=limit)
            rate = tasks / (time.perf_counter() - t)
        except Exception:
            rate = None  # not done within the limit
        del futs
        client.close()
        return {"registered": registered, "idle_cpu": idle, "tasks_per_s": rate, "tasks": tasks}
    finally:
        procs.stop()


# ------------------------------------------------------------ cost growth


def two_worker_cluster(system, procs):
    """A scheduler process and 2 one-thread worker processes; returns
    ``(scheduler process, client)``."""
    if system == "dask-rs":
        from dask_rs import Client

        sched, address = dask_rs_scheduler(procs)
        for i in range(2):
            procs.start([PY, "-m", "dask_rs", "worker", address, "--name", f"w{i}", "--nthreads", "1"],
                        stderr=subprocess.DEVNULL)
    else:
        from distributed import Client

        sched, address = dask_scheduler(procs)
        for i in range(2):
            procs.start([PY, "-m", "distributed.cli.dask_worker", address, "--name", f"w{i}",
                         "--nthreads", "1", "--no-nanny", "--no-dashboard"], stderr=subprocess.DEVNULL)
    client = Client(address)
    client.wait_for_workers(2, timeout=60)
    time.sleep(1)
    return sched, client


def growth(system, n, limit):
    """map+gather of n no-op tasks on a scheduler process and 2 worker processes."""
    procs = Procs()
    try:
        sched, client = two_worker_cluster(system, procs)
        base = status_kib(sched.pid, "VmRSS")
        t = time.perf_counter()
        futs = client.map(inc, range(n), pure=False)
        out = client.gather(futs)
        elapsed = time.perf_counter() - t
        assert out[-1] == n
        peak = status_kib(sched.pid, "VmHWM")
        del futs, out
        client.close()
        if elapsed > limit:
            return {"seconds": elapsed, "over_limit": True}
        return {"seconds": elapsed, "tasks_per_s": n / elapsed, "bytes_per_task": (peak - base) * 1024 / n,
                "peak_rss_mib": peak / 1024, "client_peak_rss_mib": status_kib(os.getpid(), "VmHWM") / 1024}
    finally:
        procs.stop()


def large(system, chunks, limit):
    """Sum of a dask.array with ``chunks`` one-element chunks."""
    import dask.array as da
    from dask._expr import FinalizeCompute
    from dask.base import collections_to_expr
    from dask.core import flatten

    procs = Procs()
    try:
        sched, client = two_worker_cluster(system, procs)
        t = time.perf_counter()
        expr = FinalizeCompute(collections_to_expr([da.ones(chunks, chunks=1).sum()], True)).optimize()
        dsk = dict(expr.__dask_graph__())
        keys = list(flatten(expr.__dask_keys__()))
        built = time.perf_counter() - t
        t = time.perf_counter()
        out = client.get(dsk, keys)
        elapsed = time.perf_counter() - t
        assert out[0] == chunks, out
        tasks = len(dsk)
        return {"tasks": tasks, "build_seconds": built, "seconds": elapsed, "tasks_per_s": tasks / elapsed,
                "over_limit": elapsed > limit,
                "peak_rss_mib": status_kib(sched.pid, "VmHWM") / 1024,
                "client_peak_rss_mib": status_kib(os.getpid(), "VmHWM") / 1024}
    finally:
        procs.stop()


def child(kind, system, n, tasks, limit):
    if kind == "workers":
        out = many_workers(system, n, tasks, limit)
    else:
        out = (growth if kind == "growth" else large)(system, n, limit)
    print("RESULT " + json.dumps(out), flush=True)


def run_child(kind, system, n, tasks, limit):
    cmd = [PY, __file__, "--child", kind, system, str(n), str(tasks), str(limit)]
    try:
        proc = subprocess.run(cmd, stdout=subprocess.PIPE, text=True, timeout=limit * 3 + 120)
    except subprocess.TimeoutExpired:
        return {"timed_out": True}
    lines = [x for x in proc.stdout.splitlines() if x.startswith("RESULT ")]
    return json.loads(lines[-1][7:]) if lines else {"failed": proc.returncode}


def fmt(v, digits=0):
    if v is None:
        return "-"
    return f"{v:,.{digits}f}"


def why_missing(r, rate) -> str:
    """A row's note when its figures are missing or over the limit."""
    if "skipped_projected_s" in r:
        return f" (not run: about {r['skipped_projected_s']:.0f} s at {rate} rate)"
    return " (over the limit)" if r.get("over_limit") or r.get("timed_out") else ""


def table(report):
    out = ["## Many workers (one scheduler process; the workers hosted in one other process)", "",
           "| workers | system | all registered (s) | idle scheduler CPU (% of a core) | no-op tasks/s |",
           "|---:|---|---:|---:|---:|"]
    for r in report["workers"]:
        reg = r.get("registered")
        if reg is None:
            note = f" (workers not registered within {report['limit']:.0f} s)"
        elif r.get("tasks_per_s") is None:
            note = f" ({r['tasks']:,} tasks not done within {report['limit']:.0f} s)"
        else:
            note = ""
        out.append(f"| {r['n']:,} | {r['system']}{note} | {fmt(reg, 2)} | {fmt(r.get('idle_cpu'), 2)} | "
                   f"{fmt(r.get('tasks_per_s'))} |")
    out += ["", "## Cost growth (no-op map + gather; scheduler process + 2 Python worker processes)", "",
            "| tasks | system | seconds | tasks/s | scheduler peak RSS (MiB) | scheduler bytes per task | "
            "client peak RSS (MiB) |",
            "|---:|---|---:|---:|---:|---:|---:|"]
    for r in report["growth"]:
        over = why_missing(r, "the last size's")
        cells = [fmt(r.get("seconds"), 2), fmt(r.get("tasks_per_s")), fmt(r.get("peak_rss_mib"), 1),
                 fmt(r.get("bytes_per_task")), fmt(r.get("client_peak_rss_mib"), 1)]
        out.append(f"| {r['n']:,} | {r['system']}{over} | " + " | ".join(cells) + " |")
    if report.get("large"):
        out += ["", "## A large dask.array graph (sum of an array of one-element chunks; same cluster)", "",
                "| chunks | tasks | system | graph built by dask (s) | get to result (s) | tasks/s | "
                "scheduler peak RSS (MiB) | client peak RSS (MiB) |",
                "|---:|---:|---|---:|---:|---:|---:|---:|"]
        for r in report["large"]:
            over = why_missing(r, "the smaller size's")
            cells = [fmt(r.get("build_seconds"), 2), fmt(r.get("seconds"), 2), fmt(r.get("tasks_per_s")),
                     fmt(r.get("peak_rss_mib"), 1), fmt(r.get("client_peak_rss_mib"), 1)]
            head = f"| {r['n']:,} | {fmt(r.get('tasks'))} | {r['system']}{over} | "
            out.append(head + " | ".join(cells) + " |")
    out.append("")
    return "\n".join(out)


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--child", nargs=5, help=argparse.SUPPRESS)
    p.add_argument("--quick", action="store_true", help="1, 10, 100 workers; 1k and 10k tasks")
    p.add_argument("--limit", type=float, default=120, help="seconds a run may take before it is dropped")
    p.add_argument("--out", default=None, help="results file stem (default bench/results/scale)")
    p.add_argument("--systems", default="dask-rs,dask",
                   help="measure only these; the others' rows are kept from the existing results file")
    p.add_argument("--kinds", default="workers,growth,large", help="any of workers, growth, large")
    a = p.parse_args()
    if a.child:
        kind, system, n, tasks, limit = a.child
        return child(kind, system, int(n), int(tasks), float(limit))
    sizes = [1, 10, 100] if a.quick else [1, 10, 100, 1000]
    systems = a.systems.split(",")
    kinds = a.kinds.split(",")
    stem = Path(a.out) if a.out else RESULTS / "scale"
    report = {"date": time.strftime("%Y-%m-%d %H:%M:%S"), "limit": a.limit, "workers": [], "growth": [],
              "large": []}
    if stem.with_suffix(".json").exists() and (set(systems) != {"dask-rs", "dask"} or len(kinds) < 3):
        old = json.loads(stem.with_suffix(".json").read_text())
        for kind in ("workers", "growth", "large"):
            report[kind] = [r for r in old.get(kind, []) if kind not in kinds or r["system"] not in systems]
    for n in sizes if "workers" in kinds else []:
        for system, tasks in (("dask-rs", 100_000), ("dask", 10_000)):
            if system not in systems:
                continue
            r = run_child("workers", system, n, tasks, a.limit)
            print(f"  workers {n:5d} {system:8s} {r}", file=sys.stderr, flush=True)
            report["workers"].append({"system": system, "n": n, **r})
    for n in ([1000, 10_000] if a.quick else [1000, 10_000, 100_000, 1_000_000]) if "growth" in kinds else []:
        for system in (x for x in ("dask-rs", "dask") if x in systems):
            done = [r for r in report["growth"] if r["system"] == system]
            if done and (done[-1].get("seconds") or a.limit) * n / done[-1]["n"] > a.limit:
                projected = (done[-1].get("seconds") or a.limit) * n / done[-1]["n"]
                print(f"  growth {n:8d} {system:8s} skipped: about {projected:.0f} s", file=sys.stderr)
                report["growth"].append({"system": system, "n": n, "skipped_projected_s": projected})
                continue
            r = run_child("growth", system, n, 0, a.limit)
            print(f"  growth {n:8d} {system:8s} {r}", file=sys.stderr, flush=True)
            report["growth"].append({"system": system, "n": n, **r})
    # 75,000 and 375,000 chunks: about 100,000 and 500,000 tasks. Dask gets
    # 10 minutes for this one, as much as its projection allows.
    for n in ([7_500] if a.quick else [75_000, 375_000]) if "large" in kinds else []:
        for system in (x for x in ("dask-rs", "dask") if x in systems):
            done = [r for r in report["large"] if r["system"] == system and "seconds" in r]
            if done:
                projected = (done[-1]["build_seconds"] + done[-1]["seconds"]) * n / done[-1]["n"]
                if projected > 600:
                    print(f"  large {n:8d} {system:8s} skipped: about {projected:.0f} s", file=sys.stderr)
                    report["large"].append({"system": system, "n": n, "skipped_projected_s": projected})
                    continue
            r = run_child("large", system, n, 0, 600)
            print(f"  large {n:8d} {system:8s} {r}", file=sys.stderr, flush=True)
            report["large"].append({"system": system, "n": n, **r})
    for kind in ("workers", "growth", "large"):
        report[kind].sort(key=lambda r: (r["n"], r["system"] != "dask-rs"))
    stem.parent.mkdir(parents=True, exist_ok=True)
    stem.with_suffix(".json").write_text(json.dumps(report, indent=1) + "\n")
    md = table(report)
    stem.with_suffix(".md").write_text(md)
    print(md)


if __name__ == "__main__":
    main()
