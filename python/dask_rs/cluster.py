"""`LocalCluster`: a scheduler in this process and workers as child processes.

Mirrors `distributed.LocalCluster(n_workers, threads_per_worker,
memory_limit)`. The scheduler is the Rust one, run on background threads of
the calling process; each worker is ``python -m dask_rs worker``.
"""

from __future__ import annotations

import logging
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

_clusters: weakref.WeakSet = close_at_exit(stage=1)


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


# distributed.LocalCluster keywords (its own, SpecCluster's, Nanny's and
# Worker's) that mean nothing for dask_rs: accepted, with one warning each.
_NO_EFFECT = {
    "loop": "dask_rs clients and clusters do not run on a Tornado loop",
    "start": "the cluster starts when made (or awaited, with asynchronous=True)",
    "services": "no extra scheduler services", "worker_services": "no extra worker services",
    "service_kwargs": "no extra services", "protocol": "workers speak tcp:// or tls:// (see security=)",
    "blocked_handlers": "no handlers to block", "interface": "use host= to choose the address",
    "worker_class": "workers are dask_rs workers", "scheduler_sync_interval": "nothing to sync",
    "worker_dashboard_address": "workers have no dashboard of their own (the scheduler's shows them)",
    "diagnostics_port": "use dashboard_address=", "shutdown_on_close": "closing always shuts down",
    "shutdown_scheduler": "closing always shuts down", "preload": "use client.run or upload_file",
    "preload_argv": "no preload", "preload_nanny": "no nannies", "preload_nanny_argv": "no nannies",
    "heartbeat_interval": "workers beat once a second", "extensions": "no worker extensions",
    "metrics": "workers report fixed metrics", "startup_information": "no startup information",
    "validate": "the scheduler validates in its own tests", "plugins": "plugins are not supported yet",
    "data": "workers keep results in memory and spill to local_directory", "executor": "one thread pool",
    "contact_address": "local workers are reached at host=", "listen_address": "use host=",
    "nanny": "process workers are always supervised", "low_level_profiler": "no profiler",
    "profile_cycle_interval": "no profiler", "transition_counter_max": "no transition counter",
    "dashboard": "use dashboard_address=None to turn the dashboard off", "http_prefix": "no prefix",
    "reconnect": "workers always reconnect", "quiet": "worker output goes to the cluster's logs",
    "config": "use dask.config in the workers", "port": "workers pick free ports",
    "worker_port": "workers pick free ports", "scheduler_sni": "no SNI",
}
_warned: set = set()


def _warn_no_effect(names) -> None:
    for n in sorted(names):
        if n not in _warned:
            _warned.add(n)
            warnings.warn(f"LocalCluster({n}=...) has no effect in dask_rs: {_NO_EFFECT[n]}", UserWarning,
                          stacklevel=4)


def _memory_limit(value, n_workers: int) -> int:
    """Bytes per worker, as distributed reads ``memory_limit``: "auto" (the
    machine's memory shared among the workers), a fraction of the machine's
    memory (a number up to 1), a size ("4GiB", bytes); 0 or None: no limit."""
    from ._worker import total_memory

    if value is None:
        return 0
    if value == "auto":
        return total_memory() // max(n_workers, 1)
    try:
        number = float(value)
    except (TypeError, ValueError):
        number = None
    if number is not None and 0 < number <= 1:
        return int(total_memory() * number)
    limit = parse_bytes(value)
    return min(limit, total_memory()) if limit else 0


class LocalCluster:
    """A cluster on this machine.

    Takes every keyword `distributed.LocalCluster` takes: those that mean
    something here are honoured (``name``, ``env``, ``silence_logs``,
    ``asynchronous``, ``scheduler_kwargs``, ``lifetime``, ``death_timeout``,
    ``nthreads``, ``ip``, fractional ``memory_limit``...), the others warn once.
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
        host: str | None = None,
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
        name=None,
        asynchronous: bool = False,
        env: dict | None = None,
        lifetime=None,
        lifetime_stagger=None,
        lifetime_restart: bool = False,
        death_timeout=None,
        scheduler_kwargs: dict | None = None,
        ip: str | None = None,
        nthreads: int | None = None,
        **kwargs,
    ):
        unknown = set(kwargs) - set(_NO_EFFECT)
        if unknown:
            raise TypeError(f"LocalCluster got unexpected keyword arguments {sorted(unknown)}")
        _warn_no_effect(kwargs)
        self.name = str(name) if name is not None else f"LocalCluster-{os.urandom(4).hex()}"
        self.status = "created"
        self._loop = None
        args = dict(locals())
        for k in ("self", "kwargs", "name", "asynchronous", "__class__", "unknown"):
            args.pop(k, None)
        if asynchronous:
            # Started by `await LocalCluster(asynchronous=True)` or `async with`.
            self._starting = args
            return
        self._starting = None
        self._start(**args)

    def _start(self, n_workers, threads_per_worker, processes, memory_limit, host, scheduler_port,
               dashboard_address, silence_logs, timeout, worker_saturation, work_stealing, python,
               resources, local_directory, security, env, lifetime, lifetime_stagger, lifetime_restart,
               death_timeout, scheduler_kwargs, ip, nthreads):
        if threads_per_worker is None and nthreads is not None:
            threads_per_worker = nthreads
        host = host or ip or "127.0.0.1"
        scheduler_kwargs = dict(scheduler_kwargs or {})
        scheduler_port = scheduler_kwargs.pop("port", scheduler_port)
        host = scheduler_kwargs.pop("host", host)
        dashboard_address = scheduler_kwargs.pop("dashboard_address", dashboard_address)
        if scheduler_kwargs.pop("dashboard", True) is False:
            dashboard_address = None
        if scheduler_kwargs:
            raise TypeError(f"scheduler_kwargs: dask_rs's scheduler takes port, host, dashboard_address and "
                            f"dashboard, not {sorted(scheduler_kwargs)}")
        if silence_logs not in (None, False):
            import logging

            logging.getLogger("dask_rs").setLevel(silence_logs)
        n_workers, threads_per_worker = _default_layout(n_workers, threads_per_worker)
        if n_workers < 0 or threads_per_worker < 1:
            raise ValueError("n_workers must be >= 0 and threads_per_worker >= 1")
        if not processes and (env or lifetime is not None):
            raise ValueError("env= and lifetime= apply to worker processes: use processes=True")
        self.memory_limit = _memory_limit(memory_limit, n_workers)
        self.env = {str(k): str(v) for k, v in (env or {}).items()}
        self._lifetime = [
            *(["--lifetime", str(lifetime)] if lifetime is not None else []),
            *(["--lifetime-stagger", str(lifetime_stagger)] if lifetime_stagger is not None else []),
            *(["--lifetime-restart"] if lifetime_restart else []),
            *(["--death-timeout", str(death_timeout)] if death_timeout is not None else []),
        ]
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
            warnings.warn(self._scheduler.dashboard_warning, UserWarning, stacklevel=3)
        self.scheduler_address = self._scheduler.address
        self._procs: dict = {}
        self._threads: dict = {}
        self._started: dict = {}
        self._exits: dict = {}
        self._plock = threading.RLock()
        self.restarts = 0
        self._events: list = []
        self._adaptive = None
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
        cmd += self._lifetime
        env = dict(os.environ)
        env.setdefault("PYTHONUNBUFFERED", "1")
        # Credentials travel in the environment, never on the command line.
        for k in ("TOKEN_FILE", "TOKEN", "TLS_CA_FILE", "TLS_CERT", "TLS_KEY"):
            env.pop(f"DASK_RS_{k}", None)
        env.update(self.security.worker_env())
        env.update(self.env)
        from ._worker import environment_with_plugins

        # Environ plugins' variables, saved by a worker, apply to every start.
        env = environment_with_plugins(env, os.path.join(self._logs.name, "environ.json"))
        self._procs[name] = (subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env), log)
        self._started[name] = time.monotonic()

    def _watch(self):
        """Restart worker processes that end without being asked (Dask's
        nannies): a worker that crashes, or is stopped by a signal (its status
        is then 128 + the signal), comes back under the same name, after a
        delay that grows while it keeps failing at once. A worker that closed
        because it was retired exits with 0 and stays away."""
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
                    when = time.strftime("%H:%M:%S")
                    self._events.append(f"{when} worker {name} exited with status {code}; restarted")
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
        """Bring the number of workers to ``n`` (and stop adapting)."""
        if self._adaptive is not None:
            self._adaptive.stop()
            self._adaptive = None
        self._scale(n)

    def _scale(self, n: int):
        with self._plock:
            current = list(self._procs) + list(self._threads)
            new = {self._start_one() for _ in range(max(0, n - len(current)))}
            going = sorted(current, key=int)[n:]
            if going and self.status == "running":
                # As distributed: retired first, so that their results move
                # to the workers that stay (a result nobody can take stays
                # with its worker until it is stopped).
                try:
                    self._monitor.retire_workers(going, self.timeout)
                except Exception:  # noqa: BLE001 - stopping them is what was asked
                    pass
            for name in going:
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

    def adapt(self, minimum=0, maximum=None, minimum_cores=None, maximum_cores=None, minimum_memory=None,
              maximum_memory=None, target_duration="5s", wait_count=3, interval="1s", **kwargs) -> Adaptive:
        """Grow and shrink with the load, by Dask's rules and with the same
        controller as ``dask-ctl adapt``: enough threads to finish the work in
        hand within ``target_duration`` (more when memory fills), between
        ``minimum`` and ``maximum`` workers (or cores, or memory). A worker is
        removed only after ``wait_count`` checks in a row agree, and is
        retired first, so its results move to the others. ``scale(n)`` stops
        adapting. Returns the `Adaptive` object (``.stop()``, ``.log``)."""
        import math

        from .utils import parse_timedelta

        if kwargs:
            raise TypeError(f"adapt() got unexpected keyword arguments {sorted(kwargs)}")
        per = self.threads_per_worker
        lo = int(minimum or 0)
        hi = math.inf if maximum is None else maximum
        if minimum_cores is not None:
            lo = max(lo, math.ceil(minimum_cores / per))
        if maximum_cores is not None:
            hi = min(hi, maximum_cores // per)
        if self.memory_limit:
            if minimum_memory is not None:
                lo = max(lo, math.ceil(parse_bytes(minimum_memory) / self.memory_limit))
            if maximum_memory is not None:
                hi = min(hi, parse_bytes(maximum_memory) // self.memory_limit)
        hi = 2**31 if hi == math.inf else int(hi)
        if hi < lo:
            raise ValueError(f"adapt: maximum {hi} workers is below minimum {lo}")
        if self._adaptive is not None:
            self._adaptive.stop()
        self._adaptive = Adaptive(self, lo, hi, parse_timedelta(target_duration), int(wait_count),
                                  parse_timedelta(interval))
        return self._adaptive

    # -- asynchronous use --
    def __await__(self):
        """``cluster = await LocalCluster(asynchronous=True)``."""
        return self._start_async().__await__()

    async def _start_async(self):
        import asyncio

        self._loop = asyncio.get_running_loop()
        if self._starting is not None:
            args, self._starting = self._starting, None
            await asyncio.to_thread(self._start, **args)
        return self

    async def __aenter__(self):
        return await self._start_async()

    async def __aexit__(self, *exc):
        import asyncio

        await asyncio.to_thread(self._close)

    def _in_own_loop(self) -> bool:
        import asyncio

        try:
            return self._loop is not None and asyncio.get_running_loop() is self._loop
        except RuntimeError:
            return False

    # -- what notebooks read --
    @property
    def scheduler(self) -> SchedulerView:
        """The scheduler as distributed's ``cluster.scheduler``: ``.address``
        and ``.workers`` (address -> worker with ``name``, ``pid``,
        ``nthreads``, ``memory_limit``...), read fresh on each access."""
        return SchedulerView(self)

    @property
    def scheduler_info(self) -> dict:
        """The scheduler's identity and workers, as `Client.scheduler_info()`."""
        from .client import _scheduler_info

        return _scheduler_info(self._monitor.info())

    def wait_for_workers(self, n_workers: int, timeout=None):
        """Block until at least ``n_workers`` workers are connected."""
        from .client import _wait_for_workers

        _wait_for_workers(self._monitor, n_workers, timeout)

    def get_logs(self, cluster: bool = True, scheduler: bool = True, workers=True) -> dict:
        """Logs as distributed's ``get_logs``: ``"Cluster"`` (worker restarts),
        ``"Scheduler"`` (this process's ``dask_rs`` log records) and one entry
        per worker process, by address (``workers`` may list addresses or names)."""
        out = {}
        if cluster:
            out["Cluster"] = "\n".join(self._events)
        if scheduler:
            out["Scheduler"] = "\n".join(_records.lines())
        if workers:
            info = {w["name"]: w["address"] for w in self._monitor.info()["workers"]}
            wanted = None if workers is True else {str(w) for w in workers}
            for n in list(self._procs):
                addr = info.get(n, n)
                if wanted is None or n in wanted or addr in wanted:
                    out[addr] = self.logs(n)
        return out

    def close(self, timeout=None):
        """Stop the workers and the scheduler (awaitable with asynchronous=True)."""
        if self._in_own_loop():
            import asyncio

            return asyncio.ensure_future(asyncio.to_thread(self._close))
        self._close()

    def _close(self):
        if self.status in ("closed", "created"):
            self.status = "closed"
            return
        self.status = "closing"
        if getattr(self, "_adaptive", None) is not None:
            self._adaptive.stop()
        # Threaded workers all stop at once: none is left to compute again
        # what another one held while the rest shut down.
        for h in self._threads.values():
            h.stop()
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
        self._close()

    def __del__(self):
        try:
            self._close()
        except Exception:
            pass

    def __repr__(self):
        if self.status == "created":
            return f"LocalCluster({self.name!r}, not started: await it)"
        n = len(self._procs) + len(self._threads)
        return (
            f"LocalCluster({self.scheduler_address!r}, workers={n}, threads={n * self.threads_per_worker}, "
            f"memory={format_bytes(n * self.memory_limit)})"
        )



class Adaptive:
    """A LocalCluster adapting to its load (see `LocalCluster.adapt`): a
    thread that asks the controller every ``interval`` and starts, retires
    and stops worker processes as it says."""

    def __init__(self, cluster: LocalCluster, minimum: int, maximum: int, target_duration: float,
                 wait_count: int, interval: float):
        self.cluster = cluster
        self.minimum, self.maximum = minimum, maximum
        self.interval = interval
        self._core = _core.Adaptive(minimum, maximum, cluster.threads_per_worker, target_duration, wait_count,
                                    interval)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="LocalCluster-adapt", daemon=True)
        self._thread.start()

    @property
    def log(self) -> list:
        """The decisions so far (``time``, ``kind``, ``target``, ``reason``...)."""
        return self._core.decisions()

    def stop(self):
        self._stop.set()
        if self._thread is not threading.current_thread():
            self._thread.join(10)

    def _run(self):
        c = self.cluster
        while not self._stop.is_set() and c.status == "running":
            now = time.time()
            with c._plock:
                # A crashed process is being restarted under its name: still ours.
                records = [(n, "running", f"pid {p.pid}") for n, (p, _) in c._procs.items()]
                records += [(n, "running", "thread") for n in c._threads]
            try:
                kind, n, pending, running = self._core.step(c._monitor, now, records)
                if kind == "scale_up":
                    with c._plock:
                        for _ in range(n - len(records)):
                            c._start_one()
                elif kind == "remove":
                    for name in pending:
                        c._stop_worker(name)
                    if running:
                        retired, _failed = c._monitor.retire_workers(list(running), 60.0)
                        for name in retired:
                            c._stop_worker(name)
                self._core.report(now, None)
            except Exception as e:  # noqa: BLE001 - reported, backed off, tried again
                self._core.report(now, f"{type(e).__name__}: {e}")
            self._stop.wait(self.interval)

    def __repr__(self):
        return f"<Adaptive {self.minimum}..{self.maximum} workers, target {self._core.target}>"


class _Records(logging.Handler):
    """The last log records of the ``dask_rs`` logger in this process (where a
    LocalCluster's scheduler runs), for `LocalCluster.get_logs`."""

    def __init__(self, keep: int = 1000):
        super().__init__(logging.INFO)
        import collections

        self._lines = collections.deque(maxlen=keep)
        self.setFormatter(logging.Formatter("%(asctime)s - %(name)s - %(levelname)s - %(message)s"))

    def emit(self, record):
        try:
            self._lines.append(self.format(record))
        except Exception:
            pass

    def lines(self) -> list:
        return list(self._lines)


_records = _Records()
logging.getLogger("dask_rs").addHandler(_records)


class WorkerView:
    """One worker as ``cluster.scheduler.workers[address]`` shows it."""

    def __init__(self, info: dict):
        self.address = info["address"]
        self.name = info["name"]
        self.pid = info["pid"]
        self.nthreads = info["nthreads"]
        self.memory_limit = info["memory_limit"]
        self.resources = info["resources"]
        self.host = self.address.split("://")[-1].rsplit(":", 1)[0]
        self.status = "closing_gracefully" if info["retiring"] else "running"
        self.metrics = {"managed_bytes": info["managed"], "memory": info["rss"], "cpu": info["cpu"],
                        "executing": info["executing"], "in_memory": info["nkeys"]}

    def __repr__(self):
        return f"<WorkerState {self.address!r}, name: {self.name}, status: {self.status}, pid: {self.pid}>"


class SchedulerView:
    """``cluster.scheduler``: what distributed's Scheduler object offers
    notebooks (``address``, ``id``, ``workers``), read from the scheduler."""

    def __init__(self, cluster: LocalCluster):
        self._cluster = cluster
        self.address = cluster.scheduler_address
        self.id = self.address

    @property
    def workers(self) -> dict:
        return {w["address"]: WorkerView(w) for w in self._cluster._monitor.info()["workers"]}

    def __repr__(self):
        return f"<Scheduler {self.address!r}, workers: {len(self.workers)}>"
