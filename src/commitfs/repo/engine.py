"""The read engine: the one way stored bytes of blobs leave the repository.

Every reader goes through it: Repository.load_blob, load_chunks and
load_file (and so FileReader, the Python API, fsspec, checkout, the mount's
loader and prefetcher, fsck), and sync's transfer.  A read has three steps,
each written once, here:

1. *Locate* every wanted blob: the chunk cache first (a remote repository's
   verified disk cache), then the index (Index.lookup).
2. *Plan* runs: blobs of one pack sorted by offset, neighbours closer than
   ``COALESCE_GAP`` joined (the gap is read and dropped: cheaper than a
   second request to S3), a run at most ``max_run`` bytes (sync bounds its
   memory that way; a mount reads a file's part whole).
3. *Read* each run with one ranged read and verify each blob in place
   against its id (pack.verify_blob: hash, sizes, decompression), then check
   the lengths a file manifest declares (model.check_chunk_sizes).  Verified
   chunks go to the chunk cache.

*From memory.*  The same steps run against memory alone in the
``*_from_memory`` functions, which the mount's event loop calls before it
sends a load to a worker thread (vfs/loader.py): blobs located in index
segments held in memory (Index.lookup_in_memory), bytes read from the page
cache of a local repository's pack files (repo/resident.py), and chunks a
repository's chunk cache holds in memory (its ``get_from_memory``: with
write-behind, those fetched lately, cache/disk.py; with a chunk cache, chunks
come from its memory alone).  They return
None wherever an answer would need storage (a segment not loaded, a pack not
cached, a remote store, a chunk cache's file on disk), and the caller then takes
the blocking form in a thread, which decides, errors included.  What either
source returns is verified the same way: the steps are written once, over a
*source* (``_Storage`` or ``_Memory``: where locations and bytes come from).

``read_file`` is the hot call of a mount's first read of a small file: one
manifest, one run, and when the run is a file's chunks stored uncompressed
one after another (a file written by one commit) the run's buffer is the
file, returned as it is with no copy or join.  The compiled module
``_fastread`` accelerates exactly that case of ``file_from_memory`` (a
manifest in a segment held in memory, cached pack pages, no chunk cache); it
returns None for anything else, and the steps above then decide.  Its
differential tests (tests/test_repo.py) hold it to this module.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field

from commitfs.errors import CommitfsError, CorruptObjectError, ObjectNotFoundError
from commitfs.model.ids import HASHER
from commitfs.model.objects import FileManifest, check_chunk_sizes
from commitfs.repo.index import Index
from commitfs.repo.lru import LockedLRU
from commitfs.repo.pack import (
    DELTA_BASE_SIZE,
    BlobKind,
    Compression,
    Location,
    delta_base,
    delta_base_of,
    pack_key,
    verify_blob,
)
from commitfs.repo.resident import ResidentReader
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

#: A key to ask Store.local_path whether the store is a local directory.
_ANY_KEY = "config"

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


_DELTA = Compression.DELTA
#: Bytes of delta bases a read engine keeps (raw trees, ~45 KB per 1,000 entries).
BASE_CACHE_BYTES = 8 * 1024 * 1024


class NotInMemory(Exception):
    """A memory read met something only storage has (caught in this module:
    the ``*_from_memory`` functions then return None)."""


class _Storage:
    """A source that waits for storage: the index as a whole, the store's ranged reads."""

    __slots__ = ("engine",)

    def __init__(self, engine: ReadEngine):
        self.engine = engine

    @property
    def cache(self):
        return self.engine.chunk_cache

    def locate(self, oid: bytes) -> Location:
        return self.engine.locate(oid)

    def range(self, key: str, offset: int, length: int):
        return self.engine.store.load_range(key, offset, length)


class _Memory:
    """A source that never waits: segments held in memory, cached pack pages,
    and the chunks a chunk cache holds in memory (its ``get_from_memory``)."""

    __slots__ = ("engine", "resident")

    def __init__(self, engine: ReadEngine, resident: ResidentReader | None):
        self.engine = engine
        self.resident = resident

    @property
    def cache(self):
        cache = self.engine.chunk_cache
        return None if cache is None else _CacheMemory(cache)

    def locate(self, oid: bytes) -> Location:
        # (With no pages of a local store, nothing located could be read.)
        loc = None if self.resident is None else self.engine.index.lookup_in_memory(oid)
        if loc is None:
            raise NotInMemory(oid.hex())
        return loc

    def range(self, key: str, offset: int, length: int):
        got = None if self.resident is None else self.resident.load_range(key, offset, length)
        if got is None:
            raise NotInMemory(key)
        return got


class _CacheMemory:
    """A chunk cache's memory alone, as the memory source's cache: what it holds
    without a system call (a cache without ``get_from_memory`` holds nothing
    there); a put does nothing (nothing read from memory needs caching)."""

    __slots__ = ("get",)

    def __init__(self, cache):
        self.get = getattr(cache, "get_from_memory", None) or _nothing

    @staticmethod
    def put(oid: bytes, data) -> None:
        pass


def _nothing(oid: bytes) -> None:
    return None


class ReadEngine:
    """Locates, plans and reads verified blobs of one repository (module doc)."""

    def __init__(self, store: Store, index: Index, chunk_cache=None):
        self.store = store
        self.index = index
        #: What the engine asks of a chunk cache: get(id) -> bytes | None, put(id, bytes).
        self.chunk_cache = chunk_cache
        self._storage = _Storage(self)
        # Only a local store has pages to find in memory (a remote one's keys never are).
        self._resident = ResidentReader(store) if store.local_path(_ANY_KEY) is not None else None
        self._memory = _Memory(self, self._resident)
        # Chunks, with a chunk cache: its memory alone (not a local store's pages,
        # which a cache stands in front of), so ``_Memory`` without pages.
        self._cache_memory = _Memory(self, None)
        # The raw bytes of the whole trees that trees stored as deltas were read
        # against (docs/FORMAT.md, "Tree deltas"): the versions of one directory
        # share a base, so a mount of the next commit reads it once.
        self._bases = LockedLRU(maxsize=BASE_CACHE_BYTES, getsizeof=len)
        self._base_readers = {id(src): self._base_reader(src) for src in (self._storage, self._memory)}

    def close(self) -> None:
        if self._resident is not None:
            self._resident.close()

    @property
    def reads_from_memory(self) -> bool:
        """Whether chunks can come from memory at all (a local store, no chunk cache)."""
        return self.chunk_cache is None and self._resident is not None

    @property
    def _chunk_memory(self) -> _Memory:
        return self._memory if self.chunk_cache is None else self._cache_memory

    @property
    def _no_memory(self) -> bool:
        """Whether no chunk can come from memory: a chunk cache that holds none
        there, or neither a chunk cache nor pages of a local store."""
        cache = self.chunk_cache
        if cache is not None:
            return getattr(cache, "get_from_memory", None) is None
        return self._resident is None

    def _base_reader(self, src):
        """``verify_blob``'s ``base`` over source ``src``: the base tree of a
        delta, from the cache of bases or read whole (one more read)."""
        read = delta_base_of(src.locate, lambda oid, loc: src.range(pack_key(loc.pack), loc.offset, loc.stored))
        bases = self._bases

        def base(bid: bytes):
            got = bases.get(bid)
            if got is None:
                got = bases[bid] = bytes(read(bid))  # (never a view of a pack's pages)
            return got
        return base

    def delta_source(self, oid: bytes) -> tuple[bytes, bytes]:
        """What a writer stores a new version of tree ``oid`` as a delta of: (the
        id, the raw bytes) of ``oid`` itself when it is stored whole, else of the
        tree it is a delta of (docs/FORMAT.md, "Tree deltas": never a delta of a
        delta).  Verified; raises as read_blob does."""
        loc = self.locate(oid)
        if loc.kind is not BlobKind.TREE:
            raise CorruptObjectError(f"object {oid.hex()} is not a tree")
        stored = self.store.load_range(pack_key(loc.pack), loc.offset, loc.stored)
        if loc.compression is not _DELTA:
            return oid, bytes(verify_blob(oid, loc, stored))
        verify_blob(oid, loc, stored, self.base_for())  # (damage is not built on)
        whole = delta_base(stored)
        return whole, self.base_for()(whole)

    def delta_base_id(self, oid: bytes) -> bytes | None:
        """The id of the tree blob ``oid`` is stored as a delta of, or None if it
        is stored whole (fsck walks bases as gc marks them)."""
        loc = self.locate(oid)
        if loc.compression is not _DELTA:
            return None
        try:
            return delta_base(self.store.load_range(pack_key(loc.pack), loc.offset, DELTA_BASE_SIZE))
        except ValueError:
            raise CorruptObjectError(f"tree {oid.hex()} is stored as a delta too short to name its base") from None

    def base_for(self, src=None):
        """The delta-base reader of the storage source (for readers outside, as sync's runs)."""
        return self._base_readers[id(self._storage if src is None else src)]

    # --- step 1: locate -------------------------------------------------------------
    def locate(self, oid: bytes) -> Location:
        loc = self.index.lookup(oid)
        if loc is None:
            raise ObjectNotFoundError(f"object {oid.hex()} is not in the repository index")
        return loc

    # --- step 3: read ---------------------------------------------------------------
    def read_run(self, run: Run) -> Iterator[tuple[Item, object, object]]:
        """Read one run; yield (item, verified data, stored bytes) per blob."""
        return _verify(run, self.store.load_range(run.key, run.start, run.size), self.base_for())

    def read_located(self, items: list[Item], out: list, *, cached: bool = True) -> None:
        """Read and verify located blobs into ``out[i]`` (and the chunk cache
        unless not ``cached``: metadata blobs)."""
        self._read_located(self._storage, items, out, self.chunk_cache if cached else None)

    @staticmethod
    def _read_located(src, items: list[Item], out: list, cache) -> None:
        for run in plan_runs(items):
            for (i, oid, _), data, _ in _verify(run, src.range(run.key, run.start, run.size)):
                if cache is not None:
                    cache.put(oid, data)
                out[i] = data

    # --- the entry points: waiting for storage --------------------------------------
    def read_blob(self, oid: bytes):
        """One blob's raw bytes, verified (no chunk cache: trees, manifests)."""
        return self._read_blob(self._storage, oid)

    def read_chunks(self, oids: list[bytes], sizes=None) -> list:
        """Chunks by id, verified; ``sizes``: the lengths a manifest declares, checked too."""
        return self._read_chunks(self._storage, oids, sizes)

    def read_file(self, manifest: FileManifest):
        """A whole file's bytes, verified (module doc): one run when its chunks
        lie one after another, its buffer returned as it is."""
        return self._read_file(self._storage, manifest)

    # --- the entry points: from memory, or None -------------------------------------
    def blob_from_memory(self, oid: bytes):
        """``read_blob`` if memory has what it needs, else None (module doc)."""
        try:
            return self._read_blob(self._memory, oid)
        except NotInMemory:
            return None

    def chunks_from_memory(self, oids: list[bytes], sizes=None) -> list | None:
        """``read_chunks`` if memory has what it needs, else None (module doc)."""
        if self._no_memory:
            return None
        try:
            return self._read_chunks(self._chunk_memory, oids, sizes)
        except NotInMemory:
            return None

    def file_from_memory(self, fid: bytes, manifest: FileManifest | None = None):
        """The bytes of file ``fid`` (whose manifest the caller may hold) if
        memory has what they need, else None: compiled first (module doc)."""
        if self._no_memory:
            return None
        if _fastread is not None and self.chunk_cache is None:
            try:
                got = _fastread.load_file(fid, self.index.loaded_segments(), self._read_pack_resident, HASHER)
            except NotInMemory:
                return None
            if got is not None:
                return got
        try:
            if manifest is None:
                manifest = FileManifest.decode(bytes(self._read_blob(self._memory, fid)))
            return self._read_file(self._chunk_memory, manifest)
        except NotInMemory:
            return None

    def _read_pack_resident(self, pack: bytes, offset: int, buf) -> None:
        """_fastread's read_into: cached pages of a pack, or NotInMemory."""
        if not self._resident.read_into(pack_key(pack), offset, buf):
            raise NotInMemory(pack.hex())

    # --- the steps, over a source ----------------------------------------------------
    def _read_blob(self, src, oid: bytes):
        loc = src.locate(oid)
        base = self._base_readers[id(src)] if loc.compression is _DELTA else None
        return verify_blob(oid, loc, src.range(pack_key(loc.pack), loc.offset, loc.stored), base)

    def read_blob_and_neighbours(self, oid: bytes, neighbours: list[bytes], span: int = NEIGHBOUR_SPAN):
        """A metadata blob (a manifest), verified, and those of ``neighbours``
        lying within ``span`` bytes of it in the same pack, read in the same
        ranged read: (its bytes, {neighbour id: bytes}).  Neighbours are located
        from segments in memory only and are dropped where they are not, or
        where they fail their check (their own read then reports it)."""
        loc = self.locate(oid)
        items: list[Item] = [(0, oid, loc)]
        for nid in neighbours:
            nloc = self.index.lookup_in_memory(nid)
            if nloc is not None and nloc.pack == loc.pack and abs(nloc.offset - loc.offset) <= span:
                items.append((len(items), nid, nloc))
        if len(items) == 1:
            return self.read_blob(oid), {}
        start = min(i[2].offset for i in items)
        end = max(i[2].offset + i[2].stored for i in items)
        buf = self.store.load_range(pack_key(loc.pack), start, end - start)
        others = {}
        rel = loc.offset - start
        base = self.base_for()
        mine = verify_blob(oid, loc, buf[rel:rel + loc.stored], base)
        for _, nid, nloc in items[1:]:
            rel = nloc.offset - start
            try:
                others[nid] = verify_blob(nid, nloc, buf[rel:rel + nloc.stored], base)
            except CommitfsError:
                continue
        return mine, others

    def _read_chunks(self, src, oids: list[bytes], sizes) -> list:
        cache = src.cache
        out: list = [None] * len(oids)
        todo: list[Item] = []
        for i, oid in enumerate(oids):
            if cache is not None:
                hit = cache.get(oid)
                if hit is not None:
                    out[i] = hit
                    continue
            todo.append((i, oid, src.locate(oid)))
        self._read_located(src, todo, out, cache)
        if sizes is not None:
            check_chunk_sizes(oids, sizes, out)
        return out

    def local_layout(self, oids, sizes) -> tuple[list[str], list[tuple[int, int]]] | None:
        """Where chunks ``oids`` (of ``sizes``, a manifest's) lie as plain bytes in
        local pack files: (the pack files' paths, (path index, offset) per chunk),
        if every one is located from memory, stored uncompressed and of its size;
        else None.  Nothing is read: a reader of these ranges must verify what it
        reads against the ids (the mount's C module does, fuse/fastpath.py)."""
        if not self.reads_from_memory:
            return None
        paths: list[str] = []
        where: dict[bytes, int] = {}
        rows: list[tuple[int, int]] = []
        lookup = self.index.lookup_in_memory
        for oid, size in zip(oids, sizes):
            loc = lookup(oid)
            if loc is None or loc.compression is not Compression.NONE or loc.stored != size or loc.raw != size:
                return None
            k = where.get(loc.pack)
            if k is None:
                path = self.store.local_path(pack_key(loc.pack))
                if path is None:
                    return None
                k = where[loc.pack] = len(paths)
                paths.append(str(path))
            rows.append((k, loc.offset))
        return paths, rows

    def span_from_memory(self, oids, sizes):
        """The bytes of consecutive chunks of a file (``sizes``: their lengths in
        its manifest), verified, as one buffer, if memory has what they need,
        else None: read_file's steps for part of a file (one run, its buffer
        returned as it is when they lie one after another uncompressed).  The
        mount hands a random read's neighbours to the page cache with it."""
        if self._no_memory:
            return None
        try:
            return self._read_span(self._chunk_memory, oids, sizes)
        except NotInMemory:
            return None

    def _read_file(self, src, manifest: FileManifest):
        return self._read_span(src, manifest.chunk_ids, manifest.chunk_sizes)

    def _read_span(self, src, ids, sizes):
        if not ids:
            return b""
        if src.cache is not None:
            chunks = self._read_chunks(src, list(ids), sizes)
        else:
            items = [(i, oid, src.locate(oid)) for i, oid in enumerate(ids)]
            run = _contiguous(items)
            if run is not None:
                buf = src.range(run.key, run.start, run.size)
                for ((_, oid, _), data, _), size in zip(_verify(run, buf), sizes):
                    check_chunk_sizes((oid,), (size,), (data,))
                return buf
            chunks = [None] * len(ids)  # located already: no second index lookup
            self._read_located(src, items, chunks, None)
            check_chunk_sizes(ids, sizes, chunks)
        return chunks[0] if len(chunks) == 1 else b"".join(chunks)


def _verify(run: Run, buf, base=None) -> Iterator[tuple[Item, object, object]]:
    """(item, verified data, stored bytes) of each blob of ``run`` in ``buf`` (its
    bytes); ``base``: verify_blob's, for trees stored as deltas (chunks never are)."""
    start = run.start
    for item in run.items:
        loc = item[2]
        rel = loc.offset - start
        stored = buf[rel:rel + loc.stored]
        yield item, verify_blob(item[1], loc, stored, base), stored


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
