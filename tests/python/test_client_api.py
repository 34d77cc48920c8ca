"""Client API beyond submit/map/gather: tasks that launch tasks, coordination
primitives, and the cluster-wide calls. Real scheduler and worker processes."""

from __future__ import annotations

import pytest

from conftest import start_scheduler, start_worker, wait_until
from dask_rs import Client, Event, Lock, Queue, Semaphore, Variable, get_client, rejoin, secede, worker_client


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


def sleep_and_stamp(seconds):
    import time

    start = time.time()
    time.sleep(seconds)
    return start, time.time()


def secede_launch_rejoin(seconds):
    import time

    c = get_client()
    secede()
    other = c.submit(sleep_and_stamp, seconds, pure=False)
    time.sleep(seconds / 4)  # `other` starts on the thread that took this one's place
    rejoin()  # the one thread is busy with `other`: wait for it
    return time.time(), other.result()


def test_rejoin_waits_for_a_free_thread(one_thread):
    c = one_thread
    rejoined, (other_start, other_end) = c.submit(secede_launch_rejoin, 1.0).result(timeout=30)
    assert other_start < rejoined, "the launched task ran while its parent was seceded"
    assert rejoined >= other_end, "rejoin returned while the worker's only thread was busy"
    # The thread went back to the pool: the worker still runs tasks one at a time.
    spans = c.gather(c.map(sleep_and_stamp, [0.2] * 3, pure=False))
    spans.sort()
    assert all(a[1] <= b[0] for a, b in zip(spans, spans[1:])), spans


def test_secede_and_rejoin_outside_a_task_are_clear_errors():
    with pytest.raises(ValueError, match="inside a task"):
        secede()
    with pytest.raises(ValueError, match="inside a task"):
        rejoin()


# -- coordination primitives --------------------------------------------------


def hold_lock_and_record(lock, queue, i):
    import time

    with lock_held(lock):
        start = time.time()
        time.sleep(0.05)
        queue.put((i, start, time.time()))
    return i


class lock_held:
    def __init__(self, lock):
        self.lock = lock

    def __enter__(self):
        assert self.lock.acquire(timeout=30)

    def __exit__(self, *exc):
        self.lock.release()


def wait_for_event(event, timeout):
    return event.wait(timeout)


def read_variable(var):
    return var.get(timeout=10)


def test_variable_shared_between_clients_and_tasks(cluster, client):
    address, _ = cluster
    x = client.submit(sum, [1, 2, 3])
    v = Variable("shared-x", client=client)
    v.set(x)
    del x  # the variable keeps the future alive
    with Client(address, set_as_default=False) as other:
        got = Variable("shared-x", client=other).get(timeout=5)
        assert got.result(timeout=10) == 6
    v.set(42)
    assert client.submit(read_variable, v, pure=False).result(timeout=20) == 42
    v.delete()
    with pytest.raises(TimeoutError, match="Variable"):
        v.get(timeout=0.2)


def test_queue_carries_values_and_futures_between_tasks_and_clients(client):
    q = Queue("jobs", client=client)
    client.gather(client.map(lambda i, q=q: q.put(i * 10), range(5), pure=False))
    assert q.qsize() == 5
    assert sorted([q.get(timeout=5)] + q.get(batch=2) + q.get(batch=True)) == [0, 10, 20, 30, 40]
    assert q.get(batch=True) == []
    f = client.submit(pow, 2, 10)
    q.put(f)
    key = f.key
    del f
    g = q.get(timeout=5)
    assert (g.key, g.result(timeout=10)) == (key, 1024)
    with pytest.raises(TimeoutError, match="Queue"):
        q.get(timeout=0.2)
    bounded = Queue("bounded", client=client, maxsize=1)
    bounded.put("a")
    with pytest.raises(TimeoutError, match="room"):
        bounded.put("b", timeout=0.2)
    assert bounded.get() == "a"


def test_lock_excludes_tasks_and_is_returned_when_its_client_leaves(cluster, client):
    address, _ = cluster
    lock, q = Lock("critical", client=client), Queue("intervals", client=client)
    done = client.gather(client.map(hold_lock_and_record, [lock] * 6, [q] * 6, range(6)))
    assert sorted(done) == list(range(6))
    spans = sorted((s, e) for _, s, e in q.get(batch=6))
    assert all(prev_end <= start for (_, prev_end), (start, _) in zip(spans, spans[1:])), spans
    with pytest.raises(ValueError, match="not yet acquired"):
        Lock("critical", client=client).release()
    other = Client(address, set_as_default=False)
    assert Lock("critical", client=other).acquire(timeout=1)
    assert lock.locked()
    assert not lock.acquire(blocking=False)
    other.close()  # a client that leaves gives its lock back
    assert lock.acquire(timeout=10)
    lock.release()
    assert not lock.locked()


def test_semaphore_limits_leases(client):
    sem = Semaphore(max_leases=2, name="pool")
    sem._client = client
    assert sem.acquire(timeout=1) and sem.acquire(timeout=1)
    assert not sem.acquire(timeout=0.2)
    assert sem.get_value() == 2
    sem.release()
    sem.release()
    with pytest.raises(RuntimeError, match="Released too often"):
        sem.release()
    wrong = Semaphore(max_leases=3, name="pool")
    wrong._client = client
    with pytest.raises(RuntimeError, match="max_leases=2"):
        wrong.acquire(timeout=1)


def test_event_wakes_a_waiting_task(client):
    ev = Event("go", client=client)
    waiting = client.submit(wait_for_event, ev, 30, pure=False)
    assert not ev.wait(timeout=0.2)
    assert waiting.status == "pending"
    ev.set()
    assert waiting.result(timeout=20) is True
    assert ev.is_set()
    ev.clear()
    assert not ev.is_set()


# -- cluster-wide calls ------------------------------------------------------


def worker_pid():
    import os

    return os.getpid()


def boom():
    raise KeyError("not here")


def test_run_calls_a_function_in_each_worker_process(client):
    info = client.scheduler_info()["workers"]
    pids = client.run(worker_pid)
    assert pids == {a: w["pid"] for a, w in info.items()}
    name, addr = next((w["name"], a) for a, w in info.items())
    assert list(client.run(worker_pid, workers=[name])) == [addr]
    with pytest.raises(KeyError, match="not here"):
        client.run(boom)
    errors = client.run(boom, on_error="return")
    assert len(errors) == len(info) and all(isinstance(e, KeyError) for e in errors.values())
    with pytest.raises(ValueError, match="no worker 'nobody'"):
        client.run(worker_pid, workers=["nobody"])


def test_upload_file_makes_a_module_importable_by_tasks(client, tmp_path):
    mod = tmp_path / "uploaded_helper_mod.py"
    mod.write_text("def triple(x):\n    return 3 * x\n")
    client.upload_file(str(mod))

    def use(x):
        import uploaded_helper_mod

        return uploaded_helper_mod.triple(x)

    assert client.gather(client.map(use, range(4))) == [0, 3, 6, 9]
    mod.write_text("def triple(x):\n    return 30 * x\n")
    client.upload_file(str(mod))  # a new version replaces the old one
    assert client.submit(use, 1, pure=False).result(timeout=10) == 30

    def where(_):
        import os

        import uploaded_helper_mod

        d = os.path.dirname(uploaded_helper_mod.__file__)
        return d, os.stat(d).st_mode & 0o777, os.getpid()

    # Each worker's upload directory is private and not named after its pid
    # (a name another user could create first and plant modules in).
    for d, mode, pid in client.gather(client.map(where, range(6), pure=False)):
        assert mode == 0o700, (d, oct(mode))
        assert not d.endswith(f"-{pid}"), d


def test_upload_file_reports_a_module_that_fails_to_import(client, tmp_path):
    bad = tmp_path / "uploaded_broken_mod.py"
    bad.write_text("def oops(:\n")
    with pytest.raises(SyntaxError):
        client.upload_file(str(bad))
    with pytest.raises(FileNotFoundError):
        client.upload_file(str(tmp_path / "missing.py"))
    # The workers are unharmed.
    assert client.submit(pow, 2, 3, pure=False).result(timeout=10) == 8


def test_get_executor_behaves_as_a_concurrent_futures_executor(client):
    import concurrent.futures as cf

    with client.get_executor() as ex:
        f = ex.submit(pow, 2, 5)
        assert isinstance(f, cf.Future) and f.result(timeout=10) == 32
        assert list(ex.map(pow, [2, 3], [3, 2])) == [8, 9]
        bad = ex.submit(boom)
        with pytest.raises(KeyError):
            bad.result(timeout=10)
    with pytest.raises(RuntimeError, match="after shutdown"):
        ex.submit(pow, 1, 1)


def test_progress_draws_a_bar_until_every_future_is_done(client):
    import io
    import time

    from dask_rs import progress

    fs = client.map(time.sleep, [0.05] * 6, pure=False)
    fs.append(client.submit(boom))
    out = io.StringIO()
    progress(fs, file=out, notebook=False, interval=0.02)
    text = out.getvalue()
    assert "(7/7)" in text and "100% Completed" in text
    assert all(f.done() for f in fs)


# -- scheduling ----------------------------------------------------------------


def slow_pid(x, seconds):
    import os
    import time

    time.sleep(seconds)
    return os.getpid()


@pytest.mark.parametrize("stealing", [True, False])
def test_work_stealing_spreads_tasks_whose_input_is_on_one_worker(procs, stealing):
    address = start_scheduler(procs, *([] if stealing else ["--no-work-stealing"]))
    for i in range(3):
        start_worker(procs, address, f"s{i}")
    with Client(address) as c:
        c.wait_for_workers(3, timeout=20)
        data = c.scatter(list(range(100)), workers=["s0"])
        pids = set(c.gather(c.map(slow_pid, [data] * 9, [0.2] * 9, pure=False)))
        info = c.scheduler_info()["workers"]
        if stealing:
            assert len(pids) > 1, "stolen tasks ran on other workers"
        else:
            assert pids == {w["pid"] for w in info.values() if w["name"] == "s0"}, "all ran with the input"


def test_workers_naming_no_worker_is_visible_instead_of_a_silent_hang(client):
    f = client.submit(pow, 3, 3, workers=["nobody"], pure=False)
    wait_until(lambda: f.status == "no-worker", timeout=10, msg="no-worker status")
    assert 'no worker matches workers=["nobody"]' in f.no_worker_reason()
    with pytest.raises(TimeoutError, match="no-worker: no worker matches"):
        f.result(timeout=0.3)
    # With allow_other_workers the same restriction is only a preference.
    g = client.submit(pow, 3, 3, workers=["nobody"], allow_other_workers=True, pure=False)
    assert g.result(timeout=10) == 27 and g.no_worker_reason() is None
    f.cancel()


def test_replicate_copies_results_to_more_workers(client):
    x = client.submit(list, range(1000), workers=["w0"], pure=False)
    y = client.submit(len, x, workers=["w0"], pure=False)
    assert y.result(timeout=10) == 1000
    assert len(client.who_has([x])[x.key]) == 1
    client.replicate([x], n=2)
    assert len(client.who_has([x])[x.key]) == 2
    client.replicate(x)  # every worker
    assert len(client.who_has([x])[x.key]) == len(client.scheduler_info()["workers"])
    with pytest.raises(ValueError, match="at least 1"):
        client.replicate(x, n=0)


def test_replicate_among_named_workers(client):
    names = {w["name"]: a for a, w in client.scheduler_info()["workers"].items()}
    x = client.submit(list, range(100), workers=["w0"], pure=False)
    assert x.result(timeout=10) == list(range(100))
    # w0's copy is not among w1 and w2: both get one (distributed's n=None).
    client.replicate(x, workers=["w1", names["w2"]])
    assert set(client.who_has([x])[x.key]) == set(names.values())
    y = client.submit(list, range(10), workers=["w0"], pure=False)
    y.result(timeout=10)
    client.replicate([y], n=1, workers=["w2"])
    assert set(client.who_has([y])[y.key]) == {names["w0"], names["w2"]}
    with pytest.raises(ValueError, match="no worker 'nope'"):
        client.replicate(y, workers=["nope"])


def test_run_passes_dask_worker_and_runs_coroutine_functions(client):
    def who(dask_worker, suffix=""):
        return dask_worker.name + suffix, dask_worker.address, dask_worker.nthreads

    info = client.scheduler_info()["workers"]
    out = client.run(who, suffix="!")
    assert out == {a: (w["name"] + "!", a, w["nthreads"]) for a, w in info.items()}

    async def nap(x, dask_worker=None):
        import asyncio

        await asyncio.sleep(0.01)
        return x, dask_worker.name

    assert sorted(client.run(nap, 5).values()) == sorted((5, w["name"]) for w in info.values())


def test_rebalance_evens_out_results_and_loses_none(client):
    names = {a: w["name"] for a, w in client.scheduler_info()["workers"].items()}
    data = [list(range(i, i + 20_000)) for i in range(9)]
    futures = client.scatter(data, workers=["w0"], hash=False)
    held = lambda: {names[a]: len(ks) for a, ks in client.has_what().items()}  # noqa: E731
    assert held() == {"w0": 9, "w1": 0, "w2": 0}
    report = client.rebalance(futures)
    assert report["moved"] == 6 and report["failed"] == 0 and report["bytes"] > 0
    assert held() == {"w0": 3, "w1": 3, "w2": 3}
    # Moved, not copied: each result is on exactly one worker, and intact.
    assert all(len(h) == 1 for h in client.who_has(futures).values())
    assert client.gather(futures) == data
    # Balanced already: nothing moves.
    assert client.rebalance(futures)["moved"] == 0
    client.cancel(futures)


def test_rebalance_within_named_workers_and_bad_input(client):
    names = {a: w["name"] for a, w in client.scheduler_info()["workers"].items()}
    futures = client.scatter([bytes(10_000) for _ in range(4)], workers=["w1"], hash=False)
    report = client.rebalance(futures, workers=["w1", "w2"])
    assert report["moved"] == 2
    where = {names[h[0]] for h in client.who_has(futures).values()}
    assert where == {"w1", "w2"}
    with pytest.raises(ValueError, match="no such worker: nobody"):
        client.rebalance(workers=["w1", "nobody"])
    assert client.rebalance([]) == {"moved": 0, "bytes": 0, "failed": 0}
    client.cancel(futures)
