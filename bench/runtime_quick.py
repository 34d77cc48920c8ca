"""Quick figures for the dask-rs runtime on a local cluster: start-up time,
single-task round trip, and end-to-end no-op throughput.

Run with ``make bench-runtime``. Prints a markdown table; the side-by-side
comparison with Dask distributed is a separate suite.
"""

from __future__ import annotations

import statistics
import time

from dask_rs import Client, LocalCluster


def inc(x):
    return x + 1


def main(n_workers: int = 2, repeats: int = 3) -> None:
    rows = []
    t = time.perf_counter()
    cluster = LocalCluster(n_workers=n_workers, threads_per_worker=1)
    rows.append(("local cluster start-up, all workers connected", f"{time.perf_counter() - t:.3f} s"))
    with cluster, Client(cluster) as c:
        c.gather(c.map(inc, range(1000)))  # warm up connections and caches
        lat = []
        for i in range(1000):
            t = time.perf_counter()
            c.submit(inc, i, pure=False).result()
            lat.append(time.perf_counter() - t)
        lat.sort()
        median = statistics.median(lat) * 1e3
        rows.append(("round trip `submit(inc, i).result()`, median", f"{median:.3f} ms"))
        rows.append(("round trip, p99", f"{lat[int(len(lat) * 0.99)] * 1e3:.3f} ms"))
        for n in (10_000, 100_000):
            rates = []
            for _ in range(repeats if n <= 10_000 else 1):
                t = time.perf_counter()
                assert c.gather(c.map(inc, range(n), pure=False))[-1] == n
                rates.append(n / (time.perf_counter() - t))
            rate = statistics.median(rates)
            rows.append((f"no-op throughput, map + gather of {n:,} tasks", f"{rate:,.0f} tasks/s"))
    print(f"| measurement ({n_workers} worker processes x 1 thread) | value |")
    print("|---|---:|")
    for name, value in rows:
        print(f"| {name} | {value} |")


if __name__ == "__main__":
    main()
