"""Per-handle read-ahead: a growing window of chunk fetches, tolerant of small seeks.

Why
---
A training job reads a file front to back in 128 KiB kernel requests.  Each
request answered by one storage round trip would cap throughput at
128 KiB per round trip (a few MB/s against S3).  So, as Mountpoint for Amazon
S3's prefetcher does, each open handle keeps fetches running *ahead* of the
reader: the further the reader goes sequentially, the larger the window it
gets; a real seek shrinks the window back so a random reader does not pay for
data it will not read.

How
---
A file is a list of chunks (FileManifest); offsets map to chunk indices by
prefix sums (FileManifest.chunk_range).  Fetches are *parts*: runs of
consecutive chunks of at most ``part_bytes``, each fetched by one call of the
``fetch`` function (Repository.load_chunks in a worker thread, which
coalesces neighbouring chunks of a pack into one ranged read and goes through
the chunk cache).  Parts run as tasks in the file system's nursery, not in
the reader's request, so a prefetch outlives the read that started it; the
``fetch`` function bounds each one by the I/O timeout.  Several parts of one
window run at once (up to the file system's thread limit), which is what
saturates an object store.

On each read at ``off``:

1. *Sequential or not.*  The read is sequential if it starts within
   ``[expected - back_tolerance, expected + window]``, where ``expected`` is
   the furthest end read so far.  The kernel sends readahead requests
   concurrently, so they arrive slightly out of order (hence the backward
   tolerance), and a forward skip within the window costs nothing since its
   data is already on the way.  A first read is sequential if it starts at
   offset 0 (the beginning of a stream, with the initial window), else not.
2. *Window.*  Sequential: the window doubles, up to ``max_window``.
   Otherwise it falls back to ``initial_window`` and parts that do not cover
   the new position are dropped (a fetch in flight finishes and its result is
   discarded; worker threads cannot be cancelled).
3. *Demand.*  Parts are started for the chunks the read needs that are not
   yet fetched or in flight.  A read that is not sequential stops here: it
   fetches exactly the chunks it overlaps, nothing more.
4. *Read-ahead.*  A sequential read tops up the read-ahead when less than
   half a window is left between ``expected`` and the furthest chunk already
   started, by starting parts up to a whole window past ``expected``: a few
   large fetches per window rather than a small one per read (the kernel's
   requests are only 128-256 KiB).  Demand and read-ahead chunks that are
   neighbours share parts, so a small file read from its start is one fetch.
5. *Wait, assemble, trim.*  The read waits for the parts it overlaps, joins
   their chunks and slices the requested bytes.  Parts wholly behind
   ``expected - back_tolerance`` are released, so memory per handle is bounded
   by about ``max_window + back_tolerance + part_bytes``.

A part a read is waiting for is first fetched inline with ``fetch_now``
(the file system's load from memory: bytes at hand, no worker thread, no
task); only if that would block does it become a task.  Read-ahead parts
are always tasks, so the reader never waits for bytes it has not asked for.
``prime()`` starts the initial window at a file's first open.

*Publishing.*  A read that is not sequential fetches the chunk or two it
overlaps, whole (no byte leaves unverified), for the few KiB the kernel asked
for.  With ``publish`` set, the chunks of such a demand part are handed to it
with their file offset once verified: the file system gives them to the
kernel's page cache (FUSE's notify-store), so the next random reads in the
same chunks are the kernel's alone, with no request at all.  With
``publish_around`` set as well, it is then told the part's chunk range: the
file system has the chunks around it read, verified and published too, off
the event loop (vfs/core.py, ``_publish_around``), so that a random reader's
next reads near earlier ones find the page cache filled ahead of them.

A failed part raises its error to every read that needs it (the kernel
returns EIO) and is forgotten, so the next read of that range tries again.
Failures of parts no read needs are only logged.

All state changes happen in synchronous code between awaits (trio runs one
task at a time), in ``_schedule``; the only awaits in ``read`` are on parts'
completion events, after which the parts are looked up again.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable

import trio

from commitfs.model.objects import FileManifest, check_chunk_sizes
from commitfs.vfs.errors import ShuttingDownError

log = logging.getLogger(__name__)

#: The window of the first sequential read after the start or a seek; it doubles from there.
INITIAL_WINDOW = 256 * 1024
#: Ceiling of the window: enough parts in flight to fill a fast link to S3.
MAX_WINDOW = 32 * 1024 * 1024
#: Bytes per fetch: a few chunks in one ranged read; several parts run at once.
PART_BYTES = 2 * 1024 * 1024
#: Reads this far behind the furthest one still count as sequential (kernel reordering).
BACK_TOLERANCE = 1024 * 1024

Fetch = Callable[[list[bytes]], Awaitable[list[bytes]]]
#: Chunks now, without waiting for storage, or None if they are not in memory.
FetchNow = Callable[[list[bytes]], "list[bytes] | None"]
#: Verified chunks a random read fetched, with the file offset of the first (module doc).
Publish = Callable[[int, list], None]
#: The chunk range [first, last) of a random read's published part (module doc).
PublishAround = Callable[[int, int], None]


class _Part:
    """A fetch of chunks [first, last) of one file."""

    __slots__ = ("first", "last", "done", "chunks", "error", "publish")

    def __init__(self, first: int, last: int, publish: bool = False):
        self.first = first
        self.last = last
        self.publish = publish  # hand its chunks to ``publish`` once fetched (module doc)
        self.done = trio.Event()
        self.chunks: list[bytes] | None = None
        self.error: BaseException | None = None


class Prefetcher:
    """Reads of one open file, with read-ahead."""

    def __init__(self, manifest: FileManifest, fetch: Fetch, nursery: trio.Nursery, *,
                 fetch_now: FetchNow | None = None, publish: Publish | None = None,
                 publish_around: PublishAround | None = None,
                 initial_window: int = INITIAL_WINDOW, max_window: int = MAX_WINDOW,
                 part_bytes: int = PART_BYTES, back_tolerance: int = BACK_TOLERANCE):
        self.layout = manifest  # offsets to chunks: its prefix sums
        self.size = self.layout.size
        self._ids = manifest.chunk_ids
        self._sizes = manifest.chunk_sizes
        self._fetch = fetch
        self._fetch_now = fetch_now
        self._publish = publish
        self._publish_around = publish_around
        self._seeking = False  # the read being scheduled is not sequential
        self._nursery = nursery
        self.initial_window = initial_window
        self.max_window = max(max_window, initial_window)
        self.part_bytes = part_bytes
        self.back_tolerance = back_tolerance
        self.window = initial_window
        self._expected: int | None = None  # furthest end read so far
        self._parts: dict[int, _Part] = {}  # chunk index -> the part fetching it
        self._live: set[_Part] = set()  # the parts in _parts
        self._frontier = 0  # chunk index up to which read-ahead has been started
        self._closed = False
        #: The (offset, size) read_now scheduled and could not answer: the ``read`` of it
        #: that follows does not schedule it again.
        self._scheduled: tuple[int, int] | None = None
        #: Counters for tests and the log: parts started, sequential/random reads.
        self.parts_started = 0
        self.parts_inline = 0
        self.sequential_reads = 0
        self.random_reads = 0

    def continues(self, off: int) -> bool:
        """True if a read at ``off`` would be sequential for this stream (a
        first read: at offset 0); the file system routes an inode's reads to
        the stream they continue (vfs/core.py, read streams)."""
        expected = self._expected
        if expected is None:
            return off == 0
        return expected - self.back_tolerance <= off <= expected + self.window

    def distance(self, off: int) -> int:
        """How far ``off`` is from where this stream's reader is (0 for a first read)."""
        return abs(off - self._expected) if self._expected is not None else 0

    @property
    def untouched(self) -> bool:
        """No read has come yet (a stream made for a read that never came, or primed)."""
        return self._expected is None

    def close(self) -> None:
        self._closed = True
        self._parts.clear()
        self._live.clear()

    def prime(self) -> None:
        """Start fetching the initial window from offset 0 now, before any read
        asks: called at a file's first open, since nearly every open is followed
        by a read from the start.  A first read elsewhere drops it (a seek)."""
        if self.size:
            self._start_missing(*self.layout.chunk_range(0, self.initial_window), demand_end=len(self._ids))

    # --- reading ---------------------------------------------------------------
    def read_now(self, off: int, size: int):
        """``read`` without waiting: the bytes if every chunk the read needs is
        fetched now (a part done, or read from memory as the read schedules it),
        else None; the read is scheduled either way (read-ahead started, the
        window resized), and a ``read`` of the same range that follows (the
        request handed on to the event loop) does not schedule it again.  A part
        that failed gives None too: ``read`` then raises its error."""
        if off >= self.size or size <= 0:
            return b""
        size = min(size, self.size - off)
        first, last = self.layout.chunk_range(off, size)
        self._schedule(off, size, first, last)
        chunks: list = []
        i, parts = first, self._parts
        while i < last:
            part = parts.get(i)
            if part is None or not part.done.is_set() or part.error is not None or part.chunks is None:
                self._scheduled = (off, size)
                return None
            take = part.chunks[i - part.first:min(last, part.last) - part.first]
            chunks.extend(take)
            i += len(take)
        return self._slice(chunks, off, size, first)

    def _slice(self, chunks: list, off: int, size: int, first: int):
        """The read's ``size`` bytes at ``off`` of chunks ``first``.. (whole)."""
        data = b"".join(chunks) if len(chunks) != 1 else chunks[0]
        rel = off - self.layout.chunk_start(first)
        return data[rel:rel + size]

    async def read(self, off: int, size: int) -> bytes:
        if off >= self.size or size <= 0:
            return b""
        size = min(size, self.size - off)
        first, last = self.layout.chunk_range(off, size)
        if self._scheduled == (off, size):  # read_now scheduled it a moment ago
            self._scheduled = None
        else:
            self._schedule(off, size, first, last)
        chunks: list[bytes] = []
        i = first
        while i < last:
            part = self._parts.get(i)
            if part is None:  # dropped by a concurrent seek: fetch it again
                part = self._start(i, self._run_end(i, last), demand=True)
            if not part.done.is_set():
                await part.done.wait()
            if part.error is not None:
                self._drop(part)
                raise part.error
            assert part.chunks is not None
            take = part.chunks[i - part.first:min(last, part.last) - part.first]
            chunks.extend(take)
            i += len(take)
        return self._slice(chunks, off, size, first)

    def _schedule(self, off: int, size: int, first: int, last: int) -> None:
        """Classify the read, resize the window, start missing parts (no awaits)."""
        self._scheduled = None
        expected = self._expected
        if expected is None:
            sequential = off == 0  # reading from the start begins a stream; elsewhere, a seek
        else:
            sequential = expected - self.back_tolerance <= off <= expected + self.window
        if sequential:
            self.sequential_reads += 1
            if expected is not None:
                self.window = min(self.window * 2, self.max_window)
            self._expected = max(expected or 0, off + size)
        else:
            self.random_reads += 1
            self.window = self.initial_window
            self._expected = off + size
            self._frontier = 0
            for part in list(self._live):
                if part.last <= first or part.first >= last:
                    self._drop(part)
        if not sequential:
            self._seeking = True
            try:
                self._start_missing(first, last, demand_end=last)  # a seek fetches only what it needs
            finally:
                self._seeking = False
            return
        # Demand and read-ahead, in the same parts where they are neighbours.  The
        # read-ahead is topped up only when less than half a window is left ahead of
        # the reader, then by a whole window: few, large fetches rather than one
        # small one per read.
        frontier = max(self._frontier, last)
        ahead_bytes = self.layout.chunk_start(frontier) - self._expected if frontier < len(self._ids) else self.window
        until = last
        if ahead_bytes < self.window // 2:
            _, until = self.layout.chunk_range(self._expected, self.window)
            self._frontier = max(frontier, until)
        self._start_missing(first, max(last, until), demand_end=last)
        # Release parts wholly behind the reader.
        floor = self._expected - size - self.back_tolerance
        if floor > 0:
            behind, _ = self.layout.chunk_range(floor, 1)
            for part in list(self._live):
                if part.last <= behind:
                    self._drop(part)

    def _start_missing(self, first: int, last: int, demand_end: int) -> None:
        """Start parts for the chunks in [first, last) not fetched or in flight;
        those starting before ``demand_end`` are wanted by the read at hand."""
        i = first
        while i < last:
            if i in self._parts:
                i = self._parts[i].last
                continue
            end = self._run_end(i, last)
            self._start(i, end, demand=i < demand_end)
            i = end

    def _run_end(self, i: int, last: int) -> int:
        """End of a part starting at chunk i: up to ``part_bytes``, no overlap with a fetched chunk."""
        end, size = i, 0
        while end < last and end not in self._parts and (end == i or size + self._sizes[end] <= self.part_bytes):
            size += self._sizes[end]
            end += 1
        return end

    def _start(self, first: int, last: int, demand: bool = False) -> _Part:
        """A part for chunks [first, last): fetched here and now if a read waits
        for it and its bytes are in memory (no task, no worker thread), else by a
        task."""
        part = _Part(first, last, publish=demand and self._seeking and self._publish is not None)
        for i in range(first, last):
            self._parts[i] = part
        self._live.add(part)
        self.parts_started += 1
        if demand and self._fetch_now is not None:
            try:
                part.chunks = self._fetch_now(list(self._ids[first:last]))
                if part.chunks is not None:
                    self._check(part)
                    self._published(part)
            except Exception as exc:  # handed to the read, as a task's failure would be
                part.error = exc
            if part.chunks is not None or part.error is not None:
                self.parts_inline += 1
                part.done.set()
                return part
        self._nursery.start_soon(self._run, part)
        return part

    def _check(self, part: _Part) -> None:
        """The fetched chunks have the sizes the offsets were computed from (else
        CorruptObjectError, and the part holds no chunks)."""
        try:
            check_chunk_sizes(self._ids[part.first:part.last], self._sizes[part.first:part.last], part.chunks)
        except Exception:
            part.chunks = None
            raise

    def _published(self, part: _Part) -> None:
        # A hand-off to the page cache is only a shortcut: its failure (a nursery
        # closing at shutdown) never fails the read of bytes already verified.
        if part.publish and not self._closed:
            try:
                self._publish(self.layout.chunk_start(part.first), part.chunks)
                if self._publish_around is not None:
                    self._publish_around(part.first, part.last)
            except Exception as exc:
                log.debug("handing chunks %d..%d to the page cache failed: %s", part.first, part.last, exc)

    def _drop(self, part: _Part) -> None:
        self._live.discard(part)
        for i in range(part.first, part.last):
            if self._parts.get(i) is part:
                del self._parts[i]

    async def _run(self, part: _Part) -> None:
        try:
            part.chunks = await self._fetch(list(self._ids[part.first:part.last]))
            self._check(part)
            self._published(part)
        except Exception as exc:  # handed to the reads that wait for this part
            part.error = exc
            if not self._closed:
                log.debug("fetch of chunks %d..%d failed: %s", part.first, part.last, exc)
        finally:
            if part.chunks is None and part.error is None:  # cancelled: the file system is stopping
                part.error = ShuttingDownError("the file system is shutting down")
            part.done.set()
