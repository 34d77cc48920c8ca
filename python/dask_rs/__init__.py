"""dask-rs: a Rust runtime for Dask.

``from dask_rs import Client, LocalCluster`` and use it as you would
``distributed``'s.
"""

import os

# The extension's allocator would back its heap with transparent huge pages
# where the kernel offers them on request: 8 MiB more resident memory in
# every idle worker (28 -> 36 MiB); a 100,000-task map ran no slower
# without them. Read when `_core` loads.
os.environ.setdefault("MIMALLOC_ALLOW_THP", "0")

from ._core import CommError  # noqa: E402

__version__ = "0.1.0"

__all__ = [
    "ALL_COMPLETED",
    "FIRST_COMPLETED",
    "Client",
    "CommError",
    "Event",
    "Future",
    "KilledWorker",
    "LocalCluster",
    "Lock",
    "Queue",
    "Security",
    "Semaphore",
    "Variable",
    "as_completed",
    "default_client",
    "fire_and_forget",
    "futures_of",
    "get_worker",
    "Actor",
    "ActorFuture",
    "WorkerPlugin",
    "SchedulerPlugin",
    "NannyPlugin",
    "PipInstall",
    "Environ",
    "UploadFile",
    "UploadDirectory",
    "get_task_stream",
    "performance_report",
    "get_client",
    "progress",
    "rejoin",
    "secede",
    "wait",
    "worker_client",
]


def __getattr__(name):
    # The client side (and dask with it) loads on first use, so a worker
    # process (``python -m dask_rs worker``) starts without importing dask.
    if name == "LocalCluster":
        from .cluster import LocalCluster

        return LocalCluster
    if name == "Security":
        from .security import Security

        return Security
    if name in ("progress", "get_task_stream", "performance_report"):
        from . import diagnostics

        return getattr(diagnostics, name)
    if name in ("Actor", "ActorFuture"):
        from . import actors

        return getattr(actors, name)
    if name == "get_worker":
        from ._worker import get_worker

        return get_worker
    if name in ("WorkerPlugin", "SchedulerPlugin", "NannyPlugin", "PipInstall", "Environ", "UploadFile",
                "UploadDirectory"):
        from . import plugins

        return getattr(plugins, name)
    if name in ("Event", "Lock", "Queue", "Semaphore", "Variable"):
        from . import coordination

        return getattr(coordination, name)
    if name in __all__:
        from . import client

        return getattr(client, name)
    raise AttributeError(f"module 'dask_rs' has no attribute {name!r}")
