"""``commitfs find PATTERN [REV...]``: which commits hold a path matching a glob
(restic's ``find``).

A pattern without ``/`` is matched against each entry's name, one with ``/``
against its whole path from the root (``*`` then crosses ``/`` too, as in
fnmatch); files, directories and symlinks all match.  Commits are searched
newest first: the history of each REV (all parents), or without REV every
commit a branch or tag reaches.  A subtree already searched at the same path
(same tree id: unchanged between commits) is not searched again, so the cost
follows the number of distinct trees, not commits times files.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Iterator
from dataclasses import dataclass

from commitfs.model.objects import Commit, Kind, TreeEntry
from commitfs.ops import history
from commitfs.repo.repository import Repository


@dataclass(frozen=True)
class Match:
    path: str
    entry: TreeEntry

    def to_json(self) -> dict:
        kind = "dir" if self.entry.is_dir else "symlink" if self.entry.kind is Kind.SYMLINK else "file"
        return {"path": self.path, "kind": kind, "size": self.entry.size, "id": self.entry.id.hex()}


@dataclass(frozen=True)
class Found:
    commit_id: bytes
    commit: Commit
    matches: list[Match]

    def to_json(self) -> dict:
        return {**history.commit_json(self.commit_id, self.commit), "matches": [m.to_json() for m in self.matches]}


def find(repo: Repository, pattern: str, starts: list[bytes] | None = None) -> Iterator[Found]:
    """Each searched commit holding a matching path, newest first, with its matches
    (sorted by path).  ``starts``: where history is walked from (default: every
    branch and tag)."""
    whole_path = "/" in pattern
    pattern = pattern.strip("/") if whole_path else pattern
    memo: dict[tuple[str, bytes], list[Match]] = {}

    def search(tree_id: bytes, prefix: str) -> list[Match]:
        key = (prefix, tree_id)
        if key in memo:
            return memo[key]
        out: list[Match] = []
        for e in repo.load_tree(tree_id).entries:
            path = prefix + e.name
            if fnmatch.fnmatchcase(path if whole_path else e.name, pattern):
                out.append(Match(path, e))
            if e.is_dir:
                out.extend(search(e.id, path + "/"))
        memo[key] = out
        return out

    for cid, c in history.walk(repo, history.all_heads(repo) if starts is None else starts):
        matches = search(c.tree, "")
        if matches:
            yield Found(cid, c, sorted(matches, key=lambda m: m.path))
