"""The verified on-disk chunk cache, shared by mounts of non-local repositories.

Design
------
Chunks are immutable and named by their BLAKE3 id, so the cache needs no
index of its own: a chunk put in the caller's thread is one file,
``<root>/v1/<first 2 hex digits>/<64 hex digits>``, holding the chunk's raw
(decompressed) bytes; the chunks write-behind writes (a mount's) go many to a
*bundle* file that names them in its own header (below).  Everything else
follows from three properties of that layout:

* **Atomic appearance.**  A chunk is written to a unique temporary name under
  ``<root>/v1/tmp/`` and renamed into place.  rename(2) is atomic on one file
  system, so a reader opens a complete file or none.  Two processes (two
  mounts, two users of the Python API) caching the same chunk write identical
  bytes; the second rename simply replaces the first.  No lock is needed for
  reads or writes.
* **Verification, not trust.**  Every chunk read back is hashed and compared
  with its id before it is served (BLAKE3 runs at GB/s, far faster than any
  backend the cache stands in for).  A torn file (a crash before the page
  cache reached the disk: we do not fsync, a cache may lose data), a bit flip
  or a stray edit is detected, deleted and reported as a miss, so the caller
  fetches the chunk again.  Wrong bytes are never served.
* **LRU by modification time.**  A hit touches the file's mtime (at most once
  per ``_TOUCH_INTERVAL_S``, to keep hits cheap); atime is useless under
  relatime/noatime.  Eviction lists the files, sorts them by mtime and deletes
  the oldest until the cache is below its low-water mark.  Deleting a file
  another process is reading is harmless on POSIX: its descriptor stays valid.

A small SQLite (or other) index file was considered and rejected: it adds a
second source of truth that can disagree with the files after a crash, and a
single-writer lock that two busy mounts would contend for on every hit.  The
price of the file-per-chunk layout is the eviction scan, which is paid only
when the cap is exceeded, by one process at a time (an ``flock`` on
``<root>/v1/evict.lock``; a process that finds another evicting waits for it
(up to ``_EVICT_WAIT_S``) and then evicts what is still over, since the other's
scan may have missed its own latest writes), and which also removes temporary
files orphaned by crashed writers.

Each process keeps an estimate of the cache's size: a scan on its first
write, plus what it adds since.  Writes of other processes are seen at its
next scan, made at each eviction and after it has itself added an eighth of
the cap; so the cap is approximate: n processes sharing a cache overshoot it
by at most n/8 of it (plus a chunk each), never unboundedly.

*Write-behind* (``write_behind``, which the mount's daemon turns on): a put
hands the chunk to one writer thread and returns, so a read that fetched
it does not wait for the file's create, write and rename (measured: nearly
half of a cold S3 read's worker-thread time).  Chunks waiting to be written
are served by ``get`` from memory; at most ``max_pending`` bytes of them are
held (beyond that a put writes in the caller's thread, as without
write-behind); ``close`` writes what is pending.  The writes themselves, the
eviction and the cap are those of a plain put.

Write-behind also spares a busy reader the file system's calls wherever this
process already knows the answer (measured: a cold read through an S3 mount
opened a chunk file about twice per chunk, and each call gives up the GIL,
which the daemon's other threads then hold):

* *Recently written chunks* stay in memory after their file is written, the
  last ``recent_bytes`` of them (oldest dropped first): a read that comes
  right after the fetch that cached them (a directory read-ahead's, vfs/dirahead.py)
  takes them from memory with no open, read or hash.  Like pending chunks,
  they were verified when fetched.  ``get_from_memory`` answers from these
  two alone, never touching the disk (the mount's event loop asks it).
* *The listing*: which chunk files exist, by the hash of their ids, as this
  process's last scan of the cache found them (write-behind starts one in the
  writer thread), plus what it wrote since, minus what it deleted.  A ``get``
  of a chunk the listing lacks is a miss without any system call; a put of one
  it lacks does not first look for its file.  Other processes' writes since
  the scan are missed until the next one (at each eviction and after an
  eighth of the cap written; such a chunk is fetched again: best effort), and
  their deletions cost an open that finds nothing (and drops the entry).  A
  hash collision can only make a miss open a file.  A cache of more than
  ``LISTING_MAX`` files keeps no listing (its memory would grow with the
  cache): every get then opens, as without write-behind.

*Bundles* (write-behind's files): the writer thread takes every chunk waiting
(up to ``BUNDLE_BYTES`` and a 16th of the cap, since a bundle is evicted
whole; after lingering up to ``BUNDLE_LINGER_S`` for ``BUNDLE_MIN_BYTES`` of
them) and writes them as one file, ``<root>/v1/bundles/<random>.bundle``, made
in ``tmp/`` and renamed into place like a chunk file: a header
(``BUNDLE_MAGIC``, a count, then for each chunk its 32-byte id, offset and
length, little-endian u32s) and the chunks' bytes.  A cold read through an S3
mount fetches thousands of chunks a second, and creating their files was what
the cache's disk cost most (measured on an ext4 without a journal, whose inode
allocator steps over every recently deleted inode: 80-170 µs a create, against
~15 µs to write a 60 KB chunk; with the cache on a tmpfs the same read took
60% of the daemon's CPU).  A bundle's chunks are found through an index in
memory (id hash -> bundle, offset, length), read from the bundles' headers at
each scan, plus what this process wrote since (a cache without write-behind,
on a miss, adds the bundles it lacks when the bundles directory changed, looking
once a second at most).  They are verified like a
chunk file's: one that fails is a miss and deletes its bundle, if the bundle's
header names it there (else the index pointed at another chunk's place: a
hash collision, a miss).  The index holds at most ``LISTING_MAX`` chunks
(bounded memory); past that the writer writes chunk files instead.  Eviction
treats a bundle as one unit, by its mtime, which a hit on any of its chunks
refreshes.  Puts in the caller's thread (write-behind off, or full) still write
one chunk file each.

A full disk does not fail reads: on ENOSPC/EDQUOT the cache evicts down to
half its current size and retries once; if that fails too the chunk is simply
not cached.  The cache is best-effort throughout: any error in it is logged
and turned into a miss, never into a failed read.
"""

from __future__ import annotations

import errno
import fcntl
import logging
import os
import re
import secrets
import struct
import threading
import time
from collections import deque
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, TypeVar

from commitfs.errors import InputError
from commitfs.model.ids import HEX_SIZE, hash_bytes

log = logging.getLogger(__name__)
T = TypeVar("T")

LAYOUT = "v1"
#: Default cap of the chunk cache (a few epochs' working set of a typical dataset shard).
DEFAULT_MAX_BYTES = 10 * 1024**3
#: A hit refreshes a chunk's mtime at most this often: LRU order is coarse by design.
_TOUCH_INTERVAL_S = 60.0
#: Eviction goes down to this fraction of the cap, so that it runs rarely.
_LOW_WATER = 0.9
# How long an eviction waits for another process's (a scan of a large cache
# takes a while; a stuck one must not hold this process's writers forever).
_EVICT_WAIT_S = 10.0
#: A process rescans the cache's size after adding this fraction of the cap, to see
#: what other processes added: n processes overshoot the cap by at most n/8 of it.
_RESCAN_FRACTION = 1 / 8
#: Temporary files older than this belong to a crashed writer.
_STALE_TMP_S = 3600.0

#: Bytes of chunks a write-behind cache holds for its writer thread, at most.
WRITE_BEHIND_BYTES = 32 * 1024 * 1024
#: Bytes of chunks a write-behind cache keeps in memory after writing them (module doc).
RECENT_BYTES = 32 * 1024 * 1024
#: A cache of more files than this keeps no listing (module doc): ~70 bytes each.
LISTING_MAX = 250_000
#: A bundle (module doc) holds at most this many bytes of chunks, and at most a 16th of
#: the cap (one chunk may exceed either alone).
BUNDLE_BYTES = 8 * 1024 * 1024
#: The writer lingers up to BUNDLE_LINGER_S for this many bytes before writing a bundle.
BUNDLE_MIN_BYTES = 1024 * 1024
BUNDLE_LINGER_S = 0.02
BUNDLE_MAGIC = b"cfsbndl1"
_BUNDLE_HEAD = struct.Struct("<8sI")
_BUNDLE_ENTRY = struct.Struct("<32sII")
_BUNDLE_SUFFIX = ".bundle"
#: A cache without write-behind looks for other processes' new bundles this often at most.
_BUNDLE_RECHECK_S = 1.0
#: How long ``close`` waits for the pending writes of a write-behind cache.
_CLOSE_WAIT_S = 30.0

_HEX_NAME = re.compile(r"^[0-9a-f]{%d}$" % HEX_SIZE)


def default_cache_dir() -> Path:
    """``$XDG_CACHE_HOME/commitfs`` or ``~/.cache/commitfs``: the root of commitfs's caches."""
    base = os.environ.get("XDG_CACHE_HOME")
    if not base or not os.path.isabs(base):
        base = os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "commitfs"


_UNITS = {"": 1, "b": 1, "k": 1024, "m": 1024**2, "g": 1024**3, "t": 1024**4}


def parse_size(text: str) -> int:
    """'512M', '10G', '1.5GiB', '4096' -> bytes (binary units)."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([kmgt]?)(?:i?b)?\s*", text.lower())
    if not m or (m.group(2) == "" and text.strip().lower().endswith("ib")):
        raise InputError(f"bad size {text!r} (examples: 500M, 10G, 1.5GiB)")
    return int(float(m.group(1)) * _UNITS[m.group(2)])


@dataclass
class CacheStats:
    hits: int = 0
    misses: int = 0
    puts: int = 0
    corrupt: int = 0
    evicted_files: int = 0
    evictions: int = 0
    put_failures: int = 0
    #: Of the hits, those served from memory (write-behind: pending or recent chunks).
    memory_hits: int = 0
    #: Of the misses, those the listing answered with no system call.
    listed_misses: int = 0


class DiskChunkCache:
    """A chunk cache in a directory, capped at ``max_bytes``; thread- and process-safe.

    Implements what Repository asks of a chunk cache: ``get(oid)`` returns the
    verified bytes or None, ``put(oid, data)`` stores them (best effort).
    """

    def __init__(self, path: str | os.PathLike, max_bytes: int = DEFAULT_MAX_BYTES):
        if max_bytes <= 0:
            raise InputError("the cache size must be positive")
        self.path = Path(path)
        self.max_bytes = max_bytes
        self.stats = CacheStats()
        self._root = self.path / LAYOUT
        self._tmp = self._root / "tmp"
        self._root_s, self._tmp_s = str(self._root), str(self._tmp)
        self._lock = threading.Lock()
        self._evicting = threading.Lock()
        self._size: int | None = None  # estimate; None until the first scan
        self._unscanned = 0  # bytes this process added since its last scan
        self._written = 0    # bytes this process ever added (an eviction's scan misses those written during it)
        #: Write-behind (module doc): the running writer's state, and its chunks waiting
        #: by id (get reads it without the lock); None while puts write in the caller's thread.
        self._behind: _WriteBehind | None = None
        self._pending: dict[bytes, bytes] | None = None
        #: Write-behind's recently written chunks (module doc), oldest first, and their bytes.
        self._recent: dict[bytes, bytes] | None = None
        self._recent_bytes = 0
        self._recent_max = 0
        #: The listing (module doc): hashes of the ids of the chunk files known to
        #: exist, or None (unknown: every get opens); what a running scan must add.
        self._listing: set[int] | None = None
        self._scan_adds: set[int] | None = None
        self._scans = 0
        #: The bundle index (module doc): (id hash -> number << 64 | offset << 32 | length,
        #: the bundles' names by number), swapped whole; None until first needed.  What
        #: this process writes while a scan reads the headers, for the scan to keep.
        self._bidx: tuple[dict[int, int], list[str]] | None = None
        self._bidx_mtime: int | None = None
        self._bidx_checked = -_BUNDLE_RECHECK_S
        self._bundle_scans = 0
        self._bundle_adds: list[tuple[str, list]] | None = None
        self._bundles = self._root / "bundles"
        self._bundles_s = str(self._bundles)
        self._wake = threading.Condition(self._lock)
        try:
            self._tmp.mkdir(parents=True, exist_ok=True)
            self._bundles.mkdir(exist_ok=True)
        except OSError as exc:
            raise InputError(f"cannot create the cache directory {self.path}: {exc.strerror or exc}") from None

    def __repr__(self) -> str:
        return f"DiskChunkCache({str(self.path)!r}, max_bytes={self.max_bytes})"

    def _file(self, oid: bytes) -> Path:
        return Path(self._name(oid))

    def _name(self, oid: bytes) -> str:
        """The chunk's file, as a string (pathlib costs ~30 µs a call on the read path)."""
        name = oid.hex()
        return f"{self._root_s}/{name[:2]}/{name}"

    # --- write-behind --------------------------------------------------------
    def write_behind(self, max_pending: int = WRITE_BEHIND_BYTES, recent_bytes: int = RECENT_BYTES) -> None:
        """From now on a put returns before its chunk is written, the last
        ``recent_bytes`` of chunks written stay in memory and a listing is kept
        (module doc)."""
        with self._lock:
            if self._behind is not None:
                return
            w = self._behind = _WriteBehind(max_pending)
            self._pending = w.pending
            self._recent, self._recent_bytes, self._recent_max = {}, 0, recent_bytes
            w.scan = True  # the writer's first job: the listing (and the size)
            w.thread = threading.Thread(target=self._write_pending, args=(w,), name="commitfs-cache-writer",
                                        daemon=True)
            w.thread.start()

    def close(self, timeout_s: float = _CLOSE_WAIT_S) -> None:
        """Write the chunks still pending (waiting at most ``timeout_s``) and
        stop the writer; puts write in the caller's thread again.  A writer
        still stuck after the wait (a stuck disk) drops what is left when it
        comes back, and never touches a later writer's chunks."""
        with self._lock:
            w = self._behind
            if w is None:
                return
            w.closing = True
            self._wake.notify_all()
        assert w.thread is not None
        w.thread.join(timeout_s)
        with self._lock:
            if w.thread.is_alive():  # what is left is not cached (best effort)
                log.warning("chunk cache: %d chunks not written at close", len(w.queue))
                w.queue.clear()
            self._behind = self._pending = self._recent = self._listing = None
            self._recent_bytes = 0

    def flush(self, timeout_s: float = _CLOSE_WAIT_S) -> bool:
        """Wait (at most ``timeout_s``) until the chunks pending are written;
        whether they are.  Write-behind stays on."""
        deadline = time.monotonic() + timeout_s
        with self._lock:
            while True:
                w = self._behind
                if w is None or not w.queue:
                    return True
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self._wake.wait(left)

    def _write_pending(self, w: _WriteBehind) -> None:
        """The writer thread of write-behind state ``w`` (its own queue and stop flag)."""
        if w.scan:
            try:
                self._rescan_size()  # (a put in the caller's thread may have done it first: harmless)
            except Exception as exc:
                log.warning("chunk cache: cannot scan %s: %s", self.path, exc)
        while True:
            with self._lock:
                while not w.queue and not w.closing:
                    self._wake.wait()
                if not w.queue:
                    return
                # A batch for one bundle: linger a little for more (they are served from
                # memory meanwhile), then take what waits, up to BUNDLE_BYTES and a 16th
                # of the cap (a bundle is evicted whole: a small cache still holds many).
                most = min(BUNDLE_BYTES, self.max_bytes // 16)
                deadline = time.monotonic() + BUNDLE_LINGER_S
                while w.bytes < min(BUNDLE_MIN_BYTES, most) and not w.closing and w.queue:
                    left = deadline - time.monotonic()
                    if left <= 0:
                        break
                    self._wake.wait(left)
                if not w.queue:
                    continue
                batch, nbytes = [], 0
                for oid in w.queue:
                    data = w.pending[oid]
                    if batch and nbytes + len(data) > most:
                        break
                    batch.append((oid, data))
                    nbytes += len(data)
            written: set[bytes] = set()
            try:
                written = self._put_bundle(batch)
            except Exception as exc:  # best effort, as a put in the caller's thread is
                log.warning("chunk cache: not caching %d chunks: %s", len(batch), exc)
            with self._lock:
                recent = self._recent
                for oid, data in batch:
                    if oid in written and isinstance(data, memoryview) and data.nbytes != memoryview(data.obj).nbytes:
                        data = bytes(data)  # a slice of a larger read would keep all of it
                    if oid in written and self._behind is w and recent is not None and len(data) <= self._recent_max:
                        # Kept before it leaves ``pending``: a get finds it in one or the other.
                        if recent.setdefault(oid, data) is data:
                            self._recent_bytes += len(data)
                            while self._recent_bytes > self._recent_max:
                                old = next(iter(recent))
                                self._recent_bytes -= len(recent.pop(old))
                    if w.queue and w.queue[0] == oid:  # (close cleared the queue if it gave up on us)
                        w.queue.popleft()
                    if w.pending.pop(oid, None) is not None:
                        w.bytes -= len(data)
                if not w.queue:
                    self._wake.notify_all()  # (flush)

    def _offer(self, oid: bytes, data) -> bool:
        """Hand a chunk to the writer; False if write-behind is off or full."""
        with self._lock:
            w = self._behind
            if w is None or w.closing:
                return False
            if oid in w.pending or (self._recent is not None and oid in self._recent):
                return True
            if w.bytes + len(data) > w.max_bytes:
                return False
            w.pending[oid] = data
            w.queue.append(oid)
            w.bytes += len(data)
            self._wake.notify_all()  # (a writer given up on by close may wait on it too)
            return True

    # --- reading -------------------------------------------------------------
    def get_from_memory(self, oid: bytes) -> bytes | None:
        """A chunk write-behind holds in memory (pending or recently written:
        verified when fetched), else None; never a system call (module doc)."""
        pending = self._pending
        if pending is None:
            return None
        data = pending.get(oid)  # (dict reads: atomic under the GIL)
        if data is None:
            recent = self._recent
            if recent is None:
                return None
            data = recent.get(oid)
            if data is None:
                return None
        self.stats.hits += 1
        self.stats.memory_hits += 1
        return data

    def get(self, oid: bytes) -> bytes | None:
        if self._pending is not None:
            data = self.get_from_memory(oid)
            if data is not None:
                return data
        bidx = self._index()
        loc = bidx[0].get(hash(oid))
        if loc is None and self._pending is None and self._bundles_changed():
            bidx = self._add_new_bundles()
            loc = bidx[0].get(hash(oid))
        if loc is not None:
            data = self._get_bundled(oid, bidx[1][loc >> 64], (loc >> 32) & 0xFFFFFFFF, loc & 0xFFFFFFFF)
            if data is not None:
                self.stats.hits += 1
                return data
        if self._pending is not None:
            listing = self._listing
            if listing is not None and hash(oid) not in listing:
                self.stats.misses += 1
                self.stats.listed_misses += 1
                return None
        path = self._name(oid)
        try:
            fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        except FileNotFoundError:
            self._unlisted(oid)  # (another process evicted it)
            self.stats.misses += 1
            return None
        except OSError as exc:
            log.warning("chunk cache: cannot open %s: %s", path, exc)
            self.stats.misses += 1
            return None
        try:
            st = os.fstat(fd)
            data = _read_all(fd, st.st_size)
            if hash_bytes(data) != oid:
                self.stats.corrupt += 1
                log.warning("chunk cache: %s fails its hash check; removed", path)
                self._unlink(path)
                self._unlisted(oid)
                self.stats.misses += 1
                return None
            if time.time() - st.st_mtime > _TOUCH_INTERVAL_S:
                try:
                    os.utime(fd)
                except OSError:
                    pass  # read-only cache directory: LRU order degrades, hits still work
        except OSError as exc:
            log.warning("chunk cache: cannot read %s: %s", path, exc)
            self.stats.misses += 1
            return None
        finally:
            os.close(fd)
        self.stats.hits += 1
        return data

    def __contains__(self, oid: bytes) -> bool:
        pending, recent = self._pending, self._recent
        return ((pending is not None and oid in pending) or (recent is not None and oid in recent)
                or self._in_bundle(oid) or os.path.exists(self._name(oid)))

    # --- bundles (module doc) ------------------------------------------------------
    def _index(self) -> tuple[dict[int, int], list[str]]:
        """The bundle index, read from the bundles' headers on first use."""
        return self._bidx if self._bidx is not None else self._load_bundles()

    def _in_bundle(self, oid: bytes) -> bool:
        return hash(oid) in self._index()[0]

    def _bundles_changed(self) -> bool:
        """Whether the bundles directory changed since the index was read; looked at
        once per ``_BUNDLE_RECHECK_S`` at most (by a cache without write-behind, on a
        miss: so that it sees other processes' bundles, within that time)."""
        now = time.monotonic()
        if now - self._bidx_checked < _BUNDLE_RECHECK_S:
            return False
        self._bidx_checked = now
        mtime = self._bundles_mtime()
        return mtime is not None and mtime != self._bidx_mtime

    def _add_new_bundles(self) -> tuple[dict[int, int], list[str]]:
        """The bundle index with the bundles it lacks added (their headers alone
        read; those gone stay until a scan, each a miss once opened)."""
        bidx = self._index()
        mtime = self._bundles_mtime()
        names = self._bundle_names()
        if names is None:
            return bidx
        known = set(bidx[1])
        found = [(name, self._read_header(name)) for name in names if name not in known]
        with self._lock:
            for name, entries in found:
                if entries:
                    _add_entries(bidx[0], bidx[1], name, entries)
            self._bidx_mtime = mtime
        return bidx

    def _load_bundles(self) -> tuple[dict[int, int], list[str]]:
        """The bundle index, read again from the bundles' headers."""
        mtime = self._bundles_mtime()
        self._index_bundles(self._bundle_names() or [], mtime)
        assert self._bidx is not None
        return self._bidx

    def _bundle_names(self) -> list[str] | None:
        """The bundles' file names, or None if the directory cannot be listed."""
        try:
            return [n for n in os.listdir(self._bundles_s) if n.endswith(_BUNDLE_SUFFIX)]
        except OSError:
            return None

    def _bundles_mtime(self) -> int | None:
        try:
            return os.stat(self._bundles_s).st_mtime_ns
        except OSError:
            return None

    def _index_bundles(self, names: list[str], mtime: int | None) -> None:
        """Make the bundle index from these bundles' headers (listed when the
        directory's mtime was ``mtime``), with the bundles this process writes meanwhile."""
        with self._lock:
            if self._bundle_scans == 0:
                self._bundle_adds = []
            self._bundle_scans += 1
        index: dict[int, int] = {}
        order: list[str] = []
        try:
            for name in names:
                entries = self._read_header(name)
                if entries:
                    _add_entries(index, order, name, entries)
        finally:
            with self._lock:
                for name, entries in self._bundle_adds or ():
                    _add_entries(index, order, name, entries)
                self._bundle_scans -= 1
                if self._bundle_scans == 0:
                    self._bundle_adds = None
                self._bidx = (index, order)
                self._bidx_mtime = mtime

    def _read_header(self, name: str) -> list[tuple[bytes, int, int]] | None:
        """A bundle's (id, offset, length) entries, or None if it is not a whole bundle."""
        try:
            fd = os.open(f"{self._bundles_s}/{name}", os.O_RDONLY | os.O_CLOEXEC)
        except OSError:
            return None
        try:
            size = os.fstat(fd).st_size
            head = os.pread(fd, 65536, 0)
            if len(head) < _BUNDLE_HEAD.size:
                return None
            magic, count = _BUNDLE_HEAD.unpack_from(head)
            need = _BUNDLE_HEAD.size + count * _BUNDLE_ENTRY.size
            if magic != BUNDLE_MAGIC or need > size:
                return None
            if len(head) < need:
                head = os.pread(fd, need, 0)
            entries = [_BUNDLE_ENTRY.unpack_from(head, _BUNDLE_HEAD.size + i * _BUNDLE_ENTRY.size)
                       for i in range(count)]
        except OSError:
            return None
        finally:
            os.close(fd)
        if any(off < need or off + length > size for _, off, length in entries):
            return None  # cut short (a crash before its bytes reached the disk)
        return entries

    def _get_bundled(self, oid: bytes, name: str, offset: int, length: int) -> bytes | None:
        """A chunk from its bundle, verified; None (and the bundle deleted if it fails) otherwise."""
        path = f"{self._bundles_s}/{name}"
        try:
            fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        except OSError:  # evicted (by another process, or since the index was read)
            self._unbundled(oid)
            return None
        try:
            data = os.pread(fd, length, offset)
            if len(data) != length or hash_bytes(data) != oid:
                if (oid, offset, length) not in (self._read_header(name) or ()):
                    self._unbundled(oid)  # another id's place (ids indexed by hash): not damage
                    return None
                self.stats.corrupt += 1
                log.warning("chunk cache: a chunk of %s fails its hash check; the bundle is removed", path)
                self._unlink(path)
                self._unbundled(oid)
                return None
            st = os.fstat(fd)
            if time.time() - st.st_mtime > _TOUCH_INTERVAL_S:
                try:
                    os.utime(fd)
                except OSError:
                    pass
            return data
        except OSError as exc:
            log.warning("chunk cache: cannot read %s: %s", path, exc)
            return None
        finally:
            os.close(fd)

    def _unbundled(self, oid: bytes) -> None:
        bidx = self._bidx
        if bidx is not None:
            bidx[0].pop(hash(oid), None)

    def _put_bundle(self, batch: list[tuple[bytes, bytes]]) -> set[bytes]:
        """Write the chunks of ``batch`` not cached yet as one bundle; the ids now in the cache."""
        listing = self._listing
        fresh = [(oid, data) for oid, data in batch
                 if not self._in_bundle(oid)
                 and not ((listing is None or hash(oid) in listing) and os.path.exists(self._name(oid)))]
        done = {oid for oid, _ in batch}
        room = LISTING_MAX - len(self._index()[0])
        if room < len(fresh):  # the index is full (bounded memory): chunk files for the rest
            for oid, data in fresh[max(room, 0):]:
                if not self._put_now(oid, data):
                    done.discard(oid)
            fresh = fresh[:max(room, 0)]
        if not fresh:
            return done
        written = self._write_evicting(lambda: self._write_bundle(fresh), len(fresh), f"{len(fresh)} chunks")
        if written is None:
            return done - {oid for oid, _ in fresh}
        name, entries, nbytes, mtimes = written
        with self._lock:
            bidx = self._bidx
            if bidx is not None:
                _add_entries(bidx[0], bidx[1], name, entries)
            if self._bundle_adds is not None:
                self._bundle_adds.append((name, entries))
            if mtimes[0] is not None and self._bidx_mtime == mtimes[0]:
                self._bidx_mtime = mtimes[1]  # (only our bundle came since the index was read)
        self.stats.puts += len(fresh)
        self._added(nbytes)
        return done

    def _write_bundle(self, chunks: list[tuple[bytes, bytes]]) -> tuple[str, list[tuple[bytes, int, int]], int,
                                                                           tuple[int | None, int | None]]:
        """One bundle file of ``chunks``, made in tmp/ and renamed into place: (name,
        entries, bytes, the bundles directory's mtime just before and after the rename)."""
        name = secrets.token_hex(12) + _BUNDLE_SUFFIX
        offset = _BUNDLE_HEAD.size + _BUNDLE_ENTRY.size * len(chunks)
        head = [_BUNDLE_HEAD.pack(BUNDLE_MAGIC, len(chunks))]
        entries = []
        for oid, data in chunks:
            entries.append((oid, offset, len(data)))
            head.append(_BUNDLE_ENTRY.pack(oid, offset, len(data)))
            offset += len(data)
        tmp = f"{self._tmp_s}/{name}.{os.getpid()}"
        try:
            self._write_new(tmp, (b"".join(head), *(data for _, data in chunks)))
            before = self._bundles_mtime()
            try:
                os.rename(tmp, f"{self._bundles_s}/{name}")
            except FileNotFoundError:
                self._bundles.mkdir(parents=True, exist_ok=True)
                os.rename(tmp, f"{self._bundles_s}/{name}")
        except BaseException:
            self._unlink(tmp)
            raise
        return name, entries, offset, (before, self._bundles_mtime())

    # --- the listing (module doc) ----------------------------------------------
    def _listed(self, oid: bytes) -> None:
        """A chunk file this process wrote: in the listing (and in a running scan's)."""
        h = hash(oid)
        with self._lock:
            if self._scan_adds is not None:
                self._scan_adds.add(h)
            listing = self._listing
            if listing is not None:
                listing.add(h)
                if len(listing) > LISTING_MAX:
                    self._listing = None  # too large to keep: unknown until a scan finds fewer

    def _unlisted(self, oid: bytes) -> None:
        listing = self._listing
        if listing is not None:
            listing.discard(hash(oid))

    # --- writing -------------------------------------------------------------
    def put(self, oid: bytes, data: bytes) -> None:
        if len(data) > self.max_bytes // 4:
            return  # a chunk that would crowd out the rest of the cache is not worth it
        if self._pending is not None and self._offer(oid, data):
            return
        self._put_now(oid, data)

    def _put_now(self, oid: bytes, data: bytes) -> bool:
        """Write one chunk's file; whether it is now in the cache (written, or there already)."""
        path = self._name(oid)
        listing = self._listing
        if self._in_bundle(oid) or ((listing is None or hash(oid) in listing) and os.path.exists(path)):
            return True
        if self._write_evicting(lambda: self._write(path, data), 1, oid.hex()) is None:
            return False
        self._listed(oid)
        self.stats.puts += 1
        self._added(len(data))
        return True

    def _write_evicting(self, write: Callable[[], T], count: int, what: str) -> T | None:
        """``write()``'s result; on a full disk the cache evicts down to half and
        tries once more; None (``count`` put failures logged) if it fails."""
        if self._size is None:
            self._rescan_size()
        for attempt in (1, 2):
            try:
                return write()
            except OSError as exc:
                if exc.errno in (errno.ENOSPC, errno.EDQUOT) and attempt == 1:
                    log.warning("chunk cache: %s is full; evicting", self.path)
                    self.evict(target=(self._size or 0) // 2)
                    continue
                self.stats.put_failures += count
                log.warning("chunk cache: not caching %s: %s", what, exc.strerror or exc)
                return None
        return None

    def _added(self, nbytes: int) -> None:
        """Count ``nbytes`` this process wrote; rescan or evict if that calls for it."""
        with self._lock:
            self._size = (self._size or 0) + nbytes
            self._unscanned += nbytes
            self._written += nbytes
            rescan = self._unscanned >= self.max_bytes * _RESCAN_FRACTION
        if rescan:
            self._rescan_size()  # also counts what other processes added
        if self._size > self.max_bytes:
            self.evict()

    def _write_new(self, tmp: str, parts) -> None:
        """Write ``parts`` one after another into the new file ``tmp`` (of tmp/)."""
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o644)
        except FileNotFoundError:  # the cache directory was removed under us
            self._tmp.mkdir(parents=True, exist_ok=True)
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o644)
        try:
            for part in parts:
                view = memoryview(part)
                while view:
                    view = view[os.write(fd, view):]
        finally:
            os.close(fd)

    def _write(self, path: str, data: bytes) -> int:
        """One chunk's file, made in tmp/ and renamed into place; its bytes."""
        tmp = f"{self._tmp_s}/{os.path.basename(path)}.{os.getpid()}.{secrets.token_hex(4)}"
        try:
            self._write_new(tmp, (data,))
            try:
                os.rename(tmp, path)
            except FileNotFoundError:
                os.makedirs(os.path.dirname(path), exist_ok=True)
                os.rename(tmp, path)
        except BaseException:
            self._unlink(tmp)
            raise
        return len(data)

    # --- eviction ------------------------------------------------------------
    def size(self) -> int:
        """Bytes in the cache now, counted from the files."""
        return sum(size for _, size, _ in self._scan())

    def _rescan_size(self) -> None:
        self._scan_start()
        names: set[int] = set()
        bundles: list[str] = []
        total = 0
        mtime = self._bundles_mtime()
        try:
            for _, size, path in self._scan():
                total += size
                if path.name.endswith(_BUNDLE_SUFFIX):
                    bundles.append(path.name)
                elif len(names) <= LISTING_MAX:
                    names.add(hash(bytes.fromhex(path.name)))
        finally:
            self._scan_end(names)
        self._index_bundles(bundles, mtime)
        with self._lock:
            self._size = total
            self._unscanned = 0

    def _scan_start(self) -> None:
        with self._lock:
            if self._scans == 0:
                self._scan_adds = set()
            self._scans += 1

    def _scan_end(self, names: set[int] | None) -> None:
        """A scan that found ``names`` (None: it failed) is the listing now, with
        what this process wrote meanwhile (kept only with write-behind)."""
        with self._lock:
            adds = self._scan_adds or set()
            self._scans -= 1
            if self._scans == 0:
                self._scan_adds = None
            if self._pending is None:
                return
            if names is None or len(names) + len(adds) > LISTING_MAX:
                self._listing = None
            else:
                names |= adds
                self._listing = names

    def evict(self, target: int | None = None) -> int:
        """Delete least recently used chunks until at most ``target`` bytes
        (default: the low-water mark) remain; return the bytes freed.  Returns
        0 at once if another thread of this process is already evicting; waits
        for another process's eviction to end (0 if it takes longer than
        ``_EVICT_WAIT_S``)."""
        if target is None:
            target = int(self.max_bytes * _LOW_WATER)
        if not self._evicting.acquire(blocking=False):
            return 0
        try:
            lock_fd = os.open(self._root / "evict.lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        except OSError as exc:
            self._evicting.release()
            log.warning("chunk cache: cannot evict: %s", exc)
            return 0
        try:
            deadline = time.monotonic() + _EVICT_WAIT_S
            while True:
                try:
                    fcntl.flock(lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    break
                except BlockingIOError:
                    if time.monotonic() > deadline:
                        return 0
                    time.sleep(0.005)
            freed = 0
            # Other threads go on writing while this one scans and deletes (their own
            # evictions return at once): what they wrote meanwhile is counted after the
            # scan, and if it puts the cache over the cap again, another round runs, so
            # the cache does not stay over its cap once writing stops.
            for _ in range(3):
                self.stats.evictions += 1
                with self._lock:
                    written_before = self._written
                self._scan_start()
                names: set[int] | None = None
                mtime = self._bundles_mtime()
                try:
                    entries = sorted(self._scan())
                    total = sum(size for _, size, _ in entries)
                    round_freed = 0
                    kept = []
                    for i, (_, size, path) in enumerate(entries):
                        if total - round_freed <= target:
                            kept = entries[i:]
                            break
                        if self._unlink(path):
                            round_freed += size
                            self.stats.evicted_files += 1
                    chunk_files = [p for _, _, p in kept if not p.name.endswith(_BUNDLE_SUFFIX)]
                    if len(chunk_files) <= LISTING_MAX:
                        names = {hash(bytes.fromhex(p.name)) for p in chunk_files}
                finally:
                    self._scan_end(names)
                # (the deletions changed the directory since ``mtime``: a cache without
                # write-behind reads the headers once more, which is harmless)
                self._index_bundles([p.name for _, _, p in kept if p.name.endswith(_BUNDLE_SUFFIX)], mtime)
                freed += round_freed
                with self._lock:
                    # Chunks written between the snapshot and the scan are counted twice:
                    # an overestimate, which only makes the next eviction come sooner.
                    self._size = total - round_freed + (self._written - written_before)
                    self._unscanned = 0
                    over = self._size > self.max_bytes
                if not over:
                    break
            self._remove_stale_tmp()
            log.info("chunk cache: evicted %d bytes, about %d bytes remain", freed, self._size)
            return freed
        finally:
            os.close(lock_fd)  # releases the flock
            self._evicting.release()

    def _scan(self):
        """(mtime, size, path) of every chunk file and bundle."""
        try:
            subdirs = list(os.scandir(self._root))
        except FileNotFoundError:
            return
        try:
            bundles = [f for f in os.scandir(self._bundles_s) if f.name.endswith(_BUNDLE_SUFFIX)]
        except OSError:
            bundles = []
        for f in bundles:
            try:
                st = f.stat(follow_symlinks=False)
            except OSError:
                continue  # evicted meanwhile
            yield st.st_mtime, st.st_size, Path(f.path)
        for sub in subdirs:
            if len(sub.name) != 2 or not sub.is_dir(follow_symlinks=False):
                continue
            try:
                files = list(os.scandir(sub.path))
            except OSError:
                continue
            for f in files:
                if not _HEX_NAME.match(f.name):
                    continue
                try:
                    st = f.stat(follow_symlinks=False)
                except OSError:
                    continue  # evicted meanwhile
                yield st.st_mtime, st.st_size, Path(f.path)

    def _remove_stale_tmp(self) -> None:
        now = time.time()
        try:
            for f in os.scandir(self._tmp):
                try:
                    if now - f.stat().st_mtime > _STALE_TMP_S:
                        os.unlink(f.path)
                except OSError:
                    pass
        except OSError:
            pass

    @staticmethod
    def _unlink(path: str | Path) -> bool:
        try:
            os.unlink(path)
            return True
        except OSError:
            return False


class _WriteBehind:
    """One write-behind writer's state (DiskChunkCache.write_behind): the chunks
    waiting, by id in order and with their bytes, and its stop flag."""

    __slots__ = ("queue", "pending", "bytes", "max_bytes", "closing", "thread", "scan")

    def __init__(self, max_bytes: int):
        self.queue: deque[bytes] = deque()
        self.pending: dict[bytes, bytes] = {}
        self.bytes = 0
        self.max_bytes = max_bytes
        self.closing = False
        self.thread: threading.Thread | None = None
        self.scan = False  # scan the cache first (the listing)


def _add_entries(index: dict[int, int], names: list[str], name: str,
                 entries: list[tuple[bytes, int, int]]) -> None:
    """Index one bundle's entries (at most LISTING_MAX chunks: a larger cache's
    others are misses, fetched again)."""
    number = len(names)
    names.append(name)
    for oid, offset, length in entries:
        if len(index) >= LISTING_MAX:
            return
        index[hash(oid)] = number << 64 | offset << 32 | length


def _read_all(fd: int, size: int) -> bytes:
    parts = []
    while True:
        part = os.read(fd, max(size, 65536))
        if not part:
            break
        parts.append(part)
    return b"".join(parts) if len(parts) != 1 else parts[0]
