"""Commit history: log, and the JSON shape of a commit."""

from __future__ import annotations

from collections.abc import Iterator

from commitfs.model.objects import Commit
from commitfs.repo.repository import Repository


def log(repo: Repository, start: bytes, limit: int | None = None) -> Iterator[tuple[bytes, Commit]]:
    """First-parent history from ``start``, newest first."""
    cid: bytes | None = start
    n = 0
    while cid is not None and (limit is None or n < limit):
        commit = repo.load_commit(cid)
        yield cid, commit
        n += 1
        cid = commit.parents[0] if commit.parents else None


def commit_json(cid: bytes, commit: Commit) -> dict:
    return {
        "id": cid.hex(),
        "tree": commit.tree.hex(),
        "parents": [p.hex() for p in commit.parents],
        "author": commit.author,
        "time": commit.time,
        "message": commit.message,
        "metadata": commit.metadata,
    }
