"""Commit a set of path changes on top of a base commit (the workspace's commit).

A writable workspace records what changed, path by path, against the commit
it started from.  Committing it must cost the change, not the dataset:
``apply_changes`` rebuilds only the trees on the paths from the root to each
change; every other subtree keeps its id and is never read.  Changed files are
chunked from local files; moved files and directories are re-linked by id
without reading their contents.

``commit_changes`` then moves the branch by compare-and-swap.  If the branch
moved since the base commit, the changes are rebased onto the new head when
the paths the head changed and the paths the workspace changed are disjoint
(neither equal nor one inside the other); otherwise ConflictError lists the
overlapping paths and nothing is committed.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from dataclasses import dataclass

from commitfs.errors import CommitfsError, InputError, NothingToCommitError, RefConflictError
from commitfs.model.objects import Commit, Kind, Tree, TreeEntry, symlink_entry
from commitfs.ops.diff import diff_trees
from commitfs.ops.snapshot import default_author, store_stream
from commitfs.repo.repository import BlobWriter, Repository


class ConflictError(CommitfsError):
    def __init__(self, message: str, paths: list[str]):
        super().__init__(message)
        self.paths = paths


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


def _entry_for(writer: BlobWriter, name: str, change: Change) -> TreeEntry | None:
    if change.kind == "delete":
        return None
    if change.kind == "symlink":
        return symlink_entry(name, change.target)
    if change.kind == "entry":
        e = change.entry
        return TreeEntry(name, e.kind, e.size, e.id, e.target)
    if change.kind == "file":
        try:
            with open(change.source, "rb", buffering=0) as f:
                fid, size = store_stream(writer, f)
        except OSError as exc:
            raise InputError(f"cannot read {change.source}: {exc.strerror or exc}") from None
        return TreeEntry(name, Kind.EXEC if change.executable else Kind.FILE, size, fid)
    raise ValueError(f"unknown change kind {change.kind!r}")


def apply_changes(repo: Repository, writer: BlobWriter, base_tree: bytes | None,
                  changes: Mapping[str, Change]) -> tuple[bytes, int]:
    """The (tree id, size) of ``base_tree`` with ``changes`` applied ('a/b' paths)."""
    here: dict[str, Change] = {}
    below: dict[str, dict[str, Change]] = {}
    for path, change in changes.items():
        head, sep, rest = path.strip("/").partition("/")
        if sep:
            below.setdefault(head, {})[rest] = change
        else:
            here[head] = change
    entries = {e.name: e for e in repo.load_tree(base_tree).entries} if base_tree else {}
    for name, change in here.items():
        if change.kind == "dir":
            entries[name] = TreeEntry(name, Kind.DIR, 0, writer.add_tree(Tree(())))
            continue
        entry = _entry_for(writer, name, change)
        if entry is None:
            entries.pop(name, None)
        else:
            entries[name] = entry
    for name, sub in below.items():
        current = entries.get(name)
        if current is None and name not in here:
            # Changes beneath a directory that no longer exists, or never did.
            if all(c.kind == "delete" for c in sub.values()):
                continue
        if name in here and here[name].kind == "dir":
            base = None  # a new directory: start empty (its tree is not stored yet)
        else:
            base = current.id if current is not None and current.is_dir else None
        tid, size = apply_changes(repo, writer, base, sub)
        entries[name] = TreeEntry(name, Kind.DIR, size, tid)
    tree = Tree.build(entries.values())
    return writer.add_tree(tree), tree.size


def _overlaps(a: str, b: str) -> bool:
    return a == b or a.startswith(b + "/") or b.startswith(a + "/")


def conflicting_paths(changed_upstream: list[str], ours: list[str]) -> list[str]:
    return sorted({p for p in ours if any(_overlaps(p, q) for q in changed_upstream)})


@dataclass
class ChangesetResult:
    commit_id: bytes
    parent: bytes | None
    rebased: bool


def commit_changes(repo: Repository, branch: str, base: bytes | None, changes: Mapping[str, Change], *,
                   message: str, metadata: dict[str, str] | None = None, author: str | None = None,
                   max_attempts: int = 10) -> ChangesetResult:
    """Commit ``changes`` made against commit ``base`` to ``branch``.

    Raises NothingToCommitError if the result equals the head's tree and
    ConflictError if the branch moved and touched the same paths.
    """
    if not changes:
        raise NothingToCommitError("nothing to commit: no changes", base or b"")
    paths = sorted(changes)
    base_tree = repo.load_commit(base).tree if base else None
    for _attempt in range(max_attempts):
        head = repo.refs.lookup_branch(branch)
        rebased = head != base
        parent_tree = base_tree
        if rebased:
            parent_tree = repo.load_commit(head).tree if head else None
            upstream = [c.path for c in diff_trees(repo, base_tree, parent_tree)]
            # Directories created or removed upstream show as their files; a
            # path of ours inside or above one of them overlaps it too.
            clash = conflicting_paths(upstream, paths)
            if clash:
                raise ConflictError(
                    f"branch {branch!r} moved to {head.hex()[:12] if head else 'nothing'} and changed "
                    f"the same paths: {', '.join(clash[:10])}" + (" ..." if len(clash) > 10 else ""),
                    clash,
                )
        # Leaving the block uploads and indexes everything the commit names.
        with repo.writer() as writer:
            tree_id, _ = apply_changes(repo, writer, parent_tree, changes)
        if head is not None and tree_id == parent_tree:
            raise NothingToCommitError(f"nothing to commit: the changes leave {branch} unchanged", head)
        commit = Commit(tree_id, (head,) if head else (), author or default_author(), int(time.time()),
                        message, dict(metadata or {}))
        cid = repo.save_commit(commit)
        try:
            repo.refs.set_branch_if_equals(branch, cid, head)
        except RefConflictError:
            continue  # the branch moved again: rebase onto the new head
        return ChangesetResult(cid, head, rebased)
    raise RefConflictError(f"branch {branch!r} kept moving; gave up after {max_attempts} attempts")

