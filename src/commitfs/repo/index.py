"""The blob index: blob id -> (pack, offset, length), without loading it all.

The index is a set of immutable *segments* (``index/<id>``), each a sorted
table of the blobs one writer added, with a fan-out table in front::

    header | pack ids | fan-out (2^bits x u32) | entries (sorted by id) | checksum

To find a blob, a reader takes the first ``bits`` bits of its id as a bucket,
reads two fan-out words to learn the bucket's entry range, then reads and
searches that range: two small ranged reads per segment, whatever the
segment's size, so no repository-wide table is ever held in memory.  Small
segments (the common case: one per commit) are simply loaded whole and kept.

Segments are merged LSM-style: whenever eight segments of the same size class
(a power of eight in entry count) exist, a writer merges them into one of the
next class, saves it, and only then removes the inputs.  So a repository of N
blobs has O(log N) segments, and a lookup costs O(log N) small reads.  Readers
that find a segment gone re-list and retry.
"""

from __future__ import annotations

import bisect
import heapq
import itertools
import logging
import math
import operator
import struct
import threading
from array import array
from collections import defaultdict
from collections.abc import Iterable, Iterator
from typing import BinaryIO

from commitfs.errors import CorruptObjectError, ObjectNotFoundError, RepositoryError, StorageError
from commitfs.model.ids import ID_SIZE, hash_bytes, new_hasher
from commitfs.repo.gcstate import lease_active
from commitfs.repo.lru import LockedLRU
from commitfs.repo.pack import BlobKind, Compression, Location
from commitfs.storage.base import Store

log = logging.getLogger(__name__)

SEG_MAGIC = b"CFIDX1\0\0"
HEADER = struct.Struct("<8sIIQ")  # magic, pack count, fan-out bits, entry count
ENTRY = struct.Struct("<32sIIIIBB2x")  # id, pack number, offset, stored, raw, kind, compression
FANOUT = struct.Struct("<I")
INDEX_PREFIX = "index/"

# Target about 64 entries (3 KiB) per bucket: one small ranged read.
_BUCKET_ENTRIES = 64
_MAX_BITS = 24
# Segments up to this size are loaded whole (one read) and kept in memory.
_WHOLE_LOAD_LIMIT = 4 * 1024 * 1024
_MERGE_FANIN = 8
# A segment this writer adds puts its answers in the answer cache up to this many
# entries (a small commit's, read back at once by the same process); a commit's
# checkpoint segment of 100k blobs would fill it (~300 B an answer) for nothing.
_ANSWERED_SEGMENT = 4096
# Bytes of each id a large segment of a local store keeps in memory for writers'
# dedup questions (Segment.contains): a prefix this long names one blob among
# billions, and a match is confirmed by a lookup (two preads of the page
# cache), so 8 B a blob instead of 32.  Over a remote store a confirmation is
# two ranged GETs one after another, for every chunk of data already stored,
# so there the whole ids are kept and a match needs no confirmation.
_ID_PREFIX = 8
_ID_REST = 32 - _ID_PREFIX
# An entry (ENTRY) read as its id's prefix, a big-endian integer, and the rest of its id.
_PREFIX_REST = struct.Struct(f">Q{_ID_REST}s{ENTRY.size - ID_SIZE}x")
_FIRST, _SECOND = operator.itemgetter(0), operator.itemgetter(1)
# Segment.contains over a local store: lookups, until this many questions (or a
# hundredth of the segment's entries) make a table of its ids the cheaper way.
_TABLE_AFTER_MIN, _TABLE_AFTER_SHARE = 256, 100


def _fanout_bits(n: int) -> int:
    if n <= _BUCKET_ENTRIES:
        return 0
    return min(_MAX_BITS, math.ceil(math.log2(n / _BUCKET_ENTRIES)))


def _bucket(oid: bytes, bits: int) -> int:
    return int.from_bytes(oid[:4], "big") >> (32 - bits) if bits else 0


def encode_segment(entries: Iterable[tuple[bytes, Location]]) -> bytes:
    """Encode entries (any order; of duplicates the first is kept) as a segment."""
    entries = entries if isinstance(entries, list) else list(entries)
    by_id = dict(reversed(entries))  # of duplicates, the first
    ids = sorted(by_id)
    locs = [by_id[oid] for oid in ids]
    packs = {pid: i for i, pid in enumerate(dict.fromkeys(loc[0] for loc in locs))}  # by first use
    bits = _fanout_bits(len(ids))
    out = bytearray(HEADER.pack(SEG_MAGIC, len(packs), bits, len(ids)))
    for pid in packs:
        out += pid
    # The fan-out: entries in buckets up to each bucket, found by bisection of the sorted ids.
    shift = 32 - bits
    out += b"".join([FANOUT.pack(bisect.bisect_left(ids, ((b + 1) << shift).to_bytes(4, "big")))
                     for b in range((1 << bits) - 1)])
    out += FANOUT.pack(len(ids))
    at = len(out)
    out += bytes(len(ids) * ENTRY.size + ID_SIZE)  # at its final size: records packed in place
    pack = ENTRY.pack_into
    size = ENTRY.size
    for oid, loc in zip(ids, locs):
        pack(out, at, oid, packs[loc[0]], loc[1], loc[2], loc[3], loc[4], loc[5])
        at += size
    with memoryview(out) as view:
        out[at:] = hash_bytes(view[:at])
    return bytes(out)


# Records a merge reads of each input at a time (ranged reads of a large segment).
_MERGE_BLOCK = 16_384


def _segment_records(seg: Segment, k: int) -> Iterator[tuple[bytes, int, bytes, bytes]]:
    """(id, k, pack id, record) of a segment's entries in id order, read a block at a time."""
    seg.load_header()
    base, size, packs, data = seg._entries_at(), ENTRY.size, seg._packs, seg._data
    for start in range(0, seg.count, _MERGE_BLOCK):
        n = min(_MERGE_BLOCK, seg.count - start)
        at = base + start * size
        raw = data[at:at + n * size] if data is not None else seg.store.load_range(seg.key, at, n * size)
        if len(raw) != n * size:
            raise CorruptObjectError(f"index segment {seg.key} is truncated")
        for i in range(0, n * size, size):
            rec = raw[i:i + size]
            packno, kind, comp = _PACKNO.unpack_from(rec, ID_SIZE)[0], rec[48], rec[49]
            if packno >= len(packs) or kind >= len(_KINDS) or comp >= len(_COMPRESSIONS):
                raise CorruptObjectError(f"index segment {seg.key} has a malformed entry")
            yield rec[:ID_SIZE], k, packs[packno], rec


def merge_segments(group: list[Segment], out: BinaryIO) -> tuple[int, bytes]:
    """Write into ``out`` (a seekable binary file, from offset 0) the segment
    encode_segment would make of the group's entries (of duplicates the first
    segment's kept); its (size, BLAKE3 of it: its key's hash).  Streamed: the
    inputs are read a block at a time and merged in id order twice (once for
    the pack table and count, once to write), and the output goes to ``out`` a
    block at a time, so memory holds neither a Python object per entry nor the
    output (52 B an entry: 83 MB for the 1.6M blobs of a million-file commit's
    merge); the fan-out is written once counted, and the checksum read back."""
    def merged():
        last = None
        for oid, _, pack, rec in heapq.merge(*(_segment_records(seg, k) for k, seg in enumerate(group))):
            if oid == last:
                continue
            if last is not None and oid < last:
                raise CorruptObjectError("an index segment being merged is not sorted")
            last = oid
            yield oid, pack, rec

    packs: dict[bytes, int] = {}
    n = 0
    for _, pack, _ in merged():
        packs.setdefault(pack, len(packs))
        n += 1
    bits = _fanout_bits(n)
    fan_at = HEADER.size + len(packs) * ID_SIZE
    out.seek(0)
    out.truncate()
    out.write(HEADER.pack(SEG_MAGIC, len(packs), bits, n))
    out.write(b"".join(packs))
    out.write(bytes((1 << bits) * FANOUT.size))  # written once counted
    counts = [0] * (1 << bits)
    tail = ID_SIZE + _PACKNO.size
    buf = bytearray()
    packno = _PACKNO.pack
    for oid, pack, rec in merged():
        counts[_bucket(oid, bits)] += 1
        buf += oid
        buf += packno(packs[pack])
        buf += rec[tail:]
        if len(buf) >= _MERGE_WRITE:
            out.write(buf)
            buf.clear()
    out.write(buf)
    end = out.tell()
    out.seek(fan_at)
    out.write(b"".join([FANOUT.pack(total) for total in itertools.accumulate(counts)]))
    # The checksum (BLAKE3 of all before it) and the key's hash (of all with it), read back.
    check, whole = new_hasher(), new_hasher()
    out.seek(0)
    while block := out.read(_MERGE_WRITE):
        check.update(block)
        whole.update(block)
    digest = check.digest()
    whole.update(digest)
    out.seek(end)
    out.write(digest)
    out.flush()
    return end + ID_SIZE, whole.digest()


#: Bytes a merge buffers before writing them to its output file.
_MERGE_WRITE = 1024 * 1024


def segment_key(data: bytes) -> str:
    return INDEX_PREFIX + hash_bytes(data).hex()


_FANOUT_PAIR = struct.Struct("<II")
_PACKNO = struct.Struct("<I")
_ENTRY_SIZE = ENTRY.size
_new_tuple = tuple.__new__  # a Location without the named tuple's Python-level constructor
_KINDS = tuple(BlobKind)  # by value: 0, 1, 2
_COMPRESSIONS = tuple(Compression)


def _find_record(data: bytes, oid: bytes, start: int, end: int) -> int | None:
    """Offset of the ENTRY record for ``oid`` among the records in data[start:end].

    A bucket holds few records (about 64), so a C-speed substring search beats
    a binary search in Python; a match must also sit at a record boundary."""
    i = data.find(oid, start, end)
    while i != -1:
        if (i - start) % ENTRY.size == 0:
            return i
        i = data.find(oid, i + 1, end)
    return None


class Segment:
    """One index segment, read lazily through the store."""

    def __init__(self, store: Store, key: str, size: int | None = None):
        self.store = store
        self.key = key
        self.size = size
        self._data: bytes | None = None
        self._packs: list[bytes] | None = None
        #: (data, packs, fan-out offset, entries offset, bits) of a segment held in
        #: memory, published in one assignment once loaded (see lookup_loaded).
        self.loaded: tuple | None = None
        #: A segment too large to hold whole: its ids, sorted, once a writer asked
        #: (``contains``): their first _ID_PREFIX bytes as integers (8 bytes a blob),
        #: and over a remote store the rest of each id too (24 more: ``_id_rests``).
        self._ids: array | None = None
        self._id_rests: bytes | None = None
        #: Questions ``contains`` answers by ``lookup`` before it builds the table
        #: (None: not decided yet; 0 over a remote store).
        self._lookups_left: int | None = None
        self.bits = 0
        self.count = 0
        #: Why this segment cannot be read (checksum, magic), once found: it is
        #: not read again, and lookups go on in the other segments.
        self.damaged: str | None = None
        self._lock = threading.Lock()

    @property
    def in_memory(self) -> bool:
        """Loaded whole: a lookup costs no storage read."""
        return self._data is not None

    def _fanout_at(self) -> int:
        return HEADER.size + len(self._packs) * ID_SIZE

    def _entries_at(self) -> int:
        return self._fanout_at() + (1 << self.bits) * FANOUT.size

    def load_header(self) -> None:
        if self._packs is not None:
            return
        if self.damaged is not None:
            raise CorruptObjectError(self.damaged)
        with self._lock:
            if self._packs is not None:
                return
            try:
                self._load_header()
            except CorruptObjectError as exc:
                self.damaged = str(exc)
                raise

    def _load_header(self) -> None:
        if self.size is None:
            self.size = self.store.lookup_size(self.key)
            if self.size is None:
                raise ObjectNotFoundError(f"index segment {self.key} is gone")
        if self.size <= _WHOLE_LOAD_LIMIT:
            data = self.store.load_object(self.key)
            if len(data) < HEADER.size + ID_SIZE or hash_bytes(data[:-ID_SIZE]) != data[-ID_SIZE:]:
                raise CorruptObjectError(f"index segment {self.key} fails its checksum")
            head = data[:HEADER.size]
        else:
            data = None
            head = self.store.load_range(self.key, 0, HEADER.size)
        if len(head) < HEADER.size:
            raise CorruptObjectError(f"index segment {self.key} is truncated")
        magic, npacks, bits, count = HEADER.unpack(head)
        if magic != SEG_MAGIC:
            raise CorruptObjectError(f"index segment {self.key} has a bad magic")
        # A checksum proves no integrity against a hostile writer: the
        # header must also describe exactly the segment's size, and (when
        # held in memory) the fan-out must rise to the entry count.
        size = len(data) if data is not None else self.size
        if bits > _MAX_BITS or size != (HEADER.size + npacks * ID_SIZE + (1 << bits) * FANOUT.size
                                        + count * ENTRY.size + ID_SIZE):
            raise CorruptObjectError(f"index segment {self.key} has a malformed header")
        if data is not None:
            at = HEADER.size + npacks * ID_SIZE
            fan = [v for (v,) in FANOUT.iter_unpack(data[at:at + (1 << bits) * FANOUT.size])]
            if fan[-1] != count or any(a > b for a, b in zip(fan, fan[1:])):
                raise CorruptObjectError(f"index segment {self.key} has a malformed fan-out table")
        if data is not None:
            table = data[HEADER.size:HEADER.size + npacks * ID_SIZE]
        else:
            table = self.store.load_range(self.key, HEADER.size, npacks * ID_SIZE)
        self.bits, self.count = bits, count
        self._data = data
        self._packs = [table[i:i + ID_SIZE] for i in range(0, len(table), ID_SIZE)]
        if data is not None:
            fan = HEADER.size + npacks * ID_SIZE
            self.loaded = (data, self._packs, fan, fan + (1 << bits) * FANOUT.size, bits)

    def lookup_loaded(self, oid: bytes) -> Location | None:
        """``lookup`` of a segment held in memory (``loaded`` is set): the hot path
        of a mount's reads, so it is written out flat."""
        data, packs, fan, base, bits = self.loaded  # type: ignore[misc]
        if bits and (b := int.from_bytes(oid[:4], "big") >> (32 - bits)):
            lo, hi = _FANOUT_PAIR.unpack_from(data, fan + (b - 1) * FANOUT.size)
        else:
            lo, hi = 0, FANOUT.unpack_from(data, fan)[0]
        i = _find_record(data, oid, base + lo * _ENTRY_SIZE, base + hi * _ENTRY_SIZE)
        if i is None:
            return None
        _, packno, off, stored, raw, kind, comp = ENTRY.unpack_from(data, i)
        try:
            return _new_tuple(Location, (packs[packno], off, stored, raw, _KINDS[kind], _COMPRESSIONS[comp]))
        except IndexError:
            raise CorruptObjectError(f"index segment {self.key} has a malformed entry") from None

    def _read(self, offset: int, length: int) -> bytes:
        if self._data is not None:
            return self._data[offset:offset + length]
        return self.store.load_range(self.key, offset, length)

    def lookup(self, oid: bytes) -> Location | None:
        """The blob's location in this segment, or None."""
        if self._packs is None:
            self.load_header()
        if self.loaded is not None:
            return self.lookup_loaded(oid)
        b = _bucket(oid, self.bits)
        fan = self._fanout_at()
        if b == 0:
            lo = 0
            (hi,) = FANOUT.unpack(self._read(fan, FANOUT.size))
        else:
            lo, hi = _FANOUT_PAIR.unpack(self._read(fan + (b - 1) * FANOUT.size, 2 * FANOUT.size))
        if lo >= hi:
            return None
        if hi > self.count:
            raise CorruptObjectError(f"index segment {self.key} has a malformed fan-out table")
        data = self._read(self._entries_at() + lo * ENTRY.size, (hi - lo) * ENTRY.size)
        at = _find_record(data, oid, 0, len(data))
        return None if at is None else self._location(ENTRY.unpack_from(data, at))

    def contains(self, oid: bytes) -> bool:
        """True if the blob is in this segment: a writer's dedup question.

        A segment held in memory answers from memory.  A large one would cost
        two ranged reads per question (``lookup``), one after another on the
        committing thread: a commit of N new chunks to S3 would wait for 2N
        round trips per large segment.  So its ids are read once (ranged reads
        of a block of entries each), and kept as one sorted table searched in
        memory (by bisection, in C) from then on.  Over a local store the table holds id prefixes (8 bytes
        a blob, against the 52 of an entry) and a prefix that matches costs the
        lookup that confirms it (a blob already stored: two preads).  Over a
        remote store that lookup would be two ranged GETs one after another
        for every chunk of data the repository already holds (a re-commit, a
        push), so the table holds whole ids (32 bytes a blob) and a match is
        the answer.  Over a local store the table is built only once a writer has
        asked more than ``count // _TABLE_AFTER_SHARE`` questions (a lookup is two
        preads of the page cache, some microseconds; the table costs about a tenth
        of a microsecond per entry of the segment): a small commit into a large repository asks a few
        hundred, and it waited 20 ms for a table of 200,000 prefixes it then
        searched 300 times."""
        if self._packs is None:
            self.load_header()
        if self.loaded is not None:
            return self.lookup_loaded(oid) is not None
        ids = self._ids
        if ids is None:
            left = self._lookups_left
            if left is None:
                local = self.store.local_path(self.key) is not None
                left = max(_TABLE_AFTER_MIN, self.count // _TABLE_AFTER_SHARE) if local else 0
            if left > 0:
                self._lookups_left = left - 1  # (a lost update between threads only moves the table)
                return self.lookup(oid) is not None
            with self._lock:
                if self._ids is None:
                    whole = self.store.local_path(self.key) is None
                    self._ids, self._id_rests = self._prefix_table(whole)
                ids = self._ids
        rests = self._id_rests
        want = int.from_bytes(oid[:_ID_PREFIX], "big")
        i = bisect.bisect_left(ids, want)  # in C: a million-file commit asks millions of times
        while i < len(ids) and ids[i] == want:
            if rests is None:
                return self.lookup(oid) is not None  # the prefix of one: is it this blob?
            if rests[i * _ID_REST:(i + 1) * _ID_REST] == oid[_ID_PREFIX:]:
                return True  # the whole id: no lookup to confirm it
            i += 1
        return False

    def _prefix_table(self, whole: bool) -> tuple[array, bytes | None]:
        """The first _ID_PREFIX bytes of every entry's id, as big-endian unsigned
        integers (sorted as the ids are, searched by bisect in C), and if
        ``whole`` the rest of each id (_ID_REST bytes each, in the same order);
        read a block of _MERGE_BLOCK entries at a time: the whole entry table of
        an 800k-entry segment is 42 MB, and a bytes object per prefix 33 MB more."""
        table = array("Q")
        rests = []
        base, size = self._entries_at(), ENTRY.size
        for start in range(0, self.count, _MERGE_BLOCK):
            n = min(_MERGE_BLOCK, self.count - start)
            raw = self.store.load_range(self.key, base + start * size, n * size)
            if len(raw) != n * size:
                raise CorruptObjectError(f"index segment {self.key} is truncated")
            # Each entry's fields by struct's own loop (no Python code per entry: a
            # commit's first dedup question in a large repository waits for this).
            fields = _PREFIX_REST.iter_unpack(raw)
            if whole:
                fields = list(fields)
                rests.append(b"".join(map(_SECOND, fields)))
            table.extend(map(_FIRST, fields))
        return table, (b"".join(rests) if whole else None)

    def _location(self, rec) -> Location:
        _, packno, off, stored, raw, kind, comp = rec
        try:
            return Location(self._packs[packno], off, stored, raw, _KINDS[kind], _COMPRESSIONS[comp])
        except IndexError:
            raise CorruptObjectError(f"index segment {self.key} has a malformed entry") from None

    def iter_entries(self) -> Iterator[tuple[bytes, Location]]:
        self.load_header()
        data = self._data if self._data is not None else self.store.load_object(self.key)
        base = self._entries_at()
        for i in range(self.count):
            rec = ENTRY.unpack_from(data, base + i * ENTRY.size)
            yield rec[0], self._location(rec)


class Index:
    """All segments of a repository, with a cache of recent answers."""

    def __init__(self, store: Store):
        self.store = store
        self._segments: dict[str, Segment] = {}
        self._snapshot: tuple[Segment, ...] = ()  # _segments' values, replaced whole on change
        self._lock = threading.Lock()
        # Recent answers: 200k locations is ~40 MB at most, and covers the
        # working set of a mount reading many files at once.
        self._answers = LockedLRU(maxsize=200_000)
        #: Net bytes this object's segment writes added to the store (new
        #: segments and merges, less the merged inputs removed): what a
        #: writer's bytes_stored counts beside its packs.
        self.bytes_added = 0
        self.refresh()

    def refresh(self) -> None:
        """Re-list segments: pick up other writers' commits and merges."""
        keys = list(self.store.iter_keys(INDEX_PREFIX))

        def kept(k: str) -> Segment | None:
            seg = self._segments.get(k)
            return None if seg is None or seg.damaged else seg  # damaged: read again (a repair rewrites it)

        with self._lock:
            self._segments = {k: kept(k) or Segment(self.store, k) for k in keys}
            self._snapshot = tuple(self._segments.values())

    def segments(self) -> tuple[Segment, ...]:
        return self._snapshot  # no lock: an immutable tuple, swapped whole

    def loaded_segments(self) -> tuple[tuple, ...]:
        """The ``loaded`` tuples of the segments held in memory (commitfs.repo._fastread)."""
        return tuple(s.loaded for s in self._snapshot if s.loaded is not None)

    def _add(self, key: str, size: int) -> None:
        with self._lock:
            self._segments[key] = Segment(self.store, key, size)
            self._snapshot = tuple(self._segments.values())

    def _forget(self, key: str) -> None:
        with self._lock:
            self._segments.pop(key, None)
            self._snapshot = tuple(self._segments.values())

    def lookup_in_memory(self, oid: bytes) -> Location | None:
        """The blob's location if memory answers it (a segment held whole, or
        a recent answer), else None: the blob may still be in a segment not
        loaded yet, or in one not listed yet (``lookup`` then tells)."""
        for seg in self._snapshot:
            if seg.loaded is not None:
                loc = seg.lookup_loaded(oid)
                if loc is not None:
                    return loc
        return self._answers.get(oid)

    def lookup(self, oid: bytes, *, refresh: bool = True, strict: bool = True) -> Location | None:
        """The blob's location, or None; on a miss, re-list once (if ``refresh``).

        A damaged segment is skipped (it costs only the lookups it holds); a
        blob found in no readable segment while one is damaged raises
        CorruptObjectError naming it, unless ``strict`` is False (a writer then
        simply stores the blob again)."""
        # Memory first: a segment held whole is cheaper than the answer cache,
        # which only keeps what cost storage reads.
        loc = self.lookup_in_memory(oid)
        if loc is not None:
            return loc
        damaged: Segment | None = None
        for attempt in range(3):
            try:
                for seg in self.segments():
                    try:
                        loc = seg.lookup(oid)
                    except CorruptObjectError:
                        damaged = seg  # costs only the lookups it holds: go on
                        continue
                    if loc is not None:
                        if not seg.in_memory:  # remember what cost storage reads
                            self._answers[oid] = loc
                        return loc
            except ObjectNotFoundError:
                self.refresh()  # a merge removed a segment under us
                continue
            if not refresh or attempt:
                break
            self.refresh()
        if damaged is not None and strict:
            raise CorruptObjectError(
                f"object {oid.hex()} is in no readable index segment, and {damaged.damaged} "
                "(commitfs fsck --repair rebuilds the index from the packs)")
        return None

    def lookup_fresh(self, oid: bytes, exclude_packs: frozenset[bytes] = frozenset(),
                     exclude_segments: frozenset[str] = frozenset()) -> Location | None:
        """A location of the blob in the segments listed now (call ``refresh``
        first), skipping answers cached, packs in ``exclude_packs`` and
        segments in ``exclude_segments`` (ones a gc is replacing)."""
        for _ in range(3):
            try:
                for seg in self.segments():
                    if seg.key in exclude_segments:
                        continue
                    try:
                        loc = seg.lookup(oid)
                    except CorruptObjectError:
                        continue
                    if loc is not None and loc.pack not in exclude_packs:
                        return loc
                return None
            except ObjectNotFoundError:
                self.refresh()
        return None

    def forget_answers(self) -> None:
        """Drop the cached answers (after gc moved or removed packs)."""
        self._answers.clear()

    def contains(self, oid: bytes) -> bool:
        """True if the blob is indexed, without re-listing (a writer's dedup
        question): segments answer from memory (Segment.contains), so a commit
        makes no storage request per chunk."""
        # (Asked once per blob a commit adds: no lock, closure or generator on the way.
        # A plain dict lookup is atomic, and an answer's presence is all that counts here.)
        if oid in self._answers:
            return True
        segments = self._snapshot
        if not segments:
            return False
        # Concurrent writers merge segments all the time: one listed a moment ago
        # may be gone.  Re-list and ask again; a segment that keeps vanishing on the
        # last try costs a blob stored twice, never a failed commit.
        attempts = 4
        for attempt in range(attempts):
            last = attempt == attempts - 1
            try:
                for seg in segments:
                    try:
                        if seg.contains(oid):
                            return True
                    except CorruptObjectError:
                        pass  # a damaged segment: the writer stores the blob again
                    except ObjectNotFoundError:
                        if not last:
                            raise
                        # still merging away under us: at worst the blob is stored again
                return False
            except ObjectNotFoundError:
                self.refresh()  # a merge removed a segment under us
                segments = self._snapshot
        return False

    def add_segment(self, entries: Iterable[tuple[bytes, Location]]) -> str | None:
        """Save a new segment (call after its packs are stored); merge if due."""
        entries = list(entries)
        if not entries:
            return None
        data = encode_segment(entries)
        key = segment_key(data)
        self.store.save_object(key, data)
        self.bytes_added += len(data)
        self._add(key, len(data))
        if len(entries) <= _ANSWERED_SEGMENT:
            for oid, loc in entries:
                self._answers[oid] = loc
        self.merge_if_due()
        return key

    def merge_if_due(self, fanin: int = _MERGE_FANIN) -> bool:
        classes: dict[int, list[Segment]] = defaultdict(list)
        for seg in self.segments():
            try:
                seg.load_header()
            except (ObjectNotFoundError, CorruptObjectError):
                continue
            classes[int(math.log(max(seg.count, 1), fanin))].append(seg)
        for cls in sorted(classes):
            if len(classes[cls]) >= fanin:
                # gc rewrites the index while it holds its lease: a merge
                # then could put back entries gc removed (docs/FORMAT.md).
                if lease_active(self.store):
                    return False
                try:
                    return self.merge(classes[cls])
                except (StorageError, RepositoryError, OSError) as exc:
                    # A merge is an optimisation of segments already stored: a damaged
                    # segment stays as it is (lookups treat it as damaged, fsck reports
                    # it), and a store or temporary file that fails here fails nothing
                    # the commit that added a segment needs (a merge is tried again at
                    # the next one).  The inputs are removed only after the output is
                    # saved, so nothing is lost either way.
                    log.warning("index merge skipped: %s", exc)
                    return False
        return False

    def merge(self, group: list[Segment] | None = None) -> bool:
        """Merge segments (all by default) into one; inputs removed after it is saved."""
        group = self.segments() if group is None else group
        if len(group) < 2:
            return False
        # The output goes to a temporary file and is stored from it (Store.save_object_from):
        # a merge's memory does not grow with the segments merged.
        import tempfile  # (here: it imports random, which a mount's start-up does not need)

        with tempfile.TemporaryFile(prefix="commitfs-merge-") as f:
            try:
                size, digest = merge_segments(list(group), f)
            except ObjectNotFoundError:
                return False  # another writer merged these first
            key = INDEX_PREFIX + digest.hex()
            self.store.save_object_from(key, f, size)
        self.bytes_added += size
        self._add(key, size)
        for seg in group:
            if seg.key != key:
                self.store.remove_object(seg.key)
                self.bytes_added -= seg.size or 0
                self._forget(seg.key)
        return True
