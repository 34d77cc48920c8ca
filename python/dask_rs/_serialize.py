"""How values and tasks become bytes.

Values are pickled with protocol 5; large buffers (numpy arrays, bytes) are
taken out of band and travel as their own frames, so the Rust transport
sends them without copying. Functions and arguments are cloudpickled, with
futures replaced by references to dependencies (`persistent_id`) so the
worker puts the dependency values straight in while unpickling. A call's
function travels apart from its arguments, as a shared blob named by a hash
of its bytes: once per graph to the scheduler, once per worker from there.
"""

from __future__ import annotations

import io
import pickle
import sys
from collections import OrderedDict

import cloudpickle

_sizeof = None
# dask's sizeof answers sys.getsizeof for these too; skipping its dispatch
# (and importing dask only when a task returns something else) keeps tiny
# tasks cheap and idle workers small.
_PLAIN = (int, float, bool, type(None), str, bytes)


def sizeof(obj) -> int:
    """Best estimate of the memory `obj` holds."""
    global _sizeof
    if type(obj) in _PLAIN:
        return sys.getsizeof(obj)
    if _sizeof is None:
        try:  # dask's sizeof knows numpy, pandas and friends
            from dask.sizeof import sizeof as _sizeof
        except Exception:  # pragma: no cover - dask is optional
            _sizeof = False
    if _sizeof:
        try:
            return int(_sizeof(obj))
        except Exception:
            pass
    nbytes = getattr(obj, "nbytes", None)
    if isinstance(nbytes, int):
        return nbytes
    return sys.getsizeof(obj)


def dumps(obj) -> list:
    """Serialize a value into frames: ``[pickle, buffer, ...]``."""
    buffers: list = []
    try:
        header = pickle.dumps(obj, protocol=5, buffer_callback=buffers.append)
    except Exception:
        buffers = []
        header = cloudpickle.dumps(obj, protocol=5, buffer_callback=buffers.append)
    try:
        return [header] + [b.raw() for b in buffers]
    except BufferError:  # a non-contiguous buffer: keep it in band
        return [cloudpickle.dumps(obj, protocol=5)]


def loads(frames):
    """Inverse of :func:`dumps`; returns ``(value, nbytes)``."""
    obj = pickle.loads(frames[0], buffers=frames[1:])
    return obj, sizeof(obj)


# ---- tasks ----------------------------------------------------------------

CALL = 1  # (CALL, args, kwargs): shared_function(*args, **kwargs)
GRAPH = 2  # (GRAPH, node_bytes, dep_keys): a dask task-spec node

class _DepPickler(cloudpickle.Pickler):
    """Cloudpickles arguments, replacing futures by dependency indices."""

    def __init__(self, file, is_future, deps: list):
        super().__init__(file, protocol=5)
        self._is_future = is_future
        self._deps = deps
        self._index: dict = {}

    def persistent_id(self, obj):
        if self._is_future(obj):
            k = obj._wire
            if k not in self._index:
                self._index[k] = len(self._deps)
                self._deps.append(k)
            return ("dep", self._index[k])
        return None


class _DepUnpickler(pickle.Unpickler):
    def __init__(self, file, values):
        super().__init__(file)
        self._values = values

    def persistent_load(self, pid):
        return self._values[pid[1]]


class FunctionCache:
    """Serialized functions by identity (client) or by bytes (worker)."""

    def __init__(self, size: int = 256):
        self._d: OrderedDict = OrderedDict()
        self._size = size

    def get(self, k):
        v = self._d.get(k)
        if v is not None:
            self._d.move_to_end(k)
        return v

    def put(self, k, v):
        self._d[k] = v
        if len(self._d) > self._size:
            self._d.popitem(last=False)


_func_bytes = FunctionCache()


def _blake2b():
    # hashlib's own BLAKE2, without the OpenSSL that `import hashlib` loads
    # (4 MiB in every process that imports this module, workers included).
    try:
        from _blake2 import blake2b
    except ImportError:  # pragma: no cover - CPython always builds it
        from hashlib import blake2b
    return blake2b


def dumps_function(func) -> tuple[int, bytes]:
    """``(id, bytes)`` of ``func``: cloudpickled once per function object, the
    id a hash of the bytes (so equal functions share one blob anywhere)."""
    try:
        b = _func_bytes.get(func)
    except TypeError:  # unhashable callable
        b = None
    if b is None:
        fb = cloudpickle.dumps(func, protocol=5)
        b = (int.from_bytes(_blake2b()(fb, digest_size=8).digest(), "little"), fb)
        try:
            _func_bytes.put(func, b)
        except TypeError:
            pass
    return b


_PLAIN_TYPES = frozenset(_PLAIN)


def dumps_call(func, args, kwargs, is_future) -> tuple[bytes, list, int, bytes]:
    """Serialize ``func(*args, **kwargs)``; returns ``(run_spec, dep_keys,
    function_id, function_bytes)``. The function travels apart from the
    spec, once per graph and once per worker (a shared blob)."""
    fid, fb = dumps_function(func)
    deps: list = []
    for a in args:
        if type(a) not in _PLAIN_TYPES:
            break
    else:
        if not kwargs:  # plain values (a map over numbers): no futures inside
            return pickle.dumps((CALL, args, None), protocol=5), deps, fid, fb
    buf = io.BytesIO()
    _DepPickler(buf, is_future, deps).dump((CALL, args, kwargs))
    return buf.getvalue(), deps, fid, fb


def dumps_graph_node(node, dep_keys) -> bytes:
    return cloudpickle.dumps((GRAPH, node, list(dep_keys)), protocol=5)


_func_cache = FunctionCache()


def run_task(run_spec, values, shared=None):
    """Run a task given its spec, its dependencies' values (in order) and,
    for a call, its shared function blob ``(id, bytes)``."""
    if values:
        spec = _DepUnpickler(io.BytesIO(run_spec), values).load()
    else:
        spec = pickle.loads(run_spec)
    kind = spec[0]
    if kind == CALL:
        if shared is None:
            raise ValueError("a call task came without its function")
        fid, fb = shared
        func = _func_cache.get(fid)
        if func is None:
            if not len(fb):
                raise RuntimeError(f"the task's function (shared blob {fid:#x}) never reached this worker")
            func = pickle.loads(fb)
            _func_cache.put(fid, func)
        _, args, kwargs = spec
        return func(*args, **kwargs) if kwargs else func(*args)
    if kind == GRAPH:
        _, node, dep_keys = spec
        return node(dict(zip(dep_keys, values)))
    raise ValueError(f"unknown task kind {kind!r}")
