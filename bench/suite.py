"""dask-rs side by side with Dask distributed.

``make bench`` (``python bench/suite.py``) runs every workload on dask-rs and
on Dask distributed from the same virtualenv, same Python, same machine and
same layout (2 worker processes x 1 thread), Dask once at its defaults and
once with ``distributed.scheduler.worker-saturation: inf``. Systems are
interleaved (A/B/C, then C/B/A, ...) with a fresh cluster in a fresh process
for every repetition; the table reports medians and dask-rs's speed-up over
each Dask column. ``--quick`` (``make bench-quick``) runs a small subset once.

Results go to ``bench/results/{latest,quick}.{json,md}``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import socket
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from operator import add
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results"
SYSTEMS = {
    "dask-rs": "dask-rs",
    "dask": "Dask (defaults)",
    "dask-inf": "Dask (worker-saturation inf)",
    "dask-rs-tls": "dask-rs (TLS)",
    "dask-tls": "Dask (TLS)",
}
# The TLS systems (Security.temporary() on both sides: TLS 1.3 for dask-rs,
# distributed's TLS for Dask) run only what shows the cost of encryption.
TLS_SYSTEMS = {"dask-rs-tls": "dask-rs", "dask-tls": "dask"}
TLS_WORKLOADS = {"roundtrip", "transfer-10MB", "transfer-100MB"}


# --------------------------------------------------------------------------
# Task functions (module level so both runtimes pickle them by reference).


def inc(x):
    return x + 1


def total(xs):
    return sum(xs)


def make_array(nbytes, seed):
    import numpy as np

    return np.full(nbytes // 8, float(seed))


def nbytes_of(a):
    return a.nbytes


def worker_rss():
    """(pid, resident bytes) of the process running this task."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return os.getpid(), int(line.split()[1]) * 1024
    return os.getpid(), 0


# --------------------------------------------------------------------------
# Workloads. Each takes a client and returns {metric: value}.


@dataclass
class Workload:
    """One measurement; `unit` says which way is better (`s`/`ms` lower, others higher)."""

    name: str
    label: str
    unit: str
    run: object
    reps: int = 3
    quick: bool = False


def roundtrip(c, n):
    for i in range(50):
        c.submit(inc, i, pure=False).result()
    lat = []
    for i in range(n):
        t = time.perf_counter()
        c.submit(inc, i, pure=False).result()
        lat.append(time.perf_counter() - t)
    lat.sort()
    return {
        "roundtrip": statistics.median(lat) * 1e3,
        "roundtrip-p99": lat[min(len(lat) - 1, int(len(lat) * 0.99))] * 1e3,
    }


def noop_map(c, n):
    t = time.perf_counter()
    out = c.gather(c.map(inc, range(n), pure=False))
    elapsed = time.perf_counter() - t
    assert out[-1] == n
    return {f"map-{n}": n / elapsed}


# Ten browsers on /status and a Prometheus scraper, in a process of their own
# (so they take no time from the client's interpreter).
VIEWERS = """
import sys, threading, time, urllib.request
base, seconds = sys.argv[1], float(sys.argv[2])
end = time.time() + seconds
def view():
    with urllib.request.urlopen(base + "/stream/status", timeout=30) as r:
        while time.time() < end and r.read(1 << 16):
            pass
def scrape():
    while time.time() < end:
        urllib.request.urlopen(base + "/metrics", timeout=30).read()
        time.sleep(1)
ts = [threading.Thread(target=view) for _ in range(10)] + [threading.Thread(target=scrape)]
for t in ts: t.start()
print("ready", flush=True)
for t in ts: t.join()
"""


def _dashboard_cpu():
    """CPU seconds used so far by this process's dashboard threads (a
    LocalCluster's scheduler and dashboard live in the client process)."""
    total = 0
    for tid in os.listdir("/proc/self/task"):
        try:
            with open(f"/proc/self/task/{tid}/comm") as f:
                if not f.read().startswith("dask-rs-dashb"):
                    continue
            with open(f"/proc/self/task/{tid}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
            total += int(fields[11]) + int(fields[12])  # utime + stime, in ticks
        except OSError:
            continue
    return total / os.sysconf("SC_CLK_TCK")


def _viewers(base):
    """Start the viewers' process; returns it once its streams are open."""
    p = subprocess.Popen([sys.executable, "-c", VIEWERS, base, "600"], stdout=subprocess.PIPE, text=True)
    assert p.stdout.readline().strip() == "ready"
    time.sleep(1.0)
    return p


def viewed_map(c, n, pairs=3):
    """What watching costs (dask-rs only): `noop_map` of `n` tasks alternately
    without and with ten viewers following /status and /metrics scraped every
    second, in the order A B B A A B ... so drift over the run falls on both
    sides; the cost is the ratio of the two medians. Also the CPU the
    dashboard's own threads used while viewed."""
    link = getattr(c, "dashboard_link", None)
    if "dask_rs" not in type(c).__module__ or not link:
        return {}
    base = link.rsplit("/", 1)[0]
    plain, viewed, shares = [], [], []
    for i in range(2 * pairs):
        watched = i % 4 in (1, 2)
        p = _viewers(base) if watched else None
        try:
            before, t = _dashboard_cpu(), time.perf_counter()
            rate = noop_map(c, n)[f"map-{n}"]
            if watched:
                shares.append((_dashboard_cpu() - before) / (time.perf_counter() - t) * 100)
                viewed.append(rate)
            else:
                plain.append(rate)
        finally:
            if p:
                p.kill()
                p.wait()
    unviewed, seen = statistics.median(plain), statistics.median(viewed)
    return {
        f"map-{n}-viewed": seen,
        "watch-cost": (unviewed / seen - 1) * 100,
        "dashboard-cpu": statistics.median(shares),
    }


def _get(c, dsk, key):
    t = time.perf_counter()
    out = c.get(dsk, key)
    return out, time.perf_counter() - t


def tree(c, leaves, tag):
    dsk = {f"t{tag}-0-{i}": (inc, i) for i in range(leaves)}
    level, width = 0, leaves
    while width > 1:
        for j in range((width + 1) // 2):
            a, b = f"t{tag}-{level}-{2 * j}", f"t{tag}-{level}-{2 * j + 1}"
            dsk[f"t{tag}-{level + 1}-{j}"] = (add, a, b) if 2 * j + 1 < width else (inc, a)
        level, width = level + 1, (width + 1) // 2
    out, elapsed = _get(c, dsk, f"t{tag}-{level}-0")
    assert out >= leaves * (leaves + 1) // 2
    return {f"tree-{leaves}": elapsed}


def chain(c, n, tag):
    dsk = {f"c{tag}-0": (inc, 0)}
    for i in range(1, n):
        dsk[f"c{tag}-{i}"] = (inc, f"c{tag}-{i - 1}")
    out, elapsed = _get(c, dsk, f"c{tag}-{n - 1}")
    assert out == n
    return {f"chain-{n}": elapsed}


def merge(c, n, tag):
    dsk = {f"m{tag}-{i}": (inc, i) for i in range(n)}
    dsk[f"m{tag}-all"] = (total, [f"m{tag}-{i}" for i in range(n)])
    out, elapsed = _get(c, dsk, f"m{tag}-all")
    assert out == n * (n + 1) // 2
    return {f"merge-{n}": elapsed}


def _two_workers(c):
    c.wait_for_workers(2)
    addrs = sorted(c.nthreads())
    assert len(addrs) >= 2, addrs
    return addrs[0], addrs[1]


def transfer(c, mb, times):
    a, b = _two_workers(c)
    nbytes = mb * 1_000_000
    # Untimed: the first transfer opens the worker-to-worker connection.
    first = c.submit(make_array, 1000, -1, workers=[a], pure=False)
    c.submit(nbytes_of, first, workers=[b], pure=False).result()
    speeds = []
    for i in range(times):
        x = c.submit(make_array, nbytes, i, workers=[a], pure=False)
        _wait(c, x)
        t = time.perf_counter()
        got = c.submit(nbytes_of, x, workers=[b], pure=False).result()
        speeds.append(got / (time.perf_counter() - t) / 1e6)
        del x
    return {f"transfer-{mb}MB": statistics.median(speeds)}


def _wait(c, fut):
    import dask_rs

    if isinstance(fut, dask_rs.Future):
        dask_rs.wait([fut])
    else:
        import distributed

        distributed.wait([fut])


def array_sum(c):
    import dask.array as da

    x = da.random.random((20000, 20000), chunks=1000)
    t = time.perf_counter()
    v = x.sum().compute()
    assert 1.99e8 < v < 2.01e8
    return {"array-sum": time.perf_counter() - t}


def array_transpose(c):
    import dask.array as da

    x = da.random.random((20000, 20000), chunks=1000)
    t = time.perf_counter()
    v = (x + x.T).mean().compute()
    assert 0.99 < v < 1.01
    return {"array-x+xT-mean": time.perf_counter() - t}


def dataframe_groupby(c, rows=10_000_000):
    import dask
    import pandas as pd

    start = pd.Timestamp("2000-01-01")
    df = dask.datasets.timeseries(
        start=start, end=start + pd.Timedelta(seconds=rows), freq="1s", partition_freq="1D", seed=1
    )
    t = time.perf_counter()
    out = df.groupby("name").x.mean().compute()
    assert len(out) > 10
    return {"df-groupby-mean": time.perf_counter() - t}


def _pid():
    return os.getpid()


def slow_task(x, seconds):
    time.sleep(seconds)
    return os.getpid()


def steal_skew(c, ntasks=24, seconds=0.2):
    """Makespan of long tasks whose one input sits on one of 4 workers, with
    work stealing on and off (each on its own fresh cluster)."""
    rs = type(c).__module__.startswith("dask_rs")
    out = {}
    for on in (True, False):
        if rs:
            from dask_rs import Client, LocalCluster

            cluster = LocalCluster(n_workers=4, threads_per_worker=1, work_stealing=on)
        else:
            import dask
            from distributed import Client, LocalCluster

            with dask.config.set({"distributed.scheduler.work-stealing": on}):
                cluster = LocalCluster(n_workers=4, threads_per_worker=1, dashboard_address=":0")
        with cluster, Client(cluster, set_as_default=False) as cl:
            cl.wait_for_workers(4)
            first = sorted(cl.nthreads())[0]
            data = cl.scatter(list(range(1000)), workers=[first])
            t = time.perf_counter()
            pids = cl.gather(cl.map(slow_task, [data] * ntasks, [seconds] * ntasks, pure=False))
            out["steal-skew-on" if on else "steal-skew-off"] = time.perf_counter() - t
            out["steal-skew-workers-on" if on else "steal-skew-workers-off"] = len(set(pids))
    return out


W = Workload
WORKLOADS = [
    W("roundtrip", "single-task round trip, median", "ms",
      lambda c, q: roundtrip(c, 200 if q else 500), quick=True),
    W("roundtrip-p99", "single-task round trip, p99", "ms", None),
    W("map-10000", "no-op map + gather, 10,000 tasks", "tasks/s",
      lambda c, q: noop_map(c, 10_000), quick=True),
    W("map-100000", "no-op map + gather, 100,000 tasks", "tasks/s",
      lambda c, q: noop_map(c, 100_000), reps=1),
    W("map-100000-viewed", "the same, 10 dashboard viewers + /metrics every second (median of 3)",
      "tasks/s", lambda c, q: viewed_map(c, 100_000), reps=1),
    W("watch-cost", "cost of watching: 3 unviewed vs 3 viewed maps, ABBA order, ratio of medians",
      "% slower", None),
    W("dashboard-cpu", "dashboard threads' CPU while viewed (median)", "% of a core", None),
    W("tree-10000", "tree reduction, 10,000 leaves", "s", lambda c, q: tree(c, 10_000, _pid())),
    W("chain-1000", "chain of 1,000 tasks", "s", lambda c, q: chain(c, 1000, _pid()), quick=True),
    W("merge-10000", "merge of 10,000 tasks into one", "s", lambda c, q: merge(c, 10_000, _pid())),
    W("transfer-1MB", "worker-to-worker 1 MB numpy", "MB/s", lambda c, q: transfer(c, 1, 9)),
    W("transfer-10MB", "worker-to-worker 10 MB numpy", "MB/s",
      lambda c, q: transfer(c, 10, 5), quick=True),
    W("transfer-100MB", "worker-to-worker 100 MB numpy", "MB/s", lambda c, q: transfer(c, 100, 3)),
    W("array-sum", "`random((20000, 20000), chunks=1000).sum()`", "s",
      lambda c, q: array_sum(c), reps=2),
    W("array-x+xT-mean", "`(x + x.T).mean()` on the same array", "s",
      lambda c, q: array_transpose(c), reps=2),
    W("df-groupby-mean", "dataframe groupby-mean, 10 million rows", "s",
      lambda c, q: dataframe_groupby(c), reps=2),
    W("steal-skew-on", "skewed: 24 x 0.2 s tasks, input on 1 of 4 workers, stealing on", "s",
      lambda c, q: steal_skew(c)),
    W("steal-skew-off", "the same with work stealing off", "s", None),
]
PER_CLUSTER = [
    ("startup", "local cluster start-up, 2 workers connected", "s"),
    ("idle-worker-rss", "idle worker process RSS", "MiB"),
]
LOWER_IS_BETTER = {"s", "ms", "MiB", "% of a core", "% slower"}


# --------------------------------------------------------------------------
# One repetition of one system, in its own process.


def child(system, names, quick):
    """Start a cluster, run the named workloads, print one JSON line."""
    import dask

    if system.startswith("dask-rs"):
        from dask_rs import Client, LocalCluster, Security

        kwargs = {"security": Security.temporary()} if system == "dask-rs-tls" else {}
    else:
        import distributed
        from distributed import Client, LocalCluster

        if system == "dask-inf":
            dask.config.set({"distributed.scheduler.worker-saturation": float("inf")})
        kwargs = {"dashboard_address": ":0"}
        if system == "dask-tls":
            kwargs["security"] = distributed.Security.temporary()
        assert distributed.__version__
    out = {}
    t = time.perf_counter()
    cluster = LocalCluster(n_workers=2, threads_per_worker=1, processes=True, **kwargs)
    client = Client(cluster)
    client.wait_for_workers(2)
    out["startup"] = time.perf_counter() - t
    addrs = sorted(client.nthreads())
    rss = [client.submit(worker_rss, workers=[a], pure=False).result()[1] for a in addrs]
    out["idle-worker-rss"] = statistics.mean(rss) / 2**20
    by_name = {w.name: w for w in WORKLOADS}
    for name in names:
        t = time.perf_counter()
        out.update(by_name[name].run(client, quick))
        print(f"  {system:9s} {name:18s} {time.perf_counter() - t:7.2f} s", file=sys.stderr, flush=True)
    client.close()
    cluster.close()
    print("RESULT " + json.dumps(out), flush=True)


# --------------------------------------------------------------------------
# Floors measured in the same run, and the scheduler alone.


def loopback_floor(rounds=20000, mb=200):
    """Loopback TCP between two processes: ping-pong round trip (us) and bulk MB/s."""
    code = (
        "import socket,sys\n"
        "s=socket.socket();s.bind(('127.0.0.1',0));s.listen(1)\n"
        "print(s.getsockname()[1],flush=True)\n"
        "c,_=s.accept();c.setsockopt(socket.IPPROTO_TCP,socket.TCP_NODELAY,1)\n"
        f"for _ in range({rounds}):\n"
        "    c.recv(1);c.sendall(b'x')\n"
        f"left={mb}*1000000;buf=bytearray(1<<20)\n"
        "while left>0:\n"
        "    left-=c.recv_into(buf)\n"
        "c.sendall(b'k')\n"
    )
    peer = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    try:
        port = int(peer.stdout.readline())
        s = socket.create_connection(("127.0.0.1", port))
        s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        t = time.perf_counter()
        for _ in range(rounds):
            s.sendall(b"x")
            s.recv(1)
        rtt = (time.perf_counter() - t) / rounds * 1e6
        chunk = memoryview(bytearray(8 << 20))
        t = time.perf_counter()
        left = mb * 1_000_000
        while left > 0:
            n = min(left, len(chunk))
            s.sendall(chunk[:n])
            left -= n
        assert s.recv(1) == b"k"
        bw = mb / (time.perf_counter() - t)
        s.close()
    finally:
        peer.wait(timeout=30)
    return {"loopback-rtt": rtt, "loopback-bw": bw}


def scheduler_alone(quick):
    """`cargo bench --bench scheduler_sim`: merge/tree with simulated workers."""
    cmd = ["cargo", "bench", "--quiet", "--bench", "scheduler_sim", "--"] + (["quick"] if quick else [])
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, check=True)
    line = next(x for x in proc.stdout.splitlines() if x.startswith("JSON "))
    return json.loads(line[5:])


# --------------------------------------------------------------------------
# The parent: schedule children, aggregate, write the table.


def run_child(system, names, quick):
    cmd = [sys.executable, __file__, "--child", system, "--workloads", ",".join(names)]
    if quick:
        cmd.append("--quick")
    proc = subprocess.run(cmd, stdout=subprocess.PIPE, text=True, timeout=1800)
    lines = [x for x in proc.stdout.splitlines() if x.startswith("RESULT ")]
    if proc.returncode != 0 or not lines:
        raise SystemExit(f"{system} run failed (exit {proc.returncode}); see its output above")
    return json.loads(lines[-1][7:])


def machine():
    model = ""
    try:
        with open("/proc/cpuinfo") as f:
            model = next((ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")), "")
    except OSError:
        pass
    import dask
    import distributed

    mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    return {
        "cpu": model,
        "cores": os.cpu_count(),
        "memory_gib": round(mem, 1),
        "kernel": platform.release(),
        "python": platform.python_version(),
        "dask": dask.__version__,
        "distributed": distributed.__version__,
    }


def speedup(unit, ours, theirs):
    if ours is None or theirs is None or ours == 0 or theirs == 0:
        return None
    return theirs / ours if unit in LOWER_IS_BETTER else ours / theirs


def fmt(v, unit):
    if v is None:
        return "-"
    if unit in ("tasks/s", "MB/s"):
        return f"{v:,.0f}"
    if unit == "ms":
        return f"{v:.3f}"
    if unit == "MiB":
        return f"{v:.1f}"
    if unit == "% slower":
        return f"{v:+.1f}"
    return f"{v:.3f}" if v < 10 else f"{v:.1f}"


def tls_table(report):
    """Encryption's cost, each runtime against itself in the same run."""
    pairs = [(t, p) for t, p in TLS_SYSTEMS.items() if t in report["systems"] and p in report["systems"]]
    rows = [r for r in report["rows"] if r["name"] in TLS_WORKLOADS | {"roundtrip-p99"}]
    if not pairs or not rows:
        return []
    head = ["workload", "unit"]
    for t, p in pairs:
        head += [SYSTEMS[p], SYSTEMS[t], f"{SYSTEMS[p]}: TLS cost"]
    out = ["", "TLS cost (the same runtime with and without encryption, same run; "
           "cost = how much slower with TLS):", "",
           "| " + " | ".join(head) + " |", "|" + "---|" * 2 + "---:|" * (len(head) - 2)]
    for r in rows:
        cells = [r["label"], r["unit"]]
        for t, p in pairs:
            plain, tls = r["median"].get(p), r["median"].get(t)
            cost = "-"
            if plain and tls:
                ratio = tls / plain if r["unit"] in LOWER_IS_BETTER else plain / tls
                cost = f"{(ratio - 1) * 100:+.0f}%"
            cells += [fmt(plain, r["unit"]), fmt(tls, r["unit"]), cost]
        out.append("| " + " | ".join(cells) + " |")
    return out


def table(report):
    systems = [s for s in report["systems"] if s not in TLS_SYSTEMS]
    rows = [r for r in report["rows"] if any(s in r["median"] for s in systems)]
    head = ["workload", "unit"] + [SYSTEMS[s] for s in systems]
    head += [f"speed-up vs {SYSTEMS[s]}" for s in systems if s != "dask-rs"]
    out = ["| " + " | ".join(head) + " |", "|" + "---|" * 2 + "---:|" * (len(head) - 2)]
    for r in rows:
        cells = [r["label"], r["unit"]] + [fmt(r["median"].get(s), r["unit"]) for s in systems]
        for s in systems:
            if s != "dask-rs":
                x = r["speedup"].get(s)
                cells.append("-" if x is None else f"{x:.2f}x")
        out.append("| " + " | ".join(cells) + " |")
    out += tls_table(report)
    f = report["floors"]
    out += [
        "",
        f"Floors measured in the same run: loopback TCP round trip {f['loopback-rtt']:.0f} us "
        f"(between two Python processes), loopback TCP bandwidth {f['loopback-bw']:,.0f} MB/s.",
        "",
        "Scheduler alone (simulated workers, no Python, no sockets):",
        "",
        "| workload | tasks | tasks/s | scheduler memory per task (bytes) |",
        "|---|---:|---:|---:|",
    ]
    for s in report["scheduler_alone"]:
        bpt = "-" if s["bytes_per_task"] is None else s["bytes_per_task"]
        out.append(f"| {s['workload']} | {s['tasks']:,} | {s['tasks_per_s']:,} | {bpt} |")
    out += [
        "",
        "Memory per task: heap bytes the scheduler holds once it took the whole graph, "
        "counted by the allocator.",
        "",
        "Published figures for the same shapes: HyperQueue states a per-task overhead below 0.1 ms "
        "(so at least 10,000 tasks/s through its server); RSDS (Böhm and Beránek, WORKS 2020) "
        "published merge and tree results as speed-up charts against Dask 2.x on 24 to 168 "
        "workers, not as tasks/s, so there is no absolute figure of theirs to set beside these.",
    ]
    m = report["machine"]
    out += [
        "",
        f"Machine: {m['cpu']}, {m['cores']} cores, {m['memory_gib']} GiB, Linux {m['kernel']}, "
        f"Python {m['python']}, dask {m['dask']}, distributed {m['distributed']}. "
        f"{report['repetitions']} repetition(s) per system, medians; speed-up > 1 means dask-rs is faster.",
    ]
    return "\n".join(out) + "\n"


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="small subset, one repetition (under 2 minutes)")
    p.add_argument("--reps", type=int, default=None, help="repetitions of the cheap workloads (default 3)")
    p.add_argument("--systems", default=None, help="comma-separated subset of " + ",".join(SYSTEMS))
    p.add_argument("--workloads", default=None, help="comma-separated subset of workload names")
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)
    p.add_argument("--out", default=None, help="results file stem (default bench/results/latest|quick)")
    a = p.parse_args()
    if a.child:
        return child(a.child, [w for w in a.workloads.split(",") if w], a.quick)

    default = ["dask-rs", "dask", "dask-rs-tls"] if a.quick else list(SYSTEMS)
    systems = a.systems.split(",") if a.systems else default
    for s in systems:
        if s not in SYSTEMS:
            p.error(f"unknown system {s!r}; choose from {', '.join(SYSTEMS)}")
    chosen = [w for w in WORKLOADS if w.run is not None and (w.quick or not a.quick)]
    if a.workloads:
        wanted = set(a.workloads.split(","))
        unknown = wanted - {w.name for w in WORKLOADS}
        if unknown:
            p.error(f"unknown workload(s) {sorted(unknown)}")
        chosen = [w for w in chosen if w.name in wanted]
    reps = 1 if a.quick else (a.reps or 3)
    started = time.time()
    samples = {s: {} for s in systems}
    for rep in range(reps):
        names = [w.name for w in chosen if rep < min(w.reps, reps)]
        order = systems if rep % 2 == 0 else systems[::-1]
        for s in order:
            todo = [n for n in names if n in TLS_WORKLOADS] if s in TLS_SYSTEMS else names
            if not todo:
                continue
            print(f"repetition {rep + 1}/{reps}: {SYSTEMS[s]}", file=sys.stderr, flush=True)
            for k, v in run_child(s, todo, a.quick).items():
                samples[s].setdefault(k, []).append(v)
    floors = loopback_floor(rounds=5000 if a.quick else 20000, mb=100 if a.quick else 400)
    sim = scheduler_alone(a.quick)

    measured = {k for s in systems for k in samples[s]}
    rows = []
    for name, label, unit in PER_CLUSTER + [(w.name, w.label, w.unit) for w in WORKLOADS]:
        if name not in measured:
            continue
        med = {s: statistics.median(samples[s][name]) for s in systems if samples[s].get(name)}
        rows.append({
            "name": name,
            "label": label,
            "unit": unit,
            "median": med,
            "samples": {s: samples[s].get(name, []) for s in systems},
            "speedup": {s: speedup(unit, med.get("dask-rs"), med.get(s)) for s in systems if s != "dask-rs"},
        })
    report = {
        "date": time.strftime("%Y-%m-%d %H:%M:%S"),
        "quick": a.quick,
        "repetitions": reps,
        "systems": systems,
        "machine": machine(),
        "rows": rows,
        "floors": floors,
        "scheduler_alone": sim,
        "wall_seconds": round(time.time() - started, 1),
    }
    stem = Path(a.out) if a.out else RESULTS / ("quick" if a.quick else "latest")
    stem.parent.mkdir(parents=True, exist_ok=True)
    stem.with_suffix(".json").write_text(json.dumps(report, indent=1) + "\n")
    md = table(report)
    stem.with_suffix(".md").write_text(md)
    print(md)
    print(f"written {stem.with_suffix('.md')} and .json in {report['wall_seconds']:.0f} s", file=sys.stderr)


if __name__ == "__main__":
    main()
