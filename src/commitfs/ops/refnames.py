"""Renaming and deleting references: ``branch -m OLD NEW`` and ``tag -d NAME``.

Every step is a compare-and-swap (repo/refs.py), so nothing is overwritten
and a reference that moved meanwhile is not lost.
"""

from __future__ import annotations

from commitfs.errors import RefConflictError, RevisionError
from commitfs.repo.repository import Repository


def rename_branch(repo: Repository, old: str, new: str) -> bytes:
    """Move branch ``old`` to the name ``new`` (which must not exist); return its commit.

    NEW is created at OLD's commit first (refused if NEW exists), then OLD is
    deleted only if it still holds that commit; if OLD moved meanwhile, NEW is
    removed again and the rename fails, leaving OLD where it went."""
    cid = repo.refs.lookup_branch(old)
    if cid is None:
        raise RevisionError(f"no branch {old!r}")
    if old == new:
        raise RevisionError(f"branch {old!r} already has that name")
    repo.refs.set_branch_if_equals(new, cid, None)  # raises if NEW exists
    try:
        repo.refs.set_branch_if_equals(old, None, cid)
    except RefConflictError:
        repo.refs.set_branch_if_equals(new, None, cid)
        raise RefConflictError(f"branch {old!r} moved meanwhile; not renamed") from None
    return cid


def delete_tag(repo: Repository, name: str) -> bytes:
    """Delete tag ``name``; return the commit it named."""
    cid = repo.refs.lookup_tag(name)
    if cid is None:
        raise RevisionError(f"no tag {name!r}")
    repo.refs.delete_tag_if_equals(name, cid)
    return cid
