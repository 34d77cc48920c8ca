"""The asynchronous API, as distributed's: ``Client(asynchronous=True)``,
``await`` on futures and client methods, ``async with``, ``async for`` over
``as_completed``, and ``client.sync``. Real scheduler and worker processes.

Each scenario is written against the ``distributed`` names it uses, so the
same body runs with ``distributed`` (see `test_the_same_scenario_agrees_with_distributed`)."""

from __future__ import annotations

import asyncio
import operator

import pytest

import dask_rs


def after(seconds, value):
    import time

    time.sleep(seconds)
    return value


async def scenario(mod, address, security=None):
    """What an async web service or notebook does; returns what it saw."""
    seen = {}
    async with mod.Client(address, asynchronous=True, security=security) as c:
        seen["asynchronous"] = c.asynchronous
        f = c.submit(operator.add, 1, 2)
        seen["await future"] = await f
        seen["await result()"] = await f.result()
        fs = c.map(operator.neg, range(10))
        seen["gather"] = await c.gather(fs)
        done, not_done = await mod.wait(fs)
        seen["wait"] = (len(done), len(not_done))
        order = []
        async for fut in mod.as_completed([c.submit(after, 0.5, "slow"), c.submit(after, 0, "fast")]):
            order.append(await fut)
        seen["as_completed"] = order
        with_results = [r async for _, r in mod.as_completed(c.map(operator.mul, range(4), range(4)),
                                                             with_results=True)]
        seen["as_completed with_results"] = sorted(with_results)
        [s] = await c.scatter([42])
        seen["scatter"] = await s
        bad = c.submit(operator.truediv, 1, 0)
        with pytest.raises(ZeroDivisionError):
            await bad
        seen["exception"] = type(await bad.exception()).__name__
        # Many awaits at once: none blocks the event loop or another.
        seen["asyncio.gather"] = await asyncio.gather(*[c.submit(operator.add, i, 1) for i in range(20)])
        seen["compute"] = await c.compute(_delayed_sum())

        async def inside(n):
            return await c.gather(c.map(operator.add, range(n), range(n)))

        seen["sync in the loop"] = await c.sync(inside, 3)
        seen["run"] = sorted((await c.run(lambda: 7)).values())[:1]
    seen["closed"] = c.status
    return seen


def _delayed_sum():
    import dask

    return dask.delayed(sum)([dask.delayed(operator.add)(i, i) for i in range(5)])


EXPECTED = {
    "asynchronous": True,
    "await future": 3,
    "await result()": 3,
    "gather": [-i for i in range(10)],
    "wait": (10, 0),
    "as_completed": ["fast", "slow"],
    "as_completed with_results": [0, 1, 4, 9],
    "scatter": 42,
    "exception": "ZeroDivisionError",
    "asyncio.gather": list(range(1, 21)),
    "compute": 20,
    "sync in the loop": [0, 2, 4],
    "run": [7],
    "closed": "closed",
}


def test_the_async_api_in_an_event_loop(cluster):
    address, _ = cluster
    seen = asyncio.run(scenario(dask_rs, address))
    assert seen == EXPECTED


def test_the_same_scenario_agrees_with_distributed():
    distributed = pytest.importorskip("distributed")

    async def main():
        async with distributed.LocalCluster(n_workers=2, threads_per_worker=1, processes=False,
                                            dashboard_address=None, asynchronous=True) as cl:
            return await scenario(distributed, cl.scheduler_address)

    assert asyncio.run(main()) == EXPECTED


def test_await_client_and_a_local_cluster_made_in_the_loop():
    async def main():
        async with dask_rs.LocalCluster(n_workers=1, threads_per_worker=1, dashboard_address=None,
                                        asynchronous=True) as cl:
            client = await dask_rs.Client(cl, asynchronous=True)
            try:
                assert await client.submit(operator.mul, 6, 7) == 42
                assert len(client.scheduler_info()["workers"]) == 1
            finally:
                await client.close()
            assert client.status == "closed"
        assert cl.status == "closed"

    asyncio.run(main())


def test_an_async_client_must_be_awaited_before_use():
    c = dask_rs.Client("tcp://127.0.0.1:1", asynchronous=True)
    with pytest.raises(RuntimeError, match="has not started"):
        c.submit(operator.add, 1, 2)


def test_a_dead_scheduler_is_a_clear_error_in_the_loop_too():
    async def main():
        await dask_rs.Client("tcp://127.0.0.1:1", asynchronous=True, timeout=1)

    with pytest.raises(OSError, match="127.0.0.1:1"):
        asyncio.run(main())


def test_sync_runs_coroutines_for_a_synchronous_client(client):
    """Libraries such as xgboost.dask call ``client.sync(coroutine_function)``
    on a synchronous client; inside, the client's methods are awaitable."""

    async def train(client, n):
        assert client.asynchronous
        futures = client.map(operator.mul, range(n), range(n))
        total = sum(await client.gather(futures))
        info = await client.who_has(futures)
        return total, len(info)

    assert client.sync(train, client, 4) == (14, 4)
    assert client.sync(lambda x: x + 1, 1) == 2
    with pytest.raises(ZeroDivisionError):
        client.sync(_raises)
    # And outside, nothing changed: plain blocking calls.
    assert not client.asynchronous
    assert client.submit(operator.add, 2, 2).result() == 4


async def _raises():
    return 1 / 0


def test_as_current_makes_a_client_current_and_leaves_it_open(cluster):
    from dask_rs import Client, default_client

    address, _ = cluster
    a = Client(address)
    b = Client(address, set_as_default=False)
    try:
        with b.as_current():
            assert default_client() is b
            assert dask_rs.Client.current() is b
        assert default_client() is a
        assert b.status == "running" and b.submit(operator.add, 1, 1).result() == 2
    finally:
        b.close()
        a.close()
