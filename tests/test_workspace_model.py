"""The workspace core against a reference model, without a kernel (tests/wsharness.py).

Random system calls (create, open with O_TRUNC, write at any offset, read,
truncate, close, fsync, mkdir, rmdir, unlink, rename with and without
RENAME_NOREPLACE, symlink, mknod, hard links, chmod, chown, utimens, xattrs) are
applied to a workspace through the pyfuse3 adapter (``Kernel``) and to a
plain in-memory model of what ext4 would do; after every call the outcome
(value or errno) must agree, and the touched paths' attributes too.  Every
few calls the whole tree is compared (kinds, bytes, modes, owners, link
counts, the times the model knows, and inode identity: while the kernel holds
an inode number it names the same node), the kernel forgets a random part of
what it holds, and now and then the workspace is committed (the commit's tree
must be the model's, as the format records it: executable bit, no owners,
no special files), unmounted and mounted again, or "killed" (closed with
nothing flushed) and mounted again.

Runs are seeded (the seed and the last calls are in every failure message);
``MODEL_SEEDS`` / ``MODEL_STEPS`` in the environment make longer runs.
"""

from __future__ import annotations

import collections
import errno
import logging
import os
import random
import stat
import time

import pytest
import trio
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from core_fixtures import make_random_tree
from wsharness import RENAME_NOREPLACE, ErrorLog, Kernel, Session, commit, committed
from commitfs.ops.snapshot import commit_directory
from commitfs.repo.repository import Repository
from commitfs.vfs.inode import XATTR_COMMIT, XATTR_REPO

NAME_MAX = 255
ENOATTR = errno.ENODATA
#: Names new nodes get (a Unicode one, one with a space, one too long for NAME_MAX).
LONG = "n" * 256
NEW_NAMES = ["a", "b", "c", "d", "é", "x y", LONG]
SIZES = [0, 1, 100, 4096, 70_000, 200_000]
#: Files in the model have no fixed size: writes land anywhere up to here.
MAX_OFFSET = 400_000
SEEDS = int(os.environ.get("MODEL_SEEDS", "6"))
STEPS = int(os.environ.get("MODEL_STEPS", "300"))


# --- the model -------------------------------------------------------------------------
class MNode:
    def __init__(self, kind: str, mode: int, t):
        self.kind = kind  # dir | file | link | special
        self.mode = mode  # permission bits (a special file's: with its type bits)
        self.uid: int | None = None
        self.gid: int | None = None
        self.data = bytearray()
        self.target = ""
        self.rdev = 0
        self.children: dict[str, MNode] = {}
        # Its names, oldest first, as [directory, name] (a directory: one); none once removed.
        self.names: list[list] = []
        # Times: ("exact", ns) | ("ge", ns) | None (unknown).
        self.mtime = self.atime = self.ctime = t
        self.ino: int | None = None
        # The bytes at the last point a crash cannot go behind (fsync, close, truncation
        # to 0, commit, unmount), while writes since are not there yet; else None.  A write into
        # a committed file keeps its ranges in memory until then (vfs/wscow.py).
        self.synced: bytes | None = None

    @property
    def nlink(self) -> int:
        return len(self.names)


class Model:
    """What a local disk (ext4) does with the same calls; errors as OSError(errno)."""

    def __init__(self, hardlinks: bool):
        self.root = MNode("dir", 0o755, None)
        self.root.names = [[None, ""]]
        self.hardlinks = hardlinks
        self.handles: dict[int, tuple[MNode, int]] = {}  # fh -> (node, flags)

    @staticmethod
    def split(path: str) -> list[str]:
        return [p for p in path.split("/") if p]

    def lookup(self, path: str) -> MNode:
        n = self.root
        for name in self.split(path):
            if n.kind != "dir":
                raise OSError(errno.ENOTDIR, path)
            if len(name.encode()) > NAME_MAX:  # ext4's lookup answers this before ENOENT
                raise OSError(errno.ENAMETOOLONG, path)
            c = n.children.get(name)
            if c is None:
                raise OSError(errno.ENOENT, path)
            n = c
        return n

    def find(self, path: str) -> MNode | None:
        try:
            return self.lookup(path)
        except OSError:
            return None

    def parent(self, path: str, look_up: bool = True) -> tuple[MNode, str]:
        """The directory and last name of ``path``; ``look_up``: the kernel looks that
        name up next (ext4: ENAMETOOLONG over NAME_MAX)."""
        parts = self.split(path)
        d = self.lookup("/".join(parts[:-1]))
        if d.kind != "dir":
            raise OSError(errno.ENOTDIR, path)
        return d, self.looked_up(parts[-1], path) if look_up else parts[-1]

    @staticmethod
    def looked_up(name: str, path: str) -> str:
        """The kernel looks a call's last name up (ext4: ENAMETOOLONG over NAME_MAX)."""
        if len(name.encode()) > NAME_MAX:
            raise OSError(errno.ENAMETOOLONG, path)
        return name

    def new_entry(self, path: str) -> tuple[MNode, str]:
        d, name = self.parent(path)
        if name in d.children:
            raise OSError(errno.EEXIST, path)
        if len(name.encode()) > NAME_MAX:
            raise OSError(errno.ENAMETOOLONG, path)
        return d, name

    @staticmethod
    def attach(d: MNode, name: str, n: MNode) -> MNode:
        d.children[name] = n
        n.names.append([d, name])
        return n

    @staticmethod
    def detach(d: MNode, name: str) -> MNode:
        n = d.children.pop(name)
        n.names = [x for x in n.names if not (x[0] is d and x[1] == name)]
        return n

    @staticmethod
    def touch(d: MNode, t) -> None:
        d.mtime = d.ctime = t

    def paths(self) -> dict[str, MNode]:
        out = {}

        def walk(d: MNode, rel: str):
            for name, c in d.children.items():
                p = f"{rel}/{name}" if rel else name
                out[p] = c
                if c.kind == "dir":
                    walk(c, p)
        walk(self.root, "")
        return out

    # --- calls ---------------------------------------------------------------------------
    def open(self, fh: int, path: str, flags: int, mode: int, t, owner) -> None:
        d, name = self.parent(path)
        n = d.children.get(name)
        if n is None:
            if not flags & os.O_CREAT:
                raise OSError(errno.ENOENT, path)
            d, name = self.new_entry(path)
            n = self.attach(d, name, MNode("file", mode, ("ge", t)))
            n.uid, n.gid = owner
            self.touch(d, ("ge", t))
        else:
            if flags & os.O_CREAT and flags & os.O_EXCL:
                raise OSError(errno.EEXIST, path)
            if n.kind == "dir":
                raise OSError(errno.EISDIR, path)  # (read-only it is an opendir; the harness opens files only)
            if n.kind == "link":
                raise OSError(errno.ELOOP, path)
            if n.kind != "file":
                raise OSError(errno.EINVAL, path)
            if flags & os.O_TRUNC:  # Linux truncates whatever the access mode (it needs write permission)
                n.data = bytearray()
                n.synced = None
                n.mtime = n.ctime = ("ge", t)
        self.handles[fh] = (n, flags)

    def write(self, fh: int, off: int, data: bytes, t) -> int:
        n, flags = self.handles[fh]
        if flags & os.O_ACCMODE == os.O_RDONLY:
            raise OSError(errno.EBADF, "read-only handle")
        if n.synced is None:
            n.synced = bytes(n.data)
        if off > len(n.data):
            n.data.extend(bytes(off - len(n.data)))
        n.data[off:off + len(data)] = data
        n.mtime = n.ctime = ("ge", t)
        return len(data)

    def read(self, fh: int, off: int, size: int) -> bytes:
        if self.handles[fh][1] & os.O_ACCMODE == os.O_WRONLY:
            raise OSError(errno.EBADF, "write-only handle")
        return bytes(self.handles[fh][0].data[off:off + size])

    def truncate(self, n: MNode, size: int, t) -> None:
        if n.kind == "dir":
            raise OSError(errno.EISDIR, "truncate")
        if n.kind != "file":
            raise OSError(errno.EINVAL, "truncate")
        if size < len(n.data):
            del n.data[size:]
        else:
            n.data.extend(bytes(size - len(n.data)))
        n.mtime = n.ctime = ("ge", t)
        if size == 0:
            n.synced = None  # nothing of the base is left (a truncate below it writes the ranges at once)

    def mkdir(self, path: str, mode: int, t, owner) -> None:
        d, name = self.new_entry(path)
        n = self.attach(d, name, MNode("dir", mode, ("ge", t)))
        n.uid, n.gid = owner
        self.touch(d, ("ge", t))

    def symlink(self, target: str, path: str, t, owner) -> None:
        d, name = self.new_entry(path)
        n = self.attach(d, name, MNode("link", 0o777, ("ge", t)))
        n.target = target
        n.uid, n.gid = owner
        self.touch(d, ("ge", t))

    def mknod(self, path: str, mode: int, rdev: int, t, owner) -> None:
        d, name = self.new_entry(path)
        if stat.S_ISREG(mode):
            n = MNode("file", stat.S_IMODE(mode), ("ge", t))
        else:
            n = MNode("special", mode, ("ge", t))
            n.rdev = rdev if stat.S_ISCHR(mode) or stat.S_ISBLK(mode) else 0
        n.uid, n.gid = owner
        self.attach(d, name, n)
        self.touch(d, ("ge", t))

    def link(self, src: str, dst: str, t) -> None:
        n = self.lookup(src)
        d, name = self.parent(dst)
        self.looked_up(name, dst)
        if name in d.children:
            raise OSError(errno.EEXIST, dst)
        if n.kind == "dir":
            raise OSError(errno.EPERM, src)
        if not self.hardlinks:
            raise OSError(errno.EPERM, "the workspace does not support hard links")
        if len(name.encode()) > NAME_MAX:
            raise OSError(errno.ENAMETOOLONG, dst)
        self.attach(d, name, n)
        n.ctime = ("ge", t)
        self.touch(d, ("ge", t))

    def unlink(self, path: str, t) -> None:
        d, name = self.parent(path)
        n = d.children.get(self.looked_up(name, path))
        if n is None:
            raise OSError(errno.ENOENT, path)
        if n.kind == "dir":
            raise OSError(errno.EISDIR, path)
        self.detach(d, name)
        n.ctime = ("ge", t)
        self.touch(d, ("ge", t))

    def rmdir(self, path: str, t) -> None:
        d, name = self.parent(path)
        n = d.children.get(self.looked_up(name, path))
        if n is None:
            raise OSError(errno.ENOENT, path)
        if n.kind != "dir":
            raise OSError(errno.ENOTDIR, path)
        if n.children:
            raise OSError(errno.ENOTEMPTY, path)
        self.detach(d, name)
        self.touch(d, ("ge", t))

    def rename(self, src: str, dst: str, flags: int, t) -> None:
        sd, sn = self.parent(src, look_up=False)  # both parents first, as do_renameat2 does
        dd, dn = self.parent(dst, look_up=False)  # (the new name is looked up after the source's)
        n = sd.children.get(self.looked_up(sn, src))
        if n is None:
            raise OSError(errno.ENOENT, src)
        target = dd.children.get(self.looked_up(dn, dst))
        if flags & RENAME_NOREPLACE and target is not None:
            raise OSError(errno.EEXIST, dst)
        s, d = self.split(src), self.split(dst)
        if d[:len(s)] == s and len(d) > len(s):
            raise OSError(errno.EINVAL, dst)
        if s[:len(d)] == d and len(s) > len(d):
            raise OSError(errno.ENOTEMPTY, dst)
        if target is n:
            return
        if target is not None:
            if n.kind == "dir" and target.kind != "dir":
                raise OSError(errno.ENOTDIR, dst)
            if n.kind != "dir" and target.kind == "dir":
                raise OSError(errno.EISDIR, dst)
            if target.kind == "dir" and target.children:
                raise OSError(errno.ENOTEMPTY, dst)
        if len(dn.encode()) > NAME_MAX:
            raise OSError(errno.ENAMETOOLONG, dst)
        if target is not None:
            self.detach(dd, dn)  # (a directory: empty)
            target.ctime = ("ge", t)
        for x in n.names:  # the name keeps its place among the node's names
            if x[0] is sd and x[1] == sn:
                x[0], x[1] = dd, dn
        del sd.children[sn]
        dd.children[dn] = n
        n.ctime = ("ge", t)
        self.touch(sd, ("ge", t))
        self.touch(dd, ("ge", t))

    def chmod(self, n: MNode, mode: int, t) -> None:
        if n.kind in ("file", "dir"):
            n.mode = mode
        elif n.kind == "special":
            n.mode = stat.S_IFMT(n.mode) | mode
        n.ctime = ("ge", t)

    def chown(self, n: MNode, uid, gid, t) -> None:
        if uid is not None:
            n.uid = uid
        if gid is not None:
            n.gid = gid
        n.ctime = ("ge", t)

    def utime(self, n: MNode, atime, mtime, t) -> None:
        if atime is not None:
            n.atime = ("exact", atime)
        if mtime is not None:
            n.mtime = ("exact", mtime)
        n.ctime = ("ge", t)

    def xattrs(self, n: MNode, url: str, base: bytes) -> dict[str, bytes]:
        if n.kind not in ("dir", "file"):
            return {}
        out = {XATTR_REPO: url.encode()}
        if n is self.root:
            out[XATTR_COMMIT] = base.hex().encode()
            out["user.commitfs.branch"] = b"main"
        return out

    def path_of(self, n: MNode) -> str | None:
        """The path of a node's first name (None: not in the tree)."""
        parts = []
        while n is not self.root:
            if not n.names:
                return None
            d, name = n.names[0]
            parts.append(name)
            n = d
        return "/".join(reversed(parts))

    # --- reset -------------------------------------------------------------------------------
    @staticmethod
    def copy_tree(n: MNode, t) -> MNode:
        """A fresh copy of a base subtree (what a reset brings back), times ``t``."""
        c = MNode(n.kind, n.mode, t)
        c.data, c.target = bytearray(n.data), n.target
        for name, child in n.children.items():
            Model.attach(c, name, Model.copy_tree(child, t))
        return c

    def remove_subtree(self, d: MNode, name: str) -> list[MNode]:
        """Take ``name`` out of ``d`` with everything below (hard-linked nodes keep their
        names elsewhere); the nodes that left."""
        n = d.children[name]
        out = [n]
        if n.kind == "dir":
            for c in list(n.children):
                out += self.remove_subtree(n, c)
        self.detach(d, name)
        return out

    def reset_in_place(self, n: MNode, b: MNode, t, linked: set[int]) -> list[MNode]:
        """Discard the edits of ``n`` in place: it shows base node ``b`` (times ``t``), and so
        does every node below it the base has with its kind and one name (``linked``: ids
        of nodes that had several: they lose every name here); the nodes that left."""
        gone = []
        n.mode, n.data, n.target, n.uid, n.gid, n.rdev = b.mode, bytearray(b.data), b.target, None, None, 0
        n.mtime = n.atime = n.ctime = t
        n.synced = None
        for name in list(n.children):
            c, bc = n.children[name], b.children.get(name)
            if bc is not None and c.kind == bc.kind and id(c) not in linked:
                gone += self.reset_in_place(c, bc, t, linked)
            else:
                gone += self.remove_subtree(n, name)
        for name, bc in b.children.items():
            if name not in n.children:
                self.attach(n, name, self.copy_tree(bc, t))
        return gone

    def reset(self, path: str, base: MNode, base_t) -> list[MNode]:
        """``commitfs reset PATH`` (vfs/wscommit.py): the path shows its base version again
        (or disappears); its parents are made if the base has the path. EINVAL stands for
        the control channel's error (a parent that is not a directory in the workspace).
        A node the base has at the path (its kind, one name) is reset in place, as a reset
        of everything does (the same node: open files show the base); else replaced."""
        parts = self.split(path)
        entry: MNode | None = base
        for name in parts:
            entry = entry.children.get(name) if entry is not None and entry.kind == "dir" else None
        d = self.root
        for name in parts[:-1]:
            c = d.children.get(name)
            if c is None:
                if entry is None:
                    return []
                c = self.attach(d, name, MNode("dir", 0o755, None))
                d.mtime = d.ctime = None
            elif c.kind != "dir":
                raise OSError(errno.EINVAL, f"cannot reset {path}")
            d = c
        name = parts[-1]
        gone = []
        current = d.children.get(name)
        if current is not None and entry is not None and current.kind == entry.kind and current.nlink == 1:
            linked = {id(c) for c in _subtree(current) if c.kind != "dir" and c.nlink > 1}
            return self.reset_in_place(current, entry, base_t, linked)
        if name in d.children:
            gone = self.remove_subtree(d, name)
        if entry is not None:
            self.attach(d, name, self.copy_tree(entry, base_t))
        if gone or entry is not None:
            d.mtime = d.ctime = None  # moved, or not if the path was untouched
        return gone

    # --- commit and remount ------------------------------------------------------------
    def all_synced(self) -> None:
        for n in self.paths().values():
            n.synced = None
        for n, _ in self.handles.values():
            n.synced = None

    def committed(self) -> dict[str, tuple]:
        """What a commit records (wsharness.committed's shape): no special files, the executable bit."""
        out = {}

        def walk(d: MNode, rel: str):
            for name, c in d.children.items():
                p = f"{rel}/{name}" if rel else name
                if c.kind == "dir":
                    out[p] = ("dir",)
                    walk(c, p)
                elif c.kind == "file":
                    out[p] = ("file", bool(c.mode & 0o100), bytes(c.data))
                elif c.kind == "link":
                    out[p] = ("link", c.target)
        walk(self.root, "")
        return out

    def after_commit(self, time_ns: int) -> None:
        """The workspace shows the commit: modes as recorded, no owners, special files gone,
        every time the commit's (open files keep their bytes)."""
        t = ("exact", time_ns)

        def walk(d: MNode):
            d.mode, d.uid, d.gid, d.mtime, d.atime, d.ctime = 0o755, None, None, t, t, t
            for name, c in list(d.children.items()):
                if c.kind == "special":
                    self.detach(d, name)
                    continue
                if c.nlink > 1 and c.names[0] != [d, name]:
                    # A hard link's other names are separate files in the commit (and so in
                    # the workspace after it); the oldest name keeps the node.
                    self.detach(d, name)
                    copy = self.attach(d, name, MNode(c.kind, c.mode, t))
                    copy.data, copy.target = bytearray(c.data), c.target
                    c = copy
                c.uid = c.gid = None
                c.mtime = c.atime = c.ctime = t
                if c.kind == "file":
                    c.mode = 0o755 if c.mode & 0o100 else 0o644
                elif c.kind == "dir":
                    walk(c)
        walk(self.root)

    def after_remount(self, crashed: bool) -> None:
        """Open files are closed (an unlinked one is gone); a crash may lose times not yet written,
        and writes not yet synced (see ``MNode.synced``)."""
        for n, _ in self.handles.values():
            if not crashed:
                n.synced = None
        self.handles.clear()
        if crashed:
            for n in [self.root] + list(self.paths().values()):
                for f in ("mtime", "atime", "ctime"):
                    if getattr(n, f) is not None and getattr(n, f)[0] == "ge":
                        setattr(n, f, None)
                n.ctime = None


def _subtree(n: MNode):
    for c in n.children.values():
        yield c
        yield from _subtree(c)


def load_base(src) -> MNode:
    root = MNode("dir", 0o755, None)
    root.names = [[None, ""]]

    def walk(d: MNode, path):
        for entry in sorted(os.scandir(path), key=lambda e: e.name):
            st = os.lstat(entry.path)
            if stat.S_ISLNK(st.st_mode):
                c = MNode("link", 0o777, None)
                c.target = os.readlink(entry.path)
            elif stat.S_ISDIR(st.st_mode):
                c = MNode("dir", 0o755, None)
                walk(c, entry.path)
            else:
                c = MNode("file", 0o755 if st.st_mode & 0o100 else 0o644, None)
                with open(entry.path, "rb") as f:
                    c.data = bytearray(f.read())
            Model.attach(d, entry.name, c)
    walk(root, src)
    return root


class DrawnChoices:
    """random.Random's methods the run uses, drawn from hypothesis (so a failure shrinks)."""

    def __init__(self, data):
        self.data = data

    def random(self) -> float:
        return self.data.draw(st.integers(0, 999)) / 1000

    def choice(self, seq):
        return seq[self.data.draw(st.integers(0, len(seq) - 1))]

    def choices(self, population, weights):
        total = sum(weights)
        x = self.data.draw(st.integers(0, total - 1))
        for item, w in zip(population, weights):
            if x < w:
                return [item]
            x -= w
        raise AssertionError("unreachable")

    def randrange(self, n: int) -> int:
        return self.data.draw(st.integers(0, n - 1))

    def randbytes(self, n: int) -> bytes:
        return random.Random(self.data.draw(st.integers(0, 2**32))).randbytes(n)


# --- the comparison ----------------------------------------------------------------------
KIND_OF_MODE = {stat.S_IFDIR: "dir", stat.S_IFREG: "file", stat.S_IFLNK: "link"}


def check_times(what: str, model_t, got_ns: int) -> None:
    if model_t is None:
        return
    how, v = model_t
    if how == "exact":
        assert got_ns == v, f"{what}: {got_ns} != {v}"
    else:
        assert got_ns >= v, f"{what}: {got_ns} < {v} (not moved by the change)"


class Run:
    def __init__(self, seed: int, repo: Repository, wsdir, base_root: MNode, base_time: int, hardlinks: bool):
        self.seed = seed
        self.rng = random.Random(seed)
        self.repo = repo
        self.wsdir = wsdir
        self.model = Model(hardlinks)
        self.model.root = base_root
        for n in [base_root] + list(self.model.paths().values()):
            n.mtime = n.atime = n.ctime = ("exact", base_time)
        self.base = repo.refs.lookup_branch("main")
        self.base_model = Model.copy_tree(base_root, None)
        self.base_t = ("exact", base_time)
        self.k: Kernel | None = None
        self.log: list[str] = []
        self.known: dict[int, MNode] = {}  # ino -> model node, while the kernel holds it
        self.fhs: list[int] = []  # open handles (the kernel's fh, the model's key)
        self.errors = ErrorLog()
        self.commits = 0
        self.steps_done = 0
        self.outcomes: collections.Counter = collections.Counter()

    def where(self) -> str:
        calls = "\n  ".join(c.replace(LONG, "n×256") for c in self.log[-int(os.environ.get("MODEL_LOG", "25")):])
        return f"seed {self.seed}, after {len(self.log)} calls; the last ones:\n  {calls}"

    # --- choosing -----------------------------------------------------------------------
    def existing(self, kinds=None) -> str | None:
        paths = [p for p, n in self.model.paths().items() if kinds is None or n.kind in kinds]
        return self.rng.choice(sorted(paths)) if paths else None

    def new_path(self) -> str:
        dirs = [""] + [p for p, n in self.model.paths().items() if n.kind == "dir" and p.count("/") < 4]
        d = self.rng.choice(sorted(dirs))
        name = self.rng.choice(NEW_NAMES)
        return f"{d}/{name}" if d else name

    def any_path(self, kinds=None) -> str:
        r = self.rng.random()
        if r < 0.1:
            return self.rng.choice(["nowhere/x", "fixed/run.sh/x", "missing"])
        p = self.existing(kinds) if r < 0.75 else None
        return p if p is not None else self.new_path()

    # --- one call on both sides ---------------------------------------------------------
    async def both(self, what: str, on_ws, on_model):
        """Apply a call to the workspace and to the model; outcomes must agree."""
        self.log.append(what)
        t = time.time_ns()
        try:
            got = ("ok", await on_ws())
        except OSError as exc:
            got = ("err", errno.errorcode.get(exc.errno, exc.errno))
        try:
            want = ("ok", on_model(t))
        except OSError as exc:
            want = ("err", errno.errorcode.get(exc.errno, exc.errno))
        assert got == want, f"{what}: workspace {got!r}, model {want!r}; {self.where()}"
        self.outcomes[what.split()[0] + (" ok" if got[0] == "ok" else " " + got[1])] += 1
        errors = self.errors.take()
        assert not errors, f"{what}: the workspace logged errors {errors}; {self.where()}"
        return got

    async def step(self) -> None:
        r, k, m = self.rng, self.k, self.model
        op = r.choices(
            ["open", "write", "read", "close", "truncate", "ftruncate", "fsync", "mkdir", "rmdir", "unlink",
             "rename", "symlink", "mknod", "link", "chmod", "chown", "utime", "xattr", "create", "readdir",
             "reset"],
            weights=[8, 10, 5, 6, 3, 2, 1, 4, 3, 4, 7, 2, 1, 4, 2, 1, 2, 1, 2, 2, 2])[0]
        owner = (k.ctx.uid, k.ctx.gid)
        if op == "readdir":
            await self.readdir_while_changing()
        elif op == "reset":
            await self.reset()
        elif op in ("open", "create"):
            p = self.any_path((("file",) if r.random() < 0.8 else ("file", "dir", "link")) if op == "open" else None)
            if op == "create":
                flags, mode = os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o644
            else:
                flags = r.choice([os.O_RDONLY, os.O_RDWR, os.O_WRONLY]) | r.choice(
                    [0, os.O_CREAT, os.O_CREAT | os.O_TRUNC, os.O_TRUNC, os.O_CREAT | os.O_EXCL])
                mode = r.choice([0o644, 0o600, 0o755])
            box = {}

            async def ws():
                box["fh"] = await (k.create(p, mode) if op == "create" else k.open(p, flags, mode))
            # The model's key is known only after the workspace answered: apply the model
            # under a placeholder, then re-key.
            res = await self.both(f"{op} {p!r} {flags:o} {mode:o}", ws,
                                  lambda t: m.open(-1, p, flags, mode, t, owner))
            if res[0] == "ok":
                self.log[-1] += f" -> fh{box['fh']}"
                m.handles[box["fh"]] = m.handles.pop(-1)
                self.fhs.append(box["fh"])
        elif op in ("write", "read", "close", "ftruncate", "fsync"):
            if not self.fhs:
                return
            fh = r.choice(self.fhs)
            if op == "write":
                off = r.choice([0, r.randrange(MAX_OFFSET), len(m.handles[fh][0].data)])
                data = r.randbytes(r.choice([1, 100, 4096, 70_000, 131_073]))
                await self.both(f"write fh{fh} {off} {len(data)}", lambda: k.pwrite(fh, off, data),
                                lambda t: m.write(fh, off, data, t))
            elif op == "read":
                off, n = r.randrange(MAX_OFFSET), r.choice([1, 4096, 131_072])
                await self.both(f"read fh{fh} {off} {n}", lambda: k.pread(fh, off, n),
                                lambda t: m.read(fh, off, n))
            elif op == "ftruncate":
                size = r.choice(SIZES + [MAX_OFFSET])
                await self.both(f"ftruncate fh{fh} {size}", lambda: k.ftruncate(fh, size),
                                lambda t: m.truncate(m.handles[fh][0], size, t))
            elif op == "fsync":
                def synced(t):
                    m.handles[fh][0].synced = None
                await self.both(f"fsync fh{fh}", lambda: k.fsync(fh), synced)
            else:
                self.fhs.remove(fh)
                def closed(t):
                    m.handles.pop(fh)[0].synced = None  # release writes the ranges
                await self.both(f"close fh{fh}", lambda: k.close(fh), closed)
        elif op == "truncate":
            p, size = self.any_path(("file",) if r.random() < 0.8 else ("file", "dir", "special")), r.choice(SIZES)
            await self.both(f"truncate {p!r} {size}", lambda: k.truncate(p, size),
                            lambda t: m.truncate(m.lookup(p), size, t))
        elif op == "mkdir":
            p, mode = self.any_path(), r.choice([0o755, 0o700])
            await self.both(f"mkdir {p!r}", lambda: k.mkdir(p, mode), lambda t: m.mkdir(p, mode, t, owner))
        elif op == "rmdir":
            p = self.any_path(("dir",) if r.random() < 0.8 else None)
            await self.both(f"rmdir {p!r}", lambda: k.rmdir(p), lambda t: m.rmdir(p, t))
        elif op == "unlink":
            p = self.any_path(("file", "link", "special") if r.random() < 0.9 else None)
            await self.both(f"unlink {p!r}", lambda: k.unlink(p), lambda t: m.unlink(p, t))
        elif op == "rename":
            src = self.any_path()
            dst = self.any_path() if r.random() < 0.4 else self.new_path()
            flags = RENAME_NOREPLACE if r.random() < 0.15 else 0
            await self.both(f"rename {src!r} {dst!r} {flags}", lambda: k.rename(src, dst, flags),
                            lambda t: m.rename(src, dst, flags, t))
        elif op == "symlink":
            p, target = self.any_path(), r.choice(["a", "../b", "/etc/hostname", "日本", "x" * 300])
            await self.both(f"symlink {target!r} {p!r}", lambda: k.symlink(target, p),
                            lambda t: m.symlink(target, p, t, owner))
        elif op == "mknod":
            p = self.any_path()
            mode = r.choice([stat.S_IFIFO | 0o640, stat.S_IFREG | 0o600, stat.S_IFSOCK | 0o755,
                             stat.S_IFCHR | 0o666])
            rdev = os.makedev(1, 3) if stat.S_ISCHR(mode) else 0
            await self.both(f"mknod {p!r} {mode:o}", lambda: k.mknod(p, mode, rdev),
                            lambda t: m.mknod(p, mode, rdev, t, owner))
        elif op == "link":
            src = self.any_path(("file", "link", "special") if r.random() < 0.8 else None)
            dst = self.any_path() if r.random() < 0.3 else self.new_path()
            await self.both(f"link {src!r} {dst!r}", lambda: k.link(src, dst), lambda t: m.link(src, dst, t))
        elif op == "chmod":
            p, mode = self.any_path(("file", "dir", "special")), r.choice([0o644, 0o755, 0o600, 0o700, 0o4755])
            await self.both(f"chmod {p!r} {mode:o}", lambda: k.chmod(p, mode),
                            lambda t: m.chmod(m.lookup(p), mode, t))
        elif op == "chown":
            p = self.any_path()
            uid, gid = r.choice([None, 0, 1234]), r.choice([None, 0, 5678])  # (-1, -1): a SETATTR of nothing
            await self.both(f"chown {p!r} {uid} {gid}", lambda: k.chown(p, uid, gid),
                            lambda t: m.chown(m.lookup(p), uid, gid, t))
        elif op == "utime":
            p = self.any_path()
            at = r.choice([None, r.randrange(10**18)])
            mt = r.choice([None, r.randrange(10**18)]) if at is not None else r.randrange(10**18)
            await self.both(f"utime {p!r} {at} {mt}", lambda: k.utime(p, at, mt),
                            lambda t: m.utime(m.lookup(p), at, mt, t))
        elif op == "xattr":
            p = self.any_path()
            what = r.choice(["list", "get", "get-missing", "set"])
            if what == "list":
                await self.both(f"listxattr {p!r}", lambda: k.listxattr(p),
                                lambda t: sorted(m.xattrs(m.lookup(p), self.repo.url, self.k.fs.base)))
            elif what == "set":
                def refused(t):
                    m.lookup(p)
                    raise OSError(errno.EOPNOTSUPP, "setxattr")
                await self.both(f"setxattr {p!r}", lambda: k.setxattr(p, "user.x", b"1"), refused)
            else:
                name = XATTR_REPO if what == "get" else "user.nope"

                def get(t):
                    v = m.xattrs(m.lookup(p), self.repo.url, self.k.fs.base).get(name)
                    if v is None:
                        raise OSError(ENOATTR, name)
                    return v
                await self.both(f"getxattr {p!r} {name}", lambda: k.getxattr(p, name), get)

    async def reset(self) -> None:
        """``reset PATH`` (and now and then ``reset`` of everything) on both sides."""
        r, k, m = self.rng, self.k, self.model
        if r.random() < 0.1:
            async def ws_all():
                await k.fs.reset(None)

            def model_all(t):
                # Nodes the base has at their (first) path, of the same kind, are kept and
                # show the base again (open files included: the edits are discarded in
                # place); the others leave the tree (open files keep their bytes).
                kept = {}
                for fh, (n, flags) in m.handles.items():
                    p = m.path_of(n)
                    if p is not None:
                        kept[fh] = (p, n.kind, flags)
                for n in [m.root] + list(m.paths().values()):
                    n.names = []
                root = Model.copy_tree(self.base_model, self.base_t)
                root.names = [[None, ""]]
                m.root = root
                for fh, (p, kind, flags) in kept.items():
                    b = m.find(p)
                    if b is not None and b.kind == kind:
                        m.handles[fh] = (b, flags)
            await self.both("reset everything", ws_all, model_all)
            gone = None
        else:
            p = self.any_path()
            if not Model.split(p):
                return
            box = {}

            async def ws():
                from commitfs.errors import InputError
                try:
                    await k.fs.reset([p])
                except InputError as exc:
                    raise OSError(errno.EINVAL, str(exc)) from None

            def model(t):
                box["gone"] = m.reset(p, self.base_model, self.base_t)
            await self.both(f"reset {p!r}", ws, model)
            gone = box.get("gone", [])
        # A reset node is a new one or the same (untouched): forget what identity says of it.
        for ino, n in list(self.known.items()):
            if gone is None or any(n is g for g in gone):
                del self.known[ino]
                n.ino = None

    async def readdir_while_changing(self) -> None:
        """A directory listed in small batches while its entries change between them: every
        entry there before and after (the same node) is listed exactly once, and nothing
        listed was never there (POSIX leaves entries added or removed meanwhile open)."""
        r, k, m = self.rng, self.k, self.model
        path = r.choice([""] + [p for p, n in m.paths().items() if n.kind == "dir"])
        d = m.lookup(path)
        self.log.append(f"readdir {path!r} while changing")
        fh = await k.opendir(path)
        listed: list[str] = []
        try:
            before = dict(d.children)
            got = await k.readdir(fh, 0, r.choice([1, 2, 3]))
            listed += [name for name, _, _ in got]
            start = got[-1][2] if got else 0
            for _ in range(r.choice([1, 2, 3])):
                names = sorted(d.children)
                child = f"{path}/{r.choice(names)}" if names and r.random() < 0.7 else None
                new = f"{path}/{r.choice(NEW_NAMES)}" if path else r.choice(NEW_NAMES)
                if child is None or r.random() < 0.3:
                    await self.both(f"  mkdir {new!r}", lambda: k.mkdir(new), lambda t: m.mkdir(new, 0o755, t, (
                        k.ctx.uid, k.ctx.gid)))
                elif r.random() < 0.5:
                    await self.both(f"  rename {child!r} {new!r}", lambda: k.rename(child, new),
                                    lambda t: m.rename(child, new, 0, t))
                else:
                    await self.both(f"  unlink {child!r}", lambda: k.unlink(child), lambda t: m.unlink(child, t))
            if start or not got:
                while True:
                    got = await k.readdir(fh, start, r.choice([None, 1, 4]))
                    if not got:
                        break
                    listed += [name for name, _, _ in got]
                    start = got[-1][2]
        finally:
            await k.releasedir(fh)
        after = dict(d.children)
        assert len(listed) == len(set(listed)), f"readdir listed {listed}: a name twice; {self.where()}"
        stayed = {name for name, n in before.items() if after.get(name) is n}
        assert stayed <= set(listed), \
            f"readdir missed {sorted(stayed - set(listed))}, there all along; {self.where()}"
        assert set(listed) <= set(before) | set(after), \
            f"readdir listed {sorted(set(listed) - set(before) - set(after))}, never there; {self.where()}"

    # --- whole-tree comparison ----------------------------------------------------------
    async def compare(self, contents: bool = True) -> None:
        k, m = self.k, self.model
        seen: dict[str, tuple] = {}

        async def walk(rel: str, d: MNode):
            listing = await k.listdir(rel, batch=self.rng.choice([None, 1, 3]))
            assert sorted(listing) == sorted(d.children), \
                f"listing of {rel!r}: workspace {sorted(listing)}, model {sorted(d.children)}; {self.where()}"
            for name, e in listing.items():
                p = f"{rel}/{name}" if rel else name
                n = d.children[name]
                self.check_attr(p, n, e)
                self.check_identity(p, n, e.st_ino)
                if n.kind == "dir":
                    self.check_dir_nlink(p, n, await k.lstat(p))
                    await walk(p, n)
                elif n.kind == "link":
                    assert await k.readlink(p) == n.target, f"{p}: target; {self.where()}"
                elif n.kind == "file" and contents:
                    data = await k.read_file(p)
                    assert data == bytes(n.data), \
                        f"{p}: {len(data)} bytes, the model {len(n.data)}; {self.where()}"
        root = await k.lstat("")
        self.check_attr("", m.root, root)
        self.check_dir_nlink("", m.root, root)
        await walk("", m.root)
        for fh in self.fhs:  # open files, named or not
            n = m.handles[fh][0]
            e = await k.fstat(fh)
            self.check_attr(f"fh{fh}", n, e)
            if contents and k.modes[fh] != os.O_WRONLY:
                assert await k.read_all(fh) == bytes(n.data), f"fh{fh}: contents; {self.where()}"
        assert not self.errors.take()

    def check_attr(self, p: str, n: MNode, e) -> None:
        where = f"{p!r} ({n.kind})"
        if n.kind == "special":
            assert e.st_mode == n.mode and e.st_rdev == n.rdev, f"{where}: mode {e.st_mode:o}; {self.where()}"
        else:
            assert KIND_OF_MODE.get(stat.S_IFMT(e.st_mode)) == n.kind, f"{where}: mode {e.st_mode:o}; {self.where()}"
            assert stat.S_IMODE(e.st_mode) == n.mode, \
                f"{where}: mode {stat.S_IMODE(e.st_mode):o}, model {n.mode:o}; {self.where()}"
        if n.kind == "file":
            assert e.st_size == len(n.data), f"{where}: size {e.st_size}, model {len(n.data)}; {self.where()}"
        if n.kind != "dir":
            assert e.st_nlink == n.nlink, f"{where}: nlink {e.st_nlink}, model {n.nlink}; {self.where()}"
        elif n.kind == "link":
            assert e.st_size == len(n.target.encode()), f"{where}: size; {self.where()}"
        assert (e.st_uid, e.st_gid) == (os.getuid() if n.uid is None else n.uid,
                                        os.getgid() if n.gid is None else n.gid), \
            f"{where}: owner {e.st_uid}:{e.st_gid}, model {n.uid}:{n.gid}; {self.where()}"
        check_times(f"{where} mtime; {self.where()}", n.mtime, e.st_mtime_ns)
        check_times(f"{where} atime; {self.where()}", n.atime, e.st_atime_ns)
        if n.nlink > 0:  # an unlinked file's ctime is not compared
            check_times(f"{where} ctime; {self.where()}", n.ctime, e.st_ctime_ns)

    def check_dir_nlink(self, p: str, n: MNode, e) -> None:
        """A directory's st_nlink (what stat(2) shows: GETATTR's answer, the attribute
        timeout being 0) is 2 and one for each subdirectory, as on ext4."""
        want = 2 + sum(1 for c in n.children.values() if c.kind == "dir")
        assert e.st_nlink == want, f"{p!r} (dir): nlink {e.st_nlink}, model {want}; {self.where()}"

    def check_identity(self, p: str, n: MNode, ino: int) -> None:
        """While the kernel holds an inode number it names one node, and one node one number."""
        other = self.known.get(ino)
        assert other is None or other is n, f"{p!r}: inode {ino} named another node while held; {self.where()}"
        if n.ino is not None and n.ino != ino and n.ino in self.k.held:
            raise AssertionError(f"{p!r}: inode {ino}, but the kernel still holds it as {n.ino}; {self.where()}")
        self.known[ino] = n
        n.ino = ino

    async def forget(self, fraction: float) -> None:
        await self.k.forget(self.rng, fraction)
        for ino in [i for i in self.known if i not in self.k.held]:
            n = self.known.pop(ino)
            if n.ino == ino:
                n.ino = None

    async def after_crash(self) -> None:
        """A file written since its last sync point shows, at every offset, the bytes
        written or those before (fsync'd ones are all there); the model takes what it shows."""
        seen = set()
        for p, n in sorted(self.model.paths().items()):
            if n.synced is None or id(n) in seen:
                continue
            seen.add(id(n))
            got = await self.k.read_file(p)
            cur, old = bytes(n.data), n.synced
            assert len(got) in (len(cur), len(old)), f"{p!r} after a crash: {len(got)} bytes; {self.where()}"
            for i in range(len(got)):
                if got[i] != (cur[i] if i < len(cur) else 0) and got[i] != (old[i] if i < len(old) else 0):
                    raise AssertionError(f"{p!r} after a crash: byte {i} is neither written nor before; "
                                         f"{self.where()}")
            n.data = bytearray(got)
            n.synced = None
            self.log.append(f"(after the crash {p!r} shows {'the writes' if got == cur else 'not all writes'})")

    # --- commit, remount ---------------------------------------------------------------
    async def commit(self) -> None:
        self.log.append("commit")
        self.commits += 1
        cid = await commit(self.k, f"model {self.seed} #{self.commits}")
        want = self.model.committed()
        nothing = cid is None
        if nothing:  # the edits change nothing a commit records: they stay, as they are
            cid = self.repo.refs.lookup_branch("main")
            self.log.append("(nothing to commit)")
        got = await trio.to_thread.run_sync(committed, self.repo, cid)
        assert sorted(got) == sorted(want), f"commit: paths differ {sorted(set(got) ^ set(want))}; {self.where()}"
        for p in want:
            assert got[p] == want[p], f"commit: {p!r} differs; {self.where()}"
        assert self.repo.refs.lookup_branch("main") == cid and self.k.fs.base == cid
        self.model.all_synced()  # (the commit flushed every pending range)
        if not nothing:
            self.base_t = ("exact", self.repo.load_commit(cid).time * 1_000_000_000)
            self.model.after_commit(self.base_t[1])
            self.base_model = Model.copy_tree(self.model.root, None)
        assert not self.errors.take()

    async def run(self, steps: int) -> None:
        """``steps`` calls, over as many mounts as the random remounts make."""
        r = self.rng
        i, crashed = 0, False
        while True:
            session = Session(self.repo, self.wsdir)
            async with session as self.k:
                self.model.after_remount(crashed)
                if crashed:
                    await self.after_crash()
                await self.compare()
                while i < steps:
                    await self.step()
                    i += 1
                    self.steps_done = i
                    if i % 10 == 0:
                        await self.compare(contents=i % 30 == 0)
                        await self.forget(r.choice([0.0, 0.5, 1.0]))
                    roll = r.random()
                    if roll < 0.02:
                        await self.compare()
                        await self.commit()
                        await self.compare()
                    elif roll < 0.04:
                        crashed = session.crash = r.random() < 0.4
                        if not crashed:
                            self.model.all_synced()
                        self.log.append("crash and remount" if crashed else "unmount and remount")
                        break
                else:
                    await self.compare()
                    await self.commit()
                    await self.compare()
                    return
            self.fhs.clear()
            self.known.clear()
            for n in self.model.paths().values():
                n.ino = None


@pytest.fixture
def base(tmp_path, cache_home):
    src = tmp_path / "src"
    make_random_tree(src, random.Random(77), big=300_000)
    repo = Repository.init(str(tmp_path / "repo"))
    cid = commit_directory(repo, src, message="base").commit_id
    yield repo, src, cid
    repo.close()


@pytest.fixture
def error_log():
    h = ErrorLog()
    logger = logging.getLogger("commitfs")
    logger.addHandler(h)
    yield h
    logger.removeHandler(h)


@pytest.mark.timeout(300)
@pytest.mark.parametrize("seed", range(SEEDS))
def test_random_calls_match_the_model(base, tmp_path, seed, error_log):
    repo, src, cid = base
    run = Run(seed, repo, tmp_path / f"ws{seed}", load_base(src), repo.load_commit(cid).time * 1_000_000_000,
              hardlinks=True)
    run.errors = error_log
    trio.run(run.run, STEPS)
    assert run.steps_done == STEPS and run.commits >= 1


@pytest.mark.timeout(600)
@settings(max_examples=int(os.environ.get("MODEL_EXAMPLES", "12")), deadline=None, derandomize=True,
          database=None, suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow,
                                 HealthCheck.data_too_large])
@given(data=st.data())
def test_drawn_calls_match_the_model(base, tmp_path, data, error_log):
    """The same run with hypothesis choosing the calls: a failure shrinks to a short sequence.
    Each example starts a new workspace on the base commit (earlier examples moved the branch)."""
    repo, src, cid = base
    repo.refs.set_branch_if_equals("main", cid, repo.refs.lookup_branch("main"))
    run = Run(0, repo, tmp_path / f"hws-{os.urandom(4).hex()}", load_base(src),
              repo.load_commit(cid).time * 1_000_000_000, hardlinks=True)
    run.rng = DrawnChoices(data)
    run.errors = error_log
    trio.run(run.run, 60)
    assert run.steps_done == 60
