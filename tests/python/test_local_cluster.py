"""LocalCluster and Client() with no address."""

from __future__ import annotations

import os

import pytest

from dask_rs import Client, LocalCluster


def test_local_cluster_layout_memory_and_cleanup():
    with LocalCluster(n_workers=2, threads_per_worker=2, memory_limit="1GiB") as cluster:
        pids = [p.pid for p in cluster.workers.values()]
        with Client(cluster) as c:
            info = c.scheduler_info()["workers"]
            assert len(info) == 2
            assert {w["nthreads"] for w in info.values()} == {2}
            assert {w["memory_limit"] for w in info.values()} == {2**30}
            assert c.submit(sum, [1, 2, 3]).result() == 6
            assert "LocalCluster" in repr(cluster)
    for pid in pids:
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)


def test_client_without_address_starts_a_local_cluster():
    with Client(n_workers=1, threads_per_worker=1) as c:
        assert len(c.scheduler_info()["workers"]) == 1
        cluster = c.cluster
        assert c.submit(pow, 2, 10).result() == 1024
    assert cluster.status == "closed"


def test_threaded_workers_in_process():
    with LocalCluster(n_workers=2, processes=False) as cluster, Client(cluster) as c:
        assert c.gather(c.map(abs, [-1, -2, -3])) == [1, 2, 3]


def test_bad_arguments():
    with pytest.raises(TypeError, match="unexpected keyword"):
        LocalCluster(n_workers=1, wokers=3)
    with pytest.raises(ValueError, match="could not interpret"):
        LocalCluster(n_workers=1, memory_limit="a lot")
    with pytest.raises(RuntimeError, match="--local-directory /proc/nope: No such file"):
        LocalCluster(n_workers=1, local_directory="/proc/nope")
    with pytest.raises(OSError, match="--local-directory /proc/nope"):
        LocalCluster(n_workers=1, processes=False, local_directory="/proc/nope")


def test_a_crashed_worker_process_is_restarted_under_the_same_name():
    import os
    import signal

    from conftest import wait_until

    with LocalCluster(n_workers=2, threads_per_worker=1) as cluster, Client(cluster) as c:
        info = c.scheduler_info()["workers"]
        victim = next(w for w in info.values() if w["name"] == "0")
        os.kill(victim["pid"], signal.SIGKILL)

        def back():
            ws = c.scheduler_info()["workers"].values()
            return len(ws) == 2 and any(w["name"] == "0" and w["pid"] != victim["pid"] for w in ws)

        wait_until(back, timeout=20, msg="worker 0 restarted")
        assert cluster.restarts == 1
        assert c.gather(c.map(abs, range(-4, 0))) == [4, 3, 2, 1]
        cluster.scale(1)  # a worker stopped on purpose stays stopped
        wait_until(lambda: len(c.scheduler_info()["workers"]) == 1, msg="scale down")
        import time

        time.sleep(0.5)
        assert len(c.scheduler_info()["workers"]) == 1 and cluster.restarts == 1


def test_restart_cancels_futures_and_brings_every_worker_back_fresh():
    from concurrent.futures import CancelledError

    with LocalCluster(n_workers=2, threads_per_worker=1) as cluster, Client(cluster) as c:
        pids = {w["pid"] for w in c.scheduler_info()["workers"].values()}
        x = c.submit(sum, [1, 2])
        assert x.result(timeout=10) == 3
        c.restart(timeout=30)
        info = c.scheduler_info()["workers"].values()
        assert sorted(w["name"] for w in info) == ["0", "1"]
        assert not pids & {w["pid"] for w in info}, "fresh processes"
        with pytest.raises(CancelledError, match="restarted"):
            x.result(timeout=5)
        assert c.submit(sum, [1, 2], pure=False).result(timeout=10) == 3


def test_cluster_objects_as_notebooks_read_them_and_a_stopped_worker_comes_back():
    import signal

    from conftest import wait_until

    with LocalCluster(n_workers=2, threads_per_worker=1, name="nb", dashboard_address=None) as cluster:
        assert cluster.name == "nb"
        cluster.wait_for_workers(2, timeout=10)
        workers = cluster.scheduler.workers
        assert cluster.scheduler.address == cluster.scheduler_address
        assert sorted(w.name for w in workers.values()) == ["0", "1"]
        assert {w.pid for w in workers.values()} == {p.pid for p in cluster.workers.values()}
        assert set(cluster.scheduler_info["workers"]) == set(workers)
        # SIGTERM, not a crash: the worker exits cleanly, and as under
        # distributed's nanny it is started again under its name.
        victim = next(w for w in workers.values() if w.name == "0")
        os.kill(victim.pid, signal.SIGTERM)

        def back():
            ws = cluster.scheduler.workers.values()
            return len(ws) == 2 and any(w.name == "0" and w.pid != victim.pid for w in ws)

        wait_until(back, timeout=20, msg="worker 0 started again")
        logs = cluster.get_logs()
        assert "worker 0 exited with status 143; restarted" in logs["Cluster"], logs["Cluster"]
        assert set(logs) >= {"Cluster", "Scheduler", *cluster.scheduler.workers}
        with Client(cluster) as c:
            assert c.gather(c.map(abs, range(-3, 0))) == [3, 2, 1]


def test_distributed_keywords_are_honoured_or_warned_about_once():
    import logging
    import warnings

    from dask_rs._worker import total_memory

    with pytest.warns(UserWarning, match=r"worker_dashboard_address=...\) has no effect"):
        cluster = LocalCluster(
            n_workers=1, memory_limit=0.5, env={"DASK_RS_TEST_ENV": "here"}, silence_logs=logging.ERROR,
            worker_dashboard_address=":0", scheduler_kwargs={"dashboard": False}, nthreads=2,
        )
    with cluster, Client(cluster) as c:
        info = next(iter(c.scheduler_info()["workers"].values()))
        assert info["memory_limit"] == int(total_memory() * 0.5), "a fraction of the machine's memory"
        assert info["nthreads"] == 2
        assert list(c.run(os.getenv, "DASK_RS_TEST_ENV").values()) == ["here"]
        assert cluster.dashboard_link is None
        assert logging.getLogger("dask_rs").level == logging.ERROR
    logging.getLogger("dask_rs").setLevel(logging.NOTSET)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # once is enough
        LocalCluster(n_workers=0, worker_dashboard_address=":0", dashboard_address=None).close()
    with pytest.raises(TypeError, match="scheduler_kwargs"):
        LocalCluster(n_workers=0, scheduler_kwargs={"validate": True})
    with pytest.raises(ValueError, match="processes=True"):
        LocalCluster(n_workers=1, processes=False, env={"A": "1"})


def test_adapt_grows_with_the_load_and_shrinks_without_losing_results():
    from conftest import wait_until

    def nap(x):  # defined here: it travels by value to the cluster's workers
        import time

        time.sleep(0.4)
        return x

    with LocalCluster(n_workers=0, threads_per_worker=1, dashboard_address=None) as cluster, \
            Client(cluster) as c:
        adaptive = cluster.adapt(minimum=1, maximum=3, target_duration="1s", wait_count=2, interval="100ms")
        wait_until(lambda: len(cluster.scheduler.workers) == 1, timeout=20, msg="the minimum")
        futures = c.map(nap, range(24))  # about 10 s of work for one thread
        wait_until(lambda: len(cluster.scheduler.workers) == 3, timeout=20, msg="growth to the maximum")
        assert c.gather(futures) == list(range(24))
        # Idle: back to the minimum, the retired workers' results moved first.
        wait_until(lambda: len(cluster.scheduler.workers) == 1, timeout=30, msg="shrink to the minimum")
        assert c.gather(futures) == list(range(24))
        kinds = {d["kind"] for d in adaptive.log}
        assert {"scale_up", "retire"} <= kinds, adaptive.log
        assert cluster.restarts == 0
        cluster.scale(2)  # scale stops adapting
        wait_until(lambda: len(cluster.scheduler.workers) == 2, timeout=20, msg="scale(2)")
        import time

        time.sleep(0.5)
        assert len(cluster.scheduler.workers) == 2
    with pytest.raises(ValueError, match="below minimum"):
        with LocalCluster(n_workers=0, dashboard_address=None) as cluster:
            cluster.adapt(minimum=3, maximum=1)


EXIT_SCRIPT = """
import sys, time
from dask_rs import Client, LocalCluster
import dask_rs.client, dask_rs.cluster

order = open(sys.argv[1], "a")
for cls, what in ((dask_rs.client.Client, "client"), (dask_rs.cluster.LocalCluster, "cluster")):
    def wrap(close, what=what):
        def traced(self, *a, **k):
            if getattr(self, "status", None) not in ("closed",):
                order.write(what + "\\n"); order.flush()
            return close(self, *a, **k)
        return traced
    cls._close = wrap(cls._close)

def slow(i):
    time.sleep(0.2)
    return i

cluster = LocalCluster(n_workers=2, threads_per_worker=2, processes=False, dashboard_address=None)
client = Client(cluster)
held = client.map(slow, range(8))
print(sum(client.gather(held)))
client.map(slow, range(100, 120))  # still running at exit
"""


def test_a_script_that_never_closes_exits_cleanly_clients_first(tmp_path):
    import subprocess
    import sys

    script = tmp_path / "never_closes.py"
    script.write_text(EXIT_SCRIPT)
    for run in range(3):
        trace = tmp_path / f"order-{run}"
        p = subprocess.run([sys.executable, str(script), str(trace)], capture_output=True, text=True,
                           timeout=60)
        assert p.returncode == 0 and p.stdout.strip() == "28", (p.returncode, p.stdout, p.stderr[-2000:])
        assert "Fatal Python error" not in p.stderr
        # Clients close before clusters: nothing is recomputed on workers that are shutting down.
        assert trace.read_text().split() == ["client", "cluster"]


def test_scaling_down_moves_results_to_the_workers_that_stay():
    with LocalCluster(n_workers=3, threads_per_worker=1, dashboard_address=None) as cluster, \
            Client(cluster) as c:
        data = c.scatter([list(range(i, i + 1000)) for i in range(9)], hash=False)
        assert len({a for f in data for a in c.who_has([f])[f.key]}) == 3, "spread over the three"
        cluster.scale(1)
        assert len(cluster.scheduler.workers) == 1
        # Scattered data cannot be recomputed: it was moved before the workers left.
        assert c.gather(data) == [list(range(i, i + 1000)) for i in range(9)]
