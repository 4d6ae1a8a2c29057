"""Bounded walks: a tree is a DAG, and its paths must not multiply without bound.

Trees are named by their hash, so two directories with the same content share
one tree object.  That is what makes a commit of a dataset with duplicated
folders cheap, and it is also how a hostile repository can make a walk
explode: 41 trees, each naming the next twice, hold 2^40 paths.  A walk that
visits paths (checkout, ``ls -R``, a diff's added or removed subtree, stats)
first counts them here, memoized by tree id, so the count costs one visit per
*distinct* tree, never one per path, and refuses the walk if

    paths below the tree  >  MAX_PATHS_ALLOWANCE + MAX_PATHS_RATIO * entries

where ``entries`` is the total number of entries in the distinct trees below
it (what is actually stored).  Without sharing, paths equal entries and the
rule never refuses; with the usual sharing (a folder duplicated a few times,
a thousand copies of a small one) the allowance absorbs it; a DAG built to
multiply paths is refused with ExpansionLimitError, before any work.  fsck,
gc and sync visit each tree once by id and need no bound.  docs/FORMAT.md,
"Bounds on walks", states the rule.
"""

from __future__ import annotations

import os

from commitfs.errors import CorruptObjectError, ExpansionLimitError, InputError
from commitfs.model.objects import Kind

#: Paths any walk may visit whatever the sharing (10^6: a large dataset's folders
#: duplicated many times over still fit); $COMMITFS_WALK_ALLOWANCE overrides it.
MAX_PATHS_ALLOWANCE = 1_000_000
#: And beyond it, paths per stored entry.
MAX_PATHS_RATIO = 64


def check_expansion(repo, tree_id: bytes) -> int:
    """The number of paths below ``tree_id`` (every entry at every depth);
    ExpansionLimitError if the rule above refuses it.  Loads each distinct
    tree below once (the walk's own reads, which the repository caches); a
    tree once accepted is remembered by the repository object."""
    accepted: dict[bytes, int] = repo.__dict__.setdefault("_accepted_path_counts", {})
    if tree_id in accepted:
        return accepted[tree_id]
    paths, entries = _count(repo, tree_id)
    allowance = _allowance()
    if paths > allowance + MAX_PATHS_RATIO * entries:
        raise ExpansionLimitError(
            f"tree {tree_id.hex()} holds {paths:,} paths but only {entries:,} stored entries "
            f"(shared subtrees multiply its paths); refusing to walk it (limit: "
            f"{allowance:,} + {MAX_PATHS_RATIO} per stored entry; COMMITFS_WALK_ALLOWANCE raises it)")
    accepted[tree_id] = paths
    return paths


def _allowance() -> int:
    value = os.environ.get("COMMITFS_WALK_ALLOWANCE")
    if value:
        try:
            return max(0, int(value))
        except ValueError:
            raise InputError(f"COMMITFS_WALK_ALLOWANCE must be a number of paths, not {value!r}") from None
    return MAX_PATHS_ALLOWANCE


def _count(repo, root: bytes) -> tuple[int, int]:
    """(paths below ``root``, entries of the distinct trees below it): one
    visit per distinct tree, iteratively (no recursion limit)."""
    memo: dict[bytes, int] = {}  # tree id -> paths below it
    entries = 0
    on_path: set[bytes] = set()
    stack: list[tuple[bytes, list | None]] = [(root, None)]
    while stack:
        tid, kids = stack[-1]
        if kids is None:
            if tid in memo:  # reached again by another path: counted already
                stack.pop()
                continue
            if tid in on_path:  # impossible with honest hashes; cheap to refuse
                raise CorruptObjectError(f"tree {tid.hex()} contains itself")
            listed = repo.load_tree(tid).entries  # a split directory's: every chunk's (once)
            entries += len(listed)
            kids = [(e.id) for e in listed if e.kind is Kind.DIR]
            stack[-1] = (tid, [len(listed), kids])
            on_path.add(tid)
            stack.extend((k, None) for k in dict.fromkeys(kids) if k not in memo)
            continue
        stack.pop()  # every child above it is done
        on_path.discard(tid)
        own, children = kids
        memo[tid] = own + sum(memo[k] for k in children)
    return memo[root], entries
