"""Repository check: every reachable object present and matching its hash.

Checks, each reported as one problem line:

* every index segment parses and passes its checksum;
* every branch and tag holds one commit id and names an existing, well-formed commit;
* every alias names an existing, well-formed commit; its log entries are present,
  intact and chained;
* a commit's read set (``commitfs.object.readset``) is present and well-formed;
* every commit reachable from a reference: its parents, its tree;
* every tree and file manifest reachable: present in the index, in a pack
  that exists and is long enough, decodes, and matches its id;
* every chunk: indexed, its pack long enough to hold it, and as long as
  every manifest listing it declares;
* with ``read_data``: every reachable chunk is read and re-hashed, and every
  pack's content hashes to its name.

Unreferenced packs, segments and commits (left by an interrupted commit) are
not errors: they are counted and left for gc.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from commitfs.errors import CommitfsError, ReadSetError
from commitfs.model.ids import hash_bytes
from commitfs.model.objects import Kind
from commitfs.ops import readset
from commitfs.repo.pack import pack_id_from_key, pack_key
from commitfs.repo.repository import Repository


@dataclass
class FsckReport:
    problems: list[str] = field(default_factory=list)
    commits: int = 0
    trees: int = 0
    files: int = 0
    chunks: int = 0
    packs: int = 0
    bytes_checked: int = 0

    @property
    def ok(self) -> bool:
        return not self.problems

    def to_json(self) -> dict:
        return {"ok": self.ok, "problems": self.problems, "commits": self.commits, "trees": self.trees,
                "files": self.files, "chunks": self.chunks, "packs": self.packs,
                "bytes_checked": self.bytes_checked}


def fsck(repo: Repository, read_data: bool = False, progress: Callable[[str, int], None] | None = None) -> FsckReport:
    rep = FsckReport()
    problem = rep.problems.append

    for seg in repo.index.segments():
        try:
            seg.load_header()
        except CommitfsError as exc:
            problem(f"index: {exc}")

    pack_sizes: dict[bytes, int | None] = {}

    def pack_size(pid: bytes) -> int | None:
        if pid not in pack_sizes:
            pack_sizes[pid] = repo.store.lookup_size(pack_key(pid))
        return pack_sizes[pid]

    def check_located(oid: bytes, what: str) -> bool:
        try:
            loc = repo.locate(oid)
        except CommitfsError as exc:
            problem(f"{what} {oid.hex()}: {exc}")
            return False
        size = pack_size(loc.pack)
        if size is None:
            problem(f"{what} {oid.hex()}: pack {loc.pack.hex()} is missing")
            return False
        if loc.offset + loc.stored > size:
            problem(f"{what} {oid.hex()}: pack {loc.pack.hex()} is truncated")
            return False
        return True

    # Commits reachable from references.
    damaged: dict[str, str] = {}  # refs that hold no commit id: damage, not a crash
    roots: list[tuple[str, bytes]] = [(f"branch {n}", c) for n, c in repo.refs.branches(damaged).items()]
    roots += [(f"tag {n}", c) for n, c in repo.refs.tags(damaged).items()]
    rep.problems.extend(damaged.values())
    try:
        aliases = repo.aliases.states()
    except CommitfsError as exc:
        problem(f"aliases: {exc}")
        aliases = {}
    for name, state in sorted(aliases.items()):
        roots.append((f"alias {name}", state.commit))
        try:
            for _ in repo.aliases.iter_log(state.log):  # every entry present, intact, chained
                pass
        except CommitfsError as exc:
            problem(f"alias {name}: log: {exc}")
    seen_commits: set[bytes] = set()
    trees: list[bytes] = []
    stack = list(roots)
    while stack:
        where, cid = stack.pop()
        if cid in seen_commits:
            continue
        seen_commits.add(cid)
        try:
            commit = repo.load_commit(cid)
        except CommitfsError as exc:
            problem(f"{where}: commit {cid.hex()}: {exc}")
            continue
        rep.commits += 1
        try:  # a run's read set (ops/readset.py): present and well-formed
            entries = readset.commit_readset(repo, commit.metadata)
            if entries is not None:
                for _ in entries:
                    pass
        except ReadSetError as exc:
            problem(f"commit {cid.hex()}: {exc}")
        trees.append(commit.tree)
        stack.extend((f"parent of {cid.hex()[:12]}", p) for p in commit.parents)

    seen_trees: set[bytes] = set()
    seen_files: set[bytes] = set()
    seen_chunks: set[bytes] = set()
    chunk_sizes: dict[bytes, int] = {}
    while trees:
        tid = trees.pop()
        if tid in seen_trees:
            continue
        seen_trees.add(tid)
        if not check_located(tid, "tree"):
            continue
        try:
            tree = repo.load_tree(tid)
        except CommitfsError as exc:
            problem(f"tree {tid.hex()}: {exc}")
            continue
        rep.trees += 1
        for e in tree.entries:
            if e.kind is Kind.DIR:
                trees.append(e.id)
            elif e.kind is Kind.SYMLINK:
                if hash_bytes(e.target) != e.id:
                    problem(f"tree {tid.hex()}: symlink {e.name!r} does not match its id")
            elif e.id not in seen_files:
                seen_files.add(e.id)
                rep.files += 1
                if not check_located(e.id, "file"):
                    continue
                try:
                    manifest = repo.load_manifest(e.id)
                except CommitfsError as exc:
                    problem(f"file {e.id.hex()} ({e.name}): {exc}")
                    continue
                if manifest.size != e.size:
                    problem(f"file {e.id.hex()} ({e.name}): size {manifest.size} != tree's {e.size}")
                for cid, declared in zip(manifest.chunk_ids, manifest.chunk_sizes):
                    # A manifest's declared chunk sizes must be the chunks'
                    # lengths (readers map offsets with them): the index's
                    # size here, the bytes themselves with read_data.
                    known = chunk_sizes.setdefault(cid, declared)
                    if known != declared:
                        problem(f"file {e.id.hex()} ({e.name}): declares chunk {cid.hex()} as {declared} bytes, "
                                f"another file as {known}")
                    if cid in seen_chunks:
                        continue
                    seen_chunks.add(cid)
                    rep.chunks += 1
                    if not check_located(cid, "chunk"):
                        continue
                    raw = repo.locate(cid).raw
                    if raw != declared:
                        problem(f"file {e.id.hex()} ({e.name}): declares chunk {cid.hex()} as {declared} bytes; "
                                f"the index says {raw}")
                        continue
                    if read_data:
                        try:
                            rep.bytes_checked += len(repo.load_chunks([cid], sizes=[declared])[0])
                        except CommitfsError as exc:
                            problem(f"chunk {cid.hex()}: {exc}")
                        if progress:
                            progress("chunks", rep.chunks)

    if read_data:
        for key in repo.store.iter_keys("packs/"):
            rep.packs += 1
            try:
                data = repo.store.load_object(key)
            except CommitfsError as exc:
                problem(f"pack {key}: {exc}")
                continue
            if hash_bytes(data) != pack_id_from_key(key):
                problem(f"pack {key}: content does not match its name")
    else:
        rep.packs = sum(1 for s in pack_sizes.values() if s is not None)
    return rep
