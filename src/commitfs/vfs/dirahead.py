"""Directory read-ahead: a reader of a directory's small files from a remote
repository finds the next files' chunks already fetched.

Why
---
A training job reads a directory of images one after another, each a few
hundred KiB: one round trip to S3 per file caps it at a file per round trip,
however fast the link.  A commit writes a directory's files in directory
order, one after another in its packs, so the next files' chunks lie right
after this one's: one coalesced ranged read fetches many of them.

How
---
One state per directory (its inode), at most ``MAX_DIRS``, the least recent
dropped.  A cold read of a small file at position ``pos`` of its directory's
tree either *follows* the state (``pos`` lies in the window the state has
started, at most ``BACK_FILES`` behind the furthest file read: the reader goes
on in directory order) or *jumps* (anywhere else, or a directory without a
state).  A jump cancels the state's fetches (a fetch
already in a worker thread cannot be stopped: it finishes and its chunks still
land in the chunk cache, bounded by its cap) and starts a new window at
``pos``.  Either way, when fewer than half of ``AHEAD_FILES`` started files lie
ahead of ``pos``, the window is topped up to ``AHEAD_FILES`` small files or
``AHEAD_BYTES`` bytes past ``pos``, fetched by one task: their manifests (one
ranged read, Loader.manifest with neighbours), then their chunks (one
Repository.load_chunks call: neighbours coalesced, each chunk verified, into
the chunk cache).  The reads that come then find the chunks in the cache.

Bounds: at most ``AHEAD_BYTES`` of small files' bytes in flight per directory
and ``MAX_DIRS`` directories; fetched bytes live in the chunk cache, whose cap
holds.  Errors of a read-ahead are only logged: the file's own read meets and
reports them.  Only a remote repository with a chunk cache reads ahead (a local
one is read in place: the page cache is its read-ahead).
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from collections.abc import Sequence

import trio

from commitfs.model.objects import TreeEntry

log = logging.getLogger(__name__)

#: Small files fetched ahead of a reader, at most.
AHEAD_FILES = 32
#: Bytes of small files fetched ahead of a reader, at most.
AHEAD_BYTES = 8 * 1024 * 1024
#: A read this many files behind the furthest one still follows (readers in
#: parallel, a DataLoader's workers, finish their files slightly out of order).
BACK_FILES = 4
#: Directories read ahead at once; the least recent is dropped.
MAX_DIRS = 8


class _State:
    __slots__ = ("first", "last", "until", "scopes")

    def __init__(self, pos: int):
        self.first = pos
        self.last = pos  # the furthest file read
        self.until = pos + 1  # entries [first, until) are read or started
        self.scopes: list[trio.CancelScope] = []

    def cancel(self) -> None:
        for scope in self.scopes:
            scope.cancel()
        self.scopes.clear()


class DirReadAhead:
    def __init__(self, loader, nursery: trio.Nursery, small_bytes: int):
        self._loader = loader
        self._nursery = nursery
        self._small = small_bytes
        self._states: OrderedDict[int, _State] = OrderedDict()
        #: For tests and the log: files fetched ahead, windows cancelled by a jump.
        self.files_started = 0
        self.jumps = 0

    def close(self) -> None:
        for state in self._states.values():
            state.cancel()
        self._states.clear()

    def on_read(self, dir_ino: int, entries: Sequence[TreeEntry], pos: int) -> None:
        """A cold read of the small file ``entries[pos]`` (no awaits)."""
        state = self._states.get(dir_ino)
        if state is not None and max(state.first, state.last - BACK_FILES) <= pos < state.until:
            self._states.move_to_end(dir_ino)
            state.last = max(state.last, pos)
        else:
            if state is not None:
                self.jumps += 1
                state.cancel()
            state = self._states[dir_ino] = _State(pos)
            self._states.move_to_end(dir_ino)
            while len(self._states) > MAX_DIRS:
                self._states.popitem(last=False)[1].cancel()
        ahead = sum(1 for e in entries[pos + 1:state.until] if self._wanted(e))
        if ahead >= AHEAD_FILES // 2:
            return
        batch, nbytes, j = [], 0, max(state.until, pos + 1)
        while j < len(entries) and ahead + len(batch) < AHEAD_FILES and nbytes < AHEAD_BYTES:
            e = entries[j]
            if self._wanted(e):
                batch.append(e.id)
                nbytes += e.size
            j += 1
        state.until = j
        if batch:
            scope = trio.CancelScope()
            state.scopes.append(scope)
            self.files_started += len(batch)
            self._nursery.start_soon(self._fetch, scope, batch)

    def _wanted(self, e: TreeEntry) -> bool:
        return e.kind.is_file and 0 < e.size <= self._small

    async def _fetch(self, scope: trio.CancelScope, fids: list[bytes]) -> None:
        with scope:
            try:
                ids: list[bytes] = []
                for fid in fids:
                    manifest = await self._loader.manifest(fid, fids)
                    ids.extend(manifest.chunk_ids)
                if ids:
                    await self._loader.chunks(ids)
            except Exception as exc:  # the file's own read meets it and reports it
                log.debug("directory read-ahead of %d files failed: %s", len(fids), exc)
