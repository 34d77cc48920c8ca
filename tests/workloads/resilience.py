"""Resilience as Dask's documentation describes it: kill a worker by its pid
(read from ``cluster.scheduler.workers``) while results live on it; the
results it held are computed again from their lineage, and the worker
process is started again.

Runs unchanged on distributed but for the import line."""

import os
import signal
import time

from dask_rs import Client, LocalCluster, wait


def inc(x):
    return x + 1


if __name__ == "__main__":
    with LocalCluster(n_workers=3, threads_per_worker=1, dashboard_address=None) as cluster, \
            Client(cluster) as client:
        futures = client.map(inc, range(60))
        wait(futures)
        victim = next(iter(cluster.scheduler.workers.values()))
        held = [f for f, ws in client.who_has(futures).items() if victim.address in ws]
        print("victim held results", len(held) > 0)
        os.kill(victim.pid, signal.SIGKILL)
        print("gathered", sum(client.gather(futures)))
        deadline = time.time() + 60
        while time.time() < deadline:
            pids = {w.pid for w in cluster.scheduler.workers.values()}
            if len(pids) == 3 and victim.pid not in pids:
                break
            time.sleep(0.1)
        print("workers", len(cluster.scheduler.workers), victim.pid not in pids)
        print("after", sum(client.gather(client.map(inc, range(100, 110)))))
