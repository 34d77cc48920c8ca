"""Coordination primitives kept on the scheduler: `Variable`, `Queue`,
`Lock`, `Event` and `Semaphore`, with distributed's constructors and methods.

Each object is a name plus a client; two objects with the same name (in
different clients, or inside tasks) are the same primitive. They pickle by
name, so they can be passed into tasks, where they use the worker's client.
Values may contain futures: the primitive holds them while it holds the value.
"""

from __future__ import annotations

import itertools
import uuid
from collections import deque

from .client import _dumps_with_futures, _loads_with_client, get_client
from .utils import parse_timedelta

__all__ = ["Event", "Lock", "Queue", "Semaphore", "Variable"]


def _timeout(timeout):
    t = parse_timedelta(timeout)
    if t is not None and t < 0:
        raise ValueError(f"timeout must be non-negative, got {timeout!r}")
    return t


class _Named:
    _prefix = ""

    def __init__(self, name=None, client=None):
        self.name = name or f"{type(self).__name__.lower()}-{uuid.uuid4().hex}"
        self._client = client

    @property
    def client(self):
        if self._client is None:
            self._client = get_client()
        return self._client

    def _call(self, op, **kwargs):
        return getattr(self.client._core, op)(self._prefix + self.name, **kwargs)

    def __reduce__(self):
        return (type(self), (self.name,))

    def __repr__(self):
        return f"<{type(self).__name__}: {self.name}>"


class Variable(_Named):
    """A named value any client or task can set and read (the latest wins)."""

    _prefix = "variable/"

    def set(self, value, timeout=None, **kwargs):
        keys: list = []
        payload = _dumps_with_futures(value, keys)
        self._call("variable_set", value=payload, keys=keys)

    def get(self, timeout=None, **kwargs):
        """The value, waiting up to ``timeout`` for one to be set."""
        items = self._call("variable_get", timeout=_timeout(timeout))
        return _loads_with_client(self.client, items[0][0])

    def delete(self):
        self._call("variable_delete")


class Queue(_Named):
    """A first-in first-out queue on the scheduler, for clients and tasks."""

    _prefix = "queue/"

    def __init__(self, name=None, client=None, maxsize=0):
        super().__init__(name, client)
        if maxsize < 0:
            raise ValueError("maxsize must be >= 0")
        self.maxsize = int(maxsize)

    def put(self, value, timeout=None, **kwargs):
        """Append ``value``, waiting up to ``timeout`` for room when full."""
        keys: list = []
        payload = _dumps_with_futures(value, keys)
        self._call("queue_put", value=payload, keys=keys, maxsize=self.maxsize, timeout=_timeout(timeout))

    def get(self, timeout=None, batch=False, **kwargs):
        """Take the oldest item, waiting up to ``timeout``. ``batch=True``
        takes every item there is (maybe none) at once; ``batch=n`` waits
        for ``n`` items and takes them."""
        if batch is True:
            n = 0
        elif batch is False:
            n = None
        else:
            n = int(batch)
            if n < 1:
                raise ValueError("batch must be True, False or a positive integer")
        items = self._call("queue_get", batch=n, timeout=_timeout(timeout))
        values = [_loads_with_client(self.client, data) for data, _ in items]
        return values if n is not None else values[0]

    def qsize(self, **kwargs) -> int:
        return self._call("queue_size")

    def __reduce__(self):
        return (type(self), (self.name, None, self.maxsize))


class Semaphore(_Named):
    """At most ``max_leases`` holders at a time, across the cluster.

    A client that disconnects gives its leases back.
    """

    _prefix = "semaphore/"

    def __init__(self, max_leases=1, name=None, register=True, scheduler_rpc=None, loop=None):
        super().__init__(name, None)
        if int(max_leases) < 1:
            raise ValueError("max_leases must be >= 1")
        self.max_leases = int(max_leases)
        self.id = uuid.uuid4().hex
        self._counter = itertools.count()
        self._leases: deque = deque()

    def acquire(self, timeout=None) -> bool:
        """Take a lease; False if none came free within ``timeout``."""
        lease = f"{self.id}-{next(self._counter)}"
        got = self._call("sem_acquire", lease=lease, max_leases=self.max_leases, timeout=_timeout(timeout))
        if got:
            self._leases.append(lease)
        return bool(got)

    def release(self) -> bool:
        """Give back the oldest lease this object holds."""
        if not self._leases:
            raise RuntimeError(f"Released too often: {self!r} holds no lease")
        self._call("sem_release", lease=self._leases.popleft())
        return True

    def get_value(self) -> int:
        """Leases held now, by anyone."""
        return self._call("sem_value")

    def __enter__(self):
        self.acquire()
        return self

    def __exit__(self, *exc):
        self.release()

    def __reduce__(self):
        return (type(self), (self.max_leases, self.name))


class Lock(Semaphore):
    """A cluster-wide mutual-exclusion lock (not re-entrant)."""

    _prefix = "lock/"

    def __init__(self, name=None, client=None, scheduler_rpc=None, loop=None):
        super().__init__(1, name)
        self._client = client

    def acquire(self, blocking=True, timeout=None) -> bool:
        if not blocking:
            if timeout is not None:
                raise ValueError("can't specify a timeout for a non-blocking call")
            timeout = 0
        return super().acquire(timeout)

    def release(self):
        if not self._leases:
            raise ValueError(f"Lock is not yet acquired: {self!r} does not hold it")
        return super().release()

    def locked(self) -> bool:
        return self.get_value() > 0

    def __reduce__(self):
        return (type(self), (self.name,))


class Event(_Named):
    """A cluster-wide flag that tasks and clients can wait on."""

    _prefix = "event/"

    def set(self):
        self._call("event_set")

    def clear(self):
        self._call("event_clear")

    def wait(self, timeout=None) -> bool:
        """True once set; False if ``timeout`` passed first."""
        return bool(self._call("event_wait", timeout=_timeout(timeout)))

    def is_set(self) -> bool:
        return bool(self._call("event_is_set"))
