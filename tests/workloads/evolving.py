"""Evolving workflows: tasks that submit tasks (``worker_client``,
``get_client`` with ``secede``/``rejoin``), coordination primitives found
from inside tasks without passing a client, and ``client.sync`` running a
coroutine function as libraries such as xgboost.dask do.

Runs unchanged on distributed but for the import line."""

from dask_rs import Client, LocalCluster, Queue, Variable, get_client, rejoin, secede, worker_client


def fib(n):
    if n < 2:
        return n
    with worker_client() as c:
        a = c.submit(fib, n - 1)
        b = c.submit(fib, n - 2)
        return a.result() + b.result()


def inc(x):
    return x + 1


def fan_out(n):
    client = get_client()
    futures = client.map(inc, range(n))
    secede()
    total = sum(client.gather(futures))
    rejoin()
    return total


def producer(n):
    q = Queue("work")
    for i in range(n):
        q.put(i * 10)
    return Variable("scale").get()


def consumer(n):
    q = Queue("work")
    return sum(q.get(timeout=10) for _ in range(n))


async def train(client, n):
    futures = client.map(inc, range(n))
    results = await client.gather(futures)
    return sum(results)


if __name__ == "__main__":
    with LocalCluster(n_workers=2, threads_per_worker=1, dashboard_address=None) as cluster, \
            Client(cluster) as client:
        print("fib", client.submit(fib, 10).result())
        print("fan out", client.submit(fan_out, 20).result())
        Variable("scale").set(3)
        p = client.submit(producer, 5)
        c = client.submit(consumer, 5)
        print("queue", p.result(), c.result())
        print("sync", client.sync(train, client, 10))
