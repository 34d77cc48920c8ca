"""Small helpers shared by the client, the worker and the cluster: byte sizes,
time spans and key naming, with the spellings Dask users know."""

from __future__ import annotations

import atexit
import functools
import gc
import re
import weakref

_BYTE_UNITS = {
    "": 1,
    "b": 1,
    "kb": 10**3,
    "mb": 10**6,
    "gb": 10**9,
    "tb": 10**12,
    "kib": 2**10,
    "mib": 2**20,
    "gib": 2**30,
    "tib": 2**40,
    "k": 10**3,
    "m": 10**6,
    "g": 10**9,
    "t": 10**12,
}


def parse_bytes(s: int | float | str | None) -> int:
    """``"4GiB"`` -> 4294967296; ints pass through. Raises ValueError on nonsense."""
    if s is None:
        return 0
    if isinstance(s, (int, float)):
        if s < 0:
            raise ValueError(f"memory size must be positive, got {s!r}")
        return int(s)
    text = s.strip().lower().replace(" ", "")
    m = re.fullmatch(r"([0-9]*\.?[0-9]+(?:e[0-9]+)?)([a-z]*)", text)
    if not m or m.group(2) not in _BYTE_UNITS:
        raise ValueError(f"could not interpret {s!r} as a byte size (try '4GiB' or '500MB')")
    return int(float(m.group(1)) * _BYTE_UNITS[m.group(2)])


def format_bytes(n: float) -> str:
    """4294967296 -> ``"4.00 GiB"``."""
    for unit, k in (("PiB", 2**50), ("TiB", 2**40), ("GiB", 2**30), ("MiB", 2**20), ("kiB", 2**10)):
        if n >= k * 0.9:
            return f"{n / k:.2f} {unit}"
    return f"{int(n)} B"


def parse_timedelta(s: int | float | str | None, default: str = "s") -> float | None:
    """``"10s"``, ``"500ms"``, ``"2m"`` or a number of seconds -> seconds."""
    if s is None:
        return None
    if isinstance(s, (int, float)):
        return float(s)
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-z]*)\s*", s.lower())
    if not m:
        raise ValueError(f"could not interpret {s!r} as a time span")
    unit = m.group(2) or default
    scale = {"us": 1e-6, "ms": 1e-3, "s": 1, "m": 60, "min": 60, "h": 3600, "d": 86400}
    if unit not in scale:
        raise ValueError(f"unknown time unit {unit!r} in {s!r}")
    return float(m.group(1)) * scale[unit]


def route_host(address: str) -> str:
    """The local IP this machine uses to reach ``address`` (``tcp://HOST:PORT``).

    A worker listens there by default, so that peers on other hosts reach it as
    they reach the scheduler (Dask picks its worker interface the same way).
    """
    import socket

    hostport = address.split("://", 1)[-1]
    host, _, port = hostport.rpartition(":")
    host = host.strip("[]")
    if host in ("", "0.0.0.0", "::", "localhost"):
        return "127.0.0.1"
    try:
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        with socket.socket(family, socket.SOCK_DGRAM) as s:
            s.connect((host, int(port or 8786)))
            return s.getsockname()[0]
    except (OSError, ValueError):
        return "127.0.0.1"


def without_gc(method):
    """Run ``method`` with Python's cyclic garbage collector paused: a map's
    tasks and futures, or a gather's results, are many objects without
    cycles, and the collector would otherwise scan the growing heap again
    and again (a quarter of a 300,000-task map's time)."""

    @functools.wraps(method)
    def wrapper(*args, **kwargs):
        if not gc.isenabled():
            return method(*args, **kwargs)
        gc.disable()
        try:
            return method(*args, **kwargs)
        finally:
            gc.enable()

    return wrapper


def wire_key(key) -> str:
    """The string form a key travels under (tuple keys are stringified)."""
    return key if isinstance(key, str) else str(key)


def key_split(key) -> str:
    """Task-group name of a key, as Dask computes it."""
    if isinstance(key, tuple):
        key = key[0]
    if isinstance(key, bytes):
        key = key.decode()
    key = str(key)
    words = key.split("-")
    out = words[0].strip("_'()\"")
    for w in words[1:]:
        if w.isalpha() and not (len(w) == 8 and re.fullmatch(r"[a-f0-9]{8}", w)):
            out += "-" + w
        else:
            break
    return out


_at_exit: list = []


def _close_all_at_exit():
    # Clients first (stage 0), then clusters (stage 1): a cluster closed
    # under a live client has its results recomputed on the workers still
    # running while the interpreter finalizes.
    for _, members in sorted(_at_exit, key=lambda e: e[0]):
        for m in list(members):
            try:
                m.close()
            except Exception:
                pass


def close_at_exit(stage: int = 0) -> weakref.WeakSet:
    """A weak set whose members' ``close()`` runs at interpreter exit, so no
    cluster process outlives the Python that started it. Lower stages close
    first, whatever the order the modules were imported in."""
    members: weakref.WeakSet = weakref.WeakSet()
    if not _at_exit:
        atexit.register(_close_all_at_exit)
    _at_exit.append((stage, members))
    return members
