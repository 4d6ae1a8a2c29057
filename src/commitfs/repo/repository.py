"""A repository: config, blobs in packs found through the index, commits, refs.

Write order (docs/FORMAT.md, "Crash safety"): packs, then the index segment
naming their blobs, then the commit object, then the branch (by
compare-and-swap).  Readers go the other way: branch -> commit -> trees ->
manifests -> chunks.  A crash anywhere leaves only unreferenced objects,
which readers never see and gc removes; so a branch only ever names a
complete commit.
"""

from __future__ import annotations

import functools
import json
import os
import re
import threading
import uuid
from collections.abc import Iterator
from dataclasses import dataclass

from commitfs.errors import (
    CorruptObjectError,
    GcInterferenceError,
    ObjectNotFoundError,
    RepositoryError,
    RepositoryNotFoundError,
    RevisionError,
)
from commitfs.model.ids import HEX_SIZE, hash_bytes, is_hex
from commitfs.model.objects import Commit, DecodeError, FileManifest, Tree
from commitfs.model import splittree
from commitfs.model.splittree import SplitTree, TreeIndex, decode_tree_node, iter_split_nodes, split_edit
from commitfs.repo.engine import ReadEngine
from commitfs.repo.gcstate import GcState, lease_state
from commitfs.repo.index import Index
from commitfs.repo.lru import LockedLRU
from commitfs.repo.pack import (
    TARGET_PACK_SIZE,
    BlobKind,
    Compression,
    Location,
    PackBuilder,
    encode_delta,
    maybe_compress,
    pack_key,
)
from commitfs.repo.aliases import ALIASES, Aliases
from commitfs.repo.refs import Refs
from commitfs.storage.base import Store
from commitfs.storage.url import open_store

FORMAT_NAME = "commitfs"
#: Version 2 adds split trees (docs/FORMAT.md, "Split trees"), version 3 trees
#: stored as deltas ("Tree deltas"); a repository of an older version is read as
#: it is, and upgraded in place by the first writer that stores what the newer
#: version adds (``upgrade_format``).
FORMAT_VERSION = 3
SPLIT_VERSION = 2
DELTA_VERSION = 3
READABLE_VERSIONS = (1, 2, 3)
CONFIG_KEY = "config"
COMMITS_PREFIX = "commits/"
MIN_PREFIX = 4
_REPO_ID = re.compile(r"[0-9a-f]{32}")


class ChunkCache:
    """What the repository asks of a chunk cache (see commitfs.cache)."""

    def get(self, oid: bytes) -> bytes | None:  # pragma: no cover - protocol
        raise NotImplementedError

    def put(self, oid: bytes, data: bytes) -> None:  # pragma: no cover - protocol
        raise NotImplementedError


def _decode(decode, raw, what: str, oid: bytes):
    try:
        return decode(bytes(raw))
    except DecodeError as exc:
        raise CorruptObjectError(f"{what} {oid.hex()} is malformed: {exc}") from None


def commit_key(cid: bytes) -> str:
    return COMMITS_PREFIX + cid.hex()


#: Bytes of decoded trees and manifests a repository object keeps (estimates:
#: tree_cost, manifest_cost).
TREE_CACHE_BYTES = 64 * 1024 * 1024
MANIFEST_CACHE_BYTES = 32 * 1024 * 1024


def tree_cost(tree) -> int:
    """A decoded tree's memory, roughly: a TreeEntry with its name and id is
    ~200 B, an index node's child ~150 B."""
    if isinstance(tree, TreeIndex):
        return 200 + 150 * len(tree.children)
    return 200 + 200 * len(tree.entries)


def manifest_cost(manifest) -> int:
    return 200 + 100 * len(manifest.chunk_ids)


class Repository:
    """Access to one repository's stored format."""

    def __init__(self, store: Store, config: dict, chunk_cache: ChunkCache | None = None):
        self.store = store
        self.url = store.url
        self.config = config
        # The id names local files (the lineage index, the stat cache): only
        # ever the 32 lowercase hex digits init writes, never a path of the
        # repository's choosing.
        rid = config.get("id") if isinstance(config, dict) else None
        if not isinstance(rid, str) or not _REPO_ID.fullmatch(rid):
            raise RepositoryError(f"{store.url}: the repository config's id {rid!r:.80} is not 32 hex digits")
        self.id: str = rid
        self.index = Index(store)
        self.reads = ReadEngine(store, self.index, chunk_cache)
        self.gc = GcState(store)
        self.refs = Refs(store, before_publish=self.check_publishable)
        self.aliases = Aliases(store, before_publish=self.check_publishable)
        # What this process deduplicated against since it last published a
        # commit (docs/FORMAT.md, "Garbage collection"): checked before a ref moves.
        self._track_lock = threading.Lock()
        self._hits: set[bytes] = set()
        self._commit_hits: set[bytes] = set()
        self._own_packs: set[bytes] = set()
        self._own_segments: set[str] = set()  # index segments it wrote (one per checkpoint)
        self._hit_segments: frozenset[str] | None = None
        self._gc_seen: tuple[int, bool] | None = None  # lease_state when tracking began
        # Capped by (estimated) bytes, not entries: one tree of a flat directory
        # of a million files is ~200 MB of objects.
        self._trees = LockedLRU(maxsize=TREE_CACHE_BYTES, getsizeof=tree_cost)
        self._manifests = LockedLRU(maxsize=MANIFEST_CACHE_BYTES, getsizeof=manifest_cost)
        self._commits = LockedLRU(maxsize=4096)

    # --- opening ----------------------------------------------------------------
    @classmethod
    def init(cls, url: str, **store_options) -> Repository:
        from commitfs.model import chunker  # (pyfastcdc: not on a reader's start-up path)

        store = open_store(url, **store_options)
        if store.lookup_size(CONFIG_KEY) is not None:
            raise RepositoryError(f"{url} is already a commitfs repository")
        config = {
            "format": FORMAT_NAME,
            "version": FORMAT_VERSION,
            "id": uuid.uuid4().hex,
            "chunker": {"algorithm": "fastcdc-2020", "min": chunker.MIN_SIZE, "avg": chunker.AVG_SIZE,
                        "max": chunker.MAX_SIZE, "normalization": chunker.NORMALIZATION},
            "hash": "blake3-256",
        }
        store.save_object(CONFIG_KEY, json.dumps(config, sort_keys=True, indent=1).encode() + b"\n")
        return cls(store, config)

    @classmethod
    def open(cls, url: str, chunk_cache: ChunkCache | None = None, **store_options) -> Repository:
        store = open_store(url, **store_options)
        try:
            raw = store.load_object(CONFIG_KEY)
        except ObjectNotFoundError:
            raise RepositoryNotFoundError(f"no commitfs repository at {url} (create one with: commitfs init)") from None
        try:
            config = json.loads(raw)
            name, version = config["format"], config["version"]
        except (ValueError, KeyError, TypeError):
            raise RepositoryError(f"{url}: the repository config is unreadable") from None
        if name != FORMAT_NAME:
            raise RepositoryError(f"{url} is not a commitfs repository")
        if type(version) is not int or version not in READABLE_VERSIONS:
            raise RepositoryError(
                f"{url} has format version {version}; this commitfs reads format version "
                f"{', '.join(map(str, READABLE_VERSIONS[:-1]))} or {READABLE_VERSIONS[-1]} (upgrade commitfs)"
            )
        return cls(store, config, chunk_cache)

    @property
    def is_local(self) -> bool:
        return self.store.local_path(CONFIG_KEY) is not None

    def close(self) -> None:
        self.reads.close()
        self.store.close()

    def __enter__(self) -> Repository:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # --- blobs: all through the read engine (repo/engine.py) ---------------------
    @property
    def chunk_cache(self) -> ChunkCache | None:
        return self.reads.chunk_cache

    @chunk_cache.setter
    def chunk_cache(self, cache: ChunkCache | None) -> None:
        self.reads.chunk_cache = cache

    def locate(self, oid: bytes) -> Location:
        return self.reads.locate(oid)

    def has_blob(self, oid: bytes) -> bool:
        """Whether a writer may deduplicate against a stored copy of the blob.

        A copy in a pack a gc has condemned does not count (the writer stores
        the blob again); a copy that counts is remembered, and checked again
        before the next ref moves (``check_publishable``)."""
        condemned = self.gc.condemned_packs()
        if condemned:  # where it lies matters: a lookup
            loc = self.index.lookup(oid, refresh=False, strict=False)
            if loc is None or loc.pack in condemned:
                return False
        elif not self.index.contains(oid):  # no gc about: the writer's cheap question
            return False
        self._start_tracking()
        with self._track_lock:
            if self._hit_segments is None:
                self._hit_segments = frozenset(s.key for s in self.index.segments())
            self._hits.add(oid)
        return True

    def _start_tracking(self) -> None:
        if self._gc_seen is None:
            state = lease_state(self.store)
            with self._track_lock:
                if self._gc_seen is None:
                    self._gc_seen = state

    def note_own_pack(self, pack: bytes) -> None:
        """A pack this process stored (checked before a ref moves, as deduplications are)."""
        self._start_tracking()
        with self._track_lock:
            self._own_packs.add(pack)

    def note_own_segment(self, key: str | None) -> None:
        """An index segment this process wrote (a gc replacing the index under
        a writer could drop what it names: checked before a ref moves).  The
        segment, not its blobs: a commit of millions of files keeps one key
        per checkpoint, not an id per blob."""
        if key is None:
            return
        self._start_tracking()
        with self._track_lock:
            self._own_segments.add(key)

    def check_publishable(self, cid: bytes) -> None:
        """Before a ref is set to ``cid``: nothing it needs is being collected.

        Called by Refs just before its compare-and-swap.  Raises
        GcInterferenceError if ``cid`` or a commit this process found present
        is condemned by a live gc record, or if a blob this process
        deduplicated against (or a pack it stored) is condemned, or is no
        longer in the index.  The common case, no gc about and the index
        segments seen still listed, costs two listings."""
        with self._track_lock:
            hits, commits, packs = set(self._hits), set(self._commit_hits), set(self._own_packs)
            own = set(self._own_segments)
            seen = self._hit_segments
            began = self._gc_seen
        records = self.gc.records()
        generation, held = lease_state(self.store)
        # A gc about now, or one that ran (even from start to end) since this
        # process began to deduplicate: check everything it relies on.
        gc_about = bool(records) or held or (began is not None and (began[1] or began[0] != generation))
        if gc_about:
            for c in commits:
                if not self.has_commit(c):
                    raise GcInterferenceError(
                        f"commit {c.hex()}, which this operation builds on, was removed by a concurrent gc: "
                        "nothing was published; run it again")
            for p in packs:
                if self.store.lookup_size(pack_key(p)) is None:
                    raise GcInterferenceError(
                        f"a concurrent gc removed pack {p.hex()}, which this operation stored before indexing it "
                        "(it ran for longer than the gc grace period): nothing was published; run it again")
            condemned_commits = self.gc.condemned_commits()
            for c in (cid, *commits):
                if c in condemned_commits:
                    raise GcInterferenceError(
                        f"commit {c.hex()} is unreachable and a running gc is removing it: not published "
                        "(make a new commit from the data instead)")
        condemned = self.gc.condemned_packs()
        if packs & condemned:
            raise GcInterferenceError(
                "a concurrent gc condemned packs this operation stored before indexing them (it ran for longer "
                "than the gc grace period): nothing was published; run it again")
        if hits or (own and gc_about):
            self.index.refresh()
            listed = {s.key for s in self.index.segments()}
            # Segments a gc is replacing do not count: what it keeps is in the new ones.
            replaced = frozenset(k for r in records for k in r.removed_segments)
            if gc_about and any(k in replaced or k not in listed for k in own):
                # A gc rewrote the index under this writer: what it stored may be
                # out of it (conservative: a merge by another writer looks the same).
                raise GcInterferenceError(
                    "a concurrent gc rewrote the index while this operation was storing data: nothing was "
                    "published; run it again (what is still stored is not sent twice)")
            if gc_about or (seen is not None and not seen <= listed):
                self.index.forget_answers()
                for oid in hits:
                    if self.index.lookup_fresh(oid, condemned, replaced) is None:
                        raise GcInterferenceError(
                            f"a concurrent gc removed blob {oid.hex()}, which this operation relies on: "
                            "nothing was published; run it again (it stores the data anew)")
        with self._track_lock:
            self._hits.difference_update(hits)
            self._commit_hits.difference_update(commits)
            self._own_packs.difference_update(packs)
            self._own_segments.difference_update(own)
            if not self._hits:
                self._hit_segments = None
            if not (self._hits or self._own_packs or self._commit_hits or self._own_segments):
                self._gc_seen = None


    def _pack_gone(self) -> None:
        """A pack the index named is gone: gc repacked or removed it.  Re-list
        the index and drop cached answers, so the caller looks again once."""
        self.index.refresh()
        self.index.forget_answers()

    def load_blob(self, oid: bytes) -> bytes:
        """A blob's raw bytes, verified."""
        try:
            return self.reads.read_blob(oid)
        except ObjectNotFoundError:
            self._pack_gone()
            return self.reads.read_blob(oid)

    def load_chunks(self, oids: list[bytes], sizes=None) -> list[bytes]:
        """Chunks by id, verified; neighbours in one pack share one ranged read.
        ``sizes``: the lengths a file manifest declares for them, checked too."""
        try:
            return self.reads.read_chunks(oids, sizes)
        except ObjectNotFoundError:
            self._pack_gone()
            return self.reads.read_chunks(oids, sizes)

    def load_file(self, fid: bytes) -> bytes | memoryview:
        """A whole file's bytes, verified (a mount reads a small file whole):
        the read engine's read_file (repo/engine.py)."""
        try:
            return self.reads.read_file(self.load_manifest(fid, keep=False))
        except ObjectNotFoundError:
            self._pack_gone()
            return self.reads.read_file(self.load_manifest(fid, keep=False))

    def _load_decoded(self, cache, oid: bytes, decode, what: str, keep: bool):
        obj = cache.get(oid)
        if obj is None:
            obj = _decode(decode, self.load_blob(oid), what, oid)
            if keep:
                cache[oid] = obj
        return obj

    def load_tree(self, tid: bytes, keep: bool = True) -> Tree | SplitTree:
        """A directory's tree, decoded.  ``keep=False``: not added to this
        repository's cache (a caller with its own, as the mount's Loader,
        would hold it twice).  A split directory (docs/FORMAT.md, "Split
        trees") is a SplitTree: its root only, its chunks loaded (and kept)
        as its readers ask for them."""
        node = self._load_decoded(self._trees, tid, decode_tree_node, "tree", keep)
        if isinstance(node, TreeIndex):
            return SplitTree(tid, node, functools.partial(self.load_tree_node, keep=keep))
        return node

    def load_tree_node(self, tid: bytes, keep: bool = True) -> Tree | TreeIndex:
        """A stored tree object as it is: a plain tree (a directory or a leaf
        chunk of a split one) or an index node of a split directory."""
        return self._load_decoded(self._trees, tid, decode_tree_node, "tree", keep)

    @property
    def version(self) -> int:
        return self.config.get("version", FORMAT_VERSION)

    def upgrade_format(self, to: int = SPLIT_VERSION) -> None:
        """Mark an older repository version ``to`` before the first object only
        that version describes is stored in it (a split tree: 2, docs/FORMAT.md
        "Split trees"; a tree delta: 3, "Tree deltas"): an older commitfs then
        refuses it by name rather than meeting an object it cannot read.  The
        config changes only its version; rewriting it is idempotent."""
        if self.config.get("version", FORMAT_VERSION) >= to:
            return
        raw = self.store.load_object(CONFIG_KEY)
        config = json.loads(raw)
        if isinstance(config.get("version"), int) and config["version"] < to:
            config["version"] = to
            self.store.save_object(CONFIG_KEY, json.dumps(config, sort_keys=True, indent=1).encode() + b"\n")
        self.config = dict(self.config, version=max(to, self.config.get("version", to)))

    def remember_tree(self, tid: bytes, tree: Tree) -> None:
        """Keep a tree this process built (its id is its content's hash)."""
        self._trees[tid] = tree

    def load_manifest(self, fid: bytes, keep: bool = True) -> FileManifest:
        return self._load_decoded(self._manifests, fid, FileManifest.decode, "file manifest", keep)

    # --- the same from memory, or None (the mount's event loop: repo/engine.py) --
    def _decoded_from_memory(self, cache, oid: bytes, decode, what: str):
        obj = cache.get(oid)
        if obj is None:
            raw = self.reads.blob_from_memory(oid)
            if raw is not None:
                obj = _decode(decode, raw, what, oid)
        return obj

    def tree_from_memory(self, tid: bytes) -> Tree | SplitTree | None:
        """``load_tree(tid, keep=False)`` if memory has what it needs, else None."""
        node = self._decoded_from_memory(self._trees, tid, decode_tree_node, "tree")
        if isinstance(node, TreeIndex):
            return SplitTree(tid, node, functools.partial(self.load_tree_node, keep=False))
        return node

    def tree_node_from_memory(self, tid: bytes) -> Tree | TreeIndex | None:
        """``load_tree_node(tid, keep=False)`` if memory has what it needs, else None."""
        return self._decoded_from_memory(self._trees, tid, decode_tree_node, "tree")

    def manifest_from_memory(self, fid: bytes) -> FileManifest | None:
        """``load_manifest(fid, keep=False)`` if memory has what it needs, else None."""
        return self._decoded_from_memory(self._manifests, fid, FileManifest.decode, "file manifest")

    def chunks_from_memory(self, oids: list[bytes], sizes=None) -> list[bytes] | None:
        """``load_chunks`` if memory has what it needs, else None."""
        return self.reads.chunks_from_memory(oids, sizes)

    def file_from_memory(self, fid: bytes, manifest: FileManifest | None = None) -> bytes | memoryview | None:
        """``load_file`` if memory has what it needs, else None (``manifest``:
        the file's, if the caller holds it)."""
        return self.reads.file_from_memory(fid, manifest)

    # --- commits ----------------------------------------------------------------
    def load_commit(self, cid: bytes) -> Commit:
        c = self._commits.get(cid)
        if c is None:
            try:
                data = self.store.load_object(commit_key(cid))
            except ObjectNotFoundError:
                raise RevisionError(f"commit {cid.hex()} does not exist") from None
            if hash_bytes(data) != cid:
                raise CorruptObjectError(f"commit {cid.hex()} fails its hash check")
            try:
                c = Commit.decode(data)
            except DecodeError as exc:
                raise CorruptObjectError(f"commit {cid.hex()} is malformed: {exc}") from None
            self._commits[cid] = c
        return c

    def has_commit(self, cid: bytes) -> bool:
        """Whether the commit object exists, for building on it (remembered, as a
        deduplication is).  A commit a gc has condemned does not count: the
        stat cache, say, then reads the files again rather than reuse its ids."""
        if self.store.lookup_size(commit_key(cid)) is None or cid in self.gc.condemned_commits():
            return False
        self._start_tracking()
        with self._track_lock:
            self._commit_hits.add(cid)
        return True

    def save_commit(self, commit: Commit) -> bytes:
        """Store a commit object (after every blob it needs is indexed)."""
        data = commit.encode()
        cid = hash_bytes(data)
        self.store.save_object(commit_key(cid), data)
        self._commits[cid] = commit
        return cid

    def iter_commit_ids(self, prefix: str = "") -> Iterator[bytes]:
        for key in self.store.iter_keys(COMMITS_PREFIX + prefix):
            name = key[len(COMMITS_PREFIX):]
            if len(name) == HEX_SIZE and is_hex(name):
                yield bytes.fromhex(name)

    # --- revisions --------------------------------------------------------------
    def resolve(self, rev: str) -> bytes:
        """A commit id from a branch, tag, (prefix of a) commit id, followed by any
        number of ``~N`` (the N-th first-parent ancestor) and ``^N`` (the N-th parent;
        ``^`` is ``^1``, ``^0`` the commit itself) steps, as in git."""
        if not isinstance(rev, str):
            raise RevisionError(f"invalid revision {rev!r} (not a string)")
        m = re.fullmatch(r"(.+?)((?:[~^]\d*)*)", rev.strip())
        if not m or not m.group(1):
            raise RevisionError(f"invalid revision {rev!r}")
        base, suffix = m.group(1), m.group(2)
        cid = self._resolve_base(base)
        for op, digits in re.findall(r"([~^])(\d*)", suffix):
            n = int(digits) if digits else 1
            if op == "~":
                for _ in range(n):
                    parents = self.load_commit(cid).parents
                    if not parents:
                        raise RevisionError(f"{rev}: history of {base} is not that long")
                    cid = parents[0]
            elif n:
                parents = self.load_commit(cid).parents
                if len(parents) < n:
                    have = f"{len(parents)} parent{'s' if len(parents) != 1 else ''}"
                    raise RevisionError(f"{rev}: commit {cid.hex()[:12]} has {have}, not a parent {n}")
                cid = parents[n - 1]
        return cid

    def _resolve_base(self, name: str) -> bytes:
        cid = self.refs.lookup_branch(name)
        if cid is not None:
            return cid
        cid = self.refs.lookup_tag(name)
        if cid is not None:
            return cid
        # Aliases after branches and tags (`alias set` refuses a branch's or a
        # tag's name; a branch made later wins, and `aliases/NAME` still names the alias).
        cid = self.aliases.resolve(name.removeprefix(ALIASES) if name.startswith(ALIASES) else name)
        if cid is not None:
            return cid
        lowered = name.lower()
        if len(lowered) >= MIN_PREFIX and is_hex(lowered):
            if len(lowered) == HEX_SIZE:
                cid = bytes.fromhex(lowered)
                if self.has_commit(cid):
                    return cid
            else:
                found = list(self.iter_commit_ids(lowered))
                if len(found) == 1:
                    return found[0]
                if len(found) > 1:
                    raise RevisionError(f"commit prefix {name!r} is ambiguous ({len(found)} commits match)")
        if not self.refs.branches():
            raise RevisionError(f"unknown revision {name!r}: the repository has no commits yet")
        raise RevisionError(f"unknown revision {name!r} (not a branch, tag, alias or commit id)")

    # --- writing ----------------------------------------------------------------
    def writer(self, checkpoint_blobs: int | None = None, remember_trees: bool = True) -> BlobWriter:
        return BlobWriter(self, checkpoint_blobs, remember_trees)


@dataclass
class WriteStats:
    blobs_new: int = 0
    bytes_new_raw: int = 0
    bytes_new_stored: int = 0
    blobs_dedup: int = 0
    packs: int = 0
    tree_deltas: int = 0  # trees stored as deltas (docs/FORMAT.md, "Tree deltas")
    #: Everything the writer added to the store: whole packs (headers and
    #: tables too) and index segments (net of merged segments removed); the
    #: commit adds its commit object.
    bytes_stored: int = 0


_CHUNK = BlobKind.CHUNK
_MANIFEST = BlobKind.MANIFEST
_NONE = Compression.NONE
_tuple_new = tuple.__new__


class BlobWriter:
    """Adds blobs to a repository: dedups, compresses, packs, uploads, indexes.

    Chunks go to data packs, manifests and trees to metadata packs (so that
    browsing a tree reads dense metadata).  Full packs are uploaded by a small
    thread pool while the caller goes on producing blobs; pack buffers are
    recycled once uploaded.  ``finish`` waits for the uploads, then writes the
    index segment: only then are the blobs visible to other readers.
    Abandoning a writer leaves unreferenced packs, which gc removes.

    Callers that chunk in parallel threads hash and compress there and hand
    the results to ``add`` (``stored``/``compression``), so this object's
    single thread only deduplicates and copies bytes into packs.
    """

    # Packs in flight at once: overlaps producing blobs with I/O, bounds memory
    # (each in-flight data pack holds a ~34 MiB buffer).  A local store writes a
    # pack to the page cache faster than the pool produces the next one, so one
    # in flight keeps up there, and the writer holds two data buffers, not five.
    UPLOAD_THREADS = 4
    LOCAL_UPLOADS = 1
    _META_BUFFER = 1024 * 1024  # initial pack buffer; packs grow from it
    #: Metadata packs (manifests, trees) close at this size: a million-file commit's
    #: ~100 MB of them filled two 34 MiB buffers (one uploading), grown by reallocation.
    META_PACK_SIZE = 8 * 1024 * 1024

    def __init__(self, repo: Repository, checkpoint_blobs: int | None = None, remember_trees: bool = True):
        self.repo = repo
        #: Keep the trees added in the repository's decoded-tree cache (add_tree); a commit
        #: of a directory says no: nothing reads its trees back, and a cache full of them
        #: (64 MiB of a million files' entries, fragmenting the heap) is most of its memory.
        self._remember_trees = remember_trees
        # Deduplicate against the index as it is now, not as this process
        # last listed it: a gc may have replaced segments since.
        repo.index.refresh()
        self.stats = WriteStats()
        # Index what was added every this many blobs (see checkpoint); None: only at the end.
        self._checkpoint_blobs = checkpoint_blobs
        self._free: list[bytearray] = []
        # Both start small and grow: a commit of a few files must not pay for
        # a full pack buffer; full-size buffers are then recycled (_upload).
        self._builders = {"data": PackBuilder(bytearray(self._META_BUFFER)),
                          "meta": PackBuilder(bytearray(self._META_BUFFER))}
        self._session: dict[bytes, Location] = {}
        from concurrent.futures import ThreadPoolExecutor  # (writers only: not on a mount's start-up path)

        self._max_uploads = self.LOCAL_UPLOADS if repo.is_local else self.UPLOAD_THREADS
        self._pool = ThreadPoolExecutor(self._max_uploads, thread_name_prefix="commitfs-upload")
        self._uploads: list = []  # concurrent.futures.Future
        self._uploaded: list[tuple[bytes, list]] = []  # packs stored, not yet indexed
        self._lock = threading.Lock()

    def __enter__(self) -> BlobWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.finish()
        else:
            self._pool.shutdown(wait=True, cancel_futures=True)
            self._discard_uploaded()

    def has(self, oid: bytes) -> bool:
        return oid in self._session or self.repo.has_blob(oid)

    def add(self, oid: bytes, kind: BlobKind, data, *, stored=None, compression: Compression | None = None,
            above_new: bool = False) -> bool:
        """Store a blob unless present; return True if it was new.

        ``data`` is the raw bytes (any bytes-like object; its length is the raw
        size).  Pass ``stored`` and ``compression`` if already decided by
        maybe_compress, e.g. in a worker thread.  ``above_new``: the blob names
        one this writer just found new (a file's manifest after its one chunk),
        so the repository cannot hold it but by a damage or a gc's condemned
        pack, where a copy stored twice is harmless: only this session is asked
        (half a commit's dedup questions, for a commit of small files).
        """
        # (Once per blob of a commit: module constants for enum members, tuple.__new__ for
        # the Location; a namedtuple's __new__ and an enum's attribute are Python calls.)
        session = self._session
        if oid in session if above_new else (oid in session or self.repo.has_blob(oid)):
            self.stats.blobs_dedup += 1
            return False
        if stored is None:
            stored, compression = maybe_compress(data, kind)
        chunk = kind is _CHUNK
        builder = self._builders["data" if chunk else "meta"]
        offset = builder.add(oid, kind, stored, compression, len(data))
        raw, nstored = len(data), len(stored)
        session[oid] = _tuple_new(Location, (b"", offset, nstored, raw, kind, compression))
        stats = self.stats
        stats.blobs_new += 1
        stats.bytes_new_raw += raw
        stats.bytes_new_stored += nstored
        if builder.size >= (TARGET_PACK_SIZE if chunk else self.META_PACK_SIZE):
            self._flush(builder)
        if self._checkpoint_blobs is not None and len(session) >= self._checkpoint_blobs:
            self.checkpoint()
        return True

    def add_one_chunk_files(self, files) -> None:
        """Store each (chunk id, chunk, stored, compression, file id, manifest
        encoding) of ``files`` in order, as ``add`` of the chunk and then ``add``
        of its manifest (``above_new`` when the chunk was new) would: the same
        blobs, packs, checkpoints and stats, without four Python calls per file
        (a million-file commit is mostly files of one chunk)."""
        session = self._session
        has_blob = self.repo.has_blob
        builders = self._builders
        data, meta = builders["data"], builders["meta"]
        checkpoint_at = self._checkpoint_blobs
        new_loc = _tuple_new
        CHUNK, MANIFEST, NONE = _CHUNK, _MANIFEST, _NONE
        dedup = blobs = raw_bytes = stored_bytes = 0
        try:
            for cid, chunk, stored, comp, fid, mdata in files:
                if cid in session or has_blob(cid):
                    dedup += 1
                    if fid in session or has_blob(fid):
                        dedup += 1
                        continue
                else:  # (PackBuilder.add inlined)
                    offset = data.size
                    n = len(stored)
                    end = offset + n
                    buf = data.buf
                    if end > len(buf):
                        buf.extend(bytes(max(end - len(buf), len(buf) // 2)))
                    buf[offset:end] = stored
                    data.size = end
                    raw = len(chunk)
                    data.entries.append((cid, CHUNK, comp, offset, n, raw))
                    session[cid] = new_loc(Location, (b"", offset, n, raw, CHUNK, comp))
                    blobs += 1
                    raw_bytes += raw
                    stored_bytes += n
                    if end >= TARGET_PACK_SIZE:
                        self._flush(data)
                        data = builders["data"]
                    if checkpoint_at is not None and len(session) >= checkpoint_at:
                        self.checkpoint()
                        data, meta = builders["data"], builders["meta"]
                    if fid in session:  # above a new chunk: only this session is asked (``add``)
                        dedup += 1
                        continue
                offset = meta.size
                n = len(mdata)
                end = offset + n
                buf = meta.buf
                if end > len(buf):
                    buf.extend(bytes(max(end - len(buf), len(buf) // 2)))
                buf[offset:end] = mdata
                meta.size = end
                meta.entries.append((fid, MANIFEST, NONE, offset, n, n))
                session[fid] = new_loc(Location, (b"", offset, n, n, MANIFEST, NONE))
                blobs += 1
                raw_bytes += n
                stored_bytes += n
                if end >= self.META_PACK_SIZE:
                    self._flush(meta)
                    meta = builders["meta"]
                if checkpoint_at is not None and len(session) >= checkpoint_at:
                    self.checkpoint()
                    data, meta = builders["data"], builders["meta"]
        finally:
            stats = self.stats
            stats.blobs_dedup += dedup
            stats.blobs_new += blobs
            stats.bytes_new_raw += raw_bytes
            stats.bytes_new_stored += stored_bytes

    def checkpoint(self) -> None:
        """Index every blob added so far and forget them: packs sealed (both,
        even part-full), uploads awaited, one index segment written.  Bounds
        the writer's memory (its session holds ~250 B per blob) at any blob
        count.  Safe for the write order only when every object is added after
        the objects beneath it (as a commit of a directory does): then a
        segment never names a tree whose subtree is indexed later.  Blobs it
        indexed stay if the writer then fails (unreferenced: gc's to remove)."""
        for builder in list(self._builders.values()):
            self._flush(builder)
        for f in self._uploads:
            f.result()
        self._uploads.clear()
        with self._lock:
            batch, self._uploaded = self._uploaded, []
        try:
            self._index([e for _, entries in batch for e in entries])
        except BaseException:
            with self._lock:
                self._uploaded[:0] = batch  # not indexed: removed by _discard_uploaded
            raise
        with self._lock:
            self._session.clear()

    def _index(self, entries: list) -> None:
        before = self.repo.index.bytes_added
        key = self.repo.index.add_segment(entries)
        self.stats.bytes_stored += self.repo.index.bytes_added - before
        self.repo.note_own_segment(key)

    def add_tree(self, tree: Tree, base: bytes | None = None) -> bytes:
        """Store a directory (any Tree, or SplitTree): one plain tree, or, past
        model.splittree.SPLIT_ENTRIES entries, its chunks and index nodes,
        children first (the one builder every commit path uses).  ``base``: a
        tree the directory had before, which a new plain tree is stored as a
        delta of where that pays (``_add_delta``, docs/FORMAT.md "Tree deltas")."""
        split = len(tree.entries) > splittree.SPLIT_ENTRIES
        if split and self.repo.version < SPLIT_VERSION:
            self.repo.upgrade_format(SPLIT_VERSION)
        for oid, data, node in iter_split_nodes(tree.entries):  # each stored as it is made
            if base is None or split or not self._add_delta(oid, data, base):
                self.add(oid, BlobKind.TREE, data)
            # The writer's process is the likeliest next reader of the trees it
            # writes (a workspace rebasing onto its new commit): spare it decoding.
            if self._remember_trees:
                self.repo.remember_tree(oid, node)
        return oid

    def _add_delta(self, oid: bytes, data, base: bytes) -> bool:
        """Store tree ``oid`` (raw bytes ``data``) as a delta if it is new and a
        delta pays; False to store it whole.  The delta's base is ``base`` if that
        is stored whole, else the tree ``base`` is a delta of (so no delta is ever
        of a delta: a reader reads two blobs at most).  Only where the base is
        cheap to read: a local repository, or a remote one's base trees already
        in memory; over S3 a GET per changed directory on the committing thread
        would cost more time than the bytes save.  The base counts as a blob
        the commit relies on (``has_blob``: checked against a concurrent gc
        before the ref moves)."""
        repo = self.repo
        if oid == base or oid in self._session or base in self._session:
            return False
        try:
            if not repo.has_blob(base):
                return False
            if repo.has_blob(oid):
                return False  # (add counts it as deduplicated)
            if repo.is_local:
                whole, raw = repo.reads.delta_source(base)
            else:  # only a base stored whole, decoded and located in memory (its encoding is its raw bytes)
                node = repo.tree_node_from_memory(base)
                loc = repo.index.lookup_in_memory(base)
                if not isinstance(node, Tree) or loc is None or loc.compression is Compression.DELTA:
                    return False
                whole, raw = base, node.encode()
            if whole != base and not repo.has_blob(whole):
                return False
        except (ObjectNotFoundError, CorruptObjectError):
            return False
        stored = encode_delta(data, whole, raw)
        if stored is None:
            return False
        if repo.version < DELTA_VERSION:
            repo.upgrade_format(DELTA_VERSION)
        self.add(oid, BlobKind.TREE, data, stored=stored, compression=Compression.DELTA)
        self.stats.tree_deltas += 1
        return True

    def add_tree_edit(self, base: SplitTree, edits) -> tuple[bytes, int]:
        """Store split directory ``base`` with ``edits`` (name: entry or None)
        applied, re-cutting only around them (model.splittree.split_edit: the
        ids add_tree would give the edited directory); (tree id, size)."""
        nodes = split_edit(base, edits)
        for oid, data, node in nodes:
            self.add(oid, BlobKind.TREE, data)
            if self._remember_trees:
                self.repo.remember_tree(oid, node)
        root = nodes[-1][2]
        return nodes[-1][0], root.size

    def add_manifest(self, manifest: FileManifest) -> bytes:
        data = manifest.encode()
        fid = hash_bytes(data)
        self.add(fid, BlobKind.MANIFEST, data)
        return fid

    def _flush(self, builder: PackBuilder, last: bool = False) -> None:
        """Seal ``builder``'s pack and upload it; unless ``last`` (the writer's finish), a
        fresh builder takes its place (a data builder a full-size buffer, recycled if one is free)."""
        if not builder.entries:
            return
        view = builder.seal()
        # Bound the packs held in memory: wait for the oldest upload first, and
        # only then pick the next buffer, so that the one just uploaded is reused
        # (picked before, a new one was allocated while it was still in flight).
        while len([f for f in self._uploads if not f.done()]) >= self._max_uploads:
            next(f for f in self._uploads if not f.done()).result()
        for f in [f for f in self._uploads if f.done()]:
            f.result()  # raises a failed upload's error now
            self._uploads.remove(f)
        for name, b in self._builders.items():
            if b is builder and not last:
                with self._lock:
                    buf = self._free.pop() if self._free and name == "data" else None
                self._builders[name] = PackBuilder(buf if name == "data" else bytearray(self._META_BUFFER))
        self._uploads.append(self._pool.submit(self._upload, builder, view))

    def _upload(self, builder: PackBuilder, view: memoryview) -> None:
        pack_id = hash_bytes(view)  # here, not in the producing thread: blake3 runs without the GIL
        made = builder.entries
        if pack_id in self.repo.gc.condemned_packs():
            # Byte for byte a pack a gc is about to delete (the same blobs
            # stored again in the same order): store a distinct one instead.
            salted = PackBuilder(bytearray(len(view) + 4096))
            for oid, kind, comp, off, stored, raw in made:
                salted.add(oid, kind, view[off:off + stored], comp, raw)
            salt = os.urandom(16)
            salted.add(hash_bytes(salt), BlobKind.CHUNK, salt, Compression.NONE, len(salt))
            view.release()
            made = salted.entries
            pack_id, view = salted.finish()
        # Per blob of the pack, on this thread, holding the GIL the committing thread needs:
        # Locations made by tuple.__new__ (a namedtuple's own __new__ is a Python function),
        # from the builder's kinds, which are BlobKinds already (no enum call).
        new = tuple.__new__
        entries = [(oid, new(Location, (pack_id, off, stored, raw, kind, comp)))
                   for oid, kind, comp, off, stored, raw in made]
        self.repo.note_own_pack(pack_id)
        self.repo.store.save_object(pack_key(pack_id), view)
        size = len(view)
        view.release()
        with self._lock:
            self._uploaded.append((pack_id, entries))
            self.stats.packs += 1
            self.stats.bytes_stored += size
            self._session.update(entries)
            if len(builder.buf) >= TARGET_PACK_SIZE:
                self._free.append(builder.take_buffer())

    def finish(self) -> int:
        """Upload what remains, wait, then index the new blobs; return their count."""
        try:
            try:
                for builder in list(self._builders.values()):
                    self._flush(builder, last=True)
                for f in self._uploads:
                    f.result()
            finally:
                self._pool.shutdown(wait=True, cancel_futures=True)
            self._uploads.clear()
            with self._lock:
                entries = [e for _, es in self._uploaded for e in es]
            self._index(entries)
        except BaseException:
            self._discard_uploaded()
            raise
        self._uploaded.clear()
        return len(entries)

    def abort(self) -> None:
        """Give up: wait for uploads in flight, then remove the packs stored."""
        self._pool.shutdown(wait=True, cancel_futures=True)
        self._discard_uploaded()

    def _discard_uploaded(self) -> None:
        """Remove the packs this writer stored but never indexed (a failed upload,
        a full disk when writing the index segment), so that a re-run needs no
        more room than this attempt did.  A pack some index segment does name
        (an identical pack another writer stored and indexed meanwhile) stays.
        Best effort: what cannot be removed is left for gc, as after a kill."""
        with self._lock:
            uploaded, self._uploaded = self._uploaded, []
        if not uploaded:
            return
        index = self.repo.index
        try:
            index.refresh()
        except Exception:
            return  # cannot tell what is indexed: remove nothing
        for pack_id, entries in uploaded:
            try:
                if any((loc := index.lookup(oid, refresh=False)) is not None and loc.pack == pack_id
                       for oid, _ in entries):
                    continue
                self.repo.store.remove_object(pack_key(pack_id))
            except Exception:
                continue
