"""Issue 21: the mount daemon's memory does not grow with the entries it has shown.

Each inode the kernel holds costs the daemon a small node (vfs/inode.py), and a
node leaves the table when the kernel forgets it: these tests walk a real mount
of a commit with more entries than the caps would hold at the old cost (~600 B
an entry, its TreeEntry and two keyed tuples per node), read the daemon's
resident memory from /proc, and make the kernel forget (drop_caches, as root)
to see the table shrink back (statvfs's f_files is the table's size).
"""

from __future__ import annotations

import io
import os
import time

import pytest

from commitfs.fuse.lifecycle import lookup_daemon_pid
from commitfs.model.objects import Commit, Kind, Tree, TreeEntry
from commitfs.ops.snapshot import store_stream
from commitfs.repo.repository import Repository

pytestmark = [pytest.mark.timeout(300),
              pytest.mark.skipif(os.geteuid() != 0, reason="drop_caches needs root (the tests run as root)")]

DIRS, PER_DIR = 100, 2_000  # 200k entries


def _wide_commit(url: str, dirs: int, per_dir: int) -> bytes:
    """A commit of ``dirs`` directories of ``per_dir`` one-byte files (one stored file,
    distinct names, so every tree differs); made with the writer, no files on disk."""
    with Repository.init(url) as repo:
        with repo.writer() as w:
            fid, size = store_stream(w, io.BytesIO(b"x"))
            top = []
            for d in range(dirs):
                entries = tuple(TreeEntry(f"d{d:03d}f{i:05d}", Kind.FILE, size, fid) for i in range(per_dir))
                tree = Tree(entries)
                top.append(TreeEntry(f"d{d:03d}", Kind.DIR, tree.size, w.add_tree(tree)))
            root = Tree(tuple(top))
            tid = w.add_tree(root)
        cid = repo.save_commit(Commit(tree=tid, parents=(), author="t@example", time=1_700_000_000,
                                      message="wide", metadata={}))
        repo.refs.set_branch_if_equals("main", cid, None)
    return cid


def _rss(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")


def _walk(root: str) -> int:
    n = 0
    for dirpath, dirnames, filenames in os.walk(root):
        for name in filenames:
            os.lstat(os.path.join(dirpath, name))
            n += 1
    return n


def _drop_caches() -> None:
    os.sync()
    with open("/proc/sys/vm/drop_caches", "w") as f:
        f.write("2")  # dentries and inodes: the kernel FORGETs what it held of the mount


def test_daemon_memory_stays_bounded_while_walking_many_entries(tmp_path, mounts):
    url = str(tmp_path / "repo")
    _wide_commit(url, DIRS, PER_DIR)
    mnt = mounts.mountpoint()
    mounts.mount(url, mnt, rev="main")
    pid = lookup_daemon_pid(str(mnt))
    assert pid is not None
    os.listdir(mnt)
    base = _rss(pid)
    # 1. Every entry at once, the kernel holding all of them: the nodes are compact.
    assert _walk(str(mnt)) == DIRS * PER_DIR
    held = os.statvfs(mnt).f_files
    assert held >= DIRS * PER_DIR  # the kernel holds them all: so does the daemon's table
    grown = _rss(pid) - base
    # The old nodes cost ~600 B an entry (120 MB here); the decoded-tree cache is
    # capped on its own (64 MiB, of which these trees fill ~40).
    assert grown <= 64 * 1024 * 1024 + DIRS * PER_DIR * 150, grown
    # 2. The kernel forgets: the table shrinks back to (about) the root.
    deadline = time.monotonic() + 30
    while os.statvfs(mnt).f_files > 100 and time.monotonic() < deadline:
        _drop_caches()
        time.sleep(0.2)
    assert os.statvfs(mnt).f_files <= 100
    # 3. A second walk, one directory at a time with the kernel forgetting in
    # between, holds one directory's nodes at a time and reuses what the first
    # freed: memory does not grow by another walk's worth (~30-80 MB here).
    peak = _rss(pid)
    for d in sorted(os.listdir(mnt)):
        for name in os.listdir(mnt / d):
            os.lstat(mnt / d / name)
        _drop_caches()
    assert os.statvfs(mnt).f_files <= PER_DIR + 100
    assert _rss(pid) - peak <= 24 * 1024 * 1024, _rss(pid) - peak
