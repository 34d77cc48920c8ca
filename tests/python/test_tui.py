"""`dask-ctl tui` in a real terminal (tmux): a cluster started with `dask-ctl
up`, a workload from Python, the console showing both, commands that act
(after y) or explain themselves, and the terminal restored on quit."""

from __future__ import annotations

import json
import os
import subprocess
import threading
import time

import pytest

from conftest import DASK_CTL, ROOT, wait_until
from dask_rs import Client


@pytest.fixture
def tmux(tmp_path):
    """A private tmux server (its own socket), killed at the end."""
    r = subprocess.run([os.path.join(ROOT, "tests", "infra", "tmux.sh")], capture_output=True, text=True)
    if r.returncode != 0:
        pytest.fail(f"tests/infra/tmux.sh failed:\n{r.stdout}{r.stderr}")
    exe = r.stdout.strip().splitlines()[-1]
    sock = f"dask-rs-tui-{os.getpid()}"

    def run(*args):
        return subprocess.run([exe, "-L", sock, *args], capture_output=True, text=True, timeout=30)

    yield run
    run("kill-server")


CAPTURES = os.path.join(ROOT, "target", "tui-captures")


def screen(tmux, keep=None):
    """The pane's text; `keep` also writes it under target/tui-captures/."""
    text = tmux("capture-pane", "-p", "-t", "tui").stdout
    if keep:
        os.makedirs(CAPTURES, exist_ok=True)
        with open(os.path.join(CAPTURES, keep), "w") as f:
            f.write(text)
    return text


def start(tmux, tmp_path, *args):
    """The console in a shell in tmux, 120x40; the shell records `stty -a`
    before and after it."""
    env = f"XDG_STATE_HOME={os.environ['XDG_STATE_HOME']}"
    script = tmp_path / "console.sh"
    script.write_text(
        f"stty -a > {tmp_path}/before.txt\n"
        f"{env} {DASK_CTL} tui {' '.join(args)}\n"
        f"echo $? > {tmp_path}/status.txt\n"
        # Written whole, then renamed: the test waits for the name.
        f"stty -a > {tmp_path}/after.tmp && mv {tmp_path}/after.tmp {tmp_path}/after.txt\n"
        "sleep 30\n"
    )
    tmux("new-session", "-d", "-s", "tui", "-x", "120", "-y", "40", f"bash --norc {script}")


def keys(tmux, *k):
    tmux("send-keys", "-t", "tui", *k)


def test_console_follows_a_cluster_and_acts_on_it(ctl, tmux, tmp_path):
    ctl("up", "--name", "tuitest", "--workers", "2", "--nthreads", "1", "--dashboard-address", ":0")
    start(tmux, tmp_path, "tuitest")
    stop = threading.Event()

    def workload():
        with Client("tuitest") as c:
            while not stop.is_set():
                c.gather(c.map(time.sleep, [0.02] * 50, pure=False))

    t = threading.Thread(target=workload, daemon=True)
    t.start()
    try:
        wait_until(lambda: "tuitest-1" in screen(tmux) and "sleep " in screen(tmux), timeout=30,
                   msg="the console shows the workers and the workload's group")
        time.sleep(1.5)
        text = screen(tmux, keep="cluster-120x40.txt")
        assert "workers 2" in text and "task stream" in text and "adaptive" in text, text
        assert "tuitest-0" in text and "sleep" in text, text
        # A bad command explains itself and changes nothing.
        keys(tmux, ":scale x", "Enter")
        wait_until(lambda: "usage: scale N" in screen(tmux), timeout=10, msg="usage")
        # :scale 3 asks, y acts.
        keys(tmux, ":scale 3", "Enter")
        wait_until(lambda: "scale tuitest to 3 workers? y/N" in screen(tmux), timeout=10, msg="the question")
        keys(tmux, "y")
        running = lambda: json.loads(ctl("status", "tuitest", "--json").stdout)["running"]  # noqa: E731
        wait_until(lambda: running() == 3, timeout=60, msg="three workers after :scale 3 y")
        # :down asks before it acts; anything but y keeps the cluster.
        keys(tmux, ":down", "Enter")
        asked = "stop cluster tuitest and every worker? y/N"
        wait_until(lambda: asked in screen(tmux), timeout=10, msg="asks")
        keys(tmux, "n")
        wait_until(lambda: "cancelled" in screen(tmux), timeout=10, msg="cancelled")
        assert [c["name"] for c in json.loads(ctl("list", "--json").stdout)] == ["tuitest"]
        # Esc goes back to the clusters view.
        keys(tmux, "Enter")
        wait_until(lambda: "recent tasks" in screen(tmux), timeout=10, msg="the worker view")
        time.sleep(1.5)
        screen(tmux, keep="worker-120x40.txt")
        keys(tmux, "Escape")
        keys(tmux, "Escape")
        wait_until(lambda: "clusters (1)" in screen(tmux), timeout=10, msg="the clusters view")
        screen(tmux, keep="clusters-120x40.txt")
    finally:
        stop.set()
        t.join(timeout=30)
    keys(tmux, "q")
    wait_until(lambda: (tmp_path / "after.txt").exists(), timeout=10, msg="the console quits")
    assert (tmp_path / "status.txt").read_text().strip() == "0"
    def settings(name):
        # `stty -a` wraps to the terminal's width: compare its settings, not its lines.
        text = (tmp_path / name).read_text().replace(";", " ")
        return sorted(w for w in text.split() if not w.isdigit() and w not in ("rows", "columns"))

    assert settings("after.txt") == settings("before.txt"), "the terminal is restored"
    assert "icanon" in settings("after.txt") and "-icanon" not in settings("after.txt")


def test_readonly_console_refuses_every_change(ctl, tmux, tmp_path):
    ctl("up", "--name", "ro", "--workers", "1", "--nthreads", "1", "--no-dashboard")
    start(tmux, tmp_path, "--readonly")
    wait_until(lambda: "ro " in screen(tmux) and "[read-only]" in screen(tmux), timeout=20,
               msg="clusters view")
    for command in [":scale 2", ":adapt 1 3", ":retire ro-0", ":down"]:
        keys(tmux, command, "Enter")
        said = f"{command} refused: the console is read-only"
        wait_until(lambda said=said: said in screen(tmux), timeout=10, msg=command)
        keys(tmux, "Escape")
    assert json.loads(ctl("status", "ro", "--json").stdout)["policy"] == "fixed(1)"
    keys(tmux, "q")
    wait_until(lambda: (tmp_path / "after.txt").exists(), timeout=10, msg="the console quits")


def test_console_opens_a_protected_address_with_a_credentials_directory(ctl, tmux, tmp_path):
    """A LocalCluster (token by default) opened by address: with the directory
    `Security.to_directory` wrote, the console connects; an empty directory
    is refused with the reason."""
    from dask_rs import LocalCluster

    with LocalCluster(n_workers=1, threads_per_worker=1, dashboard_address=None) as cluster:
        with Client(cluster) as c:
            name = next(iter(c.scheduler_info()["workers"].values()))["name"]
        creds = cluster.security.to_directory(tmp_path / "creds")
        assert sorted(os.listdir(creds)) == ["token"]
        assert os.stat(os.path.join(creds, "token")).st_mode & 0o777 == 0o600
        start(tmux, tmp_path, "--credentials", creds, cluster.scheduler_address)
        wait_until(lambda: "workers 1" in screen(tmux) and name in screen(tmux), timeout=20,
                   msg="the console shows the cluster")
        text = screen(tmux, keep="by-address-120x40.txt")
        assert cluster.scheduler_address.removeprefix("tcp://") in text, text
        keys(tmux, "q")
        wait_until(lambda: (tmp_path / "after.txt").exists(), timeout=10, msg="the console quits")
        tmux("kill-session", "-t", "tui")
        os.remove(tmp_path / "after.txt")
        empty = tmp_path / "empty"
        empty.mkdir(mode=0o700)
        start(tmux, tmp_path, "--credentials", str(empty), cluster.scheduler_address)
        wait_until(lambda: "no cluster token in" in screen(tmux), timeout=20, msg="the reason")
        screen(tmux, keep="by-address-refused-120x40.txt")
