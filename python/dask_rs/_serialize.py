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

import functools
import io
import pickle
import sys
import threading
import types
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
#
# A task's spec is one byte saying its kind, then a pickle:
#   CALL       (args, kwargs, slots): plain pickle; the dependency values go
#              into args at the positions `slots` lists ((position, index)).
#   CALL_DEPS  (args, kwargs): futures anywhere inside, pickled as persistent
#              ids that the worker replaces by the dependency values.
#   GRAPH      (node, dep_keys): a dask task-spec node; its functions are
#              calls of `_lifted(i)`, the i-th of its shared blob (a tuple).
# A call's function, and a node's functions, travel apart from the spec as
# the task's shared blob: once per graph to the scheduler, once per worker.

CALL = 1
CALL_DEPS = 2
GRAPH = 3


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
    """``(id, bytes)`` of ``func`` (or of a graph node's tuple of functions):
    cloudpickled once per object, the id a hash of the bytes (so equal
    functions share one blob anywhere)."""
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


def _slotted(args, kwargs, is_dep, dep_key):
    """``(args, slots, deps)`` when every argument is a plain value or a
    dependency and every keyword argument a plain value, else None. The
    dependencies' places in ``args`` are None; ``slots`` says which."""
    if kwargs:
        for v in kwargs.values():
            if type(v) not in _PLAIN_TYPES:
                return None
    slots = []
    deps: list = []
    index: dict = {}
    out = None
    for pos, a in enumerate(args):
        if type(a) in _PLAIN_TYPES:
            continue
        if not is_dep(a):
            return None
        k = dep_key(a)
        i = index.get(k)
        if i is None:
            i = index[k] = len(deps)
            deps.append(k)
        slots.append((pos, i))
        if out is None:
            out = list(args)
        out[pos] = None
    return (args if out is None else tuple(out)), tuple(slots), deps


_CALL, _CALL_DEPS, _GRAPH = bytes([CALL]), bytes([CALL_DEPS]), bytes([GRAPH])


def _wire_of(future):
    return future._wire


def dumps_args(args, kwargs, is_future) -> tuple[bytes, list]:
    """The spec of a call of a function (sent apart) with ``args`` and
    ``kwargs``; returns ``(run_spec, dep_keys)``."""
    s = _slotted(args, kwargs, is_future, _wire_of)
    if s is not None:
        args, slots, deps = s
        return _CALL + pickle.dumps((args, kwargs or None, slots), protocol=5), deps
    deps = []
    buf = io.BytesIO()
    buf.write(_CALL_DEPS)
    _DepPickler(buf, is_future, deps).dump((args, kwargs))
    return buf.getvalue(), deps


def dumps_call(func, args, kwargs, is_future) -> tuple[bytes, list, int, bytes]:
    """Serialize ``func(*args, **kwargs)``; returns ``(run_spec, dep_keys,
    function_id, function_bytes)``. The function travels apart from the
    spec, once per graph and once per worker (a shared blob)."""
    fid, fb = dumps_function(func)
    spec, deps = dumps_args(args, kwargs, is_future)
    return spec, deps, fid, fb


_REFS: frozenset = frozenset()
_Alias = _Task = None


def _task_types():
    global _REFS, _Alias, _Task
    if _Task is None:
        from dask._task_spec import Alias, Task, TaskRef
        from toolz import curry

        _REFS, _Alias, _Task = frozenset((Alias, TaskRef)), Alias, Task
        _LIFTED.add(curry)


def _is_ref(a) -> bool:
    return type(a) in _REFS


def _ref_target(a):
    return a.target if type(a) is _Alias else a.key


class _FunctionLifter(cloudpickle.Pickler):
    """Cloudpickles a graph node with its functions taken out (each pickled
    as a call of `_lifted` with its index into `functions`), so they travel
    as the task's shared blob. Only objects cloudpickle reduces itself pass
    through here, far fewer than a `persistent_id` would see."""

    def __init__(self, file):
        super().__init__(file, protocol=5)
        self.functions: list = []
        self._index: dict = {}

    def reducer_override(self, obj):
        if type(obj) in _LIFTED and obj is not _lifted:
            i = self._index.get(id(obj))
            if i is None:
                i = self._index[id(obj)] = len(self.functions)
                self.functions.append(obj)
            return _lifted, (i,)
        return super().reducer_override(obj)


# Functions, and the callables dask graphs wrap them in (whose pickles carry
# the wrapped function's docstring: most of a dask.array task's bytes; toolz's
# curry joins when the first graph is serialized).
_LIFTED = {types.FunctionType, functools.partial}
# The functions of the node being unpickled on this thread, for `_lifted`.
_unpickling = threading.local()


def _lifted(i: int):
    """A function lifted out of a graph node, while the node is unpickled."""
    return _unpickling.functions[i]


def _loads_lifted(body, functions):
    _unpickling.functions = functions
    try:
        return pickle.loads(body)
    finally:
        _unpickling.functions = None


def dumps_graph_node(node) -> tuple[bytes, list, int | None, bytes | None]:
    """Serialize a dask task-spec node; returns ``(run_spec, dep_keys,
    shared_id, shared_bytes)``, the task running with the values of
    ``dep_keys`` in that order. A plain call (a `Task` of plain values and
    references to its dependencies) becomes a CALL; any other node keeps its
    shape, with its functions lifted into the shared blob."""
    _task_types()
    if type(node) is _Task:
        s = _slotted(node.args, node.kwargs, _is_ref, _ref_target)
        if s is not None and len(s[2]) == len(node.dependencies):
            args, slots, deps = s
            fid, fb = dumps_function(node.func)
            return _CALL + pickle.dumps((args, node.kwargs or None, slots), protocol=5), deps, fid, fb
    deps = list(node.dependencies)
    buf = io.BytesIO()
    buf.write(_GRAPH)
    p = _FunctionLifter(buf)
    p.dump((node, deps))
    if not p.functions:
        return buf.getvalue(), deps, None, None
    fid, fb = dumps_function(tuple(p.functions))
    return buf.getvalue(), deps, fid, fb


_func_cache = FunctionCache()


def _shared_object(shared):
    """The function (or tuple of functions) a shared blob holds, unpickled
    once per worker."""
    fid, fb = shared
    obj = _func_cache.get(fid)
    if obj is None:
        if not len(fb):
            raise RuntimeError(f"the task's function (shared blob {fid:#x}) never reached this worker")
        obj = pickle.loads(fb)
        _func_cache.put(fid, obj)
    return obj


def run_task(run_spec, values, shared=None):
    """Run a task given its spec, its dependencies' values (in order) and
    its shared blob ``(id, bytes)``: a call's function, a node's functions."""
    body = memoryview(run_spec)
    kind = body[0]
    body = body[1:]
    if kind == CALL or kind == CALL_DEPS:
        if shared is None:
            raise ValueError("a call task came without its function")
        func = _shared_object(shared)
        if kind == CALL:
            args, kwargs, slots = pickle.loads(body)
            if slots:
                args = list(args)
                for pos, i in slots:
                    args[pos] = values[i]
        else:
            args, kwargs = _DepUnpickler(io.BytesIO(body), values).load()
        return func(*args, **kwargs) if kwargs else func(*args)
    if kind == GRAPH:
        if shared is None:
            node, dep_keys = pickle.loads(body)
        else:
            node, dep_keys = _loads_lifted(body, _shared_object(shared))
        return node(dict(zip(dep_keys, values)))
    raise ValueError(f"unknown task kind {kind!r}")
