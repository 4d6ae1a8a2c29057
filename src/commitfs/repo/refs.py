"""Branches and tags: references holding a commit id, moved by compare-and-swap.

``refs/branches/<name>`` and ``refs/tags/<name>`` hold 64 hex digits and a
newline.  Branches move only if they still hold the value the writer read;
tags are created once and never move.
"""

from __future__ import annotations

import re
from collections.abc import Callable

from commitfs.errors import CommitfsError, RefConflictError, RevisionError
from commitfs.storage.base import Store

BRANCHES = "branches/"
TAGS = "tags/"

_NAME = re.compile(r"^(?!-)(?!.*\.\.)(?!.*//)[A-Za-z0-9._/-]+(?<![/.])$")


def check_ref_name(name: str, what: str = "branch") -> str:
    if not _NAME.match(name) or name.startswith("/") or name.endswith(".lock") or "~" in name:
        raise CommitfsError(f"invalid {what} name {name!r} (use letters, digits, '.', '_', '-', '/')")
    return name


def _is_ref_name(name: str) -> bool:
    try:
        check_ref_name(name)
    except CommitfsError:
        return False
    return True


def _encode(cid: bytes) -> bytes:
    return cid.hex().encode() + b"\n"


def _decode(value: bytes) -> bytes:
    return bytes.fromhex(value.strip().decode())


class Refs:
    def __init__(self, store: Store, before_publish: Callable[[bytes], None] | None = None):
        self.store = store
        #: Called with the commit id just before a branch or tag is set to it
        #: (Repository.check_publishable: a concurrent gc is not removing it).
        self.before_publish = before_publish

    def lookup_branch(self, name: str) -> bytes | None:
        if not _is_ref_name(name):  # e.g. "../x": no such branch, and never a store key
            return None
        value = self.store.load_ref(BRANCHES + name)
        return _decode(value) if value is not None else None

    def lookup_tag(self, name: str) -> bytes | None:
        if not _is_ref_name(name):
            return None
        value = self.store.load_ref(TAGS + name)
        return _decode(value) if value is not None else None

    def branches(self) -> dict[str, bytes]:
        return {n[len(BRANCHES):]: _decode(v) for n, v in self.store.iter_refs(BRANCHES)}

    def tags(self) -> dict[str, bytes]:
        return {n[len(TAGS):]: _decode(v) for n, v in self.store.iter_refs(TAGS)}

    def set_branch_if_equals(self, name: str, new: bytes | None, expected: bytes | None) -> None:
        """Move (or create, or with new=None delete) a branch iff it holds ``expected``."""
        check_ref_name(name)
        if expected is None and new is not None:
            self._check_nesting(name, self.branches(), "branch")
        if new is not None and self.before_publish is not None:
            self.before_publish(new)
        try:
            self.store.save_ref_if_equals(
                BRANCHES + name,
                _encode(new) if new is not None else None,
                _encode(expected) if expected is not None else None,
            )
        except RefConflictError:
            now = self.lookup_branch(name)
            state = f"now at {now.hex()[:12]}" if now else "now absent"
            if expected is None:
                raise RefConflictError(f"branch {name!r} already exists ({state})") from None
            raise RefConflictError(
                f"branch {name!r} moved meanwhile (expected {expected.hex()[:12]}, {state})"
            ) from None

    @staticmethod
    def _check_nesting(name: str, existing: dict[str, bytes], what: str) -> None:
        # As in git: "a" and "a/b" cannot both exist (on a local store one
        # would be a file and the other a directory), on every store alike.
        for other in existing:
            if other.startswith(name + "/") or name.startswith(other + "/"):
                raise CommitfsError(f"{what} {name!r} cannot exist beside {what} {other!r} "
                                    "(one name lies inside the other)")

    def create_tag(self, name: str, cid: bytes) -> None:
        check_ref_name(name, "tag")
        self._check_nesting(name, self.tags(), "tag")
        if self.before_publish is not None:
            self.before_publish(cid)
        try:
            self.store.save_ref_if_equals(TAGS + name, _encode(cid), None)
        except RefConflictError:
            raise RevisionError(f"tag {name!r} already exists; tags never move") from None
