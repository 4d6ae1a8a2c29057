"""The change engine: diff, three-way merge and apply, tree to tree.

Every operation that compares or combines trees goes through here: ``diff``
(ops/diff.py), the workspace's status and commit and its rebase onto a moved
branch (ops/changeset.py), and ``merge`` (ops/merge.py).  They all work on
*sides* (model/draft.py): None, a stored TreeEntry, a NewFile, or a Draft (a
directory being edited), and never flatten a tree into a path map.

Cost follows the change, because a stored subtree is named by its id:

* ``iter_changes(old, new)`` yields the top-most paths where two sides
  differ; two directories are opened only when their ids differ.
* ``merge(base, ours, theirs)`` decides a path without opening anything when
  two of the three sides are the same id (ours == theirs: either; base ==
  ours: theirs; base == theirs: ours).  Only a directory changed on both
  sides is opened, so two branches that each changed 100 files of a huge
  tree read the trees on the paths to those files, nothing else.  A file's
  content and its executable bit merge separately.  What is left is a
  ``Conflict`` (kinds below), handed to a resolver (strategy, per-glob rule,
  row-level table merge: ops/merge.py) that returns a side or leaves it.
* ``build(draft)`` stores what a side holds: NewFiles are chunked (an
  EditedFile only around its edits, ops/rechunk.py), Drafts
  become trees, and every TreeEntry keeps its id (nothing below it is read
  or written again).

Conflict kinds: ``modify/modify`` (both changed a file's content, or its
type, differently), ``add/add`` (both added different things at a new path),
``modify/delete`` (ours changed, theirs deleted), ``delete/modify``,
``file/directory`` (a directory on one side, something else on the other),
``symlink`` (two different targets), ``executable`` (the executable bit
disagrees while the content agrees).
"""

from __future__ import annotations

import bisect
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field

from commitfs.errors import InputError
from commitfs.model.draft import Draft, EditedFile, NewFile, Side
from commitfs.model.objects import Kind, Tree, TreeEntry, check_name
from commitfs.model.splittree import SplitTree, TreeIndex, differing_leaves

#: A Draft over a split directory editing fewer than 1/EDIT_SHARE of its
#: entries is stored by re-cutting the chunks around the edits (split_edit);
#: more, by splitting its whole listing again (the same ids either way).
EDIT_SHARE = 8
from commitfs.repo.repository import BlobWriter, Repository


def _join(prefix: str, name: str) -> str:
    return f"{prefix}/{name}" if prefix else name


def _key(name: str) -> bytes:
    return name.encode()


def _file_bytes(e: TreeEntry) -> int:
    """What ``e`` adds to its directory's size (Tree.size: a symlink adds nothing)."""
    return 0 if e.kind is Kind.SYMLINK else e.size


def _entry_key(e: TreeEntry) -> bytes:
    return e.name.encode()


def is_dir(side: Side) -> bool:
    return isinstance(side, Draft) or (isinstance(side, TreeEntry) and side.kind is Kind.DIR)


def same(a: Side, b: Side) -> bool:
    """True when two sides are known equal without reading anything (by id)."""
    if a is b:
        return True
    if isinstance(a, TreeEntry) and isinstance(b, TreeEntry):
        return a.kind is b.kind and a.id == b.id
    return False


def dir_entry(tree_id: bytes, name: str = "") -> TreeEntry:
    return TreeEntry(name, Kind.DIR, 0, tree_id)


def _base_of(repo: Repository, draft: Draft) -> Tree | SplitTree:
    """A Draft's base tree: the decoded one it carries, else the repository's."""
    if draft.base_tree is not None:
        return draft.base_tree
    return repo.load_tree(draft.base)


def listing(repo: Repository, side: Side) -> dict[str, Side]:
    """The entries of a directory side, by name (an empty dict for anything else)."""
    if isinstance(side, Draft):
        out: dict[str, Side] = {}
        if side.base is not None:
            out = {e.name: e for e in _base_of(repo, side).entries}
        for name, s in side.entries.items():
            if s is None:
                out.pop(name, None)
            else:
                out[name] = s
        return out
    if isinstance(side, TreeEntry) and side.kind is Kind.DIR:
        return {e.name: e for e in repo.load_tree(side.id).entries}
    return {}


# --- diff ---------------------------------------------------------------------------------
def iter_changes(repo: Repository, old: Side, new: Side, path: str = "") -> Iterator[tuple[str, Side, Side]]:
    """(path, old, new) at the top-most paths where ``old`` and ``new`` differ.

    Directories on both sides are descended (only when their ids differ, or
    one is a Draft); a directory against anything else is one change."""
    if same(old, new) or (old is None and new is None):
        return
    if is_dir(old) and is_dir(new):
        if isinstance(new, Draft) and isinstance(old, TreeEntry) and new.base is not None and new.base == old.id:
            # A Draft over old's own tree: only the names it edits can differ.
            if new.entries:
                tree = _base_of(repo, new)
                for name in sorted(new.entries, key=_key):
                    yield from iter_changes(repo, tree.get(name), new.entries[name], _join(path, name))
            return
        if isinstance(old, TreeEntry) and isinstance(new, TreeEntry):
            a, b = _differing_entries(repo, old.id, new.id)
        else:
            a, b = listing(repo, old), listing(repo, new)
        for name in sorted(a.keys() | b.keys(), key=_key):
            yield from iter_changes(repo, a.get(name), b.get(name), _join(path, name))
        return
    yield path, old, new


def _differing_entries(repo: Repository, a: bytes, b: bytes) -> tuple[dict[str, TreeEntry], dict[str, TreeEntry]]:
    """The entries of two stored directories, by name, less those in chunks
    both share: split directories (docs/FORMAT.md, "Split trees") are
    compared chunk by chunk, a chunk or index node with the same id on both
    sides skipped unopened, so a diff of a huge directory reads the chunks
    around its changes."""
    na, nb = repo.load_tree_node(a), repo.load_tree_node(b)
    if isinstance(na, Tree) and isinstance(nb, Tree):
        return {e.name: e for e in na.entries}, {e.name: e for e in nb.entries}
    la, lb = differing_leaves(a, na, b, nb, repo.load_tree_node)
    return ({e.name: e for leaf in la for e in leaf.entries},
            {e.name: e for leaf in lb for e in leaf.entries})


def unchanged(repo: Repository, old: Side, new: Side) -> bool:
    return next(iter_changes(repo, old, new), None) is None


# --- three-way merge ------------------------------------------------------------------------
@dataclass
class Conflict:
    path: str
    kind: str
    base: Side
    ours: Side
    theirs: Side
    #: What a resolver found out (a table's conflicting cells, a parse error).
    details: list[dict] = field(default_factory=list)
    note: str = ""

    def to_json(self) -> dict:
        def side(s: Side):
            if s is None:
                return None
            if isinstance(s, TreeEntry):
                return {"kind": s.kind.name.lower(), "size": s.size, "id": s.id.hex()}
            return {"kind": "dir" if isinstance(s, Draft) else "file"}

        out = {"path": self.path, "kind": self.kind, "base": side(self.base), "ours": side(self.ours),
               "theirs": side(self.theirs)}
        if self.details:
            out["details"] = self.details
        if self.note:
            out["note"] = self.note
        return out


#: A resolver returns the side to keep, or a Conflict (the same one, perhaps with
#: details added) to leave the path conflicted.
Resolver = Callable[[Conflict], "Side | Conflict"]


def _classify(base: Side, ours: Side, theirs: Side) -> str:
    if base is not None and (ours is None or theirs is None):
        return "modify/delete" if theirs is None else "delete/modify"
    if is_dir(ours) != is_dir(theirs):
        return "file/directory"
    if (isinstance(ours, TreeEntry) and isinstance(theirs, TreeEntry) and ours.kind is Kind.SYMLINK
            and theirs.kind is Kind.SYMLINK):
        return "symlink"
    return "add/add" if base is None else "modify/modify"


def _merge_file(base: Side, ours: TreeEntry, theirs: TreeEntry) -> TreeEntry | str:
    """Content and executable bit merged separately; a conflict kind when they cannot be."""
    b = base if isinstance(base, TreeEntry) and base.kind.is_file else None
    if ours.id == theirs.id:
        content = ours
    elif b is not None and b.id == ours.id:
        content = theirs
    elif b is not None and b.id == theirs.id:
        content = ours
    else:
        return "add/add" if base is None else "modify/modify"
    if ours.kind is theirs.kind:
        kind = ours.kind
    elif b is not None and b.kind is ours.kind:
        kind = theirs.kind
    elif b is not None and b.kind is theirs.kind:
        kind = ours.kind
    else:
        return "executable"
    return TreeEntry(content.name, kind, content.size, content.id)


def merge(repo: Repository, base: Side, ours: Side, theirs: Side, path: str = "",
          resolve: Resolver | None = None, conflicts: list[Conflict] | None = None) -> Side:
    """The three-way merge of ``ours`` and ``theirs`` against ``base``.

    Unresolved conflicts are appended to ``conflicts``; their paths keep ours
    in the result (a placeholder: a caller with conflicts does not commit it)."""
    if same(ours, theirs) or (ours is None and theirs is None):
        return ours
    if same(base, ours) or (base is None and ours is None):
        return theirs
    if same(base, theirs) or (base is None and theirs is None):
        return ours
    if is_dir(ours) and is_dir(theirs):
        split = _merge_split(repo, base, ours, theirs, path, resolve, conflicts)
        if split is not None:
            return split
        lb = listing(repo, base) if is_dir(base) else {}
        lo, lt = listing(repo, ours), listing(repo, theirs)
        entries: dict[str, Side] = {}
        for name in sorted(lo.keys() | lt.keys() | lb.keys(), key=_key):
            s = merge(repo, lb.get(name), lo.get(name), lt.get(name), _join(path, name), resolve, conflicts)
            if s is not None:
                entries[name] = s
        return Draft(entries)
    # A directory edited in place (a workspace's Draft) without effective change is its base.
    if isinstance(ours, Draft) and is_dir(base) and unchanged(repo, base, ours):
        return theirs
    if isinstance(theirs, Draft) and is_dir(base) and unchanged(repo, base, theirs):
        return ours
    if (isinstance(ours, TreeEntry) and isinstance(theirs, TreeEntry) and ours.kind.is_file
            and theirs.kind.is_file):
        got = _merge_file(base, ours, theirs)
        if isinstance(got, TreeEntry):
            return got
        kind = got
    else:
        kind = _classify(base, ours, theirs)
    conflict = Conflict(path, kind, base, ours, theirs)
    resolved = resolve(conflict) if resolve is not None else conflict
    if isinstance(resolved, Conflict):
        if conflicts is not None:
            conflicts.append(resolved)
        return ours
    return resolved


def _merge_split(repo: Repository, base: Side, ours: Side, theirs: Side, path: str,
                 resolve: Resolver | None, conflicts: list[Conflict] | None) -> Draft | TreeEntry | None:
    """The merge of three stored directories of which one at least is split
    (docs/FORMAT.md, "Split trees"), reading only the chunks where ours or
    theirs differs from base, or None for any other case (merged name by name).

    A name in no chunk that differs, base to ours or base to theirs, is the
    same on all three sides: the result keeps ours for it (a Draft over ours)."""
    if not all(isinstance(s, TreeEntry) and s.kind is Kind.DIR for s in (base, ours, theirs)):
        return None
    if not any(isinstance(repo.load_tree_node(s.id), TreeIndex) for s in (base, ours, theirs)):
        return None
    bo_b, bo_o = _differing_entries(repo, base.id, ours.id)
    bt_b, bt_t = _differing_entries(repo, base.id, theirs.id)
    entries: dict[str, Side] = {}
    for name in sorted(bo_b.keys() | bo_o.keys() | bt_b.keys() | bt_t.keys(), key=_key):
        # Outside the chunks that differ from base, a side holds what base holds.
        b = bo_b.get(name, bt_b.get(name))
        o = bo_o.get(name) if name in bo_o or name in bo_b else b
        t = bt_t.get(name) if name in bt_t or name in bt_b else b
        s = merge(repo, b, o, t, _join(path, name), resolve, conflicts)
        if not same(s, o) and not (s is None and o is None):
            entries[name] = s
    if not entries:
        return ours
    return Draft(entries, ours.id)


# --- apply ------------------------------------------------------------------------------------
def draft_from_paths(repo: Repository, base_tree: bytes | None, changes: Mapping[str, Side]) -> Draft:
    """A Draft over ``base_tree`` with ``changes`` ('a/b' paths) applied.

    A side of None deletes; an empty ``Draft()`` is a new directory (changes
    beneath it fill it).  Changes beneath a path that is not a directory make
    one, unless they are all deletions.  Only the trees on the paths to the
    changes are read."""
    here: dict[str, Side] = {}
    below: dict[str, dict[str, Side]] = {}
    for path, change in changes.items():
        head, sep, rest = path.strip("/").partition("/")
        if sep:
            below.setdefault(head, {})[rest] = change
        else:
            here[head] = change
    entries: dict[str, Side] = dict(here)
    current = None
    if below and base_tree is not None:
        current = repo.load_tree(base_tree)
    for name, sub in below.items():
        if name in here and isinstance(here[name], Draft):
            entries[name] = draft_from_paths(repo, None, sub)  # a new directory: starts empty
            continue
        e = current.get(name) if current is not None else None
        if e is None and name not in here and all(c is None for c in sub.values()):
            continue  # deletions beneath a directory that no longer exists, or never did
        entries[name] = draft_from_paths(repo, e.id if e is not None and e.is_dir else None, sub)
    return Draft(entries, base_tree)


def _store_new_file(repo: Repository, writer: BlobWriter, name: str, f: NewFile) -> TreeEntry:
    from commitfs.ops.snapshot import store_stream

    if isinstance(f, EditedFile):
        from commitfs.ops.rechunk import store_edited_file

        fid, size = store_edited_file(repo, writer, f)
    elif f.data is not None:
        import io

        fid, size = store_stream(writer, io.BytesIO(f.data))
    else:
        try:
            with open(f.source, "rb", buffering=0) as stream:
                fid, size = store_stream(writer, stream)
        except OSError as exc:
            raise InputError(f"cannot read {f.source}: {exc.strerror or exc}") from None
    return TreeEntry(name, Kind.EXEC if f.executable else Kind.FILE, size, fid)


def build(repo: Repository, writer: BlobWriter, side: Side, name: str = "",
          _stored: dict | None = None) -> TreeEntry | None:
    """Store ``side`` and return its entry named ``name``: NewFiles are chunked, Drafts
    written as trees, TreeEntries reused by id (nothing below them is read).  A local
    file named twice (a workspace's hard link: the same NewFile under two names) is
    chunked once."""
    if side is None:
        return None
    if isinstance(side, TreeEntry):
        return side if side.name == name else TreeEntry(name, side.kind, side.size, side.id, side.target)
    if _stored is None:
        _stored = {}
    if isinstance(side, NewFile):
        if side.source is None:
            return _store_new_file(repo, writer, name, side)
        e = _stored.get(side)
        if e is None:
            e = _stored[side] = _store_new_file(repo, writer, name, side)
        return e if e.name == name else e._replace(name=name)
    if side.base is not None and not side.entries:
        return dir_entry(side.base, name)._replace(size=_base_of(repo, side).size)
    if side.base is not None:
        base = _base_of(repo, side)
        if isinstance(base, SplitTree) and len(side.entries) * EDIT_SHARE < base.count:
            # A few edits in a split directory: re-cut around them only.
            edits = {n: build(repo, writer, c, n, _stored) for n, c in side.entries.items()}
            tid, size = writer.add_tree_edit(base, edits)
            return TreeEntry(name, Kind.DIR, size, tid)
        if isinstance(base, Tree):
            # The base's sorted entries with the edited names replaced, and its size
            # moved by theirs: work per edit (a search and a splice), not per entry.
            edits = {n: build(repo, writer, c, n, _stored) for n, c in side.entries.items()}
            kept = list(base.entries)
            size = base.size
            for n, e in edits.items():
                i = bisect.bisect_left(kept, _key(n), key=_entry_key)
                if i < len(kept) and kept[i].name == n:
                    size -= _file_bytes(kept[i])
                    if e is None:
                        del kept[i]
                        continue
                    kept[i] = e
                elif e is None:
                    continue
                else:
                    kept.insert(i, e)
                check_name(e.name)
                size += _file_bytes(e)
            tree = Tree(tuple(kept), _size=size)
            # (Stored as a delta of the base where that pays: docs/FORMAT.md, "Tree deltas".)
            return TreeEntry(name, Kind.DIR, size, writer.add_tree(tree, side.base))
    built = []
    for child_name, child in listing(repo, side).items():
        e = build(repo, writer, child, child_name, _stored)
        if e is not None:
            built.append(e)
    tree = Tree.build(built)
    return TreeEntry(name, Kind.DIR, tree.size, writer.add_tree(tree))
