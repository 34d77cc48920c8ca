"""Fixtures that start real processes: the `dask-ctl scheduler` binary and
`python -m dask_rs worker` processes. Every process is stopped by PID."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from dask_rs import Client

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
# DASK_RS_DASK_CTL runs the tests against another build (a debug one, say).
DASK_CTL = os.environ.get("DASK_RS_DASK_CTL") or os.path.join(ROOT, "target", "release", "dask-ctl")


class Procs:
    """Processes a test started; all killed at teardown."""

    def __init__(self):
        self.procs: list[subprocess.Popen] = []

    def spawn(self, cmd, **kw) -> subprocess.Popen:
        p = subprocess.Popen(cmd, **kw)
        self.procs.append(p)
        return p

    def stop_all(self):
        for p in self.procs:
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        for p in self.procs:
            try:
                p.wait(5)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()


def start_scheduler(procs: Procs, *flags) -> str:
    p = procs.spawn([DASK_CTL, "scheduler", "--port", "0", *flags], stdout=subprocess.PIPE, text=True)
    line = p.stdout.readline()
    assert line.startswith("Scheduler at "), line
    return line.split()[-1]


HERE = os.path.dirname(os.path.abspath(__file__))


def worker_env() -> dict:
    """Workers import test modules by name, as they would a user's package."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([HERE, env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    return env


def start_worker(procs: Procs, address: str, name: str, nthreads: int = 1, extra=(), **kw):
    kw.setdefault("stdout", subprocess.DEVNULL)
    return procs.spawn(
        [sys.executable, "-m", "dask_rs", "worker", address, "--name", name, "--nthreads", str(nthreads),
         *extra],
        env=worker_env(),
        **kw,
    )


def wait_for_workers(client: Client, n: int, timeout: float = 20):
    client.wait_for_workers(n, timeout=timeout)


@pytest.fixture(scope="module")
def cluster():
    """A scheduler process and three single-threaded worker processes."""
    procs = Procs()
    try:
        address = start_scheduler(procs)
        for i in range(3):
            start_worker(procs, address, f"w{i}")
        with Client(address) as c:
            wait_for_workers(c, 3)
        yield address, procs
    finally:
        procs.stop_all()


@pytest.fixture
def client(cluster):
    address, _ = cluster
    with Client(address) as c:
        yield c


@pytest.fixture
def procs():
    p = Procs()
    yield p
    p.stop_all()


def wait_until(pred, timeout=10.0, interval=0.02, msg="condition"):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if pred():
            return
        time.sleep(interval)
    raise AssertionError(f"timed out waiting for {msg}")


def worker_pids(cluster):
    """Processes whose environment names `cluster` (DASK_RS_CLUSTER, set by the
    kubernetes and marathon backends), wherever the stand-ins started them."""
    pids = []
    for d in filter(str.isdigit, os.listdir("/proc")):
        try:
            env = open(f"/proc/{d}/environ", "rb").read().split(b"\0")
        except OSError:
            continue
        if f"DASK_RS_CLUSTER={cluster}".encode() in env:
            pids.append(int(d))
    return pids


@pytest.fixture
def ctl(tmp_path, monkeypatch):
    """Run dask-ctl as a separate shell would; tears down whatever is left."""
    monkeypatch.setenv("XDG_STATE_HOME", str(tmp_path / "state"))
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "config"))
    env = dict(os.environ)
    env["PATH"] = os.pathsep.join([os.path.dirname(sys.executable), env.get("PATH", "")])
    env["PYTHONPATH"] = os.pathsep.join([HERE, env.get("PYTHONPATH", "")]).rstrip(os.pathsep)

    def run(*args, check=True, timeout=120):
        p = subprocess.run([DASK_CTL, *args], env=env, capture_output=True, text=True, timeout=timeout)
        if check and p.returncode != 0:
            cmd = " ".join(args)
            raise AssertionError(f"dask-ctl {cmd} failed ({p.returncode}):\n{p.stdout}\n{p.stderr}")
        return p

    yield run
    for c in json.loads(run("list", "--json").stdout):
        run("down", c["name"], check=False)
