"""A kernel-free harness for the workspace core: the kernel's part, played in Python.

``Kernel`` drives a WorkspaceFS (vfs/workspace.py) through the pyfuse3 adapter
(fuse/adapter.WorkspaceOperations, so the errno mapping is the real one) the
way the Linux VFS does over a FUSE mount with entry and attribute timeouts of
0: every path is resolved by LOOKUP from the root, one component at a time;
every entry the file system returns (lookup, create, mkdir, readdirplus...)
counts one lookup on its inode, and ``forget`` gives them back (all, or a
random part, as the kernel does when it drops dentries); open files pin
their inode.  Its methods have the shape of system calls: they take paths,
return plain values and raise ``OSError(errno)`` as the syscall would.

It also checks the one promise the kernel relies on for identity: while the
kernel holds a lookup on an inode number, the number keeps naming the same
node (``ino_of`` lets a test compare that with its own notion of identity).

``Session`` opens a workspace (as the daemon does, fuse/control.open_workspace),
runs it under trio and closes it as an unmount does (releases, forgets,
shutdown); ``crash=True`` closes it as a SIGKILL would (nothing flushed).

``committed(repo, cid)`` is a commit's tree as ``picture`` shows a workspace:
{path: ("dir",) | ("file", executable, bytes) | ("link", target)}.

Every test of workspace logic that does not need the kernel itself (its page
cache, mmap, permissions, a second process) can use this instead of a mount:
tests/test_workspace_model.py (the random reference-model test) and the
converted cases in tests/test_workspace_vfs.py do.
"""

from __future__ import annotations

import errno
import logging
import os
import stat
from types import SimpleNamespace

import pyfuse3
import trio

from commitfs.fuse import control
from commitfs.fuse.adapter import WorkspaceOperations
from commitfs.model.objects import Kind
from commitfs.vfs.inode import ROOT_INODE
from commitfs.vfs.workspace import WorkspaceFS, WorkspaceOptions

RENAME_NOREPLACE, RENAME_EXCHANGE = 1, 2


def _err(code: int, what: str) -> OSError:
    return OSError(code, f"{os.strerror(code)}: {what}")


def ctx(uid: int | None = None, gid: int | None = None):
    """A request context (pyfuse3.RequestContext's fields; its own class cannot be made in Python)."""
    return SimpleNamespace(uid=os.getuid() if uid is None else uid, gid=os.getgid() if gid is None else gid,
                           pid=os.getpid(), umask=0o022)


def setattr_fields(**updates: bool):
    """pyfuse3.SetattrFields' flags (its own class is read-only from Python)."""
    names = ("update_atime", "update_mtime", "update_ctime", "update_mode", "update_uid", "update_gid",
             "update_size")
    return SimpleNamespace(**{n: bool(updates.get(n)) for n in names})


class ErrorLog(logging.Handler):
    """Collects ERROR records of commitfs (the adapter logs every unexpected exception)."""

    def __init__(self):
        super().__init__(logging.ERROR)
        self.records: list[logging.LogRecord] = []

    def emit(self, record):
        self.records.append(record)

    def take(self) -> list[str]:
        out = [self.format(r) for r in self.records]
        self.records.clear()
        return out


class Kernel:
    """The kernel's side of a workspace mount (see the module doc)."""

    def __init__(self, fs: WorkspaceFS, uid: int | None = None, gid: int | None = None):
        self.fs = fs
        self.ops = WorkspaceOperations(fs)
        self.ctx = ctx(uid, gid)
        self.held: dict[int, int] = {}  # ino -> lookups the kernel holds
        self.pinned: dict[int, int] = {}  # ino -> open handles (their dentries stay)
        self.handles: dict[int, int] = {}  # fh -> ino
        self.modes: dict[int, int] = {}  # fh -> O_RDONLY | O_WRONLY | O_RDWR

    # --- the request layer --------------------------------------------------------------
    async def _call(self, what: str, fn, *args):
        try:
            return await fn(*args)
        except pyfuse3.FUSEError as exc:
            raise _err(exc.errno, what) from None

    def _count(self, entry) -> pyfuse3.EntryAttributes:
        self.held[entry.st_ino] = self.held.get(entry.st_ino, 0) + 1
        return entry

    async def forget(self, rng=None, fraction: float = 1.0) -> None:
        """Give back the lookups of inodes no open file pins (all, or a random ``fraction``)."""
        out = []
        for ino, n in list(self.held.items()):
            if ino == ROOT_INODE or ino in self.pinned:
                continue
            if rng is not None and rng.random() >= fraction:
                continue
            out.append((ino, n))
            del self.held[ino]
        if out:
            await self.ops.forget(out)

    # --- paths ---------------------------------------------------------------------------
    @staticmethod
    def split(path: str) -> list[str]:
        return [p for p in str(path).split("/") if p and p != "."]

    async def resolve(self, path: str) -> tuple[int, pyfuse3.EntryAttributes | None]:
        """The inode at ``path`` (symlinks are not followed) and its entry (None for the root)."""
        ino, entry = ROOT_INODE, None
        for name in self.split(path):
            if entry is not None and not stat.S_ISDIR(entry.st_mode):
                raise _err(errno.ENOTDIR, path)
            entry = self._count(await self._call(path, self.ops.lookup, ino, name.encode(), self.ctx))
            ino = entry.st_ino
        return ino, entry

    async def parent_of(self, path: str) -> tuple[int, bytes]:
        parts = self.split(path)
        if not parts:
            raise _err(errno.EBUSY, path)
        ino, entry = await self.resolve("/".join(parts[:-1]))
        if entry is not None and not stat.S_ISDIR(entry.st_mode):
            raise _err(errno.ENOTDIR, path)
        return ino, parts[-1].encode()

    # --- system calls ------------------------------------------------------------------
    async def lstat(self, path: str) -> pyfuse3.EntryAttributes:
        ino, entry = await self.resolve(path)
        return await self._call(path, self.ops.getattr, ino, self.ctx)

    async def exists(self, path: str) -> bool:
        try:
            await self.resolve(path)
            return True
        except FileNotFoundError:
            return False

    async def listdir(self, path: str = "", batch: int | None = None) -> dict[str, pyfuse3.EntryAttributes]:
        """readdir(plus) of a directory; ``batch`` entries per READDIR request (a small kernel buffer)."""
        ino, entry = await self.resolve(path)
        if entry is not None and not stat.S_ISDIR(entry.st_mode):
            raise _err(errno.ENOTDIR, path)
        fh = await self._call(path, self.ops.opendir, ino, self.ctx)
        out: dict[str, pyfuse3.EntryAttributes] = {}
        try:
            start = 0
            while True:
                got = await self.readdir(fh, start, batch)
                if not got:
                    break
                for text, e, next_id in got:
                    assert text not in out, f"readdir of {path!r} returned {text!r} twice"
                    out[text] = e
                    start = next_id
        finally:
            await self.releasedir(fh)
        return out

    async def opendir(self, path: str) -> int:
        ino, entry = await self.resolve(path)
        if entry is not None and not stat.S_ISDIR(entry.st_mode):
            raise _err(errno.ENOTDIR, path)
        return await self._call(path, self.ops.opendir, ino, self.ctx)

    async def readdir(self, fh: int, start: int, batch: int | None = None) -> list[tuple]:
        """One READDIRPLUS request from offset ``start``: [(name, entry, next offset)],
        at most ``batch`` of them (the kernel's buffer); each entry counts a lookup."""
        got: list = []

        def reply(name: bytes, attr, next_id: int) -> bool:
            if batch is not None and len(got) >= batch:
                return False
            got.append((name.decode(), self.ops._entry(attr), next_id))
            return True
        await self._call("readdir", self.fs.readdir, fh, start, reply)
        for _, e, _ in got:
            self._count(e)
        return got

    async def releasedir(self, fh: int) -> None:
        await self._call("releasedir", self.ops.releasedir, fh)

    async def open(self, path: str, flags: int = os.O_RDONLY, mode: int = 0o644) -> int:
        """open(2): O_CREAT creates when absent (O_EXCL: EEXIST when present), O_TRUNC truncates."""
        parent, name = await self.parent_of(path)
        try:
            entry = self._count(await self._call(path, self.ops.lookup, parent, name, self.ctx))
        except FileNotFoundError:
            if not flags & os.O_CREAT:
                raise
            fi, entry = await self._call(path, self.ops.create, parent, name, stat.S_IFREG | mode,
                                         flags & ~(os.O_CREAT | os.O_EXCL | os.O_TRUNC), self.ctx)
            self._count(entry)
            return self._pin(fi.fh, entry.st_ino, flags)
        if flags & os.O_CREAT and flags & os.O_EXCL:
            raise _err(errno.EEXIST, path)
        if stat.S_ISDIR(entry.st_mode):
            # For writing or O_CREAT: the kernel's EISDIR; read-only it would OPENDIR
            # (listdir does that): the harness opens regular files only.
            raise _err(errno.EISDIR, path)
        if stat.S_ISLNK(entry.st_mode):
            raise _err(errno.ELOOP, path)  # the harness does not follow symlinks
        fi = await self._call(path, self.ops.open, entry.st_ino, flags & ~(os.O_CREAT | os.O_EXCL), self.ctx)
        return self._pin(fi.fh, entry.st_ino, flags)

    async def create(self, path: str, mode: int = 0o644) -> int:
        """The CREATE request itself (no lookup first): EEXIST when present."""
        parent, name = await self.parent_of(path)
        fi, entry = await self._call(path, self.ops.create, parent, name, stat.S_IFREG | mode, os.O_RDWR, self.ctx)
        self._count(entry)
        return self._pin(fi.fh, entry.st_ino, os.O_RDWR)

    def _pin(self, fh: int, ino: int, flags: int) -> int:
        self.handles[fh] = ino
        self.modes[fh] = flags & os.O_ACCMODE
        self.pinned[ino] = self.pinned.get(ino, 0) + 1
        return fh

    async def close(self, fh: int) -> None:
        ino = self.handles.pop(fh)
        self.modes.pop(fh)
        try:
            await self._call("close", self.ops.flush, fh)
        finally:
            await self._call("close", self.ops.release, fh)
            self.pinned[ino] -= 1
            if not self.pinned[ino]:
                del self.pinned[ino]

    async def pread(self, fh: int, off: int, size: int) -> bytes:
        if self.modes[fh] == os.O_WRONLY:
            raise _err(errno.EBADF, "read of a handle open for writing only")  # the kernel's check
        return bytes(await self._call("read", self.ops.read, fh, off, size))

    async def read_all(self, fh: int, block: int = 128 * 1024) -> bytes:
        out, off = [], 0
        while True:
            b = await self.pread(fh, off, block)
            if not b:
                return b"".join(out)
            out.append(b)
            off += len(b)

    async def pwrite(self, fh: int, off: int, data: bytes, block: int = 128 * 1024) -> int:
        """Writes in requests of at most ``block`` bytes (the kernel's max_write)."""
        if self.modes[fh] == os.O_RDONLY:
            raise _err(errno.EBADF, "write to a handle open for reading only")  # the kernel's check
        done = 0
        while done < len(data):
            n = await self._call("write", self.ops.write, fh, off + done, data[done:done + block])
            assert n > 0
            done += n
        return done

    async def fstat(self, fh: int) -> pyfuse3.EntryAttributes:
        return await self._call("fstat", self.ops.getattr, self.handles[fh], self.ctx)

    async def fsync(self, fh: int, datasync: bool = False) -> None:
        await self._call("fsync", self.ops.fsync, fh, datasync)

    async def read_file(self, path: str) -> bytes:
        fh = await self.open(path)
        try:
            return await self.read_all(fh)
        finally:
            await self.close(fh)

    async def write_file(self, path: str, data: bytes, mode: int = 0o644) -> None:
        fh = await self.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
        try:
            await self.pwrite(fh, 0, data)
        finally:
            await self.close(fh)

    async def _setattr(self, path: str | None, fh: int | None = None, **values) -> pyfuse3.EntryAttributes:
        ino = self.handles[fh] if fh is not None else (await self.resolve(path))[0]
        attr = pyfuse3.EntryAttributes()
        flags = {}
        for k, v in values.items():
            setattr(attr, "st_" + k, v)
            flags["update_" + k.replace("_ns", "")] = True
        return await self._call(path or "fh", self.ops.setattr, ino, attr, setattr_fields(**flags), fh, self.ctx)

    async def truncate(self, path: str, size: int) -> None:
        await self._setattr(path, size=size)

    async def ftruncate(self, fh: int, size: int) -> None:
        await self._setattr(None, fh, size=size)

    async def chmod(self, path: str, mode: int) -> None:
        await self._setattr(path, mode=mode)

    async def chown(self, path: str, uid: int | None, gid: int | None) -> None:
        values = {}
        if uid is not None:
            values["uid"] = uid
        if gid is not None:
            values["gid"] = gid
        await self._setattr(path, **values)

    async def utime(self, path: str, atime_ns: int | None, mtime_ns: int | None) -> None:
        """utimensat; None is UTIME_OMIT (the kernel turns UTIME_NOW into a time itself)."""
        values = {}
        if atime_ns is not None:
            values["atime_ns"] = atime_ns
        if mtime_ns is not None:
            values["mtime_ns"] = mtime_ns
        await self._setattr(path, **values)

    async def mkdir(self, path: str, mode: int = 0o755) -> None:
        parent, name = await self.parent_of(path)
        self._count(await self._call(path, self.ops.mkdir, parent, name, stat.S_IFDIR | mode, self.ctx))

    async def symlink(self, target: str, path: str) -> None:
        parent, name = await self.parent_of(path)
        self._count(await self._call(path, self.ops.symlink, parent, name, os.fsencode(target), self.ctx))

    async def mknod(self, path: str, mode: int, rdev: int = 0) -> None:
        parent, name = await self.parent_of(path)
        self._count(await self._call(path, self.ops.mknod, parent, name, mode, rdev, self.ctx))

    async def link(self, src: str, dst: str) -> None:
        """link(2): the kernel's own checks (an existing name EEXIST, a directory EPERM) first."""
        ino, entry = await self.resolve(src)
        parent, name = await self.parent_of(dst)
        if await self._lookup_or_none(parent, name) is not None:
            raise _err(errno.EEXIST, dst)
        if entry is None or stat.S_ISDIR(entry.st_mode):
            raise _err(errno.EPERM, src)
        self._count(await self._call(dst, self.ops.link, ino, parent, name, self.ctx))

    async def unlink(self, path: str) -> None:
        parent, name = await self.parent_of(path)
        await self._call(path, self.ops.unlink, parent, name, self.ctx)

    async def rmdir(self, path: str) -> None:
        parent, name = await self.parent_of(path)
        await self._call(path, self.ops.rmdir, parent, name, self.ctx)

    async def rename(self, src: str, dst: str, flags: int = 0) -> None:
        """rename(2)/renameat2: the kernel's own checks (an ancestor moved into its
        descendant is EINVAL; over its own ancestor ENOTEMPTY) before RENAME."""
        sp, sn = await self.parent_of(src)
        dp, dn = await self.parent_of(dst)
        s, d = self.split(src), self.split(dst)
        await self.resolve(src)  # ENOENT first, as lookup of the source is
        target = await self._lookup_or_none(dp, dn)  # then the new name's (ENAMETOOLONG)
        if flags & RENAME_NOREPLACE and target is not None:
            raise _err(errno.EEXIST, dst)
        if d[:len(s)] == s and len(d) > len(s):
            raise _err(errno.EINVAL, f"{src} -> {dst}")
        if s[:len(d)] == d and len(s) > len(d):
            raise _err(errno.ENOTEMPTY, f"{src} -> {dst}")
        await self._call(f"{src} -> {dst}", self.ops.rename, sp, sn, dp, dn, flags, self.ctx)

    async def _lookup_or_none(self, parent: int, name: bytes):
        try:
            return self._count(await self._call(name.decode(errors="replace"), self.ops.lookup, parent, name,
                                                self.ctx))
        except FileNotFoundError:
            return None

    async def readlink(self, path: str) -> str:
        ino, _ = await self.resolve(path)
        return os.fsdecode(await self._call(path, self.ops.readlink, ino, self.ctx))

    async def getxattr(self, path: str, name: str) -> bytes:
        ino, _ = await self.resolve(path)
        return await self._call(path, self.ops.getxattr, ino, name.encode(), self.ctx)

    async def listxattr(self, path: str) -> list[str]:
        ino, _ = await self.resolve(path)
        return [n.decode() for n in await self._call(path, self.ops.listxattr, ino, self.ctx)]

    async def setxattr(self, path: str, name: str, value: bytes) -> None:
        ino, _ = await self.resolve(path)
        await self._call(path, self.ops.setxattr, ino, name.encode(), value, self.ctx)

    async def release_all(self) -> None:
        for fh in list(self.handles):
            await self.close(fh)
        await self.forget()


async def picture(k: Kernel, path: str = "", modes: bool = True) -> dict[str, tuple]:
    """{path: (kind, mode bits, bytes or target)} of the workspace below ``path``, as
    workspace_fixtures.picture shows a directory (kinds: dir, file, link, special)."""
    out: dict[str, tuple] = {}

    async def walk(rel: str) -> None:
        for name, e in sorted((await k.listdir(rel)).items()):
            p = f"{rel}/{name}" if rel else name
            m = stat.S_IMODE(e.st_mode) if modes else bool(e.st_mode & stat.S_IXUSR)
            if stat.S_ISLNK(e.st_mode):
                out[p] = ("link", await k.readlink(p))
            elif stat.S_ISDIR(e.st_mode):
                out[p] = ("dir", m)
                await walk(p)
            elif stat.S_ISREG(e.st_mode):
                data = await k.read_file(p)
                assert len(data) == e.st_size, p
                out[p] = ("file", m, data)
            else:
                out[p] = ("special", stat.S_IFMT(e.st_mode), m, e.st_rdev)
    await walk(path)
    return out


def committed(repo, cid: bytes) -> dict[str, tuple]:
    """A commit's tree: {path: ("dir",) | ("file", executable, bytes) | ("link", target)}."""
    out: dict[str, tuple] = {}

    def walk(tid: bytes, rel: str) -> None:
        for e in repo.load_tree(tid).entries:
            p = f"{rel}/{e.name}" if rel else e.name
            if e.kind is Kind.DIR:
                out[p] = ("dir",)
                walk(e.id, p)
            elif e.kind is Kind.SYMLINK:
                out[p] = ("link", os.fsdecode(e.target))
            else:
                out[p] = ("file", e.kind is Kind.EXEC, bytes(repo.load_file(e.id)) if e.size else b"")
    walk(repo.load_commit(cid).tree, "")
    return out


class Session:
    """One mount of a workspace, kernel-free: ``async with Session(repo, dir) as k``."""

    def __init__(self, repo, workspace_dir, branch: str = "main", crash: bool = False,
                 options: WorkspaceOptions | None = None, uid: int | None = None, gid: int | None = None):
        self.repo, self.dir, self.branch, self.crash = repo, str(workspace_dir), branch, crash
        self.options = options or WorkspaceOptions()
        self.uid, self.gid = uid, gid
        self.fs: WorkspaceFS | None = None
        self.kernel: Kernel | None = None
        self._cm = None

    async def __aenter__(self) -> Kernel:
        self.fs = await trio.to_thread.run_sync(control.open_workspace, self.repo, self.dir, self.branch,
                                                self.options)
        self._cm = self.fs.running()
        await self._cm.__aenter__()
        self.kernel = Kernel(self.fs, self.uid, self.gid)
        return self.kernel

    async def __aexit__(self, *exc) -> None:
        fs = self.fs
        if self.crash:
            fs.shutdown = lambda: _crash_close(fs)  # nothing flushed, as after SIGKILL
        else:
            try:
                await self.kernel.release_all()
            except BaseException:
                fs.shutdown = lambda: _crash_close(fs)
                await self._cm.__aexit__(*exc)
                raise
        await self._cm.__aexit__(*exc)


def _crash_close(fs: WorkspaceFS) -> None:
    """What a SIGKILL leaves: the rows written so far, the data files; no flush of pending metadata."""
    for n in fs.table.nodes():
        if n.fd is not None:
            os.close(n.fd)
            n.fd = None
    fs.overlay._conn.close()
    fs.overlay.unlock()  # the kernel drops a killed process's flock


async def commit(k: Kernel, message: str = "model") -> bytes | None:
    """Commit the workspace (as the control channel does); None when there is nothing to commit."""
    from commitfs.errors import NothingToCommitError
    try:
        outcome = await control.commit(k.fs, message)
    except NothingToCommitError:
        return None
    return outcome.commit_id
