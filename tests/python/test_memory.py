"""Memory management with real worker processes: results beyond the
memory limit are spilled to disk and read back transparently; the worker
processes stay under the terminate threshold."""

from __future__ import annotations

import os
import tempfile
import time

from conftest import start_scheduler, start_worker, wait_until
from dask_rs import Client

MB = 1_000_000
LIMIT = 300 * MB


def make_block(i, nbytes):
    import numpy as np

    return np.full(nbytes // 8, float(i))


def block_sum(a):
    return float(a.sum())


def test_intermediates_three_times_the_memory_limit_are_spilled_and_read_back(procs):
    address = start_scheduler(procs)
    workers = [start_worker(procs, address, f"m{i}", extra=["--memory-limit", str(LIMIT)]) for i in range(2)]
    nblocks, block = 180, 10 * MB  # 1.8 GB: three times the cluster's 600 MB
    with Client(address) as c:
        c.wait_for_workers(2, timeout=20)
        pids = {w["pid"] for w in c.scheduler_info()["workers"].values()}
        c.subscribe_events(0.1)
        blocks = c.map(make_block, range(nblocks), [block] * nblocks)
        c.gather(c.map(len, blocks))  # every block exists at once (held by `blocks`)

        def metric(name):
            return sum(w["metrics"][name] for w in c.scheduler_info()["workers"].values())

        # Spilling settles with each worker's results in memory at or under
        # its target (60% of the limit); heartbeats carry the figures.
        target = 2 * 0.6 * LIMIT
        wait_until(lambda: metric("managed_bytes") <= target and metric("spilled_bytes") > 0,
                   timeout=10, msg="results in memory to settle under the target")
        spilled, in_memory = metric("spilled_bytes"), metric("managed_bytes")
        assert spilled + in_memory >= nblocks * block * 0.99
        assert spilled >= nblocks * block - target, (spilled, in_memory)
        # Spilled blocks are read back for tasks, and for the client.
        sums = c.gather(c.map(block_sum, blocks))
        assert sums == [float(i) * block / 8 for i in range(nblocks)]
        assert c.gather(blocks[0]).sum() == 0 and c.gather(blocks[-1])[0] == nblocks - 1
        time.sleep(0.3)
        updates = c.events(1.0)
        seen = [w for u in updates for w in u["workers"]]
        assert max(w["spilled"] for w in seen) > 0, "the events API shows spilled bytes"
        assert max(w["rss"] for w in seen) < 0.95 * LIMIT, "workers stayed under the terminate threshold"
        assert {w["pid"] for w in c.scheduler_info()["workers"].values()} == pids, "no worker restarted"
        # The spills are in the task stream, a row of their own per worker, as distributed's disk-write.
        spills = [r for r in c.get_task_stream() if r["name"] == "disk-write"]
        assert spills and {r["worker"] for r in spills} <= set(c.scheduler_info()["workers"]), spills[:3]
        assert all(r["startstops"][-1]["action"] == "disk-write" for r in spills)
        assert all(s["stop"] >= s["start"] for r in spills for s in r["startstops"])
        print(f"spilled {spilled / 1e6:.0f} MB, {in_memory / 1e6:.0f} MB in memory; "
              f"peak worker RSS {max(w['rss'] for w in seen) / 1e6:.0f} MB of {LIMIT / 1e6:.0f} MB")
        del blocks
    assert all(w.poll() is None for w in workers)
    dirs = [os.path.join(tempfile.gettempdir(), f"dask-rs-spill-{w.pid}-m{i}") for i, w in enumerate(workers)]
    assert any(os.path.isdir(d) for d in dirs)
    for w in workers:
        w.terminate()
        # Stopped cleanly by the signal: 128 + SIGTERM, so that a supervisor would start it again.
        assert w.wait(10) == 128 + 15
    assert not any(os.path.exists(d) for d in dirs), "spill files removed when the worker stops"



def test_spill_files_go_under_local_directory_and_the_supervisor_removes_them_after_a_kill(procs, tmp_path):
    import signal

    scratch = tmp_path / "scratch" / "dask"  # made by the worker
    address = start_scheduler(procs)
    start_worker(procs, address, "k", extra=["--nworkers", "1", "--memory-limit", str(LIMIT),
                                             "--local-directory", str(scratch)])
    with Client(address) as c:
        c.wait_for_workers(1, timeout=20)
        pid = next(iter(c.scheduler_info()["workers"].values()))["pid"]
        blocks = c.map(make_block, range(24), [10 * MB] * 24)  # 240 MB: beyond the 180 MB target
        assert c.gather(c.map(block_sum, blocks))[-1] == 23 * 10 * MB / 8
        spill_dir = str(scratch / f"dask-rs-spill-{pid}-k")
        wait_until(lambda: os.path.isdir(spill_dir) and os.listdir(spill_dir), timeout=10, msg="spill files")
        assert not os.path.exists(os.path.join(tempfile.gettempdir(), f"dask-rs-spill-{pid}-k"))
        os.kill(pid, signal.SIGKILL)
        wait_until(lambda: not os.path.exists(spill_dir), timeout=10, msg="spill directory removed")
        # The supervisor started a fresh worker under the same name.
        wait_until(lambda: [w["pid"] for w in c.scheduler_info()["workers"].values() if w["name"] == "k"]
                   not in ([], [pid]), timeout=20, msg="a fresh worker")


def test_an_unusable_local_directory_is_a_clear_error_at_start(procs, tmp_path):
    import subprocess

    afile = tmp_path / "not-a-dir"
    afile.write_text("")
    address = start_scheduler(procs)
    w = start_worker(procs, address, "bad", extra=["--local-directory", str(afile / "sub")],
                     stderr=subprocess.PIPE)
    assert w.wait(20) == 1
    err = w.stderr.read().decode()
    assert f"--local-directory {afile / 'sub'}" in err and "Not a directory" in err, err
