"""Actors, as distributed's documentation shows them: a counter and a shared
cache, calls straight to the actor's worker in order, attribute reads,
``await``, the object's life, and its worker dying. Real scheduler and
worker processes (the ``cluster`` fixture's)."""

from __future__ import annotations

import asyncio
import signal
import threading

import pytest

from conftest import start_scheduler, start_worker
from dask_rs import Actor, ActorFuture, Client


class Counter:
    """The counter from distributed's documentation, written afresh."""

    n = 0

    def __init__(self, start=0):
        self.n = start
        self.thread = None

    def increment(self, by=1):
        self.n += by
        return self.n

    def where(self):
        import os

        return os.getpid(), threading.current_thread().name

    def fail(self):
        raise KeyError("no such entry")


class Cache:
    """A cache that tasks share through an actor."""

    def __init__(self):
        self.data = {}
        self.hits = 0

    def put(self, key, value):
        self.data[key] = value

    def get(self, key):
        if key in self.data:
            self.hits += 1
        return self.data.get(key)


def cached_square(cache, x):
    hit = cache.get(x).result()
    if hit is not None:
        return hit
    cache.put(x, x * x).result()
    return x * x


def test_the_counter(client):
    future = client.submit(Counter, 10, actor=True)
    counter = future.result()
    assert isinstance(counter, Actor)
    assert counter.increment().result() == 11
    calls = [counter.increment(2) for _ in range(20)]
    assert all(isinstance(c, ActorFuture) for c in calls)
    # In order, one at a time, on the actor's own thread.
    assert [c.result(timeout=10) for c in calls] == list(range(13, 52, 2))
    assert counter.n == 51
    pids = {counter.where().result()[0] for _ in range(3)}
    holder = client.who_has([future])[future.key][0]
    assert pids == {client.scheduler_info()["workers"][holder]["pid"]}
    assert counter.where().result()[1].startswith("actor-")
    with pytest.raises(KeyError, match="no such entry"):
        counter.fail().result()
    assert counter.increment().result() == 52, "a failing call leaves the actor alive"


def test_a_shared_cache_used_from_tasks(client):
    cache = client.submit(Cache, actor=True).result()
    first = client.gather(client.map(cached_square, [cache] * 10, range(10), pure=False))
    again = client.gather(client.map(cached_square, [cache] * 10, range(10), pure=False))
    assert first == again == [x * x for x in range(10)]
    assert cache.hits >= 10
    assert len(cache.data) == 10


def test_await_actor_calls(cluster):
    address, _ = cluster

    async def main():
        async with Client(address, asynchronous=True) as c:
            counter = await c.submit(Counter, actor=True)
            results = await asyncio.gather(*[counter.increment() for _ in range(5)])
            return sorted(results)

    assert asyncio.run(main()) == [1, 2, 3, 4, 5]


def test_map_makes_one_actor_per_input(client):
    counters = client.gather(client.map(Counter, [0, 100, 200], actor=True))
    assert [c.increment().result() for c in counters] == [1, 101, 201]
    assert len({c.key for c in counters}) == 3


def actor_keys():
    import gc

    from dask_rs.actors import _handles

    gc.collect()
    return list(_handles)


def test_an_actor_lives_while_its_future_or_a_proxy_is_held(client):
    import gc

    from conftest import wait_until

    def alive(key):
        return any(key in keys for keys in client.run(actor_keys).values())

    future = client.submit(Counter, actor=True)
    counter = future.result()
    key = counter.key
    assert counter.increment().result() == 1
    del future
    gc.collect()
    assert counter.increment().result() == 2, "the proxy keeps it alive"
    assert alive(key)
    del counter
    gc.collect()
    wait_until(lambda: not alive(key), msg="the actor gone with its last proxy")


def test_calls_to_an_actor_whose_worker_died_fail_clearly(procs):
    address = start_scheduler(procs)
    worker = start_worker(procs, address, "doomed")
    with Client(address) as c:
        c.wait_for_workers(1, timeout=20)
        counter = c.submit(Counter, actor=True).result()
        assert counter.increment().result() == 1
        worker.send_signal(signal.SIGKILL)
        worker.wait(10)
        with pytest.raises(RuntimeError, match=r"the actor Counter-\w+ is gone: its worker tcp://"):
            counter.increment().result(timeout=30)
