"""Storing a file written in place (an EditedFile, model/draft.py): re-chunk only around the edits.

Why this gives the same file id as chunking the edited bytes from scratch
-------------------------------------------------------------------------
A FastCDC cut (model/chunker.py) depends only on the bytes since the
previous cut.  A workspace writes in place (no insertions), so outside the
written ranges the new file's bytes are the base's at the same offsets.  So:

* every base chunk that ends before the first changed byte (and is not the
  base's last chunk when the file grew) is a chunk of the new file too;
* the chunker is re-run from the base chunk boundary before a changed
  region, on the new bytes, until it cuts at an offset that is past the
  region (and any other region it ran into) and is also a base chunk
  boundary: from there the chunker would cut exactly where the base was cut,
  so the base's chunks are taken again, up to the next changed region.

Regions: each written range, and everything from ``base_until`` on when the
file was truncated below the base's size or grew past it (the end of a file
is a cut that depends on where the file ends).  The result is the manifest,
and so the id, of committing the edited bytes from scratch
(tests/test_workspace_cow.py compares them on random edits); its cost is the
windows around the edits: chunks read from the base, bytes hashed and
stored, plus the base's manifest (counted in ``RechunkStats``).

Base bytes are read with ``Repository.load_chunks`` (verified, as the mount
reads them); the rest from the data file.
"""

from __future__ import annotations

import bisect
import os
from dataclasses import dataclass

from commitfs.errors import InputError
from commitfs.model import chunker
from commitfs.model.draft import EditedFile
from commitfs.model.ids import hash_bytes
from commitfs.model.objects import FileManifest
from commitfs.repo.pack import BlobKind
from commitfs.repo.repository import BlobWriter, Repository

#: Bytes read past a changed region per step while waiting for the chunker to meet
#: a base boundary: it usually does within a chunk or two (mean ~80 KiB, at most 256 KiB).
_STEP = 512 * 1024
#: The largest read of new bytes at once (bounded memory for a huge edit).
_MAX_READ = 8 * 1024 * 1024


@dataclass
class RechunkStats:
    """What storing an EditedFile cost (for tests and the bench)."""

    base_chunks_read: int = 0
    bytes_hashed: int = 0
    chunks_reused: int = 0


class _Content:
    """The edited file's bytes: the base's chunks below ``base_until`` outside the
    ranges, the data file's elsewhere."""

    def __init__(self, repo: Repository, manifest: FileManifest, f: EditedFile, fd: int, stats: RechunkStats):
        self.repo = repo
        self.manifest = manifest
        self.until = min(f.base_until, manifest.size, f.size)
        self.starts = [a for a, _ in f.ranges]
        self.ends = [b for _, b in f.ranges]
        self.fd = fd
        self.stats = stats
        self._chunks: dict[int, bytes] = {}  # base chunks by index, of the current window

    def _base(self, a: int, b: int) -> bytes:
        m = self.manifest
        first, last = m.chunk_range(a, b - a)
        want = [i for i in range(first, last) if i not in self._chunks]
        if want:
            got = self.repo.load_chunks([m.chunk_ids[i] for i in want], sizes=[m.chunk_sizes[i] for i in want])
            self.stats.base_chunks_read += len(want)
            self._chunks = {i: self._chunks[i] for i in range(first, last) if i in self._chunks}
            self._chunks.update(zip(want, got))
        out = bytearray()
        for i in range(first, last):
            s = m.chunk_start(i)
            c = self._chunks[i]
            out += memoryview(c)[max(a - s, 0):min(b - s, len(c))]
        return bytes(out)

    def _data(self, a: int, b: int) -> bytes:
        got = os.pread(self.fd, b - a, a)
        if len(got) < b - a:  # the data file is the file's size: a short read is its end
            got += bytes(b - a - len(got))
        return got

    def read(self, a: int, b: int) -> bytes:
        parts = []
        i = bisect.bisect_right(self.ends, a)
        p = a
        while p < b:
            if p >= self.until:
                parts.append(self._data(p, b))
                break
            if i < len(self.starts) and self.starts[i] <= p:
                e = min(self.ends[i], b)
                parts.append(self._data(p, e))
                i += 1
            else:
                e = min(b, self.until, self.starts[i] if i < len(self.starts) else b)
                parts.append(self._base(p, e))
            p = e
        return b"".join(parts)


def _regions(f: EditedFile, base_size: int) -> list[tuple[int, int]]:
    """The changed regions, in order (the last may be open: ``end`` is the file's size)."""
    until = min(f.base_until, base_size, f.size)
    out = [(a, min(b, until)) for a, b in f.ranges if a < min(b, until)]
    if until < base_size or f.size > until:
        out.append((until, max(f.size, until)))
    return out


def store_edited_file(repo: Repository, writer: BlobWriter, f: EditedFile,
                      stats: RechunkStats | None = None) -> tuple[bytes, int]:
    """Store an EditedFile: (file id, size), the id chunking its bytes from scratch gives."""
    stats = stats if stats is not None else RechunkStats()
    manifest = repo.load_manifest(f.base)
    regions = _regions(f, manifest.size)
    if not regions:
        stats.chunks_reused += len(manifest.chunk_ids)
        return f.base, manifest.size
    try:
        fd = os.open(f.source, os.O_RDONLY)
    except OSError as exc:
        raise InputError(f"cannot read {f.source}: {exc.strerror or exc}") from None
    try:
        ids, sizes = _rechunk(repo, writer, manifest, f, regions, _Content(repo, manifest, f, fd, stats), stats)
    finally:
        os.close(fd)
    return writer.add_manifest(FileManifest(tuple(ids), tuple(sizes))), sum(sizes)


def _rechunk(repo, writer, manifest: FileManifest, f: EditedFile, regions, content: _Content,
             stats: RechunkStats) -> tuple[list[bytes], list[int]]:
    base_ids, base_sizes, ends = manifest.chunk_ids, manifest.chunk_sizes, manifest.ends
    nbase = len(base_ids)
    size, until = f.size, content.until
    ids: list[bytes] = []
    sizes: list[int] = []
    reuse_from = 0  # the next base chunk that may be taken as it is
    r = 0
    while r < len(regions):
        a, b = regions[r]
        # The base chunk holding the region's first byte (the last one for an append).
        k = min(bisect.bisect_right(ends, a), nbase - 1) if nbase else 0
        k = max(k, reuse_from)
        ids += base_ids[reuse_from:k]
        sizes += base_sizes[reuse_from:k]
        stats.chunks_reused += k - reuse_from
        start = manifest.chunk_start(k) if nbase else 0
        # Re-chunk from ``start`` until a cut past the regions met is a base boundary.
        pos = start  # where the next new chunk starts
        read_to = start
        carry = b""
        synced = None
        while synced is None and pos < size:
            want = min(size, read_to + max(_STEP, min(_MAX_READ, b - read_to + _STEP)))
            data = carry + content.read(read_to, want) if carry else content.read(read_to, want)
            read_to = want
            at_end = read_to >= size
            chunks = chunker.cut(data)
            cuts = chunks if at_end else chunks[:-1]
            for c in cuts:
                cid = hash_bytes(c)
                writer.add(cid, BlobKind.CHUNK, c)
                stats.bytes_hashed += len(c)
                ids.append(cid)
                sizes.append(len(c))
                pos += len(c)
                while r + 1 < len(regions) and regions[r + 1][0] < pos:
                    r += 1
                    b = max(b, regions[r][1])
                if pos >= b and pos < size and pos <= until:
                    j = bisect.bisect_left(ends, pos)
                    if j < nbase and ends[j] == pos:
                        synced = j + 1  # base chunks from j + 1 on start at pos
                        break
            if synced is None:
                carry = bytes(chunks[-1]) if not at_end and chunks else b""
        if synced is None:
            return ids, sizes  # re-chunked to the end of the file
        reuse_from = synced
        r += 1
    ids += base_ids[reuse_from:]
    sizes += base_sizes[reuse_from:]
    stats.chunks_reused += nbase - reuse_from
    return ids, sizes


def read_edited_file(repo: Repository, f: EditedFile) -> bytes:
    """An EditedFile's whole bytes (for small files: a merge's conflict markers)."""
    manifest = repo.load_manifest(f.base)
    try:
        fd = os.open(f.source, os.O_RDONLY)
    except OSError as exc:
        raise InputError(f"cannot read {f.source}: {exc.strerror or exc}") from None
    try:
        return _Content(repo, manifest, f, fd, RechunkStats()).read(0, f.size)
    finally:
        os.close(fd)
