"""The dask-rs demo: a local cluster, a futures workload and a dask.array
computation, with what the scheduler saw (task groups, task stream, workers).

Run with ``make demo`` (or ``.venv/bin/python examples/demo.py``).
"""

from __future__ import annotations

import os
import shutil
import sys
import tempfile
import time

import dask.array as da
import numpy as np

from dask_rs import Client, LocalCluster, as_completed
from dask_rs.utils import format_bytes


def sample_pi(seed: int, n: int = 200_000) -> int:
    """Count random points of the unit square that fall inside the circle."""
    rng = np.random.default_rng(seed)
    xy = rng.random((n, 2))
    return int(((xy**2).sum(axis=1) <= 1.0).sum())


def linger(link: str | None) -> None:
    """Keep the cluster up so a person can look at the dashboard: until Enter
    at a terminal, else for DASK_RS_DEMO_LINGER seconds (default 0)."""
    if not link:
        return
    if sys.stdin.isatty():
        input(f"\nThe dashboard stays at {link} until you press Enter. ")
        return
    seconds = float(os.environ.get("DASK_RS_DEMO_LINGER", "0"))
    if seconds > 0:
        print(f"\nThe dashboard stays at {link} for {seconds:.0f} s.")
        time.sleep(seconds)


def main() -> None:
    t0 = time.perf_counter()
    cluster = LocalCluster(n_workers=2, threads_per_worker=1, memory_limit="2GiB")
    with cluster, Client(cluster) as client:
        print(f"Started {cluster!r} in {time.perf_counter() - t0:.2f} s")
        print(f"  {client!r}")
        print(f"  Dashboard: {cluster.dashboard_link}  (open it now to watch the work below)")
        # The console needs the cluster's token: a private copy it can read.
        creds_parent = tempfile.mkdtemp(prefix="dask-rs-demo-")
        creds = cluster.security.to_directory(os.path.join(creds_parent, "creds"))
        print(f"  Console:   target/release/dask-ctl tui --credentials {creds} {cluster.scheduler_address}")
        client.subscribe_events(0.1)

        # 1. Futures: a Monte Carlo estimate of pi from 200 tasks, reduced on the cluster.
        t = time.perf_counter()
        hits = client.map(sample_pi, range(200))
        done = sum(1 for _ in as_completed(hits))
        total = client.submit(sum, hits)
        pi = 4 * total.result() / (200 * 200_000)
        print(f"\nFutures: {done} sampling tasks + 1 reduction -> pi ~= {pi:.5f} "
              f"in {time.perf_counter() - t:.2f} s")

        # 2. dask.array: 800 MB of random numbers in 100 chunks, never all in memory at once.
        t = time.perf_counter()
        x = da.random.default_rng(0).random((10_000, 10_000), chunks=(1_000, 1_000))
        m = float((x + x.T).mean().compute())
        print(f"dask.array: (x + x.T).mean() over a 10000x10000 array = {m:.5f} (expect ~1.0) "
              f"in {time.perf_counter() - t:.2f} s")

        # 3. What the scheduler recorded, from its events API.
        time.sleep(0.3)
        groups: dict = {}
        workers: list = []
        stream = 0
        for update in client.events(1.0):
            groups.update(update["groups"])
            workers = update["workers"] or workers
            stream += len(update["stream"])
        print(f"\nScheduler events: {stream} task-stream records")
        print(f"  {'task group':<28}{'finished':>10}{'erred':>8}")
        for name, g in sorted(groups.items(), key=lambda kv: -kv[1]["forgotten"] - kv[1]["memory"])[:8]:
            finished = g["memory"] + g["forgotten"] + g["released"]
            print(f"  {name[:27]:<28}{finished:>10}{g['erred']:>8}")
        for w in workers:
            print(f"  worker {w['name']} at {w['address']}: {w['nkeys']} keys, "
                  f"{format_bytes(w['rss'])} RSS, {format_bytes(w['bytes_in'])} received from peers")
        linger(cluster.dashboard_link)
        shutil.rmtree(creds_parent, ignore_errors=True)
    print(f"\nCluster closed; total {time.perf_counter() - t0:.2f} s")


if __name__ == "__main__":
    main()
