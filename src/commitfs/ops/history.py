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


def topo_walk(repo: Repository, include, exclude=()) -> list[tuple[bytes, Commit]]:
    """The commits ``walk`` finds, ordered so that every commit comes before its
    parents (newest first among those ready), for ``log --graph``; it reads
    every commit reachable before returning."""
    found = list(walk(repo, include, exclude))
    rank = {cid: i for i, (cid, _) in enumerate(found)}
    children = dict.fromkeys(rank, 0)
    for _, c in found:
        for p in dict.fromkeys(c.parents):
            if p in children:
                children[p] += 1
    ready = [(rank[cid], cid) for cid, n in children.items() if n == 0]
    heapq.heapify(ready)
    out = []
    while ready:
        _, cid = heapq.heappop(ready)
        c = found[rank[cid]][1]
        out.append((cid, c))
        for p in dict.fromkeys(c.parents):
            if p in children:
                children[p] -= 1
                if children[p] == 0:
                    heapq.heappush(ready, (rank[p], p))
    return out


def graph(items, limit: int | None = None) -> Iterator[tuple[str, tuple[bytes, Commit] | None]]:
    """An ASCII graph of commits in topological order (children first), as git's
    ``log --graph``: (prefix, (cid, commit)) for a commit's line, whose ``*``
    stands in its lane, and (prefix, None) for a line that only draws edges:
    ``\\`` where a merge opens a lane for its second parent, ``/`` where a lane
    joins another (two children of one parent) or closes, ``|`` lanes that go
    on.  Lanes hold the commit each one waits for; the first parent keeps the
    commit's lane, so the first-parent chain stays in one column."""
    lanes: list[bytes] = []
    n = 0
    for cid, c in items:
        if limit is not None and n >= limit:
            return
        n += 1
        at = [i for i, x in enumerate(lanes) if x == cid]
        if not at:
            lanes.append(cid)
            at = [len(lanes) - 1]
        col = at[0]
        while len(at) > 1:  # other lanes waited for this commit too: they join it, one a line
            yield _shift_left(len(lanes), at[1]), None
            del lanes[at[1]]
            at = [i for i, x in enumerate(lanes) if x == cid]
        yield " ".join("*" if i == col else "|" for i in range(len(lanes))), (cid, c)
        parents = list(dict.fromkeys(c.parents))
        if not parents:
            if col < len(lanes) - 1:
                yield _shift_left(len(lanes), col + 1, blank={col}), None
            del lanes[col]
            continue
        lanes[col] = parents[0]
        for k, p in enumerate(parents[1:]):
            at_new = col + 1 + k
            yield _opening(len(lanes), at_new), None
            lanes.insert(at_new, p)


def _shift_left(width: int, first: int, blank=()) -> str:
    """Lanes from ``first`` on move one column left (``/``); ``blank`` lanes end."""
    row = [" "] * (2 * width)
    for i in range(width):
        if i in blank:
            continue
        if i < first:
            row[2 * i] = "|"
        else:
            row[2 * i - 1] = "/"
    return "".join(row).rstrip()


def _opening(width: int, at: int) -> str:
    """A lane opening at column ``at`` (``\\`` from the merge's column); lanes
    from ``at`` on move one column right."""
    row = [" "] * (2 * width + 2)
    for i in range(at):
        row[2 * i] = "|"
    row[2 * at - 1] = "\\"
    for i in range(at, width):
        row[2 * i + 1] = "\\"
    return "".join(row).rstrip()
