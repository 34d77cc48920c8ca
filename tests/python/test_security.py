"""Cluster credentials with real processes: LocalCluster's token, `dask-ctl up`'s
token and certificates, TLS clusters, and peers without the credential
refused at the scheduler and at a worker's data port."""

from __future__ import annotations

import functools
import json
import operator
import os
import shutil
import socket
import stat
import subprocess
import sys
import tempfile

import pytest

from conftest import DASK_CTL
from dask_rs import Client, LocalCluster, Security

# Workers import functions by reference; a builtin needs no module on their path.
inc = functools.partial(operator.add, 1)


def connect_from_another_process(address: str, token: str | None = None, tls=None):
    """Connect from a fresh process, as another user's program would (no
    credential unless `token`, no certificates unless `tls`)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("DASK_RS_TOKEN", "DASK_RS_TLS"))}
    if token:
        env["DASK_RS_TOKEN"] = token
    if tls:
        env["DASK_RS_TLS_CA_FILE"], env["DASK_RS_TLS_CERT"], env["DASK_RS_TLS_KEY"] = tls
    code = (
        "import sys; from dask_rs import _core\n"
        "c = _core.ClientCore(sys.argv[1], 'probe', 5.0)\n"
        "print('connected', len(c.info()['workers']))\n"
    )
    return subprocess.run([sys.executable, "-c", code, address], env=env, capture_output=True, text=True,
                          timeout=60)


def test_local_cluster_requires_its_token():
    with LocalCluster(n_workers=1, threads_per_worker=1, dashboard_address=None) as cluster:
        assert cluster.security.token and len(cluster.security.token) == 64
        assert cluster.security.token not in repr(cluster.security)
        # In this process, the cluster's clients find the token by themselves.
        with Client(cluster) as c:
            assert c.submit(inc, 1).result() == 2
        with Client(cluster.scheduler_address) as c:
            assert c.submit(inc, 2).result() == 3
            worker = next(iter(c.scheduler_info()["workers"]))

        # Another process without it is refused, at the scheduler and at a worker.
        for address in (cluster.scheduler_address, worker):
            p = connect_from_another_process(address)
            assert p.returncode != 0
            assert "requires this cluster's credential" in p.stderr, p.stderr
        # With another cluster's token: refused, and told why.
        p = connect_from_another_process(cluster.scheduler_address, Security.temporary().token)
        assert p.returncode != 0 and "another cluster" in p.stderr, p.stderr
        # With the token, it connects.
        p = connect_from_another_process(cluster.scheduler_address, cluster.security.token)
        assert p.returncode == 0 and "connected 1" in p.stdout, p.stderr


def test_security_objects(tmp_path):
    s = Security.token_only()
    assert Security(token=s.token).token == s.token and s.tls_ca_file is None
    with pytest.raises(ValueError, match="64 hex digits"):
        Security(token="short")
    with pytest.raises(ValueError, match="needs a certificate"):
        Security(tls_ca_file="ca.pem")
    with pytest.raises(ValueError, match="needs TLS files"):
        Security(require_encryption=True)
    with pytest.raises(TypeError, match="tls_min_version"):
        Security(tls_min_version=1.2)
    path = tmp_path / "token"
    path.write_text(s.token + "\n")
    path.chmod(0o600)
    assert Security.from_file(path).token == s.token
    path.chmod(0o644)
    with pytest.raises(PermissionError, match="chmod 600"):
        Security.from_file(path)
    with pytest.raises(TypeError, match="dask_rs.Security"):
        Client("tcp://127.0.0.1:1", security="secret")
    # An open LocalCluster (security=False) takes anyone, as distributed's does.
    with LocalCluster(n_workers=1, dashboard_address=None, security=False) as cluster:
        p = connect_from_another_process(cluster.scheduler_address)
        assert p.returncode == 0, p.stderr
    # A client given the right token explicitly.
    with LocalCluster(n_workers=1, dashboard_address=None, security=s) as cluster:
        with Client(cluster.scheduler_address, security=Security(token=s.token)) as c:
            assert c.submit(inc, 41).result() == 42


def test_up_makes_private_credentials_that_client_by_name_uses(ctl, tmp_path):
    """`dask-ctl up` makes a token and a CA with a certificate for the
    cluster: its addresses are tls://, nobody without those files gets past
    the handshake (not even with the token alone), and `Client("NAME")`
    needs no file handling."""
    ctl("up", "--name", "safe", "--workers", "1", "--nthreads", "1")
    try:
        cdir = tmp_path / "state" / "dask-rs" / "clusters" / "safe"
        token_file = cdir / "token"
        for f in ("token", "key.pem"):
            assert stat.S_IMODE((cdir / f).stat().st_mode) == 0o600, f
        for d in (cdir, cdir.parent):
            assert stat.S_IMODE(d.stat().st_mode) == 0o700, d
        token = token_file.read_text().strip()
        key = (cdir / "key.pem").read_text()
        key_line = key.splitlines()[1]
        record = json.loads((cdir / "cluster.json").read_text())
        assert token not in json.dumps(record), "the token is not in cluster.json"
        assert record["address"].startswith("tls://"), record["address"]
        # Neither secret is on any process's command line or in any worker's log.
        for pid in os.listdir("/proc"):
            if pid.isdigit():
                try:
                    cmdline = open(f"/proc/{pid}/cmdline", "rb").read()
                except OSError:
                    continue
                assert token.encode() not in cmdline, f"the token is on the command line of pid {pid}"
                assert key_line.encode() not in cmdline, f"the key is on the command line of pid {pid}"

        with Client("safe") as c:
            assert c.scheduler_address == record["address"]
            assert c.submit(inc, 1).result() == 2
            worker = next(iter(c.scheduler_info()["workers"]))
            assert worker.startswith("tls://"), worker
            address = c.scheduler_address
            before = sorted(w["pid"] for w in c.scheduler_info()["workers"].values())
        other = Security.temporary()
        own = (str(cdir / "ca.pem"), str(cdir / "cert.pem"), str(cdir / "key.pem"))
        for target in (address, worker):
            # No credentials; the token without the certificates; another cluster's certificates.
            p = connect_from_another_process(target)
            assert p.returncode != 0 and "speaks TLS and no certificates were given" in p.stderr, p.stderr
            p = connect_from_another_process(target, token)
            assert p.returncode != 0 and "speaks TLS and no certificates were given" in p.stderr, p.stderr
            p = connect_from_another_process(target, token, other.tls_for("client"))
            assert p.returncode != 0 and "TLS handshake" in p.stderr, p.stderr
            # A raw socket speaking the plain protocol, or garbage, gets nowhere.
            host, port = target.removeprefix("tls://").rsplit(":", 1)
            for payload in (b"dask-rs\x00" + os.urandom(64), os.urandom(4096)):
                with socket.create_connection((host, int(port)), timeout=10) as s:
                    s.sendall(payload)
                    s.settimeout(10)
                    try:
                        while s.recv(65536):
                            pass
                    except (ConnectionResetError, TimeoutError, socket.timeout):
                        pass
        # With the cluster's files, another process gets in.
        p = connect_from_another_process(address, token, own)
        assert p.returncode == 0 and "connected 1" in p.stdout, p.stderr
        # As on another machine: a private copy of the files, as `snippet` says.
        snippet = ctl("snippet", "safe").stdout
        assert 'Client("safe")' in snippet and "Security.from_directory" in snippet, snippet
        assert "ca.pem" in snippet and str(cdir) in snippet, snippet
        copy = tmp_path / "copy"
        copy.mkdir(mode=0o700)
        for f in ("token", "ca.pem", "cert.pem", "key.pem"):
            shutil.copy(cdir / f, copy / f)
        hidden = ("DASK_RS_TOKEN", "DASK_RS_TLS", "XDG_")
        env = {k: v for k, v in os.environ.items() if not k.startswith(hidden)}
        env["HOME"] = str(tmp_path / "elsewhere")
        code = ("import sys, operator; from dask_rs import Client, Security\n"
                "with Client(sys.argv[1], security=Security.from_directory(sys.argv[2])) as c:\n"
                "    print('sum', c.submit(operator.add, 20, 22).result())\n")
        p = subprocess.run([sys.executable, "-c", code, address, str(copy)], env=env, capture_output=True,
                           text=True, timeout=60)
        assert p.returncode == 0 and "sum 42" in p.stdout, p.stderr
        # The refused attempts changed nothing: same worker process, still computing.
        with Client("safe") as c:
            assert c.submit(inc, 2).result() == 3
            assert sorted(w["pid"] for w in c.scheduler_info()["workers"].values()) == before
    finally:
        ctl("down", "safe")
    assert not cdir.exists(), "down removes the credentials with the registry entry"


def test_up_no_tls_keeps_the_token(ctl, tmp_path):
    ctl("up", "--name", "plain", "--workers", "1", "--nthreads", "1", "--no-tls")
    try:
        cdir = tmp_path / "state" / "dask-rs" / "clusters" / "plain"
        assert (cdir / "token").exists() and not (cdir / "ca.pem").exists()
        with Client("plain") as c:
            assert c.scheduler_address.startswith("tcp://")
            assert c.submit(inc, 1).result() == 2
            p = connect_from_another_process(c.scheduler_address)
            assert p.returncode != 0 and "requires this cluster's credential" in p.stderr, p.stderr
    finally:
        ctl("down", "plain")


def test_up_insecure_warns_and_takes_anyone(ctl, tmp_path):
    up = ctl("up", "--name", "open", "--workers", "1", "--insecure")
    try:
        assert "--insecure" in up.stderr and "anyone" in up.stderr
        cdir = tmp_path / "state" / "dask-rs" / "clusters" / "open"
        assert not (cdir / "token").exists() and not (cdir / "ca.pem").exists()
        address = json.loads(ctl("list", "--json").stdout)[0]["address"]
        p = connect_from_another_process(address)
        assert p.returncode == 0 and "connected 1" in p.stdout, p.stderr
    finally:
        ctl("down", "open")


def run_ctl(env, *args, timeout=120):
    return subprocess.run([DASK_CTL, *args], env=env, capture_output=True, text=True, timeout=timeout)


def test_cluster_names_cannot_leave_the_registry(ctl):
    for verb in (["down"], ["status"], ["scale"], ["logs"], ["snippet"]):
        args = [*verb, "../x"] + (["1"] if verb == ["scale"] else [])
        p = ctl(*args, check=False)
        assert p.returncode != 0 and "invalid cluster name" in p.stderr, (verb, p.stderr)


def test_without_home_the_registry_is_not_in_tmp(tmp_path):
    planted = "/tmp/.local/state/dask-rs/clusters/planted"
    os.makedirs(planted, exist_ok=True)
    try:
        with open(os.path.join(planted, "cluster.json"), "w") as f:
            json.dump({"name": "planted"}, f)
        env = {k: v for k, v in os.environ.items() if k not in ("HOME", "XDG_STATE_HOME")}
        p = run_ctl(env, "status", "planted")
        assert p.returncode != 0
        assert "/tmp/.local" not in p.stderr, p.stderr
    finally:
        shutil.rmtree("/tmp/.local/state/dask-rs", ignore_errors=True)


@pytest.mark.skipif(os.getuid() != 0, reason="needs root to act as another user")
def test_the_control_socket_refuses_other_users():
    base = tempfile.mkdtemp(prefix="dask-rs-peercred-")
    os.chmod(base, 0o755)
    env = dict(os.environ)
    env["XDG_STATE_HOME"] = base
    env["PATH"] = os.pathsep.join([os.path.dirname(sys.executable), env.get("PATH", "")])
    try:
        p = run_ctl(env, "up", "--name", "mine", "--workers", "0", "--no-dashboard")
        assert p.returncode == 0, p.stderr
        cdir = os.path.join(base, "dask-rs", "clusters", "mine")
        # Open every lock but the socket's own check.
        for d in (os.path.join(base, "dask-rs"), os.path.dirname(cdir), cdir):
            os.chmod(d, 0o755)
        os.chmod(os.path.join(cdir, "control.sock"), 0o777)
        code = (
            "import os, socket, sys\n"
            "os.setgid(65534); os.setuid(65534)\n"
            "s = socket.socket(socket.AF_UNIX); s.connect(sys.argv[1])\n"
            # The refusal may come (and the socket close) before the request is sent.
            "try: s.sendall(b'\"Down\"\\n')\n"
            "except BrokenPipeError: pass\n"
            "print(s.makefile().readline())\n"
        )
        other = subprocess.run([sys.executable, "-c", code, os.path.join(cdir, "control.sock")],
                               capture_output=True, text=True, timeout=30)
        assert "not the cluster's owner" in other.stdout, (other.stdout, other.stderr)
        st = run_ctl(env, "status", "mine")
        assert st.returncode == 0 and "mine" in st.stdout, "the cluster is still up"
    finally:
        run_ctl(env, "down", "mine")
        shutil.rmtree(base, ignore_errors=True)


def test_tls_local_cluster_as_in_distributed(tmp_path):
    """Security.temporary() gives an encrypted cluster: tls:// addresses, a CA
    and a certificate every process presents; clients connect with the
    files (as distributed's Security(tls_ca_file=...) does), others cannot."""
    sec = Security.temporary()
    assert sec.require_encryption and os.path.exists(sec.tls_ca_file)
    assert stat.S_IMODE(os.stat(sec.tls_client_key).st_mode) == 0o600
    with LocalCluster(n_workers=2, threads_per_worker=1, dashboard_address=None, security=sec) as cluster:
        assert cluster.scheduler_address.startswith("tls://")
        with Client(cluster) as c:
            workers = sorted(c.scheduler_info()["workers"])
            assert len(workers) == 2 and all(w.startswith("tls://") for w in workers), workers
            # A dependency held by the other worker crosses between workers over TLS.
            x = c.submit(inc, 1, workers=[workers[0]])
            y = c.submit(operator.add, x, 10, workers=[workers[1]])
            assert y.result() == 12
        files = Security(token=sec.token, tls_ca_file=sec.tls_ca_file, tls_client_cert=sec.tls_client_cert,
                         tls_client_key=sec.tls_client_key)
        with Client(cluster.scheduler_address, security=files) as c:
            assert c.submit(inc, 2).result() == 3
        # In this process: another cluster's files fail, and the failed
        # attempt leaves the cluster's own credentials in place.
        other = Security.temporary()
        with pytest.raises(Exception, match="TLS handshake"):
            Client(cluster.scheduler_address, security=other, timeout=5)
        with Client(cluster.scheduler_address) as c:
            assert c.submit(inc, 3).result() == 4
        # Another process: with the files it gets in; with another cluster's,
        # or none, it does not.
        tls = sec.tls_for("client")
        p = connect_from_another_process(cluster.scheduler_address, sec.token, tls)
        assert p.returncode == 0 and "connected 2" in p.stdout, p.stderr
        for address in (cluster.scheduler_address, workers[0]):
            p = connect_from_another_process(address, sec.token, other.tls_for("client"))
            assert p.returncode != 0 and "TLS handshake" in p.stderr, p.stderr
            p = connect_from_another_process(address, sec.token)
            assert p.returncode != 0 and "speaks TLS and no certificates were given" in p.stderr, p.stderr
        # A worker process started by hand with the files joins (flags, as distributed's CLI).
        env = {k: v for k, v in os.environ.items() if not k.startswith(("DASK_RS_TOKEN", "DASK_RS_TLS"))}
        env["DASK_RS_TOKEN"] = sec.token
        w = subprocess.Popen([sys.executable, "-m", "dask_rs", "worker", cluster.scheduler_address,
                              "--name", "by-hand", "--tls-ca-file", tls[0], "--tls-cert", tls[1],
                              "--tls-key", tls[2]], env=env, stdout=subprocess.DEVNULL,
                             stderr=subprocess.DEVNULL)
        try:
            with Client(cluster) as c:
                c.wait_for_workers(3, timeout=30)
                assert c.submit(inc, 5, workers=["by-hand"]).result() == 6
        finally:
            w.terminate()
            w.wait(timeout=30)
