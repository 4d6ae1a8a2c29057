"""A writable view of a branch: the base commit's tree plus a persistent overlay.

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
copies it up (``overlay.copy_up``, whole file for now).  Nodes with rows stay
in memory for the mount's life; lazy ones leave when the kernel forgets them.

Concurrency
-----------
Reads run concurrently.  Changes (including writes, which are local pwrites)
run one at a time under one lock, and each writes its overlay rows before it
changes the in-memory tree: so a change is atomic with respect to other
changes, to a crash (one SQLite transaction), and to ``commit``, which holds
the same lock while it snapshots the overlay.  Local reads and writes of
overlay files are done inline, not in worker threads: they hit the page
cache, and a thread hop per 128 KiB request would halve write throughput.
Repository reads (trees, manifests, chunks, copy-up) run in worker threads,
as in the read-only core.

Commit
------
The commit is orchestrated by the control channel (fuse/control.py), not
here: vfs does not import ops.  Inside ``paused`` (the one lock, so no change
runs meanwhile) ``draft`` snapshots the edits as a Draft (model/draft.py):
untouched subtrees are their origin TreeEntries (not visited; a moved
untouched file or directory is re-linked by id without reading bytes), only
copied-up or new files are NewFiles to chunk.  ops.changeset.commit_draft
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
from commitfs.model.draft import Draft, NewFile
from commitfs.model.objects import EMPTY_MANIFEST, Commit, Kind, Tree, TreeEntry, symlink_entry
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
    UnsupportedError,
)
from commitfs.vfs.inode import PREFERRED_IO_SIZE, ROOT_INODE, XATTR_COMMIT, XATTR_REPO, Attr
from commitfs.vfs.overlay import ROOT_ID, Overlay, Row, SpaceReleasedError, copy_up

log = logging.getLogger(__name__)

XATTR_BRANCH = "user.commitfs.branch"
RENAME_NOREPLACE = 1
RENAME_EXCHANGE = 2
#: How far back from the branch head ``resolve_pending`` looks for an interrupted commit.
_PENDING_SEARCH = 100_000


def _now() -> int:
    return time.time_ns()


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


class WNode:
    __slots__ = ("ino", "oid", "parent", "name", "kind", "origin", "children", "lazy", "upper", "size", "mode",
                 "mtime_ns", "target", "lookups", "opens", "fd", "dirty", "copying")

    def __init__(self, ino: int, kind: str, name: str, parent: WNode | None):
        self.ino = ino
        self.oid: int | None = None  # overlay row id
        self.parent = parent
        self.name = name
        self.kind = kind  # "dir" | "file" | "symlink"
        self.origin: TreeEntry | None = None
        self.children: dict[str, WNode] | None = None  # materialized listing
        self.lazy: dict[str, WNode] = {}  # nodes looked up in a lazy directory
        self.upper: str | None = None  # data file name
        self.size = 0
        self.mode = 0o644
        self.mtime_ns = 0
        self.target = b""
        self.lookups = 0
        self.opens = 0
        self.fd: int | None = None
        self.dirty = False  # mtime not yet written to the overlay
        self.copying: trio.Event | None = None

    @property
    def is_dir(self) -> bool:
        return self.kind == "dir"

    def path(self) -> str:
        parts = []
        n = self
        while n.parent is not None:
            parts.append(n.name)
            n = n.parent
        return "/".join(reversed(parts))

    def row(self) -> Row:
        return Row(self.oid, self.parent.oid if self.parent else None, self.name, self.kind, self.origin,
                   self.children is not None, self.upper, self.mode, self.mtime_ns,
                   self.target if self.kind == "symlink" else None)


def _kind_of(e: TreeEntry) -> str:
    return "dir" if e.kind is Kind.DIR else "symlink" if e.kind is Kind.SYMLINK else "file"


def _mode_of(e: TreeEntry) -> int:
    if e.kind is Kind.DIR or e.kind is Kind.EXEC:
        return 0o755
    return 0o777 if e.kind is Kind.SYMLINK else 0o644


class _Handle:
    __slots__ = ("node", "reader", "reader_id")

    def __init__(self, node: WNode):
        self.node = node
        self.reader: prefetch.Prefetcher | None = None
        self.reader_id: bytes | None = None


class _DirHandle:
    __slots__ = ("node", "items")

    def __init__(self, node: WNode, items: list):
        self.node = node
        self.items = items  # (name, node or TreeEntry)


@dataclass
class WorkspaceOptions:
    io_timeout_s: float = 60.0
    #: None: vfs/loader.py's default_io_threads for the repository.
    io_threads: int | None = None
    #: Entry and attribute timeouts: 0, the kernel asks every time (see the module doc).
    timeout_s: float = 0.0


# --- the snapshot of an overlay ----------------------------------------------------------
def _draft(node: WNode, data_path: Callable[[str], str]) -> Draft | None:
    """The edited tree as the change engine sees it (taken under the lock): a Draft per
    materialized directory, the origin TreeEntry of everything untouched (never opened),
    a NewFile per copied-up or new file; None for a lazy (untouched) root."""
    if node.children is None:
        return None
    out: dict = {}
    for name, c in node.children.items():
        if c.kind == "dir":
            out[name] = _draft(c, data_path) if c.children is not None else c.origin
        elif c.kind == "symlink":
            out[name] = symlink_entry(name, c.target)
        elif c.upper is not None:
            out[name] = NewFile(source=data_path(c.upper), executable=bool(c.mode & 0o100), size=c.size)
        else:
            # Unchanged bytes: the origin entry itself when the executable bit
            # is unchanged too (the common case; no new object per file).
            o = c.origin
            kind = Kind.EXEC if c.mode & 0o100 else Kind.FILE
            out[name] = o if o.kind is kind else TreeEntry(name, kind, o.size, o.id)
    return Draft(out)


class WorkspaceFS:
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
        self._next_ino = ROOT_INODE
        self._inodes: dict[int, WNode] = {}
        self._files: dict[int, _Handle] = {}
        self._dirs: dict[int, _DirHandle] = {}
        self._next_fh = 1
        self._nursery: trio.Nursery | None = None
        self._repo_url = repo.url.encode()
        self.base: bytes = overlay.base
        self.base_time_ns = 0
        self.base_tree: bytes = b""
        self.root: WNode | None = None

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

    @staticmethod
    def _root_row(repo: Repository, cid: bytes) -> Row:
        tree = repo.load_commit(cid).tree
        return Row(ROOT_ID, None, "", "dir", TreeEntry("", Kind.DIR, 0, tree), False, None, 0o755, 0, None)

    def _new(self, kind: str, name: str, parent: WNode | None) -> WNode:
        node = WNode(self._next_ino, kind, name, parent)
        self._next_ino += 1
        return node

    def _from_entry(self, parent: WNode, e: TreeEntry) -> WNode:
        n = self._new(_kind_of(e), e.name, parent)
        n.origin = e
        n.size = e.size
        n.mode = _mode_of(e)
        n.mtime_ns = self.base_time_ns
        n.target = e.target
        return n

    def _load(self) -> None:
        """Build the in-memory tree from the overlay's rows."""
        commit = self.repo.load_commit(self.base)
        self.base_time_ns = commit.time * 1_000_000_000
        self.base_tree = commit.tree
        rows = self.overlay.rows()
        by_id: dict[int, WNode] = {}
        for r in rows:
            n = WNode(0, r.kind, r.name, None)
            n.oid, n.origin, n.upper, n.mode, n.target = r.id, r.origin, r.upper, r.mode, r.target or b""
            n.mtime_ns = r.mtime_ns or self.base_time_ns
            if r.materialized:
                n.children = {}
            if r.kind == "file":
                if r.upper is not None:
                    try:
                        n.size = os.stat(self.overlay.data_path(r.upper)).st_size
                    except FileNotFoundError:  # cannot happen (rows are written after files); be safe
                        log.error("workspace data file %s is missing; the file shows empty", r.upper)
                        n.size = 0
                        n.fd = self.overlay.create_data(r.upper)
                        os.close(n.fd)
                        n.fd = None
                else:
                    n.size = r.origin.size if r.origin else 0
            elif r.kind == "symlink":
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
        # Inode numbers: root is 1, the others are handed out as the kernel meets them.
        for n in by_id.values():
            if n is root:
                n.ino = ROOT_INODE
                self._next_ino = ROOT_INODE + 1
        for n in by_id.values():
            if n is not root:
                n.ino = self._next_ino
                self._next_ino += 1
        root.parent = None
        self.root = root
        self._inodes[ROOT_INODE] = root
        removed = self.overlay.collect_garbage()
        if removed:
            log.info("workspace: removed %d unreferenced data files", removed)

    @asynccontextmanager
    async def running(self):
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
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
        for n in list(self._inodes.values()):
            self._close_fd(n)
        self.overlay.close()

    # --- nodes ---------------------------------------------------------------------------
    def _node(self, ino: int) -> WNode:
        n = self._inodes.get(ino)
        if n is None:
            from commitfs.vfs.errors import StaleInodeError

            raise StaleInodeError(f"inode {ino} is not known")
        return n

    def _dir(self, ino: int) -> WNode:
        n = self._node(ino)
        if not n.is_dir:
            raise NotADirectoryError_(f"inode {ino} is not a directory")
        return n

    def attr(self, n: WNode) -> Attr:
        if n.kind == "dir":
            mode, size = stat.S_IFDIR | n.mode, 0
        elif n.kind == "symlink":
            mode, size = stat.S_IFLNK | 0o777, len(n.target)
        else:
            mode, size = stat.S_IFREG | n.mode, n.size
        return Attr(n.ino, mode, size, n.mtime_ns, self._t, self._t, 1, PREFERRED_IO_SIZE)

    def _remember(self, n: WNode) -> Attr:
        n.lookups += 1
        self._inodes[n.ino] = n
        return self.attr(n)

    @staticmethod
    def _name(name: bytes) -> str:
        try:
            text = name.decode()
        except UnicodeDecodeError:
            raise PathNotFoundError(f"{name!r}: no such entry (names are UTF-8)") from None
        return text

    @staticmethod
    def _new_name(name: bytes) -> str:
        try:
            return name.decode()
        except UnicodeDecodeError:
            raise InvalidArgumentError(f"{name!r}: commitfs stores UTF-8 names only") from None

    async def _child(self, d: WNode, name: str) -> WNode | None:
        """The node named ``name`` in directory ``d``, or None."""
        if d.children is not None:
            return d.children.get(name)
        n = d.lazy.get(name)
        if n is not None:
            return n
        tree = await self.loader.tree(d.origin.id)
        if d.children is not None:  # materialized meanwhile
            return d.children.get(name)
        e = tree.get(name)
        if e is None:
            return None
        n = d.lazy.get(name)
        if n is None:
            n = d.lazy[name] = self._from_entry(d, e)
        return n

    async def _listing(self, d: WNode) -> list:
        if d.children is not None:
            return sorted(d.children.items(), key=lambda kv: kv[0].encode())
        tree = await self.loader.tree(d.origin.id)
        if d.children is not None:
            return sorted(d.children.items(), key=lambda kv: kv[0].encode())
        return [(e.name, e) for e in tree.entries]

    async def _is_empty(self, d: WNode) -> bool:
        if d.children is not None:
            return not d.children
        return not (await self.loader.tree(d.origin.id)).entries

    def _maybe_drop(self, n: WNode) -> None:
        """Forget a lazy node the kernel no longer knows (and lazy ancestors left unused)."""
        while (n is not None and n.ino != ROOT_INODE and n.lookups <= 0 and n.opens <= 0 and n.oid is None
               and not n.lazy and n.children is None):
            self._inodes.pop(n.ino, None)
            p = n.parent
            if p is None or p.lazy.get(n.name) is not n:
                return
            del p.lazy[n.name]
            n = p if p.ino not in self._inodes else None

    # --- making changes persistent ---------------------------------------------------------
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
        kids = {}
        for e in tree.entries:
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
        d.children = kids
        d.lazy = {}

    def _touch(self, d: WNode) -> None:
        d.mtime_ns = _now()
        d.dirty = True

    def _flush(self, n: WNode) -> None:
        if n.dirty and n.oid is not None:
            self.overlay.update(n.oid, mtime_ns=n.mtime_ns)
        n.dirty = False

    def _flush_all(self) -> None:
        def walk(n: WNode):
            self._flush(n)
            for c in (n.children or {}).values():
                walk(c)
        if self.root is not None:
            with self.overlay.batch():
                walk(self.root)

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
        """The writable file descriptor of ``n``, copying it up first if needed."""
        while n.copying is not None:
            await n.copying.wait()
        if n.fd is not None and (n.upper is not None or n.oid is None):
            return n.fd
        if n.upper is not None:
            return self._fd(n)
        detached = n.parent is None
        if not detached:
            await self._persist(n)
        if n.upper is not None or n.fd is not None:
            return self._fd(n) if n.fd is None else n.fd
        done = n.copying = trio.Event()
        try:
            name = str(n.oid) if not detached else None
            fd = self.overlay.create_data(name) if name else self.overlay.anonymous_file(str(n.ino))
            try:
                size = 0
                if not empty and n.origin is not None and n.origin.size:
                    manifest = await self.loader.manifest(n.origin.id)
                    size = await self.loader.io(f"copy-up of {n.path()}", copy_up, self.repo.load_chunks, manifest, fd)
                if name and n.oid is not None:
                    self.overlay.update(n.oid, upper=name)
                    n.upper = name
            except BaseException:
                os.close(fd)
                if name:
                    self.overlay.remove_data(name)
                raise
            n.fd = fd
            n.size = size
            return fd
        finally:
            n.copying = None
            done.set()

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
        for c in list((n.children or {}).values()):
            self._detach(c)
        n.parent = None
        n.oid = None
        n.upper = None
        n.dirty = False
        self._maybe_forget(n)

    def _maybe_forget(self, n: WNode) -> None:
        if n.lookups <= 0 and n.opens <= 0 and n.ino != ROOT_INODE:
            self._inodes.pop(n.ino, None)
            self._close_fd(n)

    def _unlink_node(self, d: WNode, n: WNode) -> None:
        """Remove ``n`` (persisted, in materialized ``d``) from the tree and the overlay."""
        ids: list[int] = []
        data: list[str] = []
        self._remove_subtree_rows(n, ids, data)
        self.overlay.delete(ids)
        del d.children[n.name]
        self._touch(d)
        self._detach(n)
        for name in data:
            self.overlay.remove_data(name)
        if data:
            self.overlay.make_reserve()

    async def _prepare_parent(self, parent_inode: int) -> WNode:
        d = self._dir(parent_inode)
        await self._materialize(d)
        return d

    # --- requests: names and attributes ---------------------------------------------------------
    async def lookup(self, parent_inode: int, name: bytes) -> Attr:
        d = self._dir(parent_inode)
        if name == b".":
            return self._remember(d)
        if name == b"..":
            return self._remember(d.parent or self.root)
        text = self._name(name)
        n = await self._child(d, text)
        if n is None:
            raise PathNotFoundError(f"{text}: no such entry")
        return self._remember(n)

    def forget(self, inode_list: Sequence[tuple[int, int]]) -> None:
        for ino, nlookup in inode_list:
            n = self._inodes.get(ino)
            if n is None or ino == ROOT_INODE:
                continue
            n.lookups -= nlookup
            if n.lookups <= 0 and n.opens <= 0:
                if n.parent is None:
                    self._maybe_forget(n)
                elif n.oid is None:
                    self._maybe_drop(n)
                else:
                    self._inodes.pop(ino, None)

    async def getattr(self, inode: int) -> Attr:
        return self.attr(self._node(inode))

    @_retry_when_space_released
    async def setattr(self, inode: int, *, mode: int | None = None, size: int | None = None,
                      mtime_ns: int | None = None, uid: int | None = None, gid: int | None = None,
                      fh: int | None = None) -> Attr:
        n = self._node(inode)
        if uid is not None and uid != os.getuid() or gid is not None and gid != os.getgid():
            raise NotPermittedError("a workspace does not record owners")
        async with self._lock:
            if size is not None:
                if n.is_dir:
                    raise IsADirectoryError_(f"{n.name} is a directory")
                if n.kind != "file":
                    raise InvalidArgumentError(f"{n.name} is not a regular file")
                fd = await self._ensure_upper(n, empty=size == 0)
                os.ftruncate(fd, size)
                n.size = size
                n.mtime_ns = _now()
                n.dirty = True
            if mode is not None or mtime_ns is not None:
                if n.parent is not None:
                    await self._persist(n)
                fields = {}
                if mode is not None and n.kind != "symlink":
                    fields["mode"] = stat.S_IMODE(mode) & 0o7777
                if mtime_ns is not None:
                    fields["mtime_ns"] = mtime_ns
                if n.oid is not None and fields:
                    self.overlay.update(n.oid, **fields)
                n.mode = fields.get("mode", n.mode)
                n.mtime_ns = fields.get("mtime_ns", n.mtime_ns)
                n.dirty = n.dirty and mtime_ns is None
            return self.attr(n)

    async def readlink(self, inode: int) -> bytes:
        n = self._node(inode)
        if n.kind != "symlink":
            raise NotASymlinkError(f"inode {inode} is not a symbolic link")
        return n.target

    def _xattrs(self, n: WNode) -> dict[bytes, bytes]:
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
        return StatFs(st.f_frsize, st.f_blocks, len(self._inodes), free_blocks=st.f_bavail, free_files=st.f_favail)

    # --- requests: changing names ------------------------------------------------------------
    def _add_child(self, d: WNode, n: WNode) -> None:
        n.oid = self.overlay.new_id()
        self.overlay.insert([n.row()])
        d.children[n.name] = n
        self._touch(d)

    async def _create_node(self, parent_inode: int, name: bytes, kind: str, mode: int) -> WNode:
        text = self._new_name(name)
        d = await self._prepare_parent(parent_inode)
        if text in d.children:
            raise ExistsError(f"{text} exists")
        n = self._new(kind, text, d)
        n.mode = stat.S_IMODE(mode) & 0o7777 if kind != "symlink" else 0o777
        n.mtime_ns = _now()
        if kind == "dir":
            n.children = {}
        return n

    @_retry_when_space_released
    async def mkdir(self, parent_inode: int, name: bytes, mode: int) -> Attr:
        async with self._lock:
            d = self._dir(parent_inode)
            n = await self._create_node(parent_inode, name, "dir", mode)
            self._add_child(d, n)
            return self._remember(n)

    @_retry_when_space_released
    async def symlink(self, parent_inode: int, name: bytes, target: bytes) -> Attr:
        async with self._lock:
            d = self._dir(parent_inode)
            n = await self._create_node(parent_inode, name, "symlink", 0o777)
            n.target = target
            n.size = len(target)
            self._add_child(d, n)
            return self._remember(n)

    @_retry_when_space_released
    async def create(self, parent_inode: int, name: bytes, mode: int, flags: int) -> tuple[int, Attr]:
        async with self._lock:
            d = self._dir(parent_inode)
            n = await self._create_node(parent_inode, name, "file", mode)
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
            self._touch(d)
            attr = self._remember(n)
            return self._open_handle(n), attr

    async def mknod(self, parent_inode: int, name: bytes, mode: int, rdev: int) -> Attr:
        raise NotPermittedError("a workspace holds regular files, directories and symlinks only")

    async def link(self, inode: int, new_parent_inode: int, new_name: bytes) -> Attr:
        raise NotPermittedError("a workspace does not support hard links")

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
            n = d.children.get(text)
            if n is None:
                raise PathNotFoundError(f"{text}: no such entry")
            self._unlink_node(d, n)

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
            n = d.children.get(text)
            if n is None:
                raise PathNotFoundError(f"{text}: no such entry")
            self._unlink_node(d, n)

    @_retry_when_space_released
    async def rename(self, parent_inode_old: int, name_old: bytes, parent_inode_new: int, name_new: bytes,
                     flags: int = 0) -> None:
        if flags & RENAME_EXCHANGE:
            raise UnsupportedError("RENAME_EXCHANGE is not supported")
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
                p = dst
                while p is not None:
                    if p is n:
                        raise InvalidArgumentError("cannot move a directory into itself")
                    p = p.parent
            await self._materialize(src)
            await self._materialize(dst)
            n = src.children.get(old)
            target = dst.children.get(new)
            if n is None:
                raise PathNotFoundError(f"{old}: no such entry")
            ids: list[int] = []
            data: list[str] = []
            if target is not None:
                self._remove_subtree_rows(target, ids, data)
            with self.overlay.batch():
                self.overlay.delete(ids)
                self.overlay.update(n.oid, parent=dst.oid, name=new)
            if target is not None:
                del dst.children[new]
                self._detach(target)
                for name in data:
                    self.overlay.remove_data(name)
            del src.children[old]
            n.name = new
            n.parent = dst
            dst.children[new] = n
            self._touch(src)
            self._touch(dst)

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
            fresh = n.ino not in self._inodes
            if not reply(name.encode(), self.attr(n), i + 1):
                if fresh and n.oid is None and n.parent is not None:
                    self._maybe_drop(n)
                return
            self._remember(n)

    async def releasedir(self, fh: int) -> None:
        self._dirs.pop(fh, None)

    async def fsyncdir(self, fh: int, datasync: bool) -> None:
        async with self._lock:
            self._flush_all()
            self.overlay.sync()

    # --- requests: files ----------------------------------------------------------------------
    def _open_handle(self, n: WNode) -> int:
        n.opens += 1
        self._inodes[n.ino] = n
        fh = self._new_fh()
        self._files[fh] = _Handle(n)
        return fh

    async def open(self, inode: int, flags: int) -> int:
        n = self._node(inode)
        if n.is_dir:
            raise IsADirectoryError_(f"inode {inode} is a directory")
        if n.kind != "file":
            raise InvalidArgumentError(f"inode {inode} is not a regular file")
        if flags & os.O_TRUNC and flags & os.O_ACCMODE != os.O_RDONLY:
            async with self._lock:
                fd = await self._ensure_upper(n, empty=True)
                os.ftruncate(fd, 0)
                n.size = 0
                n.mtime_ns = _now()
                n.dirty = True
        return self._open_handle(n)

    def _handle(self, fh: int) -> _Handle:
        h = self._files.get(fh)
        if h is None:
            raise BadHandleError(f"file handle {fh} is not open")
        return h

    async def read(self, fh: int, off: int, size: int) -> bytes:
        h = self._handle(fh)
        n = h.node
        while n.copying is not None:
            await n.copying.wait()
        if n.fd is not None or n.upper is not None:
            return os.pread(self._fd(n), size, off)
        if n.origin is None or n.origin.size == 0:
            return b""
        if h.reader is None or h.reader_id != n.origin.id:
            if h.reader is not None:
                h.reader.close()
            manifest = await self.loader.manifest(n.origin.id) if n.origin.size else EMPTY_MANIFEST
            if h.reader is None or h.reader_id != n.origin.id:
                assert self._nursery is not None
                h.reader = prefetch.Prefetcher(manifest, self.loader.chunks, self._nursery,
                                               fetch_now=self.loader.chunks_now)
                h.reader_id = n.origin.id
        if n.fd is not None or n.upper is not None:  # copied up meanwhile
            return os.pread(self._fd(n), size, off)
        return await h.reader.read(off, size)

    async def write(self, fh: int, off: int, buf: bytes) -> int:
        h = self._handle(fh)
        n = h.node
        async with self._lock:
            fd = await self._ensure_upper(n)
            written = os.pwrite(fd, buf, off)
            if off + written > n.size:
                n.size = off + written
            n.mtime_ns = _now()
            n.dirty = True
            return written

    async def flush(self, fh: int) -> None:
        n = self._handle(fh).node
        if n.dirty:
            async with self._lock:
                self._flush(n)

    async def fsync(self, fh: int, datasync: bool) -> None:
        n = self._handle(fh).node
        async with self._lock:
            self._flush(n)
            self.overlay.sync(n.fd)

    async def release(self, fh: int) -> None:
        h = self._files.pop(fh, None)
        if h is None:
            return
        if h.reader is not None:
            h.reader.close()
        n = h.node
        n.opens -= 1
        if n.dirty:
            async with self._lock:
                self._flush(n)
        if n.opens <= 0:
            self._close_fd(n)
            if n.parent is None:
                self._maybe_forget(n)

    def _new_fh(self) -> int:
        fh = self._next_fh
        self._next_fh += 1
        return fh

    # --- the control channel: status, reset, commit --------------------------------------------
    @asynccontextmanager
    async def paused(self):
        """Hold off every change (the one lock) with pending metadata written.

        The control channel (fuse/control.py) runs status and commit inside:
        ``draft()`` to snapshot the edits, ``settle(cid)`` once the branch
        reached a commit, ``set_pending`` around the compare-and-swap."""
        async with self._lock:
            self._flush_all()
            yield self

    def draft(self) -> Draft | TreeEntry | None:
        """The edits as a Draft over the base commit (call inside ``paused``): None when
        untouched; the root's TreeEntry when it shows another tree than the base's
        (a merge in progress) and nothing was edited below it."""
        if self.root.children is None:
            o = self.root.origin
            return o if o is not None and o.id != self.base_tree else None
        return _draft(self.root, self.overlay.data_path)

    @property
    def merge_state(self) -> str | None:
        """The merge in progress (JSON from the control channel), or None."""
        return self.overlay.merge

    async def show_merge(self, tree_id: bytes, state: str) -> list[int]:
        """Show tree ``tree_id`` (a merge's result) as pending edits over the base and
        record ``state`` with it, in one transaction (call inside ``paused``, on a
        workspace without edits); inodes to invalidate."""
        return await self._rebase_onto(self.base, clear=True, tree=tree_id, merge=state)

    def set_pending(self, commit_id: bytes | None) -> None:
        """Record the commit about to be compare-and-swapped (crash safety, vfs/overlay.py)."""
        self.overlay.set_pending(commit_id)

    async def settle(self, commit_id: bytes) -> list[int]:
        """The branch reached ``commit_id``: clear the edits and show it, keeping the
        node objects the kernel knows (call inside ``paused``); inodes to invalidate."""
        return await self._rebase_onto(commit_id, clear=True)

    async def reset(self, paths: list[str] | None = None) -> list[int]:
        """Discard edits (all, or at and below ``paths``); return inodes whose contents changed."""
        async with self._lock:
            if not paths:
                return await self._rebase_onto(self.base, clear=True)
            changed: list[int] = []
            for p in paths:
                changed += await self._reset_path(p)
            return changed

    async def _reset_path(self, path: str) -> list[int]:
        parts = [p for p in path.strip("/").split("/") if p and p != "."]
        if not parts or ".." in parts:
            raise InputError(f"cannot reset {path!r}: give a path inside the workspace")
        # The base entry at the path.
        base_tree = (await self.loader.io("base commit", self.repo.load_commit, self.base)).tree
        entry: TreeEntry | None = TreeEntry("", Kind.DIR, 0, base_tree)
        for name in parts:
            if entry is None or not entry.is_dir:
                entry = None
                break
            entry = (await self.loader.tree(entry.id)).get(name)
        # Walk (and create, if the base has the path) the parents in the workspace.
        d = self.root
        for name in parts[:-1]:
            c = await self._child(d, name)
            if c is None:
                if entry is None:
                    return []
                await self._materialize(d)
                c = self._new("dir", name, d)
                c.children, c.mode, c.mtime_ns = {}, 0o755, _now()
                self._add_child(d, c)
            elif not c.is_dir:
                raise InputError(f"cannot reset {path}: {c.path()} is not a directory in the workspace "
                                 "(reset that path instead)")
            d = c
        name = parts[-1]
        current = await self._child(d, name)
        if current is None and entry is None:
            return []
        if (current is not None and entry is not None and current.oid is None and current.origin == entry):
            return []  # untouched
        await self._materialize(d)
        current = d.children.get(name)
        changed = []
        if current is not None:
            changed = self._inos_below(current)
            self._unlink_node(d, current)
        if entry is not None:
            n = self._from_entry(d, TreeEntry(name, entry.kind, entry.size, entry.id, entry.target))
            self._add_child(d, n)
        return changed

    def _inos_below(self, n: WNode) -> list[int]:
        out = [n.ino]
        for c in list((n.children or {}).values()) + list(n.lazy.values()):
            out += self._inos_below(c)
        return out

    async def _rebase_onto(self, cid: bytes, clear: bool, tree: bytes | None = None,
                           merge: str | None = None) -> list[int]:
        """Clear the overlay and show commit ``cid`` (or, over it, tree ``tree``: a merge
        in progress, ``merge``), keeping the node objects the kernel knows."""
        commit: Commit = await self.loader.io("commit", self.repo.load_commit, cid)
        shown = tree or commit.tree
        # The trees along every in-memory directory with nodes below it, loaded in a thread.
        wanted: list[list[str]] = []

        def collect(n: WNode, parts: list[str]) -> None:
            kids = dict(n.lazy)
            kids.update(n.children or {})
            if kids:
                wanted.append(parts)
            for name, c in kids.items():
                if c.is_dir:
                    collect(c, parts + [name])
        collect(self.root, [])
        repo = self.repo

        def load() -> dict[tuple, Tree | None]:
            out: dict[tuple, Tree | None] = {}

            def tree_at(parts: tuple) -> Tree | None:
                if parts in out:
                    return out[parts]
                if not parts:
                    t = repo.load_tree(shown)
                else:
                    parent = tree_at(parts[:-1])
                    e = parent.get(parts[-1]) if parent is not None else None
                    t = repo.load_tree(e.id) if e is not None and e.is_dir else None
                out[parts] = t
                return t
            for parts in wanted:
                tree_at(tuple(parts))
            return out
        trees = await trio.to_thread.run_sync(load)
        root_row = Row(ROOT_ID, None, "", "dir", TreeEntry("", Kind.DIR, 0, shown), False, None,
                       self.root.mode, 0, None)
        old_data = []

        def gather(n: WNode):
            if n.upper is not None:
                old_data.append(n)
                if n.opens > 0 and n.fd is None:  # keep its bytes for whoever has it open
                    n.fd = self.overlay.open_data(n.upper)
            for c in (n.children or {}).values():
                gather(c)
        gather(self.root)
        self.overlay.clear(cid, root_row, merge)  # the one atomic step
        self.base = cid
        self.base_tree = commit.tree
        self.base_time_ns = commit.time * 1_000_000_000
        invalidate: list[int] = []

        def rebase(n: WNode, e: TreeEntry, parts: tuple) -> None:
            changed = n.upper is not None or n.origin is None or n.origin.id != e.id or n.kind != _kind_of(e)
            if n.kind == "file" and changed:
                invalidate.append(n.ino)
            if n.upper is not None:
                n.upper = None
                self._close_fd(n)
            n.oid = None
            n.origin = e
            n.size = e.size
            n.mode = _mode_of(e)
            n.mtime_ns = self.base_time_ns
            n.target = e.target
            n.dirty = False
            if not n.is_dir:
                return
            kids = dict(n.lazy)
            kids.update(n.children or {})
            n.children = None
            n.lazy = {}
            tree = trees.get(parts)
            for name, c in kids.items():
                ce = tree.get(name) if tree is not None else None
                if ce is None or _kind_of(ce) != c.kind:
                    invalidate.extend(self._inos_below(c))
                    self._detach_all(c)
                else:
                    n.lazy[name] = c
                    rebase(c, ce, parts + (name,))

        rebase(self.root, root_row.origin, ())
        self.root.oid = ROOT_ID
        for n in old_data:
            if n.fd is not None and n.parent is not None:
                self._close_fd(n)
        return invalidate

    def _detach_all(self, n: WNode) -> None:
        for c in list(n.lazy.values()):
            self._detach_all(c)
        n.lazy = {}
        if n.upper is not None and n.opens > 0 and n.fd is None:
            try:
                n.fd = self.overlay.open_data(n.upper)
            except OSError:
                pass
        self._detach(n)


def resolve_pending(repo: Repository, overlay: Overlay, head: bytes | None) -> str | None:
    """Settle a commit the daemon was killed in: see vfs/overlay.py.  Returns what was done."""
    pending = overlay.pending
    if pending is None:
        return None
    base = overlay.base
    cid, steps = head, 0
    while cid is not None and cid != base and steps < _PENDING_SEARCH:
        if cid == pending:
            log.info("workspace: the interrupted commit %s reached the branch; clearing its edits", pending.hex())
            overlay.clear(pending, WorkspaceFS._root_row(repo, pending))
            return "landed"
        parents = repo.load_commit(cid).parents
        cid = parents[0] if parents else None
        steps += 1
    log.info("workspace: the interrupted commit %s did not reach the branch; the edits stay pending",
             pending.hex())
    overlay.set_pending(None)
    return "dropped"
