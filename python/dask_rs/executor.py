"""`Client.get_executor()`: the cluster behind a `concurrent.futures.Executor`."""

from __future__ import annotations

import concurrent.futures as cf
import threading


class ClientExecutor(cf.Executor):
    """Runs calls on a dask-rs cluster; returns `concurrent.futures.Future`s.

    Keyword arguments given at construction (``pure``, ``workers``,
    ``retries``, ``priority``, ...) apply to every submission; ``pure``
    defaults to False, as a pool's calls may have side effects.
    """

    def __init__(self, client, **kwargs):
        self._client = client
        self._kwargs = {"pure": False, **kwargs}
        self._futures: set = set()
        self._lock = threading.Lock()
        self._shutdown = False

    def submit(self, fn, /, *args, **kwargs) -> cf.Future:
        with self._lock:
            if self._shutdown:
                raise RuntimeError("cannot schedule new futures after shutdown")
        remote = self._client.submit(fn, *args, **kwargs, **self._kwargs)
        local: cf.Future = cf.Future()
        local.set_running_or_notify_cancel()
        with self._lock:
            self._futures.add(remote)

        def done(f):
            with self._lock:
                self._futures.discard(f)
            try:
                local.set_result(f.result())
            except BaseException as e:  # noqa: BLE001 - handed to the caller's future
                if not local.done():
                    local.set_exception(e)

        remote.add_done_callback(done)
        return local

    def map(self, fn, *iterables, timeout=None, chunksize=1):
        """Like `Executor.map`: results in input order, submitted at once."""
        futures = [self.submit(fn, *args) for args in zip(*iterables)]

        def results():
            for f in futures:
                yield f.result(timeout)

        return results()

    def shutdown(self, wait=True, *, cancel_futures=False):
        with self._lock:
            self._shutdown = True
            pending = list(self._futures)
        if cancel_futures and pending:
            self._client.cancel(pending)
        elif wait and pending:
            from .client import wait as wait_all

            wait_all(pending)
