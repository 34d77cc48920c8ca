"""The ssh backend against real sshd servers on two hosts: network namespaces
with their own hostname and address on a private bridge (tests/infra/sshd-up.sh).
Workers there reach the scheduler and each other over that bridge only."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time

import pytest

from conftest import HERE, ROOT, wait_until
from dask_rs import Client

INFRA = os.path.join(ROOT, "tests", "infra")
HOSTS = {"dkrhost1": "10.77.41.11", "dkrhost2": "10.77.41.12"}
NETNS = ["dkrssh1", "dkrssh2"]

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="namespace hosts need root")


@pytest.fixture(scope="module")
def ssh_config():
    subprocess.run([os.path.join(INFRA, "sshd-up.sh")], check=True, env={**os.environ, "SSH_HOSTS": "2"},
                   timeout=600)
    env = dict(line.split("=", 1) for line in open("/var/lib/dask-rs-tests/sshd/env").read().split())
    yield env["DASK_RS_TEST_SSH_CONFIG"]
    subprocess.run([os.path.join(INFRA, "sshd-down.sh")], check=True, timeout=120)


def up_args(ssh_config, name, *extra):
    return ["up", "--backend", "ssh", "--name", name, "--hosts", ",".join(HOSTS),
            "--ssh-arg=-F", f"--ssh-arg={ssh_config}", "--prologue", f"export PYTHONPATH={HERE}", *extra]


def status(ctl, name):
    return json.loads(ctl("status", name, "--json").stdout)


def workers_in_namespaces():
    """Every dask_rs worker process running inside the test hosts' namespaces."""
    found = []
    for ns in NETNS:
        pids = subprocess.run(["ip", "netns", "pids", ns], capture_output=True, text=True).stdout.split()
        for pid in pids:
            try:
                cmd = open(f"/proc/{pid}/cmdline", "rb").read().replace(b"\0", b" ").decode()
            except FileNotFoundError:
                continue
            if " dask_rs worker " in cmd:
                found.append((ns, int(pid), cmd))
    return found


def ssh_children(name):
    """ssh client processes on this host that belong to cluster `name`."""
    out = []
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            cmd = open(f"/proc/{pid}/cmdline", "rb").read().replace(b"\0", b" ").decode()
        except (FileNotFoundError, ProcessLookupError):
            continue
        if cmd.startswith("ssh ") and f"--name {name}-" in cmd:
            out.append(cmd)
    return out


def hostname_of(_):
    import socket

    return socket.gethostname()


def test_ssh_cluster_on_two_hosts_scales_and_cleans_up(ctl, ssh_config):
    t0 = time.time()
    out = ctl(*up_args(ssh_config, "sshc", "--workers", "2")).stdout
    started = time.time() - t0
    assert "Cluster sshc is up (ssh backend)" in out
    st = status(ctl, "sshc")
    assert st["running"] == 2
    # One worker per host, each listening on its own host's address.
    by_host = sorted(
        (w["detail"].split(" on ")[1], w["address"].split("//")[1].split(":")[0]) for w in st["workers"]
    )
    assert by_host == sorted(HOSTS.items()), st["workers"]
    # Encrypted: the hosts got the cluster's certificate on their shell's stdin.
    assert all(w["address"].startswith("tls://") for w in st["workers"]), st["workers"]
    assert len(workers_in_namespaces()) == 2

    with Client("sshc") as client:
        assert sorted(set(client.gather(client.map(hostname_of, range(20))))) == sorted(HOSTS)
        # Data crosses hosts: each block is made on one host, the sum runs on either.
        blocks = [client.submit(bytes, 2_000_000, pure=False) for _ in range(6)]
        total = client.submit(lambda *bs: sum(map(len, bs)), *blocks)
        assert total.result() == 12_000_000

        ctl("scale", "sshc", "4")
        wait_until(lambda: status(ctl, "sshc")["running"] == 4, timeout=60)
        hosts = [w["detail"].split(" on ")[1] for w in status(ctl, "sshc")["workers"]]
        assert sorted(hosts) == ["dkrhost1", "dkrhost1", "dkrhost2", "dkrhost2"], "spread across hosts"
        keep = client.submit(bytes, 1_000_000, pure=False)
        keep.result()

        ctl("scale", "sshc", "1")
        wait_until(lambda: status(ctl, "sshc")["requested"] == 1, timeout=60)
        wait_until(lambda: len(workers_in_namespaces()) == 1, timeout=30)
        # Workers were retired with their data moved, not killed with it.
        assert len(keep.result()) == 1_000_000
        assert total.result() == 12_000_000

    out = ctl("down", "sshc").stdout
    assert "Cluster sshc is down" in out
    assert workers_in_namespaces() == []
    assert ssh_children("sshc") == []
    print(f"ssh cluster of 2 workers on 2 hosts up in {started:.2f} s")


def test_down_after_manager_crash_stops_remote_workers(ctl, ssh_config, tmp_path):
    ctl(*up_args(ssh_config, "crash", "--workers", "2"))
    remote = workers_in_namespaces()
    assert len(remote) == 2
    # Stopped workers cannot notice that their scheduler is gone and exit on
    # their own: only `down`, working from the registry's records, ends them.
    for _, pid, _ in remote:
        os.kill(pid, signal.SIGSTOP)
    rec = json.load(open(tmp_path / "state" / "dask-rs" / "clusters" / "crash" / "cluster.json"))
    os.kill(rec["manager_pid"], signal.SIGKILL)
    wait_until(lambda: json.loads(ctl("list", "--json").stdout)[0]["status"] == "dead", timeout=10)
    assert len(workers_in_namespaces()) == 2
    out = ctl("down", "crash").stdout
    assert "not running" in out
    wait_until(lambda: workers_in_namespaces() == [], timeout=10)
    wait_until(lambda: ssh_children("crash") == [], timeout=10)


def test_clear_errors_for_bad_hosts(ctl, ssh_config, tmp_path):
    # A Python on the host that cannot import dask_rs (site-packages switched off).
    bare = tmp_path / "bare-python"
    bare.write_text(f"#!/bin/sh\nexec {os.path.realpath(os.sys.executable)} -S \"$@\"\n")
    bare.chmod(0o755)
    p = ctl(*up_args(ssh_config, "nodask", "--workers", "1", "--python", str(bare)), check=False)
    assert p.returncode != 0
    assert "host dkrhost1:" in p.stderr and "cannot import dask_rs" in p.stderr, p.stderr
    assert "host dkrhost2:" in p.stderr, "every failing host is reported"

    p = ctl(*up_args(ssh_config, "nopy", "--workers", "1", "--python", "/nonexistent/python3"), check=False)
    assert p.returncode != 0 and "not found" in p.stderr, p.stderr

    # 10.77.41.99 is on the test bridge's subnet, but no host answers there.
    p = ctl("up", "--backend", "ssh", "--name", "unreach", "--hosts", "10.77.41.99", "--ssh-arg=-F",
            f"--ssh-arg={ssh_config}", "--ssh-arg=-oConnectTimeout=2", check=False)
    assert p.returncode != 0 and "cannot reach host 10.77.41.99 over ssh" in p.stderr, p.stderr

    p = ctl("up", "--backend", "ssh", "--name", "nohosts", check=False)
    assert p.returncode != 0 and "needs hosts" in p.stderr, p.stderr
    # Nothing was registered by the failed attempts.
    assert json.loads(ctl("list", "--json").stdout) == []


def gone(pid):
    try:
        return open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()[0] == "Z"
    except FileNotFoundError:
        return True


def test_sshd_up_replaces_what_a_killed_run_left(ssh_config):
    """An sshd left in our namespace without a live recorded pid (its pid file names a
    dead process), and a veth end never moved into its namespace: sshd-up.sh repairs both."""
    state = "/var/lib/dask-rs-tests/sshd"
    pidfile = f"{state}/sshd-dkrssh1.pid"
    os.kill(int(open(pidfile).read()), signal.SIGKILL)
    subprocess.run(["ip", "netns", "exec", "dkrssh1", "/usr/sbin/sshd", "-f", f"{state}/sshd_config.dkrssh1"],
                   check=True)
    pids = subprocess.run(["ip", "netns", "pids", "dkrssh1"], capture_output=True, text=True).stdout
    orphan = int(pids.split()[0])
    dead = subprocess.Popen(["true"])
    dead.wait()
    with open(pidfile, "w") as f:
        f.write(f"{dead.pid}\n")
    subprocess.run(["ip", "-n", "dkrssh2", "link", "set", "dkrssh2-n", "netns", "1"], check=True)
    r = subprocess.run([os.path.join(INFRA, "sshd-up.sh")], env={**os.environ, "SSH_HOSTS": "2"},
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stdout + r.stderr
    assert f"stopping processes left in dkrssh1 by an earlier run: {orphan}" in r.stdout, r.stdout
    assert gone(orphan), "the orphaned sshd was stopped"
    fresh = int(open(pidfile).read())
    assert os.readlink(f"/proc/{fresh}/exe") == "/usr/sbin/sshd"
    for host in HOSTS:
        out = subprocess.run(["ssh", "-F", ssh_config, host, "hostname"], capture_output=True, text=True,
                             timeout=30)
        assert out.stdout.strip() == host, out.stderr
