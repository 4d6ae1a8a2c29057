"""Bytes of a local repository's pack files that the page cache holds, read without waiting.

The mount's event loop serves what is in memory itself (vfs/loader.py): a hop
to a worker thread and back costs about 100 µs of CPU here, more than reading
and verifying a cached image.  For a local repository "in memory" includes the
kernel's page cache, so the read engine's memory path (repo/engine.py,
``*_from_memory``) reads pack files through this module:

* ``preadv2(RWF_NOWAIT)`` returns the page cache's bytes or fails with EAGAIN
  rather than read the disk;
* a pack file not yet open is opened with ``openat2(RESOLVE_CACHED)``, which
  fails rather than read a directory from disk (Linux 5.12; an older kernel:
  a pack's first touch then always takes the thread path).

Open descriptors are kept (up to ``MAX_OPEN``), so a pack gc has deleted or
replaced would stay allocated on disk, held by its descriptor, until the mount
ends.  So at most every ``RECHECK_S`` a read first checks the descriptors it
keeps (``fstat``: no disk I/O) and closes those whose file has no name left
(``st_nlink == 0``): the next read of that key opens it again by name, which
fails for a deleted pack and takes the blocking path, where the repository
re-lists the index and reads the blob at its new place (docs/SEMANTICS.md,
garbage collection).

Read-ahead.  A pack read in order (a reader of a directory's images, which a
commit wrote one after another) would have the event loop do the kernel's
read-ahead as well: a read of pages not cached, or marked for read-ahead,
makes the reading thread allocate the next pages and queue their disk reads,
a little at a time, and here that thread serves every other request too.
(Measured on scripts/bench.py's sample, a new mount each round, five rounds
each in turn: with the page cache dropped whole, 393-497 MiB/s, median 448,
with this read-ahead against 332-450, median 398, without; with only the
data pages dropped, the mount's directory entries kept, both medians 526
MiB/s, within the disk's noise; a ``cat`` of the packs beside the reader,
the ceiling of any read-ahead, 548-612.)  So
``read_into`` follows up to ``AHEAD_STREAMS`` streams of reads per pack kept
open: a read starting between ``AHEAD_BACK`` before a stream's end and
``AHEAD_GAP`` past it continues the stream (one a little behind: parallel
readers of one directory finish out of order), any other read starts one.
After ``AHEAD_AFTER`` reads continuing a stream onward from its end (within
``AHEAD_OVERLAP`` before it), the ``AHEAD_BYTES`` past its
end (about a pack) go to one read-ahead thread, and again when less than
half of that lies ahead of the reader; a stream that read a pack to its end
goes on in the next pack the mount reads near its start (within
``AHEAD_CARRY``: a commit fills one pack after another), which is then read
ahead at once.  The thread reads the range (``AHEAD_STEP`` at a time, into
a scratch buffer, on a duplicate of the descriptor), so the pages are in the
page cache when the event loop comes to them.  (``posix_fadvise(WILLNEED)``
would save the copy, but the kernel reads at most its read-ahead window per
call, 128 KiB on many disks.)  At most ``AHEAD_QUEUED`` ranges wait for the
thread; one more is dropped (the kernel's own read-ahead still runs).  A
random reader seldom reads the file stored right after the one it read last,
let alone four times before the pack's streams move on (simulated, a
shuffled reader of a million 130 KB files in 4,000 packs: 5 read-aheads, 160
MiB; four workers reading consecutive files out of order start one within
the first 19 files of every pack), so it costs almost no extra disk reads; a
reader that
leaves a stream has at most ``AHEAD_BYTES`` read for it that it does not use.
What is read ahead lands in the page cache, which the kernel reclaims as
ever.

Anything short of that (not cached, partly cached, past the end, the file
gone, no such syscall) is ``None``: the caller takes the blocking path in a
worker thread, which reads through the store and reports errors.  Storage
knows nothing of this; the store only says where a key lives on disk
(Store.local_path).  Bytes read here are verified by the engine as any
others.
"""

from __future__ import annotations

import ctypes
import errno
import logging
import os
import queue
import threading
import time
import weakref
from collections import OrderedDict

from commitfs.storage.base import Store

log = logging.getLogger(__name__)

#: Pack descriptors kept open: packs are large, a few dozen cover a working set.
MAX_OPEN = 64
#: Seconds between checks for kept descriptors of packs gc removed (module doc):
#: the most a removed pack's space stays held past a read of the mount.
RECHECK_S = 2.0

#: Read-ahead of a pack read in order (module doc): reads continuing a stream
#: before it reads ahead, and how far past its end.
AHEAD_AFTER = 4
AHEAD_BYTES = 32 * 1024 * 1024
#: A read starting this far before a stream's end, or this far past it, continues it; it
#: counts towards the read-ahead only if it starts at most AHEAD_OVERLAP before the end.
AHEAD_BACK = 256 * 1024
AHEAD_GAP = 256 * 1024
AHEAD_OVERLAP = 4096
#: After a stream read a pack to its end, a read this near the start of another goes on with it.
AHEAD_CARRY = 1024 * 1024
#: Streams followed per pack (the least recent dropped); requests waiting for the thread.
AHEAD_STREAMS = 4
AHEAD_QUEUED = 16
#: The read-ahead thread reads this much at a time; close waits this long for its last range.
AHEAD_STEP = 1024 * 1024
AHEAD_JOIN_S = 5.0
#: The read-ahead thread ends after this many seconds with nothing to read (the next range starts it again).
AHEAD_IDLE_S = 10.0


class _OpenHow(ctypes.Structure):
    _fields_ = [("flags", ctypes.c_uint64), ("mode", ctypes.c_uint64), ("resolve", ctypes.c_uint64)]


_SYS_OPENAT2 = 437  # the same number on every Linux architecture (added in 5.6)
_RESOLVE_CACHED = 0x20  # Linux 5.12: fail with EAGAIN unless the path resolves from the dentry cache
_AT_FDCWD = -100


class _CachedOpener:
    """open(2) that never waits for the disk (``openat2(RESOLVE_CACHED)``)."""

    def __init__(self):
        try:
            self._syscall = ctypes.CDLL(None, use_errno=True).syscall
        except (OSError, AttributeError):
            self._syscall = None
        self._how = _OpenHow(os.O_RDONLY | os.O_CLOEXEC, 0, _RESOLVE_CACHED)
        self._how_ref = ctypes.byref(self._how)
        self._how_size = ctypes.sizeof(self._how)

    def __call__(self, path: bytes) -> int | None:
        """A descriptor for ``path``, or None if opening it might block (or the
        kernel lacks openat2/RESOLVE_CACHED, which is then not tried again)."""
        if self._syscall is None:
            return None
        fd = self._syscall(_SYS_OPENAT2, _AT_FDCWD, path, self._how_ref, self._how_size)
        if fd >= 0:
            return fd
        if ctypes.get_errno() in (errno.ENOSYS, errno.EINVAL, errno.E2BIG):
            self._syscall = None  # an older kernel: the blocking open in a thread it is
        return None


_open_cached = _CachedOpener()


class _Stream:
    __slots__ = ("end", "reads", "until")

    def __init__(self, end: int):
        self.end = end  # the furthest byte read
        self.reads = 0  # reads that continued it onward from its end
        self.until = end  # read ahead up to here


def continued(streams: list[_Stream], offset: int) -> _Stream | None:
    """The stream a read at ``offset`` continues, if any (module doc, "Read-ahead")."""
    for s in streams:
        if s.end - AHEAD_BACK <= offset <= s.end + AHEAD_GAP:
            return s
    return None


def follow(streams: list[_Stream], offset: int, length: int, carried: bool = False) -> tuple[int, int] | None:
    """Note a read of [offset, offset + length) among one pack's ``streams``
    (the most recent last; module doc, "Read-ahead"); the range to read
    ahead now, (offset, length), or None.  ``carried``: a stream that read
    another pack in order to its end goes on here (a new stream then counts
    as continued)."""
    s = continued(streams, offset)
    if s is not None:
        if streams[-1] is not s:
            streams.remove(s)
            streams.append(s)  # the most recent last
        if offset >= s.end - AHEAD_OVERLAP:  # onward from its end (one behind only keeps it)
            s.reads += 1
        s.end = max(s.end, offset + length)
    else:
        s = _Stream(offset + length)
        streams.append(s)
        if len(streams) > AHEAD_STREAMS:
            del streams[0]
        if not carried:
            return None
        s.reads = AHEAD_AFTER
    if s.reads < AHEAD_AFTER or s.until - s.end >= AHEAD_BYTES // 2:
        return None
    start = max(s.until, s.end)
    s.until = s.end + AHEAD_BYTES
    return start, s.until - start


class _AheadThread:
    """The one thread that has the kernel read packs ahead (module doc):
    requests are handed to it without waiting, at most ``AHEAD_QUEUED``.  It
    starts with the first and ends after ``AHEAD_IDLE_S`` without one, so an
    idle mount, or a reader nobody closed, holds no thread."""

    def __init__(self):
        self._queue: queue.Queue = queue.Queue(AHEAD_QUEUED)
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()  # over _thread: a start against an idle end
        #: Requests done, and dropped with the queue full (tests, the log).
        self.done = 0
        self.dropped = 0
        _threads.add(self)

    def _forked(self) -> None:
        """In a child process (os.fork, as a DataLoader's workers are made): the
        thread did not come along, and the locks may have been held at the
        fork, so all start afresh (ranges queued then are dropped)."""
        self._queue = queue.Queue(AHEAD_QUEUED)
        self._thread = None
        self._lock = threading.Lock()

    def submit(self, fd: int, offset: int, length: int) -> None:
        """Read ahead [offset, offset + length) of the file open as ``fd`` (a
        descriptor of the caller's, duplicated here).  Never blocks."""
        try:
            dup = os.dup(fd)
        except OSError:
            return
        try:
            self._queue.put_nowait((dup, offset, length))
        except queue.Full:
            os.close(dup)
            self.dropped += 1
            return
        with self._lock:
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="commitfs-pack-ahead", daemon=True)
                self._thread.start()

    def _run(self) -> None:
        scratch = memoryview(bytearray(AHEAD_STEP))
        while True:
            try:
                item = self._queue.get(timeout=AHEAD_IDLE_S)
            except queue.Empty:
                with self._lock:
                    if self._queue.empty():  # (a range queued since is this thread's still)
                        self._thread = None
                        return
                continue
            if item is None:
                return
            fd, offset, length = item
            try:
                end = offset + length
                while offset < end:
                    n = os.preadv(fd, [scratch[:min(AHEAD_STEP, end - offset)]], offset)
                    if n <= 0:
                        break  # the pack's end
                    offset += n
                self.done += 1
            except OSError as exc:  # the reads that wanted these bytes will meet it and report it
                log.debug("read-ahead of a pack failed: %s", exc)
            finally:
                os.close(fd)

    @property
    def running(self) -> bool:
        return self._thread is not None

    def close(self) -> None:
        """Stop the thread; requests still waiting are dropped."""
        if self.done or self.dropped:
            log.debug("pack read-ahead: %d ranges read, %d dropped with the queue full", self.done, self.dropped)
        with self._lock:
            thread = self._thread
        if thread is None:
            return
        while True:
            try:
                item = self._queue.get_nowait()
            except queue.Empty:
                break
            if item is not None:
                os.close(item[0])
        try:
            self._queue.put(None, timeout=AHEAD_JOIN_S)
        except queue.Full:  # a read that came meanwhile: the thread ends at its next range anyway
            pass
        thread.join(AHEAD_JOIN_S)  # (a daemon thread: one stuck in a read cannot hold up the exit)
        with self._lock:
            if self._thread is thread:
                self._thread = None


_threads: weakref.WeakSet[_AheadThread] = weakref.WeakSet()


def _after_fork_in_child() -> None:
    for ahead in list(_threads):
        ahead._forked()


os.register_at_fork(after_in_child=_after_fork_in_child)


class ResidentReader:
    """Reads of one local store's objects from the page cache (module doc)."""

    def __init__(self, store: Store):
        self.store = store
        self._fds: OrderedDict[str, int] = OrderedDict()
        # Held across a read: a descriptor is never closed (and its number
        # reused for another file) under a reader.  Every call is non-blocking.
        self._lock = threading.Lock()
        self._checked = time.monotonic()  # the last release_removed()
        #: Descriptors closed because their pack file was removed (tests, the log).
        self.released = 0
        self._streams: dict[str, list[_Stream]] = {}  # by key, of the packs kept open
        self._sizes: dict[str, int] = {}  # their sizes, at open
        self._carry: str | None = None  # a pack a stream read in order to its end
        self.ahead = _AheadThread()

    def release_removed(self) -> int:
        """Close the kept descriptors whose file no longer has a name (deleted or
        replaced by gc); how many.  Never blocks (fstat of open files)."""
        with self._lock:
            return self._release_removed()

    def _release_removed(self) -> int:
        self._checked = time.monotonic()
        gone = []
        for key, fd in self._fds.items():
            try:
                if os.fstat(fd).st_nlink == 0:
                    gone.append(key)
            except OSError:
                gone.append(key)
        for key in gone:
            self._forget(key)
            try:
                os.close(self._fds.pop(key))
            except OSError:
                pass
        self.released += len(gone)
        return len(gone)

    def _forget(self, key: str) -> None:
        self._streams.pop(key, None)
        self._sizes.pop(key, None)
        if self._carry == key:
            self._carry = None

    def _follow(self, key: str, fd: int, offset: int, length: int) -> None:
        """(Under the lock.) Follow the read's stream; hand a read-ahead to the thread (module doc)."""
        streams = self._streams.setdefault(key, [])
        carried = self._carry is not None and self._carry != key and offset < AHEAD_CARRY \
            and continued(streams, offset) is None  # (a pack read already, say of manifests, takes no carry)
        ahead = follow(streams, offset, length, carried)
        if ahead is not None:
            self.ahead.submit(fd, *ahead)
        if carried:
            self._carry = None
        s = streams[-1]
        if s.reads >= AHEAD_AFTER - 1 and s.end + AHEAD_GAP >= self._sizes.get(key, 0):
            self._carry = key  # read in order to its end: the next pack's first read goes on

    def read_into(self, key: str, offset: int, buf) -> bool:
        """Fill the writable buffer ``buf`` with the bytes at ``offset`` of
        ``key`` if the page cache holds all of them; False otherwise."""
        with self._lock:
            if self._fds and time.monotonic() - self._checked >= RECHECK_S:
                self._release_removed()
            fd = self._fds.get(key)
            if fd is None:
                path = self.store.local_path(key)
                fd = None if path is None else _open_cached(os.fsencode(path))
                if fd is None:
                    return False
                self._fds[key] = fd
                self._sizes[key] = os.fstat(fd).st_size
                while len(self._fds) > MAX_OPEN:
                    old, old_fd = self._fds.popitem(last=False)
                    self._forget(old)
                    os.close(old_fd)
            else:
                self._fds.move_to_end(key)
            self._follow(key, fd, offset, len(buf))
            try:
                n = os.preadv(fd, [buf], offset, os.RWF_NOWAIT)
            except OSError:  # EAGAIN; or EOPNOTSUPP: the blocking path will tell
                return False
        return n == len(buf)  # partly cached, or the object's end: the blocking path decides

    def load_range(self, key: str, offset: int, length: int):
        """``length`` bytes at ``offset`` as a read-only buffer, or None (read_into)."""
        if length <= 0:
            return None
        buf = bytearray(length)
        if not self.read_into(key, offset, buf):
            return None
        return memoryview(buf).toreadonly()

    def close(self) -> None:
        self.ahead.close()
        with self._lock:
            fds = list(self._fds.values())
            self._fds.clear()
            self._streams.clear()
            self._sizes.clear()
            self._carry = None
        for fd in fds:
            try:
                os.close(fd)
            except OSError:
                pass
