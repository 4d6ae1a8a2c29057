"""Garbage collection: free what nothing reaches, while others keep committing.

docs/FORMAT.md ("Garbage collection") is the normative protocol; this is the
collector's side of it.  One run, holding the gc lease (repo/gcstate.py):

1. **Finish** the records earlier runs left (a run that was killed): each is
   swept as in step 4 once its grace period is over.
2. **Mark.**  Everything reachable from every ref under ``refs/`` (whatever
   the namespace: branches, tags, aliases; the first line of a ref is its
   commit id), from every commit object and every pack written within the
   grace period (so the work of a writer that has not moved its branch yet is
   kept, as git keeps "unreachable but recent" objects), and from commit
   metadata values under ``commitfs.object.*`` (file manifests a commit keeps
   alive).  Marking reads commits, trees and file manifests only (never file
   contents) and skips a subtree already marked by id.
3. **Condemn.**  Packs with no live blob are condemned; packs whose live share
   is below ``repack_below`` have their live blobs copied into new packs, then
   are condemned too; unreachable commit objects older than the grace period
   are condemned.  The collector stores the new packs, publishes a record
   naming what it condemns (``gc/records/``), looks once more at refs and
   commits that appeared meanwhile, writes one index segment holding every
   live blob (the repacked ones at their new places), publishes the completed
   record, and only then removes the index segments it replaced.  From then on
   writers deduplicate neither against condemned packs nor against dead blobs.
4. **Sweep**, after the grace period: mark again, from refs, from every
   commit that is not condemned and from every indexed blob outside the
   condemned packs.  A condemned pack still holding a blob that this second
   mark needs (a writer resurrected it) is spared, and the blob indexed
   again; every other condemned pack and commit is deleted, then the record.

Killed at any point, a run leaves a valid repository (at most unreferenced
new packs, which a later run removes once they are older than the grace
period), and a re-run finishes the job (step 1).
"""

from __future__ import annotations

import json
import os
import signal
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

from commitfs.errors import CommitfsError, CorruptObjectError, GcStoppedError, InputError, ObjectNotFoundError
from commitfs.model.ids import HEX_SIZE, is_hex
from commitfs.model.objects import DecodeError, FileManifest
from commitfs.model.splittree import decode_tree_node, node_children
from commitfs.repo.gcstate import LEASE_REF, Lease, Record, new_record_key
from commitfs.repo.index import INDEX_PREFIX, Index, encode_segment, segment_key
from commitfs.repo.pack import (
    TARGET_PACK_SIZE,
    BlobKind,
    Compression,
    Location,
    PackBuilder,
    delta_base_of,
    load_pack_table,
    pack_key,
    verify_blob,
)
from commitfs.repo.repository import COMMITS_PREFIX, Repository, commit_key

#: Default grace period: longer than any plausible pause of a writer between
#: its last check and its branch move, and than one commit's upload.
DEFAULT_GRACE = 3600.0
#: Below this, a grace period is refused unless forced (tests use a few tenths
#: of a second with --force): a writer between its check and its branch move,
#: or uploading one commit's packs, must fit inside it.
MIN_GRACE = 600.0
DEFAULT_REPACK_BELOW = 0.5
#: How long a killed gc keeps others out.  COMMITFS_GC_LEASE_SECONDS shortens
#: it, for tests only (a test that kills gc re-runs it at once).
DEFAULT_LEASE_TTL = 120.0
OBJECT_META_PREFIX = "commitfs.object."


#: Tests only: the process SIGKILLs itself when it reaches the step of this
#: name (``_step`` calls below), so that every crash window is exercised.
KILL_AT_ENV = "COMMITFS_GC_TEST_KILL_AT"


def _step(name: str) -> None:
    if os.environ.get(KILL_AT_ENV) == name:
        os.kill(os.getpid(), signal.SIGKILL)


def lease_ttl() -> float:
    raw = os.environ.get("COMMITFS_GC_LEASE_SECONDS")
    try:
        return max(0.5, float(raw)) if raw else DEFAULT_LEASE_TTL
    except ValueError:
        return DEFAULT_LEASE_TTL


def parse_duration(text: str) -> float:
    """Seconds from ``90``, ``90s``, ``15m``, ``2h``, ``1d``, ``0.5s``."""
    units = {"s": 1, "m": 60, "h": 3600, "d": 86400}
    t = text.strip().lower()
    mult = 1
    if t and t[-1] in units:
        mult, t = units[t[-1]], t[:-1]
    try:
        value = float(t) * mult
    except ValueError:
        raise InputError(f"bad duration {text!r} (use e.g. 30s, 15m, 2h, 1d)") from None
    if value < 0 or value != value:
        raise InputError(f"bad duration {text!r}")
    return value


@dataclass
class PackPlan:
    pack: bytes
    size: int
    live: int  # stored bytes of live blobs
    action: str  # "delete", "repack", "keep"
    why: str = ""

    @property
    def dead(self) -> int:
        return max(0, self.size - self.live)

    def to_json(self) -> dict:
        return {"pack": self.pack.hex(), "size": self.size, "live_bytes": self.live, "dead_bytes": self.dead,
                "action": self.action, "why": self.why}


@dataclass
class GcReport:
    dry_run: bool = False
    grace: float = DEFAULT_GRACE
    bytes_before: int = 0
    bytes_after: int = 0
    packs_before: int = 0
    packs_after: int = 0
    packs_deleted: int = 0
    packs_written: int = 0
    packs_repacked: int = 0
    packs_spared: int = 0
    segments_deleted: int = 0
    segments_written: int = 0
    commits_deleted: int = 0
    bytes_copied: int = 0
    dead_bytes: int = 0  # dead bytes found by the mark (the dry run's promise)
    seconds: float = 0.0
    records_finished: int = 0
    plan: list[PackPlan] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    @property
    def bytes_freed(self) -> int:
        return self.bytes_before - self.bytes_after

    def to_json(self) -> dict:
        return {"dry_run": self.dry_run, "grace_seconds": self.grace, "bytes_before": self.bytes_before,
                "bytes_after": self.bytes_after, "bytes_freed": self.bytes_freed, "dead_bytes": self.dead_bytes,
                "packs_before": self.packs_before, "packs_after": self.packs_after,
                "packs_deleted": self.packs_deleted, "packs_written": self.packs_written,
                "packs_repacked": self.packs_repacked, "packs_spared": self.packs_spared,
                "segments_deleted": self.segments_deleted, "segments_written": self.segments_written,
                "commits_deleted": self.commits_deleted, "bytes_copied": self.bytes_copied,
                "records_finished": self.records_finished, "seconds": round(self.seconds, 3),
                "packs": [p.to_json() for p in self.plan if p.action != "keep"], "notes": self.notes}


def _stored_bytes(repo: Repository) -> tuple[int, int]:
    """(bytes under packs/, index/ and commits/, number of packs)."""
    total = packs = 0
    for prefix in ("packs/", INDEX_PREFIX, COMMITS_PREFIX):
        for _key, size, _mtime in repo.store.iter_objects(prefix):
            total += size
            packs += prefix == "packs/"
    return total, packs


def ref_roots(repo: Repository) -> list[tuple[str, bytes]]:
    """(ref name, commit id) of every ref that names a commit, whatever its namespace.

    The first line of a ref's value is its commit id.  Refs that hold other
    things are known: the gc lease, and remotes (``remotes/<name>``, a JSON
    object).  Any other ref that does not parse stops gc: it cannot tell what
    that ref keeps alive."""
    out = []
    for name, value in repo.store.iter_refs(""):
        if name == LEASE_REF or name.startswith("gc/"):
            continue
        first = value.split(b"\n", 1)[0].strip()
        text = first.decode("ascii", "replace").lower()
        if len(text) == HEX_SIZE and is_hex(text):
            out.append((name, bytes.fromhex(text)))
            continue
        if name.startswith("remotes/"):
            try:
                if isinstance(json.loads(value), dict):
                    continue  # a remote's configuration, not a commit
            except ValueError:
                pass
        raise GcStoppedError(f"ref {name!r} does not parse (its first line is not a commit id): gc cannot tell "
                        "what it keeps alive; fix or delete it, then run gc again")
    return out


class _Marker:
    """Reachability through commits, trees and manifests (never chunk contents).

    ``lookup`` answers from the collector's snapshot; a blob it lacks is looked
    up in the index as listed now (a writer indexed it since: what it reaches
    must be marked too)."""

    def __init__(self, repo: Repository, lookup: Callable[[bytes], Location | None],
                 read: Callable[[bytes, Location], bytes] | None = None):
        self.repo = repo
        self._snapshot_lookup = lookup
        self._current: Index | None = None
        self.live: set[bytes] = set()
        self.commits: set[bytes] = set()
        if read is not None:
            self._read = read  # type: ignore[method-assign]

    def lookup(self, oid: bytes) -> Location | None:
        loc = self._snapshot_lookup(oid)
        if loc is None:
            if self._current is None:
                self._current = Index(self.repo.store)
            loc = self._current.lookup(oid, strict=False)
        return loc

    def _read(self, oid: bytes, loc: Location, base=None) -> bytes:
        stored = self.repo.store.load_range(pack_key(loc.pack), loc.offset, loc.stored)
        return verify_blob(oid, loc, stored, base)

    def _base_reader(self, todo: list[bytes]):
        """verify_blob's ``base`` for a tree stored as a delta: the base is read, and
        marked like a subtree (docs/FORMAT.md, "Tree deltas"): a tree in the index
        always has its whole subtree there, so a base kept for its bytes keeps
        what it names too."""
        def base(bid: bytes) -> bytes:
            bloc = self.lookup(bid)
            if bloc is None:
                raise ObjectNotFoundError(f"object {bid.hex()} is in no index segment")
            if bloc.kind is not BlobKind.TREE:
                raise CorruptObjectError(f"the delta base {bid.hex()} is not a tree")
            if bid not in self.live:
                todo.append(bid)
            return self._read(bid, bloc)
        return base

    def mark(self, commits: Iterable[bytes] = (), blobs: Iterable[bytes] = (), strict: bool = True) -> None:
        stack = list(commits)
        todo = list(blobs)
        while stack:
            cid = stack.pop()
            if cid in self.commits:
                continue
            try:
                commit = self.repo.load_commit(cid)
            except CommitfsError as exc:
                if not strict:
                    continue
                raise GcStoppedError(f"gc stopped, nothing deleted: {exc} (run commitfs fsck)") from None
            self.commits.add(cid)
            todo.append(commit.tree)
            for key, value in commit.metadata.items():
                if key.startswith(OBJECT_META_PREFIX) and len(value) == HEX_SIZE and is_hex(value):
                    todo.append(bytes.fromhex(value.lower()))
            stack.extend(commit.parents)
        live = self.live
        while todo:
            oid = todo.pop()
            if oid in live:
                continue
            loc = self.lookup(oid)
            if loc is None:
                if not strict:
                    continue
                raise GcStoppedError(f"gc stopped, nothing deleted: object {oid.hex()} is reachable but in no index "
                                "segment (run commitfs fsck)")
            live.add(oid)
            if loc.kind is BlobKind.CHUNK:
                continue
            try:
                if loc.compression is Compression.DELTA:
                    data = self._read(oid, loc, self._base_reader(todo))
                else:
                    data = self._read(oid, loc)
                if loc.kind is BlobKind.TREE:
                    # A directory's entries, or a split directory's chunks
                    # (docs/FORMAT.md, "Split trees"): marked like subtrees.
                    todo.extend(k for k in node_children(decode_tree_node(data)) if k not in live)
                else:
                    live.update(FileManifest.decode(data).chunk_ids)
            except (CommitfsError, DecodeError) as exc:
                if not strict:
                    continue
                raise GcStoppedError(f"gc stopped, nothing deleted: object {oid.hex()} cannot be read ({exc}); "
                                "run commitfs fsck") from None


#: Metadata packs up to this size are read whole, once per run, rather than
#: one ranged read per tree or manifest (on S3 a request each)...
_WHOLE_PACK_READ = 8 * 1024 * 1024
#: ...and kept, up to this many bytes in all.
_PACK_CACHE_BYTES = 64 * 1024 * 1024


class _MetadataReader:
    """Trees and manifests for the marks of one run: small packs read whole
    and kept, decoded children remembered (the sweep marks again)."""

    def __init__(self, store):
        self.store = store
        self.sizes: dict[bytes, int] = {}
        self._packs: dict[bytes, bytes] = {}
        self._held = 0

    def note_sizes(self, sizes: dict[bytes, int]) -> None:
        self.sizes.update(sizes)

    def __call__(self, oid: bytes, loc: Location, base=None) -> bytes:
        data = self._packs.get(loc.pack)
        if data is None:
            size = self.sizes.get(loc.pack)
            if size is not None and size <= _WHOLE_PACK_READ:
                data = self.store.load_object(pack_key(loc.pack))
                while self._packs and self._held + len(data) > _PACK_CACHE_BYTES:
                    self._held -= len(self._packs.pop(next(iter(self._packs))))
                self._packs[loc.pack] = data
                self._held += len(data)
        if data is not None:
            stored = data[loc.offset:loc.offset + loc.stored]
        else:
            stored = self.store.load_range(pack_key(loc.pack), loc.offset, loc.stored)
        return verify_blob(oid, loc, stored, base)


class Collector:
    def __init__(self, repo: Repository, *, grace: float, repack_below: float, dry_run: bool,
                 progress: Callable[[str], None] | None = None, wait: bool = True,
                 lease: Lease | None = None):
        self.repo = repo
        self.store = repo.store
        self.grace = grace
        self.repack_below = repack_below
        self.dry_run = dry_run
        self.progress = progress or (lambda msg: None)
        self.wait = wait
        self.lease = lease
        self.report = GcReport(dry_run=dry_run, grace=grace)
        self.reader = _MetadataReader(self.store)

    # --- the run ----------------------------------------------------------------------
    def run(self) -> GcReport:
        start = time.monotonic()
        self.report.bytes_before, self.report.packs_before = _stored_bytes(self.repo)
        if not self.dry_run:
            for rec in self.repo.gc.records():
                self.progress(f"finishing an earlier gc run ({rec.key})")
                self.sweep(rec)
                self.report.records_finished += 1
        rec = self.condemn()
        if rec is not None and self.wait:
            self.sweep(rec)
        elif rec is not None:
            self.report.notes.append(f"condemned; the next gc run after {time.ctime(rec.due)} deletes")
        self.report.bytes_after, self.report.packs_after = _stored_bytes(self.repo)
        if self.dry_run:
            self.report.bytes_after = self.report.bytes_before - sum(
                p.size if p.action == "delete" else p.dead for p in self.report.plan if p.action != "keep")
            self.report.packs_after = self.report.packs_before - self.report.packs_deleted
        self.report.seconds = time.monotonic() - start
        return self.report

    def _check_lease(self) -> None:
        if self.lease is not None:
            self.lease.check()

    def _wait_until(self, due: float) -> None:
        while True:
            left = due - time.time()
            if left <= 0:
                return
            self._check_lease()
            time.sleep(min(left, 1.0))

    # --- snapshot -----------------------------------------------------------------------
    def _snapshot(self):
        """(segments, {oid: [locations]}, {pack: [(oid, loc)]}) of the index as listed now."""
        for _ in range(5):
            index = Index(self.store)
            segs = index.segments()
            by_oid: dict[bytes, list[Location]] = {}
            by_pack: dict[bytes, list[tuple[bytes, Location]]] = {}
            try:
                for seg in segs:
                    for oid, loc in seg.iter_entries():
                        by_oid.setdefault(oid, []).append(loc)
                        by_pack.setdefault(loc.pack, []).append((oid, loc))
            except ObjectNotFoundError:
                continue  # a writer merged segments under us: list again
            except CorruptObjectError as exc:
                raise GcStoppedError(f"gc stopped, nothing deleted: {exc}; run commitfs fsck --repair first") from None
            return segs, by_oid, by_pack
        raise GcStoppedError("gc stopped, nothing deleted: the index kept changing while being read; run gc again")

    # --- condemn ------------------------------------------------------------------------
    def condemn(self) -> Record | None:
        # The index first: a segment listed implies its packs exist by the time
        # packs are listed, so a blob of the snapshot in an unknown pack is damage.
        segs, by_oid, by_pack = self._snapshot()
        now = time.time()
        young = now - self.grace
        self.progress("listing packs, commits and refs")
        packs: dict[bytes, tuple[int, float | None]] = {}
        for key, size, mtime in self.store.iter_objects("packs/"):
            name = key.rsplit("/", 1)[-1]
            if len(name) == HEX_SIZE and is_hex(name):
                packs[bytes.fromhex(name)] = (size, mtime)
        commits: dict[bytes, float | None] = {}
        for key, _size, mtime in self.store.iter_objects(COMMITS_PREFIX):
            name = key[len(COMMITS_PREFIX):]
            if len(name) == HEX_SIZE and is_hex(name):
                commits[bytes.fromhex(name)] = mtime
        roots = ref_roots(self.repo)

        def is_young(mtime: float | None) -> bool:
            return mtime is None or mtime > young

        def lookup(oid: bytes) -> Location | None:
            locs = by_oid.get(oid)
            if not locs:
                return None
            for loc in locs:
                if loc.pack in packs:
                    return loc
            return locs[0]

        self.reader.note_sizes({p: size for p, (size, _m) in packs.items()})
        young_packs = {p for p, (_s, m) in packs.items() if is_young(m)}
        young_blobs = [oid for p in young_packs for oid, _ in by_pack.get(p, ())]
        young_commits = [c for c, m in commits.items() if is_young(m)]
        self.progress(f"marking from {len(roots)} refs")
        marker = _Marker(self.repo, lookup, self.reader)
        marker.mark([c for _, c in roots])  # damage here stops gc
        marker.mark(young_commits, young_blobs, strict=False)  # work in progress may be incomplete
        live = marker.live

        # Plan each pack.
        plans: dict[bytes, PackPlan] = {}
        for pid, (size, _mtime) in packs.items():
            entries = by_pack.get(pid, ())
            live_bytes = sum(loc.stored for oid, loc in entries if oid in live)
            if pid in young_packs:
                plans[pid] = PackPlan(pid, size, live_bytes, "keep", "written within the grace period")
            elif not entries:
                plans[pid] = PackPlan(pid, size, 0, "delete", "not indexed (an interrupted write)")
            elif live_bytes == 0:
                plans[pid] = PackPlan(pid, size, 0, "delete", "no live blob")
            elif live_bytes < self.repack_below * size:
                plans[pid] = PackPlan(pid, size, live_bytes, "repack",
                                      f"{live_bytes / size:.0%} live, below {self.repack_below:.0%}")
            else:
                plans[pid] = PackPlan(pid, size, live_bytes, "keep", f"{live_bytes / max(size, 1):.0%} live")
        condemned = {p for p, plan in plans.items() if plan.action != "keep"}
        dead_commits = {c for c, m in commits.items() if c not in marker.commits and not is_young(m)}
        self.report.plan = sorted(plans.values(), key=lambda p: (p.action, p.pack))
        self.report.dead_bytes = sum(p.dead for p in plans.values())
        if self.dry_run:
            self.report.packs_deleted = sum(1 for p in plans.values() if p.action != "keep")
        self.report.packs_repacked = sum(1 for p in plans.values() if p.action == "repack")
        dead_entries = sum(1 for oid in by_oid if oid not in live)
        stale_segments = dead_entries > 0 or any(len(v) > 1 for v in by_oid.values())
        if self.dry_run or (not condemned and not dead_commits and not stale_segments):
            return None

        # Copy the live blobs of sparse packs (those with no live copy elsewhere).
        self._check_lease()
        kept = {p for p in packs if p not in condemned}
        new_entries: list[tuple[bytes, Location]] = []
        written: list[bytes] = []
        builders = {"data": PackBuilder(bytearray(1 << 20)), "meta": PackBuilder(bytearray(1 << 20))}

        def flush(name: str) -> None:
            b = builders[name]
            if not b.entries:
                return
            pid, view = b.finish()
            self.store.save_object(pack_key(pid), view)
            written.append(pid)
            for oid, kind, comp, off, stored, raw in b.entries:
                new_entries.append((oid, Location(pid, off, stored, raw, BlobKind(kind), comp)))
            builders[name] = PackBuilder(bytearray(1 << 20))

        copied: set[bytes] = set()
        base = delta_base_of(lookup, lambda oid, loc: self.store.load_range(pack_key(loc.pack), loc.offset,
                                                                             loc.stored))
        for pid in sorted(p for p, plan in plans.items() if plan.action == "repack"):
            todo = [(oid, loc) for oid, loc in by_pack[pid] if oid in live and oid not in copied
                    and not any(other.pack in kept for other in by_oid[oid])]
            if not todo:
                continue
            self.progress(f"repacking {pid.hex()[:12]}")
            data = self.store.load_object(pack_key(pid))  # one GET: at most 2x the live bytes
            for oid, loc in todo:
                stored = data[loc.offset:loc.offset + loc.stored]
                verify_blob(oid, loc, stored, base)  # never copy bytes that do not match their id
                name = "data" if loc.kind is BlobKind.CHUNK else "meta"
                builders[name].add(oid, loc.kind, stored, loc.compression, loc.raw)
                copied.add(oid)
                self.report.bytes_copied += loc.stored
                if len(builders[name]) >= TARGET_PACK_SIZE:
                    flush(name)
        flush("data")
        flush("meta")
        self.report.packs_written = len(written)
        _step("repacked")

        # Publish the condemnation (not yet complete: no index written).
        self._check_lease()
        rec = Record(new_record_key(), time.time(), self.grace, self.lease.owner if self.lease else "",
                     condemned, dead_commits, [s.key for s in segs], [], written)
        self.store.save_object(rec.key, rec.encode())
        _step("recorded")

        # Catch up with refs and commits that appeared since the listing: what
        # they reach stays in the index.
        new_commits = [c for c in self.repo.iter_commit_ids() if c not in commits]
        marker.mark([c for _, c in ref_roots(self.repo)] + new_commits, strict=False)
        resurrected = dead_commits & marker.commits
        if resurrected:
            rec.commits = dead_commits - resurrected

        # The new index: live blobs at a kept place first, then the copies.
        entries: list[tuple[bytes, Location]] = []
        for oid, locs in by_oid.items():
            if oid in live:
                for loc in locs:
                    if loc.pack not in condemned or loc.pack not in packs:
                        entries.append((oid, loc))
                        break
                else:
                    if oid not in copied:  # live in a condemned pack only: the sweep decides
                        entries.append((oid, locs[0]))
        entries.extend(new_entries)
        written_segments = []
        if entries:
            data = encode_segment(entries)
            key = segment_key(data)
            self.store.save_object(key, data)
            written_segments.append(key)
        _step("indexed")
        dropped_from = {loc.pack for oid, locs in by_oid.items() if oid not in live for loc in locs
                        if loc.pack in packs and loc.pack not in condemned}
        complete = Record(new_record_key(), rec.time, rec.grace, rec.owner, rec.packs, rec.commits,
                          [s.key for s in segs if s.key not in written_segments], written_segments, written,
                          complete=True, dropped_from=dropped_from)
        self.store.save_object(complete.key, complete.encode())
        _step("completed")
        self.store.remove_object(rec.key)
        self.report.segments_written += len(written_segments)
        self._check_lease()
        for key in complete.removed_segments:
            self.store.remove_object(key)
            self.report.segments_deleted += 1
            _step("segment-removed")
        self.repo.index.refresh()
        self.repo.index.forget_answers()
        self.repo.gc.records()
        return complete

    # --- sweep --------------------------------------------------------------------------
    def sweep(self, rec: Record) -> None:
        if not rec.complete:
            # Killed before its index was written: nothing was removed; drop it.
            self.store.remove_object(rec.key)
            self.repo.gc.records()
            return
        if self.wait:
            self.progress(f"waiting {max(0.0, rec.due - time.time()):.1f}s (the grace period)")
            self._wait_until(rec.due)
        elif rec.due > time.time():
            self.report.notes.append(f"{rec.key}: grace period not over, left for a later run")
            return
        self._check_lease()
        _step("sweep")
        # (A segment the record wrote may since have been merged by a writer: its
        # entries are then in the merged one.)
        listed = set(self.store.iter_keys(INDEX_PREFIX))
        for key in rec.removed_segments:
            if key in listed:
                self.store.remove_object(key)
                self.report.segments_deleted += 1
        # Tables of the condemned packs: where their blobs lie, for the mark.
        tables: dict[bytes, list[tuple[bytes, Location]]] = {}
        in_condemned: dict[bytes, Location] = {}
        # Condemned packs first: a blob also in a kept pack is then found there.
        for pid in [*sorted(rec.packs), *sorted(rec.dropped_from - rec.packs)]:
            try:
                table = load_pack_table(self.store, pid)
            except ObjectNotFoundError:
                continue  # deleted by an earlier, killed sweep
            except CorruptObjectError:
                table = []
            if pid in rec.packs:
                tables[pid] = table
            for oid, loc in table:
                in_condemned.setdefault(oid, loc)
        index = Index(self.store)
        outside: dict[bytes, Location] = {}
        roots: list[bytes] = []
        # Segments still naming condemned packs (a writer merged one of the
        # replaced segments before the lease): rewritten without them.
        touching: dict[str, list[tuple[bytes, Location]]] = {}
        for seg in index.segments():
            try:
                entries = list(seg.iter_entries())
            except (ObjectNotFoundError, CorruptObjectError) as exc:
                raise GcStoppedError(f"gc stopped before deleting: {exc}") from None
            if any(loc.pack in rec.packs for _, loc in entries):
                touching[seg.key] = entries
            for oid, loc in entries:
                if loc.pack not in rec.packs:
                    outside.setdefault(oid, loc)
                    roots.append(oid)

        def lookup(oid: bytes) -> Location | None:
            return outside.get(oid) or in_condemned.get(oid)

        commits = [c for c in self.repo.iter_commit_ids() if c not in rec.commits]
        if not self.reader.sizes:  # a record of an earlier run: sizes from one listing
            self.reader.note_sizes({bytes.fromhex(k.rsplit("/", 1)[-1]): size
                                    for k, size, _m in self.store.iter_objects("packs/")
                                    if is_hex(k.rsplit("/", 1)[-1]) and len(k.rsplit("/", 1)[-1]) == HEX_SIZE})
        marker = _Marker(self.repo, lookup, self.reader)
        marker.mark([c for _, c in ref_roots(self.repo)])
        # Unreferenced commits and indexed blobs may be a writer's work in
        # progress (or its abandoned attempt): what they reach is kept, but
        # what they lack is not damage.
        marker.mark(commits, roots, strict=False)
        spared: dict[bytes, list[tuple[bytes, Location]]] = {}  # pack: blobs indexed again
        for oid, loc in in_condemned.items():
            if oid in marker.live and oid not in outside:
                # Resurrected (a writer that did not check, say): indexed again,
                # and a condemned pack holding it is not deleted.
                spared.setdefault(loc.pack, []).append((oid, loc))
        spared_condemned = [p for p in spared if p in rec.packs]
        if spared_condemned:
            self.report.packs_spared += len(spared_condemned)
            self.report.notes.append(f"{len(spared_condemned)} condemned packs were spared: "
                                     "a writer needed them again")
        if len(spared) > len(spared_condemned):
            self.report.notes.append("blobs gc had dropped from the index were needed again: indexed again")
        doomed = {p for p in rec.packs if p not in spared and p in tables}
        rewrite = [e for es in spared.values() for e in es]
        rewrite += [(oid, loc) for entries in touching.values() for oid, loc in entries if loc.pack not in doomed]
        self._check_lease()
        if rewrite or touching:
            key = None
            if rewrite:
                data = encode_segment(rewrite)
                key = segment_key(data)
                self.store.save_object(key, data)  # before the segments it replaces go
                self.report.segments_written += 1
            for old_key in touching:
                if old_key != key:
                    self.store.remove_object(old_key)
                    self.report.segments_deleted += 1
        _step("sweep-indexed")
        self._check_lease()
        for pid in sorted(doomed):
            self.store.remove_object(pack_key(pid))
            self.report.packs_deleted += 1
            _step("pack-deleted")
        for cid in rec.commits:
            if cid not in marker.commits:
                self.store.remove_object(commit_key(cid))
                self.report.commits_deleted += 1
        _step("commits-deleted")
        self.store.remove_object(rec.key)
        self.repo.index.refresh()
        self.repo.index.forget_answers()
        self.repo.gc.records()


def collect(repo: Repository, *, grace: float = DEFAULT_GRACE, repack_below: float = DEFAULT_REPACK_BELOW,
            dry_run: bool = False, force: bool = False, wait: bool = True,
            progress: Callable[[str], None] | None = None) -> GcReport:
    """Run gc on ``repo`` (see the module docstring); returns what it did."""
    if grace < MIN_GRACE and not force:
        raise InputError(
            f"a grace period of {grace:g}s is shorter than the safe minimum of {MIN_GRACE:g}s: writers that "
            "started before gc must finish within it (use --force to run anyway, e.g. when nothing else writes)")
    if not 0 <= repack_below <= 1:
        raise InputError(f"--repack-below must be a fraction between 0 and 1, got {repack_below:g}")
    lease = None
    if not dry_run:
        lease = Lease(repo.store, lease_ttl())
        lease.acquire()
    try:
        return Collector(repo, grace=grace, repack_below=repack_below, dry_run=dry_run, progress=progress,
                         wait=wait, lease=lease).run()
    finally:
        if lease is not None:
            lease.release()
