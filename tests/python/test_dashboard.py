"""The web dashboard of a real cluster: its pages in headless Chromium (the
DOM after the page's scripts ran, and a screenshot of each page under
target/dashboard-screenshots/), /metrics through a Prometheus parser, and
the JSON API, all checked against the scheduler's own figures."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
import urllib.error
import urllib.request

import dask.array as da
import pytest
from prometheus_client.parser import text_string_to_metric_families

from conftest import wait_until
from dask_rs import Client, LocalCluster, get_task_stream, performance_report, wait

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SHOTS = os.path.join(ROOT, "target", "dashboard-screenshots")
CHROMIUM_FLAGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
    "--hide-scrollbars",
]


@pytest.fixture(scope="module")
def chromium():
    r = subprocess.run([os.path.join(ROOT, "tests", "infra", "chromium.sh")], capture_output=True, text=True)
    if r.returncode != 0:
        pytest.fail(f"tests/infra/chromium.sh failed:\n{r.stdout}{r.stderr}")
    return r.stdout.strip().splitlines()[-1]


def browse(chromium, url, tmp_path, screenshot=None):
    """The DOM of `url` after its scripts ran and its stream delivered an
    update (and a screenshot then). `?once=1` makes the page close its
    stream after one update, so the browser sees the page settle."""
    url += ("&" if "?" in url else "?") + "once=1"
    profile = tmp_path / f"profile-{time.monotonic_ns()}"
    args = [chromium, *CHROMIUM_FLAGS, f"--user-data-dir={profile}", "--virtual-time-budget=3000"]
    if screenshot:
        os.makedirs(SHOTS, exist_ok=True)
        shot = os.path.join(SHOTS, screenshot)
        subprocess.run([*args, "--window-size=1280,800", f"--screenshot={shot}", url],
                       capture_output=True, timeout=60, check=True)
        assert os.path.getsize(shot) > 5_000, "a screenshot with something on it"
    r = subprocess.run([*args, "--dump-dom", url], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr[-2000:]
    return r.stdout


def get(url):
    with urllib.request.urlopen(url, timeout=10) as r:
        return r.status, r.headers.get("Content-Type", ""), r.read().decode()


@pytest.fixture(scope="module")
def cluster_and_client():
    with LocalCluster(n_workers=2, threads_per_worker=2, dashboard_address="127.0.0.1:0") as cluster:
        with Client(cluster) as client:
            # A stdlib function: workers import it by name (no test module needed).
            futures = client.map(time.sleep, [0.002] * 300, pure=False)
            client.gather(futures)
            # And a dask.array held on the workers (16 chunks).
            x = da.random.random((2000, 2000), chunks=500)
            y = (x + x.T).persist()
            wait(y)
            # The dashboard follows the scheduler's events a few times a second.
            time.sleep(1.5)
            yield cluster, client, futures, y


def test_links_agree_and_pages_answer(cluster_and_client):
    cluster, client, _, _ = cluster_and_client
    link = cluster.dashboard_link
    assert re.fullmatch(r"http://127\.0\.0\.1:\d+/status", link), link
    assert client.dashboard_link == link
    base = link.rsplit("/", 1)[0]
    assert get(base + "/health")[2] == "ok"
    for page in ["/status", "/workers", "/tasks", "/info", "/individual-task-stream"]:
        status, ctype, body = get(base + page)
        assert status == 200 and ctype.startswith("text/html") and "dask-rs" in body, page
    plots = json.loads(get(base + "/individual-plots.json")[2])
    assert "/individual-task-stream" in plots
    with pytest.raises(urllib.error.HTTPError) as e:
        get(base + "/stream/no-such-page")
    assert e.value.code == 404


def test_metrics_parse_and_agree_with_the_scheduler(cluster_and_client):
    cluster, client, futures, _ = cluster_and_client
    base = cluster.dashboard_link.rsplit("/", 1)[0]
    _, ctype, text = get(base + "/metrics")
    assert ctype.startswith("text/plain")
    samples = [s for f in text_string_to_metric_families(text) for s in f.samples]
    info = client.scheduler_info()

    def value(name, **labels):
        found = [s.value for s in samples
                 if s.name == name and all(s.labels.get(k) == v for k, v in labels.items())]
        assert len(found) == 1, (name, labels, found)
        return found[0]

    assert value("dask_scheduler_workers") == len(info["workers"]) == 2
    assert value("dask_scheduler_clients") == info["n_clients"]
    # Every future is held and finished: 300 + 16 tasks in memory, none elsewhere.
    assert value("dask_scheduler_tasks", state="memory") == len(futures) + 16 == 316
    assert value("dask_scheduler_tasks", state="processing") == 0
    assert value("dask_scheduler_tasks_compute_seconds_total", task_prefix_name="sleep") >= 300 * 0.002
    for addr, w in info["workers"].items():
        assert value("dask_worker_threads", worker=addr) == w["nthreads"] == 2
        assert value("dask_worker_tasks", worker=addr, state="memory") == w["metrics"]["in_memory"]
    assert sum(value("dask_worker_tasks", worker=a, state="memory") for a in info["workers"]) == 316


def test_api_lists_workers_and_the_target(cluster_and_client):
    cluster, client, _, _ = cluster_and_client
    base = cluster.dashboard_link.rsplit("/", 1)[0]
    workers = json.loads(get(base + "/api/v1/get_workers")[2])["workers"]
    assert sorted(w["address"] for w in workers) == sorted(client.scheduler_info()["workers"])
    assert json.loads(get(base + "/api/v1/adaptive_target")[2]) == {"workers": 0}, "nothing left to do"


def test_info_shows_configuration_and_the_log(cluster_and_client):
    cluster, client, _, _ = cluster_and_client
    base = cluster.dashboard_link.rsplit("/", 1)[0]
    body = get(base + "/info")[2]
    config = re.search(r'<table class="config">(.*?)</table>', body, re.S).group(1)
    assert "<td>distributed.scheduler.worker-saturation</td><td>1.1</td>" in config, config
    assert "<td>cluster token</td><td>required</td>" in config, config
    log = re.search(r'<pre class="log">(.*?)</pre>', body, re.S).group(1)
    for addr, w in client.scheduler_info()["workers"].items():
        assert re.search(rf"INFO cluster::scheduler::server: worker {w['name']} at {addr} joined", log), log


def test_workers_report_their_cpu(cluster_and_client):
    """A worker busy hashing reports most of a core; the page and
    scheduler_info() show it; the idle one reports little."""
    import hashlib

    cluster, client, _, _ = cluster_and_client
    busy, idle = sorted(client.scheduler_info()["workers"])
    # A stdlib function workers import by name: seconds of pure CPU.
    f = client.submit(hashlib.pbkdf2_hmac, "sha256", b"pw", b"salt", 5_000_000, workers=[busy], pure=False)
    seen = []

    def cpu_of(addr):
        return client.scheduler_info()["workers"][addr]["metrics"]["cpu"]

    def hot():
        seen.append((cpu_of(busy), cpu_of(idle)))
        return seen[-1][0] > 60
    wait_until(hot, timeout=30, msg=f"the busy worker's CPU rises: {seen}")
    assert seen[-1][1] < 40, seen
    base = cluster.dashboard_link.rsplit("/", 1)[0]
    rows = []

    def page_shows_it():
        row = re.search(rf'<tr data-worker="{re.escape(busy)}">.*?</tr>', get(base + "/workers")[2]).group(0)
        rows.append(row)
        return float(re.search(r'<td class="cpu" data-v="([0-9.]+)">', row).group(1)) > 60
    wait_until(page_shows_it, timeout=20, interval=0.2, msg=f"the /workers page shows it: {rows[-1:]}")
    f.result()


def test_status_page_in_chromium_shows_the_workload(cluster_and_client, chromium, tmp_path):
    cluster, client, _, _ = cluster_and_client
    dom = browse(chromium, cluster.dashboard_link, tmp_path, screenshot="status.png")
    # The task group in the stream and in the progress bars, with its counts.
    assert 'data-group="sleep"' in dom
    assert re.search(r'class="bar" [^>]*data-key="sleep"', dom)
    assert "300 / 300" in dom
    # One memory bar per worker, each naming its worker.
    memory = dom.split('id="memory"', 1)[1].split('id="processing"', 1)[0]
    keys = re.findall(r'class="bar" [^>]*data-key="([^"]+)"', memory)
    assert sorted(keys) == sorted(client.scheduler_info()["workers"])
    # The totals agree with the scheduler.
    assert re.search(r'id="total-workers">workers<span>2</span>', dom)
    assert re.search(r'id="total-threads">threads<span>4</span>', dom)
    assert 'id="conn">live<' in dom, "the page's stream delivered an update"


def test_other_pages_in_chromium(cluster_and_client, chromium, tmp_path):
    cluster, client, _, _ = cluster_and_client
    base = cluster.dashboard_link.rsplit("/", 1)[0]
    dom = browse(chromium, base + "/workers", tmp_path, screenshot="workers.png")
    for addr in client.scheduler_info()["workers"]:
        assert f'data-worker="{addr}"' in dom
    name = next(iter(client.scheduler_info()["workers"].values()))["name"]
    dom = browse(chromium, f"{base}/workers/{name}", tmp_path, screenshot="worker.png")
    assert f"<h2>{name}</h2>" in dom and "sleep" in dom
    dom = browse(chromium, base + "/tasks", tmp_path, screenshot="tasks.png")
    assert 'data-group="sleep"' in dom
    # Panned to a minute that ended 10 minutes ago (before this cluster existed): empty.
    dom = browse(chromium, base + "/tasks?span=60&end=600", tmp_path, screenshot="tasks-panned.png")
    assert 'data-span="60" data-end="600"' in dom and "1 min ending 10 min ago" in dom, dom
    assert 'data-group="sleep"' not in dom and "no tasks finished in this window" in dom
    dom = browse(chromium, base + "/groups", tmp_path, screenshot="groups.png")
    # The array's groups, with the edge from random_sample into add.
    assert re.search(r'class="group" [^>]*data-group="add"', dom)
    assert re.search(r"depends on: [^<]*random_sample", dom)
    dom = browse(chromium, base + "/adaptive", tmp_path, screenshot="adaptive.png")
    assert "not run by a cluster manager" in dom
    browse(chromium, base + "/info", tmp_path, screenshot="info.png")


def test_a_taken_port_moves_the_dashboard_with_a_warning():
    with LocalCluster(n_workers=0, dashboard_address="127.0.0.1:0") as first:
        port = int(first.dashboard_link.rsplit(":", 1)[1].split("/")[0])
        with pytest.warns(UserWarning, match=f"port {port} is already in use"):
            second = LocalCluster(n_workers=0, dashboard_address=f"127.0.0.1:{port}")
        try:
            assert second.dashboard_link != first.dashboard_link
            assert get(second.dashboard_link.rsplit("/", 1)[0] + "/health")[2] == "ok"
        finally:
            second.close()
    with LocalCluster(n_workers=0, dashboard_address=None) as none:
        assert none.dashboard_link is None
        with Client(none) as c:
            assert c.dashboard_link is None


def test_scheduler_command_prints_the_dashboard_and_rejects_a_bad_address():
    cmd = [sys.executable, "-m", "dask_rs", "scheduler", "--port", "0", "--dashboard-address"]
    r = subprocess.run([*cmd, "nope"], capture_output=True, text=True, timeout=30)
    assert r.returncode == 1 and "invalid dashboard address" in r.stderr, r.stderr
    p = subprocess.Popen([*cmd, ":0"], stdout=subprocess.PIPE, text=True)
    try:
        assert p.stdout.readline().startswith("Scheduler at tcp://127.0.0.1:")
        line = p.stdout.readline()
        assert re.fullmatch(r"Dashboard at http://127\.0\.0\.1:\d+/status\n", line), line
        assert get(line.split()[-1].rsplit("/", 1)[0] + "/health")[2] == "ok"
    finally:
        p.terminate()
        p.wait(timeout=10)


def test_get_task_stream_gives_distributeds_records(cluster_and_client):
    cluster, client, _, _ = cluster_and_client
    with get_task_stream(client) as ts:
        client.gather(client.map(time.sleep, [0.001] * 20, pure=False))
    assert len(ts.data) == 20
    for r in ts.data:
        assert r["status"] == "OK" and r["name"] == "sleep"
        assert r["worker"] in client.scheduler_info()["workers"]
        compute = r["startstops"][-1]
        assert compute["action"] == "compute" and compute["stop"] >= compute["start"] + 0.001
    assert len(client.get_task_stream(count=5)) == 5
    assert len(client.get_task_stream(start="30s")) >= 20
    assert client.get_task_stream(start=time.time() + 60) == []


def test_task_stream_plot_draws_the_block(cluster_and_client, chromium, tmp_path):
    cluster, client, _, _ = cluster_and_client
    path = tmp_path / "stream.html"
    with get_task_stream(client, plot="save", filename=str(path)) as ts:
        client.gather(client.map(time.sleep, [0.01] * 12, pure=False))
    assert len(ts.data) == 12
    assert ts.figure.svg.startswith("<svg") and 'data-group="sleep"' in ts.figure._repr_html_()
    dom = browse(chromium, path.as_uri(), tmp_path, screenshot="task-stream-plot.png")
    assert 'class="task"' in dom and 'data-group="sleep"' in dom
    records, figure = client.get_task_stream(count=5, plot=True)
    assert len(records) == 5 and "<svg" in figure.svg


def test_performance_report_is_one_file_that_opens_offline(cluster_and_client, chromium, tmp_path):
    cluster, client, _, _ = cluster_and_client
    path = tmp_path / "report.html"
    with performance_report(filename=str(path)):
        x = da.random.random((1000, 1000), chunks=250)
        assert float((x + x.T).sum().compute()) > 0
    html = path.read_text()
    assert "<script" not in html and "src=" not in html and "href=" not in html, "nothing to fetch"
    dom = browse(chromium, path.as_uri(), tmp_path, screenshot="performance-report.png")
    assert 'data-group="random_sample"' in dom, "the block's tasks in the task stream"
    assert re.search(r'class="bar" [^>]*data-key="random_sample"', dom), "and in the groups"
    assert 'data-group="sleep"' not in dom, "tasks from before the block are left out"
    assert re.search(r"<td>tasks</td><td>\d+</td>", dom)

