"""dask-rs: a Rust runtime for Dask.

``from dask_rs import Client, LocalCluster`` and use it as you would
``distributed``'s.
"""

from ._core import CommError
from .client import (
    ALL_COMPLETED,
    FIRST_COMPLETED,
    Client,
    Future,
    KilledWorker,
    as_completed,
    default_client,
    fire_and_forget,
    get_client,
    wait,
)
from .cluster import LocalCluster

__version__ = "0.1.0"

__all__ = [
    "ALL_COMPLETED",
    "FIRST_COMPLETED",
    "Client",
    "CommError",
    "Future",
    "KilledWorker",
    "LocalCluster",
    "as_completed",
    "default_client",
    "fire_and_forget",
    "get_client",
    "wait",
]
