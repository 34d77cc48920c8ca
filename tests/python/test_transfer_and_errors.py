"""Peer-to-peer transfer and every kind of bad input, with real processes."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
import traceback

import numpy as np
import pytest

from conftest import start_scheduler, start_worker, wait_until
from dask_rs import Client, CommError


def make_array(nbytes):
    return np.ones(nbytes // 8, dtype="float64")


def checksum(a):
    return float(a.sum()), a.nbytes, bool(a.flags.writeable)


def test_100mb_array_moves_worker_to_worker_directly(client):
    info = client.scheduler_info()["workers"]
    (addr_a, a), (addr_b, b) = sorted(info.items(), key=lambda kv: kv[1]["name"])[:2]
    before = client.scheduler_info()
    x = client.submit(make_array, 100_000_000, workers=a["name"], pure=False)
    y = client.submit(checksum, x, workers=b["name"], pure=False)
    total, nbytes, writeable = y.result(timeout=60)
    assert nbytes == 100_000_000 and total == 12_500_000.0
    assert writeable, "received arrays are writable (backed by the receive buffer)"
    assert client.who_has([x])[x.key][0] == addr_a
    after = client.scheduler_info()
    through_scheduler = (after["bytes_in"] - before["bytes_in"]) + (after["bytes_out"] - before["bytes_out"])
    assert through_scheduler < 1_000_000, f"{through_scheduler} bytes passed through the scheduler"

    def received_by_b():
        return client.scheduler_info()["workers"][addr_b]["metrics"]["bytes_in"] >= 100_000_000

    wait_until(received_by_b, msg="worker B's byte counter to show the transfer")


def test_dead_address_fails_within_timeout():
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    t = time.monotonic()
    with pytest.raises(OSError, match="cannot connect to scheduler"):
        Client(f"tcp://127.0.0.1:{port}", timeout=2)
    assert time.monotonic() - t < 3


def test_silent_peer_times_out():
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    s.listen()
    try:
        t = time.monotonic()
        with pytest.raises(TimeoutError):
            Client(f"tcp://127.0.0.1:{s.getsockname()[1]}", timeout=1)
        assert time.monotonic() - t < 2.5
    finally:
        s.close()


def test_malformed_address():
    with pytest.raises(ValueError, match="expected tcp://HOST:PORT"):
        Client("tcp://nonsense")


def test_unpicklable_function_fails_at_submit(client):
    import threading

    lock = threading.Lock()

    def uses_lock(x):
        with lock:
            return x

    with pytest.raises(TypeError, match="Could not serialize 'uses_lock'"):
        client.submit(uses_lock, 1)
    with pytest.raises(TypeError, match="Could not serialize 'uses_lock'"):
        client.map(uses_lock, [1, 2])
    with pytest.raises(TypeError, match="Could not serialize the arguments of 'abs'"):
        client.map(abs, [-1, lock])
    # The client keeps working.
    assert client.submit(abs, -3).result() == 3


def divide(a, b):
    return a / b


def test_task_error_has_same_type_and_remote_traceback(client):
    f = client.submit(divide, 1, 0)
    with pytest.raises(ZeroDivisionError) as info:
        f.result(timeout=10)
    frames = traceback.extract_tb(info.value.__traceback__)
    assert any(fr.name == "divide" for fr in frames), frames
    assert f.status == "error"
    assert isinstance(f.exception(), ZeroDivisionError)
    assert any(fr.name == "divide" for fr in traceback.extract_tb(f.traceback()))
    # Dependents of a failed task fail with the same error.
    g = client.submit(divide, f, 2)
    with pytest.raises(ZeroDivisionError):
        g.result(timeout=10)
    # gather(errors="skip") drops failures.
    ok = client.submit(divide, 4, 2)
    assert client.gather([ok, f], errors="skip") == [2.0]


def test_garbage_bytes_do_not_disturb_the_scheduler(cluster):
    address, _ = cluster
    host, port = address.split("://")[1].rsplit(":", 1)
    for payload in (os.urandom(4096), b"GET / HTTP/1.1\r\n\r\n", b"DRS\x01" + os.urandom(64)):
        with socket.create_connection((host, int(port))) as s:
            s.sendall(payload)
            s.settimeout(10)
            try:
                assert s.recv(100) == b""  # closed without a reply
            except ConnectionResetError:
                pass
    with Client(address) as c:
        assert c.submit(abs, -1).result(timeout=10) == 1


def test_worker_pointed_at_non_scheduler_port_exits_clearly(procs):
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen()
    port = srv.getsockname()[1]
    p = start_worker(procs, f"tcp://127.0.0.1:{port}", "lost", extra=["--connect-timeout", "2"],
                     stderr=subprocess.PIPE)
    conn, _ = srv.accept()
    conn.sendall(b"HTTP/1.1 400 Bad Request\r\n\r\n" + b"x" * 64)
    conn.close()
    out = p.communicate(timeout=15)[1].decode()
    srv.close()
    assert p.returncode == 1
    assert "cannot reach the scheduler" in out and "not a dask-rs server" in out, out


def test_worker_pointed_at_a_worker_data_port_exits_clearly(procs, cluster):
    address, _ = cluster
    with Client(address) as c:
        data_port = next(iter(c.scheduler_info()["workers"]))
    p = start_worker(procs, data_port, "confused", stderr=subprocess.PIPE)
    out = p.communicate(timeout=15)[1].decode()
    assert p.returncode == 1
    assert "data port, not a scheduler" in out, out


def test_worker_rejects_bad_flags(procs):
    p = procs.spawn([sys.executable, "-m", "dask_rs", "worker", "tcp://127.0.0.1:1", "--bogus"],
                    stderr=subprocess.PIPE)
    err = p.communicate(timeout=15)[1].decode()
    assert p.returncode == 2 and "--bogus" in err
    cmd = [sys.executable, "-m", "dask_rs", "worker", "tcp://127.0.0.1:1", "--memory-limit", "lots"]
    p = procs.spawn(cmd, stderr=subprocess.PIPE)
    err = p.communicate(timeout=15)[1].decode()
    assert p.returncode == 2 and "could not interpret 'lots'" in err


def test_duplicate_worker_name_is_refused(procs):
    address = start_scheduler(procs)
    start_worker(procs, address, "same")
    with Client(address) as c:
        c.wait_for_workers(1, timeout=10)
    p = start_worker(procs, address, "same", stderr=subprocess.PIPE)
    out = p.communicate(timeout=15)[1].decode()
    assert p.returncode == 1 and "already registered" in out, out


def test_client_sees_scheduler_death(procs):
    address = start_scheduler(procs)
    c = Client(address, set_as_default=False)
    procs.procs[-1].kill()
    f = None
    from concurrent.futures import CancelledError

    # A future in flight fails as lost; new work is refused while the client
    # tries to reconnect: both name the scheduler connection.
    with pytest.raises((CommError, CancelledError)) as info:
        for _ in range(100):
            f = c.submit(time.sleep, 10, pure=False)
            f.result(timeout=5)
    assert "connection to the scheduler" in str(info.value)
    c.close()
