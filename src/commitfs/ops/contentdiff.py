"""Diffs inside files, on top of ops/diff.py's file-level changes.

``iter_file_diffs`` yields, for each changed path (restricted to some paths
if asked), the file-level Change and, where asked and the file is a table
(ops/table.py's formats) or a .safetensors file, its row or tensor diff.  A
table that does not parse, a missing key column or a duplicate key become
the FileDiff's ``error`` (the file-level change is still there).  Key
columns come from the caller, else from the attributes file's ``key``
(ops/attributes.py) of the newer commit.  Results
are yielded one file at a time, so a front end prints as it goes.

``path_history`` lists the commits of a first-parent history where a path's
entry id changed: one path lookup per commit (trees are cached), never a
checkout.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass

from commitfs.errors import AttributesError, NotADirectoryError_, PathNotFoundError, TableError
from commitfs.model.objects import Commit, TreeEntry
from commitfs.ops import attributes, browse
from commitfs.ops.diff import Change, diff_trees
from commitfs.ops.table import table_format
from commitfs.ops.tablediff import TableDiff, diff_table
from commitfs.ops.tensordiff import TensorDiff, diff_safetensors
from commitfs.repo.repository import Repository


def content_kind(path: str) -> str | None:
    """"table", "tensors" or None: what a diff can show inside this file."""
    if table_format(path) is not None:
        return "table"
    if path.lower().endswith(".safetensors"):
        return "tensors"
    return None


@dataclass
class FileDiff:
    change: Change
    table: TableDiff | None = None
    tensors: TensorDiff | None = None
    error: str | None = None

    @property
    def path(self) -> str:
        return self.change.path

    def to_json(self) -> dict:
        out = self.change.to_json()
        if self.table is not None:
            out["table"] = self.table.to_json()
        if self.tensors is not None:
            out["tensors"] = self.tensors.to_json()
        if self.error is not None:
            out["error"] = self.error
        return out


def resolve_pair(repo: Repository, a: str, b: str | None) -> tuple[bytes | None, bytes]:
    """(old commit, new commit): A and B, or A's first parent (None for a root
    commit) and A when B is omitted; ``A...B`` (B omitted): the merge base of A
    and B (None: unrelated histories) and B; ``A..B``: A and B."""
    if b is None and "..." in a:
        from commitfs.ops.merge import merge_bases

        left, _, right = a.partition("...")
        ca, cb = repo.resolve(left or "main"), repo.resolve(right or "main")
        bases = merge_bases(repo, ca, cb)
        return (bases[0] if bases else None), cb
    if b is None and ".." in a:  # A..B, as git diff reads it: A against B
        left, _, right = a.partition("..")
        return repo.resolve(left or "main"), repo.resolve(right or "main")
    if b is not None:
        return repo.resolve(a), repo.resolve(b)
    new = repo.resolve(a)
    parents = repo.load_commit(new).parents
    return (parents[0] if parents else None), new


def _lookup(repo: Repository, cid: bytes | None, path: str) -> TreeEntry | None:
    if cid is None:
        return None
    try:
        return browse.lookup_path(repo, cid, path)
    except (PathNotFoundError, NotADirectoryError_):
        return None


def iter_changes(repo: Repository, old: bytes | None, new: bytes | None, paths: Sequence[str] = ()) -> Iterator[Change]:
    """File-level changes between two commits (None: the empty tree), below ``paths`` if given."""
    old_tree = repo.load_commit(old).tree if old is not None else None
    new_tree = repo.load_commit(new).tree if new is not None else None
    if not paths:
        yield from diff_trees(repo, old_tree, new_tree)
        return
    for p in dict.fromkeys(x.strip("/") for x in paths):
        if not p:
            yield from diff_trees(repo, old_tree, new_tree)
            continue
        ea, eb = _lookup(repo, old, p), _lookup(repo, new, p)
        if ea is not None and eb is not None and ea.kind == eb.kind and ea.id == eb.id:
            continue
        if (ea is None or ea.is_dir) and (eb is None or eb.is_dir):
            yield from diff_trees(repo, ea.id if ea else None, eb.id if eb else None, p)
        elif ea is not None and eb is not None and not ea.is_dir and not eb.is_dir:
            yield Change("modified", p, ea, eb)
        else:  # a file became a directory or the reverse: report both sides
            if ea is not None:
                yield from (diff_trees(repo, ea.id, None, p) if ea.is_dir else [Change("removed", p, ea, None)])
            if eb is not None:
                yield from (diff_trees(repo, None, eb.id, p) if eb.is_dir else [Change("added", p, None, eb)])


def file_diff(repo: Repository, change: Change, *, keys: Sequence[str] = (), values: bool = False,
              max_rows: int | None = None) -> FileDiff:
    """The row or tensor diff of one changed file, where its kind allows."""
    fd = FileDiff(change)
    kind = content_kind(change.path)
    old = change.old if change.old is not None and change.old.kind.is_file else None
    new = change.new if change.new is not None and change.new.kind.is_file else None
    if kind is None or (old is None and new is None):
        return fd
    try:
        if kind == "table":
            fd.table = diff_table(repo, old, new, change.path, keys, max_rows=max_rows)
        else:
            fd.tensors = diff_safetensors(repo, old, new, values=values)
    except TableError as exc:
        fd.error = str(exc)
    return fd


def keys_for(repo: Repository, old: bytes | None, new: bytes | None):
    """path -> key columns from the attributes file (ops/attributes.py) of the
    newer commit (the older one if the newer is None); a broken file: a
    function raising its AttributesError for every table."""
    cid = new if new is not None else old
    try:
        attrs = attributes.load(repo, repo.load_commit(cid).tree if cid is not None else None)
    except AttributesError as exc:
        error = exc

        def broken(path: str) -> tuple[str, ...]:
            raise error
        return broken
    return attrs.key_for


def iter_file_diffs(repo: Repository, old: bytes | None, new: bytes | None, paths: Sequence[str] = (), *,
                    contents: bool = True, keys: Sequence[str] = (), values: bool = False,
                    max_rows: int | None = None) -> Iterator[FileDiff]:
    """FileDiffs of every change.  Tables are keyed by ``keys``, or else by
    the ``key`` attribute of the attributes file for their path, or else by
    position."""
    key_of = None if keys or not contents else keys_for(repo, old, new)
    for change in iter_changes(repo, old, new, paths):
        if not contents:
            yield FileDiff(change)
            continue
        k = keys
        if key_of is not None and content_kind(change.path) == "table":
            try:
                k = key_of(change.path)
            except AttributesError as exc:
                yield FileDiff(change, error=str(exc))
                continue
        yield file_diff(repo, change, keys=k, values=values, max_rows=max_rows)


def path_history(repo: Repository, start: bytes, path: str, limit: int | None = None
                 ) -> Iterator[tuple[bytes, Commit, TreeEntry | None, TreeEntry | None]]:
    """(commit, its object, the path's entry in its first parent, in it) for
    each commit of ``start``'s first-parent history where the path's id changed."""
    path = path.strip("/")
    cid: bytes | None = start
    commit = repo.load_commit(cid)
    entry = _lookup(repo, cid, path)
    n = 0
    while cid is not None and (limit is None or n < limit):
        parent = commit.parents[0] if commit.parents else None
        pcommit = repo.load_commit(parent) if parent is not None else None
        pentry = _lookup(repo, parent, path)
        if (entry is None) != (pentry is None) or (entry is not None and (entry.id, entry.kind) != (pentry.id, pentry.kind)):
            yield cid, commit, pentry, entry
            n += 1
        cid, commit, entry = parent, pcommit, pentry
