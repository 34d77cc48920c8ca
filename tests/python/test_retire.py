"""Graceful retirement: a retired worker's results move to other workers
before it closes, so futures keep their data (Adaptive relies on this)."""

from __future__ import annotations

import logging
import subprocess
import threading

from conftest import DASK_CTL, start_worker, wait_until
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


def test_a_worker_kept_at_its_lifetime_asks_again_instead_of_losing_data(procs):
    """Two workers reach their lifetime together: the first leaves its results
    with the second, which then holds data nobody else can take. The
    scheduler keeps it; it asks again after a pause, and once a worker that
    can take the results has joined, it leaves with them moved, none lost."""
    p = procs.spawn([DASK_CTL, "scheduler", "--port", "0"], stdout=subprocess.PIPE, text=True)
    address = p.stdout.readline().split()[-1]
    pair = [start_worker(procs, address, n, extra=["--lifetime", "2s"], stderr=subprocess.PIPE, text=True)
            for n in ("t0", "t1")]
    with Client(address) as c:
        c.wait_for_workers(2, timeout=20)
        [on0] = c.scatter([make(0, 1000)], workers=["t0"])
        [on1] = c.scatter([make(1, 1000)], workers=["t1"])
        said = [[], []]
        for w, lines in zip(pair, said):
            threading.Thread(target=lambda w=w, lines=lines: lines.extend(w.stderr), daemon=True).start()
        wait_until(lambda: any("kept by the scheduler" in line for lines in said for line in lines),
                   timeout=20, msg="a worker kept at its lifetime")
        start_worker(procs, address, "newcomer")
        assert [w.wait(30) for w in pair] == [0, 0], "both retired, cleanly"
        assert [w["name"] for w in c.scheduler_info()["workers"].values()] == ["newcomer"]
        # Scattered data, which cannot be recomputed.
        assert c.gather([on0, on1]) == [make(0, 1000), make(1, 1000)]
