"""Where the CPU goes in a no-op map: CPU time per task of the client, the
scheduler and each worker process during ``client.map`` + ``gather``.

``python bench/cpu_split.py [N]`` (default 100,000 tasks) starts a
``dask-ctl scheduler`` and two one-thread Python workers, runs the map once,
and prints the rate and each process's CPU microseconds per task of the
whole map (from /proc). Useful before and after a change to the task path.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

from dask_rs import Client

ROOT = Path(__file__).resolve().parent.parent
DASK_CTL = ROOT / "target" / "release" / "dask-ctl"


def inc(x):
    return x + 1


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def main():
    n = int(sys.argv[1]) if len(sys.argv) > 1 else 100_000
    sched = subprocess.Popen([str(DASK_CTL), "scheduler", "--port", "0", "--no-dashboard"],
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    workers = []
    try:
        address = next(line.split()[-1] for line in sched.stdout if "Scheduler at" in line)
        for i in range(2):
            cmd = [sys.executable, "-m", "dask_rs", "worker", address, "--name", f"w{i}", "--nthreads", "1"]
            workers.append(subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
        client = Client(address)
        client.wait_for_workers(2, timeout=60)
        time.sleep(1)
        pids = {"scheduler": sched.pid, **{f"worker {i}": w.pid for i, w in enumerate(workers)}}
        before = {k: cpu_seconds(p) for k, p in pids.items()}
        own = time.process_time()
        start = time.perf_counter()
        futures = client.map(inc, range(n), pure=False)
        submitted = time.perf_counter() - start
        client.gather(futures)
        elapsed = time.perf_counter() - start
        own = time.process_time() - own
        after = {k: cpu_seconds(p) for k, p in pids.items()}
        print(f"{n:,} tasks in {elapsed:.2f} s = {n / elapsed:,.0f} tasks/s "
              f"(map returned after {submitted:.2f} s)")
        print(f"  client CPU {own / n * 1e6:.1f} us per task")
        for k in pids:
            print(f"  {k} CPU {(after[k] - before[k]) / n * 1e6:.1f} us per task")
        client.close()
    finally:
        for w in workers:
            w.terminate()
        sched.terminate()
        for p in [*workers, sched]:
            p.wait(timeout=30)


if __name__ == "__main__":
    main()
