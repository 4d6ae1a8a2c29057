"""Sync: send one repository what it lacks from another, then move its refs.

Works between any two Repository objects (a local directory, a bucket, or two
buckets): it uses only the Store protocol through the repository layer.

**What is sent.**  The walk starts at the commits being sent and stops at
every commit the destination already has.  That is sound because of the write
order every commitfs writer follows (packs, then the index segment naming
their blobs, then the commit object, then the branch): a commit object exists
only once its tree, and its parents, are complete.  Below each missing commit
the walk skips any tree or file manifest the destination's index already has,
for the same reason one level down: *a tree (or manifest) is indexed only in
the same index segment as, or in a later one than, everything beneath it*.
BlobWriter keeps that invariant: it puts every blob of one writer into one
segment at ``finish`` (after the packs are stored), and a blob it skips as
already present was indexed by an earlier segment; commit_directory adds a
file's chunks before its manifest and a directory's entries before its tree.
This module keeps it too: it sends chunks, then manifests, then trees by
increasing height (a tree after every tree below it), through writers whose
segments are written one after another.

**How.**  The source's blobs are read in coalesced ranged reads (neighbours in
one pack, one request) by a bounded thread pool, verified against their ids,
and re-packed into new packs by the destination's BlobWriter (which uploads
with its own small pool), stored as the source stored them (no second
compression).  Every ``batch_bytes`` (a few packs) the writer is
finished, which writes an index segment: received blobs become visible
progressively, so an interrupted push or pull, re-run, skips them and only
re-sends the packs of the last unfinished batch.  Nothing references those
blobs until refs move, so making them visible early is harmless.

**Whole packs.**  A source pack holding only chunks, most of whose bytes
are needed (a first push, a clone), is copied verbatim instead: read whole,
checked against its id (the hash of its bytes), stored under the same key and
indexed (every chunk in it: chunks have nothing beneath them, so indexing
one the walk did not ask for is harmless).  It saves re-packing, and the
copy runs at the store's speed for large objects.  A pack already in the
destination (copied by an interrupted run, not yet indexed) is only indexed.

**Refs.**  Commit objects are written after every blob (parents before
children), and the branch last, by compare-and-swap against the value read
before the transfer.  Push refuses to move a remote branch that is not an
ancestor of what is pushed, pull refuses to move a local branch that is not
an ancestor of what is pulled (no merge machinery), both unless ``force``.

**Objects named by metadata.**  A commit keeps reachable the file manifests
its metadata names under ``commitfs.object.*`` (a run's read set); they are
sent with the commit, as a file of its tree would be.

**Aliases.**  Every push, pull and clone carries every alias (docs/FORMAT.md,
"Aliases"), removed ones too: the commits they name are sent with the rest,
then the log entries the destination lacks (oldest first, so a destination
holding an entry holds all entries before it), then the alias reference by
compare-and-swap.  An alias moves only forward along its log: if the
destination's newest entry is in the source's log, it moves; if the
source's is in the destination's, it stays ("ahead"); otherwise the two logs
diverged and it is reported ("diverged") and left alone, whatever ``force``
says, since overwriting it would drop entries from the destination's log.

Index lookups run on the calling thread (the index's answer cache is not
thread-safe); worker threads only do store I/O, decompression and hashing.
"""

from __future__ import annotations

import os
import sys
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field

from commitfs.errors import (CorruptObjectError, InputError, ObjectNotFoundError, RefConflictError,
                             RepositoryNotFoundError, RevisionError)
from commitfs.model.ids import ID_SIZE, hash_bytes, is_hex
from commitfs.model.objects import Commit, DecodeError, FileManifest
from commitfs.model.splittree import TreeIndex, decode_tree_node
from commitfs.repo.engine import Run, plan_runs
from commitfs.repo.pack import TARGET_PACK_SIZE, BlobKind, Location, pack_key, parse_pack_table
from commitfs.repo.aliases import AliasState
from commitfs.repo.remotes import DEFAULT_REMOTE, Remotes
from commitfs.repo.repository import BlobWriter, Repository, commit_key
from commitfs.storage.url import open_store

#: Commit metadata keys naming a file manifest the commit keeps reachable (docs/FORMAT.md).
OBJECT_PREFIX = "commitfs.object."
#: Worker threads reading from the source (the destination's BlobWriter adds
#: its own upload threads).  Enough to hide S3 latency on one connection pool.
DEFAULT_THREADS = 8
#: Finish a writer (one index segment) after this many new stored bytes: an
#: interrupted transfer re-sends at most this much (plus packs in flight).
BATCH_BYTES = 4 * TARGET_PACK_SIZE
#: A ranged read covers at most this much, so large packs still spread over
#: the pool and one failed request costs little.
_MAX_RUN = 8 * 1024 * 1024
#: Source bytes read ahead of the writer, per thread.
_WINDOW_PER_THREAD = 2 * _MAX_RUN
#: Copy a data pack whole when the blobs needed from it are at least this
#: share of its bytes (the rest is copied along: at most 10% waste)...
_WHOLE_PACK_SHARE = 0.9
#: ...and at least this much (not worth a size request below).
_WHOLE_PACK_MIN = 1024 * 1024
#: Whole packs in flight at once (each is held in memory).
_WHOLE_PACK_THREADS = 4


@dataclass
class SyncProgress:
    """What a transfer has done so far; ``phase`` is "scan" then "send"."""

    phase: str = "scan"
    objects_done: int = 0
    objects_total: int = 0
    bytes_done: int = 0
    bytes_total: int = 0


@dataclass
class SyncStats:
    commits: int = 0
    trees: int = 0
    manifests: int = 0
    chunks: int = 0
    #: Stored (compressed) bytes read from the source and written to the destination.
    bytes_read: int = 0
    bytes_sent: int = 0
    packs: int = 0
    #: Of ``packs``: copied whole from the source.
    packs_copied: int = 0
    segments: int = 0

    @property
    def objects(self) -> int:
        return self.commits + self.trees + self.manifests + self.chunks

    def to_json(self) -> dict:
        return {"commits": self.commits, "trees": self.trees, "manifests": self.manifests,
                "chunks": self.chunks, "bytes_read": self.bytes_read, "bytes_sent": self.bytes_sent,
                "packs": self.packs, "packs_copied": self.packs_copied, "segments": self.segments}


@dataclass
class RefUpdate:
    """One reference a sync moved (or found up to date)."""

    name: str
    old: bytes | None
    new: bytes
    #: "created", "fast-forward", "forced", "merged" (pull --merge: a merge
    #: commit of the diverged branches), "up-to-date", or "ahead" (pull:
    #: the local branch already contains the remote's); aliases also
    #: "diverged" (not moved: the two logs have different newest entries).
    status: str
    kind: str = "branch"

    def to_json(self) -> dict:
        return {"name": self.name, "kind": self.kind, "old": self.old.hex() if self.old else None,
                "new": self.new.hex(), "status": self.status}


@dataclass
class SyncResult:
    updates: list[RefUpdate] = field(default_factory=list)
    stats: SyncStats = field(default_factory=SyncStats)

    def to_json(self) -> dict:
        return {"updates": [u.to_json() for u in self.updates], "stats": self.stats.to_json()}


ProgressFn = Callable[[SyncProgress], None]


# --- reading the source ------------------------------------------------------------
def _runs(items: list[tuple[bytes, Location]]) -> list[Run]:
    """Runs each readable with one ranged read, in pack order (the read engine's plan)."""
    return plan_runs([(i, oid, loc) for i, (oid, loc) in enumerate(items)], max_run=_MAX_RUN)


def _read_run(src: Repository, run: Run) -> list[tuple[bytes, Location, bytes, bytes]]:
    return [(oid, loc, data, stored) for (_, oid, loc), data, stored in src.reads.read_run(run)]


def _iter_blobs(src: Repository, items: list[tuple[bytes, Location]], threads: int,
                ) -> Iterator[tuple[bytes, Location, bytes, bytes]]:
    """Yield (id, location, verified data, stored bytes) of every item, read
    in parallel runs with a bounded read-ahead, in pack order."""
    if not items:
        return
    window = _WINDOW_PER_THREAD * threads
    pool = ThreadPoolExecutor(threads, thread_name_prefix="commitfs-sync-read")
    pending: deque[tuple[int, Future]] = deque()
    inflight = 0
    try:
        for run in _runs(items):
            size = run.size
            while pending and (len(pending) >= 4 * threads or inflight + size > window):
                done_size, fut = pending.popleft()
                inflight -= done_size
                yield from fut.result()
            pending.append((size, pool.submit(_read_run, src, run)))
            inflight += size
        while pending:
            _, fut = pending.popleft()
            yield from fut.result()
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


def _load_commit(src: Repository, cid: bytes) -> tuple[bytes, Commit]:
    """A commit's bytes, verified, and its decoding (thread-safe: no caches)."""
    try:
        data = src.store.load_object(commit_key(cid))
    except ObjectNotFoundError:
        raise RevisionError(f"commit {cid.hex()} does not exist in {src.url}") from None
    if hash_bytes(data) != cid:
        raise CorruptObjectError(f"commit {cid.hex()} fails its hash check in {src.url}")
    try:
        return data, Commit.decode(data)
    except DecodeError as exc:
        raise CorruptObjectError(f"commit {cid.hex()} is malformed: {exc}") from None


# --- planning ----------------------------------------------------------------------
@dataclass
class _Plan:
    commits: list[list[tuple[bytes, bytes]]] = field(default_factory=list)  # waves of (id, bytes)
    chunks: list[tuple[bytes, Location]] = field(default_factory=list)
    manifests: list[tuple[bytes, Location, bytes]] = field(default_factory=list)
    trees: list[tuple[bytes, Location, bytes]] = field(default_factory=list)  # by increasing height
    split_trees: bool = False  # sends index nodes of split trees (needs format version 2)

    @property
    def blob_count(self) -> int:
        return len(self.chunks) + len(self.manifests) + len(self.trees)

    @property
    def blob_bytes(self) -> int:
        return sum(loc.stored for _, loc in self.chunks) + sum(loc.stored for _, loc, _ in self.manifests) \
            + sum(loc.stored for _, loc, _ in self.trees)


def _missing_commits(src: Repository, dst: Repository, tips: Iterable[bytes], pool: ThreadPoolExecutor,
                     ) -> list[list[tuple[bytes, bytes]]]:
    """Commits reachable from ``tips`` that ``dst`` lacks, as waves: every
    commit's missing parents are in an earlier wave."""
    found: dict[bytes, tuple[bytes, Commit]] = {}
    seen: set[bytes] = set()
    frontier = list(dict.fromkeys(tips))
    while frontier:
        seen.update(frontier)
        present = list(pool.map(dst.has_commit, frontier))
        todo = [cid for cid, has in zip(frontier, present) if not has]
        loaded = list(pool.map(lambda cid: _load_commit(src, cid), todo))
        frontier = []
        for cid, (data, commit) in zip(todo, loaded):
            found[cid] = (data, commit)
            for p in commit.parents:
                if p not in seen:
                    seen.add(p)
                    frontier.append(p)
    # Wave of a commit: 1 + the latest wave among its missing parents.
    wave: dict[bytes, int] = {}
    for cid in found:
        stack = [cid]
        while stack:
            top = stack[-1]
            if top in wave:
                stack.pop()
                continue
            parents = [p for p in found[top][1].parents if p in found]
            pending = [p for p in parents if p not in wave]
            if pending:
                stack.extend(pending)
                continue
            wave[top] = 1 + max((wave[p] for p in parents), default=-1)
            stack.pop()
    waves: list[list[tuple[bytes, bytes]]] = [[] for _ in range(1 + max(wave.values(), default=-1))]
    for cid, (data, _) in found.items():
        waves[wave[cid]].append((cid, data))
    return waves


def _plan(src: Repository, dst: Repository, tips: list[bytes], threads: int,
          progress: Callable[[int], None]) -> _Plan:
    plan = _Plan()
    with ThreadPoolExecutor(threads, thread_name_prefix="commitfs-sync-scan") as pool:
        plan.commits = _missing_commits(src, dst, tips, pool)
    progress(sum(map(len, plan.commits)))
    trees = {Commit.decode(data).tree for wave in plan.commits for _, data in wave}

    def wanted(oid: bytes, seen: set[bytes]) -> bool:
        if oid in seen:
            return False
        seen.add(oid)
        # Present in the destination: so is everything beneath it (see above).
        return not dst.has_blob(oid)

    tree_seen: set[bytes] = set()
    tree_send: set[bytes] = set()
    manifest_seen: set[bytes] = set()
    chunk_sizes: dict[bytes, int] = {}
    children: dict[bytes, list[bytes]] = {}
    tree_data: dict[bytes, tuple[Location, bytes]] = {}
    def take_manifests(manifests: list[bytes]) -> None:
        for fid, loc, data, _ in _iter_blobs(src, [(f, src.locate(f)) for f in manifests], threads):
            try:
                manifest = FileManifest.decode(data)
            except DecodeError as exc:
                raise CorruptObjectError(f"file manifest {fid.hex()} is malformed: {exc}") from None
            plan.manifests.append((fid, loc, data))
            for cid, declared in zip(manifest.chunk_ids, manifest.chunk_sizes):
                # A manifest's sizes must be its chunks' lengths (a mount maps
                # offsets with them): the sent chunks' are checked as they are
                # read (verify_blob holds their bytes to the index's size).
                known = chunk_sizes.get(cid)
                if known is None:
                    there = dst.index.lookup(cid, refresh=False)  # present: all is there
                    if there is None:
                        there = src.locate(cid)
                        plan.chunks.append((cid, there))
                    known = chunk_sizes[cid] = there.raw
                if known != declared:
                    raise CorruptObjectError(f"file manifest {fid.hex()} declares chunk {cid.hex()} as "
                                             f"{declared} bytes; it has {known}")

    # Files a commit keeps reachable from its metadata (``commitfs.object.*``: a
    # run's read set) travel with it; one the source lacks is left behind (the
    # commit's problem already, reported by fsck and lineage, not sync's).
    extra = []
    for wave in plan.commits:
        for _, data in wave:
            for key, value in Commit.decode(data).metadata.items():
                if key.startswith(OBJECT_PREFIX) and len(value) == 2 * ID_SIZE and is_hex(value):
                    oid = bytes.fromhex(value.lower())
                    if src.has_blob(oid) and wanted(oid, manifest_seen):
                        extra.append(oid)
    take_manifests(extra)
    level = [t for t in trees if wanted(t, tree_seen)]
    while level:
        tree_send.update(level)
        manifests: list[bytes] = []
        next_level: list[bytes] = []
        fetched = list(_iter_blobs(src, [(t, src.locate(t)) for t in level], threads))
        for tid, loc, data, _ in fetched:
            try:
                tree = decode_tree_node(data)
            except DecodeError as exc:
                raise CorruptObjectError(f"tree {tid.hex()} is malformed: {exc}") from None
            tree_data[tid] = (loc, data)
            kids = children[tid] = []
            if isinstance(tree, TreeIndex):
                # A split directory's node: its chunks are trees to send too,
                # before it (docs/FORMAT.md, "Split trees").
                plan.split_trees = True
                for c in tree.children:
                    if wanted(c.id, tree_seen):
                        next_level.append(c.id)
                        tree_send.add(c.id)
                    if c.id in tree_send:
                        kids.append(c.id)
                continue
            for e in tree.entries:
                if e.is_dir:
                    if wanted(e.id, tree_seen):
                        next_level.append(e.id)
                        tree_send.add(e.id)
                    if e.id in tree_send:  # (perhaps reached by another path too)
                        kids.append(e.id)
                elif e.kind.is_file and wanted(e.id, manifest_seen):
                    manifests.append(e.id)
        take_manifests(manifests)
        progress(len(fetched) + len(manifests))
        level = next_level

    # Height of a tree: 0 without trees to send below it, else 1 + the
    # highest of those.  Sending by increasing height puts each tree after
    # every tree beneath it.
    height: dict[bytes, int] = {}
    for root in children:
        stack = [root]
        while stack:
            top = stack[-1]
            if top in height:
                stack.pop()
                continue
            pending = [k for k in children[top] if k not in height]
            if pending:
                stack.extend(pending)
                continue
            height[top] = 1 + max((height[k] for k in children[top]), default=-1)
            stack.pop()
    for tid in sorted(tree_data, key=lambda t: height[t]):
        loc, data = tree_data[tid]
        plan.trees.append((tid, loc, data))
    return plan


# --- sending -----------------------------------------------------------------------
def _whole_packs(src: Repository, chunks: list[tuple[bytes, Location]], threads: int) -> dict[bytes, int]:
    """Source packs worth copying whole: {pack id: size}."""
    needed: dict[bytes, int] = {}
    for _, loc in chunks:
        needed[loc.pack] = needed.get(loc.pack, 0) + loc.stored
    candidates = [pid for pid, nbytes in needed.items() if nbytes >= _WHOLE_PACK_MIN]
    with ThreadPoolExecutor(threads, thread_name_prefix="commitfs-sync-size") as pool:
        sizes = pool.map(lambda pid: src.store.lookup_size(pack_key(pid)), candidates)
        return {pid: size for pid, size in zip(candidates, sizes)
                if size is not None and needed[pid] >= _WHOLE_PACK_SHARE * size}


def _copy_pack(src: Repository, dst: Repository, pid: bytes, size: int) -> tuple[list, int] | None:
    """Copy one pack verbatim; (its index entries, bytes uploaded), or None
    if it is not a pack of chunks only, or fails its hash (the caller then
    re-packs its blobs one by one, verifying each)."""
    key = pack_key(pid)
    data = src.store.load_object(key)
    if len(data) != size or hash_bytes(data) != pid:
        return None
    try:
        entries = parse_pack_table(data)
    except ValueError:
        return None
    if any(loc.kind is not BlobKind.CHUNK for _, loc in entries):
        return None
    sent = 0
    dst.note_own_pack(pid)  # checked before refs move, as a concurrent gc may condemn it
    if dst.store.lookup_size(key) != size:  # else: copied by an interrupted run
        dst.store.save_object(key, data)
        sent = size
    return [(oid, Location(pid, loc.offset, loc.stored, loc.raw, loc.kind, loc.compression))
            for oid, loc in entries], sent


def _copy_whole_packs(src: Repository, dst: Repository, plan: _Plan, stats: SyncStats, batch_bytes: int,
                      threads: int, sent: Callable[[int, int], None]) -> None:
    """Copy the packs worth copying whole; drop their chunks from the plan.
    An index segment is written after every ``batch_bytes`` of packs."""
    packs = _whole_packs(src, plan.chunks, threads)
    if not packs:
        return
    needed: dict[bytes, list[int]] = {pid: [0, 0] for pid in packs}  # pack: [chunks, stored bytes]
    for _, loc in plan.chunks:
        if loc.pack in needed:
            needed[loc.pack][0] += 1
            needed[loc.pack][1] += loc.stored
    copied: set[bytes] = set()
    pending: list[tuple[bytes, Location]] = []
    pending_bytes = 0

    def index() -> None:
        nonlocal pending, pending_bytes
        if pending:
            dst.note_own_segment(dst.index.add_segment(pending))  # after the packs it names are stored
            stats.segments += 1
        pending, pending_bytes = [], 0

    with ThreadPoolExecutor(_WHOLE_PACK_THREADS, thread_name_prefix="commitfs-sync-pack") as pool:
        futures = [(pid, pool.submit(_copy_pack, src, dst, pid, size)) for pid, size in packs.items()]
        try:
            for pid, fut in futures:
                done = fut.result()
                if done is None:
                    continue
                entries, nbytes = done
                copied.add(pid)
                pending.extend(entries)
                pending_bytes += packs[pid]
                stats.packs += 1
                stats.packs_copied += 1
                stats.bytes_sent += nbytes
                stats.chunks += needed[pid][0]
                sent(*needed[pid])
                if pending_bytes >= batch_bytes:
                    index()
            index()
        except BaseException:
            for _, f in futures:
                f.cancel()
            raise
    plan.chunks = [(oid, loc) for oid, loc in plan.chunks if loc.pack not in copied]


class _BatchWriter:
    """BlobWriters one after another, each finished (one index segment)
    after ``batch_bytes`` new stored bytes."""

    def __init__(self, dst: Repository, stats: SyncStats, batch_bytes: int):
        self.dst = dst
        self.stats = stats
        self.batch_bytes = batch_bytes
        self.writer: BlobWriter | None = None

    def add(self, oid: bytes, kind: BlobKind, data: bytes, stored: tuple | None = None) -> None:
        """``stored``: (bytes, compression) as the source stored them, to
        store them alike without compressing again."""
        if self.writer is None:
            self.writer = self.dst.writer()
        if stored is None:
            self.writer.add(oid, kind, data)
        else:
            self.writer.add(oid, kind, data, stored=stored[0], compression=stored[1])
        if self.writer.stats.bytes_new_stored >= self.batch_bytes:
            self.flush()

    def flush(self) -> None:
        writer, self.writer = self.writer, None
        if writer is None:
            return
        if writer.finish():
            self.stats.segments += 1
        self.stats.packs += writer.stats.packs
        self.stats.bytes_sent += writer.stats.bytes_new_stored

    def abort(self) -> None:
        writer, self.writer = self.writer, None
        if writer is not None:
            writer.__exit__(*sys.exc_info())


def transfer(src: Repository, dst: Repository, tips: Iterable[bytes], *, threads: int = DEFAULT_THREADS,
             progress: ProgressFn | None = None, batch_bytes: int | None = None) -> SyncStats:
    """Make every commit reachable from ``tips`` complete in ``dst``; move no ref.

    ``batch_bytes``: new stored bytes per index segment (default BATCH_BYTES)."""
    tips = list(dict.fromkeys(tips))
    threads = max(1, threads)
    stats = SyncStats()
    prog = SyncProgress()

    def scanned(n: int) -> None:
        prog.objects_done += n
        if progress:
            progress(prog)

    plan = _plan(src, dst, tips, threads, scanned)
    prog = SyncProgress("send", 0, plan.blob_count + sum(map(len, plan.commits)), 0, plan.blob_bytes)
    if progress:
        progress(prog)

    def sent_many(objects: int, nbytes: int) -> None:
        prog.objects_done += objects
        prog.bytes_done += nbytes
        stats.bytes_read += nbytes
        if progress:
            progress(prog)

    def sent(loc: Location) -> None:
        sent_many(1, loc.stored)

    batch_bytes = batch_bytes or BATCH_BYTES
    if plan.split_trees:
        dst.upgrade_format()  # a version-1 destination says version 2 before it holds one
    # Chunks first (whole packs, then one by one), then what refers to them.
    _copy_whole_packs(src, dst, plan, stats, batch_bytes, threads, sent_many)
    out = _BatchWriter(dst, stats, batch_bytes)
    try:
        for oid, loc, data, stored in _iter_blobs(src, plan.chunks, threads):
            out.add(oid, BlobKind.CHUNK, data, (stored, loc.compression))
            sent(loc)
        stats.chunks += len(plan.chunks)
        for kind, items in ((BlobKind.MANIFEST, plan.manifests), (BlobKind.TREE, plan.trees)):
            for oid, loc, data in items:
                out.add(oid, kind, data)
                sent(loc)
        stats.manifests, stats.trees = len(plan.manifests), len(plan.trees)
        out.flush()
    except BaseException:
        out.abort()
        raise

    # Commit objects only now that every blob is indexed; parents first.
    with ThreadPoolExecutor(threads, thread_name_prefix="commitfs-sync-commit") as pool:
        for wave in plan.commits:
            for _ in pool.map(lambda item: dst.store.save_object(commit_key(item[0]), item[1]), wave):
                prog.objects_done += 1
                stats.commits += 1
                if progress:
                    progress(prog)
    return stats


# --- history -----------------------------------------------------------------------
def is_ancestor(repo: Repository, ancestor: bytes, descendant: bytes) -> bool:
    """Whether ``ancestor`` is ``descendant`` or reachable from it by parents."""
    seen = {descendant}
    stack = [descendant]
    while stack:
        cid = stack.pop()
        if cid == ancestor:
            return True
        for p in repo.load_commit(cid).parents:
            if p not in seen:
                seen.add(p)
                stack.append(p)
    return False


def _short(cid: bytes | None) -> str:
    return cid.hex()[:12] if cid else "nothing"


def _move_branch(repo: Repository, name: str, new: bytes, old: bytes | None, conflict: str) -> None:
    try:
        repo.refs.set_branch_if_equals(name, new, old)
    except RefConflictError:
        now = repo.refs.lookup_branch(name)
        if now == new:
            return  # someone moved it exactly where we wanted
        raise RefConflictError(conflict.format(now=_short(now))) from None


# --- verbs -------------------------------------------------------------------------
def push(local: Repository, remote: Repository, branch: str = "main", *, remote_branch: str | None = None,
         force: bool = False, tags: bool = False, threads: int = DEFAULT_THREADS,
         progress: ProgressFn | None = None) -> SyncResult:
    """Send ``branch`` (and with ``tags`` every tag) and what it needs to
    ``remote``; move the remote branch if it is an ancestor of ours (or ``force``)."""
    target = remote_branch or branch
    new = local.refs.lookup_branch(branch)
    if new is None:
        raise RevisionError(f"no branch {branch!r} in {local.url}")
    old = remote.refs.lookup_branch(target)
    send_tags: dict[str, bytes] = {}
    if tags:
        theirs = remote.refs.tags()
        for name, cid in sorted(local.refs.tags().items()):
            if name in theirs and theirs[name] != cid:
                raise RevisionError(f"tag {name} is {_short(theirs[name])} on the remote, {_short(cid)} here; "
                                    "tags never move")
            if name not in theirs:
                send_tags[name] = cid
    result = SyncResult()
    status = "created" if old is None else "fast-forward"
    if old == new:
        status = "up-to-date"
    elif old is not None and not (local.has_commit(old) and is_ancestor(local, old, new)):
        if not force:
            raise RefConflictError(f"remote branch {target} has commits you do not have: pull first, or --force")
        status = "forced"
    aliases = _alias_plan(local, remote)
    result.stats = transfer(local, remote, [new, *send_tags.values(), *(a[1].commit for a in aliases)],
                            threads=threads, progress=progress)
    if status != "up-to-date":
        _move_branch(remote, target, new, old,
                     f"remote branch {target} moved to {{now}} while pushing; the data sent is kept there: "
                     "pull, then push again")
    result.updates.append(RefUpdate(target, old, new, status))
    for name, cid in send_tags.items():
        remote.refs.create_tag(name, cid)
        result.updates.append(RefUpdate(name, None, cid, "created", "tag"))
    result.updates.extend(_apply_aliases(local, remote, aliases))
    return result


def pull(local: Repository, remote: Repository, branch: str = "main", *, local_branch: str | None = None,
         force: bool = False, threads: int = DEFAULT_THREADS, progress: ProgressFn | None = None,
         merge: bool = False, merge_options=None) -> SyncResult:
    """Fetch ``branch`` from ``remote`` and fast-forward the local branch to it
    (refuse if the local branch has diverged, unless ``force``, or ``merge``: then
    the remote's commit is merged into the local branch, ops/merge.py; a merge
    with conflicts raises ConflictError and moves nothing, the fetched objects
    stay)."""
    target = local_branch or branch
    new = remote.refs.lookup_branch(branch)
    if new is None:
        raise RevisionError(f"no branch {branch!r} in {remote.url}")
    return _fetch_branches(local, remote, {target: new}, force=force, threads=threads, progress=progress,
                           remote_name=f"{remote.url} {branch}", merge=merge, merge_options=merge_options)


def open_clone_destination(dest: str, source_url: str, endpoint_url: str | None = None, *,
                           shown: str | None = None, **store_options) -> Repository:
    """The repository a clone of ``source_url`` writes into: a new one at
    ``dest`` (absent or an empty directory), or the one a clone of the same
    source left when it was interrupted, whatever the point it was killed at.

    A new clone records its origin *before* it writes the config, so every
    kill point leaves something this recognises: nothing yet; an origin
    naming the source and no config (perhaps a ``.tmp-*`` config being
    written: removed), where the config is written now; or a repository whose
    origin names the source, which the transfer resumes.  A repository that
    is not a clone of this source (``commitfs init``, another clone) or a
    directory holding anything else is an InputError; ``shown`` names ``dest``."""
    shown = shown or dest
    try:
        local = Repository.open(dest, **store_options)
    except RepositoryNotFoundError:
        local = None
    if local is not None:
        origin = Remotes(local.store).lookup(DEFAULT_REMOTE)
        if origin is None or origin.url != source_url:
            local.close()
            raise InputError(f"{shown} is already a commitfs repository (not a clone of {source_url})")
        return local
    store = open_store(dest, **store_options)
    try:
        origin = Remotes(store).lookup(DEFAULT_REMOTE)
        resuming = origin is not None and origin.url == source_url
        leftovers = []
        if "://" not in dest and os.path.exists(dest):
            if not os.path.isdir(dest):
                raise InputError(f"{shown} exists and is not an empty directory")
            names = os.listdir(dest)
            leftovers = [n for n in names if n.startswith(".tmp-")]
            # refs/ with no ref in it (its .lock, a .tmp- record) is what a clone
            # killed while recording its origin leaves: the record is made again.
            refs_ok = resuming or not any(True for _ in store.iter_keys("refs/"))
            if any(n not in leftovers and not (refs_ok and n == "refs") for n in names):
                raise InputError(f"{shown} exists and is not an empty directory")
        for n in leftovers:  # a config being written when the clone was killed
            try:
                os.unlink(os.path.join(dest, n))
            except OSError as exc:
                raise InputError(f"cannot remove {os.path.join(shown, n)}: {exc.strerror}") from None
        if not resuming:
            Remotes(store).add(DEFAULT_REMOTE, source_url, endpoint_url)
    finally:
        store.close()
    return Repository.init(dest, **store_options)


def clone(local: Repository, remote: Repository, *, threads: int = DEFAULT_THREADS,
          progress: ProgressFn | None = None) -> SyncResult:
    """Copy every branch and tag of ``remote`` into ``local`` (fresh, or a
    clone of the same remote that was interrupted: it resumes)."""
    branches = remote.refs.branches()
    tags = remote.refs.tags()
    result = _fetch_branches(local, remote, branches, force=False, threads=threads, progress=progress,
                             remote_name=remote.url, extra_tips=list(tags.values()))
    have = local.refs.tags()
    for name, cid in sorted(tags.items()):
        if have.get(name) == cid:
            result.updates.append(RefUpdate(name, cid, cid, "up-to-date", "tag"))
            continue
        local.refs.create_tag(name, cid)  # an existing, different tag: RevisionError
        result.updates.append(RefUpdate(name, None, cid, "created", "tag"))
    return result


def _fetch_branches(local: Repository, remote: Repository, wanted: dict[str, bytes], *, force: bool,
                    threads: int, progress: ProgressFn | None, remote_name: str,
                    extra_tips: list[bytes] = (), merge: bool = False, merge_options=None) -> SyncResult:
    result = SyncResult()
    olds = {name: local.refs.lookup_branch(name) for name in wanted}
    aliases = _alias_plan(remote, local)
    result.stats = transfer(remote, local, [*wanted.values(), *extra_tips, *(a[1].commit for a in aliases)],
                            threads=threads, progress=progress)
    for name, new in sorted(wanted.items()):
        old = olds[name]
        if old == new:
            result.updates.append(RefUpdate(name, old, new, "up-to-date"))
            continue
        if old is None:
            status = "created"
        elif is_ancestor(local, old, new):
            status = "fast-forward"
        elif is_ancestor(local, new, old):
            result.updates.append(RefUpdate(name, old, old, "ahead"))
            continue
        elif force:
            status = "forced"
        elif merge:
            result.updates.append(_merge_pulled(local, name, new, remote_name, merge_options))
            continue
        else:
            raise RefConflictError(
                f"local branch {name} has diverged from {remote_name} ({_short(old)} vs {_short(new)}); "
                "pull does not merge unless asked: pull --merge to merge them, pull --force to reset it to the "
                "remote's, or push --force to "
                "overwrite the remote's"
            )
        _move_branch(local, name, new, old,
                     f"local branch {name} moved to {{now}} while pulling; run the pull again")
        result.updates.append(RefUpdate(name, old, new, status))
    result.updates.extend(_apply_aliases(remote, local, aliases))
    return result


def _merge_pulled(local: Repository, name: str, new: bytes, remote_name: str, options) -> RefUpdate:
    from commitfs.errors import ConflictError
    from commitfs.ops.merge import merge_into

    result = merge_into(local, new.hex(), name, message=f"merge {remote_name} into {name}", options=options)
    if result.status == "conflicts":
        paths = [c.path for c in result.conflicts]
        raise ConflictError(
            f"merging {remote_name} ({_short(new)}) into local branch {name}: {len(paths)} conflict"
            f"{'s' if len(paths) != 1 else ''} ({', '.join(paths[:5])}{' ...' if len(paths) > 5 else ''}); "
            f"nothing was changed (the remote's commits are fetched: commitfs merge {new.hex()[:12]} --into {name})",
            paths, result.conflicts)
    return RefUpdate(name, result.head, result.commit_id, "merged")


# --- aliases ---------------------------------------------------------------------------
def _log_contains(repo: Repository, head: bytes, eid: bytes) -> bool:
    return any(e == eid for e, _ in repo.aliases.iter_log(head))


def _alias_plan(src: Repository, dst: Repository) -> list[tuple[str, AliasState, bytes | None, AliasState | None, str]]:
    """(name, source state, destination raw value, destination state, status) of every source alias."""
    plan = []
    for name, state in sorted(src.aliases.states().items()):
        raw = dst.aliases.lookup_raw(name)
        theirs = AliasState.decode(name, raw) if raw is not None else None
        if theirs is None:
            status = "created"
        elif raw == state.encode():
            status = "up-to-date"
        elif _log_contains(src, state.log, theirs.log):
            status = "fast-forward"
        elif _log_contains(dst, theirs.log, state.log):
            status = "ahead"
        else:
            status = "diverged"
        plan.append((name, state, raw, theirs, status))
    return plan


def _apply_aliases(src: Repository, dst: Repository, plan) -> list[RefUpdate]:
    """Copy the log entries the destination lacks, then move its alias references."""
    updates = []
    for name, state, raw, theirs, status in plan:
        old = theirs.commit if theirs is not None else None
        if status in ("created", "fast-forward"):
            missing = []
            for eid, _entry in src.aliases.iter_log(state.log):
                if dst.aliases.has_entry(eid):
                    break
                missing.append(eid)
            for eid in reversed(missing):  # oldest first
                dst.aliases.save_entry_bytes(eid, src.aliases.load_entry_bytes(eid))
            try:
                dst.aliases.swap(name, state, raw)
            except RefConflictError:
                raise RefConflictError(f"alias {name} moved in {dst.url} while syncing; the log entries sent are "
                                       "kept there: run it again") from None
        updates.append(RefUpdate(name, old if status != "created" else None, state.commit if status != "ahead"
                                 else (old or state.commit), status, "alias"))
    return updates
