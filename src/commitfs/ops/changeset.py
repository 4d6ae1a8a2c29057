"""Commit an edited tree on top of a base commit (the workspace's commit).

A writable workspace hands over a Draft (model/draft.py): its snapshot, whose
untouched subtrees are TreeEntries named by id.  ``commit_draft`` stores it
with the change engine (ops/changes.py ``build``): only the Drafts become new
trees and only NewFiles are chunked; every other subtree keeps its id and is
never read.  ``commit_changes`` does the same for a ``{path: Change}`` map
(a Draft over the base tree, built by ``draft_from_paths``).

The branch then moves by compare-and-swap.  If it moved since the base
commit, the edits are rebased onto the new head by the engine's three-way
merge (base commit, the edits, the head): paths changed on one side only,
or the same way on both, merge; a path changed both ways (a file edited on
both sides, a directory deleted on one and changed on the other) is a
ConflictError listing those paths, and nothing is committed.

Crash safety: ``on_pending(commit_id)`` is called just before the
compare-and-swap (the workspace records the id in its overlay, see
vfs/overlay.py), so whoever is killed between the two can tell afterwards
whether the branch reached the commit.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass

from commitfs.errors import ConflictError, NothingToCommitError, RefConflictError
from commitfs.model.draft import Draft, NewFile, Side
from commitfs.model.objects import Commit, Kind, TreeEntry, symlink_entry
from commitfs.ops.changes import (Conflict, build, dir_entry, draft_from_paths, is_dir, iter_changes, listing,
                                  merge)
from commitfs.ops.snapshot import default_author
from commitfs.repo.repository import BlobWriter, Repository

__all__ = ["Change", "ChangesetResult", "ConflictError", "StatusEntry", "apply_changes", "commit_changes",
           "commit_draft", "status_of"]


@dataclass(frozen=True)
class Change:
    """What a path became.

    kind: "delete"; "file" (content from ``source``, a local path; ``executable``);
    "symlink" (``target``); "dir" (a new, empty directory, possibly filled by
    changes beneath it); "entry" (an existing TreeEntry re-linked by id: a
    moved or copied file/dir/symlink, no bytes read).
    """

    kind: str
    source: str | None = None
    executable: bool = False
    target: bytes = b""
    entry: TreeEntry | None = None

    def side(self, name: str) -> Side:
        if self.kind == "delete":
            return None
        if self.kind == "symlink":
            return symlink_entry(name, self.target)
        if self.kind == "entry":
            return self.entry
        if self.kind == "file":
            return NewFile(source=self.source, executable=self.executable)
        if self.kind == "dir":
            return Draft()
        raise ValueError(f"unknown change kind {self.kind!r}")


def _sides(changes: Mapping[str, Change]) -> dict[str, Side]:
    return {p: c.side(p.rstrip("/").rsplit("/", 1)[-1]) for p, c in changes.items()}


def apply_changes(repo: Repository, writer: BlobWriter, base_tree: bytes | None,
                  changes: Mapping[str, Change]) -> tuple[bytes, int]:
    """The (tree id, size) of ``base_tree`` with ``changes`` applied ('a/b' paths)."""
    e = build(repo, writer, draft_from_paths(repo, base_tree, _sides(changes)))
    return e.id, e.size


# --- status ---------------------------------------------------------------------------------
@dataclass
class StatusEntry:
    status: str  # added | modified | deleted
    path: str
    kind: str  # file | dir | symlink
    size: int

    def to_json(self) -> dict:
        return {"status": self.status, "path": self.path, "kind": self.kind, "size": self.size}


def _kind(side: Side) -> str:
    if is_dir(side):
        return "dir"
    if isinstance(side, TreeEntry) and side.kind is Kind.SYMLINK:
        return "symlink"
    return "file"


def _size(side: Side) -> int:
    if isinstance(side, TreeEntry):
        return side.size
    if isinstance(side, NewFile):
        return side.size if side.data is None else len(side.data)
    return 0  # a Draft: a new directory, its contents listed below it


def status_of(repo: Repository, base_tree: bytes, draft: Side) -> list[StatusEntry]:
    """What ``draft`` changed against ``base_tree``: a removed or moved directory is one
    line; a new directory is a line and its contents are lines below it."""
    out: list[StatusEntry] = []

    def line(path: str, o: Side, n: Side) -> None:
        if isinstance(n, Draft) and not is_dir(o):
            if o is not None:
                out.append(StatusEntry("deleted", path, _kind(o), _size(o)))
            out.append(StatusEntry("added", path, "dir", 0))
            for name, child in sorted(listing(repo, n).items(), key=lambda kv: kv[0].encode()):
                line(f"{path}/{name}", None, child)
        elif n is None:
            out.append(StatusEntry("deleted", path, _kind(o), _size(o)))
        else:
            out.append(StatusEntry("added" if o is None else "modified", path, _kind(n), _size(n)))

    if draft is not None:
        for path, o, n in iter_changes(repo, dir_entry(base_tree), draft):
            line(path, o, n)
    return out


# --- commit -----------------------------------------------------------------------------------
@dataclass
class ChangesetResult:
    commit_id: bytes
    parent: bytes | None
    rebased: bool


def _conflict_error(branch: str, head: bytes | None, conflicts: list[Conflict]) -> ConflictError:
    paths = sorted({c.path for c in conflicts})
    return ConflictError(
        f"branch {branch!r} moved to {head.hex()[:12] if head else 'nothing'} and changed "
        f"the same paths: {', '.join(paths[:10])}" + (" ..." if len(paths) > 10 else ""),
        paths, conflicts,
    )


def commit_draft(repo: Repository, branch: str, base: bytes | None, draft: Side, *, message: str,
                 metadata: dict[str, str] | None = None, author: str | None = None,
                 on_pending: Callable[[bytes], None] | None = None,
                 max_attempts: int = 10, extra_parents: tuple[bytes, ...] = ()) -> ChangesetResult:
    """Commit ``draft`` (the root directory as edited against commit ``base``) to ``branch``.

    ``extra_parents``: more parents after the head (a merge made in a
    workspace: its source); such a commit is made even if its tree is the head's.

    ``draft`` None means untouched.  Raises NothingToCommitError if the result
    equals the head's tree and ConflictError if the branch moved and changed
    the same paths differently."""
    base_tree = repo.load_commit(base).tree if base else None
    base_side = dir_entry(base_tree) if base_tree else None
    if draft is None and extra_parents:
        draft = base_side  # a merge whose result is the base's tree
    if not extra_parents and (draft is None or next(iter_changes(repo, base_side, draft), None) is None):
        raise NothingToCommitError("nothing to commit: no changes", base or b"")
    for _attempt in range(max_attempts):
        head = repo.refs.lookup_branch(branch)
        rebased = head != base
        parent_tree = base_tree
        result = draft
        if rebased:
            parent_tree = repo.load_commit(head).tree if head else None
            conflicts: list[Conflict] = []
            result = merge(repo, base_side, draft, dir_entry(parent_tree) if parent_tree else None,
                           conflicts=conflicts)
            if conflicts:
                raise _conflict_error(branch, head, conflicts)
        # Leaving the block uploads and indexes everything the commit names.
        with repo.writer() as writer:
            root = build(repo, writer, result if result is not None else Draft())
        if head is not None and root.id == parent_tree and not extra_parents:
            raise NothingToCommitError(f"nothing to commit: the changes leave {branch} unchanged", head)
        commit = Commit(root.id, ((head,) if head else ()) + tuple(extra_parents), author or default_author(),
                        int(time.time()),
                        message, dict(metadata or {}))
        cid = repo.save_commit(commit)
        if on_pending is not None:
            on_pending(cid)
        try:
            repo.refs.set_branch_if_equals(branch, cid, head)
        except RefConflictError:
            continue  # the branch moved again: rebase onto the new head
        return ChangesetResult(cid, head, rebased)
    raise RefConflictError(f"branch {branch!r} kept moving; gave up after {max_attempts} attempts")


def commit_changes(repo: Repository, branch: str, base: bytes | None, changes: Mapping[str, Change], *,
                   message: str, metadata: dict[str, str] | None = None, author: str | None = None,
                   on_pending: Callable[[bytes], None] | None = None,
                   max_attempts: int = 10) -> ChangesetResult:
    """Commit ``changes`` ({path: Change}) made against commit ``base`` to ``branch``."""
    if not changes:
        raise NothingToCommitError("nothing to commit: no changes", base or b"")
    base_tree = repo.load_commit(base).tree if base else None
    draft = draft_from_paths(repo, base_tree, _sides(changes))
    return commit_draft(repo, branch, base, draft, message=message, metadata=metadata, author=author,
                        on_pending=on_pending, max_attempts=max_attempts)

