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

The counting and numbering (``InodeTable``) is the workspace's too
(vfs/wstree.py), whose nodes are identified by the object rather than by a
key (a rename moves the object); the key lookup is the read-only core's
(``TreeInodeTable``).  ``NodeKind`` names what a node is, for both.

Nodes are plain data, and small: the kernel may hold millions of inodes, and
the daemon must keep a node for each until the kernel forgets it.  A node
inside a commit keeps its inode number, its parent's, its lookup count, its
View and its TreeEntry (shared with the decoded tree while that is cached),
nothing else: its name is the entry's, its identity is computed from the
entry, and its timeouts are its View's.  The table finds a child by name in
one dict per parent directory (no key tuple per node).  What nodes show
(attributes, extended attributes) is computed from the immutable TreeEntry
and the View (commit) they belong to.
"""

from __future__ import annotations

import stat
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


class FileNode(ViewNode):
    #: ``opened``: some handle has been opened on this node.  The kernel keeps a
    #: file's pages for as long as it keeps the inode (and this node), so only
    #: a first open is worth reading ahead for (vfs/core.py, FileSystem.open).
    __slots__ = ("opened",)

    def __init__(self, view: View, entry: TreeEntry):
        super().__init__(view, entry)
        self.opened = False

    @property
    def mode(self) -> int:
        return EXEC_MODE if self.entry.kind is Kind.EXEC else FILE_MODE

    @property
    def size(self) -> int:
        return self.entry.size


class SymlinkNode(ViewNode):
    __slots__ = ()

    @property
    def mode(self) -> int:
        return SYMLINK_MODE

    @property
    def size(self) -> int:
        return len(self.entry.target)


def node_for_entry(view: View, entry: TreeEntry) -> ViewNode:
    """The node showing one entry of a commit's tree."""
    if entry.kind is Kind.DIR:
        return TreeDir(view, entry)
    if entry.kind is Kind.SYMLINK:
        return SymlinkNode(view, entry)
    return FileNode(view, entry)


def entry_identity(entry: TreeEntry) -> tuple:
    return (entry.kind.value, entry.id)


class InodeTable:
    """Inode numbers <-> nodes, with the kernel's lookup counts: the one table of
    both mounts (the read-only core's, ``TreeInodeTable``, and the workspace's).

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
        return list(self._by_ino.values())

    def get(self, ino: int):
        node = self._by_ino.get(ino)
        if node is None:
            raise StaleInodeError(f"inode {ino} is not known (forgotten or never handed out)")
        return node

    def new_number(self) -> int:
        """A number never handed out before (the node enters the table at ``remember``)."""
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
    """The read-only core's table: nodes keyed by (parent inode, name, identity)
    (the module docstring), found or made by ``ensure``."""

    def __init__(self, root: Node):
        super().__init__(root)
        root.parent = ROOT_INODE
        #: parent inode -> {name: node}: one dict per directory with known children.
        self._children: dict[int, dict[str, Node]] = {}

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

    def _remove(self, node: Node) -> None:
        self._by_ino.pop(node.ino, None)
        children = self._children.get(node.parent)
        if children is not None and children.get(node.name) is node:
            del children[node.name]
            if not children:
                del self._children[node.parent]
