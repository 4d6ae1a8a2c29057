"""A POSIX suite of our own, after pjdfstest (issue 18): every case runs on a plain
directory of the local disk (ext4 here: the reference) and in a workspace mounted with
``--allow-other``, and both must observe the same thing (results, errnos, owners,
modes, link counts, which times moved).

pjdfstest itself cannot be fetched here; these cases cover the syscalls it covers
(chmod, chown, link, mkdir, mkfifo, mknod, open, rename, rmdir, symlink, truncate,
ftruncate, unlink, utimensat) and their errnos, as root and as a second user
(uid 65534, ``nobody``; a forked child drops to it), under the mount's
``default_permissions``.  A case where the workspace must differ because FUSE itself
cannot do it (or that it answers differently by a documented choice) is xfail'ed
(strict) with its reason, and listed in docs/SEMANTICS.md ("POSIX suite").

The workspace is mounted once for the module; each case works in a fresh directory
of its own on both sides.
"""

from __future__ import annotations

import ctypes
import errno
import os
import pickle
import random
import shutil
import stat
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from core_fixtures import make_random_tree
from mount_fixtures import Mounts
from commitfs.ops.snapshot import commit_directory
from commitfs.repo.repository import Repository

pytestmark = [
    pytest.mark.timeout(120),
    pytest.mark.skipif(os.geteuid() != 0, reason="a second user and chown need root (CI runs as root)"),
]

NOBODY, NOGROUP = 65534, 65534
#: A group ``nobody`` is not a member of.
OTHER_GID = 4242
#: ext4's clock is coarse (jiffies): wait this long before an operation whose times we compare.
TICK_S = 0.02
LONG = "n" * 256  # NAME_MAX + 1


# --- the two file systems -------------------------------------------------------------------
@pytest.fixture(scope="module")
def roots():
    """(plain directory, workspace mount), both reachable by ``nobody``."""
    base = Path(tempfile.mkdtemp(prefix="commitfs-posix-", dir="/tmp"))
    os.chmod(base, 0o755)
    mp = pytest.MonkeyPatch()
    mp.setenv("XDG_CACHE_HOME", str(base / "xdg-cache"))
    mp.setenv("COMMITFS_AUTHOR", "tester@example")
    mp.delenv("COMMITFS_REPO", raising=False)
    old_umask = os.umask(0o022)
    mounts = Mounts(base, base / "xdg-cache" / "commitfs")
    try:
        src = base / "src"
        make_random_tree(src, random.Random(7), big=1 << 16)
        url = str(base / "repo")
        with Repository.init(url) as repo:
            commit_directory(repo, src, message="base")
        plain = base / "plain"
        plain.mkdir(mode=0o755)
        mnt = mounts.mountpoint("mnt")
        os.chmod(mnt, 0o755)
        mounts.mount(url, mnt, "--writable", "--workspace", str(base / "ws"), "--allow-other", rev="main")
        yield plain, mnt
    finally:
        mounts.cleanup()
        os.umask(old_umask)
        mp.undo()
        shutil.rmtree(base, ignore_errors=True)


def as_nobody(fn: Callable[[], object], uid: int = NOBODY, gid: int = NOGROUP):
    """``fn()`` in a forked child running as ``uid``:``gid`` (no supplementary groups):
    its result, or the errno name it raised."""
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: never returns into pytest
        try:
            os.close(r)
            os.setgroups([])
            os.setresgid(gid, gid, gid)
            os.setresuid(uid, uid, uid)
            res = outcome(fn)
        except BaseException as exc:  # noqa: BLE001 - reported to the parent
            res = f"child failed: {exc!r}"
        os.write(w, pickle.dumps(res))
        os._exit(0)
    os.close(w)
    chunks = []
    while True:
        b = os.read(r, 65536)
        if not b:
            break
        chunks.append(b)
    os.close(r)
    os.waitpid(pid, 0)
    return pickle.loads(b"".join(chunks))


def outcome(fn: Callable[[], object]):
    """What ``fn()`` returned, or the name of the errno it raised."""
    try:
        out = fn()
    except OSError as exc:
        return errno.errorcode.get(exc.errno, exc.errno)
    return "ok" if out is None else out


E = outcome


class T:
    """One case's directory on one side, and helpers."""

    def __init__(self, root: Path):
        self.root = root

    def __truediv__(self, name: str) -> Path:
        return self.root / name

    def file(self, name: str, data: bytes = b"data", mode: int = 0o644, owner=None) -> Path:
        p = self.root / name
        p.write_bytes(data)
        os.chmod(p, mode)
        if owner is not None:
            os.chown(p, *owner)
        return p

    def dir(self, name: str, mode: int = 0o755, owner=None) -> Path:
        p = self.root / name
        p.mkdir()
        os.chmod(p, mode)
        if owner is not None:
            os.chown(p, *owner)
        return p

    def pub(self, name: str = "pub") -> Path:
        """A directory anyone may write in."""
        return self.dir(name, 0o777)

    @staticmethod
    def tick() -> None:
        time.sleep(TICK_S)

    nobody = staticmethod(as_nobody)


def mode(p: Path) -> str:
    return oct(os.lstat(p).st_mode)


def owner(p: Path) -> tuple[int, int]:
    st = os.lstat(p)
    return st.st_uid, st.st_gid


def times_moved(before: os.stat_result, after: os.stat_result) -> tuple[bool, bool]:
    """(mtime moved, ctime moved)."""
    return after.st_mtime_ns != before.st_mtime_ns, after.st_ctime_ns != before.st_ctime_ns


def nlinks(*paths: Path) -> tuple:
    sts = [os.lstat(p) for p in paths]
    return tuple(s.st_nlink for s in sts), all(s.st_ino == sts[0].st_ino for s in sts)


_libc = ctypes.CDLL(None, use_errno=True)
RENAME_NOREPLACE, RENAME_EXCHANGE = 1, 2


def utimensat_omit(p: Path) -> None:
    """utimensat(p, {UTIME_OMIT, UTIME_OMIT}) (os.utime cannot omit both)."""
    class Timespec(ctypes.Structure):
        _fields_ = [("tv_sec", ctypes.c_long), ("tv_nsec", ctypes.c_long)]
    omit = (1 << 30) - 2
    times = (Timespec * 2)(Timespec(0, omit), Timespec(0, omit))
    if _libc.utimensat(-100, os.fsencode(p), times, 0) != 0:
        e = ctypes.get_errno()
        raise OSError(e, os.strerror(e))


def renameat2(old: Path, new: Path, flags: int) -> None:
    AT_FDCWD = -100
    if _libc.renameat2(AT_FDCWD, os.fsencode(old), AT_FDCWD, os.fsencode(new), flags) != 0:
        e = ctypes.get_errno()
        raise OSError(e, os.strerror(e))


# --- the cases --------------------------------------------------------------------------------
CASES: dict[str, Callable[[T], list]] = {}
#: Cases the workspace answers differently from the local disk: name -> reason (FUSE
#: itself cannot do it, or a documented choice); docs/SEMANTICS.md, "POSIX suite",
#: lists the same.  Each is xfail'ed strictly: it fails the suite once it passes.
DIFFERENCES: dict[str, str] = {}


def case(fn):
    CASES[fn.__name__] = fn
    return fn


# chmod --------------------------------------------------------------------------------------
@case
def chmod_sets_every_bit_on_files_and_directories(t):
    f, d = t.file("f"), t.dir("d")
    out = []
    for m in (0o4751, 0o2711, 0o1777, 0o0, 0o644):
        os.chmod(f, m)
        os.chmod(d, m | 0o700)
        out.append((mode(f), mode(d)))
    return out


@case
def chmod_moves_ctime_not_mtime(t):
    f, d = t.file("f"), t.dir("d")
    b, bd = os.stat(f), os.stat(d)
    t.tick()
    os.chmod(f, 0o600)
    os.chmod(d, 0o700)
    return [times_moved(b, os.stat(f)), times_moved(bd, os.stat(d))]


@case
def chmod_follows_symlinks(t):
    f = t.file("f")
    os.symlink("f", t / "l")
    os.chmod(t / "l", 0o600)
    return [mode(f), mode(t / "l")]


@case
def chmod_errnos(t):
    f = t.file("f")
    return [E(lambda: os.chmod(t / "nope", 0o600)), E(lambda: os.chmod(f / "x", 0o600)),
            E(lambda: os.chmod(t / LONG, 0o600)), E(lambda: os.chmod(t / "nope" / "x", 0o600)),
            E(lambda: os.chmod(t / ("a/" * 2049), 0o600))]  # over PATH_MAX


@case
def chmod_by_non_owner_is_eperm_by_owner_works(t):
    mine = t.file("mine", mode=0o666)
    theirs = t.file("theirs", owner=(NOBODY, NOGROUP))
    return [t.nobody(lambda: os.chmod(mine, 0o600)), mode(mine),
            t.nobody(lambda: os.chmod(theirs, 0o600)), mode(theirs)]


@case
def chmod_by_owner_outside_the_group_drops_setgid(t):
    f = t.file("f", owner=(NOBODY, OTHER_GID))
    d = t.dir("d", owner=(NOBODY, OTHER_GID))
    return [t.nobody(lambda: os.chmod(f, 0o2755)), mode(f), t.nobody(lambda: os.chmod(d, 0o2755)), mode(d)]


# chown -------------------------------------------------------------------------------------
@case
def chown_sets_owner_and_moves_ctime(t):
    f, d = t.file("f"), t.dir("d")
    b = os.stat(f)
    t.tick()
    os.chown(f, 1234, 5678)
    os.chown(d, 4321, -1)
    a = os.stat(f)
    os.chown(f, -1, -1)
    return [owner(f), owner(d), times_moved(b, a), owner(f)]


@case
def chown_to_the_same_owner_moves_ctime_utimensat_omitting_both_does_not(t):
    """chown(-1, -1) is a status change (ctime moves, on ext4 too); utimensat with both
    times UTIME_OMIT is nothing (the kernel returns before any file system sees it)."""
    f, d = t.file("f"), t.dir("d")
    os.symlink("f", t / "l")
    out = []
    for change in (lambda: os.chown(f, -1, -1), lambda: os.chown(d, -1, -1),
                   lambda: os.lchown(t / "l", -1, -1), lambda: os.chown(f, *owner(f)),
                   lambda: utimensat_omit(f), lambda: utimensat_omit(d)):
        b = [os.lstat(p) for p in (f, d, t / "l")]
        t.tick()
        change()
        out.append([times_moved(x, os.lstat(p)) for x, p in zip(b, (f, d, t / "l"))])
    fd = os.open(f, os.O_RDONLY)
    b = os.stat(f)
    t.tick()
    os.fchown(fd, -1, -1)
    out.append(times_moved(b, os.stat(f)))
    os.close(fd)
    return out


@case
def chown_of_a_symlink_follows_lchown_does_not(t):
    f = t.file("f")
    os.symlink("f", t / "l")
    os.chown(t / "l", 11, 12)
    os.lchown(t / "l", 21, 22)
    return [owner(f), owner(t / "l")]


@case
def chown_by_the_owner_and_by_others(t):
    f = t.file("f", owner=(NOBODY, NOGROUP))
    g = t.file("g")
    return [t.nobody(lambda: os.chown(f, 0, -1)),  # give away: EPERM
            t.nobody(lambda: os.chown(f, -1, OTHER_GID)),  # a group it is not in: EPERM
            t.nobody(lambda: os.chown(f, NOBODY, NOGROUP)),  # to itself: fine
            t.nobody(lambda: os.chown(g, NOBODY, -1)),  # someone else's file: EPERM
            owner(f), owner(g)]


@case
def chown_clears_setuid_and_setgid_of_files(t):
    f = t.file("f", mode=0o6755)
    g = t.file("g", mode=0o2745)  # setgid without group exec: a lock mark, kept
    d = t.dir("d", mode=0o2755)
    os.chown(f, 1234, 5678)
    os.chown(g, 1234, 5678)
    os.chown(d, 1234, 5678)
    h = t.file("h", mode=0o6755, owner=(NOBODY, NOGROUP))
    os.chmod(h, 0o6755)
    return [mode(f), mode(g), mode(d), t.nobody(lambda: os.chown(h, -1, NOGROUP)), mode(h)]


@case
def chown_errnos(t):
    f = t.file("f")
    return [E(lambda: os.chown(t / "nope", 1, 1)), E(lambda: os.chown(f / "x", 1, 1)),
            E(lambda: os.chown(t / LONG, 1, 1))]


# link --------------------------------------------------------------------------------------
@case
def link_adds_a_name_to_one_inode(t):
    f = t.file("f")
    d = t.dir("d")
    b, bd = os.stat(f), os.stat(t.root)
    t.tick()
    os.link(f, d / "g")
    os.link(f, t / "h")
    return [nlinks(f, d / "g", t / "h"), times_moved(b, os.stat(f))[1], times_moved(bd, os.stat(t.root))]


@case
def link_errnos(t):
    f, d = t.file("f"), t.dir("d")
    t.file("g")
    return [E(lambda: os.link(f, t / "g")), E(lambda: os.link(t / "nope", t / "x")),
            E(lambda: os.link(f, f / "x")), E(lambda: os.link(f / "x", t / "x")),
            E(lambda: os.link(f, t / LONG)), E(lambda: os.link(d, t / "dlink")),
            E(lambda: os.link(f, t / "nope" / "x"))]


@case
def link_permissions_for_another_user(t):
    pub = t.pub()
    closed = t.dir("closed")
    mine = t.file("pub/mine", owner=(NOBODY, NOGROUP))
    secret = t.file("secret", mode=0o600)
    return [t.nobody(lambda: os.link(mine, closed / "x")),  # no write permission there: EACCES
            t.nobody(lambda: os.link(mine, pub / "mine2")),
            t.nobody(lambda: os.link(secret, pub / "s")),  # protected_hardlinks: EPERM
            nlinks(mine, pub / "mine2")]


@case
def link_of_an_unlinked_open_file_is_enoent(t):
    f = t.file("f")
    fd = os.open(f, os.O_RDONLY)
    os.unlink(f)
    out = E(lambda: os.link(f"/proc/self/fd/{fd}", t / "back", follow_symlinks=True))
    os.close(fd)
    return [out, os.path.exists(t / "back")]


@case
def link_then_unlink_keeps_the_data(t):
    f = t.file("f", b"bytes")
    os.link(f, t / "g")
    b = os.stat(t / "g")
    t.tick()
    os.unlink(f)
    moved = times_moved(b, os.stat(t / "g"))  # the node's ctime moves (a status change)
    with open(t / "g", "ab") as out:
        out.write(b"+")
    return [nlinks(t / "g"), moved, (t / "g").read_bytes(), os.path.exists(f)]


# mkdir -------------------------------------------------------------------------------------
@case
def mkdir_mode_and_owner(t):
    pub = t.pub()
    os.mkdir(t / "a", 0o751)
    os.mkdir(t / "b", 0o7777)
    r = t.nobody(lambda: os.mkdir(pub / "c", 0o700))
    return [mode(t / "a"), mode(t / "b"), r, mode(pub / "c"), owner(pub / "c"), owner(t / "a")]


@case
def mkdir_in_a_setgid_directory_inherits_the_group(t):
    sg = t.dir("sg", 0o2777, owner=(0, OTHER_GID))
    r1 = t.nobody(lambda: os.mkdir(sg / "d", 0o755))
    r2 = t.nobody(lambda: os.close(os.open(sg / "f", os.O_CREAT | os.O_WRONLY, 0o755)))
    os.mkdir(sg / "rootdir")
    return [r1, r2, owner(sg / "d"), mode(sg / "d"), owner(sg / "f"), mode(sg / "f"), owner(sg / "rootdir"),
            mode(sg / "rootdir")]


@case
def mkdir_moves_the_parent_times(t):
    b = os.stat(t.root)
    t.tick()
    os.mkdir(t / "d")
    return [times_moved(b, os.stat(t.root))]


@case
def mkdir_errnos(t):
    f = t.file("f")
    t.dir("d")
    os.symlink("nowhere", t / "dangling")
    closed = t.dir("closed")
    return [E(lambda: os.mkdir(t / "d")), E(lambda: os.mkdir(f)), E(lambda: os.mkdir(t / "dangling")),
            E(lambda: os.mkdir(t / "nope" / "x")), E(lambda: os.mkdir(f / "x")), E(lambda: os.mkdir(t / LONG)),
            t.nobody(lambda: os.mkdir(closed / "x"))]


@case
def directory_link_counts(t):
    d = t.dir("d")
    t.dir("d/a")
    t.dir("d/b")
    t.file("d/f")
    e = t.dir("e")
    made = [os.stat(d).st_nlink, os.stat(d / "a").st_nlink, os.stat(e).st_nlink]
    os.rename(d / "b", e / "b")  # a subdirectory moves: its ".." with it
    moved = [os.stat(d).st_nlink, os.stat(e).st_nlink]
    os.mkdir(e / "c")
    os.rename(e / "c", e / "b")  # over an empty directory: one fewer
    over = [os.stat(e).st_nlink, os.stat(e / "b").st_nlink]
    os.rmdir(d / "a")
    os.rename(d / "f", e / "f")  # a file moves: no change
    return [made, moved, over, os.stat(d).st_nlink, os.stat(e).st_nlink]


# mkfifo and mknod -----------------------------------------------------------------------------
@case
def mkfifo_mode_owner_and_errnos(t):
    pub = t.pub()
    f = t.file("f")
    os.mkfifo(t / "p", 0o640)
    r = t.nobody(lambda: os.mkfifo(pub / "q", 0o600))
    return [mode(t / "p"), owner(t / "p"), r, owner(pub / "q"), mode(pub / "q"),
            E(lambda: os.mkfifo(t / "p")), E(lambda: os.mkfifo(f)), E(lambda: os.mkfifo(t / "nope" / "x")),
            E(lambda: os.mkfifo(f / "x")), E(lambda: os.mkfifo(t / LONG)),
            t.nobody(lambda: os.mkfifo(t / "x"))]


@case
def mknod_of_every_kind(t):
    pub = t.pub()
    os.mknod(t / "reg", 0o600 | stat.S_IFREG)
    os.mknod(t / "chr", 0o644 | stat.S_IFCHR, os.makedev(1, 3))
    os.mknod(t / "blk", 0o640 | stat.S_IFBLK, os.makedev(7, 0))
    os.mknod(t / "fifo", 0o600 | stat.S_IFIFO)
    os.mknod(t / "sock", 0o600 | stat.S_IFSOCK)
    out = [(name, mode(t / name), os.lstat(t / name).st_rdev, os.lstat(t / name).st_size)
           for name in ("reg", "chr", "blk", "fifo", "sock")]
    out.append(t.nobody(lambda: os.mknod(pub / "c2", 0o644 | stat.S_IFCHR, os.makedev(1, 3))))  # EPERM
    out.append(t.nobody(lambda: os.mknod(pub / "r2", 0o644 | stat.S_IFREG)))
    out.append(owner(pub / "r2"))
    out.append(E(lambda: os.mknod(t / "reg", 0o600 | stat.S_IFREG)))
    return out


# open ---------------------------------------------------------------------------------------
@case
def open_creat_mode_owner_and_parent_times(t):
    pub = t.pub()
    b = os.stat(t.root)
    t.tick()
    os.close(os.open(t / "f", os.O_CREAT | os.O_WRONLY, 0o640))
    r = t.nobody(lambda: os.close(os.open(pub / "g", os.O_CREAT | os.O_RDWR, 0o604)))
    return [mode(t / "f"), owner(t / "f"), times_moved(b, os.stat(t.root)), r, owner(pub / "g"), mode(pub / "g")]


@case
def open_creat_excl(t):
    t.file("f", b"keep", mode=0o600)
    t.dir("d")
    os.symlink("nowhere", t / "dangling")
    flags = os.O_CREAT | os.O_EXCL | os.O_WRONLY
    return [E(lambda: os.open(t / "f", flags, 0o644)), E(lambda: os.open(t / "d", flags, 0o644)),
            E(lambda: os.open(t / "dangling", flags, 0o644)), os.path.exists(t / "nowhere"),
            E(lambda: os.close(os.open(t / "f", os.O_CREAT | os.O_WRONLY, 0o777))),  # no O_EXCL: opens it
            (t / "f").read_bytes(), mode(t / "f")]


@case
def open_trunc(t):
    f = t.file("f", b"0123456789")
    g = t.file("g", b"0123456789")
    b = os.stat(f)
    t.tick()
    os.close(os.open(f, os.O_WRONLY | os.O_TRUNC))
    a = os.stat(f)
    os.close(os.open(g, os.O_RDONLY | os.O_TRUNC))  # Linux truncates this too
    return [a.st_size, times_moved(b, a), os.stat(g).st_size]


@case
def open_append_writes_at_the_end(t):
    f = t.file("f", b"start")
    fd = os.open(f, os.O_WRONLY | os.O_APPEND)
    os.lseek(fd, 0, os.SEEK_SET)
    os.write(fd, b"+end")
    os.pwrite(fd, b"!", 0)  # O_APPEND: pwrite appends too, on Linux
    os.close(fd)
    return [f.read_bytes()]


@case
def open_errnos(t):
    f, d = t.file("f"), t.dir("d")
    os.symlink("f", t / "l")
    os.mkfifo(t / "p")
    return [E(lambda: os.open(t / "nope", os.O_RDONLY)), E(lambda: os.open(f / "x", os.O_RDONLY)),
            E(lambda: os.open(f, os.O_RDONLY | os.O_DIRECTORY)), E(lambda: os.open(d, os.O_WRONLY)),
            E(lambda: os.open(d, os.O_RDWR)), E(lambda: os.open(t / "l", os.O_RDONLY | os.O_NOFOLLOW)),
            E(lambda: os.open(t / LONG, os.O_RDONLY)), E(lambda: os.open(t / LONG, os.O_CREAT | os.O_WRONLY)),
            E(lambda: os.open(t / "p", os.O_WRONLY | os.O_NONBLOCK)),
            E(lambda: os.open(t / "nope" / "x", os.O_CREAT | os.O_WRONLY))]


@case
def open_permissions_for_another_user(t):
    secret = t.file("secret", mode=0o600)
    ro = t.file("ro", mode=0o644)
    rw = t.file("rw", b"0123", mode=0o666)
    closed = t.dir("closed", 0o755)
    t.file("closed/inside", mode=0o644)
    private = t.dir("private", 0o700)
    t.file("private/inside", mode=0o644)
    return [t.nobody(lambda: os.open(secret, os.O_RDONLY)), t.nobody(lambda: os.open(ro, os.O_WRONLY)),
            t.nobody(lambda: os.close(os.open(ro, os.O_RDONLY))),
            t.nobody(lambda: os.open(closed / "new", os.O_CREAT | os.O_WRONLY)),
            t.nobody(lambda: os.open(private / "inside", os.O_RDONLY)),
            t.nobody(lambda: os.close(os.open(rw, os.O_WRONLY | os.O_TRUNC))), os.stat(rw).st_size]


# rename -------------------------------------------------------------------------------------
@case
def rename_a_file_keeps_its_inode(t):
    f = t.file("f", b"x")
    d = t.dir("d")
    ino, b, bd = os.stat(f).st_ino, os.stat(f), os.stat(d)
    t.tick()
    os.rename(f, d / "g")
    a = os.stat(d / "g")
    return [a.st_ino == ino, os.path.exists(f), (d / "g").read_bytes(), times_moved(b, a)[1],
            times_moved(bd, os.stat(d))]


@case
def rename_over_an_existing_file(t):
    f, g = t.file("f", b"new"), t.file("g", b"old")
    os.link(g, t / "g2")
    ino = os.stat(f).st_ino
    os.rename(f, g)
    return [os.stat(g).st_ino == ino, g.read_bytes(), nlinks(t / "g2"), (t / "g2").read_bytes(),
            os.path.exists(f)]


@case
def rename_a_directory_moves_dotdot(t):
    a, c = t.dir("a"), t.dir("c")
    t.dir("a/b")
    t.file("a/b/x", b"x")
    os.rename(a / "b", c / "b")
    t.dir("e")
    os.rename(c / "b", t / "e")  # over an empty directory
    return [os.stat(t / "e" / "..").st_ino == os.stat(t.root).st_ino, (t / "e" / "x").read_bytes(),
            os.path.exists(c / "b"), sorted(os.listdir(t.root))]


@case
def rename_errnos(t):
    f, d = t.file("f"), t.dir("d")
    t.dir("full")
    t.file("full/x")
    t.dir("d/sub")
    return [E(lambda: os.rename(d, t / "full")), E(lambda: os.rename(f, d)), E(lambda: os.rename(d, f)),
            E(lambda: os.rename(d, d / "sub" / "in")), E(lambda: os.rename(d, d / "in")),
            E(lambda: os.rename(t / "nope", t / "x")), E(lambda: os.rename(f, t / "nope" / "x")),
            E(lambda: os.rename(f, t / LONG)), E(lambda: os.rename(f, f / "x")),
            E(lambda: os.rename(d / ".", t / "x")), E(lambda: os.rename(t / "full" / "x", t / "full" / "..")),
            sorted(os.listdir(t.root))]


@case
def rename_onto_itself_or_a_link_of_itself_does_nothing(t):
    f = t.file("f")
    os.link(f, t / "g")
    os.rename(f, f)
    os.rename(f, t / "g")
    return [nlinks(f, t / "g"), sorted(os.listdir(t.root))]


@case
def rename_a_symlink_moves_the_link(t):
    t.file("f", b"target")
    os.symlink("f", t / "l")
    os.rename(t / "l", t / "m")
    return [os.readlink(t / "m"), (t / "m").read_bytes(), os.path.lexists(t / "l")]


@case
def rename_permissions_for_another_user(t):
    closed = t.dir("closed")
    t.file("closed/x")
    sticky = t.dir("sticky", 0o1777)
    t.file("sticky/roots")
    t.file("sticky/theirs", owner=(NOBODY, NOGROUP))
    return [t.nobody(lambda: os.rename(closed / "x", closed / "y")),  # EACCES
            t.nobody(lambda: os.rename(sticky / "roots", sticky / "r2")),  # sticky: EPERM
            t.nobody(lambda: os.rename(sticky / "theirs", sticky / "t2")), sorted(os.listdir(sticky))]


@case
def rename_noreplace_and_exchange(t):
    f, g = t.file("f", b"f"), t.file("g", b"g")
    d = t.dir("d")
    out = [E(lambda: renameat2(f, g, RENAME_NOREPLACE)), E(lambda: renameat2(f, t / "h", RENAME_NOREPLACE)),
           E(lambda: renameat2(t / "h", g, RENAME_EXCHANGE)), (t / "h").read_bytes(), g.read_bytes()]
    out.append(E(lambda: renameat2(g, d, RENAME_EXCHANGE)))
    out.append(sorted(os.listdir(t.root)))
    out.append(E(lambda: renameat2(t / "g", t / "nope", RENAME_EXCHANGE)))
    a, b = t.dir("a"), t.dir("b")
    t.dir("a/x")
    t.file("a/x/in", b"in")
    t.file("b/y", b"y")
    os.link(t / "b" / "y", t / "y2")
    renameat2(a / "x", b / "y", RENAME_EXCHANGE)  # a directory and a hard-linked file, across parents
    out += [os.stat(b / "y" / "..").st_ino == os.stat(b).st_ino, (b / "y" / "in").read_bytes(),
            (a / "x").read_bytes(), nlinks(a / "x", t / "y2"), E(lambda: renameat2(b, b / "y", RENAME_EXCHANGE))]
    return out


# rmdir --------------------------------------------------------------------------------------
@case
def rmdir_and_its_errnos(t):
    d = t.dir("d")
    t.dir("full")
    t.file("full/x")
    f = t.file("f")
    b = os.stat(t.root)
    t.tick()
    os.rmdir(d)
    return [os.path.exists(d), times_moved(b, os.stat(t.root)), E(lambda: os.rmdir(t / "full")),
            E(lambda: os.rmdir(f)), E(lambda: os.rmdir(t / "nope")), E(lambda: os.rmdir(t / "full" / ".")),
            E(lambda: os.rmdir(t / "full" / "..")), E(lambda: os.rmdir(t / LONG)), E(lambda: os.rmdir(f / "x"))]


@case
def rmdir_permissions_for_another_user(t):
    closed = t.dir("closed")
    t.dir("closed/x")
    sticky = t.dir("sticky", 0o1777)
    t.dir("sticky/roots")
    t.dir("sticky/theirs", owner=(NOBODY, NOGROUP))
    return [t.nobody(lambda: os.rmdir(closed / "x")), t.nobody(lambda: os.rmdir(sticky / "roots")),
            t.nobody(lambda: os.rmdir(sticky / "theirs")), sorted(os.listdir(sticky))]


# symlink ------------------------------------------------------------------------------------
@case
def symlink_and_its_errnos(t):
    pub = t.pub()
    f = t.file("f")
    os.symlink("some/where", t / "l")
    st = os.lstat(t / "l")
    r = t.nobody(lambda: os.symlink("f", pub / "m"))
    closed = t.dir("closed")
    return [os.readlink(t / "l"), stat.S_ISLNK(st.st_mode), st.st_size, r, owner(pub / "m"),
            E(lambda: os.symlink("x", t / "l")), E(lambda: os.symlink("x", f)),
            E(lambda: os.symlink("x", t / "nope" / "y")), E(lambda: os.symlink("x", f / "y")),
            E(lambda: os.symlink("x", t / LONG)), E(lambda: os.symlink("x" * 4096, t / "huge")),
            t.nobody(lambda: os.symlink("x", closed / "y"))]


@case
def symlink_of_the_longest_target(t):
    target = "/".join(["d" * 254] * 16)[:4095]
    os.symlink(target, t / "l")
    return [os.readlink(t / "l") == target, os.lstat(t / "l").st_size]


# truncate and ftruncate -----------------------------------------------------------------------
@case
def truncate_grows_and_shrinks(t):
    f = t.file("f", b"0123456789")
    b = os.stat(f)
    t.tick()
    os.truncate(f, 20)
    a = os.stat(f)
    grown = f.read_bytes()
    os.truncate(f, 3)
    return [a.st_size, grown, f.read_bytes(), times_moved(b, a)]


@case
def truncate_to_the_same_size(t):
    f = t.file("f", b"0123456789")
    b = os.stat(f)
    t.tick()
    os.truncate(f, 10)
    a = os.stat(f)
    t.tick()
    fd = os.open(f, os.O_WRONLY)
    os.ftruncate(fd, 10)
    os.close(fd)
    return [times_moved(b, a), times_moved(a, os.stat(f))]


@case
def ftruncate_and_its_errnos(t):
    f = t.file("f", b"0123456789")
    fd = os.open(f, os.O_RDWR)
    os.ftruncate(fd, 4)
    out = [os.fstat(fd).st_size, os.pread(fd, 100, 0)]
    os.close(fd)
    fd = os.open(f, os.O_RDONLY)
    out.append(E(lambda: os.ftruncate(fd, 1)))
    os.close(fd)
    out.append(E(lambda: os.truncate(f, -1)))
    return out


@case
def truncate_errnos_and_permissions(t):
    f = t.file("f")
    d = t.dir("d")
    ro = t.file("ro", mode=0o644)
    rw = t.file("rw", b"0123", mode=0o666)
    return [E(lambda: os.truncate(d, 0)), E(lambda: os.truncate(t / "nope", 0)), E(lambda: os.truncate(f / "x", 0)),
            E(lambda: os.truncate(t / LONG, 0)), t.nobody(lambda: os.truncate(ro, 0)),
            t.nobody(lambda: os.truncate(rw, 1)), os.stat(rw).st_size]


# unlink -------------------------------------------------------------------------------------
@case
def unlink_files_symlinks_and_fifos(t):
    f = t.file("f")
    os.symlink("f", t / "l")
    os.mkfifo(t / "p")
    b = os.stat(t.root)
    t.tick()
    os.unlink(t / "l")
    os.unlink(t / "p")
    return [os.path.exists(f), os.path.lexists(t / "l"), os.path.lexists(t / "p"),
            times_moved(b, os.stat(t.root))]


@case
def unlink_errnos(t):
    f, d = t.file("f"), t.dir("d")
    return [E(lambda: os.unlink(t / "nope")), E(lambda: os.unlink(d)), E(lambda: os.unlink(f / "x")),
            E(lambda: os.unlink(t / LONG)), E(lambda: os.unlink(t / "nope" / "x"))]


@case
def unlink_permissions_for_another_user(t):
    closed = t.dir("closed")
    t.file("closed/x", mode=0o666)
    sticky = t.dir("sticky", 0o1777)
    t.file("sticky/roots", mode=0o666)
    t.file("sticky/theirs", owner=(NOBODY, NOGROUP))
    return [t.nobody(lambda: os.unlink(closed / "x")), t.nobody(lambda: os.unlink(sticky / "roots")),
            t.nobody(lambda: os.unlink(sticky / "theirs")), sorted(os.listdir(sticky))]


@case
def unlink_of_an_open_file(t):
    f = t.file("f", b"still here")
    fd = os.open(f, os.O_RDWR)
    os.unlink(f)
    st = os.fstat(fd)
    os.pwrite(fd, b"S", 0)
    out = [st.st_nlink, os.pread(fd, 100, 0), os.path.exists(f)]
    os.close(fd)
    return out


# utimensat ------------------------------------------------------------------------------------
@case
def utimensat_sets_omits_and_takes_now(t):
    f = t.file("f")
    os.utime(f, ns=(1_000_000_001_234_567_891, 1_100_000_000_987_654_321))
    st = os.stat(f)
    out = [(st.st_atime_ns, st.st_mtime_ns)]
    t.tick()
    os.utime(f, ns=(1_200_000_000_000_000_000, st.st_mtime_ns))  # only the atime, in effect
    st2 = os.stat(f)
    out.append((st2.st_atime_ns, st2.st_mtime_ns, st2.st_ctime_ns != st.st_ctime_ns))
    os.utime(f)  # both now
    st3 = os.stat(f)
    out.append((st3.st_atime_ns == st3.st_mtime_ns, st3.st_mtime_ns > 1_700_000_000_000_000_000))
    d = t.dir("d")
    os.utime(d, ns=(5, 6))
    out.append((os.stat(d).st_atime_ns, os.stat(d).st_mtime_ns))
    return out


@case
def utimensat_of_a_symlink_itself(t):
    t.file("f")
    os.symlink("f", t / "l")
    os.utime(t / "l", ns=(1_000_000_000_000_000_000, 1_000_000_000_000_000_000), follow_symlinks=False)
    return [os.lstat(t / "l").st_mtime_ns, os.stat(t / "f").st_mtime_ns == 1_000_000_000_000_000_000]


@case
def utimensat_permissions_for_another_user(t):
    rw = t.file("rw", mode=0o666)
    ro = t.file("ro", mode=0o644)
    mine = t.file("mine", owner=(NOBODY, NOGROUP))
    return [t.nobody(lambda: os.utime(rw)), t.nobody(lambda: os.utime(rw, ns=(1, 2))),
            t.nobody(lambda: os.utime(ro)), t.nobody(lambda: os.utime(ro, ns=(1, 2))),
            t.nobody(lambda: os.utime(mine, ns=(3, 4))), os.stat(mine).st_mtime_ns]


# another user through --allow-other -----------------------------------------------------------
@case
def another_user_creates_appends_to_and_deletes_its_file(t):
    pub = t.pub()
    p = pub / "theirs.log"

    def work():
        with open(p, "ab") as f:
            f.write(b"one\n")
        with open(p, "ab") as f:
            f.write(b"two\n")
        st = os.stat(p)
        data = p.read_bytes()
        os.unlink(p)
        return (st.st_uid, st.st_gid, oct(st.st_mode), data, os.path.exists(p))
    return [t.nobody(work)]


@case
def another_user_cannot_touch_the_mount_users_files(t):
    pub = t.pub()
    f = t.file("pub/roots", mode=0o644)
    return [t.nobody(lambda: open(f, "ab").close()), t.nobody(lambda: os.chmod(f, 0o666)),
            t.nobody(lambda: f.read_bytes()), t.nobody(lambda: os.unlink(f))]  # the directory is 0777


@case
def writes_by_another_user_clear_setuid(t):
    f = t.file("f", b"x", mode=0o6777)
    g = t.file("g", b"x", mode=0o6777)

    def write():
        with open(f, "ab") as out:
            out.write(b"y")
    return [t.nobody(write), mode(f), t.nobody(lambda: os.truncate(g, 0)), mode(g)]


# open files, symlinks followed, special files --------------------------------------------------
@case
def open_creat_through_a_dangling_symlink_makes_its_target(t):
    os.symlink("made", t / "dangling")
    os.close(os.open(t / "dangling", os.O_CREAT | os.O_WRONLY, 0o600))
    return [os.path.exists(t / "made"), mode(t / "made"), os.path.islink(t / "dangling")]


@case
def status_changes_of_an_unlinked_open_file(t):
    f = t.file("f", b"0123456789")
    fd = os.open(f, os.O_RDWR)
    os.unlink(f)
    os.fchmod(fd, 0o600)
    os.fchown(fd, 1234, 5678)
    os.utime(fd, ns=(7_000_000_000, 8_000_000_000))
    os.ftruncate(fd, 4)
    st = os.fstat(fd)
    out = [oct(st.st_mode), (st.st_uid, st.st_gid), st.st_atime_ns, st.st_size, st.st_nlink, os.pread(fd, 9, 0)]
    os.close(fd)
    return out


@case
def special_files_keep_their_type_through_chmod_chown_and_rename(t):
    os.mkfifo(t / "p", 0o644)
    os.mknod(t / "c", 0o600 | stat.S_IFCHR, os.makedev(1, 5))
    os.chmod(t / "p", 0o600)
    os.chown(t / "c", 12, 34)
    os.rename(t / "c", t / "c2")
    os.link(t / "p", t / "p2")
    return [mode(t / "p"), mode(t / "c2"), os.lstat(t / "c2").st_rdev, owner(t / "c2"), nlinks(t / "p", t / "p2")]


@case
def moving_a_directory_to_another_parent_needs_write_permission_on_it(t):
    pub = t.pub()
    a = t.pub("a")
    theirs = t.dir("pub/theirs", 0o755, owner=(NOBODY, NOGROUP))
    closed = t.dir("pub/roots", 0o755)  # nobody may not rewrite its ".."
    return [t.nobody(lambda: os.rename(closed, a / "roots")), t.nobody(lambda: os.rename(theirs, a / "theirs")),
            sorted(os.listdir(pub)), sorted(os.listdir(a))]


@case
def rename_over_an_ancestor_and_trailing_slashes(t):
    d = t.dir("d")
    t.dir("d/sub")
    f = t.file("f")
    return [E(lambda: os.rename(d / "sub", d)), E(lambda: os.stat(str(f) + "/")),
            E(lambda: os.open(d, os.O_CREAT | os.O_WRONLY)), E(lambda: os.rename(f, str(t / "g") + "/")),
            E(lambda: os.symlink("", t / "empty"))]


# --- the test ---------------------------------------------------------------------------------
def _param(name: str):
    marks = [pytest.mark.xfail(strict=True, reason=DIFFERENCES[name])] if name in DIFFERENCES else []
    return pytest.param(name, marks=marks, id=name)


def test_the_workspace_is_mounted_allow_other_as_root_without_user_allow_other(roots):
    """--allow-other as root: the kernel shows allow_other on the mount, and root needs no
    ``user_allow_other`` in /etc/fuse.conf (only fusermount3, for other users, reads it)."""
    plain, mnt = roots
    with open("/proc/mounts") as f:
        opts = next(line.split()[3] for line in f if line.split()[1] == str(mnt))
    assert "allow_other" in opts.split(","), opts
    try:
        conf = Path("/etc/fuse.conf").read_text()
    except FileNotFoundError:
        conf = ""
    lines = [line.strip() for line in conf.splitlines() if not line.strip().startswith("#")]
    if "user_allow_other" not in lines:
        # This machine does not allow it, and the mount above still got allow_other.
        assert as_nobody(lambda: sorted(os.listdir(mnt))) == sorted(os.listdir(mnt))


@pytest.mark.parametrize("name", [_param(n) for n in CASES])
def test_posix_case_matches_the_local_disk(roots, name):
    plain, mnt = roots
    results = []
    for root in (plain, mnt):
        d = root / name
        d.mkdir()
        os.chmod(d, 0o755)
        results.append(CASES[name](T(d)))
    reference, workspace = results
    assert workspace == reference
