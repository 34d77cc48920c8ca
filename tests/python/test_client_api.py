"""Client API beyond submit/map/gather: tasks that launch tasks, coordination
primitives, and the cluster-wide calls. Real scheduler and worker processes."""

from __future__ import annotations

import pytest

from conftest import start_scheduler, start_worker
from dask_rs import Client, get_client, rejoin, secede, worker_client


def fib(n):
    if n < 2:
        return n
    with worker_client() as c:
        a, b = c.submit(fib, n - 1), c.submit(fib, n - 2)
        return a.result() + b.result()


def launch_and_sum(n):
    c = get_client()
    futures = c.map(lambda x: x * 2, range(n))
    secede()  # the documented pattern: leave the pool while waiting
    total = sum(c.gather(futures))
    rejoin()
    return total


def fib_plain(n):
    return n if n < 2 else fib_plain(n - 1) + fib_plain(n - 2)


@pytest.fixture
def one_thread(procs):
    """A scheduler and a single worker with a single thread."""
    address = start_scheduler(procs)
    start_worker(procs, address, "solo", nthreads=1)
    with Client(address) as c:
        c.wait_for_workers(1, timeout=20)
        yield c


def test_fibonacci_with_worker_client_does_not_deadlock_on_one_thread(one_thread):
    c = one_thread
    assert c.submit(fib, 14).result(timeout=60) == fib_plain(14)
    # Every fib key ran on the one worker; it is still usable afterwards.
    assert c.submit(sum, [1, 2, 3]).result(timeout=10) == 6


def test_get_client_inside_a_task_reaches_the_same_scheduler(client):
    assert client.submit(launch_and_sum, 10).result(timeout=30) == 90


def test_secede_and_rejoin_outside_a_task_are_clear_errors():
    with pytest.raises(ValueError, match="inside a task"):
        secede()
    with pytest.raises(ValueError, match="inside a task"):
        rejoin()
