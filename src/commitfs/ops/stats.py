"""Statistics of one commit and of a whole repository.

A commit's: its files, their logical bytes, and the stored (packed,
compressed) bytes of the chunks it references, split into those no parent
references (stored *because of* this commit: what it added to the
repository) and those shared with a parent.  Cost: every manifest of the
commit and of its parents (metadata only, no chunk data), and one index
lookup per distinct chunk.

The repository's: commits, packs and their bytes, indexed objects by kind,
the logical bytes of every commit's tree summed (what storing each commit in
full would take), and the dedup ratio, logical over stored.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

from commitfs.model.objects import Kind
from commitfs.ops.browse import walk_tree
from commitfs.repo.pack import BlobKind
from commitfs.repo.repository import Repository


@dataclass
class CommitStats:
    commit: str
    files: int
    logical_bytes: int
    chunks: int
    stored_bytes: int
    unique_stored_bytes: int     # chunks no parent references
    shared_stored_bytes: int     # chunks a parent references too

    def to_json(self) -> dict:
        return asdict(self)


@dataclass
class RepositoryStats:
    commits: int
    packs: int
    pack_bytes: int
    objects: int
    chunks: int
    chunk_raw_bytes: int        # distinct chunk bytes before compression
    chunk_stored_bytes: int     # after
    logical_bytes: int          # every commit's tree size, summed
    dedup_ratio: float | None   # logical_bytes / pack_bytes

    def to_json(self) -> dict:
        return asdict(self)


def _chunks_of_tree(repo: Repository, tree_id: bytes) -> tuple[set[bytes], int, int]:
    chunks: set[bytes] = set()
    files = size = 0
    for item in walk_tree(repo, tree_id):
        e = item.entry
        if e.kind.is_file:
            files += 1
            size += e.size
            chunks.update(repo.load_manifest(e.id).chunk_ids)
        elif e.kind is Kind.SYMLINK:
            files += 1
    return chunks, files, size


def commit_stats(repo: Repository, cid: bytes) -> CommitStats:
    commit = repo.load_commit(cid)
    chunks, files, size = _chunks_of_tree(repo, commit.tree)
    parent_chunks: set[bytes] = set()
    for p in commit.parents:
        parent_chunks |= _chunks_of_tree(repo, repo.load_commit(p).tree)[0]
    stored = unique = 0
    for oid in chunks:
        n = repo.locate(oid).stored
        stored += n
        if oid not in parent_chunks:
            unique += n
    return CommitStats(cid.hex(), files, size, len(chunks), stored, unique, stored - unique)


def repository_stats(repo: Repository) -> RepositoryStats:
    commits = list(repo.iter_commit_ids())
    logical = sum(repo.load_tree(repo.load_commit(c).tree).size for c in commits)
    packs = pack_bytes = 0
    for key in repo.store.iter_keys("packs/"):
        packs += 1
        pack_bytes += repo.store.lookup_size(key) or 0
    seen: set[bytes] = set()
    chunks = raw = stored = 0
    repo.index.refresh()
    for seg in repo.index.segments():
        for oid, loc in seg.iter_entries():
            if oid in seen:
                continue
            seen.add(oid)
            if loc.kind is BlobKind.CHUNK:
                chunks += 1
                raw += loc.raw
                stored += loc.stored
    return RepositoryStats(len(commits), packs, pack_bytes, len(seen), chunks, raw, stored, logical,
                           round(logical / pack_bytes, 3) if pack_bytes else None)
