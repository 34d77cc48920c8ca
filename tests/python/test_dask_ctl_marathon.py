"""The marathon backend end to end against the project's Marathon stand-in
(tests/servers: Marathon's /v2 API with tasks run as local processes): a
cluster that computes, scales, adapts and goes, tasks killed from outside,
and Marathon's refusals in its own words."""

from __future__ import annotations

import json
import os
import subprocess
import time
import urllib.request

import pytest

from conftest import HERE, ROOT, wait_until, worker_pids
from dask_rs import Client

SERVER = os.path.join(ROOT, "target", "release", "dask-rs-test-server")


class FakeMarathon:
    def __init__(self, tmp_path, *flags):
        self.proc = subprocess.Popen([SERVER, "marathon", "--sandbox", str(tmp_path / "sandbox"), *flags],
                                     stdout=subprocess.PIPE, text=True)
        line = self.proc.stdout.readline()
        assert line.startswith("marathon at "), line
        self.url = line.split()[-1]
        self.auth = None

    def get(self, path):
        req = urllib.request.Request(self.url + path)
        if self.auth:
            req.add_header("Authorization", self.auth)
        with urllib.request.urlopen(req, timeout=10) as r:
            return json.load(r)

    def post(self, path, body):
        req = urllib.request.Request(self.url + path, data=json.dumps(body).encode(), method="POST",
                                     headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=10) as r:
            return json.load(r)

    def tasks(self, app):
        try:
            return self.get(f"/v2/apps{app}/tasks")["tasks"]
        except urllib.error.HTTPError as e:
            if e.code == 404:
                return []
            raise

    def stop(self):
        self.proc.terminate()
        self.proc.wait(10)


@pytest.fixture
def marathon(tmp_path):
    m = FakeMarathon(tmp_path, "--staging-delay", "300ms")
    yield m
    m.stop()


def status(ctl, name):
    return json.loads(ctl("status", name, "--json").stdout)


def up(ctl, marathon, name, *extra, **kw):
    return ctl("up", "--backend", "marathon", "--marathon-url", marathon.url, "--name", name,
               "--env", f"PYTHONPATH={HERE}", "--host", "127.0.0.1", "--no-dashboard", *extra, **kw)


def make(i):
    return bytes([i]) * 100_000


def slow(x):
    time.sleep(0.5)
    return x


def test_marathon_cluster_computes_scales_and_leaves_nothing(ctl, marathon):
    out = up(ctl, marathon, "mar", "--workers", "3", "--cpus", "0.5", "--memory", "512MiB",
             "--constraint", "hostname:UNIQUE").stdout
    assert "Cluster mar is up (marathon backend)" in out, out
    app = marathon.get("/v2/apps/dask-rs/mar")["app"]
    assert app["instances"] == 3 and app["cpus"] == 0.5 and app["mem"] == 512
    assert app["constraints"] == [["hostname", "UNIQUE"]]
    # Credentials travel as file names in the environment, never on the command line.
    assert "DASK_RS_TOKEN_FILE" in app["env"] and "token" not in app["cmd"].lower()
    tasks = {t["id"] for t in marathon.tasks("/dask-rs/mar")}
    st = status(ctl, "mar")
    assert {w["name"] for w in st["workers"]} == tasks, (st["workers"], tasks)
    assert all(w["memory_limit"] == 512 << 20 for w in st["workers"])
    with Client("mar") as c:
        held = c.map(make, range(20), pure=False)
        c.gather(held)
        ctl("scale", "mar", "5")
        wait_until(lambda: status(ctl, "mar")["running"] == 5, timeout=30, msg="5 workers")
        assert marathon.get("/v2/apps/dask-rs/mar")["app"]["instances"] == 5
        ctl("scale", "mar", "2")
        wait_until(lambda: status(ctl, "mar")["requested"] == 2, timeout=60, msg="down to 2")
        # Exactly the retired workers' tasks were killed, with the app shrinking, not replacing them.
        wait_until(lambda: len(marathon.tasks("/dask-rs/mar")) == 2, timeout=30, msg="2 tasks")
        assert marathon.get("/v2/apps/dask-rs/mar")["app"]["instances"] == 2
        left = {t["id"] for t in marathon.tasks("/dask-rs/mar")}
        assert {w["name"] for w in status(ctl, "mar")["workers"]} == left
        assert c.gather(held) == [make(i) for i in range(20)]
    assert len(worker_pids("mar")) == 2
    ctl("down", "mar")
    assert marathon.get("/v2/apps")["apps"] == []
    wait_until(lambda: worker_pids("mar") == [], timeout=10, msg="no worker process left")


def test_marathon_task_killed_outside_is_replaced(ctl, marathon):
    up(ctl, marathon, "kil", "--workers", "2")
    with Client("kil") as c:
        victim = marathon.tasks("/dask-rs/kil")[0]["id"]
        # Killed without scale=true: Marathon starts another task, the cluster notices.
        marathon.post("/v2/tasks/delete", {"ids": [victim]})
        wait_until(lambda: victim not in {w["name"] for w in status(ctl, "kil")["workers"]}, timeout=20)
        wait_until(lambda: status(ctl, "kil")["running"] == 2, timeout=30, msg="a replacement")
        assert c.submit(lambda x: x + 1, 1).result() == 2
    reasons = [d["reason"] for d in status(ctl, "kil")["decisions"] if d["kind"] == "worker_failed"]
    assert any(victim in r and "TASK_KILLED" in r for r in reasons), reasons
    ctl("down", "kil")


def test_marathon_adaptive_counts_waiting_tasks_and_retires_idle_ones(ctl, tmp_path):
    # Tasks stay TASK_STAGING for 3 s; at most 2 may wait at once.
    m = FakeMarathon(tmp_path, "--staging-delay", "3s")
    try:
        up(ctl, m, "ada", "--adapt", "--minimum", "0", "--maximum", "3", "--max-pending", "2")
        with Client("ada") as c:
            t0 = time.time()
            futs = c.map(slow, range(24))
            wait_until(lambda: m.get("/v2/apps/dask-rs/ada")["app"]["instances"] == 2, timeout=20,
                       msg="2 instances")
            time.sleep(1.5)
            assert m.get("/v2/apps/dask-rs/ada")["app"]["instances"] == 2, "no more while 2 tasks wait"
            wait_until(lambda: m.get("/v2/apps/dask-rs/ada")["app"]["instances"] == 3, timeout=30,
                       msg="the third instance")
            assert c.gather(futs) == list(range(24))
            done = time.time() - t0
            del futs
            wait_until(lambda: m.tasks("/dask-rs/ada") == [], timeout=60, msg="idle workers retired")
            idle = time.time() - t0
        st = status(ctl, "ada")
        decisions = [(round(d["time"] - st["decisions"][0]["time"], 1), d["kind"], d["target"], d["reason"])
                     for d in st["decisions"]]
        ups = [d for d in decisions if d[1] == "scale_up"]
        assert len(ups) <= 3, decisions
        assert [d for d in decisions if d[1] == "retire"], decisions
        assert m.get("/v2/apps/dask-rs/ada")["app"]["instances"] == 0
        print(f"marathon adaptive: work done at {done:.1f} s, back to 0 at {idle:.1f} s")
        for d in decisions:
            print("  ", d)
        ctl("down", "ada")
        assert m.get("/v2/apps")["apps"] == []
    finally:
        m.stop()


def test_marathon_refusals_are_reported_in_its_words(ctl, marathon, tmp_path):
    p = up(ctl, marathon, "bad", "--workers", "1", "--app-id", "/Bad_ID", check=False)
    assert p.returncode != 0
    assert "Marathon refused app /Bad_ID" in p.stderr, p.stderr
    assert "/id: must fully match regular expression" in p.stderr, p.stderr
    assert json.loads(ctl("list", "--json").stdout) == []
    # Nothing listens there.
    p = ctl("up", "--backend", "marathon", "--marathon-url", "http://127.0.0.1:9", "--name", "nope",
            check=False)
    assert p.returncode != 0 and "cannot reach Marathon at http://127.0.0.1:9" in p.stderr, p.stderr
    p = ctl("up", "--backend", "marathon", "--name", "nourl", check=False)
    assert p.returncode != 0 and "needs --marathon-url" in p.stderr, p.stderr
    # An app that exists already is not taken over.
    marathon.post("/v2/apps", {"id": "/dask-rs/taken", "cmd": "sleep 60", "cpus": 0.1, "instances": 0})
    p = up(ctl, marathon, "taken", "--workers", "1", check=False)
    assert p.returncode != 0 and "already has an app /dask-rs/taken" in p.stderr, p.stderr


def test_marathon_credentials_are_required_when_set(ctl, tmp_path):
    m = FakeMarathon(tmp_path, "--basic-auth", "dask:s3cret")
    try:
        p = up(ctl, m, "auth", "--workers", "1", check=False)
        assert p.returncode != 0 and "HTTP 401: Invalid username or password" in p.stderr, p.stderr
        secret = tmp_path / "marathon-auth"
        secret.write_text("dask:s3cret\n")
        up(ctl, m, "auth", "--workers", "1", "--marathon-auth-file", str(secret))
        with Client("auth") as c:
            assert c.submit(sum, [1, 2]).result() == 3
        ctl("down", "auth")
        m.auth = "Basic ZGFzazpzM2NyZXQ="
        assert m.get("/v2/apps")["apps"] == []
    finally:
        m.stop()


def test_marathon_job_script_prints_the_app(ctl):
    p = ctl("job-script", "--backend", "marathon", "--name", "js", "--cpus", "2", "--memory", "4GiB",
            "--image", "ghcr.io/example/dask-rs:1", "--env", "A=1", "--port", "8786", "--host", "10.0.0.5")
    app = json.loads(p.stdout)
    assert app["id"] == "/dask-rs/js" and app["cpus"] == 2 and app["mem"] == 4096
    assert app["container"] == {"type": "DOCKER", "docker": {"image": "ghcr.io/example/dask-rs:1"}}
    assert app["env"]["A"] == "1"
    assert "worker tls://10.0.0.5:8786 --name \"$MESOS_TASK_ID\"" in app["cmd"], app["cmd"]
