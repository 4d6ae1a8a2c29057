"""LOOKUPs answered by the C module (issue 21: a stat walk of a mount; fuse/fastpath.py's
engage_lookups, commitfs.fuse._noopen's lookup_shim): a commit directory's files, once
listed or looked up, are answered from the tables the file system publishes, and the
references they give the kernel are counted by the inode table (vfs/inode.py,
TreeInodeTable.external) so that FORGET balances.

The mounts are ``commitfs mount`` daemons (the ``mounts`` fixture unmounts them); the
counts are the ones the daemon logs at unmount.  ``COMMITFS_C_LOOKUPS=0`` turns the C
answers off, which is what each mount test compares against.
"""

from __future__ import annotations

import os
import re
import stat
import time

import pytest
import trio

from core_fixtures import cli_env, write_file
from mount_fixtures import run_commitfs
from commitfs.model.objects import Kind, TreeEntry
from commitfs.ops.snapshot import commit_directory
from commitfs.repo.repository import Repository
from commitfs.vfs.inode import FileNode, TreeDir, TreeInodeTable, View, kind_code

pytestmark = pytest.mark.timeout(300)

BIG = 1_500  # files of the big directory: past the 64 READDIRPLUS entries of an adaptive listing
FIELDS = ("st_mode", "st_nlink", "st_uid", "st_gid", "st_size", "st_blksize", "st_blocks",
          "st_mtime_ns", "st_atime_ns", "st_ctime_ns")


@pytest.fixture
def tree(tmp_path, cache_home):
    src = tmp_path / "src"
    for i in range(BIG):
        write_file(src / "big" / f"f{i:05d}.bin", b"%d\n" % i * (i % 7 + 1))
    write_file(src / "big" / "run.sh", b"#!/bin/sh\n", executable=True)
    os.symlink("f00001.bin", src / "big" / "link")
    for i in range(3):
        write_file(src / "big" / f"sub{i}" / "x.txt", b"x%d" % i)
    url = str(tmp_path / "repo")
    with Repository.init(url) as repo:
        commit_directory(repo, src, message="one")
    return url, src


def _lookup_counts(log) -> tuple[int, int, int]:
    """(LOOKUPs answered in C, of them before pyfuse3's loop, references lost)."""
    (m,) = re.findall(r"LOOKUPs answered in C: (\d+) \((\d+) before pyfuse3's loop, \d+ of them without "
                      r"its wait\); references lost: (\d+)", log.read_text())
    return tuple(int(x) for x in m)


def _attrs(st) -> tuple:
    return tuple(getattr(st, f) for f in FIELDS)


def _stat_walk(mnt, c_lookups: bool, tmp_path, name: str, mounts, adaptive: bool = True, split: bool = False):
    """Mount, list big/, lstat every entry, read some files; unmount. ({name: (d_ino, st_ino,
    attrs)}, {name: bytes}, the log)."""
    log = tmp_path / f"{name}.log"
    env = cli_env(COMMITFS_READDIRPLUS_AUTO="1" if adaptive else "0", COMMITFS_C_LOOKUPS="1" if c_lookups else "0")
    mounts.mount(mnt.url, mnt.path, "--log-file", str(log), rev="main", env=env)
    big = mnt.path / "big"
    with os.scandir(big) as it:
        listed = {e.name: e.inode() for e in it}
    out = {}
    for n, d_ino in listed.items():
        st = os.lstat(big / n)
        out[n] = (d_ino, st.st_ino, _attrs(st))
    data = {n: (big / n).read_bytes() for n in sorted(listed)[::50] + ([] if split else ["run.sh"])}
    if not split:
        data["link"] = os.readlink(big / "link").encode()
    assert run_commitfs("umount", str(mnt.path)).returncode == 0
    return out, data, log


class _Mnt:
    def __init__(self, url, path):
        self.url, self.path = url, path


@pytest.mark.parametrize("adaptive", [True, False], ids=["adaptive", "readdirplus"])
def test_a_stat_walk_after_a_listing_is_answered_in_c_with_the_attributes_python_gives(
        tree, mounts, tmp_path, adaptive):
    """Adaptive readdirplus: a listing past its first 64 entries is plain READDIR, and a
    stat of each file then LOOKUPs it; the C module answers those with exactly what
    the file system's lookup answers (the same mount with COMMITFS_C_LOOKUPS=0): every
    attribute, and an inode number equal to the listing's d_ino.  Files read right
    through those numbers, no reference is lost, and with READDIRPLUS only (the
    kernel holds every listed entry) nothing changes."""
    url, src = tree
    got, got_data, log = _stat_walk(_Mnt(url, mounts.mountpoint("c")), True, tmp_path, "c", mounts, adaptive)
    want, want_data, log_py = _stat_walk(_Mnt(url, mounts.mountpoint("py")), False, tmp_path, "py", mounts,
                                         adaptive)
    assert sorted(got) == sorted(os.listdir(src / "big"))
    for n, (d_ino, st_ino, attrs) in got.items():
        # (A subdirectory's d_ino in a plain listing is a reserved number: fs.readdir_plain.)
        assert d_ino == st_ino or stat.S_ISDIR(attrs[0]), n
        assert attrs == want[n][2], n
    assert stat.S_ISLNK(got["link"][2][0]) and got["run.sh"][2][0] & 0o111
    assert got_data == want_data
    assert all(want_data[n] == (src / "big" / n).read_bytes() for n in want_data if n != "link")
    in_c, early, lost = _lookup_counts(log)
    assert lost == 0
    if adaptive:
        assert in_c >= BIG - 64 and early >= in_c - 5  # the plain part's files, before pyfuse3's loop
    else:
        assert in_c == 0  # every listed entry came with its attributes: nothing to look up
    assert _lookup_counts(log_py)[0] == 0
    assert re.search(r"WARNING .*every LOOKUP is answered by the file system \(COMMITFS_C_LOOKUPS=0 is set\)",
                     log_py.read_text())


SPLIT = 4_500  # past the split threshold (4,096 entries, docs/FORMAT.md "Split trees"): leaves


def test_a_split_directorys_leaves_are_published_and_answered_alike(tmp_path, cache_home, mounts):
    """A directory stored as a split tree is listed and looked up a leaf at a time: each
    leaf's span is published at its own first position, and every C answer is the file
    system's (adaptive listing, then a stat of every file)."""
    from commitfs.model.splittree import SPLIT_ENTRIES
    assert SPLIT > SPLIT_ENTRIES
    src = tmp_path / "src"
    for i in range(SPLIT):
        write_file(src / "big" / f"f{i:05d}.bin", b"%d\n" % i)
    url = str(tmp_path / "repo")
    with Repository.init(url) as repo:
        commit_directory(repo, src, message="split")
    got, got_data, log = _stat_walk(_Mnt(url, mounts.mountpoint("c")), True, tmp_path, "c", mounts, split=True)
    want, want_data, _ = _stat_walk(_Mnt(url, mounts.mountpoint("py")), False, tmp_path, "py", mounts, split=True)
    assert len(got) == SPLIT and got_data == want_data
    assert all(d_ino == st_ino and attrs == want[n][2] for n, (d_ino, st_ino, attrs) in got.items())
    in_c, _, lost = _lookup_counts(log)
    assert in_c >= SPLIT - 64 and lost == 0


def test_lookups_by_path_in_a_directory_never_listed_are_answered_in_c_after_the_first(tree, mounts, tmp_path):
    """A job opening files by path (no listing): the first LOOKUP in a directory goes to
    the file system, which publishes the directory's entries; the rest are answered in C,
    with the attributes and numbers a lookup by the file system gives."""
    url, src = tree
    names = [f"f{i:05d}.bin" for i in range(0, BIG, 7)]
    seen = {}
    logs = {}
    for c in (True, False):
        log = tmp_path / f"{c}.log"
        mnt = mounts.mountpoint(f"m{c}")
        mounts.mount(url, mnt, "--log-file", str(log), rev="main", env=cli_env(COMMITFS_C_LOOKUPS="1" if c else "0"))
        seen[c] = [_attrs(os.stat(mnt / "big" / n)) for n in names]
        assert [(mnt / "big" / n).read_bytes() for n in names[::20]] == \
            [(src / "big" / n).read_bytes() for n in names[::20]]
        inos = [os.stat(mnt / "big" / n).st_ino for n in names]
        assert len(set(inos)) == len(names)
        assert run_commitfs("umount", str(mnt)).returncode == 0
        logs[c] = log
    assert seen[True] == seen[False]
    in_c, _, lost = _lookup_counts(logs[True])
    assert in_c >= len(names) - 1 and lost == 0


@pytest.mark.skipif(os.geteuid() != 0, reason="drop_caches needs root (the tests run as root)")
def test_the_kernel_forgetting_what_c_answered_empties_the_table(tree, mounts, tmp_path):
    """Every reference a C answer gave the kernel is counted once: after a stat walk the
    table holds every file (statvfs's f_files is its size), and once the kernel forgets
    (drop_caches) it shrinks back to about the root; the files look up (and read) right
    again afterwards, through new tables."""
    url, src = tree
    log = tmp_path / "m.log"
    mnt = mounts.mountpoint()
    mounts.mount(url, mnt, "--log-file", str(log), rev="main", env=cli_env(COMMITFS_READDIRPLUS_AUTO="1"))
    big = mnt / "big"
    for _round in range(2):
        names = os.listdir(big)
        for n in names:
            os.lstat(big / n)
        assert os.statvfs(mnt).f_files >= len(names)
        deadline = time.monotonic() + 30
        while os.statvfs(mnt).f_files > 20 and time.monotonic() < deadline:
            os.sync()
            with open("/proc/sys/vm/drop_caches", "w") as f:
                f.write("2")
            time.sleep(0.2)
        assert os.statvfs(mnt).f_files <= 20
    assert (big / "f00042.bin").read_bytes() == (src / "big" / "f00042.bin").read_bytes()
    assert run_commitfs("umount", str(mnt)).returncode == 0
    in_c, _, lost = _lookup_counts(log)
    assert in_c >= 2 * (BIG - 64) and lost == 0


class _External:
    """A stand-in for fastpath.CLookups: references "answered" outside, taken by the table."""

    def __init__(self):
        self.pending: list[tuple] = []
        self.dropped_dirs: list[int] = []

    def take(self):
        out, self.pending = self.pending, []
        return out or None

    def dropped(self, dir_ino: int) -> None:
        self.dropped_dirs.append(dir_ino)


def test_the_table_counts_external_references_before_it_forgets_drops_or_resolves():
    """TreeInodeTable.external, without a kernel: a reference counted outside is taken
    before a lookup of its number (get), a forget, a block's discard and len(); the
    block's departure is told; a reference to a block that is gone is counted as lost."""
    view = View(b"c" * 32, b"t" * 32, 0)
    root = TreeDir(view, TreeEntry("", Kind.DIR, 0, b"t" * 32))
    entries = [TreeEntry(f"f{i}", Kind.FILE, 10 + i, b"%032d" % i) for i in range(5)]
    table = TreeInodeTable(root, lambda b, pos: FileNode(view, entries[pos], b, pos))
    ext = table.external = _External()
    b = table.block(root, len(entries))
    assert not b.live
    ext.pending.append((root.ino, b.base, 3, kind_code(Kind.FILE), 13))
    table.discard_block(b)  # the pending reference holds the block
    assert b.live == 1 and ext.dropped_dirs == []
    ext.pending.append((root.ino, b.base, 1, kind_code(Kind.FILE), 11))
    node = table.get(b.base + 1)
    assert node.size == 11 and node.pos == 1
    ext.pending.append((root.ino, b.base, 1, kind_code(Kind.FILE), 11))
    assert len(table) == 1 + 2  # the root, two entries
    table.forget(b.base + 1, 2)
    assert b.base + 1 not in table
    ext.pending.append((root.ino, b.base, 3, kind_code(Kind.FILE), 13))
    table.forget(b.base + 3, 1)  # taken first: one of its two references is left
    assert b.base + 3 in table
    table.forget(b.base + 3, 1)
    assert ext.dropped_dirs == [root.ino] and len(table) == 1
    ext.pending.append((root.ino, b.base, 2, kind_code(Kind.FILE), 12))  # its block is gone
    assert len(table) == 1 and table.external_lost == 1


@pytest.mark.timeout(60)
def test_the_c_module_answers_no_lookup_before_it_is_engaged():
    """publish() before lookups(True) keeps nothing (every LOOKUP is pyfuse3's), and
    lookups(True) needs a session that went through the wrapper (in a subprocess: the
    module joins the global scope of the process that loads it)."""
    import subprocess
    import sys

    pytest.importorskip("commitfs.fuse._noopen")
    code = (
        "from commitfs.fuse import _noopen\n"
        "from commitfs.model.objects import Kind, TreeEntry\n"
        "e = [TreeEntry('a', Kind.FILE, 1, b'x')]\n"
        "print(_noopen.publish(5, 100, 0, e, 0, 1.0), _noopen.take_lookups(), _noopen.lookup_counts())\n"
        "try:\n"
        "    _noopen.lookups(True, 0, 0, (Kind.FILE, Kind.EXEC, Kind.SYMLINK), 4096)\n"
        "except RuntimeError as exc:\n"
        "    print('refused')\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=30, env=cli_env())
    assert out.returncode == 0, out.stderr
    assert out.stdout.splitlines() == ["False None (0, 0, 0, 0, 0)", "refused"]
