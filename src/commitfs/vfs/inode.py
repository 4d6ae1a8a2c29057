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

Nodes are plain data.  What they show (attributes, extended attributes) is
computed from the immutable TreeEntry and the View (commit) they belong to.
"""

from __future__ import annotations

import stat
from collections.abc import Callable
from dataclasses import dataclass

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


@dataclass(frozen=True, slots=True)
class View:
    """One commit as shown under a mount: everything below it is immutable."""

    commit_id: bytes
    tree_id: bytes
    time_ns: int


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

    __slots__ = ("ino", "parent", "key", "lookups", "entry_timeout", "attr_timeout")
    is_dir = False

    def __init__(self, entry_timeout: float, attr_timeout: float):
        self.ino = 0
        self.parent = 0
        self.key: tuple = ()
        self.lookups = 0
        self.entry_timeout = entry_timeout
        self.attr_timeout = attr_timeout

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


class RootDir(DirNode):
    """The root of a mount without REV: branches/, tags/, commits/."""

    __slots__ = ()


class RefDir(DirNode):
    """``branches/``, ``tags/`` or ``aliases/``, or a namespace below them (``branches/team/``)."""

    __slots__ = ("kind", "prefix")

    def __init__(self, kind: str, prefix: str, entry_timeout: float, attr_timeout: float):
        super().__init__(entry_timeout, attr_timeout)
        self.kind = kind  # "branches", "tags" or "aliases"
        self.prefix = prefix  # "" or "team/"


class CommitsDir(DirNode):
    """``commits/``: lists branch and tag tips, resolves any (prefix of a) commit id."""

    __slots__ = ()


class ViewNode(Node):
    """A node inside a commit: immutable, described by its tree entry."""

    __slots__ = ("view", "entry")

    def __init__(self, view: View, entry: TreeEntry, entry_timeout: float, attr_timeout: float):
        super().__init__(entry_timeout, attr_timeout)
        self.view = view
        self.entry = entry

    def mtime_ns(self, mount_time_ns: int) -> int:
        return self.view.time_ns

    def xattrs(self) -> dict[str, bytes]:
        return {XATTR_COMMIT: self.view.commit_id.hex().encode(), XATTR_ID: self.entry.id.hex().encode()}


class TreeDir(ViewNode, DirNode):
    """A directory of a commit (a view's root has an entry named '')."""

    __slots__ = ()


class FileNode(ViewNode):
    #: ``opened``: some handle has been opened on this node.  The kernel keeps a
    #: file's pages for as long as it keeps the inode (and this node), so only
    #: a first open is worth reading ahead for (vfs/core.py, FileSystem.open).
    __slots__ = ("opened",)

    def __init__(self, view: View, entry: TreeEntry, entry_timeout: float, attr_timeout: float):
        super().__init__(view, entry, entry_timeout, attr_timeout)
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


def node_for_entry(view: View, entry: TreeEntry, timeout: float) -> ViewNode:
    """The node showing one entry of a commit's tree."""
    if entry.kind is Kind.DIR:
        return TreeDir(view, entry, timeout, timeout)
    if entry.kind is Kind.SYMLINK:
        return SymlinkNode(view, entry, timeout, timeout)
    return FileNode(view, entry, timeout, timeout)


def entry_identity(entry: TreeEntry) -> tuple:
    return (entry.kind.value, entry.id)


class InodeTable:
    """Inode numbers <-> nodes, with the kernel's lookup counts."""

    def __init__(self, root: Node):
        root.ino = ROOT_INODE
        root.parent = ROOT_INODE
        root.key = ("root",)
        self.root = root
        self._next = ROOT_INODE + 1
        self._by_ino: dict[int, Node] = {ROOT_INODE: root}
        self._by_key: dict[tuple, Node] = {root.key: root}

    def __len__(self) -> int:
        return len(self._by_ino)

    def __contains__(self, ino: int) -> bool:
        return ino in self._by_ino

    def get(self, ino: int) -> Node:
        node = self._by_ino.get(ino)
        if node is None:
            raise StaleInodeError(f"inode {ino} is not known (forgotten or never handed out)")
        return node

    def ensure(self, parent: Node, name: str, identity: tuple, make: Callable[[], Node]) -> Node:
        """The node under ``parent`` with this name and identity, created if new.

        A new node starts with lookup count 0: the caller must either count
        the kernel's reference (``remember``) or ``discard`` it, before any
        other task runs (no await in between)."""
        key = (parent.ino, name, identity)
        node = self._by_key.get(key)
        if node is None:
            node = make()
            node.ino = self._next
            self._next += 1
            node.parent = parent.ino
            node.key = key
            self._by_ino[node.ino] = node
            self._by_key[key] = node
        return node

    def remember(self, node: Node, n: int = 1) -> None:
        node.lookups += n

    def discard(self, node: Node) -> None:
        """Drop a node the kernel was never told about (a refused readdir entry)."""
        if node.lookups <= 0 and node is not self.root:
            self._remove(node)

    def forget(self, ino: int, n: int) -> None:
        node = self._by_ino.get(ino)
        if node is None:
            return
        node.lookups -= n
        if node.lookups <= 0 and node is not self.root:
            self._remove(node)

    def _remove(self, node: Node) -> None:
        self._by_ino.pop(node.ino, None)
        if self._by_key.get(node.key) is node:
            del self._by_key[node.key]
