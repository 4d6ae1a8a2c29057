"""A writable view of a branch: the base commit's tree plus a persistent overlay.

The modules
-----------
``WorkspaceFS`` (here: opening, and the POSIX request handlers) is composed
of one mixin per concern, each in its own module: the node tree
(vfs/wstree.py; its inode numbers and lookup counts are the read-only
core's ``InodeTable``, vfs/inode.py), overlay persistence and copy-on-write
(vfs/wsoverlay.py, over the database of vfs/overlay.py), commit
preparation, rebase and crash recovery (vfs/wscommit.py) and the merge in
progress (vfs/wsmerge.py).  The state lives in ``WorkspaceFS``; the mixins
share it.

The in-memory tree
------------------
Every node the kernel knows about, and every node of the overlay, is a
``WNode``.  A node's *identity* is the object, not its path: a rename moves
the object, so the inode number the kernel holds stays right (the read-only
core keys nodes by path and content, which a writable tree cannot do).  A
directory is either *materialized* (``children``: its full listing, backed by
rows of the overlay, vfs/overlay.py) or *lazy* (its listing is its origin
tree in the repository; nodes looked up in it are cached in ``lazy``).  The
first change inside a directory materializes it and its ancestors (rows for
their entries, no file bytes read); the first write to an untouched file
copies nothing: chunk-level copy-on-write (vfs/wscow.py) keeps only the
written ranges in the overlay, and reads merge them with the base file's
chunks, read as the read-only mount reads them.  Nodes with rows stay in
memory for the mount's life; lazy ones leave when the kernel forgets them.

Concurrency
-----------
Reads run concurrently.  Changes (including writes, which are local pwrites)
run one at a time under one lock, and each writes its overlay rows before it
changes the in-memory tree: so a change is atomic with respect to other
changes, to a crash (one SQLite transaction), and to ``commit``, which holds
the same lock while it snapshots the overlay.  Local reads and writes of
overlay files are done inline, not in worker threads: they hit the page
cache, and a thread hop (loader.io) costs more than the write.  Measured
(WorkspaceFS.write without the kernel, 2 loaded CPUs, median of 8 runs):
1 MiB writes 0.26 -> 0.38 ms each, 128 KiB 0.22 -> 0.82 ms, 4 KiB 0.04 ->
0.59 ms.  Through a mount a 1 MiB write's pwrite into fresh pages of the
data file costs 0.2-5 ms (a virtual machine's first touch of memory), which
a thread would not make cheaper.
Repository reads (trees, manifests, chunks) and fsync (of a data
file, the data directory and the overlay database) run in worker threads
under the loader's limiter and I/O timeout, as in the read-only core, so a
slow disk's fsync does not stall every other request of the mount.

Commit
------
The commit is orchestrated by the control channel (fuse/control.py), not
here: vfs does not import ops.  Inside ``paused`` (the one lock, so no change
runs meanwhile) ``draft`` snapshots the edits as a Draft (model/draft.py):
untouched subtrees are their origin TreeEntries (not visited; a moved
untouched file or directory is re-linked by id without reading bytes), only
written or new files are NewFiles to chunk (a committed file written in place
is an EditedFile: only the windows around its ranges are re-chunked,
ops/rechunk.py).  The snapshot, the flush before it and the re-basing after it
visit what changed, not the tree: edits mark, as they happen, the names of
each directory that may differ from its origin and the nodes with metadata to
write (vfs/wstree.py, ``_mark``), so a commit after 100 edits in a 100k-node
tree looks at about 100 nodes (after a remount the marks are rebuilt from the
rows: the first commit looks at every row's node).  ops.changeset.commit_draft
stores it and moves the branch by compare-and-swap, rebasing onto a moved
branch with the change engine's three-way merge; ``set_pending`` is its
callback just before the compare-and-swap, recording the commit id in the
overlay.  Once the branch moved, ``settle`` clears the overlay and sets the
base in one transaction, and re-bases the in-memory tree onto the new commit
*keeping node objects*, so inode numbers the kernel (a shell's working
directory, an open file) holds stay valid.  See vfs/overlay.py for the crash
window between the two.

Caching: entries and attributes get timeout 0 and files are opened without
keep_cache, so the kernel never serves a stale name, size or page after a
write, a ``reset`` or a rebased commit (the simplest correct choice; the
adapter also invalidates the inodes a reset or commit changed).
"""

from __future__ import annotations

import logging
import os
import stat
import threading
import time
from collections.abc import Callable, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass

import trio

from commitfs.errors import (
    InputError,
    IsADirectoryError_,
    NotADirectoryError_,
    PathNotFoundError,
)
from commitfs.model.draft import Draft
from commitfs.model.objects import Commit, TreeEntry
from commitfs.repo.repository import Repository
from commitfs.vfs import prefetch
from commitfs.vfs.core import StatFs
from commitfs.vfs.loader import Loader
from commitfs.vfs.errors import (
    BadHandleError,
    ExistsError,
    InvalidArgumentError,
    NoSuchAttributeError,
    NotASymlinkError,
    NotEmptyError,
    NotPermittedError,
)
from commitfs.vfs.inode import XATTR_COMMIT, XATTR_REPO, Attr, InodeTable, NodeKind
from commitfs.vfs.overlay import ROOT_ID, Overlay, SpaceReleasedError
from commitfs.vfs.wscow import Cow

from commitfs.vfs.wscommit import CommitState, resolve_pending, root_row
from commitfs.vfs.wslink import LinkNames
from commitfs.vfs.wsmerge import MergeState
from commitfs.vfs.wsoverlay import OverlayStore
from commitfs.vfs.wstree import Kids, NodeTree, WLink, WNode, _DirHandle, _Handle, _now

log = logging.getLogger(__name__)

__all__ = ["WorkspaceFS", "WorkspaceOptions", "resolve_pending"]

XATTR_BRANCH = "user.commitfs.branch"
RENAME_NOREPLACE = 1
RENAME_EXCHANGE = 2


def _retry_when_space_released(fn):
    """A change that found the disk full after the overlay released its reserve runs
    once more (so unlinking files to make room works on a full disk).  Changes are
    safe to re-run: each writes its rows before it touches the in-memory tree."""
    async def wrapper(self, *args, **kwargs):
        try:
            return await fn(self, *args, **kwargs)
        except SpaceReleasedError:
            return await fn(self, *args, **kwargs)
    wrapper.__name__ = wrapper.__qualname__ = fn.__name__
    wrapper.__doc__ = fn.__doc__
    return wrapper


@dataclass
class WorkspaceOptions:
    io_timeout_s: float = 60.0
    #: None: vfs/loader.py's default_io_threads for the repository.
    io_threads: int | None = None
    #: Entry and attribute timeouts: 0, the kernel asks every time (see the module doc).
    timeout_s: float = 0.0


class WorkspaceFS(NodeTree, OverlayStore, LinkNames, CommitState, MergeState):
    """A writable workspace over ``branch``; the same request methods as vfs.FileSystem plus writes."""

    writable = True

    def __init__(self, repo: Repository, overlay: Overlay, branch: str,
                 options: WorkspaceOptions = WorkspaceOptions()):
        self.repo = repo
        self.overlay = overlay
        self.branch = branch
        self.options = options
        self.mount_time_ns = _now()
        self._t = options.timeout_s
        self.loader = Loader(repo, options.io_threads, options.io_timeout_s)
        self._lock = trio.Lock()
        #: The kernel's inode numbers and lookup counts (vfs/inode.py); an open handle
        #: keeps a node in it too.  Made with the root, by ``_load``.
        self.table: InodeTable | None = None
        self._files: dict[int, _Handle] = {}
        self._dirs: dict[int, _DirHandle] = {}
        self._next_fh = 1
        self._nursery: trio.Nursery | None = None
        self._repo_url = repo.url.encode()
        self.base: bytes = overlay.base
        self.base_time_ns = 0
        self.base_tree: bytes = b""
        self.root: WNode | None = None
        #: What changed since the last commit or reset (vfs/wstree.py, ``_mark``).
        self._marks: dict[WNode, set[str] | None] = {}
        self._unflushed: set[WNode] = set()

    # --- opening a workspace (synchronous, before the loop) ---------------------------------
    @classmethod
    def open_workspace(cls, repo: Repository, workspace_dir: str, branch: str,
             options: WorkspaceOptions = WorkspaceOptions(),
             unchanged: Callable[[Repository, bytes, Draft | None], bool] | None = None) -> WorkspaceFS:
        """Open (or create) the workspace, settle an interrupted commit, load the overlay.

        ``unchanged(repo, base_tree, draft)`` tells whether edits change nothing
        (the change engine's answer, passed in by the composition root,
        fuse/control.open_workspace); without it rows always count as edits."""
        overlay = Overlay.open(workspace_dir, repo.url, branch)
        try:
            head = repo.refs.lookup_branch(branch)
            if head is None:
                raise InputError(f"branch {branch!r} does not exist (a writable mount needs an existing branch)")
            resolve_pending(repo, overlay, head)
            base = overlay.base
            if base is None or (base != head and overlay.is_clean()):
                # A new workspace, or one without edits: start from the branch head.
                overlay.clear(head, cls._root_row(repo, head))
            fs = cls(repo, overlay, branch, options)
            fs._load()
            if fs.base != head and unchanged is not None and not fs._has_edits(unchanged):
                # Edits made and then undone (reset PATH, a file created and removed)
                # leave rows but change nothing: the workspace is clean, so it too
                # starts from the branch's current head.
                overlay.clear(head, cls._root_row(repo, head))
                fs = cls(repo, overlay, branch, options)
                fs._load()
            return fs
        except BaseException:
            overlay.close()
            raise

    def _has_edits(self, unchanged: Callable[[Repository, bytes, Draft | None], bool]) -> bool:
        """Whether the loaded overlay differs from its base (synchronous, before the loop)."""
        return not unchanged(self.repo, self.repo.load_commit(self.base).tree, self.draft())

    _root_row = staticmethod(root_row)

    def _load(self) -> None:
        """Build the in-memory tree from the overlay's rows."""
        commit = self.repo.load_commit(self.base)
        self.base_time_ns = commit.time * 1_000_000_000
        self.base_tree = commit.tree
        rows = self.overlay.rows()
        ranges = self.overlay.load_ranges()
        by_id: dict[int, WNode] = {}
        for r in rows:
            n = WNode(0, r.kind, r.name, None)
            n.oid, n.origin, n.upper, n.mode, n.target = r.id, r.origin, r.upper, r.mode, r.target or b""
            # 0 in the root row a clear writes (no ctime) means "the base commit's time";
            # any other 0 is a real mtime (utimensat to the epoch, which sets the ctime too).
            n.mtime_ns = r.mtime_ns if r.mtime_ns or r.id != ROOT_ID or r.ctime_ns is not None \
                else self.base_time_ns
            n.uid, n.gid, n.atime_ns, n.ctime_ns = r.uid, r.gid, r.atime_ns, r.ctime_ns
            n.rdev = r.rdev or 0
            if r.materialized:
                n.children = Kids()
            if r.kind is NodeKind.FILE:
                if r.upper is not None:
                    try:
                        n.size = os.stat(self.overlay.data_path(r.upper)).st_size
                    except FileNotFoundError:  # cannot happen (rows are written after files); be safe
                        log.error("workspace data file %s is missing; the file shows empty", r.upper)
                        n.size = 0
                        n.fd = self.overlay.create_data(r.upper)
                        os.close(n.fd)
                        n.fd = None
                    if r.cow_base is not None and n.size:
                        # A truncate the daemon was killed in may have reached the data
                        # file and not the row: the data file's size is the file's.
                        n.cow = Cow(r.cow_base, min(r.cow_until or 0, n.size), ranges.get(r.id, ()))
                else:
                    n.size = r.origin.size if r.origin else 0
            elif r.kind is NodeKind.SYMLINK:
                n.size = len(n.target)
            by_id[r.id] = n
        root = by_id.get(ROOT_ID)
        assert root is not None, "the overlay has no root row"
        for r in rows:
            if r.parent is None:
                continue
            parent = by_id.get(r.parent)
            n = by_id[r.id]
            if parent is None or parent.children is None:
                log.error("workspace row %d (%s) has no materialized parent; ignored", r.id, r.name)
                continue
            n.parent = parent
            parent.children[r.name] = n
        for link in self.overlay.links():  # the extra names of hard-linked nodes
            parent, n = by_id.get(link.parent), by_id.get(link.node)
            if (parent is None or parent.children is None or n is None or n.parent is None or n.is_dir
                    or link.name in parent.children):
                log.error("workspace link %d (%s) names no node or a taken name; ignored", link.id, link.name)
                continue
            n.links = (n.links or []) + [WLink(link.id, parent, link.name)]
            parent.children[link.name] = n
        # Inode numbers: the root's is 1; each node is numbered in the table, which it
        # enters when the kernel meets it.
        self.table = InodeTable(root, held=lambda n: n.opens > 0)
        for n in by_id.values():
            if n is not root:
                n.ino = self.table.new_number()
        root.parent = None
        self.root = root
        # What changed, rebuilt from the rows: any entry of a materialized directory
        # may differ from its origin (the rows do not say which), so the first commit
        # after a remount looks at every one; later ones follow the edits again.
        self._marks = {n: None for n in by_id.values() if n.children is not None}
        self._unflushed = {n for n in by_id.values() if n.dirty or (n.cow is not None and n.cow.dirty)}
        removed = self.overlay.collect_garbage()
        if removed:
            log.info("workspace: removed %d unreferenced data files", removed)

    @asynccontextmanager
    async def running(self):
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            self.overlay.loop_thread = threading.get_ident()  # its transactions never wait (Overlay.batch)
            try:
                yield self
            finally:
                nursery.cancel_scope.cancel()
                self.shutdown()

    def shutdown(self) -> None:
        """Write what is not yet written (mtimes), close files and the overlay."""
        try:
            self._flush_all()
        except Exception:
            log.exception("workspace: cannot write pending metadata")
        for h in self._files.values():
            if h.reader:
                h.reader.close()
        for n in self.table.nodes():
            self._close_fd(n)
        self.overlay.close()

    # --- requests: names and attributes ---------------------------------------------------------
    async def lookup(self, parent_inode: int, name: bytes) -> Attr:
        d = self._dir(parent_inode)
        if name == b".":
            n = d
        elif name == b"..":
            n = d.parent or self.root
        else:
            text = self._name(name)
            n = await self._child(d, text)
            if n is None:
                raise PathNotFoundError(f"{text}: no such entry")
        if n.kind is NodeKind.DIR and n.children is None:
            await self._count_subdirs(n)
        return self._remember(n)

    def forget(self, inode_list: Sequence[tuple[int, int]]) -> None:
        for ino, nlookup in inode_list:
            n = self.table.forget(ino, nlookup)
            if n is None:  # still held (or unknown)
                continue
            if n.parent is None:  # out of the tree: its bytes go with it
                self._close_fd(n)
            elif n.oid is None:  # lazy: out of its directory's cache too
                self._maybe_drop(n)

    async def getattr(self, inode: int) -> Attr:
        n = self._node(inode)
        if n.kind is NodeKind.DIR and n.children is None:
            await self._count_subdirs(n)
        return self.attr(n)

    @_retry_when_space_released
    async def setattr(self, inode: int, *, mode: int | None = None, size: int | None = None,
                      mtime_ns: int | None = None, uid: int | None = None, gid: int | None = None,
                      fh: int | None = None, atime_ns: int | None = None, ctime_ns: int | None = None) -> Attr:
        """chmod, chown, truncate, utimensat.  Who may change the owner is checked by the
        kernel (the mount uses default_permissions); every change moves the ctime, one
        that changes nothing too (chown(-1, -1): the kernel asks with no field set), as
        on ext4; to ``ctime_ns`` when the kernel gives its own (FATTR_CTIME)."""
        n = self._node(inode)
        status_only = size is None and mode is None and mtime_ns is None and atime_ns is None \
            and uid is None and gid is None
        async with self._lock:
            if size is not None:
                if n.is_dir:
                    raise IsADirectoryError_(f"{n.name} is a directory")
                if n.kind is not NodeKind.FILE:
                    raise InvalidArgumentError(f"{n.name} is not a regular file")
                fd = await self._ensure_upper(n, empty=size == 0)
                self._truncate(n, fd, size)
            if mode is not None or mtime_ns is not None or atime_ns is not None or uid is not None \
                    or gid is not None or status_only:
                if n.parent is not None:
                    await self._persist(n)
                fields = {"ctime_ns": ctime_ns if ctime_ns is not None else _now()}
                if mode is not None and n.kind is not NodeKind.SYMLINK:
                    fields["mode"] = stat.S_IMODE(mode) & 0o7777
                    if n.kind is NodeKind.SPECIAL:
                        fields["mode"] |= stat.S_IFMT(n.mode)  # keep its type
                if mtime_ns is not None:
                    fields["mtime_ns"] = mtime_ns
                if atime_ns is not None:
                    fields["atime_ns"] = atime_ns
                if uid is not None:
                    fields["uid"] = uid
                if gid is not None:
                    fields["gid"] = gid
                if n.oid is not None:
                    if mtime_ns is None:
                        fields["mtime_ns"] = n.mtime_ns  # a pending write's mtime
                    self.overlay.update(n.oid, **fields)
                for k, v in fields.items():
                    setattr(n, k, v)
                n.dirty = False if n.oid is not None else n.dirty
                if "mode" in fields:
                    self._mark_node(n)  # the executable bit is committed
            elif size is not None:
                n.ctime_ns = n.mtime_ns
            if n.kind is NodeKind.DIR and n.children is None:
                await self._count_subdirs(n)
            return self.attr(n)

    async def readlink(self, inode: int) -> bytes:
        n = self._node(inode)
        if n.kind is not NodeKind.SYMLINK:
            raise NotASymlinkError(f"inode {inode} is not a symbolic link")
        return n.target

    def _xattrs(self, n: WNode) -> dict[bytes, bytes]:
        if n.kind is not NodeKind.DIR and n.kind is not NodeKind.FILE:
            # The kernel refuses user.* attributes on symlinks and special files, so
            # listing one there would name an attribute getxattr cannot return.
            return {}
        out = {XATTR_REPO.encode(): self._repo_url}
        if n is self.root:
            out[XATTR_COMMIT.encode()] = self.base.hex().encode()
            out[XATTR_BRANCH.encode()] = self.branch.encode()
        return out

    async def getxattr(self, inode: int, name: bytes) -> bytes:
        value = self._xattrs(self._node(inode)).get(name)
        if value is None:
            raise NoSuchAttributeError(f"no extended attribute {name!r}")
        return value

    async def listxattr(self, inode: int) -> list[bytes]:
        return sorted(self._xattrs(self._node(inode)))

    async def statfs(self) -> StatFs:
        st = os.statvfs(self.overlay.path)
        return StatFs(st.f_frsize, st.f_blocks, len(self.table), free_blocks=st.f_bavail, free_files=st.f_favail)

    # --- requests: changing names ------------------------------------------------------------
    async def _create_node(self, parent_inode: int, name: bytes, kind: NodeKind, mode: int,
                           owner: tuple[int, int] | None = None) -> WNode:
        text = self._new_name(name)
        d = await self._prepare_parent(parent_inode)
        if text in d.children:
            raise ExistsError(f"{text} exists")
        n = self._new(kind, text, d)
        n.mode = stat.S_IMODE(mode) & 0o7777 if kind is not NodeKind.SYMLINK else 0o777
        n.mtime_ns = n.atime_ns = n.ctime_ns = _now()
        if owner is not None:
            n.uid, n.gid = owner  # the creator (another user through --allow-other)
        if d.mode & stat.S_ISGID:
            # A setgid directory gives its group to what is made in it, and its setgid
            # bit to new directories, as on ext4.
            n.gid = d.gid if d.gid is not None else os.getgid()
            if kind is NodeKind.DIR:
                n.mode |= stat.S_ISGID
        if kind is NodeKind.DIR:
            n.children = Kids()
        return n

    @_retry_when_space_released
    async def mkdir(self, parent_inode: int, name: bytes, mode: int, owner: tuple[int, int] | None = None) -> Attr:
        async with self._lock:
            d = self._dir(parent_inode)
            n = await self._create_node(parent_inode, name, NodeKind.DIR, mode, owner)
            self._add_child(d, n)
            return self._remember(n)

    @_retry_when_space_released
    async def symlink(self, parent_inode: int, name: bytes, target: bytes,
                      owner: tuple[int, int] | None = None) -> Attr:
        async with self._lock:
            d = self._dir(parent_inode)
            n = await self._create_node(parent_inode, name, NodeKind.SYMLINK, 0o777, owner)
            n.target = target
            n.size = len(target)
            self._add_child(d, n)
            return self._remember(n)

    @_retry_when_space_released
    async def create(self, parent_inode: int, name: bytes, mode: int, flags: int,
                     owner: tuple[int, int] | None = None) -> tuple[int, Attr]:
        async with self._lock:
            d = self._dir(parent_inode)
            n = await self._create_node(parent_inode, name, NodeKind.FILE, mode, owner)
            n.oid = self.overlay.new_id()
            n.upper = str(n.oid)
            fd = self.overlay.create_data(n.upper)  # before the row: a crash leaves only an orphan file
            try:
                self.overlay.insert([n.row()])
            except BaseException:
                os.close(fd)
                self.overlay.remove_data(n.upper)
                raise
            n.fd = fd
            d.children[n.name] = n
            self._touch(d, n.name)
            attr = self._remember(n)
            return self._open_handle(n), attr

    async def mknod(self, parent_inode: int, name: bytes, mode: int, rdev: int,
                    owner: tuple[int, int] | None = None) -> Attr:
        """mknod: a regular file (as create, not opened), or a FIFO, socket or device
        node, which the workspace keeps and a commit skips (docs/SEMANTICS.md)."""
        if stat.S_ISREG(mode) or stat.S_IFMT(mode) == 0:
            fh, attr = await self.create(parent_inode, name, mode, os.O_WRONLY, owner)
            await self.release(fh)
            return attr
        if not (stat.S_ISFIFO(mode) or stat.S_ISSOCK(mode) or stat.S_ISCHR(mode) or stat.S_ISBLK(mode)):
            raise InvalidArgumentError(f"mknod: unknown file type {stat.S_IFMT(mode):o}")
        return await self._mknod_special(parent_inode, name, mode, rdev, owner)

    @_retry_when_space_released
    async def _mknod_special(self, parent_inode: int, name: bytes, mode: int, rdev: int,
                             owner: tuple[int, int] | None) -> Attr:
        async with self._lock:
            d = self._dir(parent_inode)
            n = await self._create_node(parent_inode, name, NodeKind.SPECIAL, mode, owner)
            n.mode = stat.S_IFMT(mode) | (stat.S_IMODE(mode) & 0o7777)
            n.rdev = rdev if stat.S_ISCHR(mode) or stat.S_ISBLK(mode) else 0
            self._add_child(d, n)
            return self._remember(n)

    @_retry_when_space_released
    async def link(self, inode: int, new_parent_inode: int, new_name: bytes) -> Attr:
        """A hard link: one more name of a file, symlink or special file (vfs/wslink.py)."""
        async with self._lock:
            n = self._node(inode)
            if n.is_dir:
                raise NotPermittedError(f"{n.name} is a directory (directories cannot be hard-linked)")
            text = self._new_name(new_name)
            d = await self._prepare_parent(new_parent_inode)
            if n.parent is None:
                raise PathNotFoundError(f"{n.name}: it was deleted")
            if text in d.children:
                raise ExistsError(f"{text} exists")
            await self._persist(n)
            self._add_link(n, d, text)
            return self._remember(n)

    @_retry_when_space_released
    async def unlink(self, parent_inode: int, name: bytes) -> None:
        async with self._lock:
            text = self._name(name)
            d = self._dir(parent_inode)
            n = await self._child(d, text)
            if n is None:
                raise PathNotFoundError(f"{text}: no such entry")
            if n.is_dir:
                raise IsADirectoryError_(f"{text} is a directory")
            await self._materialize(d)
            if d.children.get(text) is None:
                raise PathNotFoundError(f"{text}: no such entry")
            self._unlink_node(d, text)

    @_retry_when_space_released
    async def rmdir(self, parent_inode: int, name: bytes) -> None:
        async with self._lock:
            text = self._name(name)
            d = self._dir(parent_inode)
            n = await self._child(d, text)
            if n is None:
                raise PathNotFoundError(f"{text}: no such entry")
            if not n.is_dir:
                raise NotADirectoryError_(f"{text} is not a directory")
            if not await self._is_empty(n):
                raise NotEmptyError(f"{text} is not empty")
            await self._materialize(d)
            if d.children.get(text) is None:
                raise PathNotFoundError(f"{text}: no such entry")
            self._unlink_node(d, text)

    @_retry_when_space_released
    async def rename(self, parent_inode_old: int, name_old: bytes, parent_inode_new: int, name_new: bytes,
                     flags: int = 0) -> None:
        if flags & RENAME_EXCHANGE:
            return await self._exchange(parent_inode_old, name_old, parent_inode_new, name_new)
        async with self._lock:
            old, new = self._name(name_old), self._new_name(name_new)
            src, dst = self._dir(parent_inode_old), self._dir(parent_inode_new)
            n = await self._child(src, old)
            if n is None:
                raise PathNotFoundError(f"{old}: no such entry")
            target = await self._child(dst, new)
            if target is n:
                return
            if target is not None:
                if flags & RENAME_NOREPLACE:
                    raise ExistsError(f"{new} exists")
                if n.is_dir and not target.is_dir:
                    raise NotADirectoryError_(f"{new} is not a directory")
                if not n.is_dir and target.is_dir:
                    raise IsADirectoryError_(f"{new} is a directory")
                if target.is_dir and not await self._is_empty(target):
                    raise NotEmptyError(f"{new} is not empty")
            if n.is_dir:
                self._check_not_below(dst, n)
            await self._materialize(src)
            await self._materialize(dst)
            n = src.children.get(old)
            target = dst.children.get(new)
            if n is None:
                raise PathNotFoundError(f"{old}: no such entry")
            if target is n:  # two names of one node (a hard link): nothing to do, as on ext4
                return
            ids: list[int] = []
            data: list[str] = []
            drop_target = None
            with self.overlay.batch():
                if target is not None and target.links:
                    drop_target = self._drop_name_rows(dst, new, target)  # one of its names goes
                elif target is not None:
                    self._remove_subtree_rows(target, ids, data)
                    self.overlay.delete(ids)
                move = self._move_name_rows(n, src, old, dst, new)
            if drop_target is not None:
                drop_target()
            elif target is not None:
                del dst.children[new]
                self._detach(target)
                for name in data:
                    self.overlay.remove_data(name)
            del src.children[old]
            move()
            n.ctime_ns = _now()  # a rename changes the moved node's status, as on ext4
            self._dirtied(n)
            dst.children[new] = n
            self._touch(src, old)
            self._touch(dst, new)

    @staticmethod
    def _check_not_below(d: WNode, n: WNode) -> None:
        p = d
        while p is not None:
            if p is n:
                raise InvalidArgumentError("cannot move a directory into itself")
            p = p.parent

    async def _exchange(self, parent_inode_old: int, name_old: bytes, parent_inode_new: int,
                        name_new: bytes) -> None:
        """rename(RENAME_EXCHANGE): the two names swap nodes, atomically."""
        async with self._lock:
            old, new = self._name(name_old), self._name(name_new)
            src, dst = self._dir(parent_inode_old), self._dir(parent_inode_new)
            n, m = await self._child(src, old), await self._child(dst, new)
            if n is None or m is None:
                raise PathNotFoundError(f"{old if n is None else new}: no such entry")
            if n is m:
                return
            if n.is_dir:
                self._check_not_below(dst, n)
            if m.is_dir:
                self._check_not_below(src, m)
            await self._materialize(src)
            await self._materialize(dst)
            n, m = src.children.get(old), dst.children.get(new)
            if n is None or m is None:
                raise PathNotFoundError(f"{old if n is None else new}: no such entry")
            # Names are unique per directory in the overlay: n goes through a name no
            # directory can hold (a slash) while m takes its place.
            with self.overlay.batch():
                self._move_name_rows(n, src, old, dst, "/exchange")
                move_m = self._move_name_rows(m, dst, new, src, old)
                move_n = self._move_name_rows(n, src, old, dst, new)
            move_m()
            move_n()
            src.children[old], dst.children[new] = m, n
            n.ctime_ns = m.ctime_ns = _now()
            self._dirtied(n)
            self._dirtied(m)
            self._touch(src, old)
            self._touch(dst, new)

    # --- requests: directories ---------------------------------------------------------------
    async def opendir(self, inode: int) -> int:
        d = self._dir(inode)
        items = await self._listing(d)
        fh = self._new_fh()
        self._dirs[fh] = _DirHandle(d, items)
        return fh

    async def readdir(self, fh: int, start_id: int, reply: Callable[[bytes, Attr, int], bool]) -> None:
        h = self._dirs.get(fh)
        if h is None:
            raise BadHandleError(f"directory handle {fh} is not open")
        d = h.node
        for i in range(start_id, len(h.items)):
            name, item = h.items[i]
            if isinstance(item, TreeEntry):
                if d.children is not None:
                    n = d.children.get(name)
                    if n is None:
                        continue
                else:
                    n = d.lazy.get(name)
                    if n is None:
                        n = d.lazy[name] = self._from_entry(d, item)
            else:
                n = item
            fresh = n.ino not in self.table
            if not reply(name.encode(), self.attr(n), i + 1):
                if fresh and n.oid is None and n.parent is not None:
                    self._maybe_drop(n)
                return
            self._remember(n)

    async def releasedir(self, fh: int) -> None:
        self._dirs.pop(fh, None)

    async def fsyncdir(self, fh: int, datasync: bool) -> None:
        async with self._lock:
            await self._flush_pending()
            await self._sync()

    # --- requests: files ----------------------------------------------------------------------
    def _open_handle(self, n: WNode) -> int:
        n.opens += 1
        self.table.remember(n, 0)  # held while open (the kernel holds a lookup too)
        fh = self._new_fh()
        self._files[fh] = _Handle(n)
        return fh

    async def open(self, inode: int, flags: int) -> int:
        n = self._node(inode)
        if n.is_dir:
            raise IsADirectoryError_(f"inode {inode} is a directory")
        if n.kind is not NodeKind.FILE:
            raise InvalidArgumentError(f"inode {inode} is not a regular file")
        if flags & os.O_TRUNC:  # whatever the access mode, as Linux does (the kernel checked write permission)
            async with self._lock:
                fd = await self._ensure_upper(n, empty=True)
                self._truncate(n, fd, 0)
                n.ctime_ns = n.mtime_ns
        return self._open_handle(n)

    def writes_direct(self, fh: int, flags: int) -> bool:
        """Whether the kernel should open ``fh`` direct (FOPEN_DIRECT_IO): a write-only
        open of a file without set-id bits.  Its writes then skip the kernel's page
        cache of the mount (the bytes are kept once, in the overlay's data file, not
        twice) and the kernel asks no ``security.capability`` before each write; a
        write-only descriptor can neither read nor be mmapped, so nothing is lost, and
        the kernel drops the written range from the cache other descriptors read.  A
        set-id file keeps the cached path: on a direct write the kernel leaves
        clearing the set-id bits to the server (FUSE_WRITE_KILL_SUIDGID), which
        pyfuse3 does not pass on."""
        n = self._handle(fh).node
        return (flags & os.O_ACCMODE) == os.O_WRONLY and not n.mode & (stat.S_ISUID | stat.S_ISGID)

    def _handle(self, fh: int) -> _Handle:
        h = self._files.get(fh)
        if h is None:
            raise BadHandleError(f"file handle {fh} is not open")
        return h

    async def _reader(self, h: _Handle, fid: bytes) -> prefetch.Prefetcher:
        """The handle's prefetcher over committed file ``fid`` (the read-only mount's
        read engine: verified chunks, a growing read window)."""
        if h.reader is None or h.reader_id != fid:
            manifest = await self.loader.manifest(fid)
            if h.reader is None or h.reader_id != fid:
                if h.reader is not None:
                    h.reader.close()
                assert self._nursery is not None
                h.reader = prefetch.Prefetcher(manifest, self.loader.chunks, self._nursery,
                                               fetch_now=self.loader.chunks_now)
                h.reader_id = fid
        return h.reader

    async def read(self, fh: int, off: int, size: int) -> bytes:
        h = self._handle(fh)
        n = h.node
        while True:
            if n.fd is not None or n.upper is not None:
                cow = n.cow
                if cow is None:
                    return os.pread(self._fd(n), size, off)
                got = await self._read_cow(h, n, cow, off, size)
                if got is not None:
                    return got
                continue  # truncated, committed or reset meanwhile: read again
            origin = n.origin
            if origin is None or origin.size == 0:
                return b""
            reader = await self._reader(h, origin.id)
            if n.fd is not None or n.upper is not None:  # written meanwhile
                continue
            return await reader.read(off, size)

    async def _read_cow(self, h: _Handle, n: WNode, cow: Cow, off: int, size: int) -> bytes | None:
        """Bytes of a copy-on-write file: its written ranges from the data file, the
        rest from the base; None if the file changed shape while the base was read."""
        end = min(off + size, n.size)
        if off >= end:
            return b""
        until = cow.until
        segments = cow.segments(off, end)
        if len(segments) == 1 and segments[0][2]:
            return os.pread(self._fd(n), end - off, off)
        base: dict[int, bytes] = {}
        for a, b, mine in segments:
            if not mine:
                reader = await self._reader(h, cow.base)
                base[a] = await reader.read(a, b - a)
        if n.cow is not cow or cow.until != until or (n.fd is None and n.upper is None):
            return None
        fd = self._fd(n)
        # The data file last (no await after): a range written meanwhile is read whole.
        parts = []
        for a, b, mine in segments:
            if not mine:
                parts.append(base[a])
            else:
                parts.append(os.pread(fd, b - a, a))
        return b"".join(parts)

    async def write(self, fh: int, off: int, buf: bytes) -> int:
        h = self._handle(fh)
        n = h.node
        async with self._lock:
            fd = await self._ensure_upper(n)
            written = os.pwrite(fd, buf, off)
            self._wrote(n, off, written)
            return written

    def _wrote(self, n: WNode, off: int, written: int) -> None:
        """What a write of ``written`` bytes at ``off`` into ``n``'s data file changes."""
        if n.cow is not None:
            n.cow.add(off, off + written)
        if off + written > n.size:
            n.size = off + written
        n.mtime_ns = n.ctime_ns = _now()
        self._dirtied(n)

    # The WRITE fast path (fuse/fastpath.py, engage_writes): the C module pwrites a WRITE's
    # bytes itself between two plain calls, no coroutine.  write_fd allows it only when
    # ``write`` would run to its end without an await (the lock free, the data file open),
    # so the two calls and the pwrite between them are that write, with nothing of the
    # file system in between (one thread).
    def write_fd(self, fh: int) -> int:
        """The descriptor a WRITE on ``fh`` may be pwritten to now, or -1 (it goes to ``write``)."""
        h = self._files.get(fh)
        if h is None or self._lock.locked():
            return -1
        n = h.node
        if n.fd is None or (n.upper is None and n.oid is not None):  # _ensure_upper would await
            return -1
        return n.fd

    def wrote(self, fh: int, off: int, written: int) -> None:
        """After the C module pwrote ``written`` bytes at ``off`` to ``write_fd(fh)``."""
        self._wrote(self._files[fh].node, off, written)

    async def flush(self, fh: int) -> None:
        n = self._handle(fh).node
        if n.dirty or (n.cow is not None and n.cow.dirty):
            async with self._lock:
                await self._flush_file(n)

    async def fsync(self, fh: int, datasync: bool) -> None:
        n = self._handle(fh).node
        async with self._lock:
            if n.cow is not None and n.cow.dirty and n.fd is not None:
                # The written bytes first, then the ranges naming them (so no range
                # is durable before its bytes), then the database.
                await self.loader.io("fsync of a workspace file", os.fsync, n.fd)
            await self._flush_file(n)
            await self._sync(n.fd)

    async def release(self, fh: int) -> None:
        h = self._files.pop(fh, None)
        if h is None:
            return
        if h.reader is not None:
            h.reader.close()
        n = h.node
        n.opens -= 1
        try:
            if n.dirty or (n.cow is not None and n.cow.dirty):
                async with self._lock:
                    await self._flush_file(n)
        finally:
            if n.opens <= 0:
                self._close_fd(n)
                if n.parent is None:
                    self._maybe_forget(n)

    def _new_fh(self) -> int:
        fh = self._next_fh
        self._next_fh += 1
        return fh

