"""Making a workspace's changes persistent (vfs/workspace.py): rows and copy-on-write.

Each change writes its overlay rows (vfs/overlay.py) before it changes the
in-memory tree.  ``_persist`` gives a node a row (materializing its
ancestors), ``_materialize`` copies a lazy directory's listing into rows (no
file bytes read), ``_ensure_upper`` gives a file its data file on its first
write (a committed file's copies nothing: chunk-level copy-on-write,
vfs/wscow.py; ``_truncate`` and ``_flush`` keep its ranges), and
``_unlink_node``/``_detach`` take a node out of the tree while whoever has it
open keeps its bytes.  Blocking durability work (fsync of the data files, the
data directory and the overlay database) runs in a worker thread under the
loader's limiter and I/O timeout (``_sync``; a flush of everything,
``_flush_pending``, fdatasyncs the data files there before it writes their
range rows), never on the event loop.
"""

from __future__ import annotations

import logging
import os


from commitfs.errors import PathNotFoundError
from commitfs.vfs.errors import WorkspaceIOError
from commitfs.vfs.overlay import SpaceReleasedError
from commitfs.vfs.wscow import Cow
from commitfs.vfs.wstree import Kids, WNode, _now

log = logging.getLogger(__name__)


class OverlayStore:
    """Rows and data files of WorkspaceFS (a mixin: the state lives there)."""

    async def _persist(self, n: WNode) -> None:
        """Give ``n`` an overlay row (materializing its ancestors)."""
        if n.oid is not None:
            return
        if n.parent is None:
            raise PathNotFoundError(f"{n.name}: it was deleted")
        await self._persist(n.parent)
        await self._materialize(n.parent)
        if n.oid is None:
            raise PathNotFoundError(f"{n.name}: it was deleted")

    async def _materialize(self, d: WNode) -> None:
        """Copy a lazy directory's listing into overlay rows (no file bytes read)."""
        await self._persist(d)
        if d.children is not None:
            return
        tree = await self.loader.tree(d.origin.id)
        if d.children is not None:
            return
        kids = {}  # (a plain dict filled, then one Kids made of it: counted in C)
        for e in await self.loader.tree_entries(tree):
            n = d.lazy.get(e.name) or self._from_entry(d, e)
            kids[e.name] = n
        ids = [self.overlay.new_id() for _ in kids]
        rows = []
        for nid, n in zip(ids, kids.values()):
            r = n.row()
            r.id, r.parent = nid, d.oid
            rows.append(r)
        with self.overlay.batch():
            self.overlay.insert(rows)
            self.overlay.update(d.oid, materialized=1)
        for nid, n in zip(ids, kids.values()):
            n.oid = nid
        d.children = Kids(kids)
        d.lazy = {}

    def _touch(self, d: WNode, *names: str) -> None:
        """A directory's entries ``names`` changed: its mtime and ctime move (written at
        flush), and a commit looks at those names (``_mark``)."""
        d.mtime_ns = d.ctime_ns = _now()
        self._dirtied(d)
        self._mark(d, *names)

    def _flush(self, n: WNode, synced: bool = False) -> None:
        """Write a node's pending metadata: its times and a copy-on-write file's ranges
        (those changed since the last flush: vfs/wscow.py).  On a full disk the
        overlay's reserve is released and it is written once more (a few pages: the
        written bytes already have their blocks)."""
        cow = n.cow
        if n.oid is not None and (n.dirty or (cow is not None and cow.dirty)):
            times = (n.mtime_ns, n.ctime_ns) if n.dirty else None
            put, gone = cow.changes() if cow is not None and cow.dirty else ((), ())
            if synced:  # its data file was fdatasync'd just before (_flush_pending)
                self._store_pending(n.oid, times, put, gone)
            else:
                self._store_pending(n.oid, times, put, gone, n.fd, n.upper)
            if cow is not None:
                cow.stored()
        n.dirty = False

    async def _flush_file(self, n: WNode) -> None:
        """``_flush`` of an open file (flush, release, fsync): its times and a
        copy-on-write file's ranges are written in a worker thread under the
        loader's limiter and I/O timeout, never on the event loop (the caller
        holds the lock, so nothing changes the node meanwhile).  The thread gets
        its own descriptor of the data file (a dup), so a close on the loop after
        a timeout cannot pull the file out from under it."""
        cow = n.cow
        has_ranges = cow is not None and cow.dirty
        if n.oid is None or not (n.dirty or has_ranges):
            n.dirty = False
            return
        times = (n.mtime_ns, n.ctime_ns) if n.dirty else None
        put, gone = cow.changes() if has_ranges else ((), ())
        fd = os.dup(n.fd) if put and n.fd is not None else None
        await self.loader.io("metadata of a workspace file", self._store_pending_own_fd, n.oid, times, put, gone,
                             fd, n.upper if put else None)
        if has_ranges:
            cow.stored()
        if times is not None and (n.mtime_ns, n.ctime_ns) == times:
            n.dirty = False

    def _store_pending_own_fd(self, oid: int, times, put, gone, fd: int | None, upper: str | None) -> None:
        """``_store_pending`` in a worker thread, closing ``fd`` (the thread's own dup) after."""
        try:
            self._store_pending(oid, times, put, gone, fd, upper)
        finally:
            if fd is not None:
                os.close(fd)

    def _store_pending(self, oid: int, times: tuple[int, int] | None, put, gone, fd: int | None = None,
                       upper: str | None = None) -> None:
        """Write a node's times and range rows in one transaction.  The bytes the
        rows of ``put`` name are made durable first (fdatasync of the data file:
        ``fd``, else ``upper`` opened for it), so no range row is ever durable
        before its bytes (a later fsync of the WAL, by any file's fsync or a
        checkpoint, would make it so: after a power loss it would read as zeros)."""
        if put and (fd is not None or upper is not None):
            own = fd is None
            if own:
                fd = self.overlay.open_data(upper)
            try:
                os.fdatasync(fd)
            finally:
                if own:
                    os.close(fd)
        for attempt in (1, 2):
            try:
                with self.overlay.batch():
                    if times is not None:
                        self.overlay.update(oid, mtime_ns=times[0], ctime_ns=times[1])
                    if put or gone:
                        self.overlay.update_ranges(oid, put, gone)
                return
            except SpaceReleasedError:
                if attempt == 2:
                    raise

    async def _flush_pending(self) -> None:
        """``_flush_all`` from the event loop (status, commit, fsyncdir; the caller holds
        the lock): the data files whose ranges it will write are fdatasync'd first,
        in a worker thread under the loader's limiter and I/O timeout, so a slow or
        failing disk never stalls the loop, and no range row is durable before its
        bytes.  A disk error is a WorkspaceIOError (EIO, a one-line answer)."""
        files = self._unsynced_files()
        synced: set[int] = set()
        if files:
            fds = []
            try:
                for n in files:
                    fds.append((os.dup(n.fd), None) if n.fd is not None else (None, n.upper))
            except OSError as exc:
                for fd, _ in fds:
                    if fd is not None:
                        os.close(fd)
                raise WorkspaceIOError(f"the workspace {self.overlay.path}: {exc.strerror or exc}") from None
            await self.loader.io("fdatasync of workspace files", self._datasync, fds)
            synced = {id(n) for n in files}
        self._flush_all(synced)

    def _unsynced_files(self) -> list[WNode]:
        """The copy-on-write files whose next flush writes range rows (bytes to make durable first)."""
        out = []
        for n in self._unflushed:  # a superset of the nodes with something to write (wstree.py)
            cow = n.cow
            if cow is not None and cow.dirty and n.oid is not None and (n.fd is not None or n.upper is not None):
                out.append(n)
        return out

    def _datasync(self, files: list[tuple[int | None, str | None]]) -> None:
        """fdatasync each (fd, closed after; else the data file ``upper``, opened for it)
        (worker thread)."""
        error = None
        for fd, upper in files:
            try:
                if fd is None:
                    fd = self.overlay.open_data(upper)
                os.fdatasync(fd)
            except OSError as exc:
                error = error or exc
            finally:
                if fd is not None:
                    os.close(fd)
        if error is not None:
            raise WorkspaceIOError(f"the workspace {self.overlay.path}: cannot sync a data file: "
                                   f"{error.strerror or error}")

    def _flush_all(self, synced: set[int] = frozenset()) -> None:
        """Write every node's pending metadata in one transaction (on the calling thread:
        the event loop's callers use ``_flush_pending``, which fdatasyncs the data
        files first, in a worker thread: ``synced``, the ids of those nodes, are not
        synced again here)."""
        # One transaction for all: a node's flags are cleared as it is written, so if
        # the transaction fails they are set again (a later fsync must still write it).
        # It visits the nodes dirtied since (``_unflushed``, wstree.py), not the tree:
        # those with a row (a node without one is not in the tree: a detached file's
        # times are its own) stay there while they have something left to write.
        cleared: list[tuple[WNode, bool, set | None]] = []
        if self.root is not None and self._unflushed:
            try:
                with self.overlay.batch():
                    for n in self._unflushed:
                        cow = n.cow
                        if n.oid is not None and (n.dirty or (cow is not None and cow.dirty)):
                            cleared.append((n, n.dirty, set(cow.touched) if cow is not None and cow.dirty
                                            else None))
                            self._flush(n, id(n) in synced)
            except BaseException:
                for n, dirty, touched in cleared:
                    n.dirty = n.dirty or dirty
                    if touched is not None and n.cow is not None:
                        n.cow.touched |= touched
                        n.cow.dirty = True
                raise
            self._unflushed = {n for n in self._unflushed
                               if n.dirty or (n.cow is not None and n.cow.dirty)}

    def _close_fd(self, n: WNode) -> None:
        if n.fd is not None:
            try:
                os.close(n.fd)
            except OSError:
                pass
            n.fd = None

    def _fd(self, n: WNode) -> int:
        if n.fd is None:
            n.fd = self.overlay.open_data(n.upper)
        return n.fd

    async def _ensure_upper(self, n: WNode, empty: bool = False) -> int:
        """The writable file descriptor of ``n``, giving it a data file first if needed.

        A committed file copies nothing (vfs/wscow.py): its data file is made
        sparse at its size and its row names the base; ``empty`` (a truncation
        to zero follows) leaves no base."""
        if n.fd is not None and (n.upper is not None or n.oid is None):
            return n.fd
        if n.upper is not None:
            return self._fd(n)
        detached = n.parent is None
        if not detached:
            await self._persist(n)
        if n.upper is not None or n.fd is not None:
            return self._fd(n) if n.fd is None else n.fd
        name = str(n.oid) if not detached else None
        fd = self.overlay.create_data(name) if name else self.overlay.anonymous_file(str(n.ino))
        try:
            cow = None
            if not empty and n.origin is not None and n.origin.size:
                os.ftruncate(fd, n.origin.size)  # sparse: the base shows through its holes
                cow = Cow(n.origin.id, n.origin.size)
            if name and n.oid is not None:
                self.overlay.update(n.oid, upper=name, cow_base=cow.base if cow else None,
                                    cow_until=cow.until if cow else None)
                n.upper = name
        except BaseException:
            os.close(fd)
            if name:
                self.overlay.remove_data(name)
            raise
        n.fd = fd
        n.cow = cow
        n.size = cow.until if cow is not None else 0
        self._mark_node(n)  # its bytes are the data file's (and the base's) now
        return fd

    def _truncate(self, n: WNode, fd: int, size: int) -> None:
        """Set a file's size (its data file's first, then the base's extent: a crash
        between leaves a row that ``_load`` clamps to the data file's size)."""
        os.ftruncate(fd, size)
        n.size = size
        cow = n.cow
        if cow is not None and size < cow.until:
            # The row first, memory after: if the transaction fails (a full disk, then
            # a retry of the whole call) the retry still sees the base's old extent.
            cut = cow.copy()
            cut.truncate(size)
            # Only the rows that go (and the base's extent) are written now; a range
            # still to write (clipped, or written since the last flush) stays dirty for
            # the next flush, which makes its bytes durable first (_store_pending).
            put, gone = cut.changes()
            if n.oid is not None:
                with self.overlay.batch():
                    self.overlay.update(n.oid, cow_base=cut.base if cut.until else None,
                                        cow_until=cut.until if cut.until else None)
                    self.overlay.update_ranges(n.oid, [], gone)
            cut.stored()
            if n.oid is not None and put:
                cut.touched = {a for a, _ in put}
                cut.dirty = True
            n.cow = cut if cut.until else None  # nothing of the base left: the data file is the file
        n.mtime_ns = n.ctime_ns = _now()  # a truncation is a status change too
        self._dirtied(n)

    def _remove_subtree_rows(self, n: WNode, ids: list[int], data: list[str]) -> None:
        if n.oid is not None:
            ids.append(n.oid)
        if n.upper is not None:
            data.append(n.upper)
        for c in (n.children or {}).values():
            self._remove_subtree_rows(c, ids, data)

    def _detach(self, n: WNode) -> None:
        """``n`` left the tree (unlinked, replaced, reset): whoever has it open keeps its bytes."""
        if n.upper is not None:
            if n.opens > 0 and n.fd is None:
                n.fd = self.overlay.open_data(n.upper)
            elif n.opens <= 0:
                self._close_fd(n)
        for c in list((n.children or {}).values()) + list(n.lazy.values()):
            self._detach(c)  # lazy ones too: a file open below an untouched directory leaves with it
        n.lazy = {}
        if n.atime_ns is None:  # its own from now on, not the next base commit's time
            n.atime_ns = self.base_time_ns
        n.parent = None
        n.links = None
        n.oid = None
        n.upper = None
        n.dirty = False
        self._maybe_forget(n)

    def _maybe_forget(self, n: WNode) -> None:
        """A node out of the tree leaves the inode table once nothing holds it (its bytes
        with it)."""
        if self.table.discard(n):
            self._close_fd(n)

    def _unlink_node(self, d: WNode, name: str) -> None:
        """Remove the entry ``name`` of materialized ``d`` from the tree and the overlay: one
        name of a hard-linked node (vfs/wslink.py), else the node and its subtree."""
        n = d.children[name]
        if n.links:
            with self.overlay.batch():
                apply = self._drop_name_rows(d, name, n)
            apply()
            return
        if n.is_dir:
            self._unlink_linked_below(n)
        ids: list[int] = []
        data: list[str] = []
        self._remove_subtree_rows(n, ids, data)
        self.overlay.delete(ids)
        del d.children[name]
        self._touch(d, name)
        self._detach(n)
        for name in data:
            self.overlay.remove_data(name)
        if data:
            self.overlay.make_reserve()

    async def _prepare_parent(self, parent_inode: int) -> WNode:
        d = self._dir(parent_inode)
        await self._materialize(d)
        return d

    def _add_child(self, d: WNode, n: WNode) -> None:
        n.oid = self.overlay.new_id()
        self.overlay.insert([n.row()])
        d.children[n.name] = n
        self._touch(d, n.name)

    async def _sync(self, fd: int | None = None) -> None:
        """fsync (``fd``'s data, the data directory, the database) in a worker thread
        under the loader's limiter and I/O timeout: never on the event loop."""
        await self.loader.io("fsync of the workspace overlay", self.overlay.sync, fd)
