"""Dask collections computed on the cluster give the same results as dask's
synchronous scheduler."""

from __future__ import annotations

import dask
import dask.array as da
import dask.bag as db
import dask.dataframe as dd
import numpy as np
import pandas as pd
import pytest


def _frames():
    rng = np.random.default_rng(0)
    left = pd.DataFrame(
        {"k": rng.integers(0, 20, 2000), "x": rng.normal(size=2000), "s": rng.choice(list("abcde"), 2000)}
    )
    right = pd.DataFrame({"k": np.arange(20), "y": np.arange(20) * 10})
    return dd.from_pandas(left, npartitions=8), dd.from_pandas(right, npartitions=3)


def _expressions():
    x = da.random.default_rng(42).random((400, 300), chunks=(100, 100))
    b = db.from_sequence(range(1000), npartitions=10)
    words = db.from_sequence(["a b c", "b c", "c d e", "a a a"] * 25, npartitions=4)
    left, right = _frames()

    @dask.delayed
    def double(v):
        return 2 * v

    @dask.delayed
    def combine(*vs):
        return sum(vs)

    return {
        "array-sum": x.sum(),
        "array-mean-axis0": x.mean(axis=0),
        "array-std": x.std(),
        "array-transpose-add": (x + x.T[:300, :400].T).sum(axis=1),
        "array-slice": x[10:250:3, ::7],
        "array-matmul": (x @ x.T)[:50, :50],
        "array-argmax": x.argmax(axis=1),
        "array-cumsum": x.cumsum(axis=0)[-1],
        "array-rechunk": x.rechunk((50, 300)).max(axis=1),
        "array-where": da.where(x > 0.5, x, 0).sum(),
        "bag-map-filter": b.map(lambda v: v * 3).filter(lambda v: v % 2 == 0).sum(),
        "bag-frequencies": words.map(str.split).flatten().frequencies(sort=True),
        "bag-topk": b.topk(5),
        "bag-distinct-count": b.map(lambda v: v % 17).distinct().count(),
        "bag-foldby": b.foldby(lambda v: v % 3, lambda acc, v: acc + v, 0),
        "df-groupby-mean": left.groupby("k").x.mean(),
        "df-groupby-agg": left.groupby("s").agg({"x": ["min", "max", "count"]}),
        "df-merge": left.merge(right, on="k").y.sum(),
        "df-value-counts": left.s.value_counts(),
        "df-filter-assign": left[left.x > 0].assign(z=lambda d: d.x * 2).z.sum(),
        "df-set-index-head": left.set_index("k").x.sum(),
        "delayed-tree": combine(*[double(i) for i in range(20)]),
    }


EXPRESSIONS = _expressions()


def _same(a, b):
    if isinstance(a, (pd.DataFrame, pd.Series)):
        if isinstance(a.index, pd.Index) and not a.index.is_monotonic_increasing:
            a, b = a.sort_index(), b.sort_index()
        pd.testing.assert_frame_equal(pd.DataFrame(a), pd.DataFrame(b), check_exact=False)
    elif isinstance(a, np.ndarray):
        np.testing.assert_allclose(a, b)
    elif isinstance(a, list):
        assert sorted(map(repr, a)) == sorted(map(repr, b))
    else:
        assert a == pytest.approx(b)


@pytest.mark.parametrize("name", sorted(EXPRESSIONS))
def test_collection_matches_sync_scheduler(client, name):
    expr = EXPRESSIONS[name]
    expected = expr.compute(scheduler="sync")
    # The Client registered itself as dask's scheduler.
    assert dask.base.get_scheduler() == client.get
    client.subscribe_events(0.02)
    assert client.events(5.0), "snapshot arrives first"
    client.events(0.05)
    got = expr.compute()
    _same(got, expected)
    ran = 0
    for _ in range(50):
        ran += sum(len(u["stream"]) for u in client.events(0.1))
        if ran:
            break
    assert ran > 0, "the computation ran on the cluster's workers"


def test_expression_count():
    assert len(EXPRESSIONS) >= 20


def test_client_compute_and_persist(client):
    x = da.ones((1000, 1000), chunks=(250, 250))
    fut = client.compute(x.sum())
    assert fut.result(timeout=30) == 1_000_000
    y = client.persist(x + 1)
    # Persisted chunks are held on the cluster as futures; `wait` takes the
    # collection itself, as distributed's does.
    from dask_rs import futures_of, wait

    done, not_done = wait(y, timeout=30)
    assert len(done) == 16 and not not_done
    assert {f.key for f in futures_of([y, {"again": y}])} == {f.key for f in done}
    assert client.scheduler_info()["n_tasks"] >= 16
    assert float((y * 2).sum().compute()) == 4_000_000
    left, _ = _frames()
    p = client.persist(left)
    assert len(p) == 2000
    assert client.compute([x.sum(), 5], sync=True) == [1_000_000, 5]


def test_client_get_with_legacy_graph(client):
    from operator import add, mul

    dsk = {"a": 1, "b": (add, "a", 10), "c": (mul, "b", "b"), ("d", 0): (sum, ["a", "b", "c"])}
    assert client.get(dsk, "c") == 121
    assert client.get(dsk, [["c", ("d", 0)], "a"]) == [[121, 133], 1]
