"""Fixtures and helpers for the mount tests (cache, vfs, FUSE).

Registered in conftest.py's ``pytest_plugins``.

* ``dataset``: a local repository with a randomized dataset committed to
  ``main`` and tagged ``v1`` (``.url``, ``.commit``, ``.src``, ``.picture``).
* ``mounts``: a factory running ``commitfs mount`` as a subprocess
  (``mounts.mount(url, mountpoint, *options, rev=REV)``); every mount it made is unmounted at
  teardown, even when the test failed (``commitfs umount``, then
  ``fusermount3 -u -z``), and its daemon is waited for.
* ``vfs_walk(fs)``: the tree a FileSystem shows, through its methods only.
* ``fs_of(repo, ...)``: an async context manager running a FileSystem.
"""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest

from core_fixtures import cli_env, make_random_tree
from commitfs.fuse.lifecycle import find_mount, lookup_daemon_pid
from commitfs.ops.snapshot import commit_directory
from commitfs.repo.repository import Repository
from commitfs.vfs import ROOT_INODE, FileSystem, VfsOptions

MOUNT_TIMEOUT_S = 60


@dataclass
class Dataset:
    url: str
    commit: bytes
    src: Path
    picture: dict[str, tuple]


@pytest.fixture
def dataset(tmp_path, cache_home) -> Dataset:
    src = tmp_path / "src"
    picture = make_random_tree(src, random.Random(20240607), big=3 << 20)
    url = str(tmp_path / "repo")
    with Repository.init(url) as repo:
        cid = commit_directory(repo, src, message="dataset").commit_id
        repo.refs.create_tag("v1", cid)
    return Dataset(url, cid, src, picture)


# --- the kernel-less file system ---------------------------------------------------------
@asynccontextmanager
async def fs_of(repo: Repository, root_commit: bytes | None = None, **options):
    fs = FileSystem(repo, root_commit, VfsOptions(**options))
    async with fs.running():
        yield fs


async def vfs_listdir(fs: FileSystem, ino: int) -> list[tuple[str, object]]:
    """(name, Attr) of a directory through opendir/readdir, in offset order,
    in small batches (a reply that refuses every 7th offer, as a full kernel buffer does)."""
    fh = await fs.opendir(ino)
    out: list[tuple[str, object]] = []
    start = 0
    try:
        while True:
            batch: list[tuple[str, object, int]] = []

            def reply(name, attr, next_id):
                if len(batch) == 7:
                    return False
                batch.append((name.decode(), attr, next_id))
                return True

            await fs.readdir(fh, start, reply)
            if not batch:
                return out
            out.extend((n, a) for n, a, _ in batch)
            start = batch[-1][2]
    finally:
        await fs.releasedir(fh)


async def vfs_read_all(fs: FileSystem, ino: int, block: int = 128 * 1024) -> bytes:
    fh = await fs.open(ino, os.O_RDONLY)
    try:
        parts, off = [], 0
        while True:
            data = await fs.read(fh, off, block)
            if not data:
                return b"".join(parts)
            parts.append(data)
            off += len(data)
    finally:
        await fs.release(fh)


async def vfs_walk(fs: FileSystem, ino: int = ROOT_INODE, prefix: str = "") -> dict[str, tuple]:
    """The same picture as core_fixtures.describe, through the vfs."""
    import stat as st

    out: dict[str, tuple] = {}
    for name, attr in await vfs_listdir(fs, ino):
        rel = f"{prefix}/{name}" if prefix else name
        if st.S_ISDIR(attr.mode):
            out[rel] = ("dir",)
            out.update(await vfs_walk(fs, attr.ino, rel))
        elif st.S_ISLNK(attr.mode):
            out[rel] = ("link", await fs.readlink(attr.ino))
        else:
            out[rel] = ("file", bool(attr.mode & st.S_IXUSR), await vfs_read_all(fs, attr.ino))
    return out


# --- real mounts ------------------------------------------------------------------------
def run_commitfs(*args: str, timeout: float = MOUNT_TIMEOUT_S, env=None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "commitfs", *args], capture_output=True, text=True,
                          timeout=timeout, env=env if env is not None else cli_env())


def force_unmount(mountpoint: str) -> None:
    """Last resort: detach whatever is mounted there."""
    if find_mount(mountpoint) is not None:
        subprocess.run(["fusermount3", "-u", "-z", mountpoint], capture_output=True)


def wait_gone(pid: int, timeout: float = 20.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return True
        try:
            if os.waitpid(pid, os.WNOHANG)[0] == pid:
                return True
        except ChildProcessError:
            pass
        time.sleep(0.05)
    return False


class Mounts:
    def __init__(self, tmp_path: Path, cache_dir: Path):
        self.tmp_path = tmp_path
        self.cache_dir = cache_dir
        self.made: list[str] = []

    def mountpoint(self, name: str = "mnt") -> Path:
        p = self.tmp_path / name
        p.mkdir(exist_ok=True)
        return p

    def mount(self, repo_url: str, mountpoint: os.PathLike, *options: str, rev: str | None = None,
              check: bool = True, env=None) -> subprocess.CompletedProcess:
        """``commitfs -r URL mount OPTIONS... [REV] MOUNTPOINT`` (with --cache-dir unless given)."""
        extra = [] if "--cache-dir" in options else ["--cache-dir", str(self.cache_dir)]
        positional = ([rev] if rev else []) + [str(mountpoint)]
        if str(mountpoint) not in self.made:
            self.made.append(str(mountpoint))  # before: a mount that times out is cleaned up too
        proc = run_commitfs("-r", repo_url, "mount", *options, *extra, *positional, env=env)
        if check:
            assert proc.returncode == 0, proc.stderr
        return proc

    def cleanup(self) -> None:
        for mp in reversed(self.made):
            pid = lookup_daemon_pid(mp)
            if find_mount(mp) is not None:
                try:
                    run_commitfs("umount", mp, timeout=30)
                except subprocess.TimeoutExpired:
                    pass
            force_unmount(mp)
            if pid is not None and not wait_gone(pid):
                os.kill(pid, signal.SIGKILL)
                wait_gone(pid, 5)


@pytest.fixture
def mounts(tmp_path, cache_home):
    m = Mounts(tmp_path, cache_home / "commitfs")
    try:
        yield m
    finally:
        m.cleanup()
