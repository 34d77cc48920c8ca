"""Worker plugins and `get_worker`, as distributed's: set up on the workers
there, on workers that join later and on workers that restart; the
built-ins; plugins that cannot run here refused clearly. Real LocalCluster
worker processes."""

from __future__ import annotations

import os
import signal
import subprocess
import zipfile

import pytest

from conftest import HERE, wait_until
from dask_rs import (
    Client,
    Environ,
    LocalCluster,
    NannyPlugin,
    PipInstall,
    SchedulerPlugin,
    UploadDirectory,
    WorkerPlugin,
    get_worker,
)


class Journal(WorkerPlugin):
    """Writes what happens to it into files under ``root`` (one per worker
    process), so the test sees it from outside."""

    name = "journal"

    def __init__(self, root):
        self.root = root

    def _write(self, worker, line):
        with open(os.path.join(self.root, f"{worker.name}-{os.getpid()}"), "a") as f:
            f.write(line + "\n")

    def setup(self, worker):
        self.worker = worker
        self._write(worker, "setup")

    def transition(self, key, start, finish, **kwargs):
        self._write(self.worker, f"{start}>{finish}")

    def teardown(self, worker):
        self._write(worker, "teardown")


class Broken(WorkerPlugin):
    def setup(self, worker):
        raise OSError("no such device")


def journals(root) -> dict:
    return {f: open(os.path.join(root, f)).read().split() for f in sorted(os.listdir(root))}


def inc(x):
    return x + 1


def whoami():
    w = get_worker()
    return {"name": w.name, "address": w.address, "nthreads": w.nthreads, "memory_limit": w.memory_limit,
            "scheduler": w.scheduler.address, "plugins": sorted(w.plugins),
            "local_directory": w.local_directory, "data": sorted(w.data.keys())}


@pytest.fixture
def local():
    with LocalCluster(n_workers=2, threads_per_worker=1, dashboard_address=None,
                      env={"PYTHONPATH": HERE}) as cluster, Client(cluster) as c:
        yield cluster, c


def test_a_plugin_reaches_workers_there_joining_later_and_restarted(local, tmp_path):
    cluster, c = local
    result = c.register_plugin(Journal(str(tmp_path)))
    assert result == {a: {"status": "OK"} for a in cluster.scheduler.workers}
    assert c.gather(c.map(inc, range(4))) == [1, 2, 3, 4]
    seen = journals(tmp_path)
    assert len(seen) == 2 and all(lines[0] == "setup" for lines in seen.values())
    assert sum(lines.count("ready>executing") for lines in seen.values()) == 4
    assert sum(lines.count("executing>memory") for lines in seen.values()) == 4

    cluster.scale(3)  # a worker that joins later
    victim = next(w for w in cluster.scheduler.workers.values() if w.name == "0")
    os.kill(victim.pid, signal.SIGKILL)  # a worker that restarts
    def back():
        return any(w.name == "0" and w.pid != victim.pid for w in cluster.scheduler.workers.values())

    wait_until(back, timeout=20, msg="worker 0 back")
    wait_until(lambda: len(journals(tmp_path)) == 4, timeout=10, msg="set up on newcomer and restarted")
    plugins = c.run(lambda dask_worker: sorted(dask_worker.plugins))
    assert list(plugins.values()) == [["journal"]] * 3
    # Registering the same plugin again sets nothing up twice.
    c.register_plugin(Journal(str(tmp_path)))
    assert sum(lines.count("setup") for lines in journals(tmp_path).values()) == 4

    c.unregister_worker_plugin("journal")
    live = {f"{w.name}-{w.pid}" for w in cluster.scheduler.workers.values()}
    assert all(journals(tmp_path)[f][-1] == "teardown" for f in live)
    with pytest.raises(ValueError, match="does not exist"):
        c.unregister_worker_plugin("journal")
    cluster.scale(4)
    assert list(c.run(lambda dask_worker: sorted(dask_worker.plugins)).values()) == [[]] * 4


def test_a_failing_setup_raises_in_the_client(local):
    _, c = local
    with pytest.raises(OSError, match="no such device"):
        c.register_plugin(Broken())


def test_plugins_that_cannot_run_here_are_refused_clearly(local):
    _, c = local

    class Sched(SchedulerPlugin):
        pass

    class Nanny(NannyPlugin):
        pass

    with pytest.raises(TypeError, match="SchedulerPlugin: the dask_rs scheduler is written in Rust"):
        c.register_plugin(Sched())
    with pytest.raises(TypeError, match="NannyPlugin: .*dask_rs.Environ"):
        c.register_plugin(Nanny())
    with pytest.raises(TypeError, match="not a worker plugin"):
        c.register_plugin(object())
    with pytest.raises(TypeError, match="nanny=True"):
        c.register_worker_plugin(Journal("/tmp"), nanny=True)
    distributed = pytest.importorskip("distributed.diagnostics.plugin")

    class TheirSched(distributed.SchedulerPlugin):
        pass

    with pytest.raises(TypeError, match="SchedulerPlugin"):
        c.register_plugin(TheirSched())


def test_get_worker_inside_a_task_and_outside(local):
    cluster, c = local
    x = c.submit(inc, 1, workers=["1"])
    x.result()
    seen = c.submit(whoami, workers=["1"], pure=False).result()
    info = c.scheduler_info()["workers"]
    addr = next(a for a, w in info.items() if w["name"] == "1")
    assert seen["name"] == "1" and seen["address"] == addr
    assert seen["nthreads"] == 1 and seen["memory_limit"] == info[addr]["memory_limit"]
    assert seen["scheduler"] == cluster.scheduler_address
    assert x.key in seen["data"]
    assert os.path.isdir(seen["local_directory"])
    with pytest.raises(ValueError, match="No worker found"):
        get_worker()


def test_environ_is_in_place_when_worker_processes_start(local):
    cluster, c = local
    c.register_plugin(Environ({"DASK_RS_TEST_VAR": "set by a plugin"}))

    def read():
        return list(c.run(os.getenv, "DASK_RS_TEST_VAR", on_error="ignore").values())

    wait_until(lambda: len(cluster.scheduler.workers) == 2 and read() == ["set by a plugin"] * 2, timeout=30,
               msg="workers restarted with the variable")
    cluster.scale(3)
    assert read() == ["set by a plugin"] * 3


def test_upload_file_and_directory_reach_workers_that_join_later(local, tmp_path):
    cluster, c = local
    module = tmp_path / "uploaded_helper.py"
    module.write_text("def triple(x):\n    return 3 * x\n")
    c.upload_file(str(module))
    pkg = tmp_path / "tree" / "uploaded_pkg"
    pkg.mkdir(parents=True)
    (pkg / "__init__.py").write_text("ANSWER = 42\n")
    c.register_plugin(UploadDirectory(str(tmp_path / "tree"), update_path=True))
    cluster.scale(3)

    def use():
        import uploaded_helper
        import uploaded_pkg

        return uploaded_helper.triple(uploaded_pkg.ANSWER)

    assert list(c.run(use).values()) == [126] * 3


def test_pip_install_reaches_every_worker(local, tmp_path):
    cluster, c = local
    wheel = tmp_path / "dask_rs_pip_probe-1.0-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as z:
        z.writestr("dask_rs_pip_probe/__init__.py", "VALUE = 'installed'\n")
        info = "dask_rs_pip_probe-1.0.dist-info"
        z.writestr(f"{info}/METADATA", "Metadata-Version: 2.1\nName: dask-rs-pip-probe\nVersion: 1.0\n")
        z.writestr(f"{info}/WHEEL",
                   "Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n")
        z.writestr(f"{info}/RECORD", f"dask_rs_pip_probe/__init__.py,,\n{info}/METADATA,,\n{info}/WHEEL,,\n"
                                     f"{info}/RECORD,,\n")
    import sys

    try:
        c.register_plugin(PipInstall([str(wheel)], pip_options=["--no-index"]))

        def probe():
            import dask_rs_pip_probe

            return dask_rs_pip_probe.VALUE

        assert list(c.run(probe).values()) == ["installed"] * 2
    finally:
        subprocess.run([sys.executable, "-m", "pip", "uninstall", "-y", "-q", "dask-rs-pip-probe"],
                       capture_output=True)


def test_environ_under_a_supervisor(procs):
    from conftest import start_scheduler, start_worker

    address = start_scheduler(procs)
    start_worker(procs, address, "sup", extra=["--nworkers", "2"], stderr=subprocess.DEVNULL)
    with Client(address) as c:
        c.wait_for_workers(2, timeout=20)
        c.register_plugin(Environ({"DASK_RS_TEST_VAR": "from the supervisor"}))

        def read():
            return sorted(map(str, c.run(os.getenv, "DASK_RS_TEST_VAR", on_error="ignore").values()))

        wait_until(lambda: read() == ["from the supervisor"] * 2, timeout=30, msg="both restarted with it")
