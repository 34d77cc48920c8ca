"""Worker plugins, as distributed's: prepare every worker, now and later.

`Client.register_plugin(plugin)` runs ``plugin.setup(worker)`` on every
worker there and keeps the plugin on the scheduler, which hands it to every
worker that registers later (a new one, or one restarted) before that worker
starts a task. ``transition(key, start, finish)`` hears each task the worker
runs (``ready -> executing -> memory | error``); ``teardown(worker)`` runs
when the plugin is unregistered or the worker process ends.

The built-ins: `PipInstall`, `Environ`, `UploadFile`, `UploadDirectory`.
`SchedulerPlugin` and `NannyPlugin` subclasses cannot run here (the scheduler
runs no Python; process workers have no nanny of their own): registering one
raises `TypeError` saying what to use instead.
"""

from __future__ import annotations

import io
import logging
import os
import subprocess
import sys
import uuid
import zipfile

logger = logging.getLogger("dask_rs")

__all__ = [
    "WorkerPlugin",
    "SchedulerPlugin",
    "NannyPlugin",
    "PipInstall",
    "Environ",
    "UploadFile",
    "UploadDirectory",
]


class WorkerPlugin:
    """Subclass and override what you need; give it a ``name`` attribute to
    replace an earlier registration of the same name."""

    def setup(self, worker):
        """Run once per worker, before it starts a task (``worker`` is what
        `get_worker` returns)."""

    def teardown(self, worker):
        """Run when the plugin is unregistered or the worker process ends."""

    def transition(self, key, start, finish, **kwargs):
        """A task of this worker changed state: ``ready -> executing``, then
        ``executing -> memory`` or ``executing -> error``."""


class SchedulerPlugin:
    """Not supported: the dask_rs scheduler is written in Rust and runs no
    Python. Registering one raises `TypeError`."""


class NannyPlugin:
    """Not supported as such: process workers are supervised without a nanny
    process of their own. Registering one raises `TypeError`; `Environ` and
    `UploadDirectory` are the built-in ones, as worker plugins."""


def plugin_name(plugin) -> str:
    """The plugin's ``name`` attribute, else its class name and a random suffix."""
    name = getattr(plugin, "name", None)
    return str(name) if name else f"{type(plugin).__name__}-{uuid.uuid4()}"


def check_plugin(plugin) -> None:
    """Raise `TypeError` for a plugin that cannot run here, naming what can."""
    kinds = _foreign_kinds()
    if isinstance(plugin, (SchedulerPlugin, *kinds["scheduler"])):
        raise TypeError(
            f"{type(plugin).__name__} is a SchedulerPlugin: the dask_rs scheduler is written in Rust and "
            "runs no Python plugins. Watch the cluster with client.subscribe_events() or the dashboard."
        )
    if isinstance(plugin, (NannyPlugin, *kinds["nanny"])):
        raise TypeError(
            f"{type(plugin).__name__} is a NannyPlugin: dask_rs process workers have no nanny of their "
            "own. Use a WorkerPlugin (dask_rs.Environ and dask_rs.UploadDirectory are the built-in ones)."
        )
    if not any(callable(getattr(plugin, hook, None)) for hook in ("setup", "teardown", "transition")):
        raise TypeError(f"{type(plugin).__name__} is not a worker plugin: it has no setup, teardown or "
                        "transition")


def _foreign_kinds() -> dict:
    """distributed's plugin base classes, when distributed is installed."""
    try:
        from distributed.diagnostics.plugin import NannyPlugin as DNanny
        from distributed.diagnostics.plugin import SchedulerPlugin as DScheduler
    except Exception:  # noqa: BLE001 - distributed is optional
        return {"scheduler": (), "nanny": ()}
    return {"scheduler": (DScheduler,), "nanny": (DNanny,)}


class PipInstall(WorkerPlugin):
    """``pip install`` packages in every worker's environment (those there,
    and those that join later). With ``restart_workers=True`` each worker
    then exits for its supervisor to start a fresh process, so that modules
    already imported are loaded anew (a worker restarted so runs the install
    again, which pip finds already done, and does not restart again)."""

    name = "pip"

    def __init__(self, packages, pip_options=None, restart_workers=False):
        self.packages = [str(p) for p in packages]
        self.pip_options = [str(o) for o in (pip_options or [])]
        self.restart_workers = bool(restart_workers)

    def setup(self, worker):
        cmd = [sys.executable, "-m", "pip", "install", "--disable-pip-version-check", *self.pip_options,
               *self.packages]
        p = subprocess.run(cmd, capture_output=True, text=True)
        if p.returncode != 0:
            raise RuntimeError(f"pip install {' '.join(self.packages)} failed on {worker.name}: "
                               f"{(p.stderr or p.stdout).strip()[-2000:]}")
        installed = "Successfully installed" in p.stdout
        logger.info("pip install %s on %s: %s", " ".join(self.packages), worker.name,
                    "installed" if installed else "already there")
        if installed and self.restart_workers:
            worker._restart_soon("pip installed " + " ".join(self.packages))


class Environ(WorkerPlugin):
    """Environment variables for the worker processes. As distributed's
    nanny does, they are in place when the process starts: under a
    LocalCluster or a ``--nworkers`` supervisor, a worker whose environment
    lacks them saves them where its supervisor reads them for every worker
    it starts, then exits and is started again with them. A worker without
    a supervisor sets them in its running process."""

    name = "environ"

    def __init__(self, environ=None):
        self.environ = {str(k): str(v) for k, v in (environ or {}).items()}

    def setup(self, worker):
        missing = {k: v for k, v in self.environ.items() if os.environ.get(k) != v}
        if not missing:
            return
        env_file = os.environ.get("DASK_RS_ENV_FILE")
        if env_file:
            import json

            try:
                with open(env_file) as f:
                    saved = json.load(f)
            except (OSError, ValueError):
                saved = {}
            saved.update(self.environ)
            with open(env_file, "w") as f:
                json.dump(saved, f)
            worker._restart_soon("environment variables " + ", ".join(sorted(missing)))
        else:
            os.environ.update(missing)


class UploadFile(WorkerPlugin):
    """A ``.py``, ``.zip``, ``.egg`` or ``.whl`` file copied to every worker
    (those that join later too) and put on its import path; a ``.py`` file
    is imported. `Client.upload_file` registers one."""

    def __init__(self, filepath, load=True):
        self.filename = os.path.basename(filepath)
        with open(filepath, "rb") as f:
            self.data = f.read()
        self.load = load
        self.name = f"upload-file-{self.filename}"

    def setup(self, worker):
        from ._worker import install_uploaded_file

        install_uploaded_file(self.filename, self.data, self.load)


class UploadDirectory(WorkerPlugin):
    """A local directory copied to every worker's ``local_directory`` (those
    that join later too). With ``update_path`` the copy goes on ``sys.path``
    (so the packages and modules in it become importable); with ``restart``
    the worker then starts afresh (under a supervisor)."""

    def __init__(self, path, restart=False, update_path=False, skip_words=(".git", ".github", ".pytest_cache",
                                                                             "tests", "docs"), skip=()):
        path = os.path.abspath(os.path.expanduser(path))
        self.path = os.path.basename(path.rstrip(os.sep))
        self.restart = restart
        self.update_path = update_path
        self.name = "upload-directory-" + self.path
        buf = io.BytesIO()
        with zipfile.ZipFile(buf, "w", compression=zipfile.ZIP_DEFLATED) as z:
            for root, dirs, files in os.walk(path):
                dirs[:] = [d for d in dirs if d not in skip_words]
                for file in files:
                    full = os.path.join(root, file)
                    if any(word in full for word in skip_words) or any(s(full) for s in skip):
                        continue
                    z.write(full, os.path.join(self.path, os.path.relpath(full, path)))
        self.data = buf.getvalue()

    def setup(self, worker):
        target = worker.local_directory
        os.makedirs(target, exist_ok=True)
        with zipfile.ZipFile(io.BytesIO(self.data)) as z:
            z.extractall(target)
        copy = os.path.join(target, self.path)
        if self.update_path and copy not in sys.path:
            sys.path.insert(0, copy)
        if self.restart:
            marker = os.path.join(target, self.path, ".dask-rs-uploaded")
            if not os.path.exists(marker):
                open(marker, "w").close()
                worker._restart_soon(f"uploaded directory {self.path}")
