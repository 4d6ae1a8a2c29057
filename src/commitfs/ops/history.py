"""Commit history: log (first-parent, or every parent for ranges and --all), and
the JSON shape of a commit."""

from __future__ import annotations

import heapq
from collections.abc import Iterator

from commitfs.errors import RevisionError
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


def parse_range(repo: Repository, spec: str) -> tuple[list[bytes], list[bytes]] | None:
    """``A..B`` as (include [B], exclude [A]) (an empty side is ``main``, as git's is
    HEAD); None if ``spec`` is not a range."""
    if ".." not in spec:
        return None
    a, sep, b = spec.partition("..")
    if b.startswith("."):
        raise RevisionError(f"invalid range {spec!r}: A...B is not supported, only A..B")
    return [repo.resolve(b or "main")], [repo.resolve(a or "main")]


def ancestors(repo: Repository, starts) -> set[bytes]:
    """Every commit reachable from ``starts`` through all parents, ``starts`` included."""
    seen: set[bytes] = set()
    todo = list(starts)
    while todo:
        cid = todo.pop()
        if cid in seen:
            continue
        seen.add(cid)
        todo.extend(repo.load_commit(cid).parents)
    return seen


def walk(repo: Repository, include, exclude=(), limit: int | None = None) -> Iterator[tuple[bytes, Commit]]:
    """Commits reachable from ``include`` through all parents and not from ``exclude``,
    newest first (by commit time; ties in the order met), each once: ``log A..B``
    and ``log --all``."""
    hidden = ancestors(repo, exclude) if exclude else set()
    heap: list = []
    queued: set[bytes] = set()
    order = 0

    def push(cid: bytes) -> None:
        nonlocal order
        if cid in queued or cid in hidden:
            return
        queued.add(cid)
        c = repo.load_commit(cid)
        heapq.heappush(heap, (-c.time, order, cid, c))
        order += 1

    for cid in include:
        push(cid)
    n = 0
    while heap and (limit is None or n < limit):
        _, _, cid, c = heapq.heappop(heap)
        yield cid, c
        n += 1
        for p in c.parents:
            push(p)


def all_heads(repo: Repository) -> list[bytes]:
    """The commits every branch and tag names (``log --all``)."""
    heads = list(repo.refs.branches().values()) + list(repo.refs.tags().values())
    return list(dict.fromkeys(heads))


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
