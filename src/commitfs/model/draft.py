"""Trees being edited: what the change engine (ops/changes.py) works on (pure, no I/O).

A *side* of a path is one of:

* ``None``: nothing there (absent, or deleted);
* a ``TreeEntry``: something stored, named by id (a file, a symlink, a whole
  directory), reused as it is;
* a ``NewFile``: file bytes not stored yet (a local file to chunk, or bytes
  in memory such as a merged table); an ``EditedFile`` is one whose bytes are
  a stored file's with ranges written over it (a workspace's copy-on-write
  file: only the windows around the ranges are chunked again);
* a ``Draft``: a directory being edited, its listing in memory: ``entries``
  over the listing of an optional ``base`` tree (a ``None`` entry deletes a
  base name).  With ``base`` None, ``entries`` is the whole listing.

A writable workspace's snapshot is a Draft whose untouched subtrees are
TreeEntries (never opened); a merge's result is a Draft too.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from commitfs.model.objects import Tree, TreeEntry


@dataclass(frozen=True)
class NewFile:
    """File content not stored yet: a local file (``source``) or bytes (``data``)."""

    source: str | None = None
    data: bytes | None = None
    executable: bool = False
    size: int = 0


@dataclass(frozen=True)
class EditedFile(NewFile):
    """A stored file (``base``, its id) written in place: its first ``base_until``
    bytes are the base's except in ``ranges`` ((start, end) pairs, sorted,
    disjoint), which, like every byte from ``base_until`` to ``size``, are the
    bytes of local file ``source`` at the same offsets (vfs/wscow.py)."""

    base: bytes = b""
    base_until: int = 0
    ranges: tuple[tuple[int, int], ...] = ()


@dataclass
class Draft:
    """A directory being edited: ``entries`` over the listing of tree ``base``."""

    entries: dict[str, TreeEntry | NewFile | Draft | None] = field(default_factory=dict)
    base: bytes | None = None
    #: ``base`` decoded, when its maker holds it already (a workspace's mount does):
    #: the change engine then reads it from here, not from the repository.
    base_tree: Tree | None = field(default=None, compare=False, repr=False)


Side = TreeEntry | NewFile | Draft | None
