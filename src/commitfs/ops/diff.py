"""Differences between two trees; identical subtrees are skipped by id."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

from commitfs.model.objects import TreeEntry
from commitfs.ops.browse import walk_tree
from commitfs.ops.changes import dir_entry, iter_changes
from commitfs.repo.repository import Repository


@dataclass(frozen=True)
class Change:
    status: str  # "added", "removed", "modified"
    path: str
    old: TreeEntry | None
    new: TreeEntry | None

    def to_json(self) -> dict:
        def side(e):
            if e is None:
                return None
            return {"kind": e.kind.name.lower(), "size": e.size, "id": e.id.hex()}

        return {"status": self.status, "path": self.path, "old": side(self.old), "new": side(self.new)}


def diff_trees(repo: Repository, old: bytes | None, new: bytes | None, prefix: str = "") -> Iterator[Change]:
    """Changed files and symlinks (directories are descended, not reported).

    The change engine (ops/changes.py) finds the top-most differing paths,
    skipping equal subtrees by id; a directory against a file or nothing is
    reported as the files below it."""
    a = dir_entry(old) if old else None
    b = dir_entry(new) if new else None
    for path, ea, eb in iter_changes(repo, a, b, prefix):
        if ea is not None and not ea.is_dir and eb is not None and not eb.is_dir:
            yield Change("modified", path, ea, eb)
            continue
        if ea is not None:
            if ea.is_dir:
                for item in walk_tree(repo, ea.id, path):
                    if not item.entry.is_dir:
                        yield Change("removed", item.path, item.entry, None)
            else:
                yield Change("removed", path, ea, None)
        if eb is not None:
            if eb.is_dir:
                for item in walk_tree(repo, eb.id, path):
                    if not item.entry.is_dir:
                        yield Change("added", item.path, None, item.entry)
            else:
                yield Change("added", path, None, eb)
