"""Fixtures for the lineage tests (test_lineage, test_run, test_fsspec, test_example).

``lineage_env`` isolates a test: its own cache directory (lineage index, stat
cache, chunk cache), its own TMPDIR (so the mounts ``commitfs run`` makes lie
under the test's tmp_path, and the guard below unmounts only those), no
ambient COMMITFS_/MLflow/W&B variables.  At teardown it fails the test if a
mount or a ``commitfs-run-*`` directory was left behind, after detaching any
such mount so that nothing leaks into later tests.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _mounts_under(base: str) -> list[str]:
    from commitfs.fuse.lifecycle import iter_mounts

    return [m.mountpoint for m in iter_mounts() if m.mountpoint == base or m.mountpoint.startswith(base + "/")]


@pytest.fixture
def lineage_env(tmp_path, monkeypatch):
    cache = tmp_path / "cache"
    tmp = tmp_path / "tmp"
    tmp.mkdir()
    monkeypatch.setenv("XDG_CACHE_HOME", str(cache))
    monkeypatch.setenv("TMPDIR", str(tmp))
    monkeypatch.setenv("COMMITFS_AUTHOR", "tester <t@example.com>")
    for var in ("COMMITFS_REPO", "MLFLOW_RUN_ID", "WANDB_RUN_ID", "COMMITFS_INPUTS", "COMMITFS_OUTPUT"):
        monkeypatch.delenv(var, raising=False)
    for var in [v for v in os.environ if v.startswith("COMMITFS_INPUT_")]:
        monkeypatch.delenv(var)
    import tempfile

    monkeypatch.setattr(tempfile, "tempdir", None)  # re-read TMPDIR in this process
    yield tmp_path
    left = _mounts_under(str(tmp_path))
    for point in reversed(left):
        subprocess.run(["fusermount3", "-u", "-z", point], capture_output=True)
    runs = sorted(p.name for p in tmp.glob("commitfs-run-*"))
    assert not left, f"mounts left behind: {left}"
    assert not runs, f"run directories left behind: {runs}"


def cfs(*args, cwd=None, env=None, check=True, timeout=120, input=None) -> subprocess.CompletedProcess:
    """Run ``python -m commitfs ARGS`` in a subprocess; return the completed process (text)."""
    proc = subprocess.run([sys.executable, "-m", "commitfs", *map(str, args)], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=timeout, input=input)
    if check and proc.returncode != 0:
        raise AssertionError(f"commitfs {' '.join(map(str, args))} exited {proc.returncode}:\n"
                             f"stdout: {proc.stdout}\nstderr: {proc.stderr}")
    return proc


@pytest.fixture
def sample_dir(tmp_path) -> Path:
    """A small PNG dataset made by scripts/make_sample.py."""
    out = tmp_path / "sample"
    subprocess.run([sys.executable, str(ROOT / "scripts" / "make_sample.py"), str(out), "--images", "12"],
                   check=True, capture_output=True)
    return out
