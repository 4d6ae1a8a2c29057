"""pyfuse3 Operations over the file-system core: a thin translator.

Every handler calls the matching vfs.FileSystem method and converts its
result to pyfuse3's types.  Exceptions become errno values here and only
here (``errno_of``): expected conditions (no such entry, read-only) quietly,
storage failures and corrupt objects with one log line, anything unexpected
with its traceback; all of those last two are EIO to the caller.
"""

from __future__ import annotations

import errno
import functools
import logging
import os
import queue
import threading
from collections.abc import Callable, Iterable

import pyfuse3

from commitfs.errors import (
    CorruptObjectError,
    InputError,
    IsADirectoryError_,
    NotADirectoryError_,
    PathNotFoundError,
    RepositoryError,
    RevisionError,
    StorageError,
)
from commitfs.vfs import Attr, FileSystem
from commitfs.vfs.errors import (
    BadHandleError,
    ExistsError,
    InvalidArgumentError,
    NameTooLongError,
    NoSpaceError,
    NoSuchAttributeError,
    NotASymlinkError,
    NotEmptyError,
    NotPermittedError,
    ReadOnlyError,
    StaleInodeError,
    UnsupportedError,
)

log = logging.getLogger(__name__)

#: Handle bits shared with commitfs.fuse._noopen (its PLAIN_FH and CACHE_FH; fuse/fastpath.py,
#: not imported here: it must be loaded before pyfuse3, and in the daemon only): a plain
#: READDIR, set by the C module; an OPENDIR whose listing the kernel may cache, set by opendir.
PLAIN_FH = 1 << 63
CACHE_FH = 1 << 62
#: With adaptive readdirplus (adaptive_listings), the READDIRPLUS that begins a listing gives at
#: most this many entries: the kernel asks for the rest as plain READDIR unless something
#: looks the entries up meanwhile (then as READDIRPLUS, in full).  A smaller directory is all
#: READDIRPLUS (`ls -l` of it looks nothing up); a walk that looks no file up (find(1))
#: makes the kernel build no dentry and inode per entry.
FIRST_PLUS_ENTRIES = 64

# Conditions a caller causes and expects to see: no log line.
_QUIET = {
    PathNotFoundError: errno.ENOENT,
    RevisionError: errno.ENOENT,
    NotADirectoryError_: errno.ENOTDIR,
    IsADirectoryError_: errno.EISDIR,
    ReadOnlyError: errno.EROFS,
    NoSuchAttributeError: pyfuse3.ENOATTR,
    NotASymlinkError: errno.EINVAL,
    BadHandleError: errno.EBADF,
    StaleInodeError: errno.ESTALE,
    ExistsError: errno.EEXIST,
    NotEmptyError: errno.ENOTEMPTY,
    NotPermittedError: errno.EPERM,
    UnsupportedError: errno.EOPNOTSUPP,
    InvalidArgumentError: errno.EINVAL,
    NameTooLongError: errno.ENAMETOOLONG,
    NoSpaceError: errno.ENOSPC,
    InputError: errno.EINVAL,
}
# OSErrors of the workspace's own disk that are the caller's condition, not a fault.
_QUIET_OS = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG}


def errno_of(exc: BaseException, what: str) -> int:
    """The errno a failed request returns; logs what deserves it."""
    for cls, code in _QUIET.items():
        if isinstance(exc, cls):
            return code
    if isinstance(exc, OSError) and exc.errno:  # the workspace's local disk
        if exc.errno not in _QUIET_OS:
            log.error("%s: local I/O failed: %s", what, exc)
        return exc.errno
    if isinstance(exc, CorruptObjectError):
        log.error("%s: corrupt data, returning EIO: %s", what, exc)
    elif isinstance(exc, RepositoryError):  # a damaged ref, a tree DAG past the walk bound...
        log.error("%s: the repository refuses it, returning EIO: %s", what, exc)
    elif isinstance(exc, StorageError):
        log.error("%s: storage failed, returning EIO: %s", what, exc)
    else:
        log.error("%s: unexpected error, returning EIO", what, exc_info=exc)
    return errno.EIO


def _handler(fn):
    @functools.wraps(fn)
    async def wrapper(self, *args):
        try:
            return await fn(self, *args)
        except pyfuse3.FUSEError:
            raise
        except Exception as exc:
            raise pyfuse3.FUSEError(errno_of(exc, fn.__name__)) from None
    return wrapper


def _read_only(name: str):
    """A write handler: the core refuses it (ReadOnlyError, so EROFS)."""
    async def refuse(self, *args):
        self.fs.refuse_write(name)
    refuse.__name__ = refuse.__qualname__ = name
    return _handler(refuse)


class Operations(pyfuse3.Operations):
    """The read-only mount.

    With ``no_open`` (set by the daemon once fastpath.engage() succeeded, after
    pyfuse3.init and before the first request), the first OPEN is
    answered ENOSYS once it has passed the checks a real open makes: the kernel
    then opens every file of the mount itself, with no round trip, keeping
    its page cache (FOPEN_KEEP_CACHE), and sends no RELEASE.  A warm re-read
    costs no request at all; a read the kernel cannot serve arrives with the
    inode as its file handle and goes to ``FileSystem.read_inode``.  Nothing
    a read-only open decides is lost: the mount is ``ro``, so the kernel
    itself refuses opens for writing with EROFS, and directories still go
    through OPENDIR."""

    supports_dot_lookup = True
    enable_writeback_cache = False
    enable_acl = False

    def __init__(self, fs: FileSystem):
        super().__init__()
        self.fs = fs
        self.no_open = False  # see the class docstring
        self.opens = 0  # OPEN requests received (in no-open mode: 1 at most, the first)
        #: Set by the daemon once fastpath.engage_listings() succeeded: a commit directory's
        #: listing is handed to the kernel to cache (CACHE_FH on OPENDIR)...
        self.cache_listings = False
        #: ...and, with adaptive readdirplus asked for, the READDIRPLUS beginning a listing is short.
        self.adaptive_listings = False
        self.getxattrs = 0  # GETXATTR requests that reached ``getxattr`` (fastpath.engage_xattrs)
        self.readdirs = 0  # READDIR and READDIRPLUS requests received
        self.plain_readdirs = 0  # ...of which plain READDIR (PLAIN_FH)
        if isinstance(fs, FileSystem):
            # Verified chunks a random read fetched whole go to the kernel's page cache,
            # so the next reads in them make no request (vfs/prefetch.py, publishing),
            # and so do their neighbours, read and verified in the page-store thread.
            fs.page_store = page_storer
            fs.page_store_later = page_storer.later
        self.uid = os.getuid()
        self.gid = os.getgid()

    def _entry(self, a: Attr) -> pyfuse3.EntryAttributes:
        e = pyfuse3.EntryAttributes()
        e.st_ino = a.ino
        e.generation = 0
        e.entry_timeout = a.entry_timeout
        e.attr_timeout = a.attr_timeout
        e.st_mode = a.mode
        e.st_nlink = a.nlink
        e.st_uid = self.uid if a.uid is None else a.uid
        e.st_gid = self.gid if a.gid is None else a.gid
        e.st_rdev = a.rdev
        e.st_size = a.size
        e.st_blksize = a.blksize
        e.st_blocks = (a.size + 511) // 512 if a.blocks is None else a.blocks
        e.st_atime_ns = e.st_mtime_ns = e.st_ctime_ns = a.mtime_ns
        if a.atime_ns is not None:
            e.st_atime_ns = a.atime_ns
        if a.ctime_ns is not None:
            e.st_ctime_ns = a.ctime_ns
        return e

    # --- names and attributes ------------------------------------------------------
    # lookup and read are the two requests of a training job's first read of each
    # file: _handler's work is written out in them, one coroutine layer fewer.
    async def lookup(self, parent_inode, name, ctx=None):
        try:
            return self._entry(await self.fs.lookup(parent_inode, name))
        except pyfuse3.FUSEError:
            raise
        except Exception as exc:
            raise pyfuse3.FUSEError(errno_of(exc, "lookup")) from None

    async def forget(self, inode_list):
        try:
            self.fs.forget(inode_list)
        except Exception:  # forget must never raise
            log.exception("forget failed")

    @_handler
    async def getattr(self, inode, ctx=None):
        return self._entry(await self.fs.getattr(inode))

    @_handler
    async def readlink(self, inode, ctx=None):
        return await self.fs.readlink(inode)

    @_handler
    async def getxattr(self, inode, name, ctx=None):
        self.getxattrs += 1
        return await self.fs.getxattr(inode, name)

    @_handler
    async def listxattr(self, inode, ctx=None):
        return await self.fs.listxattr(inode)

    @_handler
    async def statfs(self, ctx=None):
        s = await self.fs.statfs()
        out = pyfuse3.StatvfsData()
        out.f_bsize = out.f_frsize = s.block_size
        out.f_blocks = s.blocks
        out.f_bfree = out.f_bavail = s.free_blocks
        out.f_files = s.files
        out.f_ffree = out.f_favail = s.free_files
        out.f_namemax = s.name_max
        return out

    # --- directories -------------------------------------------------------------
    @_handler
    async def opendir(self, inode, ctx=None):
        fh = await self.fs.opendir(inode)
        if self.cache_listings and self.fs.listing_fixed(fh):
            return fh | CACHE_FH  # the C module clears it and sets cache_readdir + keep_cache
        return fh

    @_handler
    async def readdir(self, fh, start_id, token):
        self.readdirs += 1
        if fh & PLAIN_FH:
            # A plain READDIR (fuse/fastpath.py): pyfuse3's reply writes only the name, st_ino
            # and the type of st_mode (the C module), and the kernel takes no reference.
            self.plain_readdirs += 1
            p = pyfuse3.EntryAttributes()
            add = pyfuse3.readdir_reply

            def plain(name: bytes, ino: int, mode: int, next_id: int) -> bool:
                p.st_ino = ino
                p.st_mode = mode
                return add(token, name, p, next_id)

            await self.fs.readdir_plain(fh & ~PLAIN_FH, start_id, plain)
            return
        # One EntryAttributes for the whole reply (readdir_reply copies it into the
        # kernel's buffer): the entries of a commit directory differ only in inode,
        # mode and size, so after the first only those are set (a readdirplus
        # reply holds hundreds of entries; a full _entry is most of their cost).
        e = None
        last: Attr | None = None

        def reply(name: bytes, attr: Attr, next_id: int) -> bool:
            nonlocal e, last
            if (last is not None and attr.mtime_ns == last.mtime_ns and attr.entry_timeout == last.entry_timeout
                    and attr.attr_timeout == last.attr_timeout and attr.uid is None and attr.gid is None
                    and attr.atime_ns is None and attr.ctime_ns is None and attr.blocks is None
                    and attr.nlink == last.nlink and attr.rdev == last.rdev and attr.blksize == last.blksize):
                e.st_ino = attr.ino
                e.st_mode = attr.mode
                e.st_size = attr.size
                e.st_blocks = (attr.size + 511) // 512
            else:
                e = self._entry(attr)
                last = attr if attr.uid is None and attr.gid is None and attr.atime_ns is None \
                    and attr.ctime_ns is None and attr.blocks is None else None
            return pyfuse3.readdir_reply(token, name, e, next_id)

        if self.adaptive_listings and start_id == 0:
            left = FIRST_PLUS_ENTRIES
            full = reply

            def reply(name: bytes, attr: Attr, next_id: int) -> bool:  # noqa: F811
                nonlocal left
                if left <= 0:
                    return False
                left -= 1
                return full(name, attr, next_id)

        await self.fs.readdir(fh, start_id, reply)

    @_handler
    async def releasedir(self, fh):
        await self.fs.releasedir(fh)

    # --- files ---------------------------------------------------------------------
    @_handler
    async def open(self, inode, flags, ctx=None):
        self.opens += 1
        if self.no_open:
            self.fs.check_open(inode, flags)
            raise pyfuse3.FUSEError(errno.ENOSYS)  # from now on the kernel opens files itself
        fh = await self.fs.open(inode, flags)
        # Commits are immutable: the kernel may keep what it read across opens.
        return pyfuse3.FileInfo(fh=fh, keep_cache=True)

    async def read(self, fh, off, size):
        try:
            if self.no_open:
                return await self.fs.read_inode(fh, off, size)  # fh is the inode (fuse/fastpath.py)
            return await self.fs.read(fh, off, size)
        except pyfuse3.FUSEError:
            raise
        except Exception as exc:
            raise pyfuse3.FUSEError(errno_of(exc, "read")) from None

    @_handler
    async def release(self, fh):
        await self.fs.release(fh)

    # flush and fsync are left to pyfuse3's default (ENOSYS): the kernel then stops
    # sending them, which saves a round trip on every close(); nothing is ever dirty.

    # --- writes: all refused ---------------------------------------------------------
    setattr = _read_only("setattr")
    mknod = _read_only("mknod")
    mkdir = _read_only("mkdir")
    unlink = _read_only("unlink")
    rmdir = _read_only("rmdir")
    symlink = _read_only("symlink")
    rename = _read_only("rename")
    link = _read_only("link")
    write = _read_only("write")
    create = _read_only("create")
    setxattr = _read_only("setxattr")
    removexattr = _read_only("removexattr")


def _owner(ctx) -> tuple[int, int] | None:
    """The creator of a new node (uid, gid of the request), or None without a context."""
    return (ctx.uid, ctx.gid) if ctx is not None else None


class WorkspaceOperations(Operations):
    """A writable workspace (vfs.workspace.WorkspaceFS): every write handler maps to
    the workspace; files are opened without keep_cache (their bytes can change), and
    write-only ones direct (WorkspaceFS.writes_direct)."""

    @_handler
    async def open(self, inode, flags, ctx=None):
        fh = await self.fs.open(inode, flags)
        return pyfuse3.FileInfo(fh=fh, keep_cache=False, direct_io=self.fs.writes_direct(fh, flags))

    @_handler
    async def create(self, parent_inode, name, mode, flags, ctx=None):
        fh, attr = await self.fs.create(parent_inode, name, mode, flags, owner=_owner(ctx))
        return pyfuse3.FileInfo(fh=fh, keep_cache=False, direct_io=self.fs.writes_direct(fh, flags)), self._entry(attr)

    @_handler
    async def write(self, fh, off, buf):
        return await self.fs.write(fh, off, buf)

    @_handler
    async def flush(self, fh):
        await self.fs.flush(fh)

    @_handler
    async def fsync(self, fh, datasync):
        await self.fs.fsync(fh, datasync)

    @_handler
    async def fsyncdir(self, fh, datasync):
        await self.fs.fsyncdir(fh, datasync)

    @_handler
    async def setattr(self, inode, attr, fields, fh, ctx=None):
        a = await self.fs.setattr(
            inode,
            mode=attr.st_mode if fields.update_mode else None,
            size=attr.st_size if fields.update_size else None,
            mtime_ns=attr.st_mtime_ns if fields.update_mtime else None,
            atime_ns=attr.st_atime_ns if fields.update_atime else None,
            uid=attr.st_uid if fields.update_uid else None,
            gid=attr.st_gid if fields.update_gid else None,
            ctime_ns=attr.st_ctime_ns if fields.update_ctime else None,
            fh=fh)
        return self._entry(a)

    @_handler
    async def mkdir(self, parent_inode, name, mode, ctx=None):
        return self._entry(await self.fs.mkdir(parent_inode, name, mode, owner=_owner(ctx)))

    @_handler
    async def symlink(self, parent_inode, name, target, ctx=None):
        return self._entry(await self.fs.symlink(parent_inode, name, target, owner=_owner(ctx)))

    @_handler
    async def mknod(self, parent_inode, name, mode, rdev, ctx=None):
        return self._entry(await self.fs.mknod(parent_inode, name, mode, rdev, owner=_owner(ctx)))

    @_handler
    async def link(self, inode, new_parent_inode, new_name, ctx=None):
        return self._entry(await self.fs.link(inode, new_parent_inode, new_name))

    @_handler
    async def unlink(self, parent_inode, name, ctx=None):
        await self.fs.unlink(parent_inode, name)

    @_handler
    async def rmdir(self, parent_inode, name, ctx=None):
        await self.fs.rmdir(parent_inode, name)

    @_handler
    async def rename(self, parent_inode_old, name_old, parent_inode_new, name_new, flags, ctx=None):
        await self.fs.rename(parent_inode_old, name_old, parent_inode_new, name_new, flags)

    async def _unsupported(self, *args, **kwargs):
        raise pyfuse3.FUSEError(errno.EOPNOTSUPP)

    setxattr = _unsupported
    removexattr = _unsupported


# A page-cache hand-off runs in the PageStorer's thread, which the event loop
# does not wait for at unmount, and the session it writes to is freed by
# pyfuse3.close.  Hand-offs are counted under this condition; end_page_stores
# (called before pyfuse3.close) closes the door and waits for those in flight,
# so none runs during the close.  Each session of the process has a number
# (``_session``, moved on by reopen_page_stores): a hand-off queued in one is
# never delivered into a later one (another file may have its inode number).
# One can wait in the kernel for as long as a READ of a page it stores is not
# answered (the kernel locks the page for that READ), and once the request loop
# has stopped none is: the daemon then aborts the FUSE connection, which ends
# every request and so the wait, and if even that fails it does not free the
# session at all (daemon.py, _close).
_stores = threading.Condition()
_stores_running = 0
_stores_open = True
_session = 0


def store_pages(inode: int, offset: int | None, data, session: int | None = None) -> None:
    """Put a file's verified bytes into the kernel's page cache (FUSE notify-store;
    blocking: called in the PageStorer's thread).  The kernel keeps only whole
    pages; an inode it has forgotten, or an old kernel, is not an error.  With
    ``offset`` None, ``data`` is a job (PageStorer.later): called here, it yields
    (offset, verified bytes) to store, and it counts as in flight until it ends
    (end_page_stores waits for it).  After end_page_stores, or when ``session``
    (queued in) is not the current one, it does nothing."""
    global _stores_running
    with _stores:
        if not _stores_open or (session is not None and session != _session):
            return
        _stores_running += 1
    try:
        if offset is None:  # a job (PageStorer.later): it reads and verifies the bytes here
            for offset, data in data():
                if not _stores_open:
                    break
                pyfuse3.notify_store(inode, offset, data)
        else:
            pyfuse3.notify_store(inode, offset, data)
    except OSError as exc:
        log.debug("notify_store of inode %d failed: %s", inode, exc)
    finally:
        with _stores:
            _stores_running -= 1
            _stores.notify_all()


#: Bytes queued for the page-store thread at most; more are dropped, never waited for.
PAGE_STORE_QUEUE_BYTES = 16 * 1024 * 1024
#: Jobs (PageStorer.later) are queued only while the queue holds less than this
#: share of PAGE_STORE_QUEUE_BYTES: a lagging thread drops neighbours first, never
#: the chunk a read just verified.
PAGE_STORE_JOB_SHARE = 0.5


class PageStorer:
    """``store_pages`` in one thread of its own, fed without waiting: the event
    loop only queues (``__call__``), so a random read's hand-off costs it no task
    and no thread hop.  A store may wait for a page the kernel has locked for a
    READ being answered (that READ's own pages, say): only this thread waits, until
    the event loop has replied.  ``later`` queues a job instead of bytes: a
    function that reads and verifies them in this thread (a random read's
    neighbouring chunks, vfs/core.py), so that work leaves the event loop too.
    Queued bytes (a job's: those it will store) are bounded; past the bound a
    hand-off is dropped (False), and a job already past half of it (jobs are
    only a head start; the bytes a read just verified come first).  After end_page_stores what is still queued is
    dropped too (``clear``; and store_pages does nothing for a hand-off of an
    earlier session)."""

    def __init__(self, max_bytes: int = PAGE_STORE_QUEUE_BYTES):
        self.max_bytes = max_bytes
        self._queue: queue.SimpleQueue = queue.SimpleQueue()
        self._lock = threading.Lock()
        self._queued = 0  # bytes
        self._thread: threading.Thread | None = None
        #: Hand-offs dropped for a full queue (the log, tests).
        self.dropped = 0

    def __call__(self, inode: int, offset: int, data) -> bool:
        return self._put(inode, offset, data, len(data), self.max_bytes)

    def later(self, inode: int, job: Callable[[], Iterable[tuple[int, object]]], nbytes: int) -> bool:
        """Queue ``job``: called in this thread, it yields (offset, verified bytes)
        of file ``inode`` to store, about ``nbytes`` in all; False if dropped."""
        return self._put(inode, None, job, nbytes, int(self.max_bytes * PAGE_STORE_JOB_SHARE))

    def _put(self, inode: int, offset: int | None, data, n: int, limit: int) -> bool:
        with self._lock:
            if not _stores_open or self._queued + n > limit:
                self.dropped += 1
                return False
            self._queued += n
            session = _session
            if self._thread is None:
                # A daemon thread: a store stuck at exit must not keep the process (adapter doc).
                self._thread = threading.Thread(target=self._run, name="commitfs-page-store", daemon=True)
                self._thread.start()
        self._queue.put((session, inode, offset, data, n))
        return True

    def clear(self) -> None:
        """Drop what is queued (the session ended)."""
        while True:
            try:
                _, _, _, _, n = self._queue.get_nowait()
            except queue.Empty:
                return
            with self._lock:
                self._queued -= n

    def _run(self) -> None:
        while True:
            session, inode, offset, data, n = self._queue.get()
            try:
                store_pages(inode, offset, data, session)
            except Exception:  # never ends the thread: a lost shortcut only
                log.debug("page-cache hand-off of inode %d failed", inode, exc_info=True)
            finally:
                data = None  # not kept while the thread waits for the next
                with self._lock:
                    self._queued -= n


page_storer = PageStorer()


def reopen_page_stores() -> None:
    """Let hand-offs through again, for a new session in this process (those
    queued in an earlier one are dropped)."""
    global _stores_open, _session
    with _stores:
        _session += 1
        _stores_open = True


#: After the FUSE connection is aborted, a hand-off ends at once (its request ended): the wait then.
ABORTED_WAIT_S = 5.0


def end_page_stores(timeout: float = 5.0, abort: Callable[[], str | None] | None = None) -> bool:
    """Refuse new page-cache hand-offs and wait (bounded) for those in flight.
    If one still runs at ``timeout``, ``abort()`` (the FUSE connection's: None
    when done, else why not) and wait ``ABORTED_WAIT_S`` more.  True: none runs
    now, the session may be freed; False: one still does, it must not be (without
    ``abort``, False is said only to the caller, not logged)."""
    global _stores_open
    idle = lambda: _stores_running == 0  # noqa: E731
    with _stores:
        _stores_open = False
    page_storer.clear()
    with _stores:
        done = _stores.wait_for(idle, timeout=timeout)
    if done:
        return True
    if abort is None:
        return False  # the caller tries again with one (daemon.py: _on_signals, then _close)
    why_not = abort()
    if why_not is None:
        log.warning("a page-cache hand-off was still running %.0f s into the unmount: FUSE connection aborted",
                    timeout)
        with _stores:
            done = _stores.wait_for(idle, timeout=ABORTED_WAIT_S)
        if done:
            return True
    log.error("a page-cache hand-off is still running %.0f s into the unmount (%s): the FUSE session is "
              "left allocated, not freed under it", timeout, why_not or "after the connection was aborted")
    return False


def invalidate(inodes) -> None:
    """Make the kernel drop cached attributes and pages of ``inodes`` (changed behind its
    back by a reset or a rebased commit).  Blocking: call it in a worker thread, never
    from a request handler."""
    for ino in inodes:
        try:
            pyfuse3.invalidate_inode(ino)
        except OSError:
            pass  # not known to the kernel (any more)
