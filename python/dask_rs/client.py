"""`Client` and `Future`: submit work to a dask-rs cluster and get results back.

Names, keywords and defaults follow `distributed.Client` so that a Dask user
changes only the import. The connection, key states and data transfer live in
the Rust core (`_core.ClientCore`); this module turns Python calls into tasks
and bytes back into Python objects.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import functools
import html
import inspect
import itertools
import pickle
import threading
import uuid
import weakref
from collections import defaultdict, namedtuple
from concurrent.futures import CancelledError
from typing import Iterable

from . import _core
from ._serialize import FunctionCache, dumps, dumps_args, dumps_call, dumps_graph_node
from .utils import close_at_exit, format_bytes, key_split, parse_timedelta, wire_key, without_gc

__all__ = [
    "Client",
    "KilledWorker",
    "Future",
    "as_completed",
    "wait",
    "default_client",
    "fire_and_forget",
    "get_client",
    "worker_client",
    "secede",
    "rejoin",
    "FIRST_COMPLETED",
    "ALL_COMPLETED",
]

FIRST_COMPLETED = "FIRST_COMPLETED"
ALL_COMPLETED = "ALL_COMPLETED"

_default_client: Client | None = None


def secede() -> None:
    """Leave the worker's thread pool for the rest of this task (see `worker_client`)."""
    from ._worker import secede as _secede

    _secede()


def rejoin() -> None:
    """Take a place in the worker's thread pool again after `secede`."""
    from ._worker import rejoin as _rejoin

    _rejoin()
_clients: weakref.WeakSet = close_at_exit()


_client_counter = itertools.count()


def _latest_running_client():
    """The most recently made client that is still open, as distributed
    falls back to when the default one closes."""
    running = [c for c in list(_clients) if getattr(c, "status", None) == "running"]
    return max(running, key=lambda c: c._made, default=None)


_current_client: contextvars.ContextVar = contextvars.ContextVar("dask_rs_current_client", default=None)


def default_client(c: Client | None = None) -> Client:
    """The client that `Future`s and `x.compute()` use when none is given:
    the one made current by ``with client.as_current():``, else the default."""
    if c is not None:
        return c
    current = _current_client.get()
    if current is not None and current.status == "running":
        return current
    if _default_client is not None and _default_client.status == "running":
        return _default_client
    latest = _latest_running_client()
    if latest is not None:
        return latest
    raise ValueError("No clients found. Start a client and point it to a scheduler: Client('tcp://...')")


_worker_client_lock = threading.Lock()


def get_client(address=None, timeout=None, resolve_address=True) -> Client:
    """The current client; inside a task on a worker process, a client of
    that worker's scheduler (made on first use and shared by its tasks)."""
    if address is None and _default_client is not None and _default_client.status == "running":
        return _default_client
    from . import _worker

    scheduler = address or _worker.scheduler_address()
    if scheduler is None:
        return default_client()
    with _worker_client_lock:
        c = _default_client
        if c is not None and c.status == "running" and c.scheduler_address == scheduler:
            return c
        return Client(scheduler, timeout=timeout or 10, name=f"worker-client-{uuid.uuid4().hex[:8]}")


@contextlib.contextmanager
def worker_client(timeout=None, separate_thread=True):
    """Inside a task: a client for launching tasks and waiting on them.

    With ``separate_thread`` (the default) the task secedes from the worker's
    thread pool while inside the block and rejoins after, so tasks that
    launch tasks do not deadlock even with one thread per worker::

        def fib(n):
            if n < 2:
                return n
            with worker_client() as c:
                a, b = c.submit(fib, n - 1), c.submit(fib, n - 2)
                return a.result() + b.result()
    """
    from . import _worker

    client = get_client(timeout=timeout)
    if separate_thread:
        _worker.secede()
    try:
        yield client
    finally:
        if separate_thread:
            _worker.rejoin()


def _graph_annotations(dsk) -> dict:
    """``dask.annotate`` annotations of an expression or HighLevelGraph, as
    ``{name: {key: value}}``; empty for a plain dict."""
    get = getattr(dsk, "__dask_annotations__", None)
    if get is not None:
        return dict(get() or {})
    layers = getattr(dsk, "layers", None)
    out: dict = {}
    if isinstance(layers, dict):
        for layer in layers.values():
            for name, value in (getattr(layer, "annotations", None) or {}).items():
                out.setdefault(name, {}).update({k: value(k) if callable(value) else value for k in layer})
    return out


def _is_future(obj) -> bool:
    return isinstance(obj, Future)


def _tokenize(*args, **kwargs) -> str:
    try:
        from dask.base import tokenize

        return tokenize(*args, **kwargs)
    except ImportError:  # pragma: no cover - dask is optional
        import hashlib

        import cloudpickle

        return hashlib.sha1(cloudpickle.dumps((args, kwargs))).hexdigest()


_func_tokens = FunctionCache()


def _func_token(func) -> str:
    """Token of a function, computed once per function object."""
    try:
        tok = _func_tokens.get(func)
    except TypeError:  # unhashable callable
        return _tokenize(func)
    if tok is None:
        tok = _tokenize(func)
        _func_tokens.put(func, tok)
    return tok


def _funcname(func) -> str:
    try:
        from dask.utils import funcname

        return funcname(func)
    except ImportError:  # pragma: no cover
        return getattr(func, "__name__", type(func).__name__)


class KilledWorker(Exception):
    """A task's workers died while running it more often than the
    scheduler's ``allowed_failures``."""


def _unpack_status(st):
    if st is None:
        return "lost"
    return {"pending": "pending", "finished": "finished", "error": "error", "cancelled": "cancelled"}[st[0]]


def _rebuild_exception(st):
    """Exception object (with the remote traceback) from an error status."""
    _, exc_b, tb_b, text = st
    exc = None
    if len(exc_b):
        try:
            exc = pickle.loads(exc_b)
        except Exception:
            exc = None
    if exc is None:
        exc = KilledWorker(text) if text.startswith("KilledWorker:") else RuntimeError(text)
    tb = None
    if len(tb_b):
        try:
            import tblib

            tb = tblib.Traceback.from_dict(pickle.loads(tb_b)).as_traceback()
        except Exception:
            tb = None
    return exc.with_traceback(tb) if tb is not None else exc


def _syncable(method):
    """A client method that, on an asynchronous client inside its event loop
    (or with ``asynchronous=True``), returns an awaitable instead of blocking,
    as distributed's methods do. The blocking work runs on the client's
    threads, so the event loop never waits on the network."""

    @functools.wraps(method)
    def wrapper(self, *args, asynchronous=None, **kwargs):
        if self._is_async(asynchronous):
            return self._in_thread(method, self, *args, **kwargs)
        return method(self, *args, **kwargs)

    return wrapper


# Futures a gather waits for and fetches at a time.
_GATHER_RUN = 4096


class Future:
    """A remotely running computation; mirrors `distributed.Future`."""

    __dask_future__ = True

    def __init__(self, key, client: Client | None = None, inform: bool = False):
        self.key = key
        self._wire = wire_key(key)
        self.client = default_client(client)
        self.client._inc_ref(self._wire)
        self._released = False
        if inform:
            self.client._core.want([self._wire])

    @classmethod
    def _held(cls, keys, client) -> list:
        """Futures of ``keys``, each a reference held on ``client`` (what
        ``Future(k, client)`` does, for a whole `map` at once)."""
        out = []
        refs = client._refcount
        new = cls.__new__
        with client._lock:
            for k in keys:
                f = new(cls)
                f.key = k
                f._wire = w = wire_key(k)
                f.client = client
                f._released = False
                refs[w] += 1
                out.append(f)
        return out

    # -- state --
    @property
    def status(self) -> str:
        """``pending``, ``no-worker`` (no current worker may run it: see
        `no_worker_reason`), ``finished``, ``error``, ``cancelled`` or ``lost``."""
        st = _unpack_status(self.client._status(self._wire))
        if st == "pending" and self.no_worker_reason() is not None:
            return "no-worker"
        return st

    def no_worker_reason(self):
        """Why no current worker can run this task (e.g. its ``workers=``
        name none of them), or None."""
        if self.client.status != "running":
            return None
        return self.client._core.no_worker_reason(self._wire)

    def done(self) -> bool:
        return self.status != "pending"

    def cancelled(self) -> bool:
        return self.status == "cancelled"

    # -- results --
    def result(self, timeout=None):
        """The value (raising the task's exception); awaitable on an
        asynchronous client."""
        if self.client.asynchronous:
            return self.client._wait_for(self._result_async(), timeout)
        return self.client._gather_futures([self], timeout=timeout)[0]

    async def _result_async(self):
        await self.client._done([self])
        return (await self.client._in_thread(self.client._gather_futures, [self]))[0]

    def exception(self, timeout=None):
        if self.client.asynchronous:
            return self.client._wait_for(self._exception_async(), timeout)
        return self._exception(timeout)

    async def _exception_async(self):
        await self.client._done([self])
        return self._exception(None)

    def _exception(self, timeout=None):
        self.client._wait_keys([self._wire], timeout)
        st = self.client._status(self._wire)
        if st is not None and st[0] == "error":
            return _rebuild_exception(st)
        return None

    def traceback(self, timeout=None):
        exc = self._exception(timeout)
        return exc.__traceback__ if exc is not None else None

    def cancel(self, **kwargs):
        """Cancel the task (awaitable on an asynchronous client)."""
        return self.client.cancel([self], **kwargs)

    def release(self):
        if not self._released:
            self._released = True
            self.client._dec_ref(self._wire)

    def add_done_callback(self, fn):
        """Call ``fn(future)`` from a background thread once the future is done."""
        self.client._add_done_callback(self, fn)

    # -- protocols --
    def __del__(self):
        try:
            self.release()
        except Exception:
            pass

    def __dask_tokenize__(self):
        return ("dask_rs.Future", self._wire)

    def __reduce__(self):
        return (_rebuild_future, (self.key,))

    def __repr__(self):
        return f"<Future: {self.status}, key: {self.key}>"

    def _repr_html_(self):
        color = {"finished": "green", "error": "red", "pending": "gray"}.get(self.status, "black")
        return (
            f"<strong>Future: {html.escape(key_split(self.key))}</strong> "
            f'<span style="color: {color}">status: {self.status}</span>, '
            f"key: {html.escape(str(self.key))}"
        )

    def __await__(self):
        """``await future``: its value, without blocking the event loop."""
        return self._result_async().__await__()


def _rebuild_future(key):
    return Future(key, default_client(), inform=True)


DoneAndNotDoneFutures = namedtuple("DoneAndNotDoneFutures", ["done", "not_done"])
_NO_DEFAULT = object()


def _dumps_with_futures(obj, keys: list) -> bytes:
    """Cloudpickle `obj`, collecting the keys of the futures inside it."""
    import io

    import cloudpickle

    class Collecting(cloudpickle.Pickler):
        def reducer_override(self, o):
            if isinstance(o, Future):
                keys.append(o._wire)
            return super().reducer_override(o)

    buf = io.BytesIO()
    Collecting(buf, protocol=5).dump(obj)
    return buf.getvalue()


_loads_lock = threading.Lock()


def _loads_with_client(client, data):
    """Unpickle ``data``, rebuilding the futures inside it for ``client``."""
    global _default_client
    with _loads_lock:
        previous, _default_client = _default_client, client
        try:
            return pickle.loads(data)
        finally:
            _default_client = previous


class _Datasets:
    """`client.datasets`: a mapping view of the published datasets."""

    def __init__(self, client):
        self._client = client

    def __getitem__(self, name):
        return self._client.get_dataset(name)

    def __setitem__(self, name, value):
        self._client.publish_dataset(value, name=name)

    def __delitem__(self, name):
        self._client.unpublish_dataset(name)

    def __contains__(self, name):
        return name in self._client.list_datasets()

    def __iter__(self):
        return iter(self._client.list_datasets())

    def __len__(self):
        return len(self._client.list_datasets())


def registry_dir() -> str:
    """Where ``dask-ctl up`` records clusters (``$XDG_STATE_HOME/dask-rs/clusters``)."""
    import os

    base = os.environ.get("XDG_STATE_HOME") or os.path.join(os.path.expanduser("~"), ".local", "state")
    return os.path.join(base, "dask-rs", "clusters")


def cluster_security(name: str):
    """The credentials of the cluster ``dask-ctl up`` registered as ``name``
    (None for one started with ``--insecure``)."""
    import os

    from .security import Security

    return Security.from_directory(os.path.join(registry_dir(), name))


def cluster_address(name: str) -> str:
    """The scheduler address of the cluster ``dask-ctl up`` registered as ``name``."""
    import json
    import os

    path = os.path.join(registry_dir(), name, "cluster.json")
    try:
        with open(path) as f:
            address = json.load(f).get("address")
    except FileNotFoundError:
        raise ValueError(
            f"{name!r} is neither an address (tcp://HOST:PORT) nor a cluster registered by dask-ctl "
            f"(nothing at {path}; see `dask-ctl list`)"
        ) from None
    if not address:
        raise ValueError(f"cluster {name!r} is still starting (no scheduler address yet)")
    return address


def _scheduler_info(info: dict) -> dict:
    """The core's cluster information in the shape of distributed's
    ``scheduler_info()``."""
    workers = {
        w["address"]: {
            "type": "Worker",
            "id": w["name"],
            "name": w["name"],
            "host": w["address"].split("://")[-1].rsplit(":", 1)[0],
            "nthreads": w["nthreads"],
            "memory_limit": w["memory_limit"],
            "pid": w["pid"],
            "resources": w["resources"],
            "metrics": {
                "managed_bytes": w["managed"],
                "memory": w["rss"],
                "cpu": w["cpu"],
                "spilled_bytes": w["spilled"],
                "executing": w["executing"],
                "ready": w["ready"],
                "in_memory": w["nkeys"],
                "bytes_in": w["bytes_in"],
                "bytes_out": w["bytes_out"],
            },
            "processing": w["processing"],
            "status": "closing_gracefully" if w["retiring"] else "running",
        }
        for w in info["workers"]
    }
    return {
        "type": "Scheduler",
        "id": info["address"],
        "address": info["address"],
        "workers": workers,
        "n_tasks": info["ntasks"],
        "n_clients": info["nclients"],
        "bytes_in": info["bytes_in"],
        "bytes_out": info["bytes_out"],
    }


def _wait_for_workers(core, n_workers: int, timeout=None) -> None:
    """Poll ``core`` (a ClientCore) until at least ``n_workers`` workers are connected."""
    import time

    deadline = None if timeout is None else time.monotonic() + parse_timedelta(timeout)
    while len(core.info()["workers"]) < n_workers:
        if deadline is not None and time.monotonic() > deadline:
            raise TimeoutError(f"fewer than {n_workers} workers after {timeout}")
        time.sleep(0.05)


class Client:
    """Connect to a dask-rs scheduler and run work on its workers.

    ``Client()`` starts a `LocalCluster`; ``Client("tcp://host:8786")``
    connects to a running scheduler; ``Client(cluster)`` to a cluster object.
    """

    _instances: Iterable = _clients

    def __init__(
        self,
        address=None,
        loop=None,
        timeout=10,
        set_as_default: bool = True,
        scheduler_file=None,
        security=None,
        asynchronous: bool = False,
        name: str | None = None,
        heartbeat_interval=None,
        serializers=None,
        deserializers=None,
        extensions=None,
        direct_to_workers=None,
        connection_limit=512,
        **kwargs,
    ):
        self._asynchronous = bool(asynchronous)
        self._timeout = parse_timedelta(timeout) or 10.0
        self._loop = None
        self._loop_thread = None
        self._pool = None
        self.status = "newly-created"
        self._refcount: dict = defaultdict(int)
        self._lock = threading.RLock()
        self._order = itertools.count()
        self._callbacks: dict = defaultdict(list)
        self._callback_thread = None
        self._dask_config = None
        self._set_as_default = set_as_default
        self.cluster = None
        self._own_cluster = False
        self._dashboard_link = None
        self._core = _ClosedCore("this Client has not started: `await` it (asynchronous=True)")
        self._made = next(_client_counter)
        self._plugins: set = set()
        start = functools.partial(self._start, address, scheduler_file, security, name, kwargs)
        if self._asynchronous:
            # Started by `await Client(asynchronous=True)` or `async with`, as
            # in distributed: connecting must not block the event loop.
            self._starting = start
            return
        self._starting = None
        start()

    def _start(self, address, scheduler_file, security, name, kwargs):
        from .security import check

        given = check(security)
        if scheduler_file is not None:
            import json

            with open(scheduler_file) as f:
                address = json.load(f)["address"]
        if address is None:
            from .cluster import LocalCluster

            self.cluster = LocalCluster(**kwargs)
            self._own_cluster = True
            address = self.cluster.scheduler_address
        elif hasattr(address, "scheduler_address"):
            self.cluster = address
            address = address.scheduler_address
            given = given or check(getattr(self.cluster, "security", None))
        elif kwargs:
            raise TypeError(f"unexpected keyword arguments {sorted(kwargs)} when connecting to an address")
        if not isinstance(address, str):
            raise TypeError(f"address must be a string or a cluster, got {type(address).__name__}")
        if "://" not in address and ":" not in address:
            name_ = address
            address = cluster_address(name_)
            if given is None:
                given = cluster_security(name_)
        if "://" not in address:
            address = f"tcp://{address}"
        self.id = name or f"Client-{uuid.uuid4()}"
        creds = given.core_kwargs() if given else {}
        self._core = _core.ClientCore(address, self.id, float(self._timeout), **creds)
        self.scheduler_address = address
        self.status = "running"
        _clients.add(self)
        if self._set_as_default:
            self._set_default()

    # -- asynchronous use --
    def __await__(self):
        """``client = await Client(asynchronous=True)``: connect, then the client."""
        return self._start_async().__await__()

    async def _start_async(self):
        if self._loop is None:
            self._loop = asyncio.get_running_loop()
        if self._starting is not None:
            start, self._starting = self._starting, None
            await self._in_thread(start)
        return self

    async def __aenter__(self):
        return await self._start_async()

    async def __aexit__(self, *exc):
        await self._in_thread(self._close)

    @property
    def asynchronous(self) -> bool:
        """True when called from inside this client's event loop: then its
        methods return awaitables (an asynchronous client in its loop, or a
        coroutine that `sync` runs)."""
        if self._loop is None:
            return False
        try:
            return asyncio.get_running_loop() is self._loop
        except RuntimeError:
            return False

    @property
    def loop(self):
        """The client's event loop (for a synchronous client, the one `sync`
        runs coroutines on, started on first use)."""
        return self._loop or self._background_loop()

    def _is_async(self, asynchronous) -> bool:
        return self.asynchronous if asynchronous is None else bool(asynchronous)

    def _executor(self):
        if self._pool is None:
            from concurrent.futures import ThreadPoolExecutor

            with self._lock:
                if self._pool is None:
                    self._pool = ThreadPoolExecutor(8, thread_name_prefix="dask-rs-client")
        return self._pool

    async def _in_thread(self, fn, *args, **kwargs):
        """Run blocking ``fn`` on the client's threads and await its result."""
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._executor(), functools.partial(fn, *args, **kwargs))

    @staticmethod
    async def _wait_for(coro, timeout):
        t = parse_timedelta(timeout)
        if t is None:
            return await coro
        try:
            return await asyncio.wait_for(coro, t)
        except asyncio.TimeoutError:
            raise TimeoutError(f"not done within {t} s") from None

    async def _done(self, futures, any=False):
        """Wait, without a thread, until every one (or with ``any`` one) of
        ``futures`` is done; woken by the client's done callbacks."""
        pending = {f._wire: f for f in futures if not f.done()}
        if not pending or (any and len(pending) < len({f._wire for f in futures})):
            return
        loop = asyncio.get_running_loop()
        waiter = loop.create_future()

        def mark(wire):
            pending.pop(wire, None)
            if (any or not pending) and not waiter.done():
                waiter.set_result(None)

        def on_done(fut):
            try:
                loop.call_soon_threadsafe(mark, fut._wire)
            except RuntimeError:  # the loop closed meanwhile
                pass

        for f in list(pending.values()):
            self._add_done_callback(f, on_done)
        await waiter

    def _background_loop(self):
        """The event loop `sync` runs coroutines on for a synchronous client:
        one daemon thread per client, started on first use."""
        with self._lock:
            if self._loop is None:
                loop = asyncio.new_event_loop()
                ready = threading.Event()

                def run():
                    asyncio.set_event_loop(loop)
                    loop.call_soon(ready.set)
                    loop.run_forever()

                self._loop_thread = threading.Thread(target=run, name="dask-rs-client-loop", daemon=True)
                self._loop_thread.start()
                ready.wait()
                self._loop = loop
            return self._loop

    def sync(self, func, *args, asynchronous=None, callback_timeout=None, **kwargs):
        """Call ``func(*args, **kwargs)`` (a coroutine function, or a plain
        one) on the client's event loop. Inside that loop (an asynchronous
        client) it returns the awaitable; elsewhere it blocks for the result.
        Inside ``func`` the client's methods are awaitable, as in distributed,
        which is what libraries such as ``xgboost.dask`` rely on."""
        timeout = parse_timedelta(callback_timeout)
        if self._is_async(asynchronous):
            result = func(*args, **kwargs)
            if timeout is not None and inspect.isawaitable(result):
                return self._wait_for(result, timeout)
            return result
        loop = self._loop or self._background_loop()
        if loop.is_closed() or not loop.is_running():
            raise RuntimeError("the client's event loop is not running (is the client closed?)")

        async def call():
            result = func(*args, **kwargs)
            if inspect.isawaitable(result):
                result = await result
            return result

        done = asyncio.run_coroutine_threadsafe(call(), loop)
        try:
            return done.result(timeout)
        except TimeoutError:
            done.cancel()
            raise TimeoutError(f"{getattr(func, '__name__', func)!r} not done within {timeout} s") from None

    # -- defaults and dask integration --
    def _set_default(self):
        global _default_client
        _default_client = self
        try:
            import dask

            self._dask_config = dask.config.set(
                {"scheduler": self.get, "dataframe.shuffle.method": "tasks"}
            )
        except ImportError:  # pragma: no cover - dask is optional
            self._dask_config = None

    @contextlib.contextmanager
    def as_current(self):
        """Within the block, this client is the current one (for futures,
        ``compute``, coordination primitives) in this thread or task; the
        client stays open afterwards."""
        token = _current_client.set(self)
        try:
            yield self
        finally:
            _current_client.reset(token)

    @classmethod
    def current(cls, allow_global=True):
        """The current client (see `as_current`); with ``allow_global`` also
        the default one. Raises ValueError when there is none."""
        c = _current_client.get()
        if c is not None and c.status == "running":
            return c
        if allow_global:
            return default_client()
        raise ValueError("No current client")

    # -- reference counting --
    def _inc_ref(self, wire: str):
        with self._lock:
            self._refcount[wire] += 1

    def _dec_ref(self, wire: str):
        with self._lock:
            self._refcount[wire] -= 1
            if self._refcount[wire] > 0:
                return
            del self._refcount[wire]
            self._callbacks.pop(wire, None)
            # Under the lock: a submit of the same key from another thread
            # then reaches the core after this release, not before it.
            if self.status == "running":
                self._core.release([wire])

    def _status(self, wire: str):
        if self.status != "running":
            return ("cancelled", "client is closed")
        return self._core.status(wire)

    def _wait_keys(self, wires, timeout=None, any=False) -> bool:

        t = parse_timedelta(timeout)
        if not self._core.wait(list(wires), t, any):
            if t is not None:
                self._timed_out(wires, t)
            return False
        return True

    def _timed_out(self, wires, t):
        why = next(filter(None, (self._core.no_worker_reason(w) for w in wires)), None)
        hint = f" ({why})" if why else ""
        raise TimeoutError(f"{len(wires)} futures not done within {t} s{hint}")

    # -- submitting work --
    def _next_order(self) -> int:
        return next(self._order)

    @staticmethod
    def _workers_arg(workers):
        if workers is None:
            return None
        if isinstance(workers, (str, int)):
            workers = [workers]
        return [str(w) for w in workers]

    @staticmethod
    def _resources_arg(resources):
        """``{"GPU": 1}`` as the core's ``[("GPU", 1.0)]``; bad input raises."""
        if not resources:
            return []
        if not isinstance(resources, dict):
            raise TypeError(f"resources= must be a dict like {{'GPU': 1}}, not {type(resources).__name__}")
        out = []
        for name, amount in resources.items():
            if not isinstance(amount, (int, float)) or isinstance(amount, bool):
                raise TypeError(f"resources={resources!r}: the amount of {name!r} must be a number")
            if not amount >= 0 or amount == float("inf"):
                raise ValueError(f"resources={resources!r}: the amount of {name!r} must be finite and >= 0")
            out.append((str(name), float(amount)))
        return out

    def submit(
        self,
        func,
        *args,
        key=None,
        workers=None,
        resources=None,
        retries=None,
        priority=0,
        fifo_timeout="100 ms",
        allow_other_workers=False,
        actor=False,
        actors=False,
        pure=True,
        **kwargs,
    ) -> Future:
        """Submit ``func(*args, **kwargs)``; returns a `Future`. With
        ``actor=True``, ``func`` is a class: the object is made on a worker
        and kept there, and the future's result is an `Actor` proxy."""
        if not callable(func):
            raise TypeError("First input to submit must be a callable function")
        if actor or actors:
            from .actors import create_actor

            return self.submit(create_actor, func, *args, key=key or f"{_funcname(func)}-{uuid.uuid4().hex}",
                               workers=workers, resources=resources, retries=retries, priority=priority,
                               allow_other_workers=allow_other_workers, pure=False, **kwargs)
        if key is None:
            if pure:
                key = f"{_funcname(func)}-{_tokenize(_func_token(func), kwargs, *args)}"
            else:
                key = f"{_funcname(func)}-{uuid.uuid4().hex}"
        wire = wire_key(key)
        with self._lock:
            if self._refcount.get(wire, 0) > 0:
                return Future(key, self)
        res = self._resources_arg(resources)
        spec, deps, fid, fb = self._dumps_call(func, args, kwargs)
        # Under the lock: another thread that finds this key known must also
        # find it in the core, and a release of it cannot slip in between.
        with self._lock:
            fut = Future(key, self)
            self._core.submit(
                [(wire, spec, deps, int(priority), self._next_order(), self._workers_arg(workers),
                  bool(allow_other_workers), int(retries or 0), res, fid)],
                [wire],
                [(fid, fb)],
            )
        return fut

    @staticmethod
    def _dumps_call(func, args, kwargs):
        try:
            return dumps_call(func, args, kwargs, _is_future)
        except Exception as e:
            raise TypeError(
                f"Could not serialize {_funcname(func)!r} or its arguments to send them to the "
                f"cluster: {type(e).__name__}: {e}"
            ) from e

    @without_gc
    def map(
        self,
        func,
        *iterables,
        key=None,
        workers=None,
        retries=None,
        resources=None,
        priority=0,
        allow_other_workers=False,
        fifo_timeout="100 ms",
        actor=False,
        actors=False,
        pure=True,
        batch_size=None,
        **kwargs,
    ) -> list:
        """Map ``func`` over iterables; returns a list of `Future`s."""
        if not callable(func):
            raise TypeError("First input to map must be a callable function")
        if actor or actors:
            from .actors import create_actor

            iterables = [list(it) for it in iterables]
            n = len(list(zip(*iterables))) if iterables else 0
            keys = key if isinstance(key, (list, tuple)) else [f"{_funcname(func)}-{uuid.uuid4().hex}"
                                                                for _ in range(n)]
            return self.map(create_actor, [func] * n, *iterables, key=list(keys), workers=workers,
                            retries=retries, resources=resources, priority=priority,
                            allow_other_workers=allow_other_workers, pure=False, **kwargs)
        if not iterables:
            raise TypeError("map needs at least one iterable")
        arg_lists = list(zip(*iterables))
        if isinstance(key, (list, tuple)):
            keys = list(key)
            if len(keys) != len(arg_lists):
                raise ValueError("key list must be as long as the inputs")
        elif pure:
            name = key or _funcname(func)
            ftok = _func_token(func)
            keys = [f"{name}-{_tokenize(ftok, kwargs, *a)}" for a in arg_lists]
        else:
            name = key or _funcname(func)
            uid = uuid.uuid4().hex
            keys = [f"{name}-{uid}-{i}" for i in range(len(arg_lists))]
        wl = self._workers_arg(workers)
        res = self._resources_arg(resources)
        seen = set()
        futures: list = []
        fid, fb = self._dumps_call(func, (), {})[2:]
        order = self._order
        prio, loose, retries = int(priority), bool(allow_other_workers), int(retries or 0)
        # Sent in batches (growing to 32,768 unless `batch_size` says), so the
        # cluster runs the first tasks while the client makes the rest.
        size = int(batch_size) if batch_size else 2048
        start = 0
        while start < len(keys):
            tasks = []
            for k, a in zip(keys[start:start + size], arg_lists[start:start + size]):
                wire = wire_key(k)
                if wire in seen:
                    continue
                seen.add(wire)
                try:
                    spec, deps = dumps_args(a, kwargs, _is_future)
                except Exception as e:
                    raise TypeError(
                        f"Could not serialize the arguments of {_funcname(func)!r} to send them to the "
                        f"cluster: {type(e).__name__}: {e}"
                    ) from e
                tasks.append((wire, spec, deps, prio, next(order), wl, loose, retries, res, fid))
            with self._lock:
                batch = Future._held(keys[start:start + size], self)
                self._core.submit(tasks, [f._wire for f in batch], [(fid, fb)])
            futures.extend(batch)
            start += size
            if not batch_size:
                size = min(size * 2, 32768)
        return futures

    # -- getting results --
    @without_gc
    def _gather_futures(self, futures, errors="raise", timeout=None):
        import time

        t = parse_timedelta(timeout)
        deadline = None if t is None else time.monotonic() + t
        results: dict = {}
        bad = set()
        seen = set()
        # In runs of futures, in order: the first results come over while
        # the cluster still computes the later ones.
        for i in range(0, len(futures), _GATHER_RUN):
            run = futures[i:i + _GATHER_RUN]
            left = None if deadline is None else max(0.0, deadline - time.monotonic())
            if not self._core.wait([f._wire for f in run], left, False):
                self._timed_out([f._wire for f in futures[i:]], t)
            by_worker = defaultdict(list)
            for f in run:
                st = self._status(f._wire)
                if st is None:
                    raise CancelledError(f"{f.key} was released")
                kind = st[0]
                if kind == "error":
                    if errors == "raise":
                        raise _rebuild_exception(st)
                    bad.add(f._wire)
                elif kind == "cancelled":
                    if errors == "raise":
                        raise CancelledError(f"{f.key}: {st[1]}")
                    bad.add(f._wire)
                elif f._wire not in seen:
                    seen.add(f._wire)
                    workers = st[2]
                    by_worker[workers[0] if workers else ""].append(f._wire)
            for addr, keys in by_worker.items():
                results.update(self._fetch(addr, keys))
        return [results[f._wire] for f in futures if f._wire not in bad]

    def _fetch(self, addr, keys) -> dict:
        """Values of ``keys`` (all finished), first asked of the worker at ``addr``.

        A holder that died or no longer has a key is not the end: the key is
        asked of its other holders, and a result whose only copies died is
        waited for while the scheduler computes it again from its lineage
        (as distributed does). Only a result that cannot be recomputed
        (scattered data) ends in an error, the one the scheduler reports."""
        import time

        out: dict = {}
        todo = {addr: list(keys)}
        dead: set = set()
        deadline = time.monotonic() + max(self._timeout, 60.0)
        while True:
            retry = []
            for a, ks in todo.items():
                items, missing = [], ks
                if a and a not in dead:
                    try:
                        items, missing = self._core.get_data(a, ks)
                    except _core.CommError:
                        dead.add(a)  # gone (retired or died): ask who holds the keys now
                for k, frames in items:
                    out[k] = pickle.loads(frames[0], buffers=frames[1:])
                retry.extend(missing)
            if not retry:
                return out
            if time.monotonic() > deadline:
                raise RuntimeError(f"could not get the data of {retry} from any worker")
            todo = defaultdict(list)
            unplaced = []
            who = self._core.who_has(retry)
            for k in retry:
                holders = [w for w in who.get(k, []) if w not in dead]
                if holders:
                    todo[holders[0]].append(k)
                else:
                    unplaced.append(k)
            if not unplaced:
                continue
            # Lost with its workers: the scheduler is computing it again (the
            # key is pending), or has not yet noticed the death (still listed).
            self._wait_keys(unplaced, max(0.0, deadline - time.monotonic()))
            for k in unplaced:
                st = self._status(k)
                if st is None:
                    raise CancelledError(f"{k} was released")
                if st[0] == "error":
                    raise _rebuild_exception(st)
                if st[0] == "cancelled":
                    raise CancelledError(f"{k}: {st[1]}")
                holders = [w for w in st[2] if w not in dead]
                if holders:
                    todo[holders[0]].append(k)
                else:
                    todo[""].append(k)
            if "" in todo:
                time.sleep(0.05)

    def gather(self, futures, errors="raise", direct=None, asynchronous=None):
        """Results of futures, in the same (nested) structure (awaitable on an
        asynchronous client)."""
        if self._is_async(asynchronous):
            return self._gather_async(futures, errors)
        return self._gather(futures, errors)

    async def _gather_async(self, futures, errors="raise"):
        flat: list = []
        _collect_futures(futures, flat)
        await self._done(flat)
        return await self._in_thread(self._gather, futures, errors)

    def _gather(self, futures, errors="raise"):
        flat: list = []
        _collect_futures(futures, flat)
        values = self._gather_futures(flat, errors=errors)
        if errors == "skip":
            ok = [f for f in flat if self._status(f._wire)[0] == "finished"]
        else:
            ok = flat
        by_wire = {f._wire: v for f, v in zip(ok, values)}
        del flat, ok
        return _pack_results(futures, by_wire)

    @_syncable
    def scatter(self, data, workers=None, broadcast=False, direct=None, hash=True, timeout=None):
        """Move local data to workers; returns futures in the same structure."""
        infos = self._core.info()["workers"]
        if workers is not None:
            wanted = set(self._workers_arg(workers))
            infos = [w for w in infos if w["name"] in wanted or w["address"] in wanted]
        if not infos:
            raise RuntimeError("no workers to scatter to")
        if isinstance(data, dict):
            items = list(data.items())
        elif isinstance(data, (list, tuple, set, frozenset)):
            items = [(None, x) for x in data]
        else:
            items = [(None, data)]
        keyed = []
        for k, v in items:
            if k is None:
                k = f"{type(v).__name__}-{_tokenize(v) if hash else uuid.uuid4().hex}"
            keyed.append((k, v))
        targets = [w["address"] for w in infos]
        groups = defaultdict(list)
        for i, (k, v) in enumerate(keyed):
            frames = dumps(v)
            dests = targets if broadcast else [targets[i % len(targets)]]
            for d in dests:
                groups[d].append((wire_key(k), frames))
        futures = {k: Future(k, self) for k, _ in keyed}
        for addr, its in groups.items():
            self._core.scatter(addr, its)
        if isinstance(data, dict):
            return futures
        out = [futures[k] for k, _ in keyed]
        if isinstance(data, (list, tuple, set, frozenset)):
            return type(data)(out) if not isinstance(data, (set, frozenset)) else out
        return out[0]

    @_syncable
    def cancel(self, futures, force=False, reason=None, msg=None):
        """Cancel futures (or the futures of persisted collections, or
        structures of them)."""
        self._core.cancel([f._wire for f in futures_of(futures)])

    # -- dask graphs and collections --
    @without_gc
    def _graph_to_futures(self, dsk, keys, workers=None, allow_other_workers=False, priority=0, retries=0,
                          resources=None):
        """Submit a graph; the arguments apply to every task, and ``dask.annotate``
        annotations (``resources``, ``workers``, ``allow_other_workers``, ``retries``,
        ``priority``) override them per task."""
        from dask._task_spec import DataNode, convert_legacy_graph

        annotations = _graph_annotations(dsk)
        if hasattr(dsk, "__dask_graph__"):
            dsk = dsk.__dask_graph__()
        dsk = dict(dsk)
        held = {k for k, v in dsk.items() if _is_future(v) and v._wire == wire_key(k)}
        converted = convert_legacy_graph(dsk)
        graph = {k: v for k, v in converted.items() if k not in held}
        wl = self._workers_arg(workers)
        res = self._resources_arg(resources)
        an_workers = annotations.get("workers", {})
        an_loose = annotations.get("allow_other_workers", {})
        an_res = annotations.get("resources", {})
        an_retries = annotations.get("retries", {})
        an_prio = annotations.get("priority", {})
        tasks = []
        shared = {}
        data = []
        for i, (k, node) in enumerate(graph.items()):
            try:
                spec, deps, fid, fb = dumps_graph_node(node)
            except Exception as e:
                raise TypeError(f"Could not serialize task {k!r}: {type(e).__name__}: {e}") from e
            if fid is not None:
                shared[fid] = fb
            if isinstance(node, DataNode):
                data.append(i)
            tasks.append(
                (wire_key(k), spec, [wire_key(d) for d in deps], int(an_prio.get(k, priority) or 0), 0,
                 self._workers_arg(an_workers[k]) if k in an_workers else wl,
                 bool(an_loose.get(k, allow_other_workers)), int(an_retries.get(k, retries) or 0),
                 self._resources_arg(an_res[k]) if k in an_res else res, fid)
            )
        # Ordered as dask.order would (in Rust); a graph with a cycle can
        # never run: RuntimeError now, as distributed does.
        orders = _core.order([t[0] for t in tasks], [t[2] for t in tasks], data)
        with self._lock:
            futures = {k: Future(k, self) for k in keys}
            self._core.submit(tasks, [wire_key(k) for k in keys], list(shared.items()), orders)
        return futures

    def get(self, dsk, keys, workers=None, allow_other_workers=None, resources=None, sync=True,
            asynchronous=None, direct=None, retries=None, priority=0, fifo_timeout="60s", actors=None,
            **kwargs):
        """Compute a dask graph (a dict, HighLevelGraph or expression) for ``keys``."""
        flat = list(_flatten(keys))
        futures = self._graph_to_futures(dsk, flat, workers, bool(allow_other_workers), priority, retries,
                                         resources)
        packed = _pack(keys, futures)
        if not sync:
            return packed
        if self._is_async(asynchronous):
            return self._get_async(packed, futures)
        try:
            return self._gather(packed)
        finally:
            for f in futures.values():
                f.release()

    async def _get_async(self, packed, futures):
        try:
            return await self._gather_async(packed)
        finally:
            for f in futures.values():
                f.release()

    def compute(self, collections, sync=False, optimize_graph=True, workers=None,
                allow_other_workers=False, resources=None, retries=0, priority=0, fifo_timeout="60s",
                actors=None, traverse=True, **kwargs):
        """Start computing dask collections; returns futures (or results with ``sync=True``)."""
        import dask
        from dask._expr import FinalizeCompute
        from dask.base import collections_to_expr
        from dask.core import flatten

        singleton = not isinstance(collections, (list, tuple, set, frozenset))
        if singleton:
            collections = [collections]
        if traverse:
            collections = [
                dask.delayed(a) if isinstance(a, (list, set, tuple, dict)) else a for a in collections
            ]
        variables = [a for a in collections if dask.is_dask_collection(a)]
        futures_dict = {}
        names: list = []
        if variables:
            expr = FinalizeCompute(collections_to_expr(variables, optimize_graph)).optimize()
            names = list(flatten(expr.__dask_keys__()))
            futures_dict = self._graph_to_futures(
                expr, names, workers, allow_other_workers, priority, retries, resources
            )
        out = []
        i = 0
        for a in collections:
            if dask.is_dask_collection(a):
                out.append(futures_dict[names[i]])
                i += 1
            else:
                out.append(a)
        if sync and self.asynchronous:
            return self._compute_async(out, singleton)
        if sync:
            out = self._gather(out)
        return out[0] if singleton else out

    async def _compute_async(self, out, singleton):
        out = await self._gather_async(out)
        return out[0] if singleton else out

    def persist(self, collections, optimize_graph=True, workers=None, allow_other_workers=None,
                resources=None, retries=None, priority=0, fifo_timeout="60s", actors=None, **kwargs):
        """Start computing collections and keep the results on the cluster."""
        from dask.base import collections_to_expr
        from dask.core import flatten

        singleton = not isinstance(collections, (list, tuple))
        if singleton:
            collections = [collections]
        expr = collections_to_expr(collections, optimize_graph).optimize()
        keys = expr.__dask_keys__()
        futures = self._graph_to_futures(expr, list(flatten(keys)), workers,
                                         bool(allow_other_workers), priority, retries, resources)
        post = [c.__dask_postpersist__() for c in collections]
        result = [func({k: futures[k] for k in flatten(ks)}, *args) for (func, args), ks in zip(post, keys)]
        return result[0] if singleton else result

    # -- retries, fire-and-forget, datasets --
    @_syncable
    def retry(self, futures):
        """Run erred futures (and the erred tasks they depend on) again."""
        self._core.retry([f._wire for f in futures_of(futures)])

    @_syncable
    def publish_dataset(self, *args, name=None, override=False, **kwargs):
        """Keep futures (or anything holding them) on the cluster under a name,
        for any client: ``publish_dataset(x, name="x")`` or ``publish_dataset(x=x)``."""
        if args:
            if name is None:
                raise ValueError("publish_dataset with positional data needs name=")
            if len(args) != 1:
                raise ValueError("publish one object per name")
            kwargs[name] = args[0]
        for n, data in kwargs.items():
            keys: list = []
            payload = _dumps_with_futures(data, keys)
            self._core.dataset("publish", str(n), keys, payload, bool(override))

    @_syncable
    def unpublish_dataset(self, name):
        self._core.dataset("unpublish", str(name))

    @_syncable
    def list_datasets(self):
        return tuple(self._core.dataset("list")[1])

    @_syncable
    def get_dataset(self, name, default=_NO_DEFAULT):
        """The object published under ``name``, with its futures held by this client."""
        try:
            data, _ = self._core.dataset("get", str(name))
        except KeyError:
            if default is _NO_DEFAULT:
                raise
            return default
        return _loads_with_client(self, data)

    @property
    def datasets(self):
        """Published datasets as a mutable mapping."""
        return _Datasets(self)

    # -- callbacks --
    def _add_done_callback(self, future, fn):
        with self._lock:
            self._callbacks[future._wire].append((future, fn))
            if self._callback_thread is None:
                self._core.watch_done()
                self._callback_thread = threading.Thread(
                    target=self._run_callbacks, name="dask-rs-callbacks", daemon=True
                )
                self._callback_thread.start()
        if future.done():
            self._fire([future._wire])

    def _run_callbacks(self):
        import time

        while self.status == "running":
            done = self._core.take_done(0.2)
            if done:
                self._fire(done)
            elif self._core.closed_reason() is not None:
                # The connection is gone for good: every waiter hears now
                # (and a result asked for then raises why).
                with self._lock:
                    waiting = list(self._callbacks)
                self._fire(waiting)
                time.sleep(0.2)

    def _fire(self, wires):
        for w in wires:
            with self._lock:
                cbs = self._callbacks.pop(w, [])
            for fut, fn in cbs:
                try:
                    fn(fut)
                except Exception as e:  # a callback's failure must not stop the others
                    import logging

                    logging.getLogger("dask_rs").exception("done callback failed: %s", e)

    # -- cluster information --
    def scheduler_info(self, n_workers: int = -1, **kwargs) -> dict:
        """The scheduler's identity and its workers, in distributed's shape."""
        return _scheduler_info(self._core.info())

    @_syncable
    def nthreads(self, workers=None) -> dict:
        info = self.scheduler_info()["workers"]
        return {a: w["nthreads"] for a, w in info.items() if workers is None or a in workers}

    ncores = nthreads

    @_syncable
    def who_has(self, futures=None, **kwargs) -> dict:
        """``{key: addresses holding it}`` for futures (or persisted
        collections, or structures of them); all this client holds by default."""
        if futures is None:
            with self._lock:
                wires = list(self._refcount)
        else:
            wires = [f._wire for f in futures_of(futures)]
        return {k: tuple(v) for k, v in self._core.who_has(wires).items()}

    def _resolve_workers(self, workers) -> list:
        """Addresses of the named workers (names or addresses); all when None."""
        info = self.scheduler_info()["workers"]
        if workers is None:
            return list(info)
        if isinstance(workers, (str, int)):
            workers = [workers]
        out = []
        for w in workers:
            w = str(w)
            addr = next((a for a, i in info.items() if w in (a, i["name"], a.removeprefix("tcp://"))), None)
            if addr is None:
                names = sorted(i["name"] for i in info.values())
                raise ValueError(f"no worker {w!r} in the cluster (workers: {names})")
            out.append(addr)
        return out

    @_syncable
    def run(self, function, *args, workers=None, wait=True, nanny=False, on_error="raise", **kwargs) -> dict:
        """Call ``function(*args, **kwargs)`` in every worker process (or those
        in ``workers``), outside any task; returns ``{address: result}``.

        ``on_error="raise"`` (default) re-raises the first exception,
        ``"return"`` puts exceptions in the result, ``"ignore"`` drops them.
        """
        if on_error not in ("raise", "return", "ignore"):
            raise ValueError(f"on_error must be 'raise', 'return' or 'ignore', not {on_error!r}")
        if nanny:
            raise ValueError("dask_rs workers have no separate nanny process to run functions in")
        import cloudpickle

        call = cloudpickle.dumps((function, args, kwargs), protocol=5)
        out = {}
        for addr in self._resolve_workers(workers):
            try:
                ok, data = self._core.run_on(addr, call)
                if ok:
                    out[addr] = pickle.loads(data)
                    continue
                try:
                    exc = pickle.loads(data)
                except Exception:
                    exc = RuntimeError(bytes(data).decode(errors="replace"))
            except _core.CommError as e:
                exc = e
            if on_error == "raise":
                raise exc
            if on_error == "return":
                out[addr] = exc
        return out

    # -- worker plugins --
    @_syncable
    def register_plugin(self, plugin, name=None, idempotent=None):
        """Set ``plugin`` up on every worker now and on every worker that
        joins or restarts later (the scheduler keeps it); returns
        ``{address: {"status": "OK"}}`` and raises the first set-up failure.
        A plugin registered again under the same name replaces the old one
        (torn down first); with ``idempotent=True`` it is kept instead."""
        import cloudpickle

        from . import _worker
        from .plugins import check_plugin, plugin_name

        check_plugin(plugin)
        name = name or plugin_name(plugin)
        if idempotent and name in self._plugins:
            return {}
        data = cloudpickle.dumps(plugin, protocol=5)
        # Kept first, then set up on the workers there: a worker that joins
        # in between gets it both ways, and sets it up once.
        self._core.register_plugin(name, cloudpickle.dumps((_worker.install_plugin, (name, data), {})))
        self._plugins.add(name)
        results = self.run(_worker.install_plugin, name, data)
        for r in results.values():
            if r.get("status") == "error":
                raise r["exception"]
        return results

    def register_worker_plugin(self, plugin=None, name=None, nanny=None, **kwargs):
        """Older name of `register_plugin` (``nanny=True`` is refused)."""
        if nanny:
            raise TypeError("nanny=True: dask_rs process workers have no nanny of their own; register a "
                            "WorkerPlugin (dask_rs.Environ and UploadDirectory are the built-in ones)")
        return self.register_plugin(plugin, name=name, **kwargs)

    @_syncable
    def unregister_worker_plugin(self, name, nanny=None):
        """Tear the plugin ``name`` down on every worker and forget it;
        ValueError if no worker has it."""
        from . import _worker

        self._core.unregister_plugin(str(name))
        self._plugins.discard(name)
        had = self.run(_worker.uninstall_plugin, str(name))
        if not any(had.values()):
            raise ValueError(f"The worker plugin {name!r} does not exist")
        return {a: {"status": "OK"} for a in had}

    @_syncable
    def upload_file(self, filename, load: bool = True) -> dict:
        """Copy a ``.py``, ``.zip``, ``.egg`` or ``.whl`` file to every worker's
        directory for uploaded files (on its import path) and, with ``load``,
        import it there, so tasks can use it. Workers that join later get it
        too (it is an `UploadFile` plugin)."""
        from .plugins import UploadFile

        return self.register_plugin(UploadFile(filename, load=load))

    @_syncable
    def restart(self, timeout=60, wait_for_workers: bool = True, **kwargs):
        """Forget every task and restart every worker process.

        Every future of every client is cancelled ("the cluster restarted").
        Workers must run under a supervisor (``--nworkers``, `LocalCluster`,
        ``dask-ctl``) to come back; with ``wait_for_workers`` this returns once
        each worker is back under its name, in a new process."""
        import time

        before = {w["name"]: w["pid"] for w in self.scheduler_info()["workers"].values()}
        self._core.restart()
        if not wait_for_workers:
            return
        deadline = time.monotonic() + (parse_timedelta(timeout) or 60)
        while True:
            now = {w["name"]: w["pid"] for w in self.scheduler_info()["workers"].values()}
            if all(n in now and now[n] != pid for n, pid in before.items()):
                return
            if time.monotonic() > deadline:
                missing = sorted(n for n, pid in before.items() if now.get(n) in (None, pid))
                raise TimeoutError(f"workers {missing} did not come back within {timeout} s of the restart "
                                   "(workers restart only under a supervisor)")
            time.sleep(0.05)

    @_syncable
    def replicate(self, futures, n=None, workers=None, branching_factor=2, timeout=60, **kwargs):
        """Copy the results of ``futures`` to more workers until ``n`` of them
        (default: every worker) hold each; with ``workers`` (names or
        addresses), until ``n`` of those (default: all of them) do. Copies
        go to the workers holding the least data. Returns once they do.
        Unlike distributed, replicas beyond ``n`` are not removed."""
        import time

        fs = futures_of(futures)
        if not fs:
            return
        among = set(self._resolve_workers(workers))
        want = len(among) if n is None else int(n)
        if want < 1:
            raise ValueError(f"n must be at least 1, got {n!r}")
        want = min(want, len(among))
        wires = list({f._wire for f in fs})
        self._wait_keys(wires, timeout)
        self._core.replicate(wires, want, sorted(among) if workers is not None else [])
        deadline = time.monotonic() + (parse_timedelta(timeout) or 60)
        while True:
            short = {k: v for k, v in self._core.who_has(wires).items() if len(among.intersection(v)) < want}
            if not short:
                return
            if time.monotonic() > deadline:
                raise TimeoutError(f"{len(short)} keys not on {want} workers within {timeout} s")
            time.sleep(0.02)

    def get_executor(self, **kwargs):
        """A `concurrent.futures.Executor` that runs calls on this cluster;
        ``kwargs`` (``pure``, ``workers``, ``retries``, ...) go to every submit."""
        from .executor import ClientExecutor

        return ClientExecutor(self, **kwargs)

    @_syncable
    def has_what(self, workers=None, **kwargs) -> dict:
        with self._lock:
            wires = list(self._refcount)
        out = {a: [] for a in self.scheduler_info()["workers"]}
        for k, holders in self._core.who_has(wires).items():
            for h in holders:
                out.setdefault(h, []).append(k)
        if workers is not None:
            out = {a: v for a, v in out.items() if a in workers}
        return {a: tuple(v) for a, v in out.items()}

    @_syncable
    def rebalance(self, futures=None, workers=None, timeout=60, **kwargs) -> dict:
        """Even out memory: move results (of ``futures``, or all) from workers
        holding more managed memory than the mean to workers holding less,
        among ``workers`` (names or addresses; default all). A moved result is
        copied first and freed on its old worker only once the copy arrived,
        so nothing is lost if a worker dies meanwhile; results a running task
        needs stay. Returns once the moves are done, with
        ``{"moved": keys, "bytes": n, "failed": keys not moved}``."""
        wires: list = []
        if futures is not None:
            fs = futures_of(futures)
            if not fs:
                return {"moved": 0, "bytes": 0, "failed": 0}
            wires = list({f._wire for f in fs})
            self._wait_keys(wires, timeout)
        if isinstance(workers, str):
            workers = [workers]
        names = [str(w) for w in workers or []]
        moved, nbytes, failed = self._core.rebalance(wires, names, parse_timedelta(timeout) or 60.0)
        return {"moved": moved, "bytes": nbytes, "failed": failed}

    @_syncable
    def retire_workers(self, workers=None, close_workers: bool = True, timeout=60, **kwargs) -> dict:
        """Retire workers gracefully: they get no new tasks, results only they
        hold are copied to other workers, then they close. ``workers`` are
        addresses or names (all workers when None, as in distributed). Returns
        ``{address: info}`` of the workers retired. As in distributed, a worker
        that cannot be retired (unknown, or no other worker can hold its data)
        is left out of the result and keeps running; the reason is logged as a
        warning (logger ``dask_rs``)."""
        info = self.scheduler_info()["workers"]
        if workers is None:
            workers = list(info)
        elif isinstance(workers, str):
            workers = [workers]
        by_name = {w["name"]: (a, w) for a, w in info.items()}
        retired, failed = self._core.retire_workers([str(w) for w in workers], parse_timedelta(timeout))
        import logging

        for n, why in failed:
            logging.getLogger("dask_rs").warning("cannot retire %s: %s; it keeps running", n, why)
        return {by_name[n][0]: by_name[n][1] for n in retired if n in by_name}

    @_syncable
    def get_task_stream(self, start=None, stop=None, count=None, plot=False, filename=None,
                        bokeh_resources=None):
        """Tasks that ended between ``start`` and ``stop`` (Unix times, or
        durations before now such as ``"60s"``), at most the last ``count``,
        as distributed's records: ``key``, ``worker``, ``thread``, ``status``
        and ``startstops`` (a ``transfer`` before the ``compute`` when inputs
        were fetched). From the scheduler's ring of recent tasks.

        With ``plot=True`` it returns ``(records, figure)``: the figure is the
        task stream drawn as SVG (shown in notebooks; ``.save(filename)``
        writes it as a self-contained HTML file); ``plot="save"`` also
        writes it to ``filename`` (default ``task-stream.html``)."""
        import time as _time

        def when(t):
            if t is None or isinstance(t, (int, float)):
                return t
            return _time.time() - parse_timedelta(t)

        records = [_distributed_record(r) for r in self._core.task_stream(when(start), when(stop), count)]
        if not plot:
            return records
        from .diagnostics import TaskStreamPlot

        ends = [s["stop"] for r in records for s in r["startstops"]]
        begins = [s["start"] for r in records for s in r["startstops"]]
        lo = when(start) if start is not None else (min(begins) if begins else _time.time())
        hi = when(stop) if stop is not None else (max(ends) if ends else _time.time())
        figure = TaskStreamPlot(_core.task_stream_svg(self.scheduler_address, lo, hi))
        if plot == "save":
            figure.save(filename or "task-stream.html")
        return records, figure

    @_syncable
    def wait_for_workers(self, n_workers: int, timeout=None):
        """Block until at least ``n_workers`` workers are connected."""
        _wait_for_workers(self._core, n_workers, timeout)

    def subscribe_events(self, interval: float = 0.1):
        """Receive scheduler event updates; read them with `events`."""
        self._core.subscribe(float(interval))

    def events(self, timeout: float = 1.0) -> list:
        """Event updates (task stream, task groups, workers) since the last call."""
        return self._core.take_events(float(timeout))

    # -- lifecycle --
    @property
    def dashboard_link(self):
        """The dashboard's ``/status`` page, when the scheduler serves one."""
        if self._dashboard_link is None:
            try:
                self._dashboard_link = self._core.info().get("dashboard") or ""
            except Exception:
                return None
        return self._dashboard_link or None

    def close(self, timeout=None):
        """Close the connection (and a cluster this client started); awaitable
        on an asynchronous client. Futures of a closed client are cancelled."""
        if self.asynchronous:
            return self._in_thread(self._close)
        self._close()

    def _close(self):
        global _default_client
        if self.status == "closed":
            return
        was = self.status
        self.status = "closed"
        self._starting = None
        if self._dask_config is not None:
            try:
                self._dask_config.__exit__(None, None, None)
            except Exception:
                pass
            self._dask_config = None
        if _default_client is self:
            _default_client = _latest_running_client()
        self._core = _ClosedCore()
        # Whoever waits on a future hears now (its status is "cancelled").
        with self._lock:
            waiting = list(self._callbacks)
        self._fire(waiting)
        if self._loop_thread is not None and self._loop is not None:
            self._loop.call_soon_threadsafe(self._loop.stop)
        if self._pool is not None:
            self._pool.shutdown(wait=False)
        if was != "newly-created" and self._own_cluster and self.cluster is not None:
            self.cluster.close()

    @_syncable
    def shutdown(self):
        """Close the client and shut the scheduler and its workers down."""
        try:
            self._core.shutdown_scheduler()
        except Exception:
            pass
        if self.cluster is not None:
            self.cluster.close()
        self._close()

    def __enter__(self):
        if self._starting is not None:
            raise RuntimeError("an asynchronous Client is entered with `async with`, not `with`")
        return self

    def __exit__(self, *exc):
        self._close()

    def __del__(self):
        try:
            if getattr(self, "status", "closed") == "running":
                self._close()
        except Exception:
            pass

    def _summary(self):
        try:
            ws = self._core.info()["workers"]
        except Exception:
            ws = []
        return len(ws), sum(w["nthreads"] for w in ws), sum(w["memory_limit"] for w in ws)

    def __repr__(self):
        if self.status != "running":
            return f"<Client: No scheduler connected ({self.status})>"
        n, t, m = self._summary()
        return f"<Client: {self.scheduler_address!r} processes={n} threads={t}, memory={format_bytes(m)}>"

    def _repr_html_(self):
        if self.status != "running":
            return "<b>Client</b>: closed"
        n, t, m = self._summary()
        return (
            "<div><h3>Client</h3><ul>"
            f"<li><b>Scheduler:</b> {html.escape(self.scheduler_address)}</li>"
            f"<li><b>Workers:</b> {n}</li><li><b>Threads:</b> {t}</li>"
            f"<li><b>Memory:</b> {format_bytes(m)}</li></ul></div>"
        )


class _ClosedCore:
    """Stands in for the core of a client that is closed (or not started)."""

    def __init__(self, why: str = "this Client is closed"):
        self._why = why

    def __getattr__(self, name):
        def closed(*args, **kwargs):
            if name in ("release",):
                return None
            if name == "closed_reason":
                return self._why
            raise RuntimeError(self._why)

        return closed


_SKIP = object()


def _collect_futures(x, out: list):
    """Append every Future inside nested lists/tuples/sets/dicts to `out`."""
    if isinstance(x, Future):
        out.append(x)
    elif isinstance(x, (list, tuple, set, frozenset)):
        for y in x:
            _collect_futures(y, out)
    elif isinstance(x, dict):
        for y in x.values():
            _collect_futures(y, out)


def _pack_results(x, by_wire: dict):
    """Rebuild `x` with each Future replaced by its result (skipped if absent)."""
    if isinstance(x, Future):
        return by_wire.get(x._wire, _SKIP)
    if isinstance(x, (list, tuple, set, frozenset)):
        items = [_pack_results(y, by_wire) for y in x]
        return type(x)(i for i in items if i is not _SKIP)
    if isinstance(x, dict):
        packed = ((k, _pack_results(y, by_wire)) for k, y in x.items())
        return {k: v for k, v in packed if v is not _SKIP}
    return x


def _flatten(x):
    if isinstance(x, list):
        for y in x:
            yield from _flatten(y)
    else:
        yield x


def _pack(keys, futures):
    if isinstance(keys, list):
        return [_pack(k, futures) for k in keys]
    return futures[keys]


# ---- module-level helpers ---------------------------------------------------


def fire_and_forget(obj):
    """Keep computing the futures in ``obj`` (futures, persisted collections,
    or structures of them) even once nothing references them."""
    futures = futures_of(obj)
    by_client = defaultdict(list)
    for f in futures:
        by_client[f.client].append(f._wire)
    for client, wires in by_client.items():
        client._core.fire_and_forget(wires)


def _distributed_record(r: dict) -> dict:
    """A task-stream record in distributed's shape."""
    startstops = []
    if r["transfer"] > 0:
        startstops.append({"action": "transfer", "start": r["start"] - r["transfer"], "stop": r["start"]})
    # A worker's spill to disk is a record of its own (group "disk-write").
    action = "disk-write" if r["group"] == "disk-write" else "compute"
    startstops.append({"action": action, "start": r["start"], "stop": r["stop"]})
    return {
        "key": r["key"],
        "name": r["group"],
        "worker": r["worker"],
        "thread": r["thread"],
        "status": "error" if r["erred"] else "OK",
        "startstops": tuple(startstops),
        "metadata": {},
    }


def futures_of(o) -> list:
    """The futures inside ``o``: a future, a persisted dask collection, or
    lists, tuples, sets and dicts of them (as distributed's ``futures_of``)."""
    out: list = []
    seen: set = set()
    stack = [o]
    while stack:
        x = stack.pop()
        if isinstance(x, Future):
            if x.key not in seen:
                seen.add(x.key)
                out.append(x)
        elif isinstance(x, (list, tuple, set, frozenset)):
            stack.extend(x)
        elif isinstance(x, dict):
            stack.extend(x.values())
        elif isinstance(getattr(x, "value", None), Future):  # a graph node holding a future
            stack.append(x.value)
        elif hasattr(x, "__dask_graph__"):
            graph = x.__dask_graph__()
            if graph is not None:
                stack.extend(graph.values())
    out.reverse()
    return out


def wait(fs, timeout=None, return_when=ALL_COMPLETED):
    """Wait until futures (or the futures of persisted collections) are
    done; returns ``(done, not_done)`` sets."""
    if isinstance(fs, Future):
        fs = [fs]
    fs = futures_of(fs)
    if not fs:
        return DoneAndNotDoneFutures(set(), set())
    client = fs[0].client
    any_ = return_when == FIRST_COMPLETED
    if client.asynchronous:
        return client._wait_for(_wait_async(client, fs, any_), timeout)

    t = parse_timedelta(timeout)
    ok = client._core.wait([f._wire for f in fs], t, any_)
    if not ok and t is not None:
        raise TimeoutError(f"futures not done within {t} s")
    done = {f for f in fs if f.done()}
    return DoneAndNotDoneFutures(done, set(fs) - done)


async def _wait_async(client, fs, any_):
    await client._done(fs, any=any_)
    done = {f for f in fs if f.done()}
    return DoneAndNotDoneFutures(done, set(fs) - done)


class as_completed:
    """Iterate over futures in the order they finish.

    ``as_completed(futures, with_results=False, raise_errors=True)``; more
    futures may be added while iterating with `add`.
    """

    def __init__(self, futures=None, loop=None, with_results=False, raise_errors=True, timeout=None):
        self._pending: dict = {}
        self._ready: list = []
        self.with_results = with_results
        self.raise_errors = raise_errors
        self._timeout = timeout
        self._lock = threading.Lock()
        for f in futures or ():
            self.add(f)

    def add(self, future: Future):
        with self._lock:
            self._pending[future._wire] = future

    def update(self, futures):
        for f in futures:
            self.add(f)

    def count(self) -> int:
        return len(self._pending) + len(self._ready)

    def is_empty(self) -> bool:
        return self.count() == 0

    def __len__(self):
        return self.count()

    def __iter__(self):
        return self

    def _fill(self, block=True):
        with self._lock:
            pending = dict(self._pending)
        if not pending:
            return
        client = next(iter(pending.values())).client
        if block:

            t = parse_timedelta(self._timeout)
            if not client._core.wait(list(pending), t, True) and t is not None:
                raise TimeoutError("as_completed timed out")
        with self._lock:
            for w, f in list(self._pending.items()):
                if f.done():
                    self._ready.append(f)
                    del self._pending[w]

    def _emit(self, f):
        if not self.with_results:
            return f
        try:
            return f, f.result()
        except Exception:
            if self.raise_errors:
                raise
            return f, f.exception()

    def __next__(self):
        if not self._ready:
            if not self._pending:
                raise StopIteration
            self._fill()
        return self._emit(self._ready.pop(0))

    # -- asynchronous iteration: ``async for future in as_completed(fs)`` --
    def __aiter__(self):
        return self

    async def __anext__(self):
        if not self._ready:
            with self._lock:
                pending = list(self._pending.values())
            if not pending:
                raise StopAsyncIteration
            await self._wait_for(pending[0].client._done(pending, any=True))
            self._fill(block=False)
        f = self._ready.pop(0)
        if not self.with_results:
            return f
        try:
            return f, await f
        except Exception:
            if self.raise_errors:
                raise
            return f, f._exception()

    async def _wait_for(self, coro):
        t = parse_timedelta(self._timeout)
        if t is None:
            return await coro
        try:
            return await asyncio.wait_for(coro, t)
        except asyncio.TimeoutError:
            raise TimeoutError("as_completed timed out") from None

    def next_batch(self, block=True) -> list:
        if not self._ready:
            self._fill(block)
        out, self._ready = self._ready, []
        return [self._emit(f) for f in out]

    def batches(self):
        while not self.is_empty():
            yield self.next_batch()

    def clear(self):
        with self._lock:
            self._pending.clear()
            self._ready.clear()

