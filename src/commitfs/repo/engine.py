"""The read engine: the one way stored bytes of blobs leave the repository.

Every reader goes through it: Repository.load_blob, load_chunks and
load_file (and so FileReader, the Python API, fsspec, checkout, the mount's
loader and prefetcher, fsck), and sync's transfer.  A read has three steps,
each written once, here:

1. *Locate* every wanted blob: the chunk cache first (a remote repository's
   verified disk cache), then the index (segments held in memory; a
   ``nowait`` read refuses to fetch one).
2. *Plan* runs: blobs of one pack sorted by offset, neighbours closer than
   ``COALESCE_GAP`` joined (the gap is read and dropped: cheaper than a
   second request to S3), a run at most ``max_run`` bytes (sync bounds its
   memory that way; a mount reads a file's part whole).
3. *Read* each run with one ranged read and verify each blob in place
   against its id (pack.verify_blob: hash, sizes, decompression), then check
   the lengths a file manifest declares (model.check_chunk_sizes).  Verified
   chunks go to the chunk cache.

``read_file`` is the hot call of a mount's first read of a small file: one
manifest, one run, and when the run is a file's chunks stored uncompressed
one after another (a file written by one commit) the run's buffer is the
file, returned as it is with no copy or join.  The compiled module
``_fastread`` accelerates exactly that case (a manifest in a segment held in
memory, a nowait read, no chunk cache); it returns None for anything else,
and the steps above then decide, errors included.  Its differential tests
(tests/test_repo.py) hold it to this module.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field

from commitfs.errors import CommitfsError, ObjectNotFoundError, WouldBlock
from commitfs.model.ids import HASHER
from commitfs.model.objects import FileManifest, check_chunk_sizes
from commitfs.repo.index import Index
from commitfs.repo.pack import Compression, Location, pack_key, verify_blob
from commitfs.storage.base import Store

try:
    from commitfs.repo import _fastread
except ImportError:  # built without a C compiler: read_file's Python path does the same
    _fastread = None

#: Neighbouring blobs closer than this in one pack are fetched in one ranged
#: read (the gap is read and dropped): cheaper than a second request on S3.
COALESCE_GAP = 256 * 1024

#: Neighbouring manifests are read with a file's when within this many bytes of
#: it in its pack (ReadEngine.read_blob_and_neighbours): one small ranged read.
NEIGHBOUR_SPAN = 64 * 1024

#: (index in the caller's list, blob id, location)
Item = tuple[int, bytes, Location]


@dataclass(slots=True)
class Run:
    """Blobs of one pack readable with one ranged read of [start, end)."""

    pack: bytes
    start: int
    end: int
    items: list[Item] = field(default_factory=list)

    @property
    def key(self) -> str:
        return pack_key(self.pack)

    @property
    def size(self) -> int:
        return self.end - self.start


def plan_runs(items: list[Item], *, gap: int = COALESCE_GAP, max_run: int | None = None) -> list[Run]:
    """Group located blobs into runs, in pack order (module doc, step 2)."""
    runs: list[Run] = []
    run: Run | None = None
    for item in sorted(items, key=lambda t: (t[2].pack, t[2].offset)):
        loc = item[2]
        end = loc.offset + loc.stored
        if run is not None and loc.pack == run.pack and 0 <= loc.offset - run.end <= gap \
                and (max_run is None or end - run.start <= max_run):
            run.items.append(item)
            run.end = end
            continue
        run = Run(loc.pack, loc.offset, end, [item])
        runs.append(run)
    return runs


class ReadEngine:
    """Locates, plans and reads verified blobs of one repository (module doc)."""

    def __init__(self, store: Store, index: Index, chunk_cache=None):
        self.store = store
        self.index = index
        #: What the engine asks of a chunk cache: get(id) -> bytes | None, put(id, bytes).
        self.chunk_cache = chunk_cache

    # --- step 1: locate -------------------------------------------------------------
    def locate(self, oid: bytes, nowait: bool = False) -> Location:
        loc = self.index.lookup(oid, nowait=nowait)
        if loc is None:
            raise ObjectNotFoundError(f"object {oid.hex()} is not in the repository index")
        return loc

    # --- step 3: read ---------------------------------------------------------------
    def _range(self, key: str, offset: int, length: int, nowait: bool):
        if nowait:
            return self.store.load_range_nowait(key, offset, length)
        return self.store.load_range(key, offset, length)

    def read_run(self, run: Run, nowait: bool = False) -> Iterator[tuple[Item, object, object]]:
        """Read one run; yield (item, verified data, stored bytes) per blob."""
        return _verify(run, self._range(run.key, run.start, run.size, nowait))

    def read_located(self, items: list[Item], out: list, nowait: bool = False, *, cached: bool = True) -> None:
        """Read and verify located blobs into ``out[i]`` (and the chunk cache
        unless not ``cached``: metadata blobs)."""
        cache = self.chunk_cache if cached else None
        for run in plan_runs(items):
            for (i, oid, _), data, _ in self.read_run(run, nowait):
                if cache is not None:
                    cache.put(oid, data)
                out[i] = data

    # --- the entry points -----------------------------------------------------------
    def read_blob(self, oid: bytes, nowait: bool = False):
        """One blob's raw bytes, verified (no chunk cache: trees, manifests)."""
        loc = self.locate(oid, nowait)
        return verify_blob(oid, loc, self._range(pack_key(loc.pack), loc.offset, loc.stored, nowait))

    def read_blob_and_neighbours(self, oid: bytes, neighbours: list[bytes], span: int = NEIGHBOUR_SPAN):
        """A metadata blob (a manifest), verified, and those of ``neighbours``
        lying within ``span`` bytes of it in the same pack, read in the same
        ranged read: (its bytes, {neighbour id: bytes}).  Neighbours are located
        from segments in memory only and are dropped where that would wait, or
        where they fail their check (their own read then reports it)."""
        loc = self.locate(oid)
        items: list[Item] = [(0, oid, loc)]
        for nid in neighbours:
            try:
                nloc = self.index.lookup(nid, refresh=False, nowait=True)
            except WouldBlock:
                continue
            if nloc is not None and nloc.pack == loc.pack and abs(nloc.offset - loc.offset) <= span:
                items.append((len(items), nid, nloc))
        if len(items) == 1:
            return self.read_blob(oid), {}
        start = min(i[2].offset for i in items)
        end = max(i[2].offset + i[2].stored for i in items)
        buf = self._range(pack_key(loc.pack), start, end - start, False)
        others = {}
        rel = loc.offset - start
        mine = verify_blob(oid, loc, buf[rel:rel + loc.stored])
        for _, nid, nloc in items[1:]:
            rel = nloc.offset - start
            try:
                others[nid] = verify_blob(nid, nloc, buf[rel:rel + nloc.stored])
            except CommitfsError:
                continue
        return mine, others

    def read_chunks(self, oids: list[bytes], nowait: bool = False, sizes=None) -> list:
        """Chunks by id, verified; ``sizes``: the lengths a manifest declares, checked too."""
        cache = self.chunk_cache
        if nowait and cache is not None:
            raise WouldBlock("the chunk cache is on disk")
        out: list = [None] * len(oids)
        todo: list[Item] = []
        for i, oid in enumerate(oids):
            if cache is not None:
                hit = cache.get(oid)
                if hit is not None:
                    out[i] = hit
                    continue
            todo.append((i, oid, self.locate(oid, nowait)))
        self.read_located(todo, out, nowait)
        if sizes is not None:
            check_chunk_sizes(oids, sizes, out)
        return out

    def read_file_now(self, fid: bytes):
        """``read_file`` of the file ``fid`` done by the compiled module: its
        bytes if its manifest and chunks are in memory and plain (module doc),
        else None (the caller then takes read_file, which decides)."""
        if _fastread is None or self.chunk_cache is not None:
            return None
        return _fastread.load_file(fid, self.index.loaded_segments(), self._read_pack_into_nowait, HASHER)

    def read_file(self, manifest: FileManifest, nowait: bool = False):
        """A whole file's bytes, verified (module doc): one run when its chunks
        lie one after another, its buffer returned as it is."""
        ids = manifest.chunk_ids
        if not ids:
            return b""
        if self.chunk_cache is not None:
            chunks = self.read_chunks(list(ids), nowait, manifest.chunk_sizes)
        else:
            items = [(i, oid, self.locate(oid, nowait)) for i, oid in enumerate(ids)]
            run = _contiguous(items)
            if run is not None:
                buf = self._range(run.key, run.start, run.size, nowait)
                for ((_, oid, _), data, _), size in zip(_verify(run, buf), manifest.chunk_sizes):
                    check_chunk_sizes((oid,), (size,), (data,))
                return buf
            chunks = [None] * len(ids)  # located already: no second index lookup
            self.read_located(items, chunks, nowait)
            check_chunk_sizes(ids, manifest.chunk_sizes, chunks)
        return chunks[0] if len(chunks) == 1 else b"".join(chunks)

    def _read_pack_into_nowait(self, pack: bytes, offset: int, buf) -> None:
        self.store.read_into_nowait(pack_key(pack), offset, buf)


def _verify(run: Run, buf) -> Iterator[tuple[Item, object, object]]:
    """(item, verified data, stored bytes) of each blob of ``run`` in ``buf`` (its bytes)."""
    start = run.start
    for item in run.items:
        loc = item[2]
        rel = loc.offset - start
        stored = buf[rel:rel + loc.stored]
        yield item, verify_blob(item[1], loc, stored), stored


def _contiguous(items: list[Item]) -> Run | None:
    """The one run of ``items`` if they lie uncompressed one after another in
    one pack, in this order (their bytes are then the file's), else None."""
    first = items[0][2]
    end = first.offset
    for _, _, loc in items:
        if loc.pack != first.pack or loc.offset != end or loc.compression is not Compression.NONE:
            return None
        end += loc.stored
    return Run(first.pack, first.offset, end, items)
