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


# --- hard links ----------------------------------------------------------------------------
def _hard_link_story(root: Path) -> list:
    """The same hard-link operations on a workspace and on a plain directory; what
    every step observes (errnos, link counts, which names share an inode, bytes)."""
    seen: list = []

    def names(*paths) -> tuple:
        sts = [os.lstat(root / p) for p in paths]
        return tuple(st.st_nlink for st in sts), tuple(st.st_ino == sts[0].st_ino for st in sts)

    (root / "sub").mkdir()
    (root / "f").write_bytes(b"first")
    os.link(root / "f", root / "g")
    os.link(root / "g", root / "sub" / "h")
    seen.append(("linked", names("f", "g", "sub/h")))
    with open(root / "g", "ab") as out:  # a write through one name shows through the others
        out.write(b"+g")
    os.chmod(root / "sub" / "h", 0o600)
    seen.append(("shared", (root / "f").read_bytes(), (root / "sub" / "h").read_bytes(),
                 oct(os.stat(root / "f").st_mode)))
    seen.append(("errnos", errno_of(lambda: os.link(root / "sub", root / "dirlink")),
                 errno_of(lambda: os.link(root / "f", root / "g")),
                 errno_of(lambda: os.link(root / "nope", root / "x")),
                 errno_of(lambda: os.link(root / "f", root / "nodir" / "x")),
                 errno_of(lambda: os.link(root / "f", root / ("n" * 256)))))
    os.unlink(root / "f")  # the first name goes: the data stays for the others
    seen.append(("unlinked first", names("g", "sub/h"), (root / "g").read_bytes(),
                 os.path.exists(root / "f")))
    # rename over a hard link: only that name is replaced
    (root / "other").write_bytes(b"other")
    os.rename(root / "other", root / "g")
    seen.append(("renamed over", names("sub/h"), (root / "g").read_bytes(), (root / "sub" / "h").read_bytes()))
    # rename of one name onto another name of the same node: nothing happens (POSIX)
    os.link(root / "sub" / "h", root / "h2")
    os.rename(root / "h2", root / "sub" / "h")
    seen.append(("same node", names("sub/h", "h2")))
    os.rename(root / "h2", root / "moved")  # renaming a link keeps the node
    seen.append(("moved", names("sub/h", "moved"), (root / "moved").read_bytes()))
    # a symlink and a FIFO can be linked too; the link is of the symlink itself
    os.symlink("moved", root / "sl")
    os.link(root / "sl", root / "sl2", follow_symlinks=False)
    os.mkfifo(root / "fifo")
    os.link(root / "fifo", root / "fifo2")
    seen.append(("kinds", names("sl", "sl2"), os.readlink(root / "sl2"), names("fifo", "fifo2")))
    # an open file keeps working while its names go one by one
    with open(root / "moved", "r+b") as f:
        os.unlink(root / "moved")
        seen.append(("open", os.fstat(f.fileno()).st_nlink, names("sub/h")))
        os.unlink(root / "sub" / "h")
        f.write(b"W")
        f.seek(0)
        seen.append(("last", os.fstat(f.fileno()).st_nlink, f.read()))
    # rmdir of a directory holding one name of a linked file leaves the other name
    (root / "d2").mkdir()
    (root / "keep").write_bytes(b"keep")
    os.link(root / "keep", root / "d2" / "k")
    os.unlink(root / "d2" / "k")
    os.rmdir(root / "d2")
    seen.append(("rmdir", names("keep"), (root / "keep").read_bytes()))
    os.link(root / "keep", root / "keep2")
    return seen


def _exchange(a: Path, b: Path) -> None:
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    if libc.renameat2(-100, os.fsencode(a), -100, os.fsencode(b), 2) != 0:  # AT_FDCWD, RENAME_EXCHANGE
        raise OSError(ctypes.get_errno(), "renameat2")


def test_hard_links_behave_as_on_ext4_and_survive_remount_and_a_crash(ws, tmp_path):
    mnt = ws.mount()
    plain = tmp_path / "plain"
    plain.mkdir()
    assert _hard_link_story(mnt) == _hard_link_story(plain)
    # A committed, untouched file: linked without a copy-up, then written through the link.
    base = (ws.src / "fixed" / "big.bin").read_bytes()
    os.link(mnt / "fixed" / "big.bin", mnt / "big-link")
    assert os.stat(mnt / "fixed" / "big.bin").st_nlink == 2
    assert (mnt / "big-link").read_bytes() == base
    with open(mnt / "big-link", "r+b") as f:
        f.write(b"EDIT")
    assert (mnt / "fixed" / "big.bin").read_bytes() == b"EDIT" + base[4:]
    # A link from another mount (a read-only mount of the same branch) is EXDEV, the kernel's answer.
    ro = ws.mounts.mountpoint("ro")
    ws.mounts.mount(ws.url, ro, rev="main")
    assert errno_of(lambda: os.link(ro / "fixed" / "big.bin", mnt / "from-ro")) == errno.EXDEV
    assert errno_of(lambda: os.link(mnt / "keep", tmp_path / "plain" / "to-tmp")) == errno.EXDEV
    ws.umount(ro)
    inos = {p: os.stat(mnt / p).st_ino for p in ("keep", "keep2")}
    assert inos["keep"] == inos["keep2"]
    # rename(RENAME_EXCHANGE) of a linked file and a directory is kept too.
    (mnt / "xd").mkdir()
    (mnt / "xd" / "in").write_bytes(b"in")
    os.link(mnt / "keep2", mnt / "xf")
    _exchange(mnt / "xf", mnt / "xd")
    os.unlink(mnt / "xd")
    ws.umount(mnt)
    mnt = ws.mount()
    assert (mnt / "xf" / "in").read_bytes() == b"in" and not os.path.exists(mnt / "xd")
    assert (mnt / "big-link").read_bytes() == b"EDIT" + base[4:]  # the write through the link, kept
    for pair in (("keep", "keep2"), ("fixed/big.bin", "big-link"), ("sl", "sl2")):
        a, b = (os.lstat(mnt / p) for p in pair)
        assert a.st_ino == b.st_ino and a.st_nlink == b.st_nlink == 2, pair
    # A link made and fsync'd just before the daemon is killed is there after the crash.
    os.link(mnt / "keep", mnt / "keep3")
    os.unlink(mnt / "keep")  # the first name goes: "keep2" holds the node's row now
    dfd = os.open(mnt, os.O_RDONLY)
    os.fsync(dfd)
    os.close(dfd)
    ws.kill(mnt)
    mnt = ws.mount()
    a, b = os.stat(mnt / "keep2"), os.stat(mnt / "keep3")
    assert a.st_ino == b.st_ino and a.st_nlink == 2 and not os.path.exists(mnt / "keep")
    with open(mnt / "keep3", "ab") as f:
        f.write(b"!")
    assert (mnt / "keep2").read_bytes() == b"keep!"


def test_a_commit_records_a_hard_link_as_two_entries_with_one_content_id(ws, tmp_path):
    from commitfs.ops.browse import lookup_path
    from commitfs.repo.repository import Repository

    mnt = ws.mount()
    (mnt / "data.bin").write_bytes(os.urandom(300_000))
    os.mkdir(mnt / "again")
    os.link(mnt / "data.bin", mnt / "again" / "data.bin")
    os.link(mnt / "fixed" / "big.bin", mnt / "big-link")  # an untouched file: re-linked by id
    ws.cli("commit", str(mnt), "-m", "hard links").check_returncode()
    with Repository.open(ws.url) as repo:
        head = repo.refs.lookup_branch("main")
        e1, e2 = (lookup_path(repo, head, p) for p in ("data.bin", "again/data.bin"))
        b1, b2 = (lookup_path(repo, head, p) for p in ("fixed/big.bin", "big-link"))
    assert e1.id == e2.id and e1.size == 300_000
    assert b1.id == b2.id
    out = tmp_path / "co"
    ws.cli("-r", ws.url, "checkout", "main", str(out)).check_returncode()
    assert (out / "data.bin").read_bytes() == (out / "again" / "data.bin").read_bytes()
    # The workspace now shows the commit, where the names are two files (the format has
    # no hard links): link count 1 each, and a write to one leaves the other alone.
    a, b = os.stat(mnt / "data.bin"), os.stat(mnt / "again" / "data.bin")
    assert a.st_nlink == b.st_nlink == 1 and a.st_ino != b.st_ino
    with open(mnt / "data.bin", "r+b") as f:
        f.write(b"X")
    assert (mnt / "again" / "data.bin").read_bytes() == (out / "data.bin").read_bytes()
    status = json.loads(ws.cli("status", str(mnt), "--json").stdout)["changes"]
    assert [c["path"] for c in status] == ["data.bin"]


@needs_root
def test_cp_al_into_a_workspace_succeeds_and_commits_what_a_directory_would(ws, tmp_path):
    src = tmp_path / "batch"
    src.mkdir()
    _owned_tree(src)
    mnt = ws.mount()
    proc = subprocess.run(["cp", "-a", str(src), str(mnt / "c")], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0 and proc.stderr == "", proc.stderr
    proc = subprocess.run(["cp", "-al", str(mnt / "c"), str(mnt / "l")], capture_output=True, text=True,
                          timeout=60)
    assert proc.returncode == 0 and proc.stderr == "", proc.stderr
    compare_trees(mnt / "l", src)
    for rel in ("d/a.txt", "d/e/b.bin", "run.sh"):
        a, b = os.lstat(mnt / "c" / rel), os.lstat(mnt / "l" / rel)
        assert a.st_ino == b.st_ino and a.st_nlink == 2, rel
    assert _owners(mnt / "l") == _owners(src)
    ws.cli("commit", str(mnt), "-m", "cp -al").check_returncode()
    plain = tmp_path / "plain"
    for dest in ("c", "l"):
        shutil.copytree(src, plain / dest, symlinks=True)
    normalize_modes(plain)
    out = tmp_path / "co"
    ws.cli("-r", ws.url, "checkout", "main", str(out)).check_returncode()
    for dest in ("c", "l"):
        compare_trees(out / dest, plain / dest, modes=False)


def test_reset_of_a_path_takes_out_only_the_names_below_it(ws):
    mnt = ws.mount()
    (mnt / "d").mkdir()
    (mnt / "d" / "f").write_bytes(b"linked")
    os.link(mnt / "d" / "f", mnt / "outside")  # one name inside d, one outside
    os.link(mnt / "d" / "f", mnt / "d" / "g")  # two names inside d
    (mnt / "d" / "only").write_bytes(b"only")
    os.link(mnt / "d" / "only", mnt / "d" / "only2")
    os.link(mnt / "fixed" / "big.bin", mnt / "big-link")
    # reset of a directory the base does not have: it goes, the name outside stays
    ws.cli("reset", str(mnt), "d").check_returncode()
    assert not os.path.exists(mnt / "d")
    assert (mnt / "outside").read_bytes() == b"linked" and os.stat(mnt / "outside").st_nlink == 1
    # reset of one name of a committed file: the link name goes, the base file is itself again
    ws.cli("reset", str(mnt), "big-link").check_returncode()
    assert not os.path.exists(mnt / "big-link") and os.stat(mnt / "fixed" / "big.bin").st_nlink == 1
    ws.umount(mnt)
    mnt = ws.mount()
    assert (mnt / "outside").read_bytes() == b"linked" and not os.path.exists(mnt / "d")
    status = json.loads(ws.cli("status", str(mnt), "--json").stdout)["changes"]
    assert [c["path"] for c in status] == ["outside"]
    # reset of everything drops every name the base does not have, links included
    os.link(mnt / "outside", mnt / "fixed" / "inside")
    os.link(mnt / "fixed" / "run.sh", mnt / "run-link")
    ws.cli("reset", str(mnt)).check_returncode()
    assert not any(os.path.exists(mnt / p) for p in ("outside", "fixed/inside", "run-link"))
    assert os.stat(mnt / "fixed" / "run.sh").st_nlink == 1
    assert json.loads(ws.cli("status", str(mnt), "--json").stdout)["changes"] == []
