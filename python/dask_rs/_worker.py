"""The Python side of a worker: running one task, and the `worker` command.

The Rust runtime (in `_core`) owns networking, scheduling and the data
store; it calls :func:`execute` on its executor threads with the GIL held
only for the duration of the call.
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import inspect
import os
import pickle
import random
import signal
import sys
import tempfile
import threading
import time
import uuid

import cloudpickle

from . import _core
from ._serialize import dumps, loads, run_task, sizeof
from .utils import parse_bytes, parse_timedelta, route_host

_thread_state = threading.local()
#: Exit status of a worker that asks its supervisor for a fresh process: it
#: retired at the end of its lifetime (``--lifetime-restart``) or the
#: scheduler asked for a restart (``Client.restart``).
RESTART_STATUS = 3
_scheduler_address: str | None = None
_PKG_DIR = os.path.dirname(os.path.abspath(__file__))


def _user_traceback(tb):
    """Skip the frames of dask_rs itself at the top of a traceback."""
    while tb is not None and os.path.dirname(os.path.abspath(tb.tb_frame.f_code.co_filename)) == _PKG_DIR:
        tb = tb.tb_next
    return tb


def dump_exception(exc: BaseException) -> bytes:
    try:
        b = cloudpickle.dumps(exc, protocol=5)
        pickle.loads(b)
        return b
    except Exception:
        return cloudpickle.dumps(RuntimeError(f"{type(exc).__name__}: {exc}"), protocol=5)


def dump_traceback(tb) -> bytes:
    try:
        import tblib

        return pickle.dumps(tblib.Traceback(tb).to_dict(), protocol=5)
    except Exception:
        return b""


def execute(worker, run_spec, values, key, thread, shared=None):
    """Run one task on ``worker`` (a `WorkerView`). Returns ``(True, value,
    nbytes)`` or ``(False, exception_bytes, traceback_bytes, text)``."""
    _thread_state.key = key
    _thread_state.worker = worker
    plugins = worker.plugins
    if plugins:
        worker._transition(key, "ready", "executing")
    try:
        result = run_task(run_spec, values, shared)
    except BaseException as e:  # noqa: BLE001 - every failure goes back to the client
        if plugins:
            worker._transition(key, "executing", "error", exception=e)
        tb = _user_traceback(e.__traceback__)
        return (False, dump_exception(e), dump_traceback(tb), f"{type(e).__name__}: {e}")
    finally:
        _thread_state.key = None
    if plugins:
        worker._transition(key, "executing", "memory")
    return (True, result, sizeof(result))


class WorkerView:
    """This worker as `get_worker()` returns it inside a task, as plugins'
    ``setup(worker)`` get it, and as `Client.run` passes it to a function
    that takes ``dask_worker``: distributed's commonly used Worker attributes."""

    def __init__(self, scheduler: str, name: str, nthreads: int, memory_limit: int, resources,
                 local_directory: str | None):
        self.scheduler_address = scheduler
        self.name = self.id = name
        self.nthreads = nthreads
        self.memory_limit = memory_limit
        self.resources = dict(_core.parse_resources(format_resources(resources)))
        self._base_directory = local_directory or tempfile.gettempdir()
        self.address = None  # known once the worker listens
        self.plugins: dict = {}
        self._plugin_digests: dict = {}
        self._handle = None
        self.restart_reason: str | None = None
        self._setup_lock = threading.RLock()

    @property
    def local_directory(self) -> str:
        """This worker's own directory (the same across its restarts)."""
        safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in str(self.name))
        path = os.path.join(self._base_directory, f"dask-rs-worker-{safe}")
        os.makedirs(path, exist_ok=True)
        return path

    @property
    def data(self) -> WorkerData:
        """The results this worker holds, as a read-only mapping."""
        return WorkerData(self._handle)

    @property
    def scheduler(self):
        """The scheduler, as an object with its ``address``."""
        import types

        return types.SimpleNamespace(address=self.scheduler_address)

    def _restart_soon(self, reason: str) -> None:
        """Ask for a fresh process once the current set-up is done (a worker
        under a supervisor exits for it to start one)."""
        self.restart_reason = reason

    def _transition(self, key, start, finish, **kwargs):
        for name, plugin in list(self.plugins.items()):
            hook = getattr(plugin, "transition", None)
            if hook is None:
                continue
            try:
                hook(key, start, finish, **kwargs)
            except Exception:  # noqa: BLE001 - a plugin's failure must not fail the task
                import logging

                logging.getLogger("dask_rs").exception("plugin %s failed in transition(%s)", name, key)

    def __repr__(self):
        return f"<Worker {self.address!r}, name: {self.name}, threads: {self.nthreads}>"


class WorkerData:
    """``get_worker().data``: keys and values of the results a worker holds."""

    def __init__(self, handle):
        self._handle = handle

    def keys(self):
        return list(self._handle.data_keys()) if self._handle is not None else []

    def __iter__(self):
        return iter(self.keys())

    def __len__(self):
        return len(self.keys())

    def __contains__(self, key):
        return str(key) in set(self.keys())

    def __getitem__(self, key):
        if self._handle is None:
            raise KeyError(key)
        return self._handle.data_get(str(key))

    def get(self, key, default=None):
        try:
            return self[key]
        except KeyError:
            return default

    def items(self):
        return [(k, self[k]) for k in self.keys()]

    def values(self):
        return [v for _, v in self.items()]


_views: dict = {}


def environment_with_plugins(env: dict, env_file: str) -> dict:
    """``env`` for a worker process its supervisor starts, with the variables
    `Environ` plugins saved in ``env_file`` (which it names to the worker)."""
    import json

    env = dict(env)
    env["DASK_RS_ENV_FILE"] = env_file
    try:
        with open(env_file) as f:
            env.update({str(k): str(v) for k, v in json.load(f).items()})
    except (OSError, ValueError):
        pass
    return env


def get_worker() -> WorkerView:
    """The worker running the current task; ValueError outside a task, as in
    distributed."""
    view = getattr(_thread_state, "worker", None)
    if view is None or getattr(_thread_state, "key", None) is None:
        raise ValueError("No worker found: get_worker() works inside a task")
    return view


def install_plugin(name: str, data: bytes, dask_worker=None):
    """Set up a worker plugin on this worker (``Client.register_plugin``, and
    the scheduler's hand-over to workers that join later). The same plugin
    twice is set up once; another under the same name replaces it (its
    predecessor is torn down). Returns distributed's ``{"status": ...}``."""
    with dask_worker._setup_lock:
        return _install_plugin(name, data, dask_worker)


def _install_plugin(name: str, data: bytes, worker):
    import hashlib

    digest = hashlib.sha1(data).hexdigest()
    if worker._plugin_digests.get(name) == digest:
        return {"status": "OK"}
    if name in worker.plugins:
        uninstall_plugin(name, dask_worker=worker)
    try:
        plugin = pickle.loads(data)
        setup = getattr(plugin, "setup", None)
        if setup is not None:
            result = setup(worker=worker)
            if inspect.isawaitable(result):
                asyncio.run(_awaited(result))
    except Exception as e:  # noqa: BLE001 - reported to the client that registered it
        import logging

        logging.getLogger("dask_rs").exception("plugin %s failed to set up on %s", name, worker.name)
        return {"status": "error", "exception": e, "text": f"{type(e).__name__}: {e}"}
    worker.plugins[name] = plugin
    worker._plugin_digests[name] = digest
    return {"status": "OK"}


def uninstall_plugin(name: str, dask_worker=None) -> bool:
    """Tear down and forget a plugin on this worker; False if it had none."""
    worker = dask_worker
    plugin = worker.plugins.pop(name, None)
    worker._plugin_digests.pop(name, None)
    if plugin is None:
        return False
    teardown = getattr(plugin, "teardown", None)
    if teardown is not None:
        try:
            result = teardown(worker=worker)
            if inspect.isawaitable(result):
                asyncio.run(_awaited(result))
        except Exception:  # noqa: BLE001 - logged; the plugin is gone either way
            import logging

            logging.getLogger("dask_rs").exception("plugin %s failed to tear down on %s", name, worker.name)
    return True


def _takes(func, name: str) -> bool:
    import inspect

    try:
        return name in inspect.signature(func).parameters
    except (TypeError, ValueError):
        return False


def run_function(worker, call):
    """Run a pickled ``(func, args, kwargs)`` outside any task (``Client.run``):
    ``dask_worker=`` is passed to a function that takes it, and a coroutine
    function is run to completion. Returns ``(True, pickled result)`` or
    ``(False, pickled exception)``."""
    try:
        func, args, kwargs = pickle.loads(call)
        if func not in (install_plugin, uninstall_plugin):
            # As in distributed, a worker's plugins are set up before anything runs there.
            with worker._setup_lock:
                pass
        if _takes(func, "dask_worker") and "dask_worker" not in kwargs:
            kwargs = {**kwargs, "dask_worker": worker}
        result = func(*args, **kwargs)
        if inspect.isawaitable(result):
            result = asyncio.run(_awaited(result))
        return (True, cloudpickle.dumps(result, protocol=5))
    except BaseException as e:  # noqa: BLE001 - the caller gets the exception
        return (False, dump_exception(e))


async def _awaited(awaitable):
    return await awaitable


_uploads: str | None = None


def install_uploaded_file(filename: str, data: bytes, load: bool = True):
    """Save an uploaded file where this process imports from and (re)load it."""
    import importlib
    import tempfile

    if os.path.basename(filename) != filename or not filename:
        raise ValueError(f"not a plain file name: {filename!r}")
    global _uploads
    if _uploads is None:
        # Private (0700) and unpredictable: it is on the import path, so a
        # directory another user could create first must not be used.
        _uploads = tempfile.mkdtemp(prefix="dask-rs-uploads-")
        import atexit
        import shutil

        atexit.register(shutil.rmtree, _uploads, True)
    directory = _uploads
    path = os.path.join(directory, filename)
    with open(path, "wb") as f:
        f.write(data)
    root, ext = os.path.splitext(filename)
    entry = path if ext in (".zip", ".egg", ".whl") else directory
    if entry not in sys.path:
        sys.path.insert(0, entry)
    importlib.invalidate_caches()
    if load and ext in (".py", ".zip", ".egg"):
        name = root.split("-")[0] if ext != ".py" else root
        if name in sys.modules:
            importlib.reload(sys.modules[name])
        else:
            importlib.import_module(name)
    return len(data)


def scheduler_address() -> str | None:
    """Address of the scheduler this process's worker joined (None outside workers)."""
    return _scheduler_address


def current_key():
    """Key of the task running on this thread, or None."""
    return getattr(_thread_state, "key", None)


def secede() -> None:
    """Leave the worker's thread pool for the rest of this task.

    Call it before waiting on tasks this task launched: the worker starts
    another thread in its place and the scheduler stops counting this task
    against the worker, so the launched tasks can run even on a worker with
    one thread. Raises ``ValueError`` outside a task.
    """
    if not _core.secede():
        raise ValueError("secede() must be called from inside a task running on a dask-rs worker")


def rejoin() -> None:
    """Take a place in the worker's thread pool again after `secede`."""
    if not _core.rejoin():
        raise ValueError("rejoin() must be called from inside a task running on a dask-rs worker")


def total_memory() -> int:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError):  # pragma: no cover
        return 0


def remove_spill_dirs(pid: int, local_directory: str | None = None) -> None:
    """Remove the spill directory of worker process ``pid`` after it died
    without cleaning up (SIGKILL, out of memory): its spilled results are of
    no use to anyone once the process is gone."""
    import glob
    import shutil
    import tempfile

    base = local_directory or tempfile.gettempdir()
    for d in glob.glob(os.path.join(base, f"dask-rs-spill-{int(pid)}-*")):
        shutil.rmtree(d, ignore_errors=True)


def format_resources(resources) -> str:
    """``{"GPU": 2}`` (or an already formatted ``"GPU=2"``) as ``"GPU=2"``."""
    if resources is None:
        return ""
    if isinstance(resources, str):
        return resources
    if not isinstance(resources, dict):
        raise TypeError(f"resources must be a dict like {{'GPU': 2}} or a string 'GPU=2', not {resources!r}")
    return ",".join(f"{name}={amount!r}" for name, amount in resources.items())


def start(scheduler: str, name: str | None = None, nthreads: int = 1, memory_limit=0,
          host: str = "127.0.0.1", timeout: float = 10.0, death_timeout: float = 60.0, resources=None,
          local_directory: str | None = None):
    """Start a worker in this process; returns its handle once registered.
    ``resources`` (``{"GPU": 2}`` or ``"GPU=2,MEM=10e9"``) are offered to
    tasks submitted with ``resources=``; spilled results go under
    ``local_directory`` (made if missing; default the system's temporary
    directory)."""
    global _scheduler_address
    _scheduler_address = scheduler
    if memory_limit == "auto":
        memory_limit = total_memory()
    name = name or f"worker-{uuid.uuid4().hex[:8]}"
    view = WorkerView(scheduler, name, int(nthreads), parse_bytes(memory_limit), resources, local_directory)
    handle = _core.start_worker(
        scheduler,
        name,
        int(nthreads),
        parse_bytes(memory_limit),
        host,
        functools.partial(execute, view),
        dumps,
        loads,
        functools.partial(run_function, view),
        timeout,
        death_timeout,
        format_resources(resources),
        local_directory or None,
    )
    view.address = handle.address
    view._handle = handle
    _views[handle.address] = view
    return handle


def _retire_self(scheduler: str, handle, attempts: int = 4, pause=(1.0, 5.0)) -> None:
    """Lifetime reached: ask the scheduler to retire this worker (its results
    are copied elsewhere, then the scheduler closes it). When the scheduler
    keeps it because no other worker can take its results (every worker
    reached its lifetime at once, as after a restart, or it is the last one),
    ask again after a random pause, so that workers retiring together
    spread out and newcomers can take the results; after ``attempts`` close
    anyway, as distributed does (results with a lineage are computed again)."""
    from .client import Client

    print(f"dask_rs worker: lifetime reached; retiring {handle.address}", flush=True)
    for attempt in range(attempts):
        try:
            with Client(scheduler, set_as_default=False, timeout=10) as c:
                retired = c.retire_workers([handle.address], timeout=120)
        except Exception as e:  # noqa: BLE001 - any failure ends in a plain close
            print(f"dask_rs worker: could not retire gracefully ({e}); closing", file=sys.stderr, flush=True)
            break
        if handle.address in retired:
            return
        if attempt + 1 == attempts:
            print("dask_rs worker: no other worker could take its results; closing", file=sys.stderr,
                  flush=True)
            break
        wait = random.uniform(*pause)
        print(f"dask_rs worker: kept by the scheduler (no other worker can take its results); "
              f"asking again in {wait:.1f} s", file=sys.stderr, flush=True)
        if handle.wait(wait):
            return
    handle.stop()


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m dask_rs worker", description="Run a dask-rs worker.")
    p.add_argument("scheduler", help="scheduler address, tcp://HOST:PORT or tls://HOST:PORT")
    p.add_argument("--nthreads", type=int, default=1, help="executor threads (default 1)")
    p.add_argument("--name", default=None, help="unique worker name (default: random)")
    p.add_argument("--memory-limit", default="auto", help="e.g. 4GiB, 500MB or 'auto' (default)")
    p.add_argument("--host", default=None,
                   help="interface for the data port (default: the one that reaches the scheduler)")
    p.add_argument("--connect-timeout", type=float, default=10.0, help="seconds to reach the scheduler")
    p.add_argument("--death-timeout", default="60s",
                   help="after losing the scheduler, keep reconnecting this long before closing "
                        "(0: close at once)")
    p.add_argument("--lifetime", default=os.environ.get("DASK_DISTRIBUTED__WORKER__LIFETIME__DURATION"),
                   help="retire gracefully (data moved to other workers) after this long, e.g. 55m")
    p.add_argument("--lifetime-stagger",
                   default=os.environ.get("DASK_DISTRIBUTED__WORKER__LIFETIME__STAGGER", "0s"),
                   help="randomise the lifetime by up to this much either way, so workers leave one by one")
    p.add_argument("--lifetime-restart", action="store_true",
                   help="after retiring at the end of its lifetime, exit so that the supervisor "
                        "(--nworkers) starts a fresh worker in its place")
    p.add_argument("--resources", default=os.environ.get("DASK_RS_WORKER_RESOURCES", ""),
                   help='abstract resources for tasks submitted with resources=, e.g. "GPU=2,MEM=10e9"')
    p.add_argument("--local-directory", default=os.environ.get("DASK_TEMPORARY_DIRECTORY") or None,
                   help="directory for spilled results, e.g. node-local scratch "
                        "(default: $DASK_TEMPORARY_DIRECTORY, else the system's temporary directory)")
    p.add_argument("--tls-ca-file", default=None, help="the cluster's CA certificate (PEM)")
    p.add_argument("--tls-cert", default=None, help="this worker's certificate (PEM)")
    p.add_argument("--tls-key", default=None,
                   help="this worker's private key (PEM; default: the certificate file)")
    p.add_argument("--nworkers", type=int, default=None,
                   help="run this many worker processes under a supervisor that restarts them")
    args = p.parse_args(argv)
    if bool(args.tls_ca_file) != bool(args.tls_cert):
        p.error("--tls-ca-file and --tls-cert go together")
    if args.tls_ca_file:
        # Through the environment, so that supervised worker processes get them too.
        os.environ["DASK_RS_TLS_CA_FILE"] = os.path.abspath(args.tls_ca_file)
        os.environ["DASK_RS_TLS_CERT"] = os.path.abspath(args.tls_cert)
        os.environ["DASK_RS_TLS_KEY"] = os.path.abspath(args.tls_key or args.tls_cert)
    if args.nthreads < 1:
        p.error("--nthreads must be at least 1")
    scheduler = args.scheduler if "://" in args.scheduler else f"tcp://{args.scheduler}"
    try:
        _core.parse_resources(args.resources)
    except ValueError as e:
        p.error(f"--resources: {e}")
    if args.host is None:
        args.host = route_host(scheduler)
    if args.nworkers is not None:
        if args.nworkers < 1:
            p.error("--nworkers must be at least 1")
        from ._supervisor import child_names, supervise

        child_argv = [
            args.scheduler,
            "--nthreads", str(args.nthreads),
            "--memory-limit", str(args.memory_limit),
            "--host", args.host,
            "--connect-timeout", str(args.connect_timeout),
            "--death-timeout", str(args.death_timeout),
            "--lifetime-stagger", str(args.lifetime_stagger),
            "--resources", args.resources,
        ]
        if args.lifetime:
            child_argv += ["--lifetime", str(args.lifetime)]
        if args.lifetime_restart:
            child_argv.append("--lifetime-restart")
        if args.local_directory:
            child_argv += ["--local-directory", args.local_directory]
        return supervise(child_argv, child_names(args.name, args.nworkers, os.getpid()), args.local_directory)
    try:
        memory_limit = args.memory_limit if args.memory_limit == "auto" else parse_bytes(args.memory_limit)
        lifetime = parse_timedelta(args.lifetime)
        stagger = parse_timedelta(args.lifetime_stagger) or 0.0
        death_timeout = parse_timedelta(args.death_timeout) or 0.0
    except ValueError as e:
        p.error(str(e))
    if lifetime is not None:
        lifetime = max(0.0, lifetime + random.uniform(-stagger, stagger))
    try:
        handle = start(scheduler, args.name, args.nthreads, memory_limit, args.host, args.connect_timeout,
                       death_timeout, args.resources, args.local_directory)
    except (OSError, ValueError) as e:
        print(f"dask_rs worker: error: {e}", file=sys.stderr)
        return 1
    print(f"Worker {args.name or ''} at {handle.address} joined {scheduler}".replace("  ", " "), flush=True)

    signalled = []

    def stop(signum, frame):
        signalled.append(signum)
        handle.stop()

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    deadline = None if lifetime is None else time.monotonic() + lifetime
    retired = False
    view = _views[handle.address]
    while not handle.wait(0.2):
        if deadline is not None and time.monotonic() >= deadline:
            deadline = None
            retired = True
            threading.Thread(target=_retire_self, args=(scheduler, handle), daemon=True).start()
        if view.restart_reason is not None:
            print(f"dask_rs worker: {view.restart_reason}; exiting to be restarted", flush=True)
            handle.stop()
            handle.wait(10)
            return RESTART_STATUS
    for name in list(view.plugins):
        uninstall_plugin(name, dask_worker=view)
    try:
        handle.result()
    except OSError as e:
        if "restart requested" in str(e):
            print("dask_rs worker: restart requested; exiting to be restarted", flush=True)
            return RESTART_STATUS
        print(f"dask_rs worker: {e}", file=sys.stderr)
        return 1
    if retired and args.lifetime_restart:
        print("dask_rs worker: lifetime over; exiting to be restarted", flush=True)
        return RESTART_STATUS
    if signalled:
        # Stopped from outside, not retired by the scheduler: the shell's
        # convention, so that a supervisor (or LocalCluster) restarts it.
        return 128 + signalled[0]
    return 0
