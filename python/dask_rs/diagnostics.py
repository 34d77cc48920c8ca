"""`progress(futures)`: a progress bar in the terminal, or a widget in a notebook."""

from __future__ import annotations

import sys
import threading
import time

from .client import Future, _collect_futures


def _futures_of(objs) -> list:
    out: list = []
    for o in objs:
        if isinstance(o, Future):
            out.append(o)
            continue
        found: list = []
        _collect_futures(o, found)
        if not found and hasattr(o, "__dask_graph__"):  # a persisted collection
            for v in dict(o.__dask_graph__()).values():
                _collect_futures(getattr(v, "value", v), found)
        out.extend(found)
    return out


def _in_notebook() -> bool:
    try:
        from IPython import get_ipython

        shell = get_ipython()
        return shell is not None and type(shell).__name__ == "ZMQInteractiveShell"
    except ImportError:
        return False


def _bar(done: int, total: int, elapsed: float, width: int = 40) -> str:
    frac = done / total if total else 1.0
    filled = int(round(width * frac))
    bar = "#" * filled + " " * (width - filled)
    return f"[{bar}] | {frac:4.0%} Completed | {elapsed:4.1f}s ({done}/{total})"


def progress(*futures, notebook=None, multi=False, complete=True, interval=0.1, file=None, **kwargs):
    """Show the progress of ``futures`` (or persisted collections).

    In a terminal, draws a text bar and returns once every future is done
    (finished, erred or cancelled). In a Jupyter notebook with ipywidgets it
    returns a progress widget updated in the background.
    """
    fs = _futures_of(futures)
    total = len({f.key for f in fs})
    if notebook is None:
        notebook = _in_notebook()
    if notebook:
        try:
            import ipywidgets
        except ImportError:
            notebook = False
    start = time.monotonic()

    def count():
        return len({f.key for f in fs if f.status != "pending"})

    if notebook:
        bar = ipywidgets.IntProgress(min=0, max=max(total, 1), description="Progress")

        def update():
            while True:
                n = count()
                bar.value = n
                bar.description = f"{n}/{total}"
                if n >= total:
                    bar.bar_style = "success" if all(f.status == "finished" for f in fs) else "danger"
                    return
                time.sleep(interval)

        threading.Thread(target=update, daemon=True).start()
        return bar
    out = file or sys.stdout
    while True:
        n = count()
        out.write("\r" + _bar(n, total, time.monotonic() - start))
        out.flush()
        if n >= total:
            break
        time.sleep(interval)
    out.write("\n" if complete else "\r")
    out.flush()
    return None
