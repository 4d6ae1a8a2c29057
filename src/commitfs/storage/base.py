"""The storage protocol: the only thing the repository layer knows of storage.

A store holds two kinds of things, and knows nothing of commits or chunks:

* immutable objects, addressed by a key such as ``packs/ab/abcd...``: written
  once and whole (a reader never sees a half-written object), read whole or by
  byte range, listed by prefix, removed by garbage collection;
* references, small mutable values (``refs/branches/main``) changed only by
  compare-and-swap, so two writers can never silently overwrite each other.

Keys are '/'-separated ASCII paths without leading slash.  Names that come
*from* storage (a listing) are checked with :func:`valid_key` before anything
uses them: a key with an empty, '.' or '..' segment, a NUL or a backslash is
never a key commitfs wrote, and would become a path elsewhere on a local disk
(a clone copies keys and refs one by one), so listings leave it out.
"""

from __future__ import annotations

import abc
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO


def valid_key(key: str) -> bool:
    """True if ``key`` (a name read from storage) is one commitfs could have written."""
    if not key or key.startswith("/") or "\0" in key or "\\" in key:
        return False
    return all(seg not in ("", ".", "..") for seg in key.split("/"))


class Store(abc.ABC):
    """Abstract storage backend."""

    #: The URL this store was opened from (``/path``, ``file:///path``, ``s3://bucket/prefix``).
    url: str

    # --- immutable objects -------------------------------------------------
    @abc.abstractmethod
    def save_object(self, key: str, data: bytes) -> None:
        """Store ``data`` (any bytes-like object) under ``key`` atomically;
        rewriting identical data is harmless."""

    def save_object_from(self, key: str, f: BinaryIO, size: int) -> None:
        """Store the first ``size`` bytes of seekable binary file ``f`` under ``key``,
        atomically as ``save_object``, for objects too large to hold in memory
        (an index merge's output).  The default reads them whole; stores
        override it with a streamed write."""
        f.seek(0)
        data = f.read(size)
        if len(data) != size:
            raise ValueError(f"{key}: the file holds {len(data)} bytes, not {size}")
        self.save_object(key, data)

    @abc.abstractmethod
    def load_object(self, key: str) -> bytes:
        """Return the whole object; raise ObjectNotFoundError if absent."""

    @abc.abstractmethod
    def load_range(self, key: str, offset: int, length: int) -> bytes:
        """Return ``length`` bytes from ``offset``; fewer only at the object's end."""

    @abc.abstractmethod
    def lookup_size(self, key: str) -> int | None:
        """Return the object's size, or None if it does not exist."""

    @abc.abstractmethod
    def iter_keys(self, prefix: str = "") -> Iterator[str]:
        """Yield every object key starting with ``prefix`` (order unspecified)."""

    def iter_objects(self, prefix: str = "") -> Iterator[tuple[str, int, float | None]]:
        """Yield (key, size, mtime) of every object key starting with ``prefix``;
        mtime is seconds since the epoch when the object was written, or None
        where the store cannot tell (gc then treats the object as just written).
        The default asks for each size; stores override it with one listing."""
        for key in self.iter_keys(prefix):
            size = self.lookup_size(key)
            if size is not None:
                yield key, size, None

    @abc.abstractmethod
    def remove_object(self, key: str) -> None:
        """Remove an object; removing an absent one is not an error."""

    # --- references ---------------------------------------------------------
    @abc.abstractmethod
    def load_ref(self, name: str) -> bytes | None:
        """Return the reference's value, or None if it does not exist."""

    @abc.abstractmethod
    def save_ref_if_equals(self, name: str, new: bytes | None, expected: bytes | None) -> None:
        """Set ``name`` to ``new`` (None deletes it) only if it currently holds
        ``expected`` (None: only if it does not exist).  Raise RefConflictError
        otherwise.  Atomic with respect to every other writer of the store."""

    @abc.abstractmethod
    def iter_refs(self, prefix: str = "") -> Iterator[tuple[str, bytes]]:
        """Yield (name, value) of every reference whose name starts with ``prefix``."""

    # --- locality ----------------------------------------------------------
    def local_path(self, key: str) -> Path | None:
        """The file holding ``key`` if this store is a local directory, else None.

        Lets readers of a local repository read packs in place instead of
        copying them into a cache."""
        return None

    def close(self) -> None:
        """Release connections and file descriptors."""

