"""Abstract resources: workers declare ``--resources "GPU=1"``, tasks ask for
them with ``resources=`` (or ``dask.annotate``) and run only where they fit,
no more at once than the worker declared. Real scheduler and worker processes."""

from __future__ import annotations

import os
import subprocess
import sys
import time

import dask
import pytest

from conftest import start_scheduler, start_worker, wait_until
from dask_rs import Client


def timed(x, seconds=0.3):
    start = time.time()
    time.sleep(seconds)
    return os.getpid(), start, time.time()


def where(x):
    return os.getpid()


@pytest.fixture(scope="module")
def gpu_cluster():
    """Worker ``cpu`` (2 threads) and worker ``gpu`` (2 threads, one GPU)."""
    from conftest import Procs

    procs = Procs()
    try:
        address = start_scheduler(procs)
        start_worker(procs, address, "cpu", nthreads=2)
        start_worker(procs, address, "gpu", nthreads=2, extra=["--resources", "GPU=1,MEM=10e9"])
        with Client(address) as c:
            c.wait_for_workers(2, timeout=20)
        yield address
    finally:
        procs.stop_all()


@pytest.fixture
def client(gpu_cluster):
    with Client(gpu_cluster) as c:
        yield c


def pids(client) -> dict:
    return {w["name"]: w["pid"] for w in client.scheduler_info()["workers"].values()}


def test_workers_show_their_resources(client):
    by_name = {w["name"]: w["resources"] for w in client.scheduler_info()["workers"].values()}
    assert by_name == {"cpu": {}, "gpu": {"GPU": 1.0, "MEM": 10e9}}


def test_resource_tasks_run_only_where_declared_and_one_at_a_time(client):
    futures = client.map(timed, range(4), resources={"GPU": 1}, pure=False)
    results = client.gather(futures)
    assert {pid for pid, _, _ in results} == {pids(client)["gpu"]}
    # The gpu worker has two threads but one GPU: the tasks never overlapped.
    spans = sorted((start, stop) for _, start, stop in results)
    for (_, stop), (start, _) in zip(spans, spans[1:]):
        assert start >= stop - 0.01, spans


def test_tasks_without_resources_still_use_both_workers(client):
    futures = client.map(timed, range(8), seconds=0.2, pure=False)
    assert {pid for pid, _, _ in client.gather(futures)} == set(pids(client).values())


def test_a_partial_amount_fits_twice(client):
    futures = client.map(timed, range(2), resources={"GPU": 0.5}, pure=False)
    (p1, s1, e1), (p2, s2, e2) = client.gather(futures)
    assert p1 == p2 == pids(client)["gpu"]
    assert s2 < e1 and s1 < e2, "two half-GPU tasks should run side by side"


def test_dask_annotate_and_compute_resources(client):
    with dask.annotate(resources={"GPU": 1}):
        on_gpu = dask.delayed(where)(1, dask_key_name="annotated")
    plain = dask.delayed(where)(2, dask_key_name="plain")
    assert client.compute(on_gpu).result(timeout=30) == pids(client)["gpu"]
    mem = client.compute(dask.delayed(where)(3), resources={"MEM": 5e9})
    assert mem.result(timeout=30) == pids(client)["gpu"]
    assert client.get({"x": (where, 4)}, "x", resources={"GPU": 1}) == pids(client)["gpu"]
    assert client.compute(plain).result(timeout=30) in pids(client).values()


def test_resources_no_worker_has_give_no_worker_instead_of_a_hang(client):
    f = client.submit(where, 1, resources={"GPU": 2}, pure=False)
    wait_until(lambda: f.status == "no-worker", timeout=10, msg="no-worker status")
    assert "no worker matches resources {GPU=2}" in f.no_worker_reason()
    with pytest.raises(TimeoutError, match="resources"):
        f.result(timeout=0.3)
    g = client.submit(where, 1, resources={"TPU": 1}, pure=False)
    wait_until(lambda: g.status == "no-worker", timeout=10, msg="no-worker status")
    # The cluster goes on working meanwhile.
    assert client.submit(where, 5, resources={"GPU": 1}).result(timeout=30) == pids(client)["gpu"]
    f.cancel()
    g.cancel()


def test_a_worker_with_the_resource_joining_later_runs_the_waiting_task(client, gpu_cluster, procs):
    f = client.submit(where, 1, resources={"TPU": 1}, pure=False)
    wait_until(lambda: f.status == "no-worker", timeout=10, msg="no-worker status")
    start_worker(procs, gpu_cluster, "tpu", extra=["--resources", "TPU=1"])
    try:
        assert f.result(timeout=30) == pids(client)["tpu"]
        assert f.no_worker_reason() is None
    finally:
        client.retire_workers(["tpu"], timeout=20)


@pytest.mark.parametrize(
    "resources, error, match",
    [
        ("GPU", TypeError, "must be a dict"),
        ({"GPU": -1}, ValueError, "must be finite and >= 0"),
        ({"GPU": "one"}, TypeError, "must be a number"),
        ({"GPU": float("nan")}, ValueError, "must be finite"),
    ],
)
def test_bad_resources_are_refused_before_anything_is_sent(client, resources, error, match):
    with pytest.raises(error, match=match):
        client.submit(where, 1, resources=resources)
    with pytest.raises(error, match=match):
        client.map(where, [1, 2], resources=resources)


@pytest.mark.parametrize("value", ["GPU", "GPU=lots", "GPU=1,GPU=2", "=1", "GPU=-1"])
def test_a_worker_with_malformed_resources_exits_with_a_clear_error(gpu_cluster, value):
    p = subprocess.run(
        [sys.executable, "-m", "dask_rs", "worker", gpu_cluster, "--resources", value],
        capture_output=True, text=True, timeout=60,
    )
    assert p.returncode == 2, p.stderr
    assert "--resources:" in p.stderr
