"""The file systems' one way to the repository: from memory when it can, else a worker thread.

Both file systems (vfs/core.py, the read-only views; vfs/workspace.py, the
writable overlay) load trees, manifests, commits and chunks through a Loader:

* *From memory, on the event loop.*  Every load is first asked of memory,
  once: this loader's caches, then the repository's ``*_from_memory`` forms
  (repo/engine.py: index segments held in memory, and for a local repository
  the page cache's pack pages), which return None instead of waiting for
  storage.  A hop to a worker thread and back costs about 100 µs of CPU
  here, more than reading and verifying a cached image, so bytes in memory
  never take one.
* *Else in a worker thread* (``trio.to_thread.run_sync``) under one
  CapacityLimiter, within ``io_timeout_s``: a stalled store makes the request
  fail with StorageTimeoutError (EIO) instead of hanging the reader.  Worker
  threads cannot be cancelled; an abandoned one finishes in the background
  and keeps its limiter slot until then, so a stalled store cannot start
  unbounded threads either.  Retrying transient failures is the store's
  business (storage/retry.py), not repeated here.

Trees, manifests and commits are kept in LRU caches capped by (estimated)
bytes, and each
miss is loaded once however many requests want it at the same moment
(single flight).  Of chunks, only those of small fetches are kept, in a
byte-capped LRU (``RECENT_CHUNK_BYTES``): a random reader of a large file
asks the kernel for a few KiB, the daemon fetches and verifies the whole
chunk holding them, and the next read nearby then finds it here instead of
fetching and hashing it again.  Chunks of read-ahead parts are not kept: a
sequential reader does not come back, and the kernel's page cache keeps what
it read (the chunk cache, commitfs.cache, what was downloaded).

*Chunks in flight* are single-flighted too, by chunk id (``Loader.chunks``):
a fetch asking for a chunk another fetch has in a worker thread waits for
that one's verified bytes instead of reading the same range beside it (the
directory read-ahead, vfs/dirahead.py, and a file's own prefetcher,
vfs/prefetch.py, ask for the same chunks when readers run slightly out of
order; measured: 250-700 chunks asked twice at once in a cold read of 2,002
files through an s3rver mount, 7-12% of the bytes fetched twice).  A flight
lasts as long as its storage call, not as long as the task that started it:
a read-ahead cancelled by a jump leaves its worker thread running (threads
cannot be cancelled), and a reader then asking for those chunks waits for
that thread rather than fetching them again.  A waiter whose flight failed
(an error, a fetch abandoned before its thread started) fetches the chunk
itself, so another fetch's failure is never a reader's; a wait is bounded by
the I/O timeout like a fetch.
"""

from __future__ import annotations

import functools
import threading
from collections.abc import Awaitable, Callable, Sequence

import trio
from cachetools import LRUCache

from commitfs.errors import StorageTimeoutError
from commitfs.model.objects import Commit, DecodeError, FileManifest, Tree
from commitfs.model.splittree import SplitTree, TreeIndex
from commitfs.repo.repository import Repository, manifest_cost, tree_cost
from commitfs.vfs.errors import ShuttingDownError


#: Neighbouring manifests read with a file's (Loader.manifest): a few KiB of one pack.
MANIFEST_BATCH = 128

#: Bytes of recently verified chunks kept (Loader.chunks): some hundreds of
#: chunks, what a random reader of a large file comes back to.
RECENT_CHUNK_BYTES = 32 * 1024 * 1024
#: Fetches of at most this many chunks keep theirs: a random read's (the chunk
#: or two it overlaps), not a read-ahead part's (up to PART_BYTES of them).
RECENT_FETCH_CHUNKS = 4


#: Storage calls in flight at once.  A local disk is saturated by a few, and
#: more only add thread switches on a small machine; S3 answers each request
#: after tens of milliseconds whatever its size, so it takes many in flight to
#: reach its throughput (up to the S3 client's connection pool, storage/s3.py).
LOCAL_IO_THREADS = 16
REMOTE_IO_THREADS = 32


def default_io_threads(repo: Repository) -> int:
    return LOCAL_IO_THREADS if repo.is_local else REMOTE_IO_THREADS


async def run_blocking(limiter: trio.CapacityLimiter, timeout_s: float, what: str, fn, *args):
    """Run a blocking call in a worker thread under ``limiter``, within ``timeout_s``.

    A call that outlives the timeout is abandoned (it finishes in the
    background, holding its limiter slot) and the caller gets
    StorageTimeoutError: a stalled store never hangs a request.
    """
    try:
        with trio.fail_after(timeout_s):
            return await trio.to_thread.run_sync(fn, *args, limiter=limiter, abandon_on_cancel=True)
    except trio.TooSlowError:
        raise StorageTimeoutError(f"{what}: no answer within {timeout_s:g}s") from None


class Flight:
    """One load in progress, which other tasks wanting the same thing wait for."""

    __slots__ = ("done", "value", "error")

    def __init__(self):
        self.done = trio.Event()
        self.value = None
        self.error: BaseException | None = None


class SingleFlight:
    """An LRU cache whose misses are loaded once, however many tasks ask at once."""

    def __init__(self, cache: LRUCache):
        self.cache = cache
        self._flights: dict[object, Flight] = {}

    def put(self, key, value) -> None:
        try:
            self.cache[key] = value
        except ValueError:
            pass  # larger than the whole cache: served, not kept

    async def get(self, key, load: Callable[[], Awaitable]):
        value = self.cache.get(key)
        if value is not None:
            return value
        flight = self._flights.get(key)
        if flight is not None:
            await flight.done.wait()
            if flight.error is not None:
                raise flight.error
            return flight.value
        flight = self._flights[key] = Flight()
        try:
            flight.value = await load()
            self.put(key, flight.value)
            return flight.value
        except Exception as exc:
            flight.error = exc
            raise
        except BaseException:  # cancelled: the waiters must not re-raise another task's Cancelled
            flight.error = ShuttingDownError("the file system is shutting down")
            raise
        finally:
            del self._flights[key]
            flight.done.set()


class _ChunkFlight:
    """A chunk a worker thread is fetching (module doc, "Chunks in flight"):
    ``chunk`` is its verified bytes once ``done`` is set, or None if the fetch failed."""

    __slots__ = ("done", "chunk")

    def __init__(self):
        self.done = trio.Event()
        self.chunk = None


class _Hand:
    """Who settles a chunk fetch's flights: its worker thread once it has
    started (when the storage call ends, whatever became of the task that
    asked), or the event loop if the fetch was given up before its thread
    started (then the thread, should it start after all, fetches nothing)."""

    __slots__ = ("lock", "state")

    WAITING, RUNNING, ABANDONED = range(3)

    def __init__(self):
        self.lock = threading.Lock()
        self.state = _Hand.WAITING


#: Bytes of decoded trees (and split directories' chunks), and of manifests, a
#: Loader keeps (estimates: _tree_bytes, repository.manifest_cost).  By bytes,
#: not entries: the daemon's memory must not grow with the dataset.
TREE_CACHE_BYTES = 48 * 1024 * 1024
TREE_NODE_CACHE_BYTES = 32 * 1024 * 1024
MANIFEST_CACHE_BYTES = 32 * 1024 * 1024
#: A decoded TreeEntry with its name, id and size (~270 B) and its slot in the
#: tree's name index (built by the first lookup).
_ENTRY_BYTES = 350


def _tree_bytes(t) -> int:
    """A cached tree's memory, roughly: a split directory's root and an index
    node count their children, never what lies below them."""
    if isinstance(t, SplitTree):
        t = t.root
    if isinstance(t, TreeIndex):
        return tree_cost(t)
    return 200 + _ENTRY_BYTES * len(t.entries)


class Loader:
    """Repository loads for a file system running under trio."""

    def __init__(self, repo: Repository, io_threads: int | None, io_timeout_s: float):
        self.repo = repo
        self.io_timeout_s = io_timeout_s
        self._limiter = trio.CapacityLimiter(io_threads or default_io_threads(repo))
        self._trees = SingleFlight(LRUCache(maxsize=TREE_CACHE_BYTES, getsizeof=_tree_bytes))
        # Chunks and index nodes of split directories (model/splittree.py), by
        # their own ids: a lookup loads one per level, a listing page its leaf.
        self._tree_nodes = SingleFlight(LRUCache(maxsize=TREE_NODE_CACHE_BYTES, getsizeof=_tree_bytes))
        self._load_tree_node = functools.partial(repo.load_tree_node, keep=False)
        self._manifests = SingleFlight(LRUCache(maxsize=MANIFEST_CACHE_BYTES, getsizeof=manifest_cost))
        self._commits = SingleFlight(LRUCache(maxsize=4096))
        #: Recently verified chunks by id (module doc); only the event loop touches it.
        self._recent: LRUCache = LRUCache(maxsize=RECENT_CHUNK_BYTES, getsizeof=len)
        #: Chunks being fetched by a worker thread, by id (module doc); the event loop's alone.
        self._chunk_flights: dict[bytes, _ChunkFlight] = {}
        #: For tests and the log: chunks a fetch found in flight and waited for.
        self.chunks_joined = 0
        # Kept here, not also in the repository's own caches.
        self._load_tree = functools.partial(repo.load_tree, keep=False)
        self._load_manifest = functools.partial(repo.load_manifest, keep=False)
        #: Loads answered from memory on the event loop / in worker threads (logged at unmount).
        self.inline = 0
        self.in_threads = 0

    async def io(self, what: str, fn, *args):
        """``fn(*args)`` in a worker thread, bounded by the limiter and the I/O timeout."""
        self.in_threads += 1
        return await run_blocking(self._limiter, self.io_timeout_s, f"{what} of {self.repo.url}", fn, *args)

    async def _cached(self, flights: SingleFlight, key: bytes, from_memory, load, what: str):
        """From this loader's cache, else from memory (here), else ``load`` in a thread."""
        value = flights.cache.get(key)
        if value is None:
            value = from_memory(key)
            if value is not None:
                self.inline += 1
                flights.put(key, value)
            else:
                value = await flights.get(key, lambda: self.io(f"{what} {key.hex()}", load, key))
        return value

    def tree_cached(self, tid: bytes) -> Tree | None:
        """A tree held in memory, or None: a lookup's way round ``tree``'s awaits."""
        return self._trees.cache.get(tid)

    async def tree(self, tid: bytes) -> Tree:
        return await self._cached(self._trees, tid, self.repo.tree_from_memory, self._load_tree, "tree")

    async def tree_get(self, tree: Tree | SplitTree, name: str):
        """``tree.get(name)``; for a split directory in a worker thread (it may
        load a chunk per level)."""
        if isinstance(tree, SplitTree):
            return await self.io(f"a lookup in tree {tree.id.hex()}", tree.get, name)
        return tree.get(name)

    async def tree_entries(self, tree: Tree | SplitTree):
        """``tree.entries``; for a split directory in a worker thread (every chunk)."""
        if isinstance(tree, SplitTree):
            return await self.io(f"the entries of tree {tree.id.hex()}", lambda: tree.entries)
        return tree.entries

    def tree_node_cached(self, tid: bytes) -> Tree | TreeIndex | None:
        return self._tree_nodes.cache.get(tid)

    async def tree_node(self, tid: bytes) -> Tree | TreeIndex:
        """A chunk or index node of a split directory (not checked against its
        parent: the caller does, with model.splittree.check_child)."""
        return await self._cached(self._tree_nodes, tid, self.repo.tree_node_from_memory, self._load_tree_node,
                                  "tree chunk")

    def manifest_cached(self, fid: bytes) -> FileManifest | None:
        """A manifest this loader holds, or None."""
        return self._manifests.cache.get(fid)

    async def manifest(self, fid: bytes, neighbours: Sequence[bytes] = ()) -> FileManifest:
        """A file's manifest.  ``neighbours``: the manifests of the files around it in
        its directory (directory order is write order, so they lie next to it in a
        metadata pack): on a miss they are read in the same ranged read and kept,
        so a reader of a directory's files pays one request for their manifests,
        not one per file."""
        value = self._manifests.cache.get(fid)
        if value is not None:
            return value
        wanted = [n for n in neighbours if n != fid and self._manifests.cache.get(n) is None][:MANIFEST_BATCH]
        if not wanted:
            return await self._cached(self._manifests, fid, self.repo.manifest_from_memory,
                                      self._load_manifest, "file")
        value = self.repo.manifest_from_memory(fid)
        if value is not None:
            self.inline += 1
            self._manifests.put(fid, value)
            return value

        async def load():
            manifest, others = await self.io(f"file {fid.hex()}", self._load_manifests, fid, wanted)
            for nid, m in others.items():  # here, on the event loop: the cache is not thread-safe
                self._manifests.put(nid, m)
            return manifest
        return await self._manifests.get(fid, load)

    def _load_manifests(self, fid: bytes, neighbours: list[bytes]) -> tuple[FileManifest, dict]:
        """``fid``'s manifest and its neighbours' (worker thread)."""
        mine, raw = self.repo.reads.read_blob_and_neighbours(fid, neighbours)
        others = {}
        for nid, data in raw.items():
            try:
                others[nid] = FileManifest.decode(bytes(data))
            except DecodeError:
                pass  # its own read reports it
        try:
            return FileManifest.decode(bytes(mine)), others
        except DecodeError:
            return self._load_manifest(fid), others  # which reports it

    async def commit(self, cid: bytes) -> Commit:
        return await self._commits.get(cid, lambda: self.io(f"commit {cid.hex()}", self.repo.load_commit, cid))

    async def chunks(self, ids: list[bytes]) -> list[bytes]:
        """Chunks by id (the prefetcher's ``fetch``): those kept (module doc)
        from here, those another fetch has in flight from that fetch, the
        others in a worker thread."""
        recent = self._recent
        got = [recent.get(i) for i in ids]
        if None not in got:
            return got
        flights = self._chunk_flights
        theirs: dict[bytes, _ChunkFlight] = {}
        mine: list[bytes] = []
        for i, c in zip(ids, got):
            if c is None:
                flight = flights.get(i)
                if flight is not None:
                    theirs[i] = flight
                else:
                    mine.append(i)
        missing = len(mine) + len(theirs)
        found: dict[bytes, object] = {}
        if mine:
            found.update(zip(mine, await self._fetch_chunks(mine)))
        if theirs:
            self.chunks_joined += len(theirs)
            try:
                with trio.fail_after(self.io_timeout_s):
                    for flight in theirs.values():
                        await flight.done.wait()
            except trio.TooSlowError:
                raise StorageTimeoutError(f"{len(theirs)} chunks of {self.repo.url}: no answer within "
                                          f"{self.io_timeout_s:g}s") from None
            again = [i for i, f in theirs.items() if f.chunk is None]  # their fetch failed: ours decides
            for i, f in theirs.items():
                if f.chunk is not None:
                    found[i] = f.chunk
            if again:
                found.update(zip(again, await self._fetch_chunks(again)))
        out = [c if c is not None else found[i] for i, c in zip(ids, got)]
        if missing <= RECENT_FETCH_CHUNKS:
            self._keep([i for i, c in zip(ids, got) if c is None], [found[i] for i, c in zip(ids, got) if c is None])
        return out

    async def _fetch_chunks(self, ids: list[bytes]) -> list:
        """``repo.load_chunks(ids)`` in a worker thread, the chunks not in flight
        yet entered as flights, settled when the thread's call ends (module doc)."""
        flights = self._chunk_flights
        new: dict[bytes, _ChunkFlight] = {}
        for i in ids:
            if i not in flights:
                new[i] = flights[i] = _ChunkFlight()
        hand = _Hand()
        token = trio.lowlevel.current_trio_token()
        try:
            return await self.io(f"{len(ids)} chunks", self._load_chunks_landing, ids, new, hand, token)
        except BaseException:
            with hand.lock:
                if hand.state == _Hand.WAITING:  # its thread never started: nothing will settle them
                    hand.state = _Hand.ABANDONED
                    self._land(new, None, None)
            raise

    def _load_chunks_landing(self, ids: list[bytes], new: dict, hand: _Hand, token) -> list:
        """(Worker thread.)  ``repo.load_chunks(ids)``, then its flights settled on the event loop."""
        with hand.lock:
            if hand.state == _Hand.ABANDONED:
                raise ShuttingDownError("the fetch was given up before it started")
            hand.state = _Hand.RUNNING
        chunks = None
        try:
            chunks = self.repo.load_chunks(ids)
            return chunks
        finally:
            if new:
                try:
                    token.run_sync_soon(self._land, new, ids, chunks)
                except trio.RunFinishedError:
                    pass  # the file system has stopped: nobody waits

    def _land(self, new: dict, ids: list[bytes] | None, chunks: list | None) -> None:
        """(Event loop.)  Settle the flights ``new`` with ``chunks`` (of ``ids``; None: failed)."""
        if chunks is not None:
            for i, c in zip(ids, chunks):
                flight = new.get(i)
                if flight is not None:
                    flight.chunk = c
        flights = self._chunk_flights
        for i, flight in new.items():
            if flights.get(i) is flight:
                del flights[i]
            flight.done.set()

    def _keep(self, ids: list[bytes], chunks: list) -> None:
        if len(ids) > RECENT_FETCH_CHUNKS:
            return
        for oid, c in zip(ids, chunks):
            # A slice of a larger buffer would keep all of it: keep a copy of that.
            if isinstance(c, memoryview) and c.nbytes != memoryview(c.obj).nbytes:
                c = bytes(c)
            self._recent[oid] = c

    def file_now(self, fid: bytes):
        """A whole file's bytes if they are in memory, else None (the read
        engine's file_from_memory, compiled first).  A manifest found on the
        way to a miss is kept, so that the worker thread the miss goes to does
        not read it again."""
        repo = self.repo
        manifest = self._manifests.cache.get(fid)
        got = repo.file_from_memory(fid, manifest)
        if got is None:
            if manifest is None:
                manifest = repo.manifest_from_memory(fid)
                if manifest is not None:
                    self._manifests.put(fid, manifest)
            return None
        self.inline += 1
        return got

    def chunks_now(self, ids: list[bytes]) -> list[bytes] | None:
        """Chunks by id if they are in memory, else None (the prefetcher's ``fetch_now``)."""
        recent = self._recent
        got = [recent.get(i) for i in ids]
        if None not in got:
            self.inline += 1
            return got
        got = self.repo.chunks_from_memory(ids)
        if got is not None:
            self.inline += 1
            self._keep(ids, got)
        return got
