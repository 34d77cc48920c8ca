"""The worker supervisor (Dask's nanny): ``python -m dask_rs worker ADDRESS
--nworkers K`` runs K worker processes, restarts one that dies, and forwards
SIGTERM/SIGINT to all of them.

A worker that exits with status 0 was closed on purpose (the scheduler shut
down or retired it) and is not restarted; one that retired at the end of its
``--lifetime`` with ``--lifetime-restart``, or was told to restart, comes back
at once; any other exit
is a crash and the worker comes back under the same name, with a growing
delay if it keeps failing at once (for example while the scheduler is down).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
import time

from ._worker import RESTART_STATUS, remove_spill_dirs

RESTART_DELAY_MAX = 10.0
HEALTHY_AFTER = 10.0  # a worker that lived this long resets its back-off


class _Child:
    def __init__(self, name: str, cmd: list):
        self.name = name
        self.cmd = cmd
        self.proc: subprocess.Popen | None = None
        self.started = 0.0
        self.delay = 0.0
        self.restart_at = 0.0
        self.restarts = 0
        self.cleaned = False  # spill directory of a crashed process removed

    def start(self, env_file: str):
        from ._worker import environment_with_plugins

        self.proc = subprocess.Popen(self.cmd, env=environment_with_plugins(os.environ, env_file))
        self.started = time.monotonic()
        self.cleaned = False


def child_names(name: str | None, nworkers: int, pid: int) -> list:
    base = name or f"worker-{pid}"
    return [base] if nworkers == 1 else [f"{base}-{i}" for i in range(nworkers)]


def supervise(worker_argv: list, names: list, local_directory: str | None = None) -> int:
    """Run one worker per name with ``worker_argv + ["--name", name]``;
    ``local_directory`` is where the workers spill (to clean up after one
    that died)."""
    cmd = [sys.executable, "-m", "dask_rs", "worker", *worker_argv]
    children = [_Child(n, [*cmd, "--name", n]) for n in names]
    # Where Environ plugins leave variables for every worker started here.
    fd, env_file = tempfile.mkstemp(prefix="dask-rs-environ-", suffix=".json")
    os.close(fd)
    stopping = False

    def stop(signum, frame):
        nonlocal stopping
        stopping = True
        for c in children:
            if c.proc is not None and c.proc.poll() is None:
                c.proc.send_signal(signal.SIGTERM)

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    for c in children:
        c.start(env_file)
    print(f"Supervisor {' '.join(names)} started", flush=True)
    while True:
        now = time.monotonic()
        alive = 0
        for c in children:
            if c.proc is None:  # waiting to be restarted
                if not stopping:
                    if now >= c.restart_at:
                        c.start(env_file)
                    alive += 1
                continue
            code = c.proc.poll()
            if code is None:
                alive += 1
                continue
            if code != 0 and not c.cleaned:
                remove_spill_dirs(c.proc.pid, local_directory)
                c.cleaned = True
            if stopping or code == 0:
                continue
            lived = now - c.started
            c.delay = 0.0 if lived > HEALTHY_AFTER else min(RESTART_DELAY_MAX, max(0.2, c.delay * 2))
            c.restart_at = now + c.delay
            c.restarts += 1
            if code == RESTART_STATUS:
                c.delay = 0.0
                c.restart_at = now
                msg = f"worker {c.name} asked for a fresh process (lifetime over, or a restart); starting one"
            else:
                msg = f"worker {c.name} exited with status {code}; restarting in {c.delay:.1f} s"
            print(msg, file=sys.stderr, flush=True)
            c.proc = None
            alive += 1
        if alive == 0:
            try:
                os.unlink(env_file)
            except OSError:
                pass
            return 0
        time.sleep(0.05)
