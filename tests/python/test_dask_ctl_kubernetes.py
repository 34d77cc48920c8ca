"""The kubernetes backend end to end. Against the project's kube-apiserver
stand-in (tests/servers: core/v1 API with watches, strict decoding and owner
garbage collection, and a node that runs pods as local processes), and, for
the first test, against a real cluster when DASK_RS_TEST_KUBECONFIG is set
(with DASK_RS_TEST_IMAGE, an image with dask-rs, and DASK_RS_TEST_CONTACT, an
address of this machine the pods can reach; kubectl on PATH)."""

from __future__ import annotations

import json
import os
import subprocess
import time
import urllib.error
import urllib.request

import pytest

from conftest import HERE, ROOT, wait_until, worker_pids
from dask_rs import Client

SERVER = os.path.join(ROOT, "target", "release", "dask-rs-test-server")
REAL = os.environ.get("DASK_RS_TEST_KUBECONFIG")
SELECT = "dask-rs%2Fcluster%3D"


class FakeKube:
    """The stand-in API server, stopped by its pid."""

    def __init__(self, tmp_path, *flags):
        self.kubeconfig = str(tmp_path / "kubeconfig")
        cmd = [SERVER, "kube", "--sandbox", str(tmp_path / "node"), "--kubeconfig", self.kubeconfig,
               "--namespace", "default", "--namespace", "science", *flags]
        self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True)
        line = self.proc.stdout.readline()
        assert line.startswith("kube-apiserver at "), line
        self.url = line.split()[-1]
        self.real = False
        self.flags = ["--kubeconfig", self.kubeconfig, "--image", "local/dask-rs:test", "--host", "127.0.0.1",
                      "--env", f"PYTHONPATH={HERE}", "--python", os.path.join(ROOT, ".venv", "bin", "python")]

    def call(self, method, path, body=None):
        req = urllib.request.Request(self.url + path, method=method,
                                     data=None if body is None else json.dumps(body).encode(),
                                     headers={"Authorization": "Bearer test-token",
                                              "Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=10) as r:
            return json.load(r)

    def objects(self, cluster, namespace="default"):
        """Every object of `cluster` on the server, as 'kind/name'."""
        out = []
        for resource in ("pods", "secrets", "configmaps"):
            out += [f"{resource}/{o['metadata']['name']}" for o in self.list(resource, cluster, namespace)]
        return sorted(out)

    def list(self, resource, cluster, namespace):
        path = f"/api/v1/namespaces/{namespace}/{resource}?labelSelector={SELECT}{cluster}"
        return self.call("GET", path)["items"]

    def pods(self, cluster, namespace="default"):
        return {p["metadata"]["name"]: p for p in self.list("pods", cluster, namespace)}

    def delete_pod(self, name, namespace="default"):
        self.call("DELETE", f"/api/v1/namespaces/{namespace}/pods/{name}")

    def stop(self):
        self.proc.terminate()
        self.proc.wait(10)


class RealKube:
    """A real cluster, looked at with kubectl."""

    def __init__(self):
        self.kubeconfig = REAL
        self.real = True
        self.flags = ["--kubeconfig", REAL, "--image", os.environ["DASK_RS_TEST_IMAGE"],
                      "--contact-address", os.environ["DASK_RS_TEST_CONTACT"]]

    def kubectl(self, *args):
        return subprocess.run(["kubectl", "--kubeconfig", REAL, *args], capture_output=True, text=True,
                              check=True).stdout

    def objects(self, cluster, namespace="default"):
        out = self.kubectl("get", "pods,secrets,configmaps", "-n", namespace, "-l",
                           f"dask-rs/cluster={cluster}", "-o", "name")
        plural = {"pod": "pods", "secret": "secrets", "configmap": "configmaps"}
        return sorted(plural[k] + "/" + n for k, n in (line.split("/", 1) for line in out.split()))

    def pods(self, cluster, namespace="default"):
        out = self.kubectl("get", "pods", "-n", namespace, "-l", f"dask-rs/cluster={cluster}", "-o", "json")
        return {p["metadata"]["name"]: p for p in json.loads(out)["items"]}

    def stop(self):
        pass


@pytest.fixture
def kube(tmp_path):
    k = FakeKube(tmp_path)
    yield k
    k.stop()


@pytest.fixture(params=["stand-in", "real"])
def any_kube(request, tmp_path):
    if request.param == "real":
        if not REAL:
            pytest.skip("DASK_RS_TEST_KUBECONFIG is not set (README: testing against a real cluster)")
        yield RealKube()
        return
    k = FakeKube(tmp_path)
    yield k
    k.stop()


def status(ctl, name):
    return json.loads(ctl("status", name, "--json").stdout)


def names(ctl, cluster):
    return {w["name"] for w in status(ctl, cluster)["workers"]}


def up(ctl, kube, name, *extra, **kw):
    flags = list(kube.flags)
    if "--image" in extra:
        i = flags.index("--image")
        del flags[i:i + 2]
    return ctl("up", "--backend", "kubernetes", "--name", name, "--no-dashboard", *flags, *extra, **kw)


def make(i):
    return bytes([i]) * 100_000


def slow(x):
    time.sleep(0.5)
    return x


def hog(n):
    block = bytearray(n)
    for i in range(0, n, 4096):
        block[i] = 1
    time.sleep(5)
    return len(block)


def test_kubernetes_cluster_computes_scales_and_leaves_nothing(ctl, any_kube):
    kube = any_kube
    out = up(ctl, kube, "kub", "--workers", "3", "--cpus", "0.5", "--memory", "512Mi").stdout
    assert "Cluster kub is up (kubernetes backend)" in out, out
    pods = kube.pods("kub")
    assert sorted(pods) == ["kub-worker-0", "kub-worker-1", "kub-worker-2"]
    p = pods["kub-worker-0"]
    assert p["metadata"]["labels"]["app.kubernetes.io/name"] == "dask-rs"
    assert p["metadata"]["labels"]["dask-rs/component"] == "worker"
    assert p["metadata"]["ownerReferences"][0]["name"] == "dask-rs-kub"
    c = p["spec"]["containers"][0]
    assert c["resources"] == {"requests": {"cpu": "500m", "memory": "512Mi"}, "limits": {"memory": "512Mi"}}
    # The credentials come from the Secret, not from the command line.
    refs = {e["name"]: e["valueFrom"]["secretKeyRef"] for e in c["env"] if "valueFrom" in e}
    assert refs["DASK_RS_TOKEN"] == {"name": "dask-rs-kub-credentials", "key": "token"}
    assert not any("BEGIN" in a or len(a) > 200 for a in c["command"]), c["command"]
    assert kube.objects("kub") == ["configmaps/dask-rs-kub", "pods/kub-worker-0", "pods/kub-worker-1",
                                   "pods/kub-worker-2", "secrets/dask-rs-kub-credentials"]
    with Client("kub") as client:
        held = client.map(make, range(20), pure=False)
        client.gather(held)
        ctl("scale", "kub", "5")
        wait_until(lambda: status(ctl, "kub")["running"] == 5, timeout=120, msg="5 workers")
        ctl("scale", "kub", "2")
        wait_until(lambda: status(ctl, "kub")["requested"] == 2, timeout=120, msg="down to 2")
        wait_until(lambda: len(kube.pods("kub")) == 2, timeout=60, msg="2 pods")
        assert {w["name"] for w in status(ctl, "kub")["workers"]} == set(kube.pods("kub"))
        assert client.gather(held) == [make(i) for i in range(20)]
    ctl("down", "kub")
    assert kube.objects("kub") == []
    if not kube.real:
        wait_until(lambda: worker_pids("kub") == [], timeout=10, msg="no worker process left")


def test_kubernetes_pod_deleted_outside_is_replaced(ctl, tmp_path):
    # Watches end every second and only 5 changes are kept: the backend must
    # resume its watch, and relist when the server answers 410 Gone.
    kube = FakeKube(tmp_path, "--max-watch-seconds", "1", "--history", "5")
    try:
        pod_deleted_outside_is_replaced(ctl, kube)
    finally:
        kube.stop()


def pod_deleted_outside_is_replaced(ctl, kube):
    up(ctl, kube, "del", "--workers", "2")
    # Changes nobody watches, so that resuming from an old version fails.
    for i in range(8):
        kube.call("POST", "/api/v1/namespaces/default/configmaps",
                  {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": f"noise-{i}"}})
    time.sleep(1.5)
    with Client("del") as c:
        kube.delete_pod("del-worker-0")
        wait_until(lambda: "del-worker-0" not in names(ctl, "del"), timeout=20)
        wait_until(lambda: status(ctl, "del")["running"] == 2, timeout=30, msg="a replacement")
        assert c.submit(lambda x: x + 1, 1).result() == 2
    reasons = [d["reason"] for d in status(ctl, "del")["decisions"] if d["kind"] == "worker_failed"]
    assert any("del-worker-0" in r and "deleted outside dask-rs" in r for r in reasons), reasons
    ctl("down", "del")
    assert kube.objects("del") == []


def test_kubernetes_adaptive_counts_pending_pods_and_retires_idle_ones(ctl, tmp_path):
    # Pods wait 3 s for the scheduler; the node takes 2 pods: a third stays Unschedulable.
    kube = FakeKube(tmp_path, "--schedule-delay", "3s", "--max-pods", "2")
    try:
        up(ctl, kube, "ada", "--adapt", "--minimum", "0", "--maximum", "3", "--max-pending", "2")
        with Client("ada") as c:
            t0 = time.time()
            futs = c.map(slow, range(60))
            wait_until(lambda: len(kube.pods("ada")) == 2, timeout=20, msg="2 pods")
            time.sleep(1.5)
            assert len(kube.pods("ada")) == 2, "no more pods while 2 wait"
            wait_until(lambda: len(kube.pods("ada")) == 3, timeout=30, msg="the third pod")
            wait_until(lambda: any("Unschedulable" in w["detail"] for w in status(ctl, "ada")["workers"]),
                       timeout=30, msg="an Unschedulable pod counted as pending")
            assert c.gather(futs) == list(range(60))
            done = time.time() - t0
            del futs
            wait_until(lambda: kube.pods("ada") == {}, timeout=90, msg="idle workers retired")
            idle = time.time() - t0
        st = status(ctl, "ada")
        decisions = [(round(d["time"] - st["decisions"][0]["time"], 1), d["kind"], d["target"], d["reason"])
                     for d in st["decisions"]]
        assert len([d for d in decisions if d[1] == "scale_up"]) <= 3, decisions
        assert [d for d in decisions if d[1] == "retire"], decisions
        print(f"kubernetes adaptive: work done at {done:.1f} s, back to 0 at {idle:.1f} s")
        for d in decisions:
            print("  ", d)
        ctl("down", "ada")
        assert kube.objects("ada") == []
    finally:
        kube.stop()


def watch(kube, query):
    req = urllib.request.Request(f"{kube.url}/api/v1/namespaces/default/configmaps?watch=true&{query}",
                                 headers={"Authorization": "Bearer test-token"})
    with urllib.request.urlopen(req, timeout=10) as r:
        return [json.loads(line) for line in r.read().splitlines()]


def test_the_stand_in_watches_like_an_api_server(kube, tmp_path):
    """A watch from a recent version gets what changed since (selected by
    label), then bookmarks; resuming from a version older than the kept
    history is 410 Gone."""
    first = kube.call("GET", "/api/v1/namespaces/default/configmaps")["metadata"]["resourceVersion"]
    for i in range(3):
        meta = {"name": f"c{i}", "labels": {"n": str(i)}}
        body = {"apiVersion": "v1", "kind": "ConfigMap", "metadata": meta}
        kube.call("POST", "/api/v1/namespaces/default/configmaps", body)
    query = f"resourceVersion={first}&labelSelector=n!%3D1&allowWatchBookmarks=true&timeoutSeconds=2"
    events = watch(kube, query)
    assert [(e["type"], e["object"]["metadata"].get("name")) for e in events if e["type"] != "BOOKMARK"] == \
        [("ADDED", "c0"), ("ADDED", "c2")]
    assert any(e["type"] == "BOOKMARK" for e in events), events
    short = FakeKube(tmp_path / "short", "--history", "2")
    try:
        first = short.call("GET", "/api/v1/namespaces/default/configmaps")["metadata"]["resourceVersion"]
        for i in range(3):
            short.call("POST", "/api/v1/namespaces/default/configmaps",
                       {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": f"c{i}"}})
        events = watch(short, f"resourceVersion={first}&timeoutSeconds=2")
        assert [(e["type"], e["object"]["code"], e["object"]["reason"]) for e in events] == \
            [("ERROR", 410, "Expired")], events
    finally:
        short.stop()


def test_kubernetes_refusals_are_reported_in_its_words(ctl, kube, tmp_path):
    p = up(ctl, kube, "ns", "--workers", "1", "--namespace", "nope", check=False)
    assert p.returncode != 0 and 'namespaces "nope" not found (NotFound)' in p.stderr, p.stderr
    p = up(ctl, kube, "img", "--workers", "1", "--image", "registry.example/does-not-exist:1",
           "--timeout", "30s", check=False)
    assert p.returncode != 0 and ("ImagePullBackOff" in p.stderr or "ErrImagePull" in p.stderr), p.stderr
    ctl("down", "img")
    assert kube.objects("img") == []
    template = tmp_path / "pod.yaml"
    template.write_text("spec:\n  containers:\n  - name: worker\n    volumeMount: []\n")
    p = up(ctl, kube, "tpl", "--workers", "1", "--pod-template", str(template), check=False)
    assert p.returncode != 0 and 'unknown field "spec.containers[0].volumeMount"' in p.stderr, p.stderr
    p = up(ctl, kube, "Bad_Name", "--workers", "1", check=False)
    assert p.returncode != 0 and "cannot name Kubernetes objects" in p.stderr, p.stderr
    p = ctl("up", "--backend", "kubernetes", "--name", "noimg", "--kubeconfig", kube.kubeconfig, check=False)
    assert p.returncode != 0 and "needs --image" in p.stderr, p.stderr
    # The stand-in refuses what a strict API server refuses.
    body = {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "x"},
            "spec": {"containers": [{"name": "c", "image": "i", "colour": "red"}]}}
    with pytest.raises(urllib.error.HTTPError) as e:
        kube.call("POST", "/api/v1/namespaces/default/pods", body)
    err = json.load(e.value)
    assert err["reason"] == "BadRequest", err
    assert 'unknown field "spec.containers[0].colour"' in err["message"], err


def test_kubernetes_oom_killed_and_evicted_pods_are_reported_and_replaced(ctl, kube):
    # The worker's own limit is far above the pod's, so the node's limit acts first.
    up(ctl, kube, "oom", "--workers", "2", "--pod-memory-limit", "400Mi", "--worker-extra-args",
       "--memory-limit 8GiB")
    with Client("oom") as c:
        f = c.submit(hog, 600 << 20, workers=["oom-worker-0"], allow_other_workers=False)
        wait_until(lambda: "oom-worker-0" not in names(ctl, "oom"), timeout=30, msg="the OOM kill")
        kube.call("POST", "/fake/evict/default/oom-worker-1")
        wait_until(lambda: status(ctl, "oom")["running"] == 2 and
                   {"oom-worker-0", "oom-worker-1"}.isdisjoint(names(ctl, "oom")), timeout=60,
                   msg="two replacements")
        f.cancel()
    reasons = [d["reason"] for d in status(ctl, "oom")["decisions"] if d["kind"] == "worker_failed"]
    assert any("oom-worker-0" in r and "OOMKilled (exit code 137)" in r for r in reasons), reasons
    evicted = "Evicted: The node was low on resource: memory"
    assert any("oom-worker-1" in r and evicted in r for r in reasons), reasons
    ctl("down", "oom")
    assert kube.objects("oom") == []


def test_kubernetes_down_after_the_manager_died_removes_everything(ctl, kube, tmp_path):
    up(ctl, kube, "orph", "--workers", "2", "--namespace", "science")
    with open(tmp_path / "state" / "dask-rs" / "clusters" / "orph" / "cluster.json") as f:
        manager = json.load(f)["manager_pid"]
    os.kill(manager, 9)
    wait_until(lambda: not os.path.exists(f"/proc/{manager}") or
               open(f"/proc/{manager}/stat").read().split(") ")[1][0] == "Z", timeout=10)
    assert len(kube.objects("orph", "science")) == 4
    ctl("down", "orph")
    assert kube.objects("orph", "science") == []
    wait_until(lambda: worker_pids("orph") == [], timeout=40, msg="no worker process left")
