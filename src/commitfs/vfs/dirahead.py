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
dropped, and positions are the directory's (in a split directory, whose reader
holds one leaf chunk at a time, the leaf's first position plus the position in
the leaf).  A cold read of a small file at position ``pos`` of its directory
either *follows* the state (``pos`` lies in the window the state has
started, or at most ``FOLLOW_GAP`` files past the furthest read, and at most
``BACK_FILES`` behind it: the reader goes on in directory order) or *jumps*
(anywhere else, or a directory without a state).  A jump cancels the state's
fetches (a fetch already in a worker thread cannot be stopped: it finishes
and its chunks still land in the chunk cache, bounded by its cap, and a read
asking for them meanwhile waits for that thread: vfs/loader.py, "Chunks in
flight") and starts
a new state at ``pos`` that fetches nothing yet: one read is no stream, so a
shuffled reader (a DataLoader's) costs no read-ahead.  A following read
doubles the state's window (from ``AHEAD_FILES / 4`` files up to
``AHEAD_FILES``) and, when fewer than half a window of started files lie
ahead of ``pos``, tops it up to a window of small files (at most
``AHEAD_BYTES`` bytes) past ``pos``, fetched by one task: their manifests (one
ranged read, Loader.manifest with neighbours), then their chunks (one
Repository.load_chunks call: neighbours coalesced, each chunk verified, into
the chunk cache).  The reads that come then find the chunks in the cache; one
that comes while its file's fetch is still running waits for it (``pending``)
instead of fetching the same bytes beside it.

Sweeps: shuffled readers
------------------------
A DataLoader reads a directory's files in a shuffled order: every read is a
jump, and the window above never grows.  Yet it reads every file in the end,
and neighbours in the directory are neighbours in a pack.  So each directory
(at most ``SWEEP_DIRS``, the least recent dropped) also counts its jumps, and
after ``SWEEP_AFTER_JUMPS`` of them a jump to position ``pos`` *sweeps* the
aligned block of ``SWEEP_FILES`` files around it (``pos // SWEEP_FILES``),
the jumping file included: their manifests and chunks in one task as above,
so one coalesced ranged read brings the block, and the reads that come to the
block's other files later find them in the chunk cache.  A block is swept once;
at most ``MAX_SWEEPS`` sweeps are in flight (a jump finding none free sweeps
nothing); a jump does not cancel sweeps (jumping is what a shuffled reader does).

Density.  A reader of a random *subset* of a directory would have a sweep
fetch ``SWEEP_FILES`` times what it reads.  Its reads cannot tell it from a
reader of every file until it stops: the first ``k`` reads of a shuffled
reader of a random ``k`` files and of a shuffled reader of all of them are
alike (each read a uniformly random file not read yet), so a swept file is
as likely to be read next by either, and a share of swept files read so far
is the same for both.  What can be bounded is what sweeps fetch *ahead* of
the reader: a directory sweeps only while its swept files not read yet are
fewer than ``PROBE_FILES`` plus ``SWEPT_PER_READ`` times the files read in
it.  A reader of all of the directory soon has most of it read or swept; a
reader of a subset, when it stops, has had at most about ``PROBE_FILES +
SWEEP_FILES + SWEPT_PER_READ x (files it read)`` files fetched that it never
read, per directory state (about the whole directory without the check).

Pieces
------
A window's or a sweep's files are fetched by one task: their manifests in one
ranged read, then their chunks in *pieces* of consecutive files of at most
``PIECE_BYTES`` (a larger file alone), all at once, each one
Repository.load_chunks call.  A read of a file being fetched waits for its
piece alone (``pending``), not for the whole window: one call for a window
of 32 images was one serial ranged read of up to ``AHEAD_BYTES``, and a
reader whose image lay in it (one cancelled by a jump included: its worker
thread runs on, and the loader has a read that asks for those chunks wait
for it, vfs/loader.py) waited for all of it.

Bounds: at most ``AHEAD_BYTES`` of small files' bytes in flight per directory
and ``MAX_DIRS`` directories; ``MAX_SWEEPS`` blocks of ``SWEEP_FILES`` small
files in flight; fetched bytes live in the chunk cache, whose cap holds.
Errors of a read-ahead are only logged: the file's own read meets and reports
them.  Only a remote repository with a chunk cache reads ahead (a local one is
read in place: the page cache is its read-ahead, which a thread keeps ahead
of a reader going through a pack in order, repo/resident.py).
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
#: A read at most this many files past the furthest one follows it even beyond
#: what was started.  1: only the next file.  A reader taking every Nth file
#: gets no read-ahead (it would fetch N times what it reads: measured slower in
#: scripts/bench.py's s3 section, which reads every 4th image).
FOLLOW_GAP = 1
#: A read this many files behind the furthest one still follows (readers in
#: parallel, a DataLoader's workers, finish their files slightly out of order).
BACK_FILES = 4
#: Directories read ahead at once; the least recent is dropped.
MAX_DIRS = 8
#: A window's or sweep's chunks are fetched in pieces of consecutive files of
#: at most this many bytes, at once (module doc, "Pieces").
PIECE_BYTES = 1024 * 1024

#: Files in a swept block (aligned: block ``pos // SWEEP_FILES``).
SWEEP_FILES = 16
#: Jumps within a directory before its jumps sweep.
SWEEP_AFTER_JUMPS = 16
#: Sweeps in flight at once, over all directories.
MAX_SWEEPS = 8
#: Directories whose jumps and sweeps are tracked; the least recent is dropped.
SWEEP_DIRS = 256
#: Swept files not read yet a directory may have beyond SWEPT_PER_READ per file read (module doc).
PROBE_FILES = 64
#: Swept files not read yet a directory may have per file read in it.
SWEPT_PER_READ = 1


class _State:
    __slots__ = ("first", "last", "until", "window", "scopes")

    def __init__(self, pos: int):
        self.first = pos
        self.window = AHEAD_FILES // 4  # files; doubles with each following read
        self.last = pos  # the furthest file read
        self.until = pos + 1  # entries [first, until) are read or started
        self.scopes: list[trio.CancelScope] = []

    def cancel(self) -> None:
        for scope in self.scopes:
            scope.cancel()
        self.scopes.clear()


class _Sweeps:
    """A directory's jumps and sweeps (module doc, "Sweeps")."""

    __slots__ = ("jumps", "reads", "read", "swept", "unread", "outstanding")

    def __init__(self):
        self.jumps = 0
        self.reads = 0  # distinct small files read
        self.read: dict[int, int] = {}  # block -> bit mask of the positions read
        self.swept: set[int] = set()  # blocks swept
        self.unread: dict[int, int] = {}  # block -> bit mask of swept positions not read yet
        self.outstanding = 0  # their number

    def saw(self, pos: int) -> None:
        """Count a read of ``pos`` (once per position)."""
        block, bit = divmod(pos, SWEEP_FILES)
        mask = self.read.get(block, 0)
        if mask >> bit & 1:
            return
        self.read[block] = mask | 1 << bit
        self.reads += 1
        unread = self.unread.get(block, 0)
        if unread >> bit & 1:
            self.outstanding -= 1
            if unread == 1 << bit:
                del self.unread[block]
            else:
                self.unread[block] = unread & ~(1 << bit)

    def dense(self) -> bool:
        """Whether the directory may sweep: few enough swept files not read yet."""
        return self.outstanding < PROBE_FILES + SWEPT_PER_READ * self.reads


class DirReadAhead:
    def __init__(self, loader, nursery: trio.Nursery, small_bytes: int):
        self._loader = loader
        self._nursery = nursery
        self._small = small_bytes
        self._states: OrderedDict[int, _State] = OrderedDict()
        self._pending: dict[bytes, trio.Event] = {}  # file id -> its read-ahead's end
        self._sweeps: OrderedDict[int, _Sweeps] = OrderedDict()
        self._sweep_scopes: set[trio.CancelScope] = set()
        #: For tests and the log: files fetched ahead, windows cancelled by a jump,
        #: blocks swept and their files (module doc).
        self.files_started = 0
        self.jumps = 0
        self.sweeps = 0
        self.swept_files = 0

    def close(self) -> None:
        for state in self._states.values():
            state.cancel()
        self._states.clear()
        for scope in self._sweep_scopes:
            scope.cancel()
        self._sweeps.clear()

    def pending(self, fid: bytes) -> trio.Event | None:
        """Set when the read-ahead fetching ``fid`` ends, if one is: a read of it
        waits for that rather than fetch the same bytes beside it."""
        return self._pending.get(fid)

    def on_read(self, dir_ino: int, entries: Sequence[TreeEntry], pos: int, base: int = 0) -> None:
        """A cold read of the small file at position ``pos`` of its directory (no
        awaits).  ``entries`` are those the caller holds, the directory's from
        position ``base`` on: all of them for a plain tree (base 0), one leaf chunk
        of a split directory (model/splittree.py).  Positions are the directory's
        throughout, so a reader that goes on from one leaf into the next follows
        its state; what is fetched ahead stays within ``entries``."""
        sweeps = self._sweeps.get(dir_ino)
        if sweeps is None:
            sweeps = self._sweeps[dir_ino] = _Sweeps()
            while len(self._sweeps) > SWEEP_DIRS:
                self._sweeps.popitem(last=False)  # (its sweeps in flight finish: MAX_SWEEPS bounds them)
        else:
            self._sweeps.move_to_end(dir_ino)
        sweeps.saw(pos)
        state = self._states.get(dir_ino)
        if state is not None and max(state.first, state.last - BACK_FILES) <= pos \
                and pos < max(state.until, state.last + 1 + FOLLOW_GAP):
            self._states.move_to_end(dir_ino)
            state.last = max(state.last, pos)
            state.window = min(state.window * 2, AHEAD_FILES)
        else:
            if state is not None:
                self.jumps += 1
                state.cancel()
            state = self._states[dir_ino] = _State(pos)
            self._states.move_to_end(dir_ino)
            while len(self._states) > MAX_DIRS:
                self._states.popitem(last=False)[1].cancel()
            # One read is no stream yet: a shuffled reader costs no window; many jumps sweep.
            sweeps.jumps += 1
            if sweeps.jumps > SWEEP_AFTER_JUMPS:
                self._sweep(sweeps, entries, pos, base)
            return
        end = base + len(entries)
        ahead = sum(1 for e in entries[pos + 1 - base:max(state.until - base, 0)] if self._wanted(e))
        if ahead >= state.window // 2:
            return
        batch, nbytes, j = [], 0, max(state.until, pos + 1)
        while j < end and ahead + len(batch) < state.window and nbytes < AHEAD_BYTES:
            e = entries[j - base]
            if self._wanted(e):
                batch.append(e)
                nbytes += e.size
            j += 1
        state.until = j
        if batch:
            scope = trio.CancelScope()
            state.scopes.append(scope)
            self.files_started += len(batch)
            self._nursery.start_soon(self._fetch, scope, *self._enter(batch))

    def _sweep(self, sweeps: _Sweeps, entries: Sequence[TreeEntry], pos: int, base: int) -> None:
        """Fetch the block of files around ``pos`` if the directory still sweeps (module doc)."""
        block = pos // SWEEP_FILES
        if block in sweeps.swept or len(self._sweep_scopes) >= MAX_SWEEPS or not sweeps.dense():
            return
        sweeps.swept.add(block)
        read = sweeps.read.get(block, 0)
        batch, unread = [], 0
        for p in range(max(block * SWEEP_FILES, base), min((block + 1) * SWEEP_FILES, base + len(entries))):
            e = entries[p - base]
            if not self._wanted(e) or (p != pos and (read >> p % SWEEP_FILES & 1 or e.id in self._pending)):
                continue
            batch.append(e)
            if p != pos:
                unread |= 1 << p % SWEEP_FILES
        if len(batch) <= 1:
            return  # nothing beside the file's own read
        count = bin(unread).count("1")
        if count:
            sweeps.unread[block] = sweeps.unread.get(block, 0) | unread
            sweeps.outstanding += count
        self.sweeps += 1
        self.swept_files += count
        scope = trio.CancelScope()
        self._sweep_scopes.add(scope)
        self._nursery.start_soon(self._swept, scope, *self._enter(batch))

    async def _swept(self, scope: trio.CancelScope, pieces: list[list[bytes]], events: list[trio.Event]) -> None:
        try:
            await self._fetch(scope, pieces, events)
        finally:
            self._sweep_scopes.discard(scope)

    def _wanted(self, e: TreeEntry) -> bool:
        return e.kind.is_file and 0 < e.size <= self._small

    def _enter(self, batch: list[TreeEntry]) -> tuple[list[list[bytes]], list[trio.Event]]:
        """Split a batch into pieces of consecutive files of at most PIECE_BYTES
        (a file larger alone), each with its event, entered as the pending
        fetch of its files: (the pieces' file ids, their events)."""
        pieces: list[list[bytes]] = []
        nbytes = PIECE_BYTES
        for e in batch:
            if nbytes + e.size > PIECE_BYTES:
                pieces.append([])
                nbytes = 0
            pieces[-1].append(e.id)
            nbytes += e.size
        events = [trio.Event() for _ in pieces]
        for piece, done in zip(pieces, events):
            for fid in piece:
                self._pending.setdefault(fid, done)
        return pieces, events

    async def _fetch(self, scope: trio.CancelScope, pieces: list[list[bytes]], events: list[trio.Event]) -> None:
        """The batch's manifests (one ranged read), then its pieces' chunks, the
        pieces at once, each ending its files' wait when it lands (module doc)."""
        fids = [fid for piece in pieces for fid in piece]
        try:
            with scope:
                try:
                    ids: list[list[bytes]] = []
                    for piece in pieces:
                        ids.append([])
                        for fid in piece:
                            manifest = await self._loader.manifest(fid, fids)
                            ids[-1].extend(manifest.chunk_ids)
                    async with trio.open_nursery() as nursery:
                        for piece, done, chunk_ids in zip(pieces, events, ids):
                            nursery.start_soon(self._fetch_piece, piece, done, chunk_ids)
                except Exception as exc:  # the file's own read meets it and reports it
                    log.debug("directory read-ahead of %d files failed: %s", len(fids), exc)
        finally:
            for piece, done in zip(pieces, events):
                self._settle(piece, done)

    async def _fetch_piece(self, fids: list[bytes], done: trio.Event, ids: list[bytes]) -> None:
        try:
            if ids:
                await self._loader.chunks(ids)
        except Exception as exc:  # the file's own read meets it and reports it
            log.debug("directory read-ahead of %d files failed: %s", len(fids), exc)
        finally:
            self._settle(fids, done)

    def _settle(self, fids: list[bytes], done: trio.Event) -> None:
        for fid in fids:
            if self._pending.get(fid) is done:
                del self._pending[fid]
        done.set()
