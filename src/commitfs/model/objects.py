"""The repository's objects and their canonical encodings (pure, no I/O).

Three kinds of metadata object exist besides raw chunks:

* FileManifest: the ordered chunk ids and sizes of one file's content.  A
  file's id is the BLAKE3 of its manifest's encoding, so it depends only on the
  content (and the format's fixed chunking parameters), never on where chunks
  are stored.
* Tree: one directory, entries sorted by the UTF-8 bytes of their names.
* Commit: tree, parents, author, time, message, metadata map.

docs/FORMAT.md is the normative description of these encodings.
"""

from __future__ import annotations

import bisect
import itertools
import json
from dataclasses import dataclass, field
from enum import Enum
from itertools import islice, repeat
from operator import countOf, itemgetter, lt
from typing import NamedTuple

from commitfs.errors import CorruptObjectError
from commitfs.model.ids import ID_SIZE, hash_bytes

try:
    from commitfs.model import _fastdecode
except ImportError:  # built without a C compiler: Tree.decode's Python loop does the same
    _fastdecode = None

MANIFEST_MAGIC = b"CFFILE1\n"
TREE_MAGIC = b"CFTREE1\n"
COMMIT_TYPE = "commitfs-commit-1"


class DecodeError(ValueError):
    """Bytes that are not a canonical encoding of the expected object."""


# --- varints -----------------------------------------------------------------
def _put_uvarint(out: bytearray, n: int) -> None:
    # Fast paths for the common lengths: names, and file sizes up to 2 MiB.
    if 0 <= n < 0x80:
        out.append(n)
        return
    if 0 < n < 0x200000:
        if n < 0x4000:
            out += bytes(((n & 0x7F) | 0x80, n >> 7))
        else:
            out += bytes(((n & 0x7F) | 0x80, ((n >> 7) & 0x7F) | 0x80, n >> 14))
        return
    if n < 0:
        raise ValueError("negative varint")
    while n >= 0x80:
        out.append((n & 0x7F) | 0x80)
        n >>= 7
    out.append(n)


def _get_uvarint(buf: bytes, pos: int) -> tuple[int, int]:
    n = shift = 0
    start = pos
    while True:
        if pos >= len(buf):
            raise DecodeError("truncated varint")
        b = buf[pos]
        pos += 1
        n |= (b & 0x7F) << shift
        if not b & 0x80:
            # Canonical: no superfluous trailing zero groups.
            if b == 0 and pos - start > 1:
                raise DecodeError("non-canonical varint")
            return n, pos
        shift += 7
        if shift > 63:
            raise DecodeError("varint too long")


# --- file manifests ------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class FileManifest:
    chunk_ids: tuple[bytes, ...]
    chunk_sizes: tuple[int, ...]
    # Prefix sums of chunk_sizes, computed at the first offset lookup (``ends``).
    _ends: tuple[int, ...] | None = field(default=None, init=False, repr=False, compare=False)

    @property
    def ends(self) -> tuple[int, ...]:
        """Prefix sums of the chunk sizes: chunk i holds the file's bytes
        [chunk_start(i), ends[i]).  Every reader maps offsets to chunks with
        these (chunk_range), so the file's layout is computed once per manifest."""
        ends = self._ends
        if ends is None:
            ends = tuple(itertools.accumulate(self.chunk_sizes))
            object.__setattr__(self, "_ends", ends)
        return ends

    @property
    def size(self) -> int:
        ends = self.ends
        return ends[-1] if ends else 0

    def chunk_start(self, i: int) -> int:
        """The file offset chunk ``i`` starts at."""
        return self.ends[i - 1] if i else 0

    def chunk_range(self, offset: int, size: int) -> tuple[int, int]:
        """Indices [first, last) of the chunks overlapping [offset, offset+size)."""
        ends = self.ends
        total = ends[-1] if ends else 0
        if size <= 0 or offset >= total:
            return 0, 0
        first = bisect.bisect_right(ends, offset)
        last = bisect.bisect_left(ends, min(offset + size, total)) + 1
        return first, last

    def encode(self) -> bytes:
        out = bytearray(MANIFEST_MAGIC)
        _put_uvarint(out, len(self.chunk_ids))
        for cid, size in zip(self.chunk_ids, self.chunk_sizes):
            out += cid
            _put_uvarint(out, size)
        return bytes(out)

    @property
    def id(self) -> bytes:
        return hash_bytes(self.encode())

    @classmethod
    def decode(cls, data: bytes) -> FileManifest:
        if not data.startswith(MANIFEST_MAGIC):
            raise DecodeError("not a file manifest")
        # Hot: a mount decodes one per file it reads.  Varints of up to three
        # bytes (a count below 128, chunk sizes below 2 MiB) are read inline.
        pos = len(MANIFEST_MAGIC)
        end = len(data)
        n = data[pos] if pos < end else 0x80
        if n < 0x80:
            pos += 1
        else:
            n, pos = _get_uvarint(data, pos)
        ids, sizes = [], []
        for _ in range(n):
            cid = data[pos:pos + ID_SIZE]
            if len(cid) != ID_SIZE:
                raise DecodeError("truncated manifest")
            pos += ID_SIZE
            b0 = data[pos] if pos < end else 0x80
            if b0 < 0x80:
                size = b0
                pos += 1
            elif pos + 2 < end and data[pos + 1] & 0x80 and (b2 := data[pos + 2]) < 0x80 and b2:
                size = (b0 & 0x7F) | ((data[pos + 1] & 0x7F) << 7) | (b2 << 14)
                pos += 3
            else:
                size, pos = _get_uvarint(data, pos)
            if size == 0:
                raise DecodeError("empty chunk in manifest")
            ids.append(cid)
            sizes.append(size)
        if pos != end:
            raise DecodeError("trailing bytes in manifest")
        return cls(tuple(ids), tuple(sizes))


EMPTY_MANIFEST = FileManifest((), ())


def check_chunk_sizes(ids, sizes, chunks) -> None:
    """Every chunk as long as the file manifest says (CorruptObjectError if not).

    A manifest lists each chunk's size beside its id; readers that map file
    offsets to chunks (the mount, FileReader) use the sizes, readers that
    join chunks (cat, checkout) use the bytes.  A manifest whose sizes lie
    would make the two serve different bytes for one file id, so every reader
    checks, through this function, that the verified chunks it got have the
    declared lengths before it serves any of them."""
    for oid, size, data in zip(ids, sizes, chunks):
        if len(data) != size:
            raise CorruptObjectError(
                f"chunk {oid.hex()} is {len(data)} bytes but its file manifest declares {size}")


# --- trees ---------------------------------------------------------------------
class Kind(Enum):
    FILE = b"f"
    EXEC = b"x"  # regular file with the executable bit
    DIR = b"d"
    SYMLINK = b"l"

    @property
    def is_file(self) -> bool:
        return self in (Kind.FILE, Kind.EXEC)


_KIND_BY_BYTE = {k.value[0]: k for k in Kind}
_KIND_BYTES = {k: k.value for k in Kind}
_ENTRY_KIND, _ENTRY_SIZE = itemgetter(1), itemgetter(2)
_KIND_PAIRS = tuple(_KIND_BYTES.items())  # for _fastdecode.tree_encode, which matches kinds by identity


class TreeEntry(NamedTuple):
    """One directory entry.

    ``size``: a file's byte size; a directory's total file bytes beneath it; a
    symlink's target length.  ``id``: file id (manifest hash), tree id, or the
    BLAKE3 of a symlink's target.  ``target``: a symlink's target bytes.

    A named tuple, not a frozen dataclass: one is made per entry whenever a
    tree is decoded or built (a 100k-entry directory, a 10M-file commit), and
    a tuple is three times cheaper to make.
    """

    name: str
    kind: Kind
    size: int
    id: bytes
    target: bytes = b""

    @property
    def is_dir(self) -> bool:
        return self.kind is Kind.DIR

    @property
    def executable(self) -> bool:
        return self.kind is Kind.EXEC


def symlink_entry(name: str, target: bytes) -> TreeEntry:
    return TreeEntry(name, Kind.SYMLINK, len(target), hash_bytes(target), target)


@dataclass(frozen=True, slots=True)
class Tree:
    entries: tuple[TreeEntry, ...] = ()
    _by_name: dict = field(default=None, compare=False, repr=False)  # type: ignore[assignment]
    _positions: dict = field(default=None, compare=False, repr=False)  # type: ignore[assignment]
    _size: int = field(default=None, compare=False, repr=False)  # type: ignore[assignment]
    _subdirs: int = field(default=None, compare=False, repr=False)  # type: ignore[assignment]

    @classmethod
    def build(cls, entries) -> Tree:
        """A tree from entries in any order; rejects duplicate and invalid names."""
        keyed = sorted(entries, key=lambda e: e.name.encode())
        for prev, cur in zip(keyed, keyed[1:]):
            if prev.name == cur.name:
                raise ValueError(f"duplicate name {cur.name!r}")
        for e in keyed:
            check_name(e.name)
        return cls(tuple(keyed))

    def get(self, name: str) -> TreeEntry | None:
        by_name = self._by_name
        if by_name is None:
            by_name = {e.name: e for e in self.entries}
            object.__setattr__(self, "_by_name", by_name)
        return by_name.get(name)

    def position(self, name: str) -> int | None:
        """The index of the entry named ``name`` in ``entries``, or None."""
        positions = self._positions
        if positions is None:
            positions = {e.name: i for i, e in enumerate(self.entries)}
            object.__setattr__(self, "_positions", positions)
        return positions.get(name)

    @property
    def size(self) -> int:
        """The file bytes of the entries (kept once found, or as given: ``Tree(entries, _size=n)``)."""
        size = self._size
        if size is None:
            entries, symlink = self.entries, Kind.SYMLINK
            size = sum(map(_ENTRY_SIZE, entries))  # C loops: a commit asks it of every base it edits
            if countOf(map(_ENTRY_KIND, entries), symlink):  # a symlink's size is its target's length
                size -= sum(e.size for e in entries if e.kind is symlink)
            object.__setattr__(self, "_size", size)
        return size

    @property
    def count(self) -> int:
        """The number of entries (as SplitTree.count, without loading its chunks)."""
        return len(self.entries)

    @property
    def subdirs(self) -> int:
        """The number of directory entries (kept once found): a workspace's st_nlink of the
        directory is two more."""
        n = self._subdirs
        if n is None:
            n = countOf(map(_ENTRY_KIND, self.entries), Kind.DIR)
            object.__setattr__(self, "_subdirs", n)
        return n

    def encode(self) -> bytes:
        # Hot: a commit encodes every directory on the paths to its changes whole
        # (a 1,000-entry directory for one changed file), so the loop inlines the
        # varints of names and sizes below 16 KiB and reads no enum attribute; the
        # kind byte is found by identity (an Enum member's __hash__, for a dict keyed
        # by kind, is a Python call: one per entry of the commit).  The compiled
        # _fastdecode.tree_encode makes the same bytes about fifteen times faster and
        # returns None for anything but plain entries, which this loop then meets.
        if _fastdecode is not None:
            data = _fastdecode.tree_encode(self.entries, _KIND_PAIRS, Kind.SYMLINK)
            if data is not None:
                return data
        kind_bytes, put = _KIND_BYTES, _put_uvarint
        file, directory, symlink = Kind.FILE, Kind.DIR, Kind.SYMLINK
        out = bytearray(TREE_MAGIC)
        put(out, len(self.entries))
        append = out.append
        for name, kind, size, oid, target in self.entries:
            raw = name.encode()
            if kind is file:
                append(0x66)  # b"f"
            elif kind is directory:
                append(0x64)  # b"d"
            else:
                out += kind_bytes[kind]
            n = len(raw)
            if n < 0x80:
                append(n)
            else:
                put(out, n)
            out += raw
            if 0 <= size < 0x80:
                append(size)
            elif 0 < size < 0x4000:
                append((size & 0x7F) | 0x80)
                append(size >> 7)
            else:
                put(out, size)
            out += oid
            if kind is symlink:
                put(out, len(target))
                out += target
        return bytes(out)

    @property
    def id(self) -> bytes:
        return hash_bytes(self.encode())

    @classmethod
    def decode(cls, data: bytes) -> Tree:
        # Hot: a mount decodes a directory's tree on its first lookup, and a
        # 100k-entry directory is one tree.  So the per-entry loop only finds the
        # fields (one-byte name lengths and sizes below 2 MiB read inline); the
        # checks on names (UTF-8, sorted and unique, no '/', '\0', '.' or '..')
        # run once over all of them in C, and entries are made without the
        # named tuple's Python-level constructor.  The compiled _fastdecode makes
        # the same entries ten times faster, and returns None for anything not
        # canonical: this loop then names the fault.
        if _fastdecode is not None:
            entries = _fastdecode.tree_entries(data, TreeEntry, _KIND_BY_BYTE, Kind.SYMLINK)
            if entries is not None:
                return cls(entries)
        if not data.startswith(TREE_MAGIC):
            raise DecodeError("not a tree")
        n, pos = _get_uvarint(data, len(TREE_MAGIC))
        if n > len(data):  # every entry takes bytes: a count this large is garbage
            raise DecodeError("truncated tree")
        raws: list[bytes] = []
        kinds: list[Kind] = []
        sizes: list[int] = []
        oids: list[bytes] = []
        targets: list[bytes] = []
        add_raw, add_kind, add_size, add_oid, add_target = (
            raws.append, kinds.append, sizes.append, oids.append, targets.append)
        kind_of = _KIND_BY_BYTE
        symlink = Kind.SYMLINK
        end = len(data)
        for _ in range(n):
            if pos + 2 > end:
                raise DecodeError("truncated tree")
            kind = kind_of.get(data[pos])
            if kind is None:
                raise DecodeError(f"unknown entry kind {data[pos]!r}")
            nlen = data[pos + 1]
            if nlen < 0x80:
                pos += 2
            else:
                nlen, pos = _get_uvarint(data, pos + 1)
            add_raw(data[pos:pos + nlen])
            pos += nlen
            # Sizes below 2 MiB (most files) are varints of at most three bytes.
            b0 = data[pos] if pos < end else 0x80
            if b0 < 0x80:
                size = b0
                pos += 1
            elif pos + 2 < end and data[pos + 1] & 0x80 and (b2 := data[pos + 2]) < 0x80 and b2:
                size = (b0 & 0x7F) | ((data[pos + 1] & 0x7F) << 7) | (b2 << 14)
                pos += 3
            else:
                size, pos = _get_uvarint(data, pos)
            oid = data[pos:pos + ID_SIZE]
            pos += ID_SIZE
            add_kind(kind)
            add_size(size)
            add_oid(oid)
            if kind is symlink:
                tlen, pos = _get_uvarint(data, pos)
                target = data[pos:pos + tlen]
                if len(target) != tlen:
                    raise DecodeError("truncated tree")
                if not target or b"\0" in target or size != tlen:  # symlink(2) could not make it
                    raise DecodeError(f"invalid symlink target {target[:80]!r} (size {size})")
                pos += tlen
                add_target(target)
            else:
                add_target(b"")
        if pos > end or (raws and len(oids[-1]) != ID_SIZE):
            raise DecodeError("truncated tree")  # only the last entry can run past the end
        if pos != end:
            raise DecodeError("trailing bytes in tree")
        names = _check_names(raws)
        make = tuple.__new__
        return cls(tuple(map(make, repeat(TreeEntry), zip(names, kinds, sizes, oids, targets))))


def _check_names(raws: list[bytes]) -> list[str]:
    """Decoded entry names, checked all at once: not empty, sorted and unique,
    UTF-8, never '.', '..' or containing '/' or NUL (readers join names into paths)."""
    if not raws:
        return []
    if not all(map(lt, raws, islice(raws, 1, None))):
        raise DecodeError("tree entries not sorted")
    if not raws[0]:
        raise DecodeError("empty entry name")  # sorted: an empty name can only come first
    joined = b"/".join(raws)
    if joined.count(b"/") != len(raws) - 1 or b"\0" in joined:
        bad = next(r for r in raws if b"/" in r or b"\0" in r)
        raise DecodeError(f"invalid entry name {bad!r}")
    try:
        names = joined.decode().split("/")
    except UnicodeDecodeError:
        raise DecodeError("tree entry name is not UTF-8") from None
    if b"." in raws or b".." in raws:  # sorted bytes: a linear scan in C either way
        raise DecodeError(f"invalid entry name {'.' if b'.' in raws else '..'!r}")
    return names


EMPTY_TREE = Tree(())


def check_name(name: str) -> None:
    if not name or name in (".", "..") or "/" in name or "\0" in name:
        raise ValueError(f"invalid entry name {name!r}")
    try:
        name.encode()
    except UnicodeEncodeError:
        raise ValueError(f"entry name is not valid UTF-8: {name!r}") from None


# --- commits ------------------------------------------------------------------
def _jcs_key(s: str) -> bytes:
    # RFC 8785 sorts object members by their names' UTF-16 code units.
    return s.encode("utf-16-be")


def _jcs(value) -> str:
    """RFC 8785 canonical JSON for strings, integers, lists and objects."""
    if isinstance(value, bool) or value is None:
        raise TypeError("only strings, integers, lists and objects")
    if isinstance(value, str):
        return json.dumps(value, ensure_ascii=False)
    if isinstance(value, int):
        return str(value)
    if isinstance(value, (list, tuple)):
        return "[" + ",".join(_jcs(v) for v in value) + "]"
    if isinstance(value, dict):
        keys = sorted(value, key=_jcs_key)
        return "{" + ",".join(_jcs(k) + ":" + _jcs(value[k]) for k in keys) + "}"
    raise TypeError(f"cannot encode {type(value).__name__}")


@dataclass(frozen=True, slots=True)
class Commit:
    tree: bytes
    parents: tuple[bytes, ...]
    author: str
    time: int  # seconds since the Unix epoch, UTC
    message: str
    metadata: dict[str, str] = field(default_factory=dict)

    def encode(self) -> bytes:
        for k, v in self.metadata.items():
            if not isinstance(k, str) or not isinstance(v, str):
                raise TypeError("commit metadata maps strings to strings")
        doc = {
            "type": COMMIT_TYPE,
            "tree": self.tree.hex(),
            "parents": [p.hex() for p in self.parents],
            "author": self.author,
            "time": int(self.time),
            "message": self.message,
            "metadata": dict(self.metadata),
        }
        return _jcs(doc).encode()

    @property
    def id(self) -> bytes:
        return hash_bytes(self.encode())

    @classmethod
    def decode(cls, data: bytes) -> Commit:
        try:
            doc = json.loads(data.decode())
        except ValueError as exc:  # not UTF-8, not JSON
            raise DecodeError(f"malformed commit: {exc}") from None
        if not isinstance(doc, dict) or doc.get("type") != COMMIT_TYPE:
            raise DecodeError("not a commit")
        try:
            tree, parents = doc["tree"], doc["parents"]
            author, time, message, metadata = doc["author"], doc["time"], doc["message"], doc["metadata"]
        except KeyError as exc:
            raise DecodeError(f"malformed commit: no member {exc}") from None
        if not isinstance(parents, list):
            raise DecodeError("malformed commit: parents is not a list")
        if not isinstance(author, str) or not isinstance(message, str):
            raise DecodeError("malformed commit: author and message must be strings")
        if type(time) is not int:
            raise DecodeError("malformed commit: time is not an integer")
        if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
            raise DecodeError("malformed commit: metadata must map strings to strings")
        commit = cls(
            tree=_decode_id(tree),
            parents=tuple(_decode_id(p) for p in parents),
            author=author,
            time=time,
            message=message,
            metadata=dict(metadata),
        )
        try:
            canonical = commit.encode()
        except UnicodeEncodeError:  # a lone surrogate escaped in the JSON
            raise DecodeError("malformed commit: a string is not valid Unicode") from None
        if canonical != data:
            raise DecodeError("commit is not canonically encoded")
        return commit


def _decode_id(value) -> bytes:
    if not isinstance(value, str) or len(value) != 2 * ID_SIZE or not all(c in "0123456789abcdef" for c in value):
        raise DecodeError(f"malformed commit: {value!r} is not an object id")
    return bytes.fromhex(value)
