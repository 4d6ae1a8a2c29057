"""The node tree of a writable workspace (vfs/workspace.py): nodes, their kinds, lookup.

A node's identity is the object, not its path (a rename moves the object, so
the inode number the kernel holds stays right).  A directory is either
materialized (``children``, backed by overlay rows) or lazy (its listing is
its origin tree; nodes looked up in it are cached in ``lazy``).  Inode numbers
and lookup counts are the read-only core's inode table (vfs/inode.py,
``InodeTable``): a node is in it while the kernel holds a lookup on it or a
handle is open on it, and leaves when the kernel forgets it; a node with a row
stays in the tree (under the same number when the kernel meets it again), a
lazy one leaves its directory's cache too.  A node's number is given when the
node is made and lasts for the mount's life (not across a remount).

A node's kind is vfs/inode.py's ``NodeKind``, the model's Kind seen by a mount
(an executable file is a ``FILE`` with an executable mode; ``SPECIAL`` is a
FIFO, socket or device node, whose mode holds its type bits).
"""

from __future__ import annotations

import logging
import os
from operator import attrgetter, countOf
import stat
import time

from commitfs.errors import NotADirectoryError_, PathNotFoundError
from commitfs.model.objects import Kind, Tree, TreeEntry
from commitfs.vfs import prefetch
from commitfs.vfs.errors import InvalidArgumentError, NameTooLongError
from commitfs.vfs.inode import PREFERRED_IO_SIZE, Attr, NodeKind
from commitfs.vfs.overlay import Row
from commitfs.vfs.wscow import Cow

log = logging.getLogger(__name__)


_ABSENT = object()

#: The longest name ext4 (and Linux's NAME_MAX) allows, in bytes.
NAME_MAX = 255


def _now() -> int:
    return time.time_ns()



class WLink:
    """One more name of a hard-linked node: ``name`` in directory ``parent`` (overlay row ``id``
    of the ``links`` table)."""
    __slots__ = ("id", "parent", "name")

    def __init__(self, id_: int, parent: WNode, name: str):
        self.id = id_
        self.parent = parent
        self.name = name


_KIND = attrgetter("kind")


class Kids(dict):
    """A materialized directory's listing, name -> WNode, that keeps the number of its
    subdirectories (``dirs``) as names come and go: the directory's st_nlink is two more,
    as on ext4, without a pass over a large listing at every stat.  Only item assignment
    and deletion change it (the workspace uses nothing else)."""
    __slots__ = ("dirs",)

    def __init__(self, items=()):
        super().__init__(items)
        self.dirs = countOf(map(_KIND, self.values()), NodeKind.DIR) if self else 0  # C loops

    def __setitem__(self, name: str, n: WNode) -> None:
        old = self.get(name)
        if old is not None and old.kind is NodeKind.DIR:
            self.dirs -= 1
        if n.kind is NodeKind.DIR:
            self.dirs += 1
        super().__setitem__(name, n)

    def __delitem__(self, name: str) -> None:
        if self[name].kind is NodeKind.DIR:
            self.dirs -= 1
        super().__delitem__(name)

    def _unsupported(self, *args, **kwargs):
        raise TypeError("Kids changes by item assignment and deletion only (they keep its count)")

    pop = popitem = clear = update = setdefault = _unsupported


class WNode:
    __slots__ = ("ino", "oid", "parent", "name", "kind", "origin", "children", "lazy", "upper", "size", "mode",
                 "mtime_ns", "target", "lookups", "opens", "fd", "dirty", "uid", "gid", "atime_ns",
                 "ctime_ns", "rdev", "cow", "links", "nsub")

    def __init__(self, ino: int, kind: NodeKind, name: str, parent: WNode | None):
        self.ino = ino
        self.oid: int | None = None  # overlay row id
        self.parent = parent
        self.name = name
        self.kind = kind
        self.origin: TreeEntry | None = None
        self.children: Kids | None = None  # materialized listing
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
        # Owner and the other two times: None shows the mount's user and the mtime.
        self.uid: int | None = None
        self.gid: int | None = None
        self.atime_ns: int | None = None
        self.ctime_ns: int | None = None
        self.rdev = 0  # a special file's device number
        #: A committed file written in place: where its bytes come from (vfs/wscow.py);
        #: None: the data file (if ``upper``) holds them all, else the origin.
        self.cow: Cow | None = None
        # Hard links: the node's names besides (parent, name), oldest first (vfs/wslink.py).
        self.links: list[WLink] | None = None
        # A lazy directory's subdirectories, once counted: (origin tree id, count) (st_nlink).
        self.nsub: tuple[bytes, int] | None = None

    @property
    def is_dir(self) -> bool:
        return self.kind is NodeKind.DIR

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
                   self.target if self.kind is NodeKind.SYMLINK else None, self.uid, self.gid, self.atime_ns,
                   self.ctime_ns, self.rdev if self.kind is NodeKind.SPECIAL else None,
                   cow_base=self.cow.base if self.cow is not None else None,
                   cow_until=self.cow.until if self.cow is not None else None)


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




class NodeTree:
    """The node tree of WorkspaceFS (a mixin: the state lives there; its inode table is
    ``self.table``, vfs/inode.py's)."""

    def _new(self, kind: NodeKind, name: str, parent: WNode | None) -> WNode:
        return WNode(self.table.new_number(), kind, name, parent)

    def _from_entry(self, parent: WNode, e: TreeEntry) -> WNode:
        n = self._new(NodeKind.of(e.kind), e.name, parent)
        n.origin = e
        n.size = e.size
        n.mode = _mode_of(e)
        n.mtime_ns = self.base_time_ns
        n.target = e.target
        return n

    # --- what changed since the last commit or reset ---------------------------------------
    # Kept as edits happen, so a commit, status or flush visits what changed, not the
    # whole tree: ``self._marks`` maps a directory to the names in it whose entry may
    # differ from its origin's (None: any name, after a remount), ``self._unflushed``
    # holds the nodes whose times or written ranges may be unwritten (``dirty``).  Both
    # may name more than changed (a name edited back, a node gone since): whoever
    # reads them checks each; a change left out of them would be lost from a commit.
    def _mark(self, d: WNode, *names: str) -> None:
        """The entries ``names`` of directory ``d`` may have changed."""
        marks = self._marks
        if d in marks:
            got = marks[d]
            if got is not None:
                got.update(names)
        else:
            marks[d] = set(names)

    def _mark_node(self, n: WNode) -> None:
        """Node ``n`` itself changed (its bytes, mode or kind): each of its names."""
        if n.parent is not None:
            self._mark(n.parent, n.name)
        for link in n.links or ():
            self._mark(link.parent, link.name)

    def _dirtied(self, n: WNode) -> None:
        """``n`` has times (or written ranges) to write at the next flush."""
        n.dirty = True
        self._unflushed.add(n)

    def _marked_paths(self, top: WNode) -> dict[WNode, set[str] | None]:
        """The directories at and below ``top`` to visit for what changed: each marked one
        with its marked names (None: all), and each directory above one with the names
        leading down to it.  Marks on nodes no longer in the tree below ``top`` (every
        step up is checked: the parent still holds the node under its name) are left out."""
        out: dict[WNode, set[str] | None] = {}
        for d, names in self._marks.items():
            if not self._below(d, top):
                continue
            if d in out:
                got = out[d]
                if got is not None:
                    if names is None:
                        out[d] = None
                    else:
                        got.update(names)
            else:
                out[d] = None if names is None else set(names)
            n = d
            while n is not top:
                p = n.parent
                got = out.get(p, _ABSENT)
                if got is _ABSENT:
                    out[p] = {n.name}
                elif got is not None:
                    if n.name in got:
                        break  # the rest of the way up is there already
                    got.add(n.name)
                n = p
        return out

    @staticmethod
    def _held_by(p: WNode, name: str, n: WNode) -> bool:
        """Whether directory ``p`` holds ``n`` under ``name`` (materialized or looked up)."""
        kids = p.children if p.children is not None else p.lazy
        return kids.get(name) is n

    def _below(self, n: WNode, top: WNode) -> bool:
        """Whether ``n`` is ``top`` or in the tree below it (by its first name)."""
        while n is not top:
            p = n.parent
            if p is None or not self._held_by(p, n.name, n):
                return False
            n = p
        return True

    # --- nodes ---------------------------------------------------------------------------
    def _node(self, ino: int) -> WNode:
        return self.table.get(ino)

    def _dir(self, ino: int) -> WNode:
        n = self._node(ino)
        if not n.is_dir:
            raise NotADirectoryError_(f"inode {ino} is not a directory")
        return n

    def attr(self, n: WNode) -> Attr:
        if n.kind is NodeKind.DIR:
            mode, size = stat.S_IFDIR | n.mode, 0
        elif n.kind is NodeKind.SYMLINK:
            mode, size = stat.S_IFLNK | 0o777, len(n.target)
        elif n.kind is NodeKind.SPECIAL:
            mode, size = n.mode, 0
        else:
            mode, size = stat.S_IFREG | n.mode, n.size
        # st_nlink: 0 once unlinked (still open), as on ext4; a directory's 2 and one for each
        # subdirectory (its ".."), as on ext4, where known (_count_subdirs; else 1, "unknown",
        # as btrfs shows for every directory); else its names.
        if n.parent is None and n is not self.root:
            nlink = 0
        elif n.kind is NodeKind.DIR:
            if n.children is not None:
                nlink = 2 + n.children.dirs
            else:
                sub = n.nsub
                nlink = 2 + sub[1] if sub is not None and sub[0] == n.origin.id else 1
        else:
            nlink = 1 + len(n.links) if n.links else 1
        # A node never given an atime (a base node; the mount is noatime) keeps the base
        # commit's time as its atime, not its mtime: a write or a new entry moves the mtime only.
        atime = n.atime_ns if n.atime_ns is not None else self.base_time_ns
        return Attr(n.ino, mode, size, n.mtime_ns, self._t, self._t, nlink, PREFERRED_IO_SIZE,
                    n.uid, n.gid, atime, n.ctime_ns, n.rdev, self._blocks(n))

    def _blocks(self, n: WNode) -> int | None:
        """st_blocks of a file in the overlay: what its data file really holds (a sparse
        file's holes take none); None (from the size) for the others."""
        try:
            if n.fd is not None:
                return os.fstat(n.fd).st_blocks
            if n.upper is not None:
                return os.stat(self.overlay.data_path(n.upper)).st_blocks
        except OSError:
            pass
        return None

    def _remember(self, n: WNode) -> Attr:
        self.table.remember(n)
        return self.attr(n)

    async def _count_subdirs(self, n: WNode) -> None:
        """Before an answer with ``n``'s attributes goes to the kernel: a lazy directory's
        subdirectories counted from its origin tree (kept on the node, for that tree), so its
        st_nlink is exact.  A directory stored split (model/splittree.py, 100k entries and
        more) is not counted, which would read every chunk: it shows 1, "unknown"."""
        if n.kind is not NodeKind.DIR or n.children is not None or n.origin is None:
            return
        tid = n.origin.id
        if n.nsub is not None and n.nsub[0] == tid:
            return
        tree = await self.loader.tree(tid)
        if isinstance(tree, Tree) and n.children is None and n.origin is not None and n.origin.id == tid:
            n.nsub = (tid, tree.subdirs)

    @staticmethod
    def _name(name: bytes) -> str:
        if len(name) > NAME_MAX:  # no such name can exist: ENAMETOOLONG, as ext4's lookup answers
            raise NameTooLongError(f"{name[:40]!r}...: a name is at most {NAME_MAX} bytes")
        try:
            text = name.decode()
        except UnicodeDecodeError:
            raise PathNotFoundError(f"{name!r}: no such entry (names are UTF-8)") from None
        return text

    @staticmethod
    def _new_name(name: bytes) -> str:
        if len(name) > NAME_MAX:
            raise NameTooLongError(f"{name[:40]!r}...: a name is at most {NAME_MAX} bytes")
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
        e = await self.loader.tree_get(tree, name)
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
        return [(e.name, e) for e in await self.loader.tree_entries(tree)]

    async def _is_empty(self, d: WNode) -> bool:
        if d.children is not None:
            return not d.children
        return not (await self.loader.tree(d.origin.id)).count

    def _maybe_drop(self, n: WNode) -> None:
        """Forget a lazy node the kernel no longer knows (and lazy ancestors left unused):
        out of the table and out of its directory's cache, so memory follows what the
        kernel holds."""
        while (n is not None and n.oid is None and not n.lazy and n.children is None
               and self.table.discard(n)):
            p = n.parent
            if p is None or p.lazy.get(n.name) is not n:
                return
            del p.lazy[n.name]
            n = p if p.ino not in self.table else None

