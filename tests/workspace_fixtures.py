"""Fixtures for writable workspace mounts (registered in conftest.py's ``pytest_plugins``).

* ``ws``: a local repository whose ``main`` holds a small seeded tree (``.src``),
  and helpers to mount ``main`` writable (``ws.mount(name)``, through the
  ``mounts`` fixture, so every mount is unmounted at teardown even on failure),
  to kill a daemon (``ws.kill(mnt)``) and to run the CLI (``ws.cli(...)``).
* ``compare_trees(a, b)``: kinds, contents, symlink targets and permission bits
  of two trees (the workspace and a plain directory).
"""

from __future__ import annotations

import os
import random
import shutil
import signal
import stat
import subprocess
from dataclasses import dataclass
from pathlib import Path

import pytest

from core_fixtures import make_random_tree
from mount_fixtures import Mounts, force_unmount, run_commitfs, wait_gone
from commitfs.fuse.lifecycle import find_mount, lookup_daemon_pid
from commitfs.ops.snapshot import commit_directory
from commitfs.repo.repository import Repository


def normalize_modes(root: Path) -> None:
    """Directories 0755, files 0644 or 0755 (what a commit records)."""
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames:
            os.chmod(os.path.join(dirpath, name), 0o755)
        for name in filenames:
            p = os.path.join(dirpath, name)
            st = os.lstat(p)
            if stat.S_ISREG(st.st_mode):
                os.chmod(p, 0o755 if st.st_mode & stat.S_IXUSR else 0o644)


def picture(root: Path, modes: bool = True) -> dict[str, tuple]:
    """{path: (kind, mode bits, bytes or target)} of a tree, symlinks not followed."""
    root = Path(root)
    out: dict[str, tuple] = {}
    for dirpath, dirnames, filenames in os.walk(root, followlinks=False):
        for name in dirnames + filenames:
            full = os.path.join(dirpath, name)
            rel = os.path.relpath(full, root)
            st = os.lstat(full)
            m = stat.S_IMODE(st.st_mode) if modes else bool(st.st_mode & stat.S_IXUSR)
            if stat.S_ISLNK(st.st_mode):
                out[rel] = ("link", os.readlink(full))
            elif stat.S_ISDIR(st.st_mode):
                out[rel] = ("dir", m)
            else:
                with open(full, "rb") as f:
                    data = f.read()
                assert len(data) == st.st_size, rel
                out[rel] = ("file", m, data)
    return out


def compare_trees(a: Path, b: Path, modes: bool = True) -> None:
    pa, pb = picture(a, modes), picture(b, modes)
    assert sorted(pa) == sorted(pb)
    for k in pa:
        assert pa[k] == pb[k], k


@dataclass
class WS:
    url: str
    src: Path
    base: bytes
    tmp: Path
    mounts: Mounts

    def mount(self, name: str = "mnt", workspace: str | None = "ws", check: bool = True,
              branch: str = "main") -> Path:
        mnt = self.mounts.mountpoint(name)
        opts = ["--writable"] + (["--workspace", str(self.tmp / workspace)] if workspace else [])
        self.mounts.mount(self.url, mnt, *opts, rev=branch, check=check)
        return mnt

    def umount(self, mnt: Path) -> None:
        proc = run_commitfs("umount", str(mnt))
        assert proc.returncode == 0, proc.stderr

    def kill(self, mnt: Path) -> None:
        """SIGKILL the daemon, then clean up the dead mount as a user would."""
        pid = lookup_daemon_pid(mnt)
        assert pid is not None
        os.kill(pid, signal.SIGKILL)
        wait_gone(pid)
        proc = run_commitfs("umount", str(mnt))
        if proc.returncode != 0:
            force_unmount(str(mnt))
        assert find_mount(mnt) is None

    def cli(self, *args: str, timeout: float = 120) -> subprocess.CompletedProcess:
        return run_commitfs(*args, timeout=timeout)

    def head(self, branch: str = "main") -> bytes | None:
        with Repository.open(self.url) as repo:
            return repo.refs.lookup_branch(branch)

    def reference(self, name: str = "ref") -> Path:
        """A plain-directory copy of the base tree, modes normalized."""
        ref = self.tmp / name
        shutil.copytree(self.src, ref, symlinks=True)
        normalize_modes(ref)
        return ref


@pytest.fixture
def ws(tmp_path, mounts) -> WS:
    src = tmp_path / "src"
    make_random_tree(src, random.Random(5150), big=1 << 20)
    normalize_modes(src)
    url = str(tmp_path / "repo")
    with Repository.init(url) as repo:
        base = commit_directory(repo, src, message="base").commit_id
    return WS(url, src, base, tmp_path, mounts)
