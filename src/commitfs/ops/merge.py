"""Merging a line of history into a branch: ``commitfs merge SOURCE --into BRANCH``.

1. The merge base is the nearest common ancestor of BRANCH's head and
   SOURCE (every parent counts, not only first parents).  With several
   nearest ones (criss-cross history) the newest by commit time (then by id)
   is used and all are reported; paths the others would have decided may
   then show as conflicts.  Histories without a common ancestor merge
   against an empty tree.
2. SOURCE an ancestor of the head (or the head itself): already up to date,
   nothing changes.  The head an ancestor of SOURCE: the branch is
   fast-forwarded to SOURCE (unless ``no_ff``).
3. Otherwise the change engine's three-way merge of the trees
   (ops/changes.py): the cost follows what changed on the two sides, not
   the size of the tree.  Each conflict goes to the resolver: the first
   matching ``--rule``, then the ``merge`` attribute of the attributes file
   (ops/attributes.py), then a row-level merge when both sides are tables
   (ops/tablemerge.py), then ``--strategy``.  What is left is reported and
   nothing moves.
4. A clean merge is stored (only new trees and merged tables are written),
   and a commit with parents (head, SOURCE) and the base in its metadata
   (``commitfs.merge.base``) is made; the branch moves by compare-and-swap.
   If the branch moved meanwhile the merge is redone on the new head (up to
   ``max_attempts`` times); a redo that conflicts is refused like any other.
   A process killed at any point leaves the branch at the old head or at the
   complete merge commit (the write order of every commit: objects, index,
   commit, then the ref).
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from commitfs.errors import MergeError, RefConflictError, RevisionError, TableParseError
from commitfs.model.draft import Draft
from commitfs.model.objects import Commit, TreeEntry
from commitfs.ops import attributes as attrs
from commitfs.ops.changes import Conflict, build, dir_entry, merge
from commitfs.ops.snapshot import default_author
from commitfs.repo.refs import check_ref_name
from commitfs.repo.repository import Repository

STRATEGIES = ("ours", "theirs")
ACTIONS = ("ours", "theirs", "rows")
META_BASE = "commitfs.merge.base"
META_SOURCE = "commitfs.merge.source"


# --- merge bases ------------------------------------------------------------------------------
def _ancestors(repo: Repository, start: bytes) -> set[bytes]:
    seen = {start}
    stack = [start]
    while stack:
        for p in repo.load_commit(stack.pop()).parents:
            if p not in seen:
                seen.add(p)
                stack.append(p)
    return seen


def is_ancestor(repo: Repository, a: bytes, b: bytes) -> bool:
    """Is commit ``a`` an ancestor of ``b`` (or ``b`` itself)?"""
    return a in _ancestors(repo, b)


def merge_bases(repo: Repository, a: bytes, b: bytes) -> list[bytes]:
    """The nearest common ancestors of ``a`` and ``b``, newest first (empty: unrelated)."""
    of_a = _ancestors(repo, a)
    found: list[bytes] = []
    seen = {b}
    stack = [b]
    while stack:  # walk b's history, stopping at the first commits a also has
        cid = stack.pop()
        if cid in of_a:
            found.append(cid)
            continue
        for p in repo.load_commit(cid).parents:
            if p not in seen:
                seen.add(p)
                stack.append(p)
    nearest = [c for c in found if not any(c != o and is_ancestor(repo, c, o) for o in found)]
    return sorted(nearest, key=lambda c: (-repo.load_commit(c).time, c))


# --- resolving conflicts --------------------------------------------------------------------
@dataclass
class MergeOptions:
    strategy: str | None = None
    #: (glob, "ours" | "theirs" | "rows"), first match wins
    rules: Sequence[tuple[str, str]] = ()
    #: (glob, key columns), first match wins
    keys: Sequence[tuple[str, tuple[str, ...]]] = ()


def parse_rule(text: str) -> tuple[str, str]:
    glob, sep, action = text.rpartition("=")
    if not sep or not glob or action not in ACTIONS:
        raise MergeError(f"--rule expects GLOB=ours|theirs|rows, got {text!r}")
    return glob, action


def parse_key(text: str) -> tuple[str, tuple[str, ...]]:
    glob, sep, cols = text.partition("=")
    columns = tuple(c.strip() for c in cols.split(","))
    if not sep or not glob or not all(columns):
        raise MergeError(f"--key expects GLOB=COLUMN[,COLUMN], got {text!r}")
    return glob, columns


@dataclass
class Resolution:
    path: str
    kind: str
    how: str  # "ours" | "theirs" | "rows"

    def to_json(self) -> dict:
        return {"path": self.path, "kind": self.kind, "resolved": self.how}


class _Resolver:
    def __init__(self, repo: Repository, options: MergeOptions, attributes: attrs.Attributes):
        self.repo = repo
        self.options = options
        self.attributes = attributes
        self.resolved: list[Resolution] = []

    def key_for(self, path: str) -> tuple[str, ...]:
        for glob, cols in self.options.keys:
            if attrs.glob_match(glob, path):
                return cols
        return self.attributes.key_for(path)

    def _take(self, c: Conflict, how: str):
        self.resolved.append(Resolution(c.path, c.kind, how))
        return c.ours if how == "ours" else c.theirs

    def __call__(self, c: Conflict):
        action = next((a for g, a in self.options.rules if attrs.glob_match(g, c.path)), None)
        if action is None:
            action = self.attributes.merge_for(c.path)
        if action in STRATEGIES:
            return self._take(c, action)
        if action == "rows" or (action is None and _tables(c)):
            got = self._rows(c)
            if not isinstance(got, Conflict):
                self.resolved.append(Resolution(c.path, c.kind, "rows"))
                return got
            c = got
        if self.options.strategy in STRATEGIES:
            return self._take(c, self.options.strategy)
        return c

    def _rows(self, c: Conflict):
        from commitfs.ops import tablemerge

        if not _tables(c):
            c.note = c.note or "not a table on both sides: no row-level merge"
            return c
        try:
            return tablemerge.merge_tables(self.repo, c, self.key_for(c.path), self.options.strategy)
        except TableParseError as exc:  # a side does not parse: the file conflicts as a whole
            c.note = str(exc)
            return c


def _tables(c: Conflict) -> bool:
    from commitfs.ops.table import table_format

    return (c.kind in ("modify/modify", "add/add") and isinstance(c.ours, TreeEntry)
            and isinstance(c.theirs, TreeEntry) and c.ours.kind.is_file and c.theirs.kind.is_file
            and table_format(c.path) in ("csv", "tsv", "jsonl"))


# --- the merge ------------------------------------------------------------------------------
@dataclass
class MergeResult:
    status: str  # "up-to-date" | "fast-forward" | "merged" | "conflicts"
    branch: str
    source: bytes
    head: bytes  # the branch before
    base: bytes | None = None
    bases: list[bytes] = field(default_factory=list)
    commit_id: bytes | None = None  # the branch after (None: unchanged)
    conflicts: list[Conflict] = field(default_factory=list)
    resolved: list[Resolution] = field(default_factory=list)
    dry_run: bool = False
    attempts: int = 1
    tree: TreeEntry | Draft | None = None  # the merged root (a merge into a workspace applies it)

    def to_json(self) -> dict:
        def hx(c):
            return c.hex() if c else None

        return {"status": self.status, "branch": self.branch, "source": self.source.hex(), "head": self.head.hex(),
                "base": hx(self.base), "bases": [b.hex() for b in self.bases], "id": hx(self.commit_id),
                "dry_run": self.dry_run, "conflicts": [c.to_json() for c in self.conflicts],
                "resolved": [r.to_json() for r in self.resolved]}


def _check_into(repo: Repository, branch: str) -> bytes:
    check_ref_name(branch)
    if repo.refs.lookup_branch(branch) is None:
        if repo.refs.lookup_tag(branch) is not None:
            raise MergeError(f"cannot merge into tag {branch!r}: tags do not move (merge into a branch)")
        raise MergeError(f"no branch {branch!r} to merge into")
    return repo.refs.lookup_branch(branch)


def three_way(repo: Repository, base: bytes | None, head: bytes, source: bytes,
              options: MergeOptions) -> tuple[object, list[Conflict], list[Resolution]]:
    """The merged root (a side), the unresolved conflicts and the resolutions."""
    trees = [repo.load_commit(c).tree if c else None for c in (base, head, source)]
    attributes = attrs.load(repo, trees[1])  # ours; theirs when ours has none
    if not attributes.rules:
        attributes = attrs.load(repo, trees[2])
    resolver = _Resolver(repo, options, attributes)
    conflicts: list[Conflict] = []
    root = merge(repo, *(dir_entry(t) if t else None for t in trees), resolve=resolver, conflicts=conflicts)
    return root, conflicts, resolver.resolved


def merge_into(repo: Repository, source_rev: str, branch: str = "main", *, message: str | None = None,
               no_ff: bool = False, options: MergeOptions | None = None, dry_run: bool = False,
               author: str | None = None, max_attempts: int = 10,
               before_swap: Callable[[bytes], None] | None = None) -> MergeResult:
    """Merge ``source_rev`` into ``branch``; see the module doc."""
    options = options or MergeOptions()
    if options.strategy is not None and options.strategy not in STRATEGIES:
        raise MergeError(f"--strategy expects ours or theirs, got {options.strategy!r}")
    _check_into(repo, branch)
    try:
        source = repo.resolve(source_rev)
    except RevisionError as exc:
        raise RevisionError(f"cannot merge {source_rev!r}: {exc}") from None
    for attempt in range(1, max_attempts + 1):
        head = repo.refs.lookup_branch(branch)
        if head is None:
            raise MergeError(f"branch {branch!r} was deleted during the merge")
        result = MergeResult("merged", branch, source, head, attempts=attempt, dry_run=dry_run)
        if is_ancestor(repo, source, head):
            result.status = "up-to-date"
            return result
        result.bases = merge_bases(repo, head, source)
        result.base = result.bases[0] if result.bases else None
        if result.base == head and not no_ff:
            result.status = "fast-forward"
            if dry_run:
                result.commit_id = source
                return result
            new = source
        else:
            root, conflicts, resolved = three_way(repo, result.base, head, source, options)
            result.tree, result.conflicts, result.resolved = root, conflicts, resolved
            if conflicts:
                result.status = "conflicts"
                return result
            if dry_run:
                return result
            with repo.writer() as writer:
                entry = build(repo, writer, root if root is not None else Draft())
            metadata = {META_BASE: result.base.hex() if result.base else "", META_SOURCE: source_rev}
            commit = Commit(entry.id, (head, source), author or default_author(), int(time.time()),
                            message or f"merge {source_rev} into {branch}", metadata)
            new = repo.save_commit(commit)
        if before_swap is not None:
            before_swap(new)
        try:
            repo.refs.set_branch_if_equals(branch, new, head)
        except RefConflictError:
            continue  # the branch moved: merge again onto its new head
        result.commit_id = new
        return result
    raise RefConflictError(f"branch {branch!r} kept moving during the merge; gave up after {max_attempts} attempts "
                           "(nothing was changed)")


# --- merging into a workspace ---------------------------------------------------------------
#: Files up to this size whose bytes are UTF-8 text get conflict markers; others the sibling files.
MARKER_LIMIT = 8 * 1024 * 1024
MARKERS = ("<<<<<<< ", "||||||| ", "=======", ">>>>>>> ")


@dataclass
class WorkspaceMerge:
    """A merge prepared for a workspace: the tree to show (conflicts spelled out in files)."""

    status: str  # "up-to-date" | "merged" | "conflicts"
    source: bytes
    base: bytes | None
    bases: list[bytes]
    tree: bytes | None = None
    #: {"path", "kind", "style": "markers" | "sides", "files": [paths to resolve]}
    conflicts: list[dict] = field(default_factory=list)
    resolved: list[Resolution] = field(default_factory=list)

    def state(self, source_rev: str) -> dict:
        return {"source": self.source.hex(), "source_rev": source_rev,
                "base": self.base.hex() if self.base else "", "conflicts": self.conflicts}


def _text(repo: Repository, side) -> bytes | None:
    if side is None:
        return b""
    if not isinstance(side, TreeEntry) or not side.kind.is_file or side.size > MARKER_LIMIT:
        return None
    data = bytes(repo.load_file(side.id)) if side.size else b""
    if b"\0" in data:
        return None
    try:
        data.decode("utf-8")
    except UnicodeDecodeError:
        return None
    return data


def _nl(data: bytes) -> bytes:
    return data if not data or data.endswith(b"\n") else data + b"\n"


def prepare_workspace_merge(repo: Repository, head: bytes, source_rev: str, branch: str,
                            options: MergeOptions | None = None) -> WorkspaceMerge:
    """Merge ``source_rev`` into commit ``head`` for a workspace (nothing moves).

    Conflicts are written into the result so that ordinary tools resolve
    them: a text (or table) file both sides changed holds git-style markers
    around the three versions; anything else keeps ours at NAME, theirs at
    NAME.theirs and the base at NAME.base (each only if that side has one)."""
    from commitfs.model.draft import NewFile
    from commitfs.ops.changes import draft_from_paths

    options = options or MergeOptions()
    try:
        source = repo.resolve(source_rev)
    except RevisionError as exc:
        raise RevisionError(f"cannot merge {source_rev!r}: {exc}") from None
    bases = merge_bases(repo, head, source)
    out = WorkspaceMerge("merged", source, bases[0] if bases else None, bases)
    if is_ancestor(repo, source, head):
        out.status = "up-to-date"
        return out
    root, conflicts, out.resolved = three_way(repo, out.base, head, source, options)
    changes: dict[str, object] = {}
    for c in conflicts:
        texts = None
        if c.kind in ("modify/modify", "add/add") and isinstance(c.ours, TreeEntry) and isinstance(c.theirs, TreeEntry):
            texts = [_text(repo, s) for s in (c.ours, c.base, c.theirs)]
        if texts is not None and None not in texts:
            o, b, t = texts
            data = (f"<<<<<<< ours ({branch})\n".encode() + _nl(o) + b"||||||| base\n" + _nl(b) + b"=======\n"
                    + _nl(t) + f">>>>>>> theirs ({source_rev})\n".encode())
            changes[c.path] = NewFile(data=data, executable=c.ours.kind.is_file and c.ours.executable,
                                      size=len(data))
            out.conflicts.append({"path": c.path, "kind": c.kind, "style": "markers", "files": [c.path],
                                  "note": c.note})
            continue
        files = []
        changes[c.path] = c.ours
        for suffix, side in ((".theirs", c.theirs), (".base", c.base)):
            if side is not None:
                changes[c.path + suffix] = side
                files.append(c.path + suffix)
        out.conflicts.append({"path": c.path, "kind": c.kind, "style": "sides", "files": files, "note": c.note})
    with repo.writer() as writer:
        entry = build(repo, writer, root if root is not None else Draft())
        if changes:
            entry = build(repo, writer, draft_from_paths(repo, entry.id, changes))
    out.tree = entry.id
    out.status = "conflicts" if out.conflicts else "merged"
    return out


def _side_at(repo: Repository, root, path: str):
    from commitfs.ops.changes import listing

    side = root
    for name in path.split("/"):
        side = listing(repo, side).get(name)
        if side is None:
            return None
    return side


def unresolved(repo: Repository, root, conflicts: list[dict]) -> list[str]:
    """The conflict paths of a workspace merge still unresolved in ``root`` (its draft):
    markers left in the file, or a .theirs/.base file still there."""
    from commitfs.model.draft import EditedFile, NewFile
    from commitfs.ops.rechunk import read_edited_file

    left = []
    for c in conflicts:
        if c["style"] == "markers":
            side = _side_at(repo, root, c["path"])
            if isinstance(side, EditedFile):
                data = read_edited_file(repo, side)
            elif isinstance(side, NewFile) and side.source is None:
                data = side.data or b""
            elif isinstance(side, NewFile):
                with open(side.source, "rb") as f:
                    data = f.read()
            elif isinstance(side, TreeEntry) and side.kind.is_file:
                data = bytes(repo.load_file(side.id)) if side.size else b""
            else:
                data = b""
            lines = data.decode("utf-8", "replace").splitlines()
            if any(line.startswith(m) if m != "=======" else line == m for line in lines for m in MARKERS):
                left.append(c["path"])
        elif any(_side_at(repo, root, f) is not None for f in c["files"]):
            left.append(c["path"])
    return left


#: References that keep a workspace merge's tree reachable while it is in progress
#: (gc marks from every reference under refs/, whatever its namespace).
HOLD_PREFIX = "merges/"


def hold_name(workspace_dir: str) -> str:
    """The reference name holding the merge in progress of one workspace directory."""
    from commitfs.model.ids import hash_bytes

    return HOLD_PREFIX + hash_bytes(os.fsencode(os.path.abspath(workspace_dir))).hex()[:32]


def hold_merge(repo: Repository, name: str, tree: bytes, head: bytes, source: bytes) -> bytes:
    """Save a commit of the merged tree (parents head, source) and point ``name`` at it,
    so that nothing the workspace shows is garbage while the merge is resolved."""
    cid = repo.save_commit(Commit(tree, (head, source), "commitfs", int(time.time()),
                                  "a workspace merge in progress (held for gc)", {}))
    current = repo.store.load_ref(name)
    repo.store.save_ref_if_equals(name, cid.hex().encode() + b"\n", current)
    return cid


def release_merge(repo: Repository, name: str) -> None:
    current = repo.store.load_ref(name)
    if current is not None:
        try:
            repo.store.save_ref_if_equals(name, None, current)
        except RefConflictError:
            pass  # another process moved it: it is theirs now
