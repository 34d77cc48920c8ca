"""The asynchronous API in an event loop, as an async web service or a
notebook using ``await`` has it.

Runs unchanged on distributed but for the import line."""

import asyncio
import operator

from dask_rs import Client, LocalCluster, as_completed, wait


def slow(x, seconds):
    import time

    time.sleep(seconds)
    return x


async def main():
    async with LocalCluster(n_workers=2, threads_per_worker=1, dashboard_address=None,
                            asynchronous=True) as cluster:
        async with Client(cluster, asynchronous=True) as client:
            print("await", await client.submit(operator.add, 1, 2))
            futures = client.map(operator.neg, range(10))
            print("gather", await client.gather(futures))
            done, _ = await wait(futures)
            print("wait", len(done))
            order = [await f async for f in as_completed([client.submit(slow, "slow", 0.5),
                                                        client.submit(slow, "fast", 0.0)])]
            print("as_completed", order)
            [x] = await client.scatter([41])
            print("scatter", await client.submit(operator.add, x, 1))
            squares = [client.submit(operator.mul, i, i) for i in range(6)]
            print("many at once", await asyncio.gather(*squares))
            try:
                await client.submit(operator.getitem, {}, "missing")
            except KeyError as e:
                print("raised", type(e).__name__, e)


if __name__ == "__main__":
    asyncio.run(main())
