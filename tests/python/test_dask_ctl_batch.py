"""The slurm and sge backends against real batch systems on this machine: a
one-node SLURM (munged, slurmctld, slurmd) and a one-node Grid Engine cell
(qmaster, execd), started by tests/infra/*-up.sh and stopped by their pids."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import time

import pytest

from conftest import HERE, ROOT, wait_until
from dask_rs import Client

INFRA = os.path.join(ROOT, "tests", "infra")
STATE = os.environ.get("DASK_RS_TEST_STATE", "/var/lib/dask-rs-tests")

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="installing and running batch daemons needs root")


def infra(script, check=True, timeout=600, env=None):
    """Run a tests/infra script; a failure shows everything it printed."""
    p = subprocess.run([os.path.join(INFRA, script)], capture_output=True, text=True, timeout=timeout,
                       env={**os.environ, **(env or {})})
    if check and p.returncode != 0:
        pytest.fail(f"tests/infra/{script} failed ({p.returncode}):\n{p.stdout}{p.stderr}")
    return p


def batch_system(system):
    """Start the test's own SLURM or Grid Engine and put its client variables in the environment."""
    infra(f"{system}-up.sh")
    env = dict(line.split("=", 1) for line in open(f"{STATE}/{system}/env").read().split())
    os.environ.update(env)
    yield env
    infra(f"{system}-down.sh", timeout=120)
    for k in env:
        os.environ.pop(k, None)


@pytest.fixture(scope="module")
def slurm():
    yield from batch_system("slurm")


@pytest.fixture(scope="module")
def sge():
    yield from batch_system("sge")


def dead_pid():
    p = subprocess.Popen(["true"])
    p.wait()
    return p.pid


def recorded(system, daemon):
    return int(open(f"{STATE}/{system}/{daemon}.pid").read())


def kill_recorded(system, daemon):
    pid = recorded(system, daemon)
    os.kill(pid, signal.SIGKILL)
    wait_until(lambda: gone(pid), msg=f"{daemon} to die")


def gone(pid):
    try:
        return open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()[0] == "Z"
    except FileNotFoundError:
        return True


@contextlib.contextmanager
def planted(files):
    """Write `files` (path -> text), restoring whatever was there before on exit."""
    before = {}
    for path, text in files.items():
        before[path] = open(path, "rb").read() if os.path.exists(path) else None
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "w") as f:
            f.write(text)
    try:
        yield
    finally:
        for path, old in before.items():
            if old is None:
                os.unlink(path)
            else:
                with open(path, "wb") as f:
                    f.write(old)


def contents(paths):
    return {p: open(p, "rb").read() for p in paths}


def test_infra_scripts_start_over_stale_and_foreign_state(tmp_path):
    """Another configuration's files (a foreign slurm.conf, a saved cluster name, stale
    pid files, a foreign Grid Engine cell) are neither read nor changed; our own state
    after a run killed halfway (daemons SIGKILLed, pid files naming dead or unrelated
    processes, a spool whose initialisation never finished) is repaired."""
    infra("slurm-up.sh")
    infra("sge-up.sh")
    stranger = subprocess.Popen(["sleep", "600"])
    foreign = {
        "/etc/slurm/slurm.conf": "ClusterName=othersite\nSlurmctldHost=elsewhere\n"
        "StateSaveLocation=/var/spool/slurmctld\n",
        "/var/spool/slurmctld/clustername": "othersite\n",
        "/var/spool/slurmctld/slurmctld.pid": f"{dead_pid()}\n",
        "/run/slurmctld.pid": f"{dead_pid()}\n",
        "/run/gridengine/qmaster.pid": f"{dead_pid()}\n",
        "/var/lib/gridengine/default/common/act_qmaster": "elsewhere\n",
    }
    try:
        with planted(foreign):
            # Our own run, killed halfway: munged and the spools stay, the daemons die.
            for system, daemons in [("slurm", ["slurmctld", "slurmd"]), ("sge", ["qmaster", "execd"])]:
                for d in daemons:
                    kill_recorded(system, d)
            with open(f"{STATE}/slurm/slurmctld.pid", "w") as f:
                f.write(f"{dead_pid()}\n")
            with open(f"{STATE}/slurm/slurmd.pid", "w") as f:
                f.write(f"{stranger.pid}\n")
            with open(f"{STATE}/slurm/ctld/clustername", "w") as f:
                f.write("othersite\n")
            with open(f"{STATE}/sge/execd.pid", "w") as f:
                f.write(f"{stranger.pid}\n")
            os.unlink(f"{STATE}/sge/initialised")
            planted_now = contents(foreign)

            out = infra("slurm-up.sh").stdout
            assert 'discarding saved state of cluster "othersite"' in out, out
            assert "ready: node" in out, out
            out = infra("sge-up.sh").stdout
            assert "ready: host" in out, out
            assert stranger.poll() is None, "a process named by a stale pid file was left alone"
            assert contents(foreign) == planted_now, "another configuration's files were not changed"
            assert recorded("slurm", "slurmd") != stranger.pid and recorded("sge", "execd") != stranger.pid
            env = dict(line.split("=", 1) for line in open(f"{STATE}/sge/env").read().split())
            r = subprocess.run(["qsub", "-sync", "y", "-b", "y", "-o", "/dev/null", "-j", "y", "true"],
                               env={**os.environ, **env}, capture_output=True, text=True, timeout=60)
            assert "exited with exit code 0" in r.stdout, r.stdout + r.stderr

            # A port held by a process these scripts did not start: a clear error at once.
            infra("slurm-down.sh")
            with socket.socket() as s:
                s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                s.bind(("127.0.0.1", 0))
                s.listen()
                port = s.getsockname()[1]
                t0 = time.monotonic()
                r = infra("slurm-up.sh", check=False, env={"DASK_RS_SLURMCTLD_PORT": str(port)})
                took = time.monotonic() - t0
            assert r.returncode != 0, r.stdout
            held = f"port {port}, which our slurmctld needs, is held by pid {os.getpid()}"
            assert held in r.stderr, r.stderr
            assert "DASK_RS_SLURMCTLD_PORT" in r.stderr and took < 20, (took, r.stderr)
    finally:
        stranger.kill()
        stranger.wait()
        infra("slurm-down.sh", check=False)
        infra("sge-down.sh", check=False)


def queue(system, name):
    """Jobs of cluster `name` the batch system still lists as queued or running."""
    if system == "slurm":
        cmd = ["squeue", "-h", "-o", "%j|%T"]
        out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
        return [line for line in out.split() if line.startswith(f"{name}-")]
    out = subprocess.run(["qstat"], capture_output=True, text=True, check=True).stdout
    return [line for line in out.splitlines()[2:] if f" {name}-" in line]


def worker_processes(name):
    found = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            cmd = open(f"/proc/{pid}/cmdline", "rb").read().replace(b"\0", b" ").decode()
        except OSError:
            continue
        if " dask_rs worker " in cmd and f"--name {name}-" in cmd:
            found.append(cmd)
    return found


def status(ctl, name):
    return json.loads(ctl("status", name, "--json").stdout)


def up(ctl, system, name, *extra, **kw):
    prologue = f"export PYTHONPATH={HERE}"
    return ctl("up", "--backend", system, "--name", name, "--prologue", prologue, *extra, **kw)


def square(x):
    return x * x


def make(i):
    return bytes([i]) * 100_000


def slow(x):
    time.sleep(1)
    return x


@pytest.mark.parametrize("system", ["slurm", "sge"])
def test_four_workers_as_batch_jobs_compute_scale_and_go(system, request):
    request.getfixturevalue(system)
    ctl = request.getfixturevalue("ctl")  # after the batch system: dask-ctl gets its variables
    name = f"{system}4"
    t0 = time.time()
    out = up(ctl, system, name, "--workers", "4").stdout
    took = time.time() - t0
    assert f"Cluster {name} is up ({system} backend)" in out
    st = status(ctl, name)
    assert st["running"] == 4 and len(queue(system, name)) == 4
    assert all(w["detail"].startswith("job ") for w in st["workers"]), st["workers"]
    with Client(name) as c:
        assert sum(c.gather(c.map(square, range(200)))) == sum(i * i for i in range(200))
        held = c.map(make, range(8), pure=False)
        c.gather(held)

        ctl("scale", name, "6")
        wait_until(lambda: status(ctl, name)["running"] == 6, timeout=60, msg="6 workers")
        assert len(queue(system, name)) == 6
        ctl("scale", name, "2")
        wait_until(lambda: len(queue(system, name)) == 2, timeout=60, msg="jobs to end")
        assert status(ctl, name)["running"] == 2
        assert c.gather(held) == [make(i) for i in range(8)], "retired workers' data moved first"
    assert "batch job(s) cancelled" in ctl("down", name).stdout
    assert queue(system, name) == []
    assert worker_processes(name) == []
    print(f"{system}: 4 workers up as batch jobs in {took:.2f} s")


def test_refused_jobs_and_missing_commands_are_clear(ctl, slurm, sge, tmp_path):
    r = ctl("up", "--backend", "slurm", "--name", "badpart", "--queue", "nope", "--workers", "1", check=False)
    assert r.returncode != 0 and "slurm refuses the job" in r.stderr, r.stderr
    assert "invalid partition" in r.stderr, r.stderr
    r = ctl("up", "--backend", "sge", "--name", "badq", "--queue", "nope", "--workers", "1", check=False)
    assert r.returncode != 0 and "sge refuses the job" in r.stderr, r.stderr
    assert 'unknown queue "nope"' in r.stderr, r.stderr
    bare = dict(os.environ, PATH="/nonexistent")
    p = subprocess.run([os.path.join(ROOT, "target", "release", "dask-ctl"), "up", "--backend", "slurm"],
                       env=bare, capture_output=True, text=True)
    assert p.returncode != 0 and "needs `sbatch` on PATH" in p.stderr, p.stderr
    # A job whose worker cannot reach the scheduler: up reports why and gives up.
    r = up(ctl, "slurm", "lost", "--workers", "1", "--contact-address", "tcp://127.0.0.1:9",
           "--timeout", "60s", check=False)
    assert r.returncode != 0 and "cannot reach the scheduler at tls://127.0.0.1:9" in r.stderr, r.stderr
    ctl("down", "lost")
    assert json.loads(ctl("list", "--json").stdout) == []


def test_slurm_adaptive_counts_pending_jobs_and_retires_idle_ones(ctl, slurm):
    # Jobs are held for 4 s after submission (--begin), as on a busy cluster:
    # while they wait, the controller must not submit more.
    # At most 2 jobs may wait at once (--max-pending): the third is submitted
    # only once one of the first two runs.
    up(ctl, "slurm", "ad", "--adapt", "--minimum", "0", "--maximum", "3", "--max-pending", "2",
       "--job-extra", "--begin=now+4")
    with Client("ad") as c:
        t0 = time.time()
        futs = c.map(slow, range(30))
        wait_until(lambda: len(queue("slurm", "ad")) == 2, timeout=30, msg="2 jobs submitted")
        pending = [j for j in queue("slurm", "ad") if j.endswith("PENDING")]
        assert len(pending) == 2, queue("slurm", "ad")
        time.sleep(2)
        assert len(queue("slurm", "ad")) == 2, "no more submissions while 2 jobs wait"
        wait_until(lambda: len(queue("slurm", "ad")) == 3, timeout=30, msg="the third job")
        wait_until(lambda: status(ctl, "ad")["running"] >= 1, timeout=60, msg="a worker")
        first = time.time() - t0
        assert c.gather(futs) == list(range(30))
        done = time.time() - t0
        # Results still wanted keep the last worker (nothing else can hold them): release them.
        del futs
        wait_until(lambda: queue("slurm", "ad") == [], timeout=60, msg="idle workers retired")
        idle = time.time() - t0
    st = status(ctl, "ad")
    decisions = [(round(d["time"] - st["decisions"][0]["time"], 1), d["kind"], d["target"], d["reason"])
                 for d in st["decisions"]]
    submitted = {w for d in st["decisions"] if d["kind"] == "scale_up" for w in [d["reason"]]}
    ups = [d for d in decisions if d[1] == "scale_up"]
    assert len(ups) <= 3, decisions
    assert [d for d in decisions if d[1] in ("retire", "scale_down")], decisions
    print(f"slurm adaptive: first worker {first:.1f} s after the burst, work done at {done:.1f} s, "
          f"back to 0 at {idle:.1f} s; {len(submitted)} scale-ups")
    for d in decisions:
        print("  ", d)
    ctl("down", "ad")


def test_slurm_job_cancelled_outside_is_replaced_and_lifetime_retires_gracefully(ctl, slurm):
    # Worker lt-0 gets a 6 s lifetime (the environment variable distributed reads too).
    prologue = '[ "$SLURM_JOB_NAME" = lt-0 ] && export DASK_DISTRIBUTED__WORKER__LIFETIME__DURATION=6s'
    up(ctl, "slurm", "lt", "--workers", "2", "--prologue", prologue)
    with Client("lt") as c:
        held = [c.submit(make, i, workers=["lt-0"], pure=False) for i in range(5)]
        c.gather(held)
        ids = {w["name"]: w["detail"].split()[1] for w in status(ctl, "lt")["workers"]}
        subprocess.run(["scancel", ids["lt-1"]], check=True)
        wait_until(lambda: "lt-1" not in {w["name"] for w in status(ctl, "lt")["workers"]}, timeout=20)
        wait_until(lambda: status(ctl, "lt")["running"] == 2, timeout=30, msg="a replacement for lt-1")
        # lt-0 reaches its lifetime: retired with its data moved, its job ends, it is replaced.
        wait_until(lambda: "lt-0" not in {w["name"] for w in status(ctl, "lt")["workers"]}, timeout=30)
        wait_until(lambda: status(ctl, "lt")["running"] == 2, timeout=30, msg="a replacement for lt-0")
        assert c.gather(held) == [make(i) for i in range(5)]
        log = ctl("logs", "lt", "lt-0").stdout
        assert "lifetime reached" in log, log
    reasons = [d["reason"] for d in status(ctl, "lt")["decisions"] if d["kind"] == "worker_failed"]
    assert any("lt-1 ended" in r and "CANCELLED" in r for r in reasons), reasons
    assert any("lt-0 ended" in r and "COMPLETED" in r for r in reasons), reasons
    ctl("down", "lt")
