"""The workloads under ``tests/workloads``: what Dask's documentation and
example notebooks do (futures, async/await, evolving workflows, resilience),
written as scripts for distributed. Each runs with dask_rs and, changed only
in its import line, with distributed; both must print the same."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

WORKLOADS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "workloads")
SCRIPTS = sorted(f for f in os.listdir(WORKLOADS) if f.endswith(".py"))


def run(path: str) -> str:
    p = subprocess.run([sys.executable, path], capture_output=True, text=True, timeout=240,
                       cwd=os.path.dirname(path))
    assert p.returncode == 0, (path, p.stdout, p.stderr[-3000:])
    assert "Fatal Python error" not in p.stderr
    return p.stdout


def test_every_workload_is_listed():
    assert SCRIPTS == ["async_api.py", "evolving.py", "futures.py", "resilience.py"]


@pytest.mark.parametrize("script", SCRIPTS)
def test_a_workload_prints_the_same_with_dask_rs_and_with_distributed(script, tmp_path):
    source = open(os.path.join(WORKLOADS, script)).read()
    assert source.count("from dask_rs import") == 1
    ours = run(os.path.join(WORKLOADS, script))
    assert ours.strip(), "it printed its results"
    pytest.importorskip("distributed")
    theirs = tmp_path / script
    theirs.write_text(source.replace("from dask_rs import", "from distributed import"))
    assert run(str(theirs)) == ours
