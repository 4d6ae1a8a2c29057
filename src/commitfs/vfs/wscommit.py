"""Commit preparation, rebase and crash recovery of a workspace (vfs/workspace.py).

``draft`` snapshots the edits as a Draft (model/draft.py) for the change
engine (the commit is composed in fuse/control.py: vfs does not import ops);
``set_pending`` records the commit id before the branch's compare-and-swap;
``settle``/``reset`` re-base the in-memory tree onto a commit keeping node
objects (so the kernel's inode numbers stay valid); ``resolve_pending``
settles a commit the daemon was killed in (see vfs/overlay.py).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from contextlib import asynccontextmanager

from commitfs.errors import InputError, StorageError
from commitfs.model.draft import Draft, EditedFile, NewFile
from commitfs.model.objects import Commit, Kind, Tree, TreeEntry, symlink_entry
from commitfs.repo.repository import Repository
from commitfs.vfs.inode import NodeKind
from commitfs.vfs.overlay import ROOT_ID, Overlay, Row
from commitfs.vfs.wstree import Kids, WNode, _mode_of, _now

log = logging.getLogger(__name__)

#: How far back from the branch head ``resolve_pending`` looks for an interrupted commit.
_PENDING_SEARCH = 100_000


# --- the snapshot of an overlay ----------------------------------------------------------
def _draft(node: WNode, data_path: Callable[[str], str],
           tree_cached: Callable[[bytes], object] | None = None,
           visit: dict[WNode, set[str] | None] | None = None) -> Draft | None:
    """The edited tree as the change engine sees it (taken under the lock): a Draft per
    materialized directory, the origin TreeEntry of everything untouched (never opened),
    a NewFile per new file, an EditedFile per committed file written in place; None
    for a lazy (untouched) root.

    A directory whose origin tree ``tree_cached`` still holds (decoded, plain) is a
    Draft over it holding only the names whose entry differs (a None for a name gone),
    so the change engine's work follows the edits, not the directory's size; a
    directory edited back to its origin is its origin's entry.  Without it, the Draft
    lists every entry.

    ``visit`` (``NodeTree._marked_paths``: the names that may have changed, per
    directory, and the directories above them) limits the walk to those: a directory
    it does not name is its origin's entry, and in one it names, with its origin
    tree cached, only the names it gives are looked at; so a commit after a few
    edits costs the edits, not the tree.  None: every node is looked at."""
    if node.children is None:
        return None
    base = None
    if tree_cached is not None and node.origin is not None and node.origin.kind is Kind.DIR:
        t = tree_cached(node.origin.id)
        if isinstance(t, Tree):
            base = t
    base_get = base.get if base is not None else None
    exec_kind = Kind.EXEC
    out: dict = {}
    children = node.children
    names = None if visit is None else visit.get(node, set())
    if names is None or base is None:
        items = children.items()
    else:
        items = [(name, children[name]) for name in names if name in children]
    for name, c in items:
        o = c.origin
        if (base_get is not None and o is not None and c.upper is None and c.children is None
                and base_get(name) is o):
            # The common case, first and cheap: the base's own entry, untouched (a file
            # keeping its executable bit, a lazy directory, a symlink).
            k = c.kind
            if k is NodeKind.FILE:
                if (o.kind is exec_kind) == bool(c.mode & 0o100):
                    continue
            elif k is not NodeKind.SPECIAL:
                continue
        if c.kind is NodeKind.SPECIAL:
            log.warning("workspace: commit skips the special file %s (FIFO, socket or device: "
                        "a commit holds files, directories and symlinks)", c.path())
            if base_get is not None and base_get(name) is not None:
                out[name] = None  # it replaced a base entry: that one is gone
            continue
        if c.kind is NodeKind.DIR:
            if c.children is None or (visit is not None and c not in visit and c.origin is not None
                                      and c.origin.kind is Kind.DIR):
                side = c.origin  # untouched below (a materialized one: nothing marked in it)
            else:
                side = _draft(c, data_path, tree_cached, visit)
                if isinstance(side, Draft) and side.base is not None and not side.entries:
                    side = c.origin  # materialized, nothing differs: its origin as it is
        elif c.kind is NodeKind.SYMLINK:
            side = symlink_entry(name, c.target)
        elif c.upper is not None and c.cow is not None:
            side = EditedFile(source=data_path(c.upper), executable=bool(c.mode & 0o100), size=c.size,
                              base=c.cow.base, base_until=c.cow.until, ranges=tuple(c.cow.ranges()))
        elif c.upper is not None:
            side = NewFile(source=data_path(c.upper), executable=bool(c.mode & 0o100), size=c.size)
        else:
            # Unchanged bytes: the origin entry itself when the executable bit
            # is unchanged too (the common case; no new object per file).
            o = c.origin
            kind = Kind.EXEC if c.mode & 0o100 else Kind.FILE
            side = o if o.kind is kind else TreeEntry(name, kind, o.size, o.id)
        if base_get is not None and isinstance(side, TreeEntry):
            b = base_get(name)
            if b is side or (b is not None and b.kind is side.kind and b.id == side.id
                             and b.target == side.target):
                continue  # the base's own entry
        out[name] = side
    if base is None:
        return Draft(out)
    if names is None:
        for e in base.entries:
            if e.name not in children:
                out[e.name] = None
    else:  # a name gone was marked when it went
        for name in names:
            if name not in children and base_get(name) is not None:
                out[name] = None
    return Draft(out, node.origin.id, base)


def root_row(repo: Repository, cid: bytes) -> Row:
    """The overlay row of a workspace root showing commit ``cid``."""
    tree = repo.load_commit(cid).tree
    return Row(ROOT_ID, None, "", NodeKind.DIR, TreeEntry("", Kind.DIR, 0, tree), False, None, 0o755, 0, None)


class CommitState:
    """Commit preparation and rebase of WorkspaceFS (a mixin: the state lives there)."""

    @asynccontextmanager
    async def paused(self):
        """Hold off every change (the one lock) with pending metadata written.

        The control channel (fuse/control.py) runs status and commit inside:
        ``draft()`` to snapshot the edits, ``settle(cid)`` once the branch
        reached a commit, ``set_pending`` around the compare-and-swap."""
        async with self._lock:
            await self._flush_pending()
            yield self

    def draft(self) -> Draft | TreeEntry | None:
        """The edits as a Draft over the base commit (call inside ``paused``): None when
        untouched; the root's TreeEntry when it shows another tree than the base's
        (a merge in progress) and nothing was edited below it."""
        if self.root.children is None:
            o = self.root.origin
            return o if o is not None and o.id != self.base_tree else None
        return _draft(self.root, self.overlay.data_path, self.loader.tree_cached, self._marked_paths(self.root))

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
            entry = await self.loader.tree_get(await self.loader.tree(entry.id), name)
        # Walk (and create, if the base has the path) the parents in the workspace.
        d = self.root
        for name in parts[:-1]:
            c = await self._child(d, name)
            if c is None:
                if entry is None:
                    return []
                await self._materialize(d)
                c = self._new(NodeKind.DIR, name, d)
                c.children, c.mode, c.mtime_ns = Kids(), 0o755, _now()
                self._add_child(d, c)
            elif not c.is_dir:
                raise InputError(f"cannot reset {path}: {c.path()} is not a directory in the workspace "
                                 "(reset that path instead)")
            d = c
        name = parts[-1]
        current = await self._child(d, name)
        if current is None and entry is None:
            return []
        if current is not None and entry is not None and await self._untouched(current, entry):
            return []  # untouched: the same node stays (open files, a shell's directory below it)
        await self._materialize(d)
        current = d.children.get(name)
        if entry is not None:
            entry = TreeEntry(name, entry.kind, entry.size, entry.id, entry.target)
        if (current is not None and entry is not None and not current.links
                and current.kind is NodeKind.of(entry.kind)):
            return await self._reset_in_place(d, current, entry)
        # Another kind, or a name of a hard-linked node (its other names keep it): replaced.
        changed = []
        if current is not None:
            changed = self._inos_below(current)
            self._unlink_node(d, name)
        if entry is not None:
            self._add_child(d, self._from_entry(d, entry))
        return changed

    async def _reset_in_place(self, d: WNode, n: WNode, e: TreeEntry) -> list[int]:
        """``reset PATH`` of a node the base has (the same kind, one name): its edits are
        discarded in place, as a reset of everything does, so the node and its inode stay
        (a file open on it reads the base's bytes, a shell inside it stays where it is),
        and so does every node below it the kernel knows and the base has; the others
        the kernel knows leave (open ones keep their bytes).  Inodes whose contents changed."""
        survey = None

        def wanted() -> list[tuple[tuple, list[str]]]:
            nonlocal survey
            survey = self._survey(n)
            return survey[1]
        entries = await self._resolve(e.id, wanted) if n.is_dir else {}  # before any change
        if survey is None:
            survey = self._survey(n)
        keep, _, _, linked = survey
        # A hard-linked node below loses every name inside the path (fresh base nodes take
        # them) and keeps those outside: which of its names would keep it is no rule.
        replace = {id(x) for x in linked}
        if replace:
            self._unlink_linked_below(n)
        ids: list[int] = []
        data: list[str] = []
        self._remove_subtree_rows(n, ids, data)
        row = Row(n.oid, d.oid, n.name, n.kind, e, False, None, _mode_of(e), self.base_time_ns,
                  e.target if n.kind is NodeKind.SYMLINK else None)
        with self.overlay.batch():
            self.overlay.delete(ids)  # its row (and written ranges) too, then the base's
            self.overlay.insert([row])
        invalidate: list[int] = []
        self._rebase_node(n, e, (), entries, invalidate, keep, replace)
        n.oid = row.id
        # Its entry in ``d`` is the base's now, which need not be ``d``'s origin's (a
        # merge in progress shows another tree): a commit looks at it (vfs/wstree.py).
        self._mark(d, n.name)
        for x in survey[2]:  # dropped nodes with a data file (kept ones are rebased or detached)
            if x.fd is not None and x not in keep:
                self._close_fd(x)
        for name in data:
            self.overlay.remove_data(name)
        if data:
            self.overlay.make_reserve()
        return invalidate

    async def _untouched(self, n: WNode, e: TreeEntry) -> bool:
        """Whether ``n`` shows exactly base entry ``e`` (a row made when its directory was
        materialized, for an edit next to it, is no change of its own)."""
        if (n.origin != e or n.kind is not NodeKind.of(e.kind) or n.upper is not None or n.cow is not None or n.links
                or n.dirty or n.mode != _mode_of(e) or n.mtime_ns != self.base_time_ns
                or (n.uid, n.gid, n.atime_ns, n.ctime_ns) != (None, None, None, None)):
            return False
        if not n.is_dir or n.children is None:
            return True
        entries = await self.loader.tree_entries(await self.loader.tree(e.id))
        if sorted(n.children) != sorted(c.name for c in entries):
            return False
        for c in entries:
            if not await self._untouched(n.children[c.name], c):
                return False
        return True

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
        survey = None

        def wanted() -> list[tuple[tuple, list[str]]]:
            nonlocal survey
            survey = self._survey(self.root)
            return survey[1]
        entries = await self._resolve(shown, wanted)
        keep, _, old_data, linked = survey
        for n in old_data:
            if n.opens > 0 and n.fd is None:  # keep its bytes for whoever has it open
                n.fd = self.overlay.open_data(n.upper)
        # The root shows a directory's mode as the commit gives it (_rebase_node), and
        # its row says the same: a chmod of the root is an edit, which this clears.
        root_entry = TreeEntry("", Kind.DIR, 0, shown)
        root_row = Row(ROOT_ID, None, "", NodeKind.DIR, root_entry, False, None, _mode_of(root_entry), 0, None)
        # The one atomic step: its transaction here, so nothing runs between the survey
        # and the changes below; the WAL's fsync and the data files' removal after
        # them, in a worker thread (_finish_clear).
        below = self.overlay.clear(cid, root_row, merge, finish=False)
        self._marks = {}  # nothing differs from the new base now (marks from here on are new edits)
        invalidate: list[int] = self._unlink_extra_names(linked)  # hard links: names apart now
        self.base = cid
        self.base_tree = commit.tree
        self.base_time_ns = commit.time * 1_000_000_000
        self._rebase_node(self.root, root_row.origin, (), entries, invalidate, keep)
        self.root.oid = ROOT_ID
        for n in old_data:
            if n.fd is not None and n.parent is not None:
                self._close_fd(n)
        await self._finish_clear(below)
        return invalidate

    async def _finish_clear(self, below: int) -> None:
        """``Overlay.finish_clear`` in a worker thread under the loader's limiter and I/O
        timeout (the caller holds the lock: no file is created meanwhile).  A disk error
        or timeout there is logged, not raised: the clear is committed (it survives a
        killed daemon), the in-memory tree already shows it, and for a commit the
        pending id recorded before the branch moved settles it again after a power
        loss (resolve_pending); a data file left behind is removed at the next open."""
        try:
            await self.loader.io("fsync of the cleared workspace overlay", self.overlay.finish_clear, below)
        except (OSError, StorageError) as exc:
            log.warning("workspace %s: the cleared overlay is not yet synced to disk: %s", self.overlay.path, exc)

    def _survey(self, top: WNode) -> tuple[set[WNode], list[tuple[tuple, list[str]]], list[WNode], list[WNode]]:
        """What a rebase at and below ``top`` needs, from the marks and the inode table (not
        a walk of the tree: its cost follows the edits and what the kernel holds): (the nodes that stay in a
        rebase, the names to look up in the new tree: [(path below top, names)], the nodes
        with a data file, the nodes with more than one name).

        Only nodes the kernel knows (it holds a lookup or an open file, or an open
        directory handle's listing still hands them out), and the directories above
        them, stay: every other node (most of a materialized directory's) is made again
        from the new tree when looked up, so a rebase costs what the kernel holds, not
        what was materialized."""
        known = set(self.table.nodes())
        known.update(item for h in self._dirs.values() for _, item in h.items if isinstance(item, WNode))
        # Not a walk of the tree: the nodes with a data file or more than one name are
        # among the marked names (each was marked when it got either: vfs/wstree.py),
        # the kept ones are those the kernel knows, each with the directories above it.
        old_data: list[WNode] = []
        linked: list[WNode] = []
        seen: set[int] = set()
        for d, names in self._marks.items():
            kids = d.children if d.children is not None else d.lazy
            if not kids or not self._below(d, top):
                continue
            for name in (list(kids) if names is None else names):
                c = kids.get(name)
                if c is None or (c.upper is None and not c.links) or id(c) in seen:
                    continue
                seen.add(id(c))
                if c.upper is not None:
                    old_data.append(c)
                if c.links:
                    linked.append(c)
        keep: set[WNode] = {top}
        names_in: dict[WNode, list[str]] = {}
        for k in known:
            if k is top:
                continue
            places = [(k.parent, k.name)] + [(link.parent, link.name) for link in k.links or ()]
            for p, name in places:
                if p is None or not self._held_by(p, name, k) or not self._below(p, top):
                    continue
                keep.add(k)
                x, xname = p, name
                while True:
                    got = names_in.get(x)
                    if got is None:
                        names_in[x] = [xname]
                    elif xname in got:
                        break  # the way up from here is there already
                    else:
                        got.append(xname)
                    keep.add(x)
                    if x is top:
                        break
                    x, xname = x.parent, x.name
        parts_of: dict[WNode, tuple] = {top: ()}

        def parts(x: WNode) -> tuple:
            got = parts_of.get(x)
            if got is None:
                got = parts_of[x] = parts(x.parent) + (x.name,)
            return got
        wanted = [(parts(x), names) for x, names in names_in.items()]
        return keep, wanted, old_data, linked

    async def _resolve(self, tree_id: bytes, wanted: Callable[[], list[tuple[tuple, list[str]]]]
                       ) -> dict[tuple, dict[str, TreeEntry | None]]:
        """The entries of tree ``tree_id`` (and its subtrees) that ``wanted()`` names:
        {path below the tree: {name: entry or None}}.

        Looked up in a worker thread before anything changes: a split directory's
        ``get`` may load a leaf, which may fail (the overlay and the nodes are then
        left as they were) or be slow.  ``wanted()`` is asked again after each round
        (nodes a lookup made meanwhile), until it names nothing new: so no await
        comes between its last answer and the caller's changes."""
        entries: dict[tuple, dict[str, TreeEntry | None]] = {}
        repo = self.repo

        def load(todo: list[tuple[tuple, list[str]]]) -> dict[tuple, dict[str, TreeEntry | None]]:
            trees: dict[tuple, Tree | None] = {}

            def tree_at(parts: tuple) -> Tree | None:
                if parts in trees:
                    return trees[parts]
                if not parts:
                    t = repo.load_tree(tree_id)
                else:
                    parent = tree_at(parts[:-1])
                    e = parent.get(parts[-1]) if parent is not None else None
                    t = repo.load_tree(e.id) if e is not None and e.is_dir else None
                trees[parts] = t
                return t
            out = {}
            for parts, names in todo:
                t = tree_at(parts)
                out[parts] = {name: t.get(name) if t is not None else None for name in names}
            return out
        while True:
            todo = []
            for parts, names in wanted():
                known = entries.get(parts, {})
                names = [name for name in names if name not in known]
                if names:
                    todo.append((parts, names))
            if not todo:
                return entries
            for parts, found in (await self.loader.io("trees of the new base", load, todo)).items():
                entries.setdefault(parts, {}).update(found)

    def _rebase_node(self, n: WNode, e: TreeEntry, parts: tuple, entries: dict[tuple, dict],
                     invalidate: list[int], keep: set[WNode], replace: set[int] = frozenset()) -> None:
        """Show entry ``e`` at node ``n`` keeping the node object, and below it, each node
        of ``keep`` the new tree has (same name, same kind, not in ``replace``: ids)
        likewise; the other kept ones leave the tree (whoever has one open keeps its
        bytes), the rest is dropped (made again from the new tree when looked up).  In
        memory only (the rows are the caller's); ``entries`` from ``_resolve``; inodes
        whose contents changed are added to ``invalidate``."""
        changed = n.upper is not None or n.origin is None or n.origin.id != e.id or n.kind is not NodeKind.of(e.kind)
        if n.kind is NodeKind.FILE and changed:
            invalidate.append(n.ino)
        if n.upper is not None:
            n.upper = None
            self._close_fd(n)
        n.cow = None
        n.oid = None
        n.origin = e
        n.size = e.size
        n.mode = _mode_of(e)
        n.mtime_ns = self.base_time_ns
        n.target = e.target
        n.dirty = False
        n.uid = n.gid = n.atime_ns = n.ctime_ns = None  # a commit records neither
        if not n.is_dir:
            return
        children, lazy = n.children or {}, n.lazy
        n.children = None
        n.lazy = {}
        below = entries.get(parts, {})
        # Only the names looked up (those of its kept nodes: _survey), not every child:
        # the others, unknown to the kernel, are made again from the new tree (their
        # data files' descriptors are the caller's to close: _survey's old_data).
        for name in below:
            c = children.get(name)
            if c is None:
                c = lazy.get(name)
            if c is None or c not in keep:
                continue
            ce = below.get(name)
            if ce is None or NodeKind.of(ce.kind) is not c.kind or id(c) in replace:
                invalidate.extend(self._inos_below(c))
                self._detach_all(c)
            else:
                n.lazy[name] = c
                self._rebase_node(c, ce, parts + (name,), entries, invalidate, keep, replace)

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
            overlay.clear(pending, root_row(repo, pending))
            return "landed"
        parents = repo.load_commit(cid).parents
        cid = parents[0] if parents else None
        steps += 1
    log.info("workspace: the interrupted commit %s did not reach the branch; the edits stay pending",
             pending.hex())
    overlay.set_pending(None)
    return "dropped"
