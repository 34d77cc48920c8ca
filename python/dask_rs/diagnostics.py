"""`progress(futures)`: a progress bar in the terminal, or a widget in a
notebook; `get_task_stream()` and `performance_report()`: what ran during a
block of code, as records or as a self-contained HTML file."""

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


class TaskStreamPlot:
    """A task stream drawn as SVG: shown inline in notebooks, and
    ``save(filename)`` writes a self-contained HTML file."""

    def __init__(self, svg: str):
        self.svg = svg

    def _repr_html_(self) -> str:
        return self.svg

    def save(self, filename: str) -> str:
        with open(filename, "w", encoding="utf-8") as f:
            f.write(f"<!doctype html><html><head><meta charset='utf-8'><title>Task stream</title></head>"
                    f"<body>{self.svg}</body></html>")
        return filename


class get_task_stream:
    """Record the tasks that run inside a ``with`` block (distributed's
    ``get_task_stream``): afterwards ``.data`` holds their records and, with
    ``plot=True``, ``.figure`` their picture (``plot="save"`` also writes it
    to ``filename``)."""

    def __init__(self, client=None, plot=False, filename="task-stream.html"):
        self.client = client
        self.plot = plot
        self.filename = filename
        self.figure = None
        self.data: list = []

    def __enter__(self):
        from .client import default_client

        self.client = self.client or default_client()
        self.start = time.time()
        return self

    def __exit__(self, *exc):
        # Let the last reports of the block reach the scheduler.
        time.sleep(0.05)
        if self.plot:
            data, self.figure = self.client.get_task_stream(
                start=self.start, stop=time.time(), plot=self.plot, filename=self.filename
            )
        else:
            data = self.client.get_task_stream(start=self.start)
        self.data.extend(data)


class performance_report:
    """Write ``filename``, a self-contained HTML report of what ran inside a
    ``with`` block (distributed's ``performance_report``): duration, tasks,
    compute time, bytes moved between workers, the task stream, tasks per
    second, the task groups that ran and memory per worker at the end. It
    opens offline: nothing in it is loaded from elsewhere."""

    def __init__(self, filename="dask-report.html", stacklevel=1, mode=None, storage_options=None):
        self.filename = filename

    def __enter__(self):
        from .client import default_client

        self.client = default_client()
        self.start = time.time()
        self.before = self.client.scheduler_info()
        return self

    def __exit__(self, *exc):
        from . import _core
        from .utils import format_bytes

        time.sleep(0.05)
        stop = time.time()
        after = self.client.scheduler_info()
        records = self.client.get_task_stream(start=self.start, stop=stop)
        spans = [s for r in records for s in r["startstops"] if s["action"] == "compute"]
        compute = sum(s["stop"] - s["start"] for s in spans)
        moved = sum(w["metrics"]["bytes_in"] for w in after["workers"].values()) - sum(
            w["metrics"]["bytes_in"] for w in self.before["workers"].values()
        )
        facts = [
            ("duration", f"{stop - self.start:.2f} s"),
            ("tasks", f"{len(records):,}"),
            ("compute time", f"{compute:.2f} s"),
            ("received by workers", format_bytes(max(moved, 0))),
            ("workers", str(len(after["workers"]))),
            ("threads", str(sum(w["nthreads"] for w in after["workers"].values()))),
            ("scheduler", after["address"]),
            ("written", time.strftime("%Y-%m-%d %H:%M:%S")),
        ]
        html = _core.performance_report_html(
            self.client.scheduler_address, self.start, stop, "dask-rs performance report", facts
        )
        with open(self.filename, "w", encoding="utf-8") as f:
            f.write(html)

