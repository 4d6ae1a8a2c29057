"""Nodes of the mounted tree and the inode table that numbers them.

The kernel names every file by an inode number that the file system hands
out in lookup and readdir, and forgets numbers only when it says so.  So the
numbers come from an allocation table, never from a hash (a collision would
silently make two files one):

* a node is keyed by ``(parent inode, name, identity)``, where identity is
  what else makes the node what it is: the entry's kind and id inside a
  commit, the commit a branch or tag root shows, or the mere fact of being a
  ref namespace.  Numbers only ever grow, so a key naming a forgotten parent
  can never match again.  The same key gives the same number for as long as
  the kernel knows it, which keeps ``stat`` stable; a branch that moves
  yields a new key (new commit) and so a new inode for the branch root, while
  the old one lives on for whoever still holds it;
* every number carries a lookup count: +1 per successful lookup and per
  readdir entry the kernel accepted, -n per forget.  At zero the node leaves
  the table (except the root), so the table shrinks back after an
  ``ls -R`` of a huge dataset once the kernel drops its dentries.

The kernel may hold millions of inodes, and the daemon must keep what it
needs of each until the kernel forgets it, so the files and symlinks of a
commit have no node object at all while the kernel holds them.  A commit's
directory is immutable, so an entry is named by its directory and its
position there: the first time one of a directory's files or symlinks is
handed out, the table reserves a *block* of inode numbers, one per entry
(``ChildBlock``: base + position), and keeps for each entry handed out only
its lookup count, kind and size, in arrays of 64-bit ints (16 bytes an
entry, in pages of ``PAGE`` positions made as they are needed).  What else a
request needs of the entry (its id, name, target) is read again from the
directory's tree (the loader's byte-capped cache, or the repository): the
daemon keeps no TreeEntry alive once a tree is evicted.  An inode number
stays the same while its block lives; a block leaves the table when the
kernel has forgotten all of its entries (a later lookup gets a new block,
new numbers).  Directories, view roots and the ref directories are node
objects (few: a directory per hundreds of files), keyed by name in one dict
per parent.  What nodes show (attributes, extended attributes) is computed
from the immutable TreeEntry and the View (commit) they belong to.

The counting and numbering (``InodeTable``) is the workspace's too
(vfs/wstree.py), whose nodes are identified by the object rather than by a
key (a rename moves the object); the keys and the blocks are the read-only
core's (``TreeInodeTable``).  ``NodeKind`` names what a node is, for both.
"""

from __future__ import annotations

import bisect
import stat
from array import array
from collections.abc import Callable
from dataclasses import dataclass
from enum import Enum

from commitfs.model.objects import Kind, TreeEntry
from commitfs.vfs.errors import StaleInodeError

ROOT_INODE = 1

# Modes of a read-only file system: nobody may write, everybody may read.
DIR_MODE = stat.S_IFDIR | 0o555
FILE_MODE = stat.S_IFREG | 0o444
EXEC_MODE = stat.S_IFREG | 0o555
SYMLINK_MODE = stat.S_IFLNK | 0o777

#: st_blksize: cat/cp size their buffers by it; one kernel read request is 128 KiB.
PREFERRED_IO_SIZE = 128 * 1024

#: Every extended attribute of a read-only mount starts with this (no other name has one:
#: fuse/fastpath.py answers those without asking the file system).
XATTR_PREFIX = "user.commitfs."
XATTR_COMMIT = "user.commitfs.commit"
XATTR_ID = "user.commitfs.id"
XATTR_REPO = "user.commitfs.repo"


class NodeKind(Enum):
    """What a node of a mount is: the kind of a commit's entry (model/objects.Kind)
    without the executable bit, which a writable node keeps in its mode, plus the
    workspace's special files (FIFO, socket, device node: a commit holds none).
    The values are the workspace overlay's stored encoding (vfs/overlay.py)."""

    DIR = "dir"
    FILE = "file"
    SYMLINK = "symlink"
    SPECIAL = "special"

    @staticmethod
    def of(kind: Kind) -> NodeKind:
        """The node kind showing an entry of this kind."""
        return _NODE_KIND[kind]


_NODE_KIND = {Kind.DIR: NodeKind.DIR, Kind.FILE: NodeKind.FILE, Kind.EXEC: NodeKind.FILE,
              Kind.SYMLINK: NodeKind.SYMLINK}


@dataclass(frozen=True, slots=True)
class View:
    """One commit as shown under a mount: everything below it is immutable."""

    commit_id: bytes
    tree_id: bytes
    time_ns: int
    #: How long the kernel may trust entries and attributes of the nodes inside it.
    timeout: float = 86400.0


@dataclass(slots=True)
class Attr:
    """What stat(2) shows of a node, plus how long the kernel may trust it."""

    ino: int
    mode: int
    size: int
    mtime_ns: int
    entry_timeout: float
    attr_timeout: float
    nlink: int = 1  # also for directories: "unknown", so find(1) does not skip any
    blksize: int = PREFERRED_IO_SIZE
    #: Owner and the other two times of a workspace node (None: the mount's user, mtime).
    uid: int | None = None
    gid: int | None = None
    atime_ns: int | None = None
    ctime_ns: int | None = None
    rdev: int = 0
    #: st_blocks when known (a workspace's overlay file: what the disk holds); else from the size.
    blocks: int | None = None


class Node:
    """A file, directory or symlink of the mount."""

    __slots__ = ("ino", "parent", "lookups")
    is_dir = False

    def __init__(self):
        self.ino = 0
        self.parent = 0
        self.lookups = 0

    @property
    def name(self) -> str:
        raise NotImplementedError

    def identity(self) -> tuple:
        """What else besides (parent, name) makes this node what it is (module docstring)."""
        raise NotImplementedError

    @property
    def mode(self) -> int:
        raise NotImplementedError

    @property
    def size(self) -> int:
        return 0

    def mtime_ns(self, mount_time_ns: int) -> int:
        return mount_time_ns

    def attr(self, mount_time_ns: int) -> Attr:
        return Attr(self.ino, self.mode, self.size, self.mtime_ns(mount_time_ns),
                    self.entry_timeout, self.attr_timeout)

    def xattrs(self) -> dict[str, bytes]:
        """Extended attributes besides the repository URL, which every node has."""
        return {}


class DirNode(Node):
    __slots__ = ()
    is_dir = True

    @property
    def mode(self) -> int:
        return DIR_MODE


class _NamedDir(DirNode):
    """A directory outside any commit (few of them): name, identity and timeouts kept."""

    __slots__ = ("_name", "_identity", "entry_timeout", "attr_timeout")

    def __init__(self, entry_timeout: float, attr_timeout: float):
        super().__init__()
        self._name = ""
        self._identity: tuple = ()
        self.entry_timeout = entry_timeout
        self.attr_timeout = attr_timeout

    @property
    def name(self) -> str:
        return self._name

    def identity(self) -> tuple:
        return self._identity


class RootDir(_NamedDir):
    """The root of a mount without REV: branches/, tags/, commits/."""

    __slots__ = ()


class RefDir(_NamedDir):
    """``branches/``, ``tags/`` or ``aliases/``, or a namespace below them (``branches/team/``)."""

    __slots__ = ("kind", "prefix")

    def __init__(self, kind: str, prefix: str, entry_timeout: float, attr_timeout: float):
        super().__init__(entry_timeout, attr_timeout)
        self.kind = kind  # "branches", "tags" or "aliases"
        self.prefix = prefix  # "" or "team/"


class CommitsDir(_NamedDir):
    """``commits/``: lists branch and tag tips, resolves any (prefix of a) commit id."""

    __slots__ = ()


class ViewNode(Node):
    """A node inside a commit: immutable, described by its tree entry."""

    __slots__ = ("view", "entry")

    def __init__(self, view: View, entry: TreeEntry):
        super().__init__()
        self.view = view
        self.entry = entry

    @property
    def name(self) -> str:
        return self.entry.name

    def identity(self) -> tuple:
        return entry_identity(self.entry)

    @property
    def entry_timeout(self) -> float:
        return self.view.timeout

    @property
    def attr_timeout(self) -> float:
        return self.view.timeout

    def mtime_ns(self, mount_time_ns: int) -> int:
        return self.view.time_ns

    def xattrs(self) -> dict[str, bytes]:
        return {XATTR_COMMIT: self.view.commit_id.hex().encode(), XATTR_ID: self.entry.id.hex().encode()}


class TreeDir(ViewNode, DirNode):
    """A directory of a commit."""

    __slots__ = ()


class ViewRoot(TreeDir):
    """The root of a view (its entry is named ''): shown under a ref directory, or
    as the mount's root, with the name, identity and timeouts of where it is shown
    (a branch's root is trusted briefly, what is inside it for long)."""

    __slots__ = ("_name", "_identity", "entry_timeout", "attr_timeout")

    def __init__(self, view: View, entry: TreeEntry, timeout: float):
        super().__init__(view, entry)
        self._name = ""
        self._identity: tuple = ()
        self.entry_timeout = timeout
        self.attr_timeout = timeout

    @property
    def name(self) -> str:
        return self._name

    def identity(self) -> tuple:
        return self._identity


class _BlockEntry(ViewNode):
    """A file or symlink of a commit, made for one request from its block
    (``block``, ``pos``: ChildBlock), not kept.  Its ``entry`` is the whole
    TreeEntry when the directory's tree was in memory, else ``partial``: only
    kind and size (enough for attributes; vfs/core.py reads the rest)."""

    __slots__ = ("block", "pos", "partial")

    def __init__(self, view: View, entry: TreeEntry, block: ChildBlock, pos: int, partial: bool = False):
        super().__init__(view, entry)
        self.block = block
        self.pos = pos
        self.partial = partial


class FileNode(_BlockEntry):
    __slots__ = ()

    @property
    def mode(self) -> int:
        return EXEC_MODE if self.entry.kind is Kind.EXEC else FILE_MODE

    @property
    def size(self) -> int:
        return self.entry.size


class SymlinkNode(_BlockEntry):
    __slots__ = ()

    @property
    def mode(self) -> int:
        return SYMLINK_MODE

    @property
    def size(self) -> int:
        return self.entry.size  # the target's length (model/objects.py checks it)


def entry_identity(entry: TreeEntry) -> tuple:
    return (entry.kind.value, entry.id)


#: Positions per page of a ChildBlock's arrays: a lookup in a huge directory
#: costs a page (~4 KiB), a listing 17 bytes an entry.
PAGE_BITS = 8
PAGE = 1 << PAGE_BITS
#: Kind codes of the entries a block holds (never directories: those are nodes);
#: a code's high bit says the entry has been opened.
_FILE, _EXEC, _SYMLINK = 1, 2, 3
_OPENED = 0x80
_CODE_KIND = {_FILE: Kind.FILE, _EXEC: Kind.EXEC, _SYMLINK: Kind.SYMLINK}


def kind_code(kind: Kind) -> int:
    return _FILE if kind is Kind.FILE else _EXEC if kind is Kind.EXEC else _SYMLINK


class BlockPage:
    """``PAGE`` positions of a block: lookup counts, kind codes, sizes."""

    __slots__ = ("counts", "kinds", "sizes", "live")

    def __init__(self):
        self.counts = array("Q", bytes(8 * PAGE))
        self.kinds = array("B", bytes(PAGE))
        self.sizes = array("Q", bytes(8 * PAGE))
        self.live = 0  # positions with a count


class ChildBlock:
    """The inode numbers ``base .. base + count - 1`` of the entries of one
    commit directory (``dir``, its node), by position; for each entry the
    kernel holds, its lookup count, kind and size (module docstring)."""

    __slots__ = ("base", "count", "dir", "pages", "live", "tally")

    def __init__(self, base: int, count: int, dir: Node, tally: list[int] | None = None):
        self.base = base
        self.count = count
        self.dir = dir
        self.pages: dict[int, BlockPage] = {}  # page number (position >> PAGE_BITS) -> page
        self.live = 0  # entries the kernel holds
        #: [entries the kernel holds in all blocks of the table], shared with the table.
        self.tally = tally if tally is not None else [0]

    def page(self, pos: int) -> BlockPage:
        """The page of position ``pos``, made if new."""
        page = self.pages.get(pos >> PAGE_BITS)
        if page is None:
            page = self.pages[pos >> PAGE_BITS] = BlockPage()
        return page

    def held(self, pos: int) -> bool:
        page = self.pages.get(pos >> PAGE_BITS)
        return page is not None and page.counts[pos & (PAGE - 1)] > 0

    def kind(self, pos: int) -> Kind:
        return _CODE_KIND[self.pages[pos >> PAGE_BITS].kinds[pos & (PAGE - 1)] & ~_OPENED]

    def size(self, pos: int) -> int:
        return self.pages[pos >> PAGE_BITS].sizes[pos & (PAGE - 1)]

    def remember(self, pos: int, code: int, size: int, n: int = 1) -> None:
        """Count ``n`` kernel references to entry ``pos`` (kind_code ``code``, ``size``)."""
        page = self.page(pos)
        i = pos & (PAGE - 1)
        c = page.counts[i]
        if not c:
            self.first(page, i, code, size)
        page.counts[i] = c + n

    def first(self, page: BlockPage, i: int, code: int, size: int) -> None:
        """Entry ``i`` of ``page`` is held from now on (its count is set by the caller)."""
        page.kinds[i] = (page.kinds[i] & _OPENED) | code
        page.sizes[i] = size
        page.live += 1
        self.live += 1
        self.tally[0] += 1

    def forget(self, pos: int, n: int) -> None:
        """Drop ``n`` references to entry ``pos``."""
        page = self.pages.get(pos >> PAGE_BITS)
        i = pos & (PAGE - 1)
        if page is None or not page.counts[i]:
            return
        c = page.counts[i]
        if c > n:
            page.counts[i] = c - n
            return
        page.counts[i] = 0
        page.kinds[i] = 0
        page.live -= 1
        if not page.live:
            del self.pages[pos >> PAGE_BITS]
        self.live -= 1
        self.tally[0] -= 1

    def mark_opened(self, pos: int) -> bool:
        """Note an open of entry ``pos``; whether it had been opened before."""
        page = self.pages.get(pos >> PAGE_BITS)
        if page is None:  # forgotten meanwhile (the kernel holds what it opens: not seen)
            return False
        i = pos & (PAGE - 1)
        k = page.kinds[i]
        page.kinds[i] = k | _OPENED
        return bool(k & _OPENED)


class InodeTable:
    """Inode numbers <-> nodes, with the kernel's lookup counts: the one table of
    both mounts (the read-only core's is ``TreeInodeTable``, the workspace's this).

    A node is anything with ``ino`` and ``lookups`` slots.  Numbers come from one
    counter and only ever grow (``new_number``), so a number the kernel forgot is
    never handed to another node.  A node is in the table while the kernel holds
    a lookup on it (``remember`` puts it back in if it had left, under its own
    number) or ``held(node)`` says something else keeps it (the workspace: an
    open handle), and always the root.  The table holds no names: the
    workspace's renames, hard links (one node under several names) and unlinks
    of nodes the kernel still holds change a node's names, never its number or
    its count."""

    def __init__(self, root, held: Callable[[object], bool] | None = None):
        root.ino = ROOT_INODE
        self.root = root
        self._held = held
        self._next = ROOT_INODE + 1
        self._by_ino: dict[int, object] = {ROOT_INODE: root}

    def __len__(self) -> int:
        return len(self._by_ino)

    def __contains__(self, ino: int) -> bool:
        return ino in self._by_ino

    def nodes(self) -> list:
        """The node objects in the table."""
        return list(self._by_ino.values())

    def get(self, ino: int):
        node = self._by_ino.get(ino)
        if node is None:
            raise StaleInodeError(f"inode {ino} is not known (forgotten or never handed out)")
        return node

    def new_number(self) -> int:
        """A number never handed out before (its node enters the table at ``remember``)."""
        ino = self._next
        self._next += 1
        return ino

    def remember(self, node, n: int = 1) -> None:
        """The kernel took ``n`` references (0: something else holds the node, see ``held``)."""
        node.lookups += n
        self._by_ino[node.ino] = node

    def discard(self, node) -> bool:
        """Drop a node the kernel does not hold (a refused readdir entry, a workspace node
        unlinked and closed); whether it left (or was not in the table)."""
        if node.lookups <= 0 and node is not self.root and not (self._held is not None and self._held(node)):
            self._remove(node)
            return True
        return False

    def forget(self, ino: int, n: int):
        """The kernel dropped ``n`` references; the node if that made it leave the table."""
        node = self._by_ino.get(ino)
        if node is None:
            return None
        node.lookups -= n
        return node if self.discard(node) else None

    def _remove(self, node) -> None:
        self._by_ino.pop(node.ino, None)


class TreeInodeTable(InodeTable):
    """The read-only core's table: nodes keyed by (parent inode, name, identity),
    found or made by ``ensure``, and the blocks of numbers of commit directories'
    files and symlinks (module docstring).

    ``make_child(block, pos)``: the node of a block's entry, made for a
    request (the file system reads the entry from the directory's tree)."""

    def __init__(self, root: Node, make_child: Callable[[ChildBlock, int], Node] | None = None):
        super().__init__(root)
        root.parent = ROOT_INODE
        #: parent inode -> {name: node}: one dict per directory with known children.
        self._children: dict[int, dict[str, Node]] = {}
        self._make_child = make_child
        #: Directory inode -> the block of its entries; the blocks by base, in order, a
        #: dropped one None (``_dead`` of them) until ``_drop_block`` compacts the lists.
        self._blocks: dict[int, ChildBlock] = {}
        self._bases: list[int] = []
        self._block_list: list[ChildBlock | None] = []
        self._dead = 0
        self._tally = [0]  # entries the kernel holds in all blocks (ChildBlock.tally)
        #: References to block entries counted outside (fuse/fastpath.py: LOOKUPs answered by
        #: the C module from published listings): an object whose ``take()`` returns the ones
        #: not counted here yet, as (directory inode, block base, position, kind code, size),
        #: or None, and ``dropped(directory inode)`` is told when a block leaves.  They are
        #: taken (``sync``) before anything here forgets, drops or resolves a block's number,
        #: so a count is never missing when the kernel forgets or names it.
        self.external = None
        #: External references whose block was gone when taken (a bug if ever non-zero).
        self.external_lost = 0

    def sync(self) -> None:
        """Count the references ``external`` took meanwhile (see there)."""
        ext = self.external
        if ext is None:
            return
        taken = ext.take()
        if not taken:
            return
        blocks = self._blocks
        for dir_ino, base, pos, code, size in taken:
            b = blocks.get(dir_ino)
            if b is None or b.base != base or pos >= b.count:
                self.external_lost += 1
                continue
            b.remember(pos, code, size)

    def __len__(self) -> int:
        self.sync()
        return len(self._by_ino) + self._tally[0]

    def __contains__(self, ino: int) -> bool:
        if ino in self._by_ino:
            return True
        self.sync()
        return self.locate(ino) is not None

    def get(self, ino: int) -> Node:
        node = self._by_ino.get(ino)
        if node is None:
            self.sync()
            found = self.locate(ino)
            if found is None or self._make_child is None:
                raise StaleInodeError(f"inode {ino} is not known (forgotten or never handed out)")
            node = self._make_child(*found)
        return node

    # --- blocks: the files and symlinks of commit directories -------------------------
    def block(self, dir: Node, count: int) -> ChildBlock:
        """The block of directory node ``dir``'s ``count`` entries, reserved if new."""
        b = self._blocks.get(dir.ino)
        if b is None:
            b = self._blocks[dir.ino] = ChildBlock(self._next, count, dir, self._tally)
            self._next += max(count, 1)
            self._bases.append(b.base)  # numbers only grow: the list stays sorted
            self._block_list.append(b)
        return b

    def locate(self, ino: int) -> tuple[ChildBlock, int] | None:
        """(block, position) of a block entry the kernel holds, or None."""
        i = bisect.bisect_right(self._bases, ino) - 1
        if i < 0:
            return None
        b = self._block_list[i]
        if b is None:  # a dropped block's number (numbers are never reused)
            return None
        pos = ino - b.base
        return (b, pos) if pos < b.count and b.held(pos) else None


    def discard_block(self, b: ChildBlock) -> None:
        """Drop a block none of whose entries the kernel holds (a refused readdir entry)."""
        if not b.live:
            self.sync()
            if not b.live:
                self._drop_block(b)

    def _drop_block(self, b: ChildBlock) -> None:
        if self._blocks.get(b.dir.ino) is b:
            del self._blocks[b.dir.ino]
            if self.external is not None:
                self.external.dropped(b.dir.ino)
        # A forget storm (the kernel dropping what an ``ls -R`` gave it) drops blocks
        # by the thousand on the event loop: a drop leaves a tombstone, O(log n), and
        # the lists are compacted once most of them are dead (amortised O(1) a drop).
        bases, blocks = self._bases, self._block_list
        i = bisect.bisect_left(bases, b.base)
        if i < len(bases) and blocks[i] is b:
            blocks[i] = None
            self._dead += 1
            while blocks and blocks[-1] is None:  # the newest block, most often
                blocks.pop()
                bases.pop()
                self._dead -= 1
            if self._dead > 16 and 2 * self._dead > len(blocks):
                keep = [j for j, x in enumerate(blocks) if x is not None]
                self._bases = [bases[j] for j in keep]
                self._block_list = [blocks[j] for j in keep]
                self._dead = 0

    def ensure(self, parent: Node, name: str, identity: tuple, make: Callable[[], Node]) -> Node:
        """The node under ``parent`` with this name and identity, created if new.

        A new node starts with lookup count 0: the caller must either count
        the kernel's reference (``remember``) or ``discard`` it, before any
        other task runs (no await in between).  A new node under a name whose
        node has another identity (a branch that moved) takes the name; the
        old node lives on for whoever holds it, until forgotten."""
        children = self._children.get(parent.ino)
        node = children.get(name) if children is not None else None
        if node is None or node.identity() != identity:
            node = make()
            node.ino = self.new_number()
            node.parent = parent.ino
            if name != node.name or identity != node.identity():
                node._name, node._identity = name, identity  # a ref's view root, a ref directory
            self._by_ino[node.ino] = node
            if children is None:
                children = self._children[parent.ino] = {}
            children[name] = node
        return node

    def known(self, parent: Node, name: str, identity: tuple) -> Node | None:
        """The node ``ensure`` would return, if it is in the table already (else None: nothing made)."""
        children = self._children.get(parent.ino)
        node = children.get(name) if children is not None else None
        return node if node is not None and node.identity() == identity else None

    def remember(self, node: Node, n: int = 1) -> None:
        node.lookups += n  # ``ensure`` put it in the table

    def forget(self, ino: int, n: int):
        node = self._by_ino.get(ino)
        if node is None:
            self.sync()
            found = self.locate(ino)
            if found is not None:
                b, pos = found
                b.forget(pos, n)
                if not b.live:
                    self._drop_block(b)
            return None
        return super().forget(ino, n)

    def _remove(self, node: Node) -> None:
        self._by_ino.pop(node.ino, None)
        children = self._children.get(node.parent)
        if children is not None and children.get(node.name) is node:
            del children[node.name]
            if not children:
                del self._children[node.parent]
