"""Graceful retirement: a retired worker's results move to other workers
before it closes, so futures keep their data (Adaptive relies on this)."""

from __future__ import annotations

import logging
import subprocess

from conftest import DASK_CTL, start_worker
from dask_rs import Client


def make(i, n):
    return bytes([i % 256]) * n


def test_retire_workers_moves_data_then_closes_the_worker(procs, caplog):
    p = procs.spawn([DASK_CTL, "scheduler", "--port", "0"], stdout=subprocess.PIPE, text=True)
    address = p.stdout.readline().split()[-1]
    a = start_worker(procs, address, "a")
    start_worker(procs, address, "b")
    with Client(address) as c:
        c.wait_for_workers(2, timeout=20)
        on_a = [c.submit(make, i, 200_000, workers=["a"], pure=False) for i in range(20)]
        on_b = [c.submit(make, i, 10, workers=["b"], pure=False) for i in range(5)]
        c.gather(on_a + on_b)
        addr_a = next(addr for addr, w in c.scheduler_info()["workers"].items() if w["name"] == "a")
        assert set(c.who_has(on_a).values()) == {(addr_a,)}

        retired = c.retire_workers(["a"])

        assert list(retired) == [addr_a]
        assert a.wait(10) == 0, "a retired worker exits cleanly"
        assert [w["name"] for w in c.scheduler_info()["workers"].values()] == ["b"]
        assert addr_a not in {h for hs in c.who_has(on_a).values() for h in hs}
        assert c.gather(on_a) == [make(i, 200_000) for i in range(20)]
        assert c.gather(on_b) == [make(i, 10) for i in range(5)]

        # The last worker holds data nobody else can take: as in distributed,
        # it is kept, the result leaves it out, and the reason is logged.
        with caplog.at_level(logging.WARNING, logger="dask_rs"):
            assert c.retire_workers(["b"]) == {}
            assert c.retire_workers(["nobody"]) == {}
        said = [r.getMessage() for r in caplog.records]
        assert "cannot retire b: no other worker can hold its data; it keeps running" in said, said
        assert any(m.startswith("cannot retire nobody: no such worker") for m in said), said
        assert [w["name"] for w in c.scheduler_info()["workers"].values()] == ["b"]
        assert c.gather(on_a[:2]) == [make(0, 200_000), make(1, 200_000)]
        assert c.submit(sum, [1, 2]).result(timeout=10) == 3


def test_worker_lifetime_retires_it_without_losing_data(procs):
    p = procs.spawn([DASK_CTL, "scheduler", "--port", "0"], stdout=subprocess.PIPE, text=True)
    address = p.stdout.readline().split()[-1]
    short = start_worker(procs, address, "short", extra=["--lifetime", "3s", "--lifetime-stagger", "0.5s"],
                         stdout=subprocess.PIPE, text=True)
    start_worker(procs, address, "long")
    with Client(address) as c:
        c.wait_for_workers(2, timeout=20)
        held = [c.submit(make, i, 100_000, workers=["short"], pure=False) for i in range(10)]
        c.gather(held)
        assert short.wait(15) == 0, "the worker left on its own, cleanly"
        assert "lifetime reached" in short.stdout.read()
        assert [w["name"] for w in c.scheduler_info()["workers"].values()] == ["long"]
        assert c.gather(held) == [make(i, 100_000) for i in range(10)]
