"""Branches and tags: references holding a commit id, moved by compare-and-swap.

``refs/branches/<name>`` and ``refs/tags/<name>`` hold 64 hex digits and a
newline.  Branches move only if they still hold the value the writer read;
tags are created once and never move.

Reading is strict: a value that is not exactly 64 lowercase hex digits and an
optional newline (empty, truncated, trailing garbage), or a stored name that
is not a valid ref name, is a DamagedRefError naming the reference, never a
wrong or empty commit id.  Listings take a ``damaged`` dict to collect such
references instead of raising (fsck reports them; a mount keeps showing what
it showed before).
"""

from __future__ import annotations

import re
from collections.abc import Callable

from commitfs.errors import CommitfsError, DamagedRefError, RefConflictError, RevisionError
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


_VALUE = re.compile(rb"[0-9a-f]{64}\n?")


def decode_ref(name: str, value: bytes) -> bytes:
    """The commit id a reference's stored value holds; DamagedRefError naming
    ``name`` for anything but 64 lowercase hex digits and an optional newline."""
    if not _VALUE.fullmatch(value):
        if not value:
            why = "is empty"
        elif len(value) > 80:
            why = f"holds {len(value)} bytes, not a commit id"
        else:
            why = f"holds {value!r}, not a commit id"
        hint = f" (commitfs branch -d {name[len(BRANCHES):]} removes it)" if name.startswith(BRANCHES) else ""
        raise DamagedRefError(f"reference {name} is damaged: it {why}{hint}")
    return bytes.fromhex(value[:64].decode())


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
        return decode_ref(BRANCHES + name, value) if value is not None else None

    def lookup_tag(self, name: str) -> bytes | None:
        if not _is_ref_name(name):
            return None
        value = self.store.load_ref(TAGS + name)
        return decode_ref(TAGS + name, value) if value is not None else None

    def branches(self, damaged: dict[str, str] | None = None) -> dict[str, bytes]:
        """Every branch.  A damaged one raises DamagedRefError, or, given a
        ``damaged`` dict, is left out and recorded there (name: message)."""
        return self._scan(BRANCHES, damaged)

    def tags(self, damaged: dict[str, str] | None = None) -> dict[str, bytes]:
        return self._scan(TAGS, damaged)

    def _scan(self, prefix: str, damaged: dict[str, str] | None) -> dict[str, bytes]:
        out: dict[str, bytes] = {}
        for full, value in self.store.iter_refs(prefix):
            name = full[len(prefix):]
            try:
                if not _is_ref_name(name):
                    raise DamagedRefError(f"reference {full!r} is damaged: not a valid ref name")
                out[name] = decode_ref(full, value)
            except DamagedRefError as exc:
                if damaged is None:
                    raise
                damaged[full] = str(exc)
        return out

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

    def remove_damaged_branch(self, name: str) -> bool:
        """Delete branch ``name`` if (and only if) its value is damaged; True if it was."""
        value = self.store.load_ref(BRANCHES + name) if _is_ref_name(name) else None
        if value is None:
            return False
        try:
            decode_ref(BRANCHES + name, value)
            return False
        except DamagedRefError:
            pass
        try:
            self.store.save_ref_if_equals(BRANCHES + name, None, value)
        except RefConflictError:
            raise RefConflictError(f"branch {name!r} moved meanwhile") from None
        return True

    @staticmethod
    def _check_nesting(name: str, existing: dict[str, bytes], what: str) -> None:
        # As in git: "a" and "a/b" cannot both exist (on a local store one
        # would be a file and the other a directory), on every store alike.
        for other in existing:
            if other.startswith(name + "/") or name.startswith(other + "/"):
                raise CommitfsError(f"{what} {name!r} cannot exist beside {what} {other!r} "
                                    "(one name lies inside the other)")

    def delete_tag_if_equals(self, name: str, expected: bytes) -> None:
        """Delete a tag iff it still names ``expected`` (``commitfs tag -d``)."""
        check_ref_name(name, "tag")
        try:
            self.store.save_ref_if_equals(TAGS + name, None, _encode(expected))
        except RefConflictError:
            raise RefConflictError(f"tag {name!r} changed meanwhile; not deleted") from None

    def create_tag(self, name: str, cid: bytes) -> None:
        check_ref_name(name, "tag")
        self._check_nesting(name, self.tags(), "tag")
        if self.before_publish is not None:
            self.before_publish(cid)
        try:
            self.store.save_ref_if_equals(TAGS + name, _encode(cid), None)
        except RefConflictError:
            raise RevisionError(f"tag {name!r} already exists; tags never move") from None
