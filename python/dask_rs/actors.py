"""Actors, as distributed's: a stateful object living on one worker.

``client.submit(Class, *args, actor=True)`` runs a task that makes the
object on a worker and keeps it there; the future's result is an `Actor`,
a proxy. Calling a method sends the call straight to that worker (not
through the scheduler) and returns an `ActorFuture`; reading an attribute
returns its value. Calls run in order, one at a time, on a thread of the
actor's own. The object lives while its future or a proxy is held (a
proxy holds the key): when the scheduler frees it, the worker drops the
object. If its
worker dies, calls fail with an error naming the actor and the worker.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import inspect
import threading
import weakref

__all__ = ["Actor", "ActorFuture"]

# On a worker: key -> the handle its store holds (the store frees it when
# the scheduler frees the key; then the object goes).
_handles: weakref.WeakValueDictionary = weakref.WeakValueDictionary()


class _ActorHandle:
    """The task result a worker stores for an actor: the object itself, and
    its thread. Sent anywhere else (to the client, to another task), it
    becomes an `Actor` proxy."""

    def __init__(self, instance, key: str, address: str):
        self.instance = instance
        self.key = key
        self.address = address
        self.thread = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix=f"actor-{key[:20]}")
        _handles[key] = self

    def __reduce__(self):
        return (Actor, (type(self.instance), self.key, self.address))

    def __del__(self):
        try:
            self.thread.shutdown(wait=False)
        except Exception:  # noqa: BLE001 - interpreter shutting down
            pass


def create_actor(cls, *args, **kwargs):
    """The task behind ``submit(cls, ..., actor=True)``: make the object on
    this worker and keep it."""
    import time

    from ._worker import _thread_state, get_worker

    worker = get_worker()
    deadline = time.monotonic() + 5
    while worker.address is None and time.monotonic() < deadline:  # a task right after registration
        time.sleep(0.001)
    return _ActorHandle(cls(*args, **kwargs), _thread_state.key, worker.address)


def _handle(key: str) -> _ActorHandle:
    h = _handles.get(key)
    if h is None:
        raise ValueError(f"the actor {key} is not on this worker any more (released, or its worker "
                         "restarted)")
    return h


def actor_call(key: str, method: str, args, kwargs):
    """On the actor's worker: run one method call on the actor's thread."""
    h = _handle(key)

    def call():
        result = getattr(h.instance, method)(*args, **kwargs)
        if inspect.isawaitable(result):
            result = asyncio.run(_awaited(result))
        return result

    return h.thread.submit(call).result()


def actor_getattr(key: str, name: str):
    """On the actor's worker: read an attribute, in turn with the calls."""
    h = _handle(key)
    return h.thread.submit(getattr, h.instance, name).result()


async def _awaited(awaitable):
    return await awaitable


class ActorFuture:
    """The result of an actor method call: ``.result(timeout)``, ``.done()``,
    ``.exception()``, or ``await``."""

    def __init__(self, future: concurrent.futures.Future, what: str):
        self._future = future
        self._what = what

    def result(self, timeout=None):
        return self._future.result(timeout)

    def exception(self, timeout=None):
        return self._future.exception(timeout)

    def done(self) -> bool:
        return self._future.done()

    def __await__(self):
        return asyncio.wrap_future(self._future).__await__()

    def __repr__(self):
        state = "finished" if self.done() else "pending"
        return f"<ActorFuture {self._what}: {state}>"


class Actor:
    """A proxy for an object living on a worker (see the module docstring)."""

    def __init__(self, cls, key: str, address: str):
        self._cls = cls
        self.key = key
        self._address = address
        self._lock = threading.Lock()
        self._sender = None
        self._client = None
        # The proxy holds the actor's key, as distributed's does: the object
        # lives while a proxy (or its future) does.
        self._future = None
        try:
            from .client import Future

            self._future = Future(key, self._get_client(), inform=True)
        except Exception:  # noqa: BLE001 - no client here: the proxy only calls
            pass

    def __reduce__(self):
        return (Actor, (self._cls, self.key, self._address))

    def _get_client(self):
        if self._client is None:
            from .client import get_client

            self._client = get_client()
        return self._client

    def _send(self, fn, *args):
        """Run ``fn(*args)`` on the actor's worker, after the calls before it."""
        import cloudpickle

        with self._lock:
            if self._sender is None:
                # One sender per proxy: its calls reach the worker in order.
                self._sender = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="actor-calls")
        client = self._get_client()
        call = cloudpickle.dumps((fn, args, {}), protocol=5)

        def send():
            import pickle

            from . import _core

            try:
                ok, data = client._core.run_on(self._address, call)
            except _core.CommError as e:
                raise RuntimeError(f"the actor {self.key} is gone: its worker {self._address} cannot be "
                                   f"reached ({e})") from None
            value = pickle.loads(data)
            if not ok:
                raise value
            return value

        return self._sender.submit(send)

    def __getattr__(self, name):
        if name.startswith("_"):
            raise AttributeError(name)
        attr = getattr(self._cls, name, None)
        if callable(attr):
            def method(*args, **kwargs):
                return ActorFuture(self._send(actor_call, self.key, name, args, kwargs), f"{name}()")

            method.__name__ = name
            return method
        return self._send(actor_getattr, self.key, name).result()

    def __dir__(self):
        return sorted(set(dir(self._cls)) | {"key"})

    def __repr__(self):
        return f"<Actor: {self._cls.__name__}, key={self.key}>"
