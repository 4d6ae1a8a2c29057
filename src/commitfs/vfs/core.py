"""The file-system core: commits as read-only directory trees, on trio, without a kernel.

Shape of a mount
----------------
Without a revision the root holds ``aliases/``, ``branches/``, ``tags/`` and
``commits/``; below each name is the tree of a commit (a *view*).  With a revision, the root
itself is that commit's tree.  Everything inside a view is immutable, so the
kernel is told to trust it for a day (entry and attribute timeouts) and to
keep its page cache across opens.  Only the ref directories move (aliases
like branches): their
listings and lookups use a refs snapshot at most ``refresh_s / 2`` old, and
the kernel trusts what they return for ``refresh_s / 2``, so a branch view
shows a new commit within ``refresh_s``.  A moved branch is a *new* inode for
``branches/<name>`` (nodes are keyed by the commit they show, see
vfs/inode.py); whoever holds the old one (an open file, a working directory)
keeps reading the old commit.

Laziness
--------
Mounting loads at most the one commit named by REV.  A directory's tree is
loaded on the first lookup in it or listing of it; a file's manifest and
chunks on its first read (vfs/prefetch.py).  A read-only mount normally never
sees an open: the kernel opens files itself (fuse/adapter.py) and reads name
the inode (``read_inode``), whose read state is kept per file.  Where the
daemon does answer opens (a stock pyfuse3), a file's first open starts its
initial read-ahead window from offset 0: nearly every open reads from the
start, and later opens are served by the kernel's page cache, so they start
nothing.  Every load goes through vfs/loader.py: from memory on the event
loop when the bytes are there, else in a worker thread within the I/O
timeout; trees, manifests and commits cached, each loaded once however many
requests want it at the same moment.

Errors are exceptions (commitfs.errors, vfs.errors); commitfs.fuse turns them
into errno values.
"""

from __future__ import annotations

import functools
import itertools
import logging
import os
import time
from array import array
from collections import OrderedDict
from collections.abc import Callable, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from itertools import islice

import trio

from commitfs.errors import (
    CorruptObjectError,
    IsADirectoryError_,
    NotADirectoryError_,
    PathNotFoundError,
    RevisionError,
)
from commitfs.model.ids import HEX_SIZE, is_hex
from commitfs.model.objects import EMPTY_MANIFEST, Commit, DecodeError, FileManifest, Kind, Tree, TreeEntry
from commitfs.model.splittree import SplitTree, TreeIndex, check_child, path_to_name, path_to_position, walk
from commitfs.repo.repository import MIN_PREFIX, Repository
from commitfs.repo.treewalk import check_expansion
from commitfs.vfs import prefetch
from commitfs.vfs.dirahead import DirReadAhead
from commitfs.vfs.loader import MANIFEST_BATCH, Flight, Loader
from commitfs.vfs.readlog import ReadLog
from commitfs.vfs.errors import (
    BadHandleError,
    NoSuchAttributeError,
    NotASymlinkError,
    ReadOnlyError,
    ShuttingDownError,
    StaleInodeError,
)
from commitfs.vfs.inode import (
    ROOT_INODE,
    XATTR_REPO,
    Attr,
    CommitsDir,
    DIR_MODE,
    EXEC_MODE,
    FILE_MODE,
    SYMLINK_MODE,
    PAGE,
    PAGE_BITS,
    _EXEC,
    _FILE,
    _SYMLINK,
    ChildBlock,
    DirNode,
    FileNode,
    Node,
    RefDir,
    RootDir,
    SymlinkNode,
    TreeDir,
    TreeInodeTable,
    View,
    ViewRoot,
    _BlockEntry,
    entry_identity,
    kind_code,
)

log = logging.getLogger(__name__)
#: Read streams one inode's read state tracks at most (FileSystem._stream): enough for
#: the few readers that share one file in practice; each costs at most one read-ahead window.
MAX_STREAMS = 4
#: (inode, offset) of the chunks published lately, not published again.
_PUBLISHED_KEYS = 4096
#: Bytes on each side of a random read's chunks that are read, verified and handed
#: to the page cache in the page-store thread (FileSystem._publish_around): a
#: random reader's later reads near this one then make no request.  Each chunk
#: is queued once while its key is remembered (_PUBLISHED_KEYS), so for a file of
#: up to that many chunks, however many random reads come, this costs at most
#: about one verified read of the file.
PUBLISH_AROUND_BYTES = 1024 * 1024

MakeNode = Callable[[], Node]


def _remember(keys: OrderedDict, key) -> None:
    """Add ``key`` to a bounded record of keys (the oldest forgotten past _PUBLISHED_KEYS)."""
    keys[key] = None
    if len(keys) > _PUBLISHED_KEYS:
        keys.popitem(last=False)


@dataclass(frozen=True)
class VfsOptions:
    #: A branch view follows its branch within this many seconds.
    refresh_s: float = 5.0
    #: Bound on any one repository call (load of a tree, a manifest, a part of chunks).
    io_timeout_s: float = 60.0
    #: How long the kernel may trust entries and attributes of immutable views.
    immutable_timeout_s: float = 86400.0
    #: Worker threads for repository calls (= concurrent storage requests).
    #: None: vfs/loader.py's default_io_threads for the repository.
    io_threads: int | None = None
    initial_window: int = prefetch.INITIAL_WINDOW
    max_window: int = prefetch.MAX_WINDOW
    part_bytes: int = prefetch.PART_BYTES
    #: Files up to this size whose bytes are in memory are read whole at their first open.
    whole_file_bytes: int = 1024 * 1024
    #: Files from this size on get a chunk map for the mount's C module, which answers
    #: their random small READs itself (FileSystem.chunk_maps; fuse/fastpath.py).
    chunk_map_bytes: int = 16 * 1024 * 1024
    #: Read states kept for files the kernel opened without asking (read_inode)...
    inode_readers: int = 32
    #: Read the next small files of a directory ahead (remote repositories; vfs/dirahead.py).
    dir_read_ahead: bool = True
    #: ...and how long one is kept unread (its read-ahead buffers are freed then;
    #: no RELEASE ever says that a reader has gone).
    inode_reader_idle_s: float = 10.0
    #: Append the files read to this file (vfs/readlog.py); None: record nothing.
    record_reads: str | None = None


@dataclass(frozen=True)
class StatFs:
    block_size: int
    blocks: int
    files: int
    name_max: int = 255
    free_blocks: int = 0  # a read-only mount has no free space
    free_files: int = 0


@dataclass(frozen=True)
class _Refs:
    branches: dict[str, bytes]
    tags: dict[str, bytes]
    aliases: dict[str, bytes]
    at: float

    def of(self, kind: str) -> dict[str, bytes]:
        return {"branches": self.branches, "tags": self.tags, "aliases": self.aliases}[kind]


# --- listings ----------------------------------------------------------------------
class Listing:
    """The entries of an open directory: names in a fixed order, nodes made on demand.

    readdir offsets are indices + 1 into this order, stable for the handle's life.
    A commit directory's listing (``view`` set) gives its TreeEntries a tree
    (or a split directory's leaf) at a time (``span``); the others (name,
    identity, maker) triples (``child``)."""

    view: View | None = None

    def __len__(self) -> int:
        raise NotImplementedError

    async def span(self, i: int) -> tuple[int, Sequence[TreeEntry]]:
        """(position of the first, entries) of the tree holding entry ``i``."""
        raise NotImplementedError

    def child(self, i: int) -> tuple[str, tuple, MakeNode]:
        raise NotImplementedError


class _StaticListing(Listing):
    def __init__(self, items: list[tuple[str, tuple, MakeNode]]):
        self.items = items

    def __len__(self) -> int:
        return len(self.items)

    def child(self, i: int) -> tuple[str, tuple, MakeNode]:
        return self.items[i]


class _TreeListing(Listing):
    """A commit directory: the tree's entries, already sorted by name bytes."""

    def __init__(self, view: View, tree: Tree):
        self.view = view
        self.entries = tree.entries

    def __len__(self) -> int:
        return len(self.entries)

    async def span(self, i: int) -> tuple[int, Sequence[TreeEntry]]:
        return 0, self.entries


class _SplitListing(Listing):
    """A split directory (model/splittree.py): entry ``i`` is in the leaf chunk
    holding position ``i``, loaded when a readdir page reaches it; the leaf
    read last is kept, so a page costs the chunks it shows, not the directory."""

    def __init__(self, fs: FileSystem, view: View, tree: SplitTree):
        self.fs = fs
        self.view = view
        self.tree = tree
        self.base = 0
        self.leaf: Tree | None = None

    def __len__(self) -> int:
        return self.tree.count

    async def span(self, i: int) -> tuple[int, Sequence[TreeEntry]]:
        if self.leaf is None or not self.base <= i < self.base + len(self.leaf.entries):
            self.base, self.leaf = await self.fs._split_leaf_at(self.tree, i)
        return self.base, self.leaf.entries


class _FileHandle:
    """The read state of a file: of one open handle (``open``/``read``), or of the
    file itself (``read_inode``).  Its read-ahead state is made at its first
    read (or at open, for a node's first open), so re-opening a file the kernel
    has cached costs nothing but the handle."""

    __slots__ = ("node", "manifest", "reader", "streams", "data", "released", "served", "used_at")

    def __init__(self, node: FileNode, manifest: FileManifest | None):
        self.node = node
        self.manifest = manifest  # None until needed (a later open of a file the kernel has cached)
        self.reader: prefetch.Prefetcher | None = None  # the stream read last
        #: read_inode's read streams, most recent first (FileSystem._stream).
        self.streams: list[prefetch.Prefetcher] = []
        #: A small file's whole bytes, read at its first open or read (FileSystem._whole_file_now).
        self.data: memoryview | None = None
        self.released = False
        self.served = 0  # bytes of ``data`` returned so far (read_inode drops it once all are)
        self.used_at = 0.0  # trio time of its last read (read_inode)


class _DirHandle:
    __slots__ = ("node", "listing")

    def __init__(self, node: DirNode, listing: Listing):
        self.node = node
        self.listing = listing


# --- the file system -----------------------------------------------------------------
class FileSystem:
    """Read-only views of a repository's commits; one method per file-system request.

    Use inside ``async with fs.running():``, which provides the nursery that
    read-ahead tasks run in (and, with ``root_commit``, loads that commit).
    Methods take and return inode numbers, handles and byte names as the
    kernel does, and raise commitfs errors.
    """

    def __init__(self, repo: Repository, root_commit: bytes | None = None, options: VfsOptions = VfsOptions(),
                 root_tree: bytes | None = None):
        self.repo = repo
        self.options = options
        self.root_commit = root_commit
        #: With ``root_commit``: the tree shown at the root (a subdirectory of the
        #: commit's tree, ``mount REV:PATH``); None for the commit's own tree.
        self.root_tree = root_tree
        self.mount_time_ns = time.time_ns()
        self._long = options.immutable_timeout_s
        self._short = max(options.refresh_s / 2, 0.0)
        self.loader = Loader(repo, options.io_threads, options.io_timeout_s)
        self._refs_snapshot: _Refs | None = None
        self._refs_flight: Flight | None = None
        self._damaged_logged: set[str] = set()
        self._listed_trees: dict[bytes, int] = {}  # tree id -> the first inode listed with it
        self._files: dict[int, _FileHandle] = {}
        #: Read states of files read without an open handle (read_inode), least recent first.
        self._by_inode: OrderedDict[int, _FileHandle] = OrderedDict()
        self._dirs: dict[int, _DirHandle] = {}
        self._next_fh = 1
        self._nursery: trio.Nursery | None = None
        self.table: TreeInodeTable | None = None
        #: Set by a front end before ``running``: LOOKUPs answered outside the file system
        #: (fuse/fastpath.py's C module) from the commit directories' entries it is shown
        #: (``publish(dir inode, block base, first position, entries, mtime_ns, timeout)``, as
        #: they are listed or looked up); the table counts their references (vfs/inode.py,
        #: TreeInodeTable.external).  None: every lookup is ``lookup``.
        self.external_lookups = None
        self._repo_url = repo.url.encode()
        self.readlog = ReadLog(options.record_reads) if options.record_reads else None
        self._dir_ahead: DirReadAhead | None = None
        #: Gives verified bytes of a file to the kernel's page cache: (inode, offset,
        #: data), never blocking: it queues them for its own thread (the FUSE
        #: adapter's PageStorer, pyfuse3.notify_store) and returns False if it
        #: dropped them (a full queue).  None: random reads publish nothing (prefetch.py).
        self.page_store: Callable[[int, int, bytes], bool | None] | None = None
        self._published: OrderedDict[tuple[int, int], None] = OrderedDict()
        #: Queues a job for that thread: (inode, job, bytes), the job yielding
        #: (offset, verified bytes) to store; False if dropped.  None: a random
        #: read's neighbours are not published (``_publish_around``).
        self.page_store_later: Callable[[int, Callable, int], bool] | None = None
        #: Called by read_now when a read started tasks (the C module then lets the
        #: event loop run before it takes the next request; fuse/fastpath.py).
        self.on_tasks: Callable[[], None] | None = None
        #: The C module's chunk maps (fuse/fastpath.py, ChunkMaps: ``put`` a large file's
        #: pack paths and per chunk its end, id, path index and offset; ``inode in``), or None.
        self.chunk_maps = None
        #: The inode whose first read read_now found not in memory, for the read_inode of it
        #: that follows (which then goes straight to the read-ahead path).
        self._missed_now: int | None = None
        self._published_around: OrderedDict[tuple[int, int], None] = OrderedDict()

    @asynccontextmanager
    async def running(self):
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            if self.options.dir_read_ahead and self.repo.chunk_cache is not None:
                self._dir_ahead = DirReadAhead(self.loader, nursery, self.options.whole_file_bytes)
            if self.root_commit is None:
                root: Node = RootDir(self._short, self._short)
            else:
                commit = await self.loader.commit(self.root_commit)
                root = self._view_root(self.root_commit, commit, self._long, self.root_tree)
            self.table = TreeInodeTable(root, self._block_node)
            self.table.external = self.external_lookups
            try:
                yield self
            finally:
                nursery.cancel_scope.cancel()
                if self._dir_ahead is not None:
                    self._dir_ahead.close()
                for h in [*self._files.values(), *self._by_inode.values()]:
                    if h.reader is not None:
                        h.reader.close()
                if self.readlog is not None:
                    self.readlog.close()

    async def _refs(self) -> _Refs:
        """Branches and tags, at most ``refresh_s / 2`` old; one refresh at a time, shared
        by every request that needs it (so a stalled store costs each of them one
        ``io_timeout_s``, not one per request queued before it)."""
        snap = self._refs_snapshot
        if snap is not None and trio.current_time() - snap.at < self._short:
            return snap
        flight = self._refs_flight
        if flight is None:
            flight = self._refs_flight = Flight()
            try:
                flight.value = await self._load_refs(snap)
            except Exception as exc:
                flight.error = exc
            except BaseException:
                flight.error = ShuttingDownError("the file system is shutting down")
                raise
            finally:
                self._refs_flight = None
                flight.done.set()
        else:
            await flight.done.wait()
        if flight.error is not None:
            raise flight.error
        return flight.value

    async def _load_refs(self, previous: _Refs | None) -> _Refs:
        refs = self.repo.refs
        damaged: dict[str, str] = {}
        try:
            branches, tags, aliases = await self.loader.io(
                "the branch, tag and alias list",
                lambda: (refs.branches(damaged), refs.tags(damaged), self.repo.aliases.live()))
        except Exception as exc:
            if previous is None:
                raise
            log.warning("cannot refresh branches and tags (%s); showing those of %.0fs ago",
                        exc, trio.current_time() - previous.at)
            return previous
        # A damaged reference (empty, not a commit id) changes nothing shown:
        # it keeps the commit it named at the last good read, or stays absent.
        for full, why in damaged.items():
            if why not in self._damaged_logged:  # once, not at every refresh
                self._damaged_logged.add(why)
                log.warning("%s; %s", why, "showing its last good value" if previous else "not shown")
            if previous is not None:
                kind, _, name = full.partition("/")
                old, new = (previous.branches, branches) if kind == "branches" else (previous.tags, tags)
                if name in old:
                    new[name] = old[name]
        self._refs_snapshot = _Refs(branches, tags, aliases, trio.current_time())
        return self._refs_snapshot

    async def _resolve_prefix(self, prefix: str) -> bytes | None:
        found = await self.loader.io(f"commits {prefix}*", lambda: list(self.repo.iter_commit_ids(prefix)))
        if len(found) > 1:
            log.info("commits/%s: ambiguous prefix (%d commits)", prefix, len(found))
        return found[0] if len(found) == 1 else None

    # --- nodes ---------------------------------------------------------------------
    def _view_root(self, cid: bytes, commit: Commit, timeout: float, tree: bytes | None = None) -> ViewRoot:
        view = View(cid, commit.tree, commit.time * 1_000_000_000, self._long)
        return ViewRoot(view, TreeEntry("", Kind.DIR, 0, tree or commit.tree), timeout)

    def _node(self, inode: int) -> Node:
        assert self.table is not None, "use the file system inside `async with fs.running()`"
        return self.table.get(inode)

    def _ref_entries(self, node: RefDir, refs: _Refs) -> dict[str, bytes | None]:
        """Names directly below a ref directory: a commit id (a ref) or None (a namespace)."""
        out: dict[str, bytes | None] = {}
        for full, cid in refs.of(node.kind).items():
            if not full.startswith(node.prefix):
                continue
            head, sep, _ = full[len(node.prefix):].partition("/")
            if not sep:
                out[head] = cid  # a ref wins over a namespace of the same name
            else:
                out.setdefault(head, None)
        return out

    def _ref_child(self, node: RefDir, name: str, cid: bytes | None, commit: Commit | None) -> tuple[tuple, MakeNode]:
        if cid is None:
            prefix = f"{node.prefix}{name}/"
            return ("ns",), lambda: RefDir(node.kind, prefix, self._short, self._short)
        assert commit is not None
        timeout = self._long if node.kind == "tags" else self._short  # branches and aliases move
        return ("commit", cid), lambda: self._view_root(cid, commit, timeout)

    async def _tree_child(self, parent: TreeDir, name: str) -> tuple[TreeEntry, int, int] | None:
        """(entry, its position, the directory's entry count) of ``parent``'s child ``name``, or None."""
        found = await self._tree_child_span(parent, name)
        return None if found is None else found[:3]

    async def _tree_child_span(self, parent: TreeDir, name: str):
        """``_tree_child`` and (position of the first, entries) of the tree or leaf holding it."""
        tree = self.loader.tree_cached(parent.entry.id) or await self.loader.tree(parent.entry.id)
        if isinstance(tree, SplitTree):
            base, leaf = await self._split_leaf_for_base(tree, name)
            pos = leaf.position(name) if leaf is not None else None
            return None if pos is None else (leaf.entries[pos], base + pos, tree.count, base, leaf.entries)
        pos = tree.position(name)
        return None if pos is None else (tree.entries[pos], pos, len(tree.entries), 0, tree.entries)

    def _show_lookups(self, parent: TreeDir, block: ChildBlock, first: int, entries) -> None:
        """Show ``external_lookups`` a span of ``parent``'s entries (see there)."""
        view = parent.view
        self.external_lookups.publish(parent.ino, block.base, first, entries, view.time_ns, view.timeout)

    def _view_child(self, parent: TreeDir, e: TreeEntry, pos: int, count: int) -> Node:
        """The node of entry ``e`` at ``pos`` of ``parent``'s tree, not counted yet:
        a directory's node object (counted with ``table.remember``), else the
        file's or symlink's place in its directory's block, counted here."""
        assert self.table is not None
        if e.kind is Kind.DIR:
            view = parent.view
            return self.table.ensure(parent, e.name, entry_identity(e), lambda: TreeDir(view, e))
        b = self.table.block(parent, count)
        node = (SymlinkNode if e.kind is Kind.SYMLINK else FileNode)(parent.view, e, b, pos)
        node.ino, node.parent = b.base + pos, parent.ino
        return node

    def _remember(self, node: Node) -> None:
        assert self.table is not None
        if isinstance(node, _BlockEntry):
            node.block.remember(node.pos, kind_code(node.entry.kind), node.entry.size)
        else:
            self.table.remember(node)

    def _block_node(self, b: ChildBlock, pos: int) -> Node:
        """The node of entry ``pos`` of block ``b`` (TreeInodeTable.get): its whole entry
        if the directory's tree (or the leaf holding it) is in memory, else partial."""
        d = b.dir
        e = self._entry_now(d.entry.id, pos)
        kind = b.kind(pos)
        partial = e is None
        if partial:
            e = TreeEntry("", kind, b.size(pos), b"")
        node = (SymlinkNode if kind is Kind.SYMLINK else FileNode)(d.view, e, b, pos, partial)
        node.ino, node.parent = b.base + pos, d.ino
        return node

    def _entry_now(self, tid: bytes, pos: int) -> TreeEntry | None:
        """Entry ``pos`` of tree ``tid`` if it is in memory, else None."""
        base, tree = self._tree_at_now(tid, pos)
        return tree.entries[pos - base] if tree is not None else None

    def _tree_at_now(self, tid: bytes, pos: int) -> tuple[int, Tree | None]:
        """(base, the tree holding entry ``pos`` of directory ``tid``: the tree
        itself, or the leaf chunk of a split one) if in memory, else (0, None)."""
        tree = self.loader.tree_cached(tid)
        if isinstance(tree, SplitTree):
            return self._split_cached(tree, path_to_position(tree.root, pos))
        return (0, tree) if tree is not None and pos < len(tree.entries) else (0, None)

    async def _full(self, node: Node) -> Node:
        """``node`` with its whole entry (a partial one's read from its directory's tree)."""
        if not isinstance(node, _BlockEntry) or not node.partial:
            return node
        tid, pos = node.block.dir.entry.id, node.pos
        tree = await self.loader.tree(tid)
        if isinstance(tree, SplitTree):
            base, leaf = await self._split_leaf_at(tree, pos)
            e = leaf.entries[pos - base]
        else:
            e = tree.entries[pos]
        node.entry, node.partial = e, False
        return node

    async def _child(self, parent: DirNode, name: str) -> tuple[tuple, MakeNode] | None:
        """Identity and maker of ``parent``'s child ``name`` (not a commit directory), or None."""
        if isinstance(parent, RootDir):
            for child_name, identity, make in self._root_items():
                if child_name == name:
                    return identity, make
            return None
        if isinstance(parent, RefDir):
            target = self._ref_entries(parent, await self._refs()).get(name, False)
            if target is False:
                return None
            commit = await self.loader.commit(target) if target is not None else None
            return self._ref_child(parent, name, target, commit)
        if isinstance(parent, CommitsDir):
            return await self._commit_child(name)
        raise AssertionError(f"unknown directory node {parent!r}")

    async def _commit_child(self, name: str) -> tuple[tuple, MakeNode] | None:
        hexid = name.lower()
        if not (MIN_PREFIX <= len(hexid) <= HEX_SIZE and is_hex(hexid)):
            return None
        if len(hexid) == HEX_SIZE:
            cid, timeout = bytes.fromhex(hexid), self._long
        else:
            # A prefix may become ambiguous when commits are added: trust it briefly.
            cid, timeout = await self._resolve_prefix(hexid), self._short
            if cid is None:
                return None
        try:
            commit = await self.loader.commit(cid)
        except RevisionError:
            return None
        return ("commit", cid), lambda: self._view_root(cid, commit, timeout)

    def _root_items(self) -> list[tuple[str, tuple, MakeNode]]:
        s, long_ = self._short, self._long
        return [
            ("aliases", ("refs",), lambda: RefDir("aliases", "", long_, s)),
            ("branches", ("refs",), lambda: RefDir("branches", "", long_, s)),
            ("commits", ("commits",), lambda: CommitsDir(long_, s)),
            ("tags", ("refs",), lambda: RefDir("tags", "", long_, s)),
        ]

    async def _listing(self, node: DirNode) -> Listing:
        if isinstance(node, TreeDir):
            tid = node.entry.id
            first = self._listed_trees.setdefault(tid, node.ino)
            if first != node.ino:
                # The same tree at a second path: shared subtrees, the only way
                # a DAG multiplies paths.  Listing it again is refused if the
                # rule of repo.treewalk refuses it (counted once per tree id),
                # so a find(1) of a hostile DAG stays bounded.
                await self.loader.io(f"the path count of tree {tid.hex()}", check_expansion, self.repo, tid)
            tree = await self.loader.tree(tid)
            if isinstance(tree, SplitTree):
                return _SplitListing(self, node.view, tree)
            return _TreeListing(node.view, tree)
        if isinstance(node, RootDir):
            return _StaticListing(self._root_items())
        if isinstance(node, RefDir):
            entries = self._ref_entries(node, await self._refs())
            commits = await self._commits_of({c for c in entries.values() if c is not None})
            items = []
            for name in sorted(entries, key=str.encode):
                cid = entries[name]
                if cid is not None and cid not in commits:
                    continue  # unreadable commit: logged, left out of the listing
                identity, make = self._ref_child(node, name, cid, commits.get(cid) if cid else None)
                items.append((name, identity, make))
            return _StaticListing(items)
        if isinstance(node, CommitsDir):
            refs = await self._refs()
            cids = set(refs.branches.values()) | set(refs.tags.values()) | set(refs.aliases.values())
            commits = await self._commits_of(cids)
            items = []
            for cid in sorted(commits):
                commit = commits[cid]
                items.append((cid.hex(), ("commit", cid),
                              (lambda c=cid, cm=commit: self._view_root(c, cm, self._long))))
            return _StaticListing(items)
        raise AssertionError(f"unknown directory node {node!r}")

    # --- split directories: one chunk per level, loaded as a lookup or a page needs it
    async def _split_child(self, tree: SplitTree, parent: TreeIndex, i: int, upper: bytes | None):
        cid = parent.children[i].id
        node = self.loader.tree_node_cached(cid) or await self.loader.tree_node(cid)
        try:
            check_child(parent, i, node, upper)
        except DecodeError as exc:
            raise CorruptObjectError(f"split tree {tree.id.hex()} is malformed: {exc}") from None
        return node

    async def _split_walk(self, tree: SplitTree, steps):
        """Drive a walk of model/splittree.py (``path_to_*``) on the event loop:
        each node from memory or a worker thread (Loader.tree_node), checked."""
        try:
            step = next(steps)
            while True:
                step = steps.send(await self._split_child(tree, *step))
        except StopIteration as done:
            return done.value

    async def _split_leaf_for_base(self, tree: SplitTree, name: str) -> tuple[int, Tree | None]:
        """(position of its first entry, the leaf chunk of ``tree`` whose range holds ``name``, or None)."""
        return await self._split_walk(tree, path_to_name(tree.root, name.encode()))

    async def _split_leaf_at(self, tree: SplitTree, pos: int) -> tuple[int, Tree]:
        """(position of its first entry, the leaf chunk) holding entry ``pos``."""
        return await self._split_walk(tree, path_to_position(tree.root, pos))

    def _split_cached(self, tree: SplitTree, steps) -> tuple[int, Tree | None]:
        """Drive a walk of ``tree`` (``path_to_*``) through memory alone: (base,
        leaf) if every node on its path is in memory (checked when it was
        loaded), else (0, None)."""
        def cached(parent: TreeIndex, i: int, upper) -> Tree | TreeIndex:
            node = self.loader.tree_node_cached(parent.children[i].id)
            if node is None:
                raise LookupError
            return node
        try:
            return walk(steps, cached)
        except LookupError:
            return 0, None

    async def _commits_of(self, cids: set[bytes]) -> dict[bytes, Commit]:
        """Load commits concurrently; leave out (and log) those that fail."""
        out: dict[bytes, Commit] = {}

        async def one(cid: bytes) -> None:
            try:
                out[cid] = await self.loader.commit(cid)
            except Exception as exc:
                log.error("cannot load commit %s: %s", cid.hex(), exc)

        async with trio.open_nursery() as nursery:
            for cid in cids:
                nursery.start_soon(one, cid)
        return out

    # --- requests: names and attributes ---------------------------------------------
    async def lookup(self, parent_inode: int, name: bytes) -> Attr:
        """The attributes of ``name`` in a directory; counts one kernel reference."""
        parent = self._node(parent_inode)
        if not parent.is_dir:
            raise NotADirectoryError_(f"inode {parent_inode} is not a directory")
        assert isinstance(parent, DirNode) and self.table is not None
        if name == b".":
            node: Node = parent
        elif name == b"..":
            node = self._node(parent.parent)
        else:
            try:
                text = name.decode()
            except UnicodeDecodeError:
                raise PathNotFoundError(f"{name!r}: no such entry (names are UTF-8)") from None
            if isinstance(parent, TreeDir):
                found = await self._tree_child_span(parent, text)
                if found is None:
                    raise PathNotFoundError(f"{text}: no such entry")
                node = self._view_child(parent, *found[:3])
                if self.external_lookups is not None and isinstance(node, _BlockEntry):
                    self._show_lookups(parent, node.block, found[3], found[4])  # its neighbours' lookups
            else:
                child = await self._child(parent, text)
                if child is None:
                    raise PathNotFoundError(f"{text}: no such entry")
                identity, make = child
                node = self.table.ensure(parent, text, identity, make)
        self._remember(node)
        return node.attr(self.mount_time_ns)

    def forget(self, inode_list: Sequence[tuple[int, int]]) -> None:
        assert self.table is not None
        for inode, nlookup in inode_list:
            self.table.forget(inode, nlookup)
            if inode in self._by_inode and inode not in self.table:
                self._close(self._by_inode.pop(inode))

    async def getattr(self, inode: int) -> Attr:
        return self._node(inode).attr(self.mount_time_ns)

    async def readlink(self, inode: int) -> bytes:
        node = self._node(inode)
        if not isinstance(node, SymlinkNode):
            raise NotASymlinkError(f"inode {inode} is not a symbolic link")
        return (await self._full(node)).entry.target

    async def getxattr(self, inode: int, name: bytes) -> bytes:
        value = self._xattrs(await self._full(self._node(inode))).get(name)
        if value is None:
            raise NoSuchAttributeError(f"no extended attribute {name!r}")
        return value

    async def listxattr(self, inode: int) -> list[bytes]:
        return sorted(self._xattrs(await self._full(self._node(inode))))

    def _xattrs(self, node: Node) -> dict[bytes, bytes]:
        out = {k.encode(): v for k, v in node.xattrs().items()}
        out[XATTR_REPO.encode()] = self._repo_url
        return out

    async def statfs(self) -> StatFs:
        assert self.table is not None
        root = self.table.root
        total = 0
        if isinstance(root, TreeDir):
            total = (await self.loader.tree(root.entry.id)).size
        bsize = 4096
        return StatFs(bsize, -(-total // bsize), len(self.table))

    # --- requests: directories ----------------------------------------------------------
    async def opendir(self, inode: int) -> int:
        node = self._node(inode)
        if not isinstance(node, DirNode):
            raise NotADirectoryError_(f"inode {inode} is not a directory")
        listing = await self._listing(node)
        fh = self._new_fh()
        self._dirs[fh] = _DirHandle(node, listing)
        return fh

    def listing_fixed(self, fh: int) -> bool:
        """Whether the listing of directory handle ``fh`` can never change: a commit
        directory's (the kernel may cache it, fuse/fastpath.py); not the root's, a ref
        directory's or ``commits/``'s, which follow the refs."""
        h = self._dirs.get(fh)
        return h is not None and h.listing.view is not None

    async def readdir_plain(self, fh: int, start_id: int, reply: Callable[[bytes, int, int, int], bool]) -> None:
        """A plain READDIR (fuse/fastpath.py): offer ``reply(name, ino, mode, next_id)``
        entries from ``start_id`` until it refuses one, as ``readdir`` does, but the
        kernel keeps only names, numbers and types: no entry counts a reference.  A
        file's or symlink's number is its place in its directory's block, the one a
        lookup gives while the kernel holds any entry of the block (it holds the first
        entries, from the READDIRPLUS that began the listing); a subdirectory's is its
        node's if the table has one, else the number reserved for its place in the
        block (which names nothing else; a later lookup gives the node a number of
        its own).  Nothing is made: a plain listing leaves the table as it was."""
        h = self._dirs.get(fh)
        if h is None:
            raise BadHandleError(f"directory handle {fh} is not open")
        assert self.table is not None
        listing, table, parent = h.listing, self.table, h.node
        view = listing.view
        if view is None:  # the root, a ref directory, commits/: a handful of directories
            for i in range(start_id, len(listing)):
                name, identity, make = listing.child(i)
                node = table.ensure(parent, name, identity, make)
                ok = reply(name.encode(), node.ino, node.attr(self.mount_time_ns).mode, i + 1)
                table.discard(node)
                if not ok:
                    return
            return
        assert isinstance(parent, TreeDir)
        DIR, FILE, EXEC = Kind.DIR, Kind.FILE, Kind.EXEC
        i, n = start_id, len(listing)
        block = None
        try:
            while i < n:
                first_pos, entries = await listing.span(i)
                if not 0 <= i - first_pos < len(entries):
                    raise CorruptObjectError(f"tree {parent.entry.id.hex()} has no entry {i} of {n}")
                block = table.block(parent, n)  # after the await, as in _readdir_view
                base = block.base
                if self.external_lookups is not None:
                    self._show_lookups(parent, block, first_pos, entries)
                for e in islice(entries, i - first_pos, None):
                    kind = e.kind
                    if kind is DIR:
                        node = table.known(parent, e.name, entry_identity(e))
                        ok = reply(e.name.encode(), base + i if node is None else node.ino, DIR_MODE, i + 1)
                    else:
                        ok = reply(e.name.encode(), base + i,
                                   FILE_MODE if kind is FILE else EXEC_MODE if kind is EXEC else SYMLINK_MODE, i + 1)
                    if not ok:
                        return
                    i += 1
        finally:
            if block is not None:
                table.discard_block(block)  # none of its numbers held: it goes (as in _readdir_view)

    async def readdir(self, fh: int, start_id: int, reply: Callable[[bytes, Attr, int], bool]) -> None:
        """Offer entries from ``start_id`` to ``reply(name, attr, next_id)`` until it refuses one.

        ``next_id`` is the entry's index + 1.  Each accepted entry counts one
        kernel reference (the kernel's readdirplus remembers it as if looked
        up); a refused one does not and, if new, leaves the table again."""
        h = self._dirs.get(fh)
        if h is None:
            raise BadHandleError(f"directory handle {fh} is not open")
        assert self.table is not None
        listing = h.listing
        view = listing.view
        table = self.table
        if view is not None:
            assert isinstance(h.node, TreeDir)
            await self._readdir_view(h.node, listing, view, start_id, reply)
            return
        for i in range(start_id, len(listing)):
            name, identity, make = listing.child(i)
            node = table.ensure(h.node, name, identity, make)
            if not reply(name.encode(), node.attr(self.mount_time_ns), i + 1):
                table.discard(node)
                return
            table.remember(node)

    async def _readdir_view(self, parent: TreeDir, listing: Listing, view: View, start_id: int, reply) -> None:
        """readdir of a commit directory: a subdirectory is a node object, a file
        or symlink only a count in its directory's block (vfs/inode.py)."""
        table = self.table
        timeout, mtime = view.timeout, view.time_ns
        FILE, EXEC, DIR = Kind.FILE, Kind.EXEC, Kind.DIR
        i, n = start_id, len(listing)
        block = None
        try:
            while i < n:
                first_pos, entries = await listing.span(i)
                if not 0 <= i - first_pos < len(entries):  # (a checked split tree cannot do this)
                    raise CorruptObjectError(f"tree {parent.entry.id.hex()} has no entry {i} of {n}")
                # After the await: the kernel may have forgotten all of the block meanwhile.
                block = table.block(parent, n)
                base, page_of, first = block.base, block.page, block.first
                if self.external_lookups is not None:
                    self._show_lookups(parent, block, first_pos, entries)
                page, page_no = None, -1
                for e in islice(entries, i - first_pos, None):
                    kind = e.kind
                    if kind is DIR:
                        node = table.ensure(parent, e.name, entry_identity(e), lambda e=e: TreeDir(view, e))
                        if not reply(e.name.encode(), node.attr(self.mount_time_ns), i + 1):
                            table.discard(node)
                            return
                        table.remember(node)
                        i += 1
                        continue
                    if kind is FILE:
                        mode, code = FILE_MODE, _FILE
                    elif kind is EXEC:
                        mode, code = EXEC_MODE, _EXEC
                    else:
                        mode, code = SYMLINK_MODE, _SYMLINK
                    size = e.size
                    if not reply(e.name.encode(), Attr(base + i, mode, size, mtime, timeout, timeout), i + 1):
                        return
                    if i >> PAGE_BITS != page_no:  # (ChildBlock.remember, inlined: once per entry listed)
                        page_no = i >> PAGE_BITS
                        page = page_of(i)
                    j = i & (PAGE - 1)
                    c = page.counts[j]
                    if not c:
                        first(page, j, code, size)
                    page.counts[j] = c + 1
                    i += 1
        finally:
            # A listing of directories alone, a refused entry, or one that failed
            # (a leaf's load, a cancel) before counting any: none of the block's
            # numbers are held, so the block (and the TreeDir it keeps) goes.
            if block is not None:
                table.discard_block(block)

    async def releasedir(self, fh: int) -> None:
        self._dirs.pop(fh, None)

    # --- requests: files --------------------------------------------------------------
    def check_open(self, inode: int, flags: int) -> FileNode:
        """The file ``open(inode, flags)`` would open, or the error it would raise."""
        node = self._node(inode)
        if node.is_dir:
            raise IsADirectoryError_(f"inode {inode} is a directory")
        if flags & os.O_ACCMODE != os.O_RDONLY or flags & os.O_TRUNC:
            raise ReadOnlyError("the mount is read-only")
        if not isinstance(node, FileNode):
            raise PathNotFoundError(f"inode {inode} is not a regular file")
        return node

    def _record_read(self, node: FileNode) -> None:
        """Log a read of ``node`` with its path from the mount root (vfs/readlog.py)."""
        assert self.readlog is not None and self.table is not None
        names = []
        n: Node = node
        try:
            while n.ino != ROOT_INODE:
                names.append(n.name)
                n = self.table.get(n.parent)
        except StaleInodeError:  # a parent forgotten meanwhile: keep what is known
            names.append("?")
        self.readlog.record(node.entry.id, "/".join(reversed(names)))

    async def open(self, inode: int, flags: int) -> int:
        node = await self._full(self.check_open(inode, flags))
        if self.readlog is not None:
            self._record_read(node)
        h = _FileHandle(node, EMPTY_MANIFEST if node.entry.size == 0 else None)
        if not node.block.mark_opened(node.pos):
            # A first open is nearly always followed by a read from offset 0, so the
            # reading starts now.  Later opens find the bytes in the kernel's page
            # cache (kept while the kernel keeps the inode), so they start nothing,
            # not even the manifest: a read that does come loads it.
            if 0 < node.entry.size <= self.options.whole_file_bytes:
                h.data = self._whole_file_now(node.entry.id)
            if h.data is None:
                h.manifest = h.manifest or await self._manifest(node)
                # Start the first window once the open is answered, while the
                # reader is on its way back with the read.
                assert self._nursery is not None
                self._nursery.start_soon(self._prime, h)
        fh = self._new_fh()
        self._files[fh] = h
        return fh

    async def _manifest(self, node: FileNode) -> FileManifest:
        """A file's manifest, for a read that did not find the file in memory.
        On a miss its directory's neighbouring files' manifests come in the same
        ranged read (Loader.manifest), and a small file's read moves the
        directory read-ahead (vfs/dirahead.py): reading a directory's small
        files from S3 costs one request per many files."""
        node = await self._full(node)
        tree, pos, base = self._place(node)
        if tree is None:
            return await self.loader.manifest(node.entry.id)
        if self._dir_ahead is not None and 0 < node.entry.size <= self.options.whole_file_bytes:
            self._dir_ahead.on_read(node.parent, tree.entries, base + pos, base)
            fetching = self._dir_ahead.pending(node.entry.id)
            if fetching is not None:  # its chunks are on the way: wait, bounded
                with trio.move_on_after(self.options.io_timeout_s):
                    await fetching.wait()
        cached = self.loader.manifest_cached(node.entry.id)  # (most reads: spares listing neighbours)
        if cached is not None:
            return cached
        return await self.loader.manifest(node.entry.id, self._neighbours(tree, pos, node))

    def _place(self, node: FileNode) -> tuple[Tree | None, int, int]:
        """The tree of ``node``'s directory if held in memory (of a split
        directory: the leaf chunk holding it), ``node``'s position in that tree,
        and the position of the tree's first entry in the directory."""
        base, tree = self._tree_at_now(node.block.dir.entry.id, node.pos)  # of a split tree: its leaf
        return (tree, node.pos - base, base) if tree is not None else (None, 0, 0)

    @staticmethod
    def _neighbours(tree: Tree, i: int, node: FileNode) -> list[bytes]:
        """The ids of the files after ``node`` in its directory, the likeliest
        next reads: up to loader.MANIFEST_BATCH of them."""
        entries = tree.entries
        out = []
        for e in entries[i + 1:i + 1 + 4 * MANIFEST_BATCH]:
            if e.kind.is_file and e.size and e.id != node.entry.id:
                out.append(e.id)
                if len(out) >= MANIFEST_BATCH:
                    break
        return out

    def _whole_file_now(self, fid: bytes) -> memoryview | None:
        """A small file's bytes if they are in memory (an image from a cached
        pack): read and verified here, its reads then only slice them, with no
        read-ahead machinery.  None otherwise, or on an error, which the
        read-ahead path then meets again and reports on the read."""
        try:
            got = self.loader.file_now(fid)
        except Exception:
            return None
        if got is None or isinstance(got, bytes) or (isinstance(got, memoryview) and got.readonly):
            return got
        return memoryview(got).toreadonly()

    async def _prime(self, h: _FileHandle) -> None:
        if not h.released:
            self._reader(h).prime()

    def _reader(self, h: _FileHandle) -> prefetch.Prefetcher:
        if h.reader is None:
            h.reader = self._new_reader(h)
        return h.reader

    def _new_reader(self, h: _FileHandle) -> prefetch.Prefetcher:
        assert self._nursery is not None and h.manifest is not None
        o = self.options
        publish = None if self.page_store is None else functools.partial(self._publish, h.node.ino)
        around = None
        if publish is not None and self.page_store_later is not None and self.repo.reads.reads_from_memory:
            around = functools.partial(self._publish_around, h.node.ino, h.manifest)
        return prefetch.Prefetcher(h.manifest, self.loader.chunks, self._nursery,
                                   fetch_now=self.loader.chunks_now, publish=publish, publish_around=around,
                                   initial_window=o.initial_window,
                                   max_window=o.max_window, part_bytes=o.part_bytes)

    def _publish(self, ino: int, offset: int, chunks: list) -> None:
        """Hand verified chunks of file ``ino`` at ``offset`` to ``page_store``,
        which queues them for its own thread without waiting (no task, no thread
        hop: on a loaded machine a hop took longer than the next READ, and the
        hand-offs it held up were dropped).  A chunk published lately is not
        published again; one the store dropped (its queue full) stays in the
        loader's memory."""
        key = (ino, offset)
        if key in self._published:
            return
        data = chunks[0] if len(chunks) == 1 else b"".join(chunks)
        if self.page_store(ino, offset, data) is False:
            return
        for c in chunks:
            _remember(self._published, (ino, offset))
            offset += len(c)

    def _publish_around(self, ino: int, manifest: FileManifest, first: int, last: int) -> None:
        """Have the chunks within ``PUBLISH_AROUND_BYTES`` of chunks [first, last)
        of file ``ino`` (a random read's, just published) read, verified and
        handed to the page cache, in the page-store thread (``page_store_later``):
        the event loop only picks the chunks, skipping those published lately.
        Each run of them reaches one chunk into a published neighbour, so the
        page across their boundary is whole in one hand-off (the kernel keeps
        only whole pages).  Bytes the thread does not find in memory (the read
        engine's span_from_memory), or that fail verification, are not published: a read
        of them fetches and verifies them as any other."""
        sizes, n = manifest.chunk_sizes, len(manifest.chunk_sizes)
        lo, budget = first, PUBLISH_AROUND_BYTES
        while lo > 0 and budget > 0:
            lo -= 1
            budget -= sizes[lo]
        hi, budget = last, PUBLISH_AROUND_BYTES
        while hi < n and budget > 0:
            budget -= sizes[hi]
            hi += 1
        start = manifest.chunk_start
        done, around = self._published, self._published_around

        def todo(i: int) -> bool:
            key = (ino, start(i))
            return key not in done and key not in around
        runs: list[tuple[int, int]] = []
        i = lo
        while i < hi:
            if not todo(i):
                i += 1
                continue
            j = i + 1
            while j < hi and todo(j):
                j += 1
            runs.append((i, j))
            i = j
        if not runs:
            return
        spans = [(a - 1 if a > 0 and not todo(a - 1) else a, b + 1 if b < n and not todo(b) else b)
                 for a, b in runs]
        ids, reads = manifest.chunk_ids, self.repo.reads

        def job():
            for a, b in spans:
                try:
                    data = reads.span_from_memory(ids[a:b], sizes[a:b])
                except Exception as exc:  # not published; a read of these chunks reports it
                    log.debug("chunks %d..%d of inode %d not published: %s", a, b, ino, exc)
                    continue
                if data is not None:
                    yield start(a), data
        if self.page_store_later(ino, job, sum(start(b) - start(a) for a, b in spans)) is False:
            return
        for a, b in runs:
            for i in range(a, b):
                _remember(around, (ino, start(i)))

    async def read(self, fh: int, off: int, size: int) -> bytes:
        h = self._files.get(fh)
        if h is None:
            raise BadHandleError(f"file handle {fh} is not open")
        if h.data is not None:
            return h.data[off:off + size]
        if h.manifest is None:
            h.manifest = await self._manifest(h.node)
        return await self._reader(h).read(off, size)

    async def read_inode(self, inode: int, off: int, size: int) -> bytes:
        """A read that names the file, not an open handle.

        A read-only mount lets the kernel open files without asking us (the
        FUSE adapter answers the first OPEN with ENOSYS; see fuse/adapter.py),
        so a warm re-read is an open and a copy from the page cache with no
        round trip.  The kernel still asks for what it does not have, by
        inode; the read state (read-ahead, or a small file's verified bytes)
        lives here, one per file, in a small LRU: a file read once from start
        to end costs what it did with a handle.  A small file's bytes are
        dropped once all of them have been returned (the kernel has them
        now), so memory does not grow with the files the kernel remembers; a
        first read that takes the whole file (an image, usually: the kernel
        asks for up to the read-ahead window) keeps no state at all."""
        h = self._by_inode.get(inode)
        if h is None:
            node = self._node(inode)
            if not isinstance(node, FileNode):
                if node.is_dir:
                    raise IsADirectoryError_(f"inode {inode} is a directory")
                raise PathNotFoundError(f"inode {inode} is not a regular file")
            node = await self._full(node)
            # A concurrent read of the file may have made its state while the entry
            # loaded: share it (a second one would never be closed, its read-ahead
            # fetching on).
            h = self._by_inode.get(inode)
        if h is None:
            if self.readlog is not None:
                self._record_read(node)
            fsize = node.entry.size
            if off >= fsize:
                return b""  # at or past the end: nothing to load, no state to keep
            missed, self._missed_now = self._missed_now == inode, None  # read_now just tried memory
            data = (self._whole_file_now(node.entry.id) if fsize <= self.options.whole_file_bytes and not missed
                    else None)
            if data is not None and off == 0 and size >= fsize:
                return data  # the whole file in one read (an image, usually): no state to keep
            self._sweep_inode_readers()
            h = self._by_inode[inode] = _FileHandle(node, EMPTY_MANIFEST if fsize == 0 else None)
            h.used_at = trio.current_time()
            h.data = data
            if h.manifest is None and h.data is None:
                h.manifest = await self._manifest(node)
                maps = self.chunk_maps
                if maps is not None and fsize >= self.options.chunk_map_bytes and inode not in maps:
                    self._nursery.start_soon(self._map_chunks, inode, fsize, h.manifest)
        else:
            self._by_inode.move_to_end(inode)
            h.used_at = trio.current_time()
        if h.data is not None:
            return self._serve_data(inode, h, off, size)
        if h.manifest is None:  # a read that came while the first one loads it
            h.manifest = await self._manifest(h.node)
        if h.released:  # closed (evicted) while the manifest loaded: start again
            return await self.read_inode(inode, off, size)
        return await self._stream(h, off).read(off, size)

    def read_now(self, inode: int, off: int, size: int):
        """``read_inode`` without the event loop's coroutine: the bytes if they are
        in memory now (a small file read whole at its first read, a small file's
        verified bytes kept by its read state, a part of the read stream fetched,
        or chunks the read engine finds in memory as the stream schedules the read), else
        None, and the read goes to ``read_inode`` (which does not schedule it
        again).  A plain call, made by the C module as it reads a READ from the
        device (fuse/fastpath.py, engage_reads): it never raises (None instead:
        ``read_inode`` then meets the error and reports it), and calls
        ``on_tasks`` when the read started tasks (read-ahead), so that the
        event loop runs them before the next request is taken."""
        try:
            h = self._by_inode.get(inode)
            if h is None:
                return self._first_read_now(inode, off, size)
            if h.released:
                return None
            if h.data is None and h.manifest is None:
                return None  # the first read is loading the manifest
            self._by_inode.move_to_end(inode)
            h.used_at = trio.current_time()
            if h.data is not None:
                return self._serve_data(inode, h, off, size)
            r = self._stream(h, off)
            tasks = r.parts_started - r.parts_inline
            out = r.read_now(off, size)
            if r.parts_started - r.parts_inline != tasks and self.on_tasks is not None:
                self.on_tasks()
            return out
        except Exception as exc:
            log.debug("read_now of inode %d at %d: %s (handed to read_inode)", inode, off, exc)
            return None

    def _serve_data(self, inode: int, h: _FileHandle, off: int, size: int):
        """A read of a small file's verified bytes; they are dropped once all of them
        were returned (the kernel has them now)."""
        out = h.data[off:off + size]
        h.served += len(out)
        if h.served >= len(h.data) and self._by_inode.get(inode) is h:
            self._close(self._by_inode.pop(inode))
        return out

    async def _map_chunks(self, inode: int, fsize: int, manifest: FileManifest) -> None:
        """Hand ``chunk_maps`` (``put``) where file ``inode``'s chunks lie in local pack files
        (worked out in a worker thread, from the index in memory), if they all lie
        there as plain bytes; a shortcut only: nothing fails for want of it."""
        def layout():
            got = self.repo.reads.local_layout(manifest.chunk_ids, manifest.chunk_sizes)
            if got is None:
                return None
            paths, rows = got
            return (tuple(paths), array("Q", itertools.accumulate(manifest.chunk_sizes)),
                    b"".join(manifest.chunk_ids), array("I", [k for k, _ in rows]), array("Q", [o for _, o in rows]))
        try:
            got = await self.loader.io(f"the chunk layout of inode {inode}", layout)
            if got is not None and self.chunk_maps is not None:
                self.chunk_maps.put(inode, fsize, *got)
        except Exception as exc:
            log.debug("no chunk map for inode %d: %s", inode, exc)

    def _first_read_now(self, inode: int, off: int, size: int):
        """read_now of a file with no read state: a small file read whole in one
        READ (an image, usually), if its bytes are in memory; else None."""
        node = self._node(inode)
        if not isinstance(node, FileNode):
            return None
        if isinstance(node, _BlockEntry) and node.partial:  # _full, from a tree held in memory
            tree = self.loader.tree_cached(node.block.dir.entry.id)
            if not isinstance(tree, Tree):
                return None  # not in memory, or split (read_inode awaits its leaf)
            node.entry, node.partial = tree.entries[node.pos], False
        fsize = node.entry.size
        if off != 0 or size < fsize or fsize == 0 or fsize > self.options.whole_file_bytes:
            return None
        data = self._whole_file_now(node.entry.id)
        if data is None:
            self._missed_now = inode  # the read_inode that follows does not try again
        elif self.readlog is not None:
            self._record_read(node)
        return data

    def _stream(self, h: _FileHandle, off: int) -> prefetch.Prefetcher:
        """The read stream of an inode's read state that a read at ``off`` continues.

        Without opens the kernel names only the inode, so two readers of one
        file (two DataLoader workers, a reader and a ``tail``) share one read
        state.  Each reader still reads sequentially, so the reads are sorted
        into streams by offset: a read goes to the stream it continues (within
        that stream's window, Prefetcher.continues; of several, the one whose
        reader is nearest), else to a stream nobody
        has read yet, else to a new stream, up to ``MAX_STREAMS``, beyond which
        the least recently read stream is taken over (its reader went
        elsewhere: for it the read is a seek).  So each reader keeps its own
        growing read-ahead, and memory stays bounded by MAX_STREAMS windows
        per read state."""
        streams = h.streams
        if not streams:
            streams.append(self._reader(h))
        near = [(r.distance(off), i) for i, r in enumerate(streams) if r.continues(off)]
        if near:
            i = min(near)[1]  # the closest: a long window may cover another reader's offsets
        else:
            if streams[0].untouched:
                i = 0
            elif len(streams) < MAX_STREAMS:
                streams.insert(0, self._new_reader(h))
                i = 0
            else:
                i = len(streams) - 1
        r = streams[i]
        if i:
            streams.insert(0, streams.pop(i))
        h.reader = r
        return r

    def _sweep_inode_readers(self) -> None:
        """Make room for one more read state: close the least recent beyond the
        cap, and every one left unread for ``inode_reader_idle_s``."""
        states = self._by_inode
        idle_since = trio.current_time() - self.options.inode_reader_idle_s
        while states and (len(states) >= self.options.inode_readers
                          or next(iter(states.values())).used_at < idle_since):
            self._close(states.popitem(last=False)[1])

    async def release(self, fh: int) -> None:
        h = self._files.pop(fh, None)
        if h is not None:
            self._close(h)

    @staticmethod
    def _close(h: _FileHandle) -> None:
        h.released = True
        h.data = None
        if h.reader is not None:
            h.reader.close()
        for r in h.streams:
            r.close()
        h.streams.clear()

    async def reader(self, fh: int) -> prefetch.Prefetcher:
        """The read-ahead state of an open file (for tests and statistics)."""
        h = self._files[fh]
        if h.manifest is None:
            h.manifest = await self._manifest(h.node)
        return self._reader(h)

    # --- writes ---------------------------------------------------------------------------
    def refuse_write(self, what: str) -> None:
        raise ReadOnlyError(f"{what}: the mount is read-only")

    def _new_fh(self) -> int:
        fh = self._next_fh
        self._next_fh += 1
        return fh
