"""`LocalCluster`: a scheduler in this process and workers as child processes.

Mirrors `distributed.LocalCluster(n_workers, threads_per_worker,
memory_limit)`. The scheduler is the Rust one, run on background threads of
the calling process; each worker is ``python -m dask_rs worker``.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import threading
import time
import warnings
import weakref

from . import _core
from ._worker import remove_spill_dirs
from .utils import close_at_exit, format_bytes, parse_bytes

_clusters: weakref.WeakSet = close_at_exit()


def _default_layout(n_workers, threads_per_worker):
    cpu = os.cpu_count() or 1
    if n_workers is None and threads_per_worker is None:
        n_workers = cpu if cpu <= 4 else max(1, int(cpu**0.5))
        threads_per_worker = max(1, cpu // n_workers)
    elif n_workers is None:
        n_workers = max(1, cpu // threads_per_worker)
    elif threads_per_worker is None:
        threads_per_worker = max(1, cpu // max(n_workers, 1))
    return n_workers, threads_per_worker


class LocalCluster:
    """A cluster on this machine.

    ``processes=False`` runs the workers as threads of this process instead;
    ``resources={"GPU": 1}`` is given to every worker (``--resources``);
    ``local_directory`` is where workers spill results (``--local-directory``).
    """

    def __init__(
        self,
        n_workers: int | None = None,
        threads_per_worker: int | None = None,
        processes: bool = True,
        memory_limit="auto",
        host: str = "127.0.0.1",
        scheduler_port: int = 0,
        dashboard_address=":8787",
        silence_logs=None,
        timeout: float = 30,
        worker_saturation: float = 1.1,
        work_stealing: bool = True,
        python: str | None = None,
        resources: dict | None = None,
        local_directory: str | None = None,
        security=None,
        **kwargs,
    ):
        unknown = set(kwargs) - {"asynchronous", "loop", "protocol", "interface", "worker_class"}
        if unknown:
            raise TypeError(f"LocalCluster got unexpected keyword arguments {sorted(unknown)}")
        n_workers, threads_per_worker = _default_layout(n_workers, threads_per_worker)
        if n_workers < 0 or threads_per_worker < 1:
            raise ValueError("n_workers must be >= 0 and threads_per_worker >= 1")
        if memory_limit in ("auto", None):
            from ._worker import total_memory

            memory_limit = total_memory() // max(n_workers, 1) if memory_limit == "auto" else 0
        self.memory_limit = parse_bytes(memory_limit)
        from ._worker import format_resources

        self.resources = format_resources(resources)
        _core.parse_resources(self.resources)
        self.local_directory = os.fspath(local_directory) if local_directory else None
        self.threads_per_worker = threads_per_worker
        self.processes = processes
        self.host = host
        self.timeout = timeout
        self.python = python or sys.executable
        self.status = "starting"
        from .security import Security, check

        # Every cluster gets its own token unless told otherwise: other users
        # of this machine can reach loopback ports too. security=False opens
        # it; Security.temporary() (or TLS files) encrypts it too.
        if security is False:
            self.security = Security()
        elif security is None:
            self.security = Security.token_only()
        elif security is True:
            self.security = Security.temporary()
        else:
            self.security = check(security)
        self._scheduler = _core.start_scheduler(
            host, scheduler_port, float(worker_saturation), bool(work_stealing),
            dashboard_address=None if dashboard_address is None else str(dashboard_address),
            **self.security.core_kwargs("scheduler"),
        )
        if self._scheduler.dashboard_warning:
            warnings.warn(self._scheduler.dashboard_warning, UserWarning, stacklevel=2)
        self.scheduler_address = self._scheduler.address
        self._procs: dict = {}
        self._threads: dict = {}
        self._started: dict = {}
        self._exits: dict = {}
        self._plock = threading.RLock()
        self.restarts = 0
        self._logs = tempfile.TemporaryDirectory(prefix="dask-rs-")
        self._next = 0
        self._monitor = _core.ClientCore(
            self.scheduler_address, "LocalCluster", float(timeout), **self.security.core_kwargs()
        )
        _clusters.add(self)
        try:
            self.scale(n_workers)
        except BaseException:
            self.close()
            raise
        self.status = "running"
        if processes:
            threading.Thread(target=self._watch, name="LocalCluster-watch", daemon=True).start()

    # -- workers --
    def _start_one(self):
        name = str(self._next)
        self._next += 1
        if not self.processes:
            from ._worker import start

            self._threads[name] = start(
                self.scheduler_address, name, self.threads_per_worker, self.memory_limit, self.host,
                self.timeout, resources=self.resources, local_directory=self.local_directory,
            )
            return name
        self._spawn(name)
        return name

    def _spawn(self, name):
        """Start worker process ``name`` (again, after a crash: same name, same log)."""
        log = open(os.path.join(self._logs.name, f"worker-{name}.log"), "ab")
        cmd = [
            self.python, "-m", "dask_rs", "worker", self.scheduler_address,
            "--name", name,
            "--nthreads", str(self.threads_per_worker),
            "--memory-limit", str(self.memory_limit),
            "--host", self.host,
            "--resources", self.resources,
        ]
        if self.local_directory:
            cmd += ["--local-directory", self.local_directory]
        env = dict(os.environ)
        env.setdefault("PYTHONUNBUFFERED", "1")
        # Credentials travel in the environment, never on the command line.
        for k in ("TOKEN_FILE", "TOKEN", "TLS_CA_FILE", "TLS_CERT", "TLS_KEY"):
            env.pop(f"DASK_RS_{k}", None)
        env.update(self.security.worker_env())
        self._procs[name] = (subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env), log)
        self._started[name] = time.monotonic()

    def _watch(self):
        """Restart worker processes that crash (Dask's nannies): a worker that
        exits with a non-zero status comes back under the same name, after a
        delay that grows while it keeps failing at once."""
        delays: dict = {}
        while self.status in ("starting", "running"):
            time.sleep(0.1)
            with self._plock:
                if self.status != "running":
                    continue
                now = time.monotonic()
                for name, (proc, log) in list(self._procs.items()):
                    code = proc.poll()
                    if code is None or code == 0:
                        continue
                    if name not in self._exits:
                        remove_spill_dirs(proc.pid, self.local_directory)
                        lived = now - self._started.get(name, now)
                        fresh = lived > 10 or code == 3  # 3: the worker asked for a fresh process
                        delays[name] = 0.0 if fresh else min(10.0, max(0.2, delays.get(name, 0.0) * 2))
                        self._exits[name] = now
                    if now - self._exits[name] < delays[name]:
                        continue
                    del self._exits[name]
                    log.write(f"worker {name} exited with status {code}; restarting\n".encode())
                    log.close()
                    self.restarts += 1
                    self._spawn(name)

    def _worker_names(self) -> set:
        return {w["name"] for w in self._monitor.info()["workers"]}

    def _wait_for(self, names: set):
        deadline = time.monotonic() + self.timeout
        while True:
            joined = self._worker_names()
            if names <= joined:
                return
            for n in names - joined:
                entry = self._procs.get(n)
                if entry is not None and entry[0].poll() is not None:
                    raise RuntimeError(f"worker {n} exited with code {entry[0].returncode}: {self.logs(n)}")
            if time.monotonic() > deadline:
                raise TimeoutError(f"workers {sorted(names - joined)} did not join within {self.timeout} s")
            time.sleep(0.02)

    def scale(self, n: int):
        """Bring the number of workers to ``n``."""
        with self._plock:
            current = list(self._procs) + list(self._threads)
            new = {self._start_one() for _ in range(max(0, n - len(current)))}
            for name in sorted(current, key=int)[n:]:
                self._stop_worker(name)
        if new:
            self._wait_for(new)

    def _stop_worker(self, name):
        if name in self._threads:
            h = self._threads.pop(name)
            h.stop()
            h.wait(5)
            return
        with self._plock:
            proc, log = self._procs.pop(name)
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(5)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        log.close()
        if proc.returncode != 0:
            remove_spill_dirs(proc.pid, self.local_directory)

    @property
    def workers(self) -> dict:
        return {n: p for n, (p, _) in self._procs.items()} | dict(self._threads)

    def logs(self, name=None) -> str:
        names = [name] if name is not None else list(self._procs)
        out = []
        for n in names:
            try:
                with open(os.path.join(self._logs.name, f"worker-{n}.log")) as f:
                    out.append(f.read())
            except OSError:
                pass
        return "\n".join(out)

    def close(self, timeout=None):
        if self.status == "closed":
            return
        self.status = "closing"
        for name in list(self._procs) + list(self._threads):
            try:
                self._stop_worker(name)
            except Exception:
                pass
        self._monitor = None
        self._scheduler.stop()
        try:
            self._logs.cleanup()
        except Exception:
            pass
        self.status = "closed"

    @property
    def dashboard_link(self):
        """The dashboard's ``/status`` page (None with ``dashboard_address=None``)."""
        return self._scheduler.dashboard_link

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def __del__(self):
        try:
            self.close()
        except Exception:
            pass

    def __repr__(self):
        n = len(self._procs) + len(self._threads)
        return (
            f"LocalCluster({self.scheduler_address!r}, workers={n}, threads={n * self.threads_per_worker}, "
            f"memory={format_bytes(n * self.memory_limit)})"
        )

