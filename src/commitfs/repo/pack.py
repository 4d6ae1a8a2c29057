"""Packs: immutable storage objects of tens of MiB aggregating blobs.

Layout (docs/FORMAT.md is normative)::

    blob bytes ... | entry table | footer

The entry table lists every blob: id, kind, compression, offset, stored and
raw length (``ENTRY`` below); the footer holds the entry count and a magic.
The table is at the end (as in restic) so a pack is written in one pass; it
lets fsck and index rebuilds enumerate a pack, while readers find blobs
through the index and never read the table.

Blobs are appended in the order the writer produced them: a file's chunks in
file order, so sequential reads of one file become few ranged reads.
"""

from __future__ import annotations

import struct
import threading
from enum import IntEnum
from itertools import starmap
from typing import NamedTuple

import zstandard

from commitfs.errors import CorruptObjectError, ObjectNotFoundError
from commitfs.model.ids import hash_bytes

PACK_MAGIC = b"CFPACK1\0"
ENTRY = struct.Struct("<32sBB2xIII")  # id, kind, compression, offset, stored, raw
FOOTER = struct.Struct("<I8s")  # entry count, magic

# Close a pack at this size: large enough that a 10M-image dataset is a few
# thousand objects (and S3 request costs stay low), small enough that an
# interrupted upload loses little and a pack fits comfortably in memory.
TARGET_PACK_SIZE = 32 * 1024 * 1024

# Compression: try zstd on a sample of each chunk and compress only when the
# sample shrinks below this ratio.  Images, video and float weights fail the
# probe and are stored raw, so no CPU is wasted on them.
_PROBE_SIZE = 4096
_PROBE_RATIO = 0.85
_ZSTD_LEVEL = 3
_PROBE_LEVEL = -1  # zstd's fast levels: a probe, not what is stored


class BlobKind(IntEnum):
    CHUNK = 0
    MANIFEST = 1
    TREE = 2


class Compression(IntEnum):
    NONE = 0
    ZSTD = 1
    #: A tree stored as a delta (format version 3, docs/FORMAT.md "Tree deltas"):
    #: its base tree's id, then a zstd frame of its raw bytes compressed with the
    #: base's raw bytes as a raw-content dictionary.
    DELTA = 2


#: Bytes of a delta's header: its base's id.
DELTA_BASE_SIZE = 32


class Location(NamedTuple):
    """Where a blob lies: the index's answer for a blob id.

    A named tuple, not a dataclass: one is made per blob on hot paths (a
    commit, an index lookup), and tuples are several times cheaper to build.
    """

    pack: bytes
    offset: int
    stored: int
    raw: int
    kind: BlobKind
    compression: Compression


def pack_key(pack_id: bytes) -> str:
    h = pack_id.hex()
    return f"packs/{h[:2]}/{h}"


def pack_id_from_key(key: str) -> bytes:
    return bytes.fromhex(key.rsplit("/", 1)[1])


_local = threading.local()


def _compressor(level: int = _ZSTD_LEVEL) -> zstandard.ZstdCompressor:
    # A compressor is not thread-safe, and making one costs more than
    # compressing a small blob: keep one per thread and level.
    comps = getattr(_local, "zstd", None)
    if comps is None:
        comps = _local.zstd = {}
    comp = comps.get(level)
    if comp is None:
        comp = comps[level] = zstandard.ZstdCompressor(level=level)
    return comp


def maybe_compress(data, kind: BlobKind) -> tuple[bytes | memoryview, Compression]:
    """Return (stored bytes, compression), choosing zstd only where it pays.

    ``data`` is any bytes-like object; it is returned as is when stored raw.
    Thread-safe (one compressor per thread), and zstd runs without the GIL.
    """
    if len(data) < 64:
        return data, Compression.NONE
    comp = _compressor()
    if kind is BlobKind.CHUNK:
        if len(data) > _PROBE_SIZE * 2:
            probe = comp.compress(data[:_PROBE_SIZE])
            if len(probe) > _PROBE_SIZE * _PROBE_RATIO:
                return data, Compression.NONE
        elif len(_compressor(_PROBE_LEVEL).compress(data)) > len(data) * _PROBE_RATIO:
            # A small chunk (a small file) is probed whole at zstd's fastest level, twice as
            # fast as compressing it at _ZSTD_LEVEL: most small files of a dataset (images)
            # do not compress, and a million of them cost seconds of probes.
            return data, Compression.NONE
    packed = comp.compress(data)
    if len(packed) < len(data) * _PROBE_RATIO:
        return packed, Compression.ZSTD
    return data, Compression.NONE


def decompress(stored: bytes, compression: Compression, raw: int) -> bytes:
    if compression is Compression.NONE:
        return stored
    if compression is Compression.ZSTD:
        return zstandard.ZstdDecompressor().decompress(stored, max_output_size=raw)
    raise ValueError(f"unknown compression {compression}")


#: A tree is stored as a delta only when the delta is at most this share of its raw
#: size (and the tree at least DELTA_MIN_RAW bytes): past that a tree drifted far from
#: its base, and storing it whole makes it the base of the trees after it.
DELTA_MAX_SHARE = 1 / 8
DELTA_MIN_RAW = 1024


def _raw_dict(base) -> zstandard.ZstdCompressionDict:
    return zstandard.ZstdCompressionDict(bytes(base), dict_type=zstandard.DICT_TYPE_RAWCONTENT)


def encode_delta(data, base_id: bytes, base) -> bytes | None:
    """The stored bytes of tree ``data`` as a delta against the tree ``base_id``
    whose raw bytes are ``base`` (docs/FORMAT.md, "Tree deltas"), or None when
    a delta does not pay (``DELTA_MAX_SHARE``)."""
    if len(data) < DELTA_MIN_RAW:
        return None
    comp = zstandard.ZstdCompressor(level=_ZSTD_LEVEL, dict_data=_raw_dict(base), write_checksum=False,
                                    write_content_size=True, write_dict_id=False)
    frame = comp.compress(data)
    if DELTA_BASE_SIZE + len(frame) > len(data) * DELTA_MAX_SHARE:
        return None
    return bytes(base_id) + frame


def delta_base(stored) -> bytes:
    """The base id a delta's stored bytes name."""
    if len(stored) < DELTA_BASE_SIZE:
        raise ValueError("a delta too short to name its base")
    return bytes(stored[:DELTA_BASE_SIZE])


def apply_delta(stored, base, raw: int) -> bytes:
    """A delta's raw bytes from its stored bytes and its base's raw bytes."""
    frame = bytes(stored[DELTA_BASE_SIZE:])
    return zstandard.ZstdDecompressor(dict_data=_raw_dict(base)).decompress(frame, max_output_size=raw)


def _verify_delta(oid: bytes, loc: Location, stored, base) -> bytes:
    if loc.kind is not BlobKind.TREE:
        raise CorruptObjectError(f"object {oid.hex()} is stored as a delta, which only trees may be")
    if base is None:
        raise CorruptObjectError(f"tree {oid.hex()} is stored as a delta where only a whole tree may be "
                                 "(a delta's base)")
    try:
        bid = delta_base(stored)
    except ValueError as exc:
        raise CorruptObjectError(f"tree {oid.hex()} is {exc} (pack {loc.pack.hex()})") from None
    if bid == oid:
        raise CorruptObjectError(f"tree {oid.hex()} is stored as a delta of itself")
    try:
        base_raw = base(bid)
    except ObjectNotFoundError as exc:  # (not damage by itself: a reader may look again, as for any blob)
        raise ObjectNotFoundError(f"tree {oid.hex()} is stored as a delta of tree {bid.hex()}: {exc}") from None
    try:
        data = apply_delta(stored, base_raw, loc.raw)
    except Exception:
        raise CorruptObjectError(f"tree {oid.hex()} does not decompress against its base {bid.hex()} "
                                 f"(pack {loc.pack.hex()})") from None
    if hash_bytes(data) != oid:
        raise CorruptObjectError(f"object {oid.hex()} fails its hash check (pack {loc.pack.hex()})")
    if len(data) != loc.raw:
        raise CorruptObjectError(f"object {oid.hex()} is {len(data)} bytes, not the {loc.raw} its index entry says")
    return data


def delta_base_of(locate, read_stored):
    """``verify_blob``'s ``base`` for a reader: the base's location from
    ``locate(id)`` (a Location, or None if there is none), its stored bytes from
    ``read_stored(id, location)``, verified as a blob stored whole (a delta of a
    delta is refused, so no chain is ever followed: one extra read at most)."""
    def base(bid: bytes):
        bloc = locate(bid)
        if bloc is None:
            raise ObjectNotFoundError(f"object {bid.hex()} is not in the repository index")
        if bloc.kind is not BlobKind.TREE:
            raise CorruptObjectError(f"the delta base {bid.hex()} is not a tree")
        return verify_blob(bid, bloc, read_stored(bid, bloc))
    return base


# Room for a full pack: the target, one maximal blob past it, and its entry table.
PACK_BUFFER_SIZE = TARGET_PACK_SIZE + 2 * 1024 * 1024


def verify_blob(oid: bytes, loc: Location, stored: bytes, base=None) -> bytes:
    """The raw bytes of a blob read from its pack, checked against its id.

    Raises CorruptObjectError for truncated, undecompressable or altered
    bytes: a reader gets the right bytes or an error, never wrong bytes.
    ``base``: for a tree stored as a delta, a function giving the verified raw
    bytes of the base tree it names (``delta_base_of``: the reader's own read of
    a blob stored whole); a reader that passes none refuses deltas.
    """
    if len(stored) != loc.stored:
        raise CorruptObjectError(f"object {oid.hex()} is truncated in pack {loc.pack.hex()}")
    if loc.compression is Compression.DELTA:
        return _verify_delta(oid, loc, stored, base)
    try:
        data = decompress(stored, loc.compression, loc.raw)
    except Exception:
        raise CorruptObjectError(f"object {oid.hex()} does not decompress (pack {loc.pack.hex()})") from None
    if hash_bytes(data) != oid:
        raise CorruptObjectError(f"object {oid.hex()} fails its hash check (pack {loc.pack.hex()})")
    if len(data) != loc.raw:  # the bytes are right; the index's size for them is not
        raise CorruptObjectError(f"object {oid.hex()} is {len(data)} bytes, not the {loc.raw} its index entry says")
    return data


class PackBuilder:
    """Accumulates blobs into one pack in a preallocated buffer.

    Blobs are copied once, into the buffer; ``finish`` appends the entry table
    and returns a view of the pack, so building a pack allocates nothing per
    blob.  The caller may reuse the buffer (``take_buffer``) once the pack is
    stored: reusing buffers keeps a commit from faulting in fresh pages for
    every pack.
    """

    def __init__(self, buffer: bytearray | None = None) -> None:
        self.buf = buffer if buffer is not None else bytearray(PACK_BUFFER_SIZE)
        self.size = 0
        self.entries: list[tuple[bytes, BlobKind, Compression, int, int, int]] = []

    def __len__(self) -> int:
        return self.size

    def _put(self, data) -> None:
        end = self.size + len(data)
        if end > len(self.buf):
            self.buf.extend(bytes(max(end - len(self.buf), len(self.buf) // 2)))
        self.buf[self.size:end] = data
        self.size = end

    def add(self, oid: bytes, kind: BlobKind, stored, compression: Compression, raw: int) -> int:
        offset = self.size  # (_put inlined: once per blob of a commit)
        n = len(stored)
        end = offset + n
        buf = self.buf
        if end > len(buf):
            buf.extend(bytes(max(end - len(buf), len(buf) // 2)))
        buf[offset:end] = stored
        self.size = end
        self.entries.append((oid, kind, compression, offset, n, raw))
        return offset

    def seal(self) -> memoryview:
        """Append the entry table; return a view of the whole pack (its id is its hash)."""
        # (An entry is the record's fields in its order: one C call per entry, no Python frame.)
        table = b"".join(starmap(ENTRY.pack, self.entries))
        self._put(table + FOOTER.pack(len(self.entries), PACK_MAGIC))
        return memoryview(self.buf)[:self.size]

    def finish(self) -> tuple[bytes, memoryview]:
        """Seal the pack; return (pack id, a view of the whole pack)."""
        view = self.seal()
        return hash_bytes(view), view

    def take_buffer(self) -> bytearray:
        """The buffer, for a new builder (after every view of it is released)."""
        buf, self.buf = self.buf, bytearray()
        return buf


def parse_pack_table(data: bytes) -> list[tuple[bytes, Location]]:
    """Entries of a whole pack (for fsck and index rebuilds)."""
    if len(data) < FOOTER.size:
        raise ValueError("pack too short")
    count, magic = FOOTER.unpack_from(data, len(data) - FOOTER.size)
    if magic != PACK_MAGIC:
        raise ValueError("bad pack magic")
    table_start = len(data) - FOOTER.size - count * ENTRY.size
    if table_start < 0:
        raise ValueError("bad pack entry count")
    out = []
    for i in range(count):
        oid, kind, comp, off, stored, raw = ENTRY.unpack_from(data, table_start + i * ENTRY.size)
        if off + stored > table_start:
            raise ValueError("pack entry out of bounds")
        out.append((oid, Location(b"", off, stored, raw, BlobKind(kind), Compression(comp))))
    return out


def load_pack_table(store, pack_id: bytes, size: int | None = None) -> list[tuple[bytes, Location]]:
    """A stored pack's entry table, read with two ranged reads (footer, then
    table) rather than the whole pack: for gc and index rebuilds.  Locations
    name ``pack_id``.  Raises CorruptObjectError if the table does not parse,
    ObjectNotFoundError (from the store) if the pack is gone."""
    key = pack_key(pack_id)
    if size is None:
        size = store.lookup_size(key)
        if size is None:
            raise ObjectNotFoundError(f"pack {pack_id.hex()} is gone")
    if size < FOOTER.size:
        raise CorruptObjectError(f"pack {pack_id.hex()} is too short to hold its table")
    count, magic = FOOTER.unpack(store.load_range(key, size - FOOTER.size, FOOTER.size))
    start = size - FOOTER.size - count * ENTRY.size
    if magic != PACK_MAGIC or start < 0:
        raise CorruptObjectError(f"pack {pack_id.hex()} has no valid entry table")
    table = store.load_range(key, start, count * ENTRY.size) if count else b""
    if len(table) != count * ENTRY.size:
        raise CorruptObjectError(f"pack {pack_id.hex()} is truncated")
    out = []
    for i in range(count):
        oid, kind, comp, off, stored, raw = ENTRY.unpack_from(table, i * ENTRY.size)
        if off + stored > start or kind > 2 or comp > 2 or (comp == 2 and kind != 2):
            raise CorruptObjectError(f"pack {pack_id.hex()} has a malformed entry")
        out.append((oid, Location(pack_id, off, stored, raw, BlobKind(kind), Compression(comp))))
    return out
