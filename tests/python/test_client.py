"""Client API against a real scheduler process and real worker processes."""

from __future__ import annotations

import operator
import threading
from concurrent.futures import CancelledError

import dask
import pytest
from dask.utils import apply

from conftest import wait_until
from dask_rs import Client, Future, as_completed, wait


def inc(x):
    return x + 1


def add(x, y):
    return x + y


def slow_inc(x, delay=0.2):
    import time

    time.sleep(delay)
    return x + 1


def total(xs):
    return sum(xs)


def test_submit_map_gather_10000(client):
    futures = client.map(inc, range(10_000))
    assert client.gather(futures) == list(range(1, 10_001))
    one = client.submit(add, 1, 2)
    assert one.result(timeout=10) == 3
    assert one.status == "finished" and one.done()


def test_futures_as_arguments_nested(client):
    a = client.submit(inc, 1)
    b = client.submit(inc, 10)
    c = client.submit(total, [a, b, 3])
    d = client.submit(lambda m: m["x"] + m["y"][0], {"x": a, "y": [b]})
    assert c.result(timeout=10) == 2 + 11 + 3
    assert d.result(timeout=10) == 13


def test_functions_travel_once_and_closures_stay_apart(client):
    """A map's function goes to the cluster as one shared blob named by its
    bytes: closures that differ only in what they captured are different
    functions, and a function sent again after all its tasks were released
    (and the workers dropped it) runs again."""
    def adder(k):
        return lambda x: x + k

    futs = {k: client.map(adder(k), range(50), pure=False) for k in range(5)}
    for k, fs in futs.items():
        assert client.gather(fs) == [x + k for x in range(50)]
    # Plain arguments, keyword arguments and futures as arguments, by one function.
    f = adder(100)
    a = client.submit(inc, 1)
    calls = [client.submit(f, 1), client.submit(add, 1, y=2), client.submit(f, a)]
    assert client.gather(calls) == [101, 3, 102]
    first = client.map(adder(7), range(10), pure=False)
    assert client.gather(first) == [x + 7 for x in range(10)]
    keys = {f.key for f in first}
    del first
    wait_until(lambda: not keys & {k for ks in client.has_what().values() for k in ks}, msg="released")
    # The same bytes again: the scheduler forgot the blob with its last task.
    assert client.gather(client.map(adder(7), range(10), pure=False)) == [x + 7 for x in range(10)]


def test_a_large_map_goes_in_batches_and_keeps_order_and_duplicates(client):
    """`map` sends its tasks in batches (the cluster starts on the first
    while the client makes the rest): every input gets its future in order,
    and equal inputs of a pure map share one key across batches."""
    xs = [i % 3000 for i in range(7000)]  # batches of 2,048 and 4,096, then the rest
    futs = client.map(inc, xs)
    assert len(futs) == 7000 and len({f.key for f in futs}) == 3000
    assert futs[0].key == futs[3000].key == futs[6000].key
    assert client.gather(futs) == [x + 1 for x in xs]
    small = client.map(inc, range(10), batch_size=3, pure=False)
    assert client.gather(small) == list(range(1, 11))


def fail_at(x, bad):
    if x == bad:
        raise ValueError(f"bad {x}")
    return x


def sleep_at(x, slow):
    import time

    if x == slow:
        time.sleep(3)
    return x


def test_a_large_gather_fetches_in_runs_and_still_raises_skips_and_waits(client):
    """`gather` fetches results run by run while later ones still compute:
    an error far down the list is still seen, a slow task still waited for."""
    n = 9000  # three runs
    futs = client.map(fail_at, range(n), bad=8000, pure=False)
    with pytest.raises(ValueError, match="bad 8000"):
        client.gather(futs)
    out = client.gather(futs, errors="skip")
    assert out == [x for x in range(n) if x != 8000]
    slow = client.map(sleep_at, range(n), slow=8500, pure=False)
    assert client.gather(slow) == list(range(n))


def test_graph_tasks_of_every_shape_run_with_their_own_functions(client):
    """Graph nodes travel as calls when plain (values and dependencies as
    arguments) and keep their shape otherwise (nested tasks, lists, dicts,
    keyword arguments), their functions lifted into shared blobs: closures
    that differ only in what they captured stay apart, a dependency used
    twice arrives twice, positions hold."""
    def scale(k):
        return lambda x, y=0: k * x + y

    def pair(a, b, c):
        return (a, b, c)

    dsk = {
        "a": (inc, 1),
        ("b", 0): (scale(10), "a"),
        ("b", 1): (scale(20), "a"),
        "repeat": (pair, "a", 5, "a"),
        "nested": (scale(3), (scale(4), "a")),
        "nested too": (scale(5), (scale(6), "a")),
        "in a list": (sum, ["a", ("b", 0), ("b", 1)]),
        "keywords": (apply, scale(2), ["a"], (dict, [["y", ("b", 1)]])),
        "literal": (pair, "x", None, b"bytes"),
    }
    keys = ["a", ("b", 0), ("b", 1), "repeat", "nested", "nested too", "in a list", "keywords", "literal"]
    assert client.get(dsk, keys) == [2, 20, 40, (2, 5, 2), 24, 60, 62, 44, ("x", None, b"bytes")]


def short_then_long(x, last):
    import time

    if x == last:
        time.sleep(4)
    return x


def test_results_of_short_tasks_are_not_held_back_by_a_long_one(client):
    """Workers report runs of short tasks together; a long task of the same
    group after them must not keep their results back until it ends."""
    futs = client.map(short_then_long, range(200), last=199, pure=False)
    done, not_done = wait(futs[:199], timeout=2.5)
    assert not not_done, f"{len(not_done)} short results held back"
    assert not futs[199].done()
    assert futs[199].result(timeout=10) == 199


def test_chain_of_1000_dependent_tasks(client):
    x = client.submit(inc, 0, pure=False)
    for _ in range(999):
        x = client.submit(inc, x, pure=False)
    assert x.result(timeout=60) == 1000


def test_tree_reduction_10000_leaves(client):
    level = client.map(inc, range(10_000))
    while len(level) > 1:
        nxt = [client.submit(add, level[i], level[i + 1]) for i in range(0, len(level) - 1, 2)]
        if len(level) % 2:
            nxt.append(level[-1])
        level = nxt
    assert level[0].result(timeout=120) == sum(range(1, 10_001))


def test_two_clients_and_pure_deduplication(cluster):
    address, _ = cluster
    with Client(address, set_as_default=False) as c1, Client(address, set_as_default=False) as c2:
        f1 = c1.submit(slow_inc, 41, 0.3)
        f2 = c2.submit(slow_inc, 41, 0.3)
        assert f1.key == f2.key
        assert f1.result(timeout=10) == 42 and f2.result(timeout=10) == 42
        # Computed once: only one worker holds it, and it ran once.
        assert len(c1.who_has([f1])[f1.key]) == 1
        g1 = c1.map(inc, range(10_000))
        g2 = c2.map(operator.neg, range(10_000))
        s1 = c1.scatter(list(range(100)))
        assert c1.gather(g1) == list(range(1, 10_001))
        assert c2.gather(g2) == [-i for i in range(10_000)]
        assert c2.gather(c2.map(add, g2[:100], s1)) == [0] * 100, "c2 uses c1's scattered data"
        # c1 releasing its future does not take c2's result away.
        del f1
        assert f2.result(timeout=5) == 42


def test_scatter_and_use(client):
    [x, y] = client.scatter([10, 20])
    assert client.submit(add, x, y).result(timeout=10) == 30
    d = client.scatter({"a": 1, "b": 2})
    assert set(d) == {"a", "b"} and d["a"].key == "a"
    assert client.gather(d) == {"a": 1, "b": 2}
    single = client.scatter(5)
    assert isinstance(single, Future) and single.result() == 5


def test_workers_restriction(client):
    info = client.scheduler_info()["workers"]
    address, target = sorted(info.items(), key=lambda kv: kv[1]["name"])[1]
    futs = client.map(inc, range(20), workers=[target["name"]], pure=False)
    client.gather(futs)
    holders = client.who_has(futs)
    assert len(holders) == 20
    assert all(h == (address,) for h in holders.values())
    by_address = client.map(inc, range(5), workers=address, pure=False)
    client.gather(by_address)
    assert all(h == (address,) for h in client.who_has(by_address).values())


def test_as_completed_and_wait(client):
    futs = [client.submit(slow_inc, i, 0.05 * (5 - i), pure=False) for i in range(5)]
    seen = [f.result() for f in as_completed(futs)]
    assert sorted(seen) == [1, 2, 3, 4, 5]
    done, not_done = wait(futs)
    assert len(done) == 5 and not not_done
    fs = [client.submit(slow_inc, 0, 3, pure=False), client.submit(inc, 5, pure=False)]
    done, not_done = wait(fs, return_when="FIRST_COMPLETED")
    assert fs[1] in done and fs[0] in not_done
    results = list(as_completed(client.map(inc, range(3), pure=False), with_results=True))
    assert sorted(r for _, r in results) == [1, 2, 3]


def test_result_timeout(client):
    f = client.submit(slow_inc, 1, 2, pure=False)
    with pytest.raises(TimeoutError):
        f.result(timeout=0.1)
    assert f.result(timeout=10) == 2


def test_cancel(client):
    f = client.submit(slow_inc, 1, 5, pure=False)
    f.cancel()
    wait_until(f.cancelled, msg="cancelled")
    with pytest.raises(CancelledError):
        f.result(timeout=5)


def test_add_done_callback(client):
    got = []
    ev = threading.Event()
    f = client.submit(slow_inc, 3, 0.1, pure=False)

    def cb(fut):
        got.append(fut.result())
        ev.set()

    f.add_done_callback(cb)
    assert ev.wait(10)
    assert got == [4]


def test_release_frees_worker_memory(client):
    import numpy as np

    futs = client.map(lambda i: np.ones(1000) * i, range(50), pure=False)
    client.gather(futs)
    held = sum(w["metrics"]["in_memory"] for w in client.scheduler_info()["workers"].values())
    assert held >= 50
    del futs
    wait_until(
        lambda: sum(w["metrics"]["in_memory"] for w in client.scheduler_info()["workers"].values()) == 0
        and client.scheduler_info()["n_tasks"] == 0,
        msg="worker keys to be freed",
    )


def test_reprs(client):
    f = client.submit(inc, 100)
    f.result()
    assert "finished" in repr(f) and f.key in repr(f)
    assert "status: finished" in f._repr_html_()
    r = repr(client)
    assert "processes=3" in r and "threads=3" in r
    assert "Workers:</b> 3" in client._repr_html_()


def test_who_has_has_what_nthreads(client):
    f = client.submit(inc, 7)
    f.result()
    wh = client.who_has([f])
    assert len(wh[f.key]) == 1
    hw = client.has_what()
    assert any(f.key in keys for keys in hw.values())
    assert set(client.nthreads().values()) == {1}


def fail_once(path):
    import os

    if not os.path.exists(path):
        open(path, "w").close()
        raise ValueError("first attempt fails")
    return "second attempt works"


def touch(path, content):
    with open(path, "w") as f:
        f.write(content)
    return content


def test_client_retry(client, tmp_path):
    f = client.submit(fail_once, str(tmp_path / "marker"), pure=False)
    g = client.submit(len, f, pure=False)
    with pytest.raises(ValueError):
        g.result(timeout=10)
    client.retry([g])
    assert g.result(timeout=10) == len("second attempt works")
    assert f.result() == "second attempt works"


def test_fire_and_forget(client, tmp_path):
    from dask_rs import fire_and_forget

    target = tmp_path / "done.txt"
    f = client.submit(slow_inc, 0, 0.3, pure=False)
    g = client.submit(touch, str(target), "written", pure=False)
    fire_and_forget([f, g])
    del f, g
    # The file appears before its text is written: wait for both.
    wait_until(lambda: target.exists() and target.read_text() != "", msg="fire-and-forget task to run")
    assert target.read_text() == "written"
    wait_until(lambda: client.scheduler_info()["n_tasks"] == 0, msg="tasks forgotten once done")


def test_fire_and_forget_a_persisted_collection(client, tmp_path):
    """As distributed: a persisted collection's tasks keep running after its
    last reference is gone (before, only bare futures were kept)."""
    import dask

    from dask_rs import fire_and_forget

    target = tmp_path / "collection.txt"
    first = dask.delayed(slow_inc)(0, 0.5, dask_key_name="ff-slow")
    text = dask.delayed(str)(first, dask_key_name="ff-str")
    last = dask.delayed(touch)(str(target), text, dask_key_name="ff-touch")
    persisted = last.persist()
    fire_and_forget(persisted)
    del persisted, last, text, first
    wait_until(lambda: target.exists() and target.read_text() != "", timeout=20,
               msg="the collection's tasks ran")
    assert target.read_text() == "1"
    wait_until(lambda: client.scheduler_info()["n_tasks"] == 0, msg="tasks forgotten once done")


def test_collections_and_structures_wherever_distributed_takes_them(client):
    import dask.array as da

    from dask_rs import futures_of, wait

    x = da.arange(40, chunks=10).persist()
    keys = {f.key for f in futures_of(x)}
    assert len(keys) == 4
    done, not_done = wait(x, timeout=20)
    assert {f.key for f in done} == keys and not not_done
    assert len(client.who_has(x)) == 4 and all(client.who_has(x).values())
    nested = {"a": [client.submit(inc, 1)], "b": (client.submit(inc, 2),)}
    assert len(wait(nested, timeout=20).done) == 2
    assert len(client.who_has(nested)) == 2
    assert int(x.sum().compute()) == sum(range(40))
    slow = dask.delayed(slow_inc)(1, 1.0).persist()
    client.cancel(slow)
    wait_until(lambda: all(f.status == "cancelled" for f in futures_of(slow)), msg="cancelled")


def test_datasets_shared_between_clients(cluster):
    address, _ = cluster
    with Client(address, set_as_default=False) as c1, Client(address, set_as_default=False) as c2:
        futs = c1.map(inc, range(10), pure=False)
        c1.publish_dataset(futs, name="incs")
        c1.datasets["pair"] = {"a": futs[0], "b": 5}
        del futs
        assert set(c2.list_datasets()) == {"incs", "pair"}
        got = c2.get_dataset("incs")
        assert c2.gather(got) == list(range(1, 11))
        assert c2.gather(c2.datasets["pair"]) == {"a": 1, "b": 5}
        with pytest.raises(KeyError, match="already exists"):
            c2.publish_dataset([1], name="incs")
        with pytest.raises(KeyError, match="not found"):
            c2.get_dataset("missing")
        assert c2.get_dataset("missing", default=None) is None
        del got
        c1.unpublish_dataset("incs")
        del c1.datasets["pair"]
        assert "incs" not in c2.datasets and len(c2.datasets) == 0
        wait_until(lambda: c2.scheduler_info()["n_tasks"] == 0, msg="dataset keys released")


def test_scheduler_file_and_unsupported_security(cluster, tmp_path):
    import json

    address, _ = cluster
    path = tmp_path / "scheduler.json"
    path.write_text(json.dumps({"address": address}))
    with Client(scheduler_file=str(path), set_as_default=False) as c:
        assert c.scheduler_address == address
        assert c.submit(inc, 1).result(timeout=10) == 2
    with pytest.raises(TypeError, match="dask_rs.Security"):
        Client(address, security=object())


def test_a_graph_with_a_cycle_raises_instead_of_hanging(client):
    import operator

    dsk = {"cyc-a": (operator.add, "cyc-b", 1), "cyc-b": (operator.add, "cyc-a", 1), "ok": (operator.neg, 1)}
    with pytest.raises(RuntimeError, match="Cycle detected"):
        client.get(dsk, "cyc-a")
    # The client and the cluster go on.
    assert client.get({"ok": (operator.neg, 1)}, "ok") == -1
