"""Futures, as Dask's documentation shows them: submit and map, futures as
arguments, a tree reduction, scatter, as_completed, wait, errors.

Runs unchanged on distributed but for the import line."""

import operator
import time

from dask_rs import Client, LocalCluster, as_completed, wait


def inc(x):
    return x + 1


def add(x, y):
    return x + y


def slow_square(x):
    time.sleep(0.02 * (x % 3))
    return x * x


if __name__ == "__main__":
    with LocalCluster(n_workers=2, threads_per_worker=2, dashboard_address=None) as cluster, \
            Client(cluster) as client:
        a = client.submit(inc, 10)
        b = client.submit(inc, 20)
        print("add", client.submit(add, a, b).result())
        futures = client.map(inc, range(100))
        print("sum", client.submit(sum, futures).result())
        while len(futures) > 1:
            futures = [client.submit(add, futures[i], futures[i + 1]) if i + 1 < len(futures) else futures[i]
                       for i in range(0, len(futures), 2)]
        print("tree", futures[0].result())
        [data] = client.scatter([list(range(1000))])
        print("scatter", client.submit(len, data).result())
        squares = client.map(slow_square, range(10))
        print("as_completed", sorted(f.result() for f in as_completed(squares)))
        pairs = as_completed(client.map(inc, range(5)), with_results=True)
        print("with_results", sorted(r for _, r in pairs))
        done, not_done = wait(squares)
        print("wait", len(done), len(not_done))
        print("gather nested", client.gather({"a": [a, b], "b": (a,)}))
        bad = client.submit(operator.truediv, 1, 0)
        try:
            bad.result()
        except ZeroDivisionError as e:
            print("raised", type(e).__name__, e)
        print("status", bad.status, type(bad.exception()).__name__)
        print("depends on error", client.submit(inc, bad).status in ("pending", "error"))
