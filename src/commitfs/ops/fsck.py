"""Repository check: every reachable object present and matching its hash.

Checks, each damage reported once, naming what a user can act on:

* every index segment parses and passes its checksum;
* every ref under ``refs/`` parses (a branch or tag holds one commit id; an
  alias its commit id on its first line, and its log is present, intact and
  chained; remotes' configurations and the gc lease excepted) and names an
  existing, well-formed commit;
* a commit's read set (``commitfs.object.readset``) is present and well-formed;
* every commit reachable from a ref: its parents, its tree;
* every tree and file manifest reachable: present in the index, in a pack
  that exists and is long enough, decodes, and matches its id;
* every chunk: indexed, its pack long enough to hold it, and as long as
  every manifest listing it declares;
* with ``read_data``: every reachable chunk is read and re-hashed, and every
  pack's content hashes to its name.

Damage inside a file (its chunks) is one line per damaged *file*, naming how
many of its chunks are damaged, the first reason, and the commits and paths
that reach it; a damaged tree is one line naming where it is reached.

Unreferenced packs, index entries and commits (left by an interrupted commit)
are not errors: they are counted (``unreferenced``) and left for gc.

``repair``: a lost or damaged index is rebuilt from the packs' own entry
tables (one new segment; damaged segments are then removed); what cannot be
repaired is reported as such.  A storage failure (a stall past the storage
deadline, an error that retries did not cure) stops the whole check at once,
with one problem line: one deadline for the run, not one per object.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

from commitfs.errors import CommitfsError, CorruptObjectError, ObjectNotFoundError, ReadSetError, StorageError
from commitfs.model.ids import HEX_SIZE, hash_bytes, is_hex
from commitfs.model.objects import DecodeError, Kind, TreeEntry
from commitfs.model import splittree
from commitfs.model.splittree import SplitTree
from commitfs.ops import readset
from commitfs.repo.gcstate import LEASE_REF
from commitfs.repo.index import Index, encode_segment, segment_key
from commitfs.repo.pack import load_pack_table, pack_id_from_key, pack_key
from commitfs.repo.repository import Repository

def _check_split_tree(repo: Repository, tid: bytes, tree: SplitTree, locate_problem, seen: set[bytes],
                      notes: list[str]) -> Iterator[TreeEntry]:
    """A split tree's entries, one leaf at a time, every chunk and index node
    located and checked against the index entry naming it (order, ranges, counts,
    sizes: a CorruptObjectError naming the chunk otherwise), and once they are all
    read, its boundaries the canonical ones (a note otherwise: its content reads
    right, but its id is not the one this content has, docs/FORMAT.md "Split
    trees"). Never all the entries at once: a directory of 10M entries is checked
    in the memory of a leaf."""
    def load(oid: bytes):
        why = locate_problem(oid)
        if why is not None:
            raise CorruptObjectError(f"chunk {oid.hex()} of the split tree: {why}")
        seen.add(oid)
        return repo.load_tree_node(oid)

    canonical = splittree.SplitIdBuilder()
    try:
        for entry in SplitTree(tid, tree.root, load).iter_entries():
            canonical.add(entry)
            yield entry
    except DecodeError as exc:
        raise CorruptObjectError(f"split tree is malformed: {exc}") from None
    if canonical.count <= splittree.SPLIT_ENTRIES or canonical.finish() != tid:
        notes.append(f"tree {tid.hex()}: split tree of {canonical.count} entries is not split as the format "
                     "says (its boundaries are not the canonical ones; the same content has another id)")


#: Commit/path pairs named per damaged object; the rest are counted.
_REACH_SHOWN = 3


@dataclass
class FsckReport:
    problems: list[str] = field(default_factory=list)
    repaired: list[str] = field(default_factory=list)
    commits: int = 0
    trees: int = 0
    files: int = 0
    chunks: int = 0
    packs: int = 0
    bytes_checked: int = 0
    #: Objects nothing reachable uses (gc's to remove): commits, index entries, packs.
    unreferenced: dict[str, int] = field(default_factory=lambda: {"commits": 0, "blobs": 0, "packs": 0})
    stopped: bool = False

    @property
    def ok(self) -> bool:
        return not self.problems

    def to_json(self) -> dict:
        return {"ok": self.ok, "problems": self.problems, "repaired": self.repaired, "commits": self.commits,
                "trees": self.trees, "files": self.files, "chunks": self.chunks, "packs": self.packs,
                "bytes_checked": self.bytes_checked, "unreferenced": self.unreferenced, "stopped": self.stopped}


class _Stopped(Exception):
    """Storage failed: the check stops (one deadline for the run)."""


def _storage_failure(exc: Exception) -> bool:
    return isinstance(exc, StorageError) and not isinstance(exc, ObjectNotFoundError)


def _ref_label(name: str) -> str:
    if name.startswith("branches/"):
        return f"branch {name[len('branches/'):]}"
    if name.startswith("tags/"):
        return f"tag {name[len('tags/'):]}"
    return f"ref {name}"


def _parse_refs(repo: Repository, problem: Callable[[str], None]) -> list[tuple[str, bytes]]:
    """(label, commit id) of every ref naming a commit; a ref that does not parse is damage."""
    damaged: dict[str, str] = {}  # refs that hold no commit id: damage, not a crash
    out = [(f"branch {n}", c) for n, c in repo.refs.branches(damaged).items()]
    out += [(f"tag {n}", c) for n, c in repo.refs.tags(damaged).items()]
    for message in damaged.values():
        problem(message)
    try:
        aliases = repo.aliases.states()
    except CommitfsError as exc:
        if _storage_failure(exc):
            raise _Stopped(str(exc)) from None
        problem(f"aliases: {exc}")
        aliases = {}
    for name, state in sorted(aliases.items()):
        out.append((f"alias {name}", state.commit))
        try:
            for _ in repo.aliases.iter_log(state.log):  # every entry present, intact, chained
                pass
        except CommitfsError as exc:
            if _storage_failure(exc):
                raise _Stopped(str(exc)) from None
            problem(f"alias {name}: log: {exc}")
    # Refs of any other namespace: the first line of the value is a commit id.
    for name, value in sorted(repo.store.iter_refs("")):
        if name == LEASE_REF or name.startswith(("gc/", "branches/", "tags/", "aliases/")):
            continue
        first = value.split(b"\n", 1)[0].strip()
        text = first.decode("ascii", "replace")
        if len(text) == HEX_SIZE and is_hex(text) and text == text.lower():
            out.append((_ref_label(name), bytes.fromhex(text)))
            continue
        if name.startswith("remotes/"):
            try:
                if isinstance(json.loads(value), dict):
                    continue  # a remote's configuration
            except ValueError:
                pass
        shown = value[:40].decode("utf-8", "replace")
        problem(f"{_ref_label(name)}: the ref does not parse (its first line is not a commit id: {shown!r})")
    return out


def repair_index(repo: Repository, report: FsckReport) -> None:
    """Rebuild what the index lacks from the packs' entry tables; remove damaged segments."""
    store = repo.store
    index = Index(store)
    damaged, healthy = [], []
    for seg in index.segments():
        try:
            seg.load_header()
            list(seg.iter_entries())
            healthy.append(seg)
        except CorruptObjectError:
            damaged.append(seg)
        except ObjectNotFoundError:
            continue
    indexed: set[bytes] = set()
    for seg in healthy:
        indexed.update(oid for oid, _ in seg.iter_entries())
    entries = []
    packs = 0
    for key, size, _mtime in store.iter_objects("packs/"):
        try:
            pid = pack_id_from_key(key)
        except ValueError:
            continue
        try:
            table = load_pack_table(store, pid, size)
        except CorruptObjectError as exc:
            report.problems.append(f"cannot repair: {exc} (its blobs stay unindexed)")
            continue
        except ObjectNotFoundError:
            continue
        packs += 1
        entries.extend((oid, loc) for oid, loc in table if oid not in indexed)
    rebuilt = None
    if entries:
        data = encode_segment(entries)
        rebuilt = segment_key(data)
        store.save_object(rebuilt, data)  # before any damaged segment goes
        report.repaired.append(f"index: rebuilt {len({oid for oid, _ in entries})} entries from the tables "
                               f"of {packs} packs")
    for seg in damaged:
        if seg.key == rebuilt:  # the same entries again: the damaged copy was just overwritten whole
            report.repaired.append(f"index: rewrote the damaged segment {seg.key} ({seg.damaged})")
            continue
        store.remove_object(seg.key)
        report.repaired.append(f"index: removed the damaged segment {seg.key} ({seg.damaged})")
    repo.index.refresh()  # the removed segments (and the damage they remember) go
    repo.index.forget_answers()


def fsck(repo: Repository, read_data: bool = False, progress: Callable[[str, int], None] | None = None,
         repair: bool = False) -> FsckReport:
    rep = FsckReport()
    if repair:
        try:
            repair_index(repo, rep)
        except CommitfsError as exc:
            if not _storage_failure(exc):
                raise
            rep.problems.append(f"storage failed during repair: {exc}; fsck stopped")
            rep.stopped = True
            return rep
    try:
        _check(repo, rep, read_data, progress)
    except _Stopped as stop:
        rep.stopped = True
        rep.problems.append(
            f"storage failed: {stop.args[0]}; fsck stopped after checking {rep.commits} commits, "
            f"{rep.trees} trees, {rep.files} files and {rep.chunks} chunks")
    if repair and rep.problems:
        rep.problems = [p if p.startswith(("cannot repair", "storage failed")) else f"cannot repair: {p}"
                        for p in rep.problems]
    return rep


def _check(repo: Repository, rep: FsckReport, read_data: bool, progress) -> None:
    _Check(repo, rep, read_data, progress).run()


class _Check:
    """One fsck run's phases, in order: index segments, commits from the refs, the
    objects they reach (each checked once; damage remembered by id), where the
    damage is reached, the report, unreferenced objects, and with ``read_data``
    the packs' own hashes.

    Memory: the ids seen (commits, trees, files, chunks, split-tree nodes, needed
    for the unreferenced counts) and the damage, nothing per tree entry: where
    damage is reached is found by walking the trees again, and only when there is
    damage."""

    def __init__(self, repo: Repository, rep: FsckReport, read_data: bool, progress) -> None:
        self.repo, self.rep, self.read_data, self.progress = repo, rep, read_data, progress
        self.problem = rep.problems.append
        self.pack_sizes: dict[bytes, int | None] = {}
        self.tips: dict[bytes, list[str]] = {}
        self.seen_commits: set[bytes] = set()
        self.commit_trees: list[tuple[bytes, bytes]] = []  # (commit, tree)
        self.seen_trees: set[bytes] = set()
        self.seen_files: set[bytes] = set()
        self.seen_chunks: set[bytes] = set()
        self.seen_nodes: set[bytes] = set()  # chunks and index nodes of split trees
        self.tree_damage: dict[bytes, str] = {}
        self.tree_notes: list[str] = []  # damage inside a readable tree (a symlink entry)
        self.file_damage: dict[bytes, list[str]] = {}  # file id: reasons (whole file or per chunk)
        self.file_chunks: dict[bytes, int] = {}  # of damaged files only: how many chunks they have
        self.chunk_damage: dict[bytes, str] = {}

    def run(self) -> None:
        self.check_segments()
        self.check_commits()
        self.check_objects()
        self.report_damage()
        self.count_unreferenced()
        if self.read_data:
            self.check_packs()
        else:
            self.rep.packs = sum(1 for s in self.pack_sizes.values() if s is not None)

    def guard(self, exc: Exception) -> None:
        if _storage_failure(exc):
            raise _Stopped(str(exc)) from None

    def pack_size(self, pid: bytes) -> int | None:
        if pid not in self.pack_sizes:
            self.pack_sizes[pid] = self.repo.store.lookup_size(pack_key(pid))
        return self.pack_sizes[pid]

    def locate_problem(self, oid: bytes) -> str | None:
        """Why the object cannot be read where the index says, or None."""
        try:
            loc = self.repo.locate(oid)
            size = self.pack_size(loc.pack)
        except CommitfsError as exc:
            self.guard(exc)
            return str(exc)
        if size is None:
            return f"pack {loc.pack.hex()} is missing"
        if loc.offset + loc.stored > size:
            return f"pack {loc.pack.hex()} is truncated"
        return None

    def check_segments(self) -> None:
        for seg in self.repo.index.segments():
            try:
                seg.load_header()
            except CommitfsError as exc:
                self.guard(exc)
                self.problem(f"index: {exc} (commitfs fsck --repair rebuilds it from the packs)")

    def check_commits(self) -> None:
        """Commits reachable from references."""
        repo, problem = self.repo, self.problem
        roots = _parse_refs(repo, problem)
        for label, cid in roots:
            self.tips.setdefault(cid, []).append(label)
        stack = list(roots)
        while stack:
            where, cid = stack.pop()
            if cid in self.seen_commits:
                continue
            self.seen_commits.add(cid)
            try:
                commit = repo.load_commit(cid)
            except CommitfsError as exc:
                self.guard(exc)
                problem(f"{where}: commit {cid.hex()}: {exc}")
                continue
            self.rep.commits += 1
            try:  # a run's read set (ops/readset.py): present and well-formed
                entries = readset.commit_readset(repo, commit.metadata)
                if entries is not None:
                    for _ in entries:
                        pass
            except ReadSetError as exc:
                problem(f"commit {cid.hex()}: {exc}")
            except CommitfsError as exc:
                self.guard(exc)
                raise
            self.commit_trees.append((cid, commit.tree))
            stack.extend((f"parent of {cid.hex()[:12]}", p) for p in commit.parents)

    def tree_entries(self, tid: bytes):
        """A readable tree's entries (a split tree's an iterator, checked as it is
        read: its damage is raised then), or None with the damage recorded."""
        why = self.locate_problem(tid)
        if why is not None:
            self.tree_damage[tid] = why
            return None
        try:
            tree = self.repo.load_tree(tid)
            if isinstance(tree, SplitTree):
                return _check_split_tree(self.repo, tid, tree, self.locate_problem, self.seen_nodes,
                                         self.tree_notes)
            return tree.entries
        except CommitfsError as exc:
            self.guard(exc)
            self.tree_damage[tid] = str(exc)
            return None

    def check_objects(self) -> None:
        """Every tree, file and chunk reachable, each once."""
        trees = [t for _, t in self.commit_trees]
        while trees:
            tid = trees.pop()
            if tid in self.seen_trees:
                continue
            self.seen_trees.add(tid)
            entries = self.tree_entries(tid)
            if entries is None:
                continue
            try:  # a tree stored as a delta keeps its base, and all it names, as gc does
                base = self.repo.reads.delta_base_id(tid)
            except CommitfsError as exc:
                self.guard(exc)
                base = None
            if base is not None:
                trees.append(base)
            try:  # a split tree's leaves are read as the walk goes
                for e in entries:
                    if e.kind is Kind.DIR:
                        trees.append(e.id)
                    elif e.kind is Kind.SYMLINK:
                        if hash_bytes(e.target) != e.id:
                            self.tree_notes.append(f"tree {tid.hex()}: symlink {e.name!r} does not match its id")
                    elif e.id not in self.seen_files:
                        self.seen_files.add(e.id)
                        self.rep.files += 1
                        self.check_file(e.id, e.size)
            except CommitfsError as exc:
                self.guard(exc)
                self.tree_damage[tid] = str(exc)
                continue
            self.rep.trees += 1

    def check_file(self, fid: bytes, size: int) -> None:
        repo = self.repo
        why = self.locate_problem(fid)
        if why is not None:
            self.file_damage[fid] = [why]
            return
        try:
            manifest = repo.load_manifest(fid)
        except CommitfsError as exc:
            self.guard(exc)
            self.file_damage[fid] = [str(exc)]
            return
        reasons: list[str] = []
        if manifest.size != size:
            reasons.append(f"size {manifest.size} != tree's {size}")
        for cid, declared in zip(manifest.chunk_ids, manifest.chunk_sizes):
            # A manifest's declared chunk sizes must be the chunks' lengths (readers
            # map offsets with them): the index's size here, the bytes themselves
            # with read_data. Every manifest naming a chunk is held to the index's size.
            first = cid not in self.seen_chunks
            if first:
                self.seen_chunks.add(cid)
                self.rep.chunks += 1
                why = self.locate_problem(cid)
                if why is not None:
                    self.chunk_damage[cid] = why
            if cid not in self.chunk_damage:
                raw = repo.locate(cid).raw
                if raw != declared:
                    reasons.append(f"declares chunk {cid.hex()} as {declared} bytes; the index says {raw}")
                    continue
                if first and self.read_data:
                    try:
                        self.rep.bytes_checked += len(repo.load_chunks([cid], sizes=[declared])[0])
                    except CommitfsError as exc:
                        self.guard(exc)
                        self.chunk_damage[cid] = str(exc)
                    if self.progress:
                        self.progress("chunks", self.rep.chunks)
            if cid in self.chunk_damage:
                reasons.append(f"chunk {cid.hex()}: {self.chunk_damage[cid]}")
        if reasons:
            self.file_damage[fid] = reasons
            self.file_chunks[fid] = len(manifest.chunk_ids)

    def reach(self) -> tuple[dict[bytes, list[tuple[bytes, str]]], dict[bytes, int]]:
        """Where each damaged object is reached: (commit, path) pairs (the first
        _REACH_SHOWN) and counts. Each commit's tree is walked by path, only into
        subtrees that hold damage (memoised by id; trees are read again)."""
        damaged_ids = set(self.tree_damage) | set(self.file_damage)
        reach: dict[bytes, list[tuple[bytes, str]]] = {oid: [] for oid in damaged_ids}
        count: dict[bytes, int] = dict.fromkeys(damaged_ids, 0)
        if not damaged_ids:
            return reach, count
        holds: dict[bytes, bool] = {}

        def kids(tid: bytes):
            try:
                tree = self.repo.load_tree(tid)
            except CommitfsError as exc:
                self.guard(exc)
                return ()  # readable a moment ago: the first pass reported what it found
            return tree.iter_entries() if isinstance(tree, SplitTree) else tree.entries

        def holds_damage(tid: bytes) -> bool:
            if tid in holds:
                return holds[tid]
            holds[tid] = tid in damaged_ids  # a cycle guard too
            result = tid in damaged_ids or any(
                (holds_damage(e.id) if e.kind is Kind.DIR else e.id in damaged_ids)
                for e in kids(tid) if e.kind is not Kind.SYMLINK)
            holds[tid] = result
            return result

        def seen(oid: bytes, cid: bytes, path: str) -> None:
            count[oid] += 1
            if len(reach[oid]) < _REACH_SHOWN:
                reach[oid].append((cid, path))

        for cid, root in self.commit_trees:
            todo = [(root, "")]
            while todo:
                tid, path = todo.pop()
                if not holds_damage(tid):
                    continue
                if tid in damaged_ids:
                    seen(tid, cid, path + "/" if path else "/")
                    continue
                for e in kids(tid):
                    sub = f"{path}/{e.name}" if path else e.name
                    if e.kind is Kind.DIR:
                        todo.append((e.id, sub))
                    elif e.kind is not Kind.SYMLINK and e.id in damaged_ids:
                        seen(e.id, cid, sub)
        return reach, count

    def report_damage(self) -> None:
        reach, count = self.reach()

        def reached(oid: bytes) -> str:
            shown = [f"{c.hex()[:12]}{' (' + ', '.join(self.tips[c]) + ')' if c in self.tips else ''}:{p}"
                     for c, p in reach[oid]]
            if not shown:
                return ""
            more = count[oid] - len(shown)
            return "; reached from " + ", ".join(shown) + (f" and {more} more" if more > 0 else "")

        for tid, why in self.tree_damage.items():
            self.problem(f"tree {tid.hex()}: {why}{reached(tid)}")
        for note in self.tree_notes:
            self.problem(note)
        for fid, reasons in self.file_damage.items():
            path = reach[fid][0][1] if reach[fid] else fid.hex()
            total = self.file_chunks.get(fid)
            chunk_reasons = [r for r in reasons if r.startswith("chunk ")]
            if chunk_reasons and total:
                what = f"{len(chunk_reasons)} of {total} chunks damaged ({chunk_reasons[0]})"
                others = [r for r in reasons if not r.startswith("chunk ")]
                if others:
                    what = "; ".join(others) + "; " + what
            else:
                what = "; ".join(reasons)
            self.problem(f"file {path} ({fid.hex()}): {what}{reached(fid)}")

    def count_unreferenced(self) -> None:
        """Unreferenced objects: counted, left for gc."""
        repo, rep = self.repo, self.rep
        try:
            listed = set(repo.iter_commit_ids())
            rep.unreferenced["commits"] = len(listed - self.seen_commits)
            live = self.seen_trees | self.seen_files | self.seen_chunks | self.seen_nodes
            live_packs: set[bytes] = set()
            dead_blobs: set[bytes] = set()
            for seg in repo.index.segments():
                try:
                    for oid, loc in seg.iter_entries():
                        if oid in live:
                            live_packs.add(loc.pack)
                        else:
                            dead_blobs.add(oid)
                except CorruptObjectError:
                    continue
            rep.unreferenced["blobs"] = len(dead_blobs - live)
            all_packs = set()
            for key in repo.store.iter_keys("packs/"):
                try:
                    all_packs.add(pack_id_from_key(key))
                except ValueError:
                    continue
            rep.unreferenced["packs"] = len(all_packs - live_packs)
        except ObjectNotFoundError:
            pass  # a segment merged away meanwhile: the counts are best effort
        except CommitfsError as exc:
            self.guard(exc)
            raise

    def check_packs(self) -> None:
        for key in self.repo.store.iter_keys("packs/"):
            self.rep.packs += 1
            try:
                data = self.repo.store.load_object(key)
            except CommitfsError as exc:
                self.guard(exc)
                self.problem(f"pack {key}: {exc}")
                continue
            if hash_bytes(data) != pack_id_from_key(key):
                self.problem(f"pack {key}: content does not match its name")
