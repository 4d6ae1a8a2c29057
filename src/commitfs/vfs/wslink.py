"""Hard links of a workspace (vfs/workspace.py): one node, several names.

A node has one overlay row (vfs/overlay.py, ``nodes``) holding its first
name and everything else (kind, data file, mode, owner, times); each further
name is a row of ``links`` and a ``WLink`` in ``node.links``.  Every name is
an entry of its directory's ``children`` pointing at the same ``WNode``, so a
lookup, a read, a write or a chmod through any name reaches one node: one
inode number, one data file, one set of attributes, ``st_nlink`` the number
of names.  Directories cannot be linked (EPERM, as on ext4).

Removing a name (unlink, a rename over it, a reset of its path) deletes its
link row; removing the name the node row holds while links remain moves the
oldest link's name into the node row and deletes that link, in one
transaction.  So a node has a row exactly as long as it has a name, and it
leaves the tree (its bytes kept for whoever has it open) with its last name.
Renaming a name updates the row that holds it.

A commit records what the format holds: each name is an entry, so a hard
link becomes two entries with one content id (stored once).  After the
commit the workspace shows the new commit, where the names are separate
files: ``_unlink_extra_names`` drops the extra names from memory when the
overlay is cleared (``Overlay.clear`` drops their rows).

Each ``_*_rows`` method writes rows (call it inside ``overlay.batch()``) and
returns the in-memory change, applied once the transaction committed: the
rule of vfs/workspace.py, rows before memory.
"""

from __future__ import annotations

from collections.abc import Callable

from commitfs.vfs.overlay import Link
from commitfs.vfs.wstree import WLink, WNode, _now


class LinkNames:
    """Hard links of WorkspaceFS (a mixin: the state lives there)."""

    def _add_link(self, n: WNode, d: WNode, name: str) -> None:
        """Give persisted node ``n`` the new name ``name`` in materialized directory ``d``."""
        link = WLink(self.overlay.new_id(), d, name)
        self.overlay.insert_link(Link(link.id, d.oid, name, n.oid))
        if n.links is None:
            n.links = []
        n.links.append(link)
        d.children[name] = n
        n.ctime_ns = _now()  # a link is a status change of the node, as on ext4
        self._dirtied(n)
        self._touch(d, name)
        # Its first name too: a rebase or reset finds the nodes of several names among the
        # marked names (vfs/wscommit.py, _survey), and the first may be unmarked since the
        # last commit.
        self._mark(n.parent, n.name)

    def _drop_name_rows(self, d: WNode, name: str, n: WNode) -> Callable[[], None]:
        """Remove one of several names of ``n`` (``name`` in ``d``): rows now, memory later."""
        assert n.links
        if n.parent is d and n.name == name:
            first = n.links[0]
            self.overlay.update(n.oid, parent=first.parent.oid, name=first.name)
            self.overlay.delete_links([first.id])

            def apply() -> None:
                n.links.pop(0)
                n.parent, n.name = first.parent, first.name
                done()
        else:
            link = self._link_named(n, d, name)
            self.overlay.delete_links([link.id])

            def apply() -> None:
                n.links.remove(link)
                done()

        def done() -> None:
            if not n.links:
                n.links = None
            del d.children[name]
            n.ctime_ns = _now()
            self._dirtied(n)
            self._touch(d, name)
        return apply

    def _move_name_rows(self, n: WNode, src: WNode, old: str, dst: WNode, new: str) -> Callable[[], None]:
        """Rename ``old`` in ``src``, a name of ``n``, to ``new`` in ``dst``: rows now, memory later."""
        if n.parent is src and n.name == old:
            self.overlay.update(n.oid, parent=dst.oid, name=new)

            def apply() -> None:
                n.name, n.parent = new, dst
        else:
            link = self._link_named(n, src, old)
            self.overlay.update_link(link.id, dst.oid, new)

            def apply() -> None:
                link.parent, link.name = dst, new
        return apply

    @staticmethod
    def _link_named(n: WNode, d: WNode, name: str) -> WLink:
        for link in n.links or ():
            if link.parent is d and link.name == name:
                return link
        raise AssertionError(f"{name} in {d.path()!r} is not a name of node {n.ino}")

    def _unlink_linked_below(self, d: WNode) -> None:
        """Before a directory's subtree goes: take out the names of hard-linked nodes
        below it one by one, so a node also named outside the subtree keeps that name."""
        for name, c in list((d.children or {}).items()):
            if c.is_dir:
                self._unlink_linked_below(c)
            elif c.links:
                with self.overlay.batch():
                    apply = self._drop_name_rows(d, name, c)
                apply()

    def _unlink_extra_names(self, nodes: list[WNode]) -> list[int]:
        """The overlay was cleared: forget every name but the first of each of ``nodes``
        (the hard-linked ones: the new commit holds the names as separate files); return
        the nodes changed."""
        changed: list[int] = []
        for c in nodes:
            if c.is_dir or not c.links:
                continue
            for link in c.links:
                if link.parent.children is not None and link.parent.children.get(link.name) is c:
                    del link.parent.children[link.name]
            c.links = None
            changed.append(c.ino)
        return changed
