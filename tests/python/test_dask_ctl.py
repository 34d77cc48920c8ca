"""`dask-ctl up/list/status/scale/adapt/down` from separate processes, with a
real detached manager, real worker processes and a Python client connecting
by cluster name. Each test has its own registry (XDG_STATE_HOME)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.request

import pytest

from conftest import DASK_CTL, wait_until
from dask_rs import Client


def status(ctl, name):
    return json.loads(ctl("status", name, "--json").stdout)


def pids(st):
    return [int(w["detail"].split()[1]) for w in st["workers"] if w["detail"].startswith("pid ")]


def alive(pid):
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def manager_pid(tmp_path, name):
    with open(tmp_path / "state" / "dask-rs" / "clusters" / name / "cluster.json") as f:
        return json.load(f)["manager_pid"]


def running(ctl, name):
    return status(ctl, name)["running"]


def square(x):
    return x * x


def slow(x):
    time.sleep(0.5)
    return x


def test_up_list_status_scale_down_from_separate_processes(ctl, tmp_path):
    out = ctl("up", "--name", "alpha", "--workers", "2", "--nthreads", "1", "--memory-limit", "1GiB").stdout
    assert "Cluster alpha is up (local backend)" in out
    assert 'Client("alpha")' in out
    [c] = json.loads(ctl("list", "--json").stdout)
    summary = (c["name"], c["backend"], c["workers"], c["pending"], c["status"])
    assert summary == ("alpha", "local", 2, 0, "running")
    assert c["address"].startswith("tls://127.0.0.1:")
    table = ctl("list").stdout
    assert "alpha" in table and "2/0" in table

    with Client("alpha") as client:
        assert client.scheduler_address == c["address"]
        assert sum(client.gather(client.map(square, range(100)))) == 328350
        ctl("scale", "alpha", "3")
        client.wait_for_workers(3, timeout=30)
        st = status(ctl, "alpha")
        assert st["policy"] == "fixed(3)"
        assert sorted(w["state"] for w in st["workers"]) == ["running"] * 3
        assert all(w["memory_limit"] == 1 << 30 for w in st["workers"])
        started = pids(st)
        assert len(started) == 3 and all(alive(p) for p in started)

        kept = client.map(square, range(10))
        client.gather(kept)
        ctl("scale", "alpha", "1")
        wait_until(lambda: running(ctl, "alpha") == 1, timeout=30, msg="scale down to 1")
        assert client.gather(kept) == [x * x for x in range(10)], "scale-down retires workers, data survives"
        kinds = [d["kind"] for d in status(ctl, "alpha")["decisions"] if d["kind"] != "target"]
        # Two scale-ups (to 2, to 3), then one or two retirements (workers go once idle).
        assert kinds[:2] == ["scale_up", "scale_up"] and set(kinds[2:]) == {"retire"}, kinds
        assert len(kinds) <= 4, kinds

    assert "client = Client(\"alpha\")" in ctl("snippet", "alpha").stdout
    assert "manager of alpha" in ctl("logs", "alpha").stdout
    mpid = manager_pid(tmp_path, "alpha")
    down = ctl("down", "alpha").stdout
    assert "Cluster alpha is down" in down
    assert not alive(mpid), "the manager is gone"
    assert not any(alive(p) for p in started), "no worker process is left"
    assert json.loads(ctl("list", "--json").stdout) == []


def test_down_cleans_up_after_the_manager_died(ctl, tmp_path):
    ctl("up", "--name", "crashy", "--workers", "2")
    started = pids(status(ctl, "crashy"))
    mpid = manager_pid(tmp_path, "crashy")
    os.kill(mpid, signal.SIGKILL)
    wait_until(lambda: not alive(mpid), msg="manager to die")
    [c] = json.loads(ctl("list", "--json").stdout)
    assert c["status"] == "dead"
    st = ctl("status", "crashy", check=False)
    assert st.returncode != 0 and "not running" in st.stderr
    # Workers lose their scheduler with the manager and exit on their own;
    # any still running are stopped from the registry's records (killing
    # live orphans from records is covered by the deployers unit tests).
    out = ctl("down", "crashy").stdout
    assert "not running; removing what it started" in out
    assert "Cluster crashy is down (2 worker(s) stopped" in out
    assert not any(alive(p) for p in started)
    assert json.loads(ctl("list", "--json").stdout) == []


def test_adaptive_burst_scales_up_then_idles_back_without_losing_data(ctl):
    ctl("up", "--name", "elastic", "--adapt", "--minimum", "1", "--maximum", "3")
    wait_until(lambda: running(ctl, "elastic") == 1, timeout=30, msg="the minimum of 1 worker")
    with Client("elastic") as client:
        before = client.map(square, range(20))
        assert client.gather(before)[-1] == 361
        t0 = time.monotonic()
        burst = client.map(slow, range(60))
        wait_until(lambda: running(ctl, "elastic") == 3, timeout=30, msg="scale up to the maximum")
        scaled_up = time.monotonic() - t0
        assert client.gather(burst) == list(range(60))
        wait_until(lambda: running(ctl, "elastic") == 1, timeout=40, msg="idle back to the minimum")
        # Futures from before the scale-down still have their data.
        assert client.gather(before) == [x * x for x in range(20)]
        assert client.gather(burst) == list(range(60))
    decisions = status(ctl, "elastic")["decisions"]
    kinds = [d["kind"] for d in decisions if d["kind"] != "target"]
    # The manager's dashboard shows the same decisions and the policy's figures.
    link = status(ctl, "elastic")["dashboard"]
    assert link and link.startswith("http://127.0.0.1:") and link in ctl("list").stdout
    base = link.rsplit("/", 1)[0]
    with urllib.request.urlopen(base + "/adaptive", timeout=10) as r:
        page = r.read().decode()
    assert page.count('class="decision"') >= 3 and "scale_up" in page and "retire" in page
    with urllib.request.urlopen(base + "/metrics", timeout=10) as r:
        metrics = r.read().decode()
    assert "dask_rs_adaptive_target_workers 1" in metrics and "dask_scheduler_desired_workers 1" in metrics
    print(f"burst to 3 workers in {scaled_up:.2f} s; decisions: {kinds}")
    assert kinds.count("scale_up") <= 3, kinds
    assert kinds.count("retire") + kinds.count("scale_down") <= 3, kinds
    assert not any(k in ("backend_error", "worker_failed") for k in kinds), decisions


def test_clear_errors(ctl, tmp_path):
    r = ctl("up", "--backend", "nope", check=False)
    assert r.returncode != 0 and \
        'unknown backend "nope" (available: local, ssh, slurm, sge, kubernetes, marathon)' in r.stderr
    r = ctl("up", "--workers", "1", "--python", "/nonexistent/python3", check=False)
    assert r.returncode != 0 and "not found" in r.stderr
    deep = dict(os.environ, XDG_STATE_HOME=str(tmp_path / ("d" * 90)),
                PATH=os.pathsep.join([os.path.dirname(sys.executable), os.environ.get("PATH", "")]))
    r = subprocess.run([DASK_CTL, "up", "--workers", "1", "--name", "deep"], env=deep, capture_output=True,
                       text=True, timeout=60)
    assert r.returncode != 0 and "Unix sockets allow 107" in r.stderr, r.stderr
    assert "XDG_STATE_HOME" in r.stderr
    bare = os.path.join(sys.base_prefix, "bin", "python3")
    bare_lacks_dask_rs = os.path.exists(bare) and subprocess.run(
        [bare, "-c", "import dask_rs"], capture_output=True
    ).returncode
    if bare_lacks_dask_rs:
        r = ctl("up", "--workers", "1", "--python", bare, check=False)
        assert r.returncode != 0 and "cannot import dask_rs" in r.stderr
    with __import__("socket").socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        r = ctl("up", "--port", str(s.getsockname()[1]), check=False)
        assert r.returncode != 0 and "is not available" in r.stderr
    r = ctl("up", "--workers", "1", "--flag-that-does-not-exist", check=False)
    assert r.returncode == 2 and "unexpected argument" in r.stderr
    for cmd in (["status", "ghost"], ["scale", "ghost", "2"], ["down", "ghost"], ["logs", "ghost"]):
        r = ctl(*cmd, check=False)
        assert r.returncode != 0 and 'no cluster named "ghost"' in r.stderr, (cmd, r.stderr)
    ctl("up", "--name", "taken", "--workers", "0")
    r = ctl("up", "--name", "taken", "--workers", "0", check=False)
    assert r.returncode != 0 and 'a cluster named "taken" already exists' in r.stderr
    r = ctl("logs", "taken", "no-such-worker", check=False)
    assert r.returncode != 0 and "no log for" in r.stderr
    with pytest.raises(ValueError, match="neither an address"):
        Client("no-such-cluster")
    # Nothing was left registered by the failed attempts.
    assert [c["name"] for c in json.loads(ctl("list", "--json").stdout)] == ["taken"]


def test_config_show_help_and_completions(ctl, tmp_path):
    cfg = tmp_path / "config" / "dask-rs"
    cfg.mkdir(parents=True)
    (cfg / "cluster.yaml").write_text("local:\n  nthreads: 3\n  memory_limit: 2GiB\n")
    env_out = ctl("config", "show").stdout
    assert "nthreads           3" in env_out and "(file " in env_out
    assert "memory_limit       2GiB" in env_out
    help_up = ctl("up", "--help").stdout
    flags = (
        "--backend", "--workers", "--adapt", "--minimum", "--maximum", "--nthreads", "--memory-limit",
        "--python", "--processes", "--cores", "--memory", "--walltime", "--queue", "--account",
        "--job-extra", "--prologue", "--worker-extra-args", "--config", "--contact-address",
        "--hosts", "--ssh-arg",
    )
    for flag in flags:
        assert flag in help_up, flag
    top = ctl("--help").stdout
    subs = ("up", "list", "status", "scale", "adapt", "down", "logs", "snippet", "config", "completions",
            "job-script")
    for sub in subs:
        assert f"\n  {sub}" in top, sub
    bash = ctl("completions", "bash").stdout
    assert "complete -F _dask__ctl" in bash and "--backend" in bash
