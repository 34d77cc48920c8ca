"""Failures that cost time, not answers: retries, tasks that kill their
workers, and workers that go silent. Real scheduler and worker processes."""

from __future__ import annotations

import os
import signal
import subprocess
import time

import pytest

from conftest import DASK_CTL, start_worker, wait_until
from dask_rs import Client, KilledWorker


def fail_first(path, times):
    """Raise the first `times` calls (counted in a file), then succeed."""
    n = int(open(path).read()) if os.path.exists(path) else 0
    with open(path, "w") as f:
        f.write(str(n + 1))
    if n < times:
        raise OSError(f"transient failure {n + 1}")
    return n + 1


def die(_):
    os._exit(1)


def scheduler(procs, *flags):
    p = procs.spawn([DASK_CTL, "scheduler", "--port", "0", *flags], stdout=subprocess.PIPE, text=True)
    return p.stdout.readline().split()[-1]


def test_retries_rerun_failing_tasks(client, tmp_path):
    f = client.submit(fail_first, str(tmp_path / "a"), 2, retries=2, pure=False)
    assert f.result(timeout=20) == 3
    g = client.submit(fail_first, str(tmp_path / "b"), 2, retries=1, pure=False)
    with pytest.raises(OSError, match="transient failure 2"):
        g.result(timeout=20)


def test_task_killing_its_workers_errs_with_killed_worker(procs):
    address = scheduler(procs, "--allowed-failures", "1")
    workers = [start_worker(procs, address, f"k{i}") for i in range(3)]
    with Client(address) as c:
        c.wait_for_workers(3, timeout=20)
        bomb = c.submit(die, 1, pure=False)
        with pytest.raises(KilledWorker, match="KilledWorker: attempted to run task die-"):
            bomb.result(timeout=30)
        wait_until(lambda: sum(w.poll() is not None for w in workers) == 2, msg="two workers to die")
        assert c.scheduler_info()["workers"], "and then it stopped: one worker is left"
        # Other work still completes on the surviving worker.
        assert c.gather(c.map(abs, range(-5, 0))) == [5, 4, 3, 2, 1]


def test_silent_worker_is_removed_after_ttl(procs):
    address = scheduler(procs, "--worker-ttl", "1s")
    w = start_worker(procs, address, "sleepy")
    with Client(address) as c:
        c.wait_for_workers(1, timeout=20)
        os.kill(w.pid, signal.SIGSTOP)
        try:
            wait_until(lambda: not c.scheduler_info()["workers"], timeout=10, msg="silent worker removed")
        finally:
            os.kill(w.pid, signal.SIGCONT)
        # Once resumed, the worker finds itself closed and exits.
        assert w.wait(15) is not None


def test_supervisor_restarts_dead_workers_and_forwards_sigterm(procs):
    address = scheduler(procs)
    sup = start_worker(procs, address, "sup", extra=["--nworkers", "2"])
    with Client(address) as c:
        c.wait_for_workers(2, timeout=20)
        info = c.scheduler_info()["workers"]
        assert sorted(w["name"] for w in info.values()) == ["sup-0", "sup-1"]
        victim = next(w for w in info.values() if w["name"] == "sup-0")
        os.kill(victim["pid"], signal.SIGKILL)

        def restarted():
            ws = c.scheduler_info()["workers"].values()
            return any(w["name"] == "sup-0" and w["pid"] != victim["pid"] for w in ws) and len(ws) == 2

        wait_until(restarted, timeout=20, msg="sup-0 restarted")
        assert c.gather(c.map(abs, range(-20, 0))) == list(range(20, 0, -1))
        pids = [w["pid"] for w in c.scheduler_info()["workers"].values()]
    sup.send_signal(signal.SIGTERM)
    assert sup.wait(10) == 0
    for pid in pids:
        wait_until(lambda pid=pid: not _alive(pid), timeout=10, msg=f"worker {pid} to exit")


def test_supervised_workers_come_back_after_a_scheduler_restart(procs):
    p = procs.spawn([DASK_CTL, "scheduler", "--port", "0"], stdout=subprocess.PIPE, text=True)
    address = p.stdout.readline().split()[-1]
    port = address.rsplit(":", 1)[1]
    start_worker(procs, address, "back", extra=["--nworkers", "2"])
    with Client(address) as c:
        c.wait_for_workers(2, timeout=20)
    p.kill()
    p.wait()
    procs.spawn([DASK_CTL, "scheduler", "--port", port], stdout=subprocess.DEVNULL)
    t = time.monotonic()
    for _ in range(100):
        try:
            c = Client(address, timeout=1)
            break
        except OSError:
            time.sleep(0.1)
    with c:
        c.wait_for_workers(2, timeout=20)
        rejoined = time.monotonic() - t
        assert c.submit(sum, [1, 2, 3]).result(timeout=10) == 6
    assert rejoined < 5, f"workers re-registered after {rejoined:.1f} s"


def test_workers_and_the_same_client_reconnect_to_a_restarted_scheduler(procs):
    from concurrent.futures import CancelledError

    p = procs.spawn([DASK_CTL, "scheduler", "--port", "0"], stdout=subprocess.PIPE, text=True)
    address = p.stdout.readline().split()[-1]
    port = address.rsplit(":", 1)[1]
    workers = [start_worker(procs, address, f"r{i}") for i in range(2)]
    with Client(address) as c:
        c.wait_for_workers(2, timeout=20)
        before = c.submit(sum, [1, 2, 3])
        assert before.result(timeout=10) == 6
        slow = c.submit(time.sleep, 3, pure=False)
        p.kill()
        p.wait()
        with pytest.raises(CancelledError, match="lost: the connection to the scheduler"):
            slow.result(timeout=10)
        t = time.monotonic()
        procs.spawn([DASK_CTL, "scheduler", "--port", port], stdout=subprocess.DEVNULL)
        wait_until(lambda: len(_workers_or_none(c)) == 2, timeout=10, interval=0.05,
                   msg="workers to re-register")
        rejoined = time.monotonic() - t
        print(f"workers re-registered {rejoined:.2f} s after the scheduler restarted")
        assert rejoined < 5
        assert all(w.poll() is None for w in workers), "plain workers reconnected instead of exiting"
        with pytest.raises(CancelledError, match="lost"):
            before.result(timeout=5)
        assert c.submit(sum, [4, 5, 6], pure=False).result(timeout=10) == 15
        assert c.gather(c.map(abs, range(-10, 0))) == list(range(10, 0, -1))


def test_lifetime_restart_retires_then_starts_a_fresh_worker(procs):
    address = scheduler(procs)
    start_worker(procs, address, "keeper")
    start_worker(procs, address, "lt", extra=["--nworkers", "1", "--lifetime", "3s", "--lifetime-restart"],
                 stderr=subprocess.DEVNULL)
    with Client(address) as c:
        c.wait_for_workers(2, timeout=20)
        old = next(w["pid"] for w in c.scheduler_info()["workers"].values() if w["name"] == "lt")
        x = c.submit(sum, [1, 2, 3], workers=["lt"])
        assert x.result(timeout=10) == 6

        def fresh():
            ws = c.scheduler_info()["workers"].values()
            return any(w["name"] == "lt" and w["pid"] != old for w in ws)

        wait_until(fresh, timeout=20, msg="a fresh lt worker")
        assert not _alive(old)
        # The result was moved off before the old process left.
        assert x.result(timeout=10) == 6 and c.who_has([x])[x.key]


def _workers_or_none(c):
    try:
        return c.scheduler_info()["workers"]
    except Exception:  # still reconnecting
        return {}


def _alive(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie child of the supervisor counts as gone.
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(")")[-1].split()[0] != "Z"
    except OSError:
        return False


def test_chaos_sigkill_every_two_seconds_gives_the_right_answer(procs, record_property):
    """A 20,000-task reduction on 4 supervised workers; one is SIGKILLed every
    2 s while it runs (at most 10 times, to keep the test's duration bounded)."""
    import random
    import threading

    import chaos_funcs

    address = scheduler(procs, "--allowed-failures", "50")
    start_worker(procs, address, "chaos", extra=["--nworkers", "4"], stderr=subprocess.DEVNULL)
    with Client(address) as c:
        c.wait_for_workers(4, timeout=20)
        c.subscribe_events(0.1)
        c.events(2.0)
        stop = threading.Event()
        kills = []

        def killer():
            rng = random.Random(0)
            while not stop.wait(2.0) and len(kills) < 10:
                ws = list(c.scheduler_info()["workers"].values())
                if ws:
                    victim = rng.choice(ws)["pid"]
                    os.kill(victim, signal.SIGKILL)
                    kills.append(victim)

        threading.Thread(target=killer, daemon=True).start()
        try:
            level = c.map(chaos_funcs.leaf, range(10_000), pure=False)
            while len(level) > 1:
                odd = level[-1:] if len(level) % 2 else []
                pairs = list(zip(level[0::2], level[1::2])) + [(f, 0) for f in odd]
                level = [c.submit(chaos_funcs.combine, a, b, pure=False) for a, b in pairs]
            result = level[0].result(timeout=300)
        finally:
            stop.set()
        assert result == sum(i * i % 7 for i in range(10_000))
        assert len(kills) >= 3, "the graph ran through several worker deaths"
        time.sleep(0.5)
        executions = sum(len(u["stream"]) for u in c.events(1.0))
        recomputed = executions - 19_999
        record_property("recomputed_tasks", recomputed)
        print(f"chaos: {len(kills)} SIGKILLs, {recomputed} tasks recomputed")
        assert recomputed >= 0


def counted(path, x):
    """``x * 2``, appending a line to ``path`` each time it runs."""
    with open(path, "a") as f:
        f.write(f"{x}\n")
    return x * 2


def test_results_lost_with_their_worker_are_recomputed_while_the_client_gathers(procs, tmp_path):
    address = scheduler(procs)
    workers = {f"l{i}": start_worker(procs, address, f"l{i}") for i in range(2)}
    log = tmp_path / "runs"
    with Client(address) as c:
        c.wait_for_workers(2, timeout=20)
        futures = c.map(counted, [str(log)] * 20, range(20))
        scattered = c.scatter(["only here"])[0]
        from dask_rs import wait

        wait(futures + [scattered], timeout=20)
        holder = c.who_has([scattered])[scattered.key][0]
        name = c.scheduler_info()["workers"][holder]["name"]
        on_holder = [f for f, ws in zip(futures, c.who_has(futures).values()) if holder in ws]
        assert on_holder, "some results live on the worker that dies"
        workers[name].send_signal(signal.SIGKILL)
        # Gathered at once: the results that died are computed again from
        # their lineage on the survivor and delivered, as distributed does.
        assert c.gather(futures) == [2 * i for i in range(20)]
        runs = log.read_text().split()
        assert len(runs) == 20 + len(on_holder), (len(runs), len(on_holder))
        # Scattered data has no lineage: that loss is an error, named.
        with pytest.raises(Exception, match="scattered key .* was lost"):
            scattered.result(timeout=20)
