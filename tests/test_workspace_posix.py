"""POSIX in a writable workspace (issue 18): owners, times, name lengths, and the
tools that use them (rsync -a, tar x, cp -a as root), on a real workspace mount.

Owners and the atime/ctime are kept by the workspace (its overlay, so across a
remount) and are not part of a commit: docs/SEMANTICS.md, "Writable workspaces".
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import subprocess
import tarfile
from pathlib import Path

import pytest

from workspace_fixtures import compare_trees, normalize_modes

pytestmark = pytest.mark.timeout(120)

needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="changing owners needs root (CI runs as root)")


def errno_of(fn) -> int | None:
    try:
        fn()
    except OSError as exc:
        return exc.errno
    return None


def _owned_tree(root: Path) -> None:
    """A small tree with several owners, modes, times and a symlink."""
    (root / "d" / "e").mkdir(parents=True)
    (root / "d" / "a.txt").write_bytes(b"alpha\n")
    (root / "d" / "e" / "b.bin").write_bytes(os.urandom(70_000))
    (root / "run.sh").write_bytes(b"#!/bin/sh\necho hi\n")
    os.chmod(root / "run.sh", 0o755)
    os.symlink("d/a.txt", root / "link")
    os.chown(root / "d" / "a.txt", 1234, 5678)
    os.chown(root / "d" / "e", 4321, 8765)
    os.lchown(root / "link", 1111, 2222)
    os.utime(root / "d" / "a.txt", ns=(1_400_000_000_000_000_000, 1_500_000_000_000_000_000))


def _owners(root: Path) -> dict[str, tuple[int, int]]:
    out = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            full = os.path.join(dirpath, name)
            st = os.lstat(full)
            out[os.path.relpath(full, root)] = (st.st_uid, st.st_gid)
    return out


@needs_root
def test_chown_is_kept_per_node_and_survives_a_remount(ws):
    mnt = ws.mount()
    target = mnt / "fixed" / "big.bin"  # a committed, untouched file
    os.chown(target, 1234, 5678)
    os.chown(mnt / "fixed", 42, 43)  # a committed directory
    (mnt / "mine").write_bytes(b"x")
    os.lchown(mnt / "mine", -1, 99)  # chgrp only
    os.symlink("mine", mnt / "sl")
    os.lchown(mnt / "sl", 7, 8)  # the symlink itself, not its target
    assert (os.stat(target).st_uid, os.stat(target).st_gid) == (1234, 5678)
    assert (os.stat(mnt / "fixed").st_uid, os.stat(mnt / "fixed").st_gid) == (42, 43)
    assert (os.stat(mnt / "mine").st_uid, os.stat(mnt / "mine").st_gid) == (0, 99)
    assert (os.lstat(mnt / "sl").st_uid, os.lstat(mnt / "sl").st_gid) == (7, 8)
    assert os.stat(mnt / "mine").st_uid == 0  # the symlink's chown left its target alone
    assert target.read_bytes() == (ws.src / "fixed" / "big.bin").read_bytes()
    ws.umount(mnt)
    mnt = ws.mount()
    assert (os.stat(mnt / "fixed" / "big.bin").st_uid, os.stat(mnt / "fixed" / "big.bin").st_gid) == (1234, 5678)
    assert (os.lstat(mnt / "sl").st_uid, os.lstat(mnt / "sl").st_gid) == (7, 8)
    # A commit does not record owners: the committed tree is the same bytes.
    ws.cli("commit", str(mnt), "-m", "owners").check_returncode()
    status = json.loads(ws.cli("status", str(mnt), "--json").stdout)["changes"]
    assert status == []


def test_times_follow_posix(ws):
    mnt = ws.mount()
    p = mnt / "t.txt"
    p.write_bytes(b"one")
    # utimensat with UTIME_OMIT for mtime: only the atime changes.
    os.utime(p, ns=(1_000_000_000_000_000_000, os.stat(p).st_mtime_ns))
    st = os.stat(p)
    assert st.st_atime_ns == 1_000_000_000_000_000_000
    os.utime(p, ns=(1_100_000_000_000_000_000, 1_200_000_000_000_000_000))
    st = os.stat(p)
    assert (st.st_atime_ns, st.st_mtime_ns) == (1_100_000_000_000_000_000, 1_200_000_000_000_000_000)
    # chmod moves the ctime and nothing else.
    before = os.stat(p)
    assert before.st_ctime_ns > before.st_mtime_ns  # utime is a status change itself
    os.chmod(p, 0o600)
    after = os.stat(p)
    assert after.st_ctime_ns >= before.st_ctime_ns
    assert after.st_mtime_ns == before.st_mtime_ns == 1_200_000_000_000_000_000
    # A write moves mtime and ctime together.
    with open(p, "r+b") as f:
        f.write(b"two")
    st = os.stat(p)
    assert st.st_mtime_ns > 1_200_000_000_000_000_000 and st.st_ctime_ns == st.st_mtime_ns
    # utimensat(UTIME_NOW, UTIME_NOW) (touch): both the same "now" (the kernel's
    # clock, which is coarser than the write's, so no ordering against it).
    os.utime(p, ns=(1_100_000_000_000_000_000, 1_200_000_000_000_000_000))
    os.utime(p)
    st2 = os.stat(p)
    assert st2.st_mtime_ns > 1_700_000_000_000_000_000 and st2.st_atime_ns == st2.st_mtime_ns
    # The times are kept across a remount.
    os.utime(p, ns=(1_300_000_000_000_000_000, 1_400_000_000_000_000_000))
    ws.umount(mnt)
    mnt = ws.mount()
    st = os.stat(mnt / "t.txt")
    assert (st.st_atime_ns, st.st_mtime_ns) == (1_300_000_000_000_000_000, 1_400_000_000_000_000_000)


def test_names_over_name_max_are_enametoolong(ws):
    mnt = ws.mount()
    long = "n" * 256
    assert errno_of(lambda: (mnt / long).write_bytes(b"x")) == errno.ENAMETOOLONG
    assert errno_of(lambda: os.mkdir(mnt / long)) == errno.ENAMETOOLONG
    assert errno_of(lambda: os.symlink("t", mnt / long)) == errno.ENAMETOOLONG
    (mnt / "short").write_bytes(b"x")
    assert errno_of(lambda: os.rename(mnt / "short", mnt / long)) == errno.ENAMETOOLONG
    (mnt / ("m" * 255)).write_bytes(b"ok")  # NAME_MAX itself is fine
    assert (mnt / ("m" * 255)).read_bytes() == b"ok"


@needs_root
def test_rsync_tar_and_cp_as_root_succeed_and_commit_what_a_directory_would(ws, tmp_path):
    src = tmp_path / "batch"
    src.mkdir()
    _owned_tree(src)
    mnt = ws.mount()
    for tool, dest in (("rsync", "r"), ("tar", "t"), ("cp", "c")):
        if shutil.which(tool) is None:
            pytest.fail(f"{tool} is not installed (scripts/setup.sh installs it)")
    proc = subprocess.run(["rsync", "-a", f"{src}/", f"{mnt}/r/"], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0 and proc.stderr == "", proc.stderr
    tar = tmp_path / "batch.tar"
    with tarfile.open(tar, "w") as tf:
        tf.add(src, arcname=".")
    os.mkdir(mnt / "t")
    proc = subprocess.run(["tar", "xf", str(tar), "-C", str(mnt / "t")], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0 and proc.stderr == "", proc.stderr
    proc = subprocess.run(["cp", "-a", str(src), str(mnt / "c")], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0 and proc.stderr == "", proc.stderr
    want = _owners(src)
    for dest in ("r", "t", "c"):
        compare_trees(mnt / dest, src)
        assert _owners(mnt / dest) == want, dest
        assert os.stat(mnt / dest / "d" / "a.txt").st_mtime_ns == 1_500_000_000_000_000_000
    # The commit holds what a plain directory commit of the same tree would.
    ws.cli("commit", str(mnt), "-m", "batches").check_returncode()
    plain = tmp_path / "plain"
    for dest in ("r", "t", "c"):
        shutil.copytree(src, plain / dest, symlinks=True)
    normalize_modes(plain)
    out = tmp_path / "co"
    ws.cli("-r", ws.url, "checkout", "main", str(out)).check_returncode()
    for dest in ("r", "t", "c"):
        compare_trees(out / dest, plain / dest, modes=False)



@needs_root
def test_fifos_sockets_devices_and_regular_mknod_are_kept_and_skipped_by_a_commit(ws, tmp_path):
    import socket
    import stat

    mnt = ws.mount()
    os.mkfifo(mnt / "fifo", 0o640)
    os.mknod(mnt / "null", 0o666 | stat.S_IFCHR, os.makedev(1, 3))
    os.mknod(mnt / "plain", 0o600 | stat.S_IFREG)  # mknod of a regular file
    s = socket.socket(socket.AF_UNIX)
    try:
        s.bind(str(mnt / "sock"))
    finally:
        s.close()
    st = os.lstat(mnt / "fifo")
    assert stat.S_ISFIFO(st.st_mode) and stat.S_IMODE(st.st_mode) == 0o640
    st = os.lstat(mnt / "null")
    assert stat.S_ISCHR(st.st_mode) and st.st_rdev == os.makedev(1, 3)
    assert stat.S_ISSOCK(os.lstat(mnt / "sock").st_mode)
    st = os.lstat(mnt / "plain")
    assert stat.S_ISREG(st.st_mode) and st.st_size == 0 and stat.S_IMODE(st.st_mode) == 0o600
    (mnt / "plain").write_bytes(b"regular")
    os.chmod(mnt / "fifo", 0o600)
    assert stat.S_ISFIFO(os.lstat(mnt / "fifo").st_mode)  # chmod keeps the type
    # A FIFO works as one (the kernel serves it), and all of them survive a remount.
    ws.umount(mnt)
    mnt = ws.mount()
    assert stat.S_ISFIFO(os.lstat(mnt / "fifo").st_mode)
    assert os.lstat(mnt / "null").st_rdev == os.makedev(1, 3)
    os.unlink(mnt / "sock")
    assert not os.path.lexists(mnt / "sock")
    # A commit skips the special files (the format holds files, directories, symlinks).
    ws.cli("commit", str(mnt), "-m", "specials").check_returncode()
    out = tmp_path / "co"
    ws.cli("-r", ws.url, "checkout", "main", str(out)).check_returncode()
    assert (out / "plain").read_bytes() == b"regular"
    assert not os.path.lexists(out / "fifo") and not os.path.lexists(out / "null")


def test_unlinked_open_file_has_nlink_0_and_symlink_xattrs_are_consistent(ws):
    mnt = ws.mount()
    (mnt / "f").write_bytes(b"x")
    with open(mnt / "f", "rb") as f:
        assert os.fstat(f.fileno()).st_nlink == 1
        os.unlink(mnt / "f")
        assert os.fstat(f.fileno()).st_nlink == 0
        assert f.read() == b"x"
    with open(mnt / "fixed" / "big.bin", "rb") as f:  # an untouched file
        os.unlink(mnt / "fixed" / "big.bin")
        assert os.fstat(f.fileno()).st_nlink == 0
    os.symlink("target", mnt / "sl")
    for link in [mnt / "sl"] + [p for p in mnt.rglob("*") if p.is_symlink()]:
        for name in os.listxattr(link, follow_symlinks=False):
            os.getxattr(link, name, follow_symlinks=False)  # every listed name is readable
    assert os.listxattr(mnt / "sl", follow_symlinks=False) == []
    assert os.getxattr(mnt, "user.commitfs.branch") == b"main"


def test_st_blocks_is_what_the_overlay_holds(ws, tmp_path):
    mnt = ws.mount()
    plain = tmp_path / "plain"
    plain.mkdir()
    for root in (mnt, plain):
        with open(root / "sparse", "wb") as f:
            f.seek(64 << 20)
            f.write(b"end")  # 64 MiB of hole, then 3 bytes
    st, ref = os.stat(mnt / "sparse"), os.stat(plain / "sparse")
    assert st.st_size == ref.st_size == (64 << 20) + 3
    assert st.st_blocks < 1024, st.st_blocks  # not 64 MiB / 512: the hole takes nothing
    (mnt / "dense").write_bytes(os.urandom(1 << 20))
    assert os.stat(mnt / "dense").st_blocks >= (1 << 20) // 512
