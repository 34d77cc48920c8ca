"""`pip install` of the built wheel gives a user everything: the Python
package, `python -m dask_rs worker`, LocalCluster, and the `dask-ctl`
command. A fresh virtual environment gets only the wheel (and its declared
dependencies): no source tree on the path, no build tools."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import venv

import pytest

from conftest import ROOT

SCRIPT = """
import sys
import dask_rs
from dask_rs import Client, LocalCluster

assert "site-packages" in dask_rs.__file__, dask_rs.__file__
assert not any(p.startswith(sys.argv[1]) for p in sys.path), "the source tree is not on the path"
with LocalCluster(n_workers=2, threads_per_worker=1, dashboard_address=None) as cluster, Client(cluster) as c:
    print(sum(c.gather(c.map(abs, range(-10, 0)))))
with Client(sys.argv[2]) as c:
    print(c.submit(pow, 2, 10).result(), len(c.scheduler_info()["workers"]))
"""


def run(cmd, **kw):
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=kw.pop("timeout", 600), **kw)
    assert p.returncode == 0, (cmd, p.stdout[-3000:], p.stderr[-3000:])
    return p


# Building the wheel compiles the extension again (abi3, stripped): minutes on 2 cores.
@pytest.mark.timeout(1800)
def test_a_fresh_venv_gets_everything_from_the_wheel(tmp_path_factory):
    # A short directory: the cluster's control socket path must fit in 107 bytes.
    tmp_path = tmp_path_factory.mktemp("w", numbered=True)
    out = tmp_path / "wheels"
    run(["make", "-C", ROOT, "wheel", "WHEEL_ABI=py311", f"WHEEL_OUT={out}"], timeout=1800)
    [wheel] = list(out.glob("*.whl"))
    # One wheel for every CPython from 3.11 (stable ABI); manylinux as
    # maturin's audit of the extension's symbol versions found it.
    assert re.fullmatch(r"dask_rs-[\d.]+-cp311-abi3-manylinux_2_\d+_x86_64\.whl", wheel.name), wheel.name
    names = subprocess.run([sys.executable, "-m", "zipfile", "-l", str(wheel)], capture_output=True,
                           text=True).stdout
    assert "dask_rs-0.1.0.data/scripts/dask-ctl" in names and "__pycache__" not in names

    env_dir = tmp_path / "venv"
    venv.EnvBuilder(with_pip=True).create(env_dir)
    py, bindir = env_dir / "bin" / "python", env_dir / "bin"
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    env.update(PATH=f"{bindir}{os.pathsep}{env.get('PATH', '')}", XDG_STATE_HOME=str(tmp_path / "state"),
               XDG_CONFIG_HOME=str(tmp_path / "config"))
    run([str(py), "-m", "pip", "install", "--quiet", "--disable-pip-version-check", str(wheel)], env=env,
        cwd=tmp_path)
    installed = run([str(py), "-m", "pip", "list", "--format=freeze"], env=env).stdout
    assert "maturin" not in installed, "no build tools"
    assert (bindir / "dask-ctl").exists()
    assert "usage" in run([str(bindir / "dask-ctl"), "--help"], env=env).stdout.lower()

    run([str(bindir / "dask-ctl"), "up", "--backend", "local", "--name", "fromwheel", "--workers", "1",
         "--no-dashboard"], env=env, cwd=tmp_path, timeout=120)
    try:
        p = run([str(py), "-c", SCRIPT, ROOT, "fromwheel"], env=env, cwd=tmp_path, timeout=300)
        assert p.stdout.split() == ["55", "1024", "1"], p.stdout
    finally:
        subprocess.run([str(bindir / "dask-ctl"), "down", "fromwheel"], env=env, capture_output=True,
                       timeout=120)
